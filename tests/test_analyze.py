"""python -m geomlab.analyze on the three kinds of CKPT_DIR (SPEC §2, §3) and on bad input."""
import hashlib
import json
from pathlib import Path

import open_clip
import pytest
import torch

import geomlab  # noqa: F401  (registers geomlab-tiny)
from geomlab import geometry as G
from geomlab.analyze import main
from geomlab.geometry.synthetic import synthetic_run
from geomlab.io import atomic_torch_save
from geomlab.traces import read_trace


def tree_digest(root: Path, skip="analysis") -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and skip not in p.relative_to(root).parts}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return synthetic_run(tmp_path_factory.mktemp("runs") / "syn", checkpoints=5, domains=3, n=80, d=16, seed=1)


def test_run_directory(run_dir, capsys):
    before = tree_digest(run_dir)
    assert main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    report = run_dir / "analysis" / "report.html"
    assert f"report: {report}" in out and report.is_file()
    a = json.loads((run_dir / "analysis" / "analysis.json").read_text())
    assert a["schema"] == "geomlab.analysis/1" and a["source"]["kind"] == "run"
    assert list(a["strategies"]) == ["finetune", "modx", "joint"] and a["domains"] == ["domain0", "domain1", "domain2"]
    s = a["strategies"]["finetune"]
    assert len(s["checkpoints"]) == 5 and s["checkpoints"][0]["label"] == "base/phase0_step000100"
    assert s["vs_base"][0] is None and s["vs_base"][1] == s["vs_previous"][1]
    assert set(s["vs_base"][-1]["domain0"]) >= {"rotation", "topology_drift", "procrustes", "cka", "mutual_knn",
                                                "deviation", "flips"}
    # the accuracy matrix from the traces themselves: base phase end, then each phase end
    acc = s["accuracy"]
    assert acc["rows"][0] == "base/phase0_step000100" and len(acc["rows"]) == 3
    ends = [run_dir / "base/traces/phase0_step000100.safetensors"] + [
        run_dir / "finetune/traces" / f"{c['stem']}.safetensors" for c in s["checkpoints"][1:] if c["phase_end"]]
    A = G.accuracy_matrix([read_trace(p) for p in ends])
    assert torch.allclose(torch.tensor(acc["matrix"], dtype=torch.float64), A)
    assert acc["bwt"] == pytest.approx(G.bwt(A))
    # a pair's geometry equals the plain function on the same traces
    ta, tb = read_trace(ends[0]), read_trace(ends[-1])
    ref = G.spatial_disorder(ta.domains["domain1"], tb.domains["domain1"])
    got = s["vs_base"][-1]["domain1"]
    assert got["procrustes"]["image"]["rigid_share"] == pytest.approx(ref["procrustes"]["image"]["rigid_share"])
    assert got["topology_drift"]["text"]["mean"] == pytest.approx(ref["topology_drift"]["text"]["mean"])
    assert tree_digest(run_dir) == before  # nothing but analysis/ was written


def test_strategy_directory(run_dir, tmp_path):
    assert main([str(run_dir / "modx"), "--out", str(tmp_path / "out"), "-q"]) == 0
    a = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert a["source"]["kind"] == "strategy" and list(a["strategies"]) == ["modx"]
    assert a["strategies"]["modx"]["checkpoints"][0]["owner"] == "base"
    assert (tmp_path / "out" / "report.html").is_file()


def test_several_captions_per_image(tmp_path):
    root = synthetic_run(tmp_path / "multi", strategies=("finetune",), checkpoints=3, domains=2, n=30, d=8,
                         captions_per_image=3)
    assert main([str(root), "-q"]) == 0
    a = json.loads((root / "analysis" / "analysis.json").read_text())
    pair = a["strategies"]["finetune"]["vs_base"][-1]["domain0"]
    assert pair["n_images"] == 30 and pair["n_texts"] == 90
    assert pair["flips"]["image_to_text"]["queries"] == 30 and pair["flips"]["text_to_image"]["queries"] == 90
    assert len(a["strategies"]["finetune"]["sphere"][0]["domain0"]["text"]) == 30


def tiny_state(seed):
    torch.manual_seed(seed)
    return open_clip.create_model("geomlab-tiny").state_dict()


def test_plain_directory_of_open_clip_checkpoints(tmp_path, capsys):
    ckpts = tmp_path / "logs" / "exp" / "checkpoints"
    ckpts.mkdir(parents=True)
    for epoch in (1, 2):  # open_clip's own save format (DDP-wrapped for epoch 2)
        sd = tiny_state(epoch)
        if epoch == 2:
            sd = {f"module.{k}": v for k, v in sd.items()}
        torch.save({"epoch": epoch, "name": "exp", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}},
                   ckpts / f"epoch_{epoch}.pt")
    before = tree_digest(ckpts)
    assert main([str(ckpts), "--model", "geomlab-tiny", "--probe", "shapes", "-q"]) == 0
    a = json.loads((ckpts / "analysis" / "analysis.json").read_text())
    s = a["strategies"]["checkpoints"]
    assert a["source"]["kind"] == "checkpoints"
    assert [c["stem"] for c in s["checkpoints"]] == ["epoch_1", "epoch_2"]
    assert {c["source"] for c in s["checkpoints"]} == {"embedded"}
    assert len(a["domains"]) == 5 and len(s["accuracy"]["rows"]) == 2
    caps = a["sphere"]["samples"][a["domains"][0]]["captions"]
    assert caps and all(isinstance(c, str) and c for c in caps)
    # a second run reads the cached embeddings
    assert main([str(ckpts), "--model", "geomlab-tiny", "--probe", "shapes", "-q", "--no-report"]) == 0
    a2 = json.loads((ckpts / "analysis" / "analysis.json").read_text())
    assert {c["source"] for c in a2["strategies"]["checkpoints"]["checkpoints"]} == {"cache"}
    assert a2["strategies"]["checkpoints"]["accuracy"] == s["accuracy"]
    assert tree_digest(ckpts) == before


def test_run_without_traces_embeds_checkpoints(tmp_path):
    """No traces: the analyser embeds the checkpoints with the probe sets of the run's own config."""
    root = tmp_path / "run"
    root.mkdir()
    (root / "config.toml").write_text("[data]\nprobe_size = 40\n\n[data.shapes]\ndomains = 2\n")
    for where, phase, seed in (("base", 0, 0), ("finetune", 1, 1), ("finetune", 2, 2)):
        atomic_torch_save(root / where / "checkpoints" / f"phase{phase}_step000010.pt",
                          {"state_dict": tiny_state(seed), "name": "geomlab-tiny", "phase": phase, "step": 10,
                           "strategy": where, "phase_end": True, "epoch": phase})
    (root / "run.json").write_text(json.dumps({"strategies": ["finetune"], "completed": {"base": [0], "finetune": [1, 2]}}))
    before = tree_digest(root)
    assert main([str(root), "-q", "--no-report"]) == 0
    a = json.loads((root / "analysis" / "analysis.json").read_text())
    assert len(a["domains"]) == 2 and a["sphere"]["samples"][a["domains"][0]]["captions"]
    s = a["strategies"]["finetune"]
    assert [c["label"] for c in s["checkpoints"]] == ["base/phase0_step000010", "phase1_step000010", "phase2_step000010"]
    assert len(s["accuracy"]["rows"]) == 3
    assert tree_digest(root) == before
    assert not list(root.glob("*/traces"))  # embeddings are cached under analysis/, never beside checkpoints


@pytest.mark.parametrize("case", ["missing", "empty", "model", "probe", "no-model"])
def test_bad_input_is_one_line_exit_2(case, tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    args = [str(d)]
    if case == "missing":
        args, needle = [str(tmp_path / "nope")], "does not exist"
    elif case == "empty":
        needle = "no checkpoints"
    else:
        torch.save({"epoch": 1, "state_dict": {}}, d / "epoch_1.pt")
        if case == "model":
            args += ["--model", "no-such-model", "--probe", "shapes"]
            needle = "no-such-model"
        elif case == "probe":
            args += ["--model", "geomlab-tiny", "--probe", "nowhere.toml"]
            needle = "nowhere.toml"
        else:
            needle = "--model"
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("geomlab.analyze: error:") and needle in err
    assert not (d / "analysis").exists()
