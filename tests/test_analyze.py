"""python -m geomlab.analyze on the three kinds of CKPT_DIR and on bad input; its numbers against
independent computations from the traces (docs/definitions.md)."""
import contextlib
import hashlib
import io
import json
import subprocess
import sys
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import geomlab.models  # noqa: F401  (registers geomlab-tiny)
from geomlab import geometry as G
from geomlab.analyze import analyze, main, print_summary
from geomlab.figures import headline_numbers
from geomlab.data import shapes
from geomlab.geometry.synthetic import synthetic_run
from geomlab.io import atomic_torch_save
from geomlab import rundir as rundir_module
from geomlab.rundir import RunDir
from geomlab.traces import read_trace, write_trace


def tree_digest(root: Path, skip="analysis") -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and skip not in p.relative_to(root).parts}


def brute_ranks(image, text, caption_image=None):
    """0-based ranks of the positives from a stable descending argsort of float64 similarities (a
    tie goes to the smaller index); an image counts its best-ranked caption."""
    image, text = image.double(), text.double()
    ci = caption_image if caption_image is not None else torch.arange(text.shape[0])
    s = image @ text.T
    order = s.argsort(dim=1, descending=True, stable=True)
    caption_rank = torch.stack([(order[ci[c]] == c).nonzero()[0, 0] for c in range(text.shape[0])])
    i2t = torch.stack([caption_rank[ci == i].min() for i in range(image.shape[0])])
    order_t = s.T.argsort(dim=1, descending=True, stable=True)
    t2i = torch.stack([(order_t[c] == ci[c]).nonzero()[0, 0] for c in range(text.shape[0])])
    return i2t, t2i


def mean_r1(emb) -> float:
    i2t, t2i = brute_ranks(emb.image, emb.text, emb.caption_image)
    return 0.5 * ((i2t == 0).double().mean().item() + (t2i == 0).double().mean().item())


def mean_angle(a, b) -> float:
    """Mean of arccos⟨a_i, b_i⟩ in degrees."""
    cos = (F.normalize(a.double(), dim=1) * F.normalize(b.double(), dim=1)).sum(1).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cos)).mean().item()


def sphere_gram(rows, fit):
    """Gram matrix of `rows` projected on the top-3 principal axes of `fit` (SVD) and scaled to unit
    length: independent of the axes' signs, so comparable with any PCA's projection."""
    fit = fit.double()
    mean = fit.mean(0)
    axes = torch.linalg.svd(fit - mean, full_matrices=False).Vh[:3]
    p = F.normalize((rows.double() - mean) @ axes.T, dim=1)
    return p @ p.T


def explained_variance(fit):
    s = torch.linalg.svdvals(fit.double() - fit.double().mean(0))
    return (s[:3] ** 2 / (s ** 2).sum()).tolist()


def accuracy_from_traces(paths, domains):
    return [[mean_r1(read_trace(p).domains[d]) for d in domains] for p in paths]


def bwt_of(A):
    """GEM's BWT when probe set d is learned at phase d (ShapeWorld's mapping; the synthetic runs')."""
    T = len(A) - 1
    return float(np.mean([A[T][d] - A[d][d] for d in range(T)]))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return synthetic_run(tmp_path_factory.mktemp("runs") / "syn", checkpoints=5, domains=3, n=80, d=16, seed=1)


@pytest.fixture(scope="module")
def run_analysis(run_dir):
    """(analysis.json of the whole run, console output, the run's tree digest before the analysis)."""
    before = tree_digest(run_dir)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([str(run_dir)]) == 0
    return json.loads((run_dir / "analysis" / "analysis.json").read_text()), out.getvalue(), before


def test_run_directory(run_dir, run_analysis):
    a, out, before = run_analysis
    report = run_dir / "analysis" / "report.html"
    assert f"report: {report}" in out and report.read_text().startswith("<!DOCTYPE html>")
    assert a["schema"] == "geomlab.analysis/2" and a["source"]["kind"] == "run"
    assert a["source"]["run"] == RunDir(run_dir).run_json()
    assert list(a["strategies"]) == ["finetune", "modx", "joint"] and a["domains"] == ["domain0", "domain1", "domain2"]
    s = a["strategies"]["finetune"]
    # the series: the base phase-0 end, then the strategy's traces in (phase, step) order
    traces = sorted((run_dir / "finetune" / "traces").glob("*.safetensors"),
                    key=lambda p: (read_trace(p).phase, read_trace(p).step))
    paths = [run_dir / "base/traces/phase0_step000100.safetensors"] + traces
    assert [c["path"] for c in s["checkpoints"]] == [str(p) for p in paths]
    assert [c["label"] for c in s["checkpoints"]] == ["base/phase0_step000100"] + [p.stem for p in traces]
    assert [c["strategy_dir"] for c in s["checkpoints"]] == ["base"] + ["finetune"] * len(traces)
    assert [(c["phase"], c["step"]) for c in s["checkpoints"]] == [(read_trace(p).phase, read_trace(p).step)
                                                                  for p in paths]
    ends = [0] + [k for k in range(1, len(paths)) if k + 1 == len(paths) or
                  read_trace(paths[k + 1]).phase != read_trace(paths[k]).phase]
    assert [k for k, c in enumerate(s["checkpoints"]) if c["phase_end"]] == ends
    # retrieval and the modality gap of every checkpoint, from the traces by brute force
    for k, p in enumerate(paths):
        for d in a["domains"]:
            e = read_trace(p).domains[d]
            i2t, t2i = brute_ranks(e.image, e.text)
            got = s["retrieval"][k][d]
            assert got["image_to_text_R@1"] == pytest.approx((i2t == 0).double().mean().item(), abs=1e-6)
            assert got["text_to_image_R@5"] == pytest.approx((t2i < 5).double().mean().item(), abs=1e-6)
            assert got["image_to_text_mean_rank"] == pytest.approx(i2t.double().mean().item() + 1, rel=1e-6)
            assert got["text_to_image_median_rank"] == np.floor(np.median(t2i.numpy())) + 1
            gap = (F.normalize(e.image.double(), dim=1).mean(0) - F.normalize(e.text.double(), dim=1).mean(0)).norm()
            assert s["modality_gap"][k][d] == pytest.approx(gap.item(), rel=1e-9)
    # the accuracy matrix: mean R@1 at the base phase end, then at each phase end
    acc = s["accuracy"]
    assert "novel" not in acc  # no novel probe sets: every number as before
    A = accuracy_from_traces([paths[k] for k in ends], a["domains"])
    assert acc["rows"] == [s["checkpoints"][k]["label"] for k in ends] and acc["row_checkpoints"] == ends
    assert np.allclose(acc["matrix"], A, atol=1e-6)
    # probe set d is learned at phase d (run.json's probe_phases)
    T, D = len(A) - 1, len(a["domains"])
    assert acc["learned_at"] == list(range(D))
    assert acc["last"] == pytest.approx(np.mean(A[-1]), abs=1e-6)
    assert acc["avg"] == pytest.approx(np.mean([np.mean(A[t][:t + 1]) for t in range(T + 1)]), abs=1e-6)
    assert acc["bwt"] == pytest.approx(bwt_of(A), abs=1e-6)
    assert acc["transfer"] == pytest.approx(np.mean([A[t][d] for d in range(D) for t in range(d)]), abs=1e-6)
    assert acc["forgetting"] == [pytest.approx(max(A[t][d] for t in range(d, T)) - A[T][d], abs=1e-6) if d < T
                                 else None for d in range(D)]
    assert acc["domain0"] == {"probes": ["domain0"], "r1": pytest.approx(A[T][0], abs=1e-6)}
    assert acc["last_domain"] == {"probes": [f"domain{T}"], "r1": pytest.approx(A[T][T], abs=1e-6)}
    # pairs: rotation angles by arccos; the rest equals the plain function on the same traces
    assert s["vs_base"][0] is None and s["vs_base"][1] == s["vs_previous"][1]
    ta, tb = read_trace(paths[0]), read_trace(paths[-1])
    got = s["vs_base"][-1]["domain1"]
    for mod in ("image", "text"):
        want = mean_angle(getattr(ta.domains["domain1"], mod), getattr(tb.domains["domain1"], mod))
        assert got["rotation"][mod]["mean"] == pytest.approx(want, abs=1e-6)
    prev = s["vs_previous"][-1]["domain0"]["rotation"]["image"]["mean"]
    assert prev == pytest.approx(mean_angle(read_trace(paths[-2]).domains["domain0"].image,
                                            tb.domains["domain0"].image), abs=1e-6)
    ref = G.spatial_disorder(ta.domains["domain1"], tb.domains["domain1"])
    assert got["procrustes"]["image"]["rigid_share"] == pytest.approx(ref["procrustes"]["image"]["rigid_share"])
    assert got["topology_drift"]["text"]["mean"] == pytest.approx(ref["topology_drift"]["text"]["mean"])
    assert got["cka"] == pytest.approx(ref["cka"]) and got["mutual_knn"] == pytest.approx(ref["mutual_knn"])
    # the sphere: PCA fitted at the base checkpoint; points on the unit sphere, same geometry as an SVD's
    base = ta.domains["domain0"]
    fit = torch.cat([torch.cat([e.image, e.text]) for e in ta.domains.values()])
    assert a["sphere"]["fit_at"] == "base/phase0_step000100"
    assert a["sphere"]["explained_variance"] == pytest.approx(explained_variance(fit.float()), rel=1e-4)
    ids = a["sphere"]["samples"]["domain0"]["ids"]
    rows = [int((base.ids == i).nonzero()[0, 0]) for i in ids]
    assert ids == base.ids[torch.linspace(0, 79, 80).round().long()].tolist()  # n = 80 ≤ 100 samples: all
    pts = torch.tensor(s["sphere"][-1]["domain0"]["image"], dtype=torch.float64)
    assert torch.allclose(pts.norm(dim=1), torch.ones(len(rows), dtype=torch.float64), atol=1e-3)
    assert torch.allclose(pts @ pts.T, sphere_gram(tb.domains["domain0"].image[rows].float(), fit.float()), atol=2e-3)
    # the console summary shows the same numbers, one line per strategy
    for name, series in a["strategies"].items():
        g = series["vs_base"][-1]["domain0"]
        acc = series["accuracy"]
        assert (f"  {name:<12} Last {acc['last']:.3f}  Avg {acc['avg']:.3f}  BWT {acc['bwt']:+.3f}  forgetting "
                f"{acc['mean_forgetting']:.3f}  Transfer {acc['transfer']:.3f}"
                f"  | domain0 vs base: θ img {g['rotation']['image']['mean']:.1f}°") in out
    assert tree_digest(run_dir) == before  # nothing but analysis/ was written


def test_strategy_directory_is_that_series_of_the_run(run_dir, run_analysis, tmp_path):
    assert main([str(run_dir / "modx"), "--out", str(tmp_path / "out"), "-q"]) == 0
    a = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert a["source"]["kind"] == "strategy" and list(a["strategies"]) == ["modx"]
    assert a["strategies"]["modx"]["checkpoints"][0]["strategy_dir"] == "base"
    assert a["strategies"]["modx"] == run_analysis[0]["strategies"]["modx"]
    assert (tmp_path / "out" / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_analyze_from_python_writes_what_it_returns(run_dir, run_analysis, tmp_path):
    a = analyze(run_dir / "joint", out=tmp_path, report=False, quiet=True)
    assert json.loads((tmp_path / "analysis.json").read_text()) == a and not (tmp_path / "report.html").exists()
    assert a["strategies"]["joint"] == run_analysis[0]["strategies"]["joint"]


def test_several_captions_per_image(tmp_path):
    root = synthetic_run(tmp_path / "multi", strategies=("finetune",), checkpoints=3, domains=2, n=30, d=8,
                         captions_per_image=3)
    assert main([str(root), "-q"]) == 0
    a = json.loads((root / "analysis" / "analysis.json").read_text())
    s = a["strategies"]["finetune"]
    pair = s["vs_base"][-1]["domain0"]
    assert pair["n_images"] == 30 and pair["n_texts"] == 90
    assert pair["flips"]["image_to_text"]["queries"] == 30 and pair["flips"]["text_to_image"]["queries"] == 90
    # an image query counts its best caption; each caption's positive is its own image
    last = read_trace(Path(s["checkpoints"][-1]["path"])).domains["domain0"]
    assert torch.equal(last.caption_image, torch.arange(30).repeat_interleave(3))
    i2t, t2i = brute_ranks(last.image, last.text, last.caption_image)
    got = s["retrieval"][-1]["domain0"]
    assert got["image_to_text_R@1"] == pytest.approx((i2t == 0).double().mean().item(), abs=1e-6)
    assert got["text_to_image_R@1"] == pytest.approx((t2i == 0).double().mean().item(), abs=1e-6)
    # the 3-D view pairs each sampled image with its first caption
    first = read_trace(Path(s["checkpoints"][0]["path"]))
    fit = torch.cat([torch.cat([e.image, e.text]) for e in first.domains.values()]).float()
    pts = torch.tensor(s["sphere"][-1]["domain0"]["text"], dtype=torch.float64)
    assert pts.shape == (30, 3)
    assert torch.allclose(pts @ pts.T, sphere_gram(last.text[torch.arange(30) * 3].float(), fit), atol=2e-3)


def tiny_state(seed):
    torch.manual_seed(seed)
    return open_clip.create_model("geomlab-tiny").state_dict()


def test_plain_directory_of_open_clip_checkpoints(tmp_path):
    ckpts = tmp_path / "logs" / "exp" / "checkpoints"
    ckpts.mkdir(parents=True)
    for epoch in (1, 2, 10):  # open_clip's own save format (DDP-wrapped for epoch 2); natural order
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
    assert [(c["stem"], c["step"], c["strategy_dir"]) for c in s["checkpoints"]] == [
        ("epoch_1", 1, "checkpoints"), ("epoch_2", 2, "checkpoints"), ("epoch_10", 10, "checkpoints")]
    assert {c["source"] for c in s["checkpoints"]} == {"embedded"}
    probes = shapes.probe_sets(seed=0, image_size=32, probe_size=200, domains=5)
    # --probe shapes embeds the calibration sets too (the default config's), and analyses none of them
    assert a["domains"] == [p.name for p in probes if p.kind != "calibration"] and len(probes) == 15
    # the embedded traces are the model's own embeddings of the probe sets
    cached = [read_trace(ckpts / "analysis" / "cache" / "traces" / "checkpoints" / f"{c['stem']}.safetensors")
              for c in s["checkpoints"]]
    model = open_clip.create_model("geomlab-tiny").eval()
    model.load_state_dict(tiny_state(1))
    with torch.no_grad():
        want = F.normalize(model.encode_image(torch.stack([probes[0].images[i] for i in range(4)])), dim=-1)
    assert torch.allclose(cached[0].domains[probes[0].name].image[:4].float(), want, atol=2e-3)
    # one accuracy row per checkpoint, from those traces; Last only: no phases, so no mapping
    A = [[mean_r1(t.domains[d]) for d in a["domains"]] for t in cached]
    acc = s["accuracy"]
    assert acc["rows"] == ["epoch_1", "epoch_2", "epoch_10"] and np.allclose(acc["matrix"], A, atol=1e-6)
    assert acc["last"] == pytest.approx(np.mean(A[-1][0::2]), abs=1e-6) and acc["learned_at"] is None
    # --probe shapes: seen and novel probe sets (their kinds from the probe sets themselves)
    assert acc["novel"]["probes"] == a["domains"][1::2] == [p.name for p in probes if p.kind == "novel"]
    assert acc["novel"]["last"] == pytest.approx(np.mean(A[-1][1::2]), abs=1e-6)
    assert [acc[k] for k in ("avg", "bwt", "transfer", "mean_forgetting", "domain0", "last_domain")] == [None] * 6
    # hover captions: the probe set's caption of each sampled pair
    d0 = probes[0]
    samples = a["sphere"]["samples"][d0.name]
    rows = [int((d0.ids == i).nonzero()[0, 0]) for i in samples["ids"]]
    assert samples["captions"] == [d0.captions[int((d0.caption_image == r).nonzero()[0, 0])] for r in rows]
    # a second run reads the cached embeddings
    assert main([str(ckpts), "--model", "geomlab-tiny", "--probe", "shapes", "-q", "--no-report"]) == 0
    a2 = json.loads((ckpts / "analysis" / "analysis.json").read_text())
    assert {c["source"] for c in a2["strategies"]["checkpoints"]["checkpoints"]} == {"cache"}
    assert a2["strategies"]["checkpoints"]["accuracy"] == s["accuracy"]
    assert tree_digest(ckpts) == before


def test_open_clip_folder_epoch_latest_alias_ignored_files_and_wrong_model(tmp_path, capsys):
    """epoch_latest.pt duplicating epoch_N.pt is left out (same accuracy matrix as without it); alone it
    is the last epoch; files that are not checkpoints are listed in one line; a wrong --model names the
    tensors that differ, with their shapes."""
    plain, alias = tmp_path / "plain", tmp_path / "alias"
    for d in (plain, alias):
        d.mkdir()
        for epoch in (1, 2):
            torch.save({"epoch": epoch, "name": "exp", "state_dict": tiny_state(epoch)}, d / f"epoch_{epoch}.pt")
    shutil.copyfile(alias / "epoch_2.pt", alias / "epoch_latest.pt")
    (alias / "open_clip_pytorch_model.bin").write_bytes(b"not a checkpoint")
    args = ["--model", "geomlab-tiny", "--probe", "shapes", "-q", "--no-report"]
    assert main([str(plain), *args]) == 0
    assert main([str(alias), *args]) == 0
    err = capsys.readouterr().err
    assert err.count("left out of") == 1 and "epoch_latest.pt (the same file as epoch_2.pt)" in err
    assert "open_clip_pytorch_model.bin (not a .pt checkpoint)" in err
    acc = [json.loads((d / "analysis" / "analysis.json").read_text())["strategies"][d.name]["accuracy"]
           for d in (plain, alias)]
    assert acc[0]["rows"] == acc[1]["rows"] == ["epoch_1", "epoch_2"] and acc[0]["matrix"] == acc[1]["matrix"]
    # epoch_latest.pt alone (its twin gone): the last epoch
    (alias / "epoch_2.pt").unlink()
    cks, _ = rundir_module._plain_checkpoints(alias)
    assert [c.stem for c in cks] == ["epoch_1", "epoch_latest"] and cks[-1].step == 2
    # a wrong --model: the first mismatched tensors with both shapes
    assert main([str(plain), "--model", "geomlab-small", "--probe", "shapes", "-q", "--no-report",
                 "--out", str(tmp_path / "wrong")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "weights do not fit model 'geomlab-small'" in line and " in the file, " in line and " in the model" in line, line


def test_run_without_traces_embeds_checkpoints(tmp_path):
    """No traces: the analyser embeds the checkpoints with the probe sets of the run's own config."""
    root = tmp_path / "run"
    root.mkdir()
    (root / "config.toml").write_text("[data]\nprobe_size = 40\n\n[data.shapes]\ndomains = 2\n")
    run = RunDir(root)
    for strategy_dir, phase, seed in (("base", 0, 0), ("finetune", 1, 1), ("finetune", 2, 2)):
        atomic_torch_save(run.checkpoint_path(strategy_dir, phase, 10),
                          {"state_dict": tiny_state(seed), "name": "geomlab-tiny", "phase": phase, "step": 10,
                           "strategy": strategy_dir, "phase_end": True, "epoch": phase})
    names = ["d0_basic", "d0_basic/novel", "d1_neon", "d1_neon/novel"]  # as the trainer writes run.json
    (root / "run.json").write_text(json.dumps({"strategies": ["finetune"], "completed": {"base": [0], "finetune": [1, 2]},
                                               "probe_phases": {n: [int(n[1])] for n in names},
                                               "probe_kinds": {n: n.endswith("/novel") and "novel" or "seen"
                                                               for n in names}}))
    before = tree_digest(root)
    assert main([str(root), "-q", "--no-report"]) == 0
    a = json.loads((root / "analysis" / "analysis.json").read_text())
    probes = shapes.probe_sets(seed=0, image_size=32, probe_size=40, domains=2)
    # the run's config embeds its calibration sets too; run.json (written before they existed) does not
    # name them, and their names alone keep them out of the analysis
    assert a["domains"] == [p.name for p in probes if p.kind != "calibration"] and len(probes) == 6
    d0 = probes[0]
    samples = a["sphere"]["samples"][d0.name]
    assert samples["captions"] == [d0.captions[int((d0.ids == i).nonzero()[0, 0])] for i in samples["ids"]]
    s = a["strategies"]["finetune"]
    assert [c["label"] for c in s["checkpoints"]] == ["base/phase0_step000010", "phase1_step000010",
                                                      "phase2_step000010"]
    cached = [root / "analysis" / "cache" / "traces" / c["strategy_dir"] / f"{c['stem']}.safetensors"
              for c in s["checkpoints"]]
    A = accuracy_from_traces(cached, a["domains"])
    assert np.allclose(s["accuracy"]["matrix"], A, atol=1e-6)
    # the headline numbers on the seen probe sets (columns 0, 2); the same on the novel ones (1, 3)
    assert a["domains"] == names
    acc, T = s["accuracy"], len(A) - 1
    for got, (c0, c1) in ((acc, (0, 2)), (acc["novel"], (1, 3))):
        assert got["last"] == pytest.approx((A[T][c0] + A[T][c1]) / 2, abs=1e-6)
        assert got["bwt"] == pytest.approx((A[T][c0] - A[0][c0] + A[T][c1] - A[1][c1]) / 2, abs=1e-6)
        assert got["avg"] == pytest.approx((A[0][c0] + (A[1][c0] + A[1][c1]) / 2 + (A[2][c0] + A[2][c1]) / 2) / 3,
                                           abs=1e-6)
        assert got["transfer"] == pytest.approx(A[0][c1], abs=1e-6)
        assert got["domain0"] == {"probes": [names[c0]], "r1": pytest.approx(A[T][c0], abs=1e-6)}
        assert got["last_domain"] is None  # no probe set is learned at phase 2
    assert acc["novel"]["probes"] == ["d0_basic/novel", "d1_neon/novel"] and len(acc["forgetting"]) == 4
    h = headline_numbers(a)["finetune"]
    assert h["geometry_probe"] == "d0_basic" and h["novel"]["geometry_probe"] == "d0_basic/novel"
    assert h["domain0_r1"] == acc["domain0"]["r1"] and h["novel"]["domain0_r1"] == acc["novel"]["domain0"]["r1"]
    assert h["novel"]["domain0_forgetting"] == acc["forgetting"][1]
    assert h["novel"]["vs_base"]["rotation_image"] == s["vs_base"][-1]["d0_basic/novel"]["rotation"]["image"]["mean"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_summary(a, root / "analysis", None)
    assert f"    novel      Last {acc['novel']['last']:.3f}  Avg {acc['novel']['avg']:.3f}" in out.getvalue()
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
    assert len(err.splitlines()) == 1 and err.startswith("geomlab.analyze: error: ") and needle in err
    assert not (d / "analysis").exists()


# ----------------------------------------------------------------------------- non-finite and degenerate traces


def tiny_run(root):
    """A synthetic run with one strategy of three checkpoints over two probe sets; (root, its last trace)."""
    root = synthetic_run(root, strategies=("finetune",), checkpoints=3, domains=2, n=40, d=8, seed=3)
    return root, sorted((root / "finetune" / "traces").glob("*.safetensors"))[-1]


def no_nan(text):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"analysis.json holds {c}"))


def test_nan_trace_is_one_line_exit_2(tmp_path):
    """A diverged run's trace: the analyser names it and its probe set in one line, no traceback."""
    root, path = tiny_run(tmp_path / "r")
    trace = read_trace(path)
    trace.domains["domain1"].image[[1, 4, 7]] = float("nan")
    write_trace(path, trace)
    p = subprocess.run([sys.executable, "-m", "geomlab.analyze", str(root)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.splitlines() == [f"geomlab.analyze: error: {path}, probe set 'domain1': 3 of 40 rows of "
                                     "image are not finite (NaN or inf)"]
    assert not (root / "analysis").exists()


@pytest.mark.parametrize("fault, needle", [("inf", "2 of 40 rows of text are not finite (NaN or inf)"),
                                           ("zero", "2 of 40 rows of image are zero (a zero row has no direction)")])
def test_inf_or_zero_rows_are_one_line_exit_2(fault, needle, tmp_path, capsys):
    root, _ = tiny_run(tmp_path / "r")
    path = root / "base" / "traces" / "phase0_step000100.safetensors"
    trace = read_trace(path)
    e = trace.domains["domain0"]
    if fault == "inf":
        e.text[[0, 39]] = float("-inf")
    else:
        e.image[[5, 6]] = 0
    write_trace(path, trace)
    assert main([str(root), "-q"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"geomlab.analyze: error: {path}, probe set 'domain0': {needle}"]
    assert not (root / "analysis").exists()


def test_collapsed_space_gives_null_never_a_number(tmp_path):
    """Every image of the last checkpoint embedded at one point: CKA and mutual k-NN are undefined there."""
    root, path = tiny_run(tmp_path / "r")
    trace = read_trace(path)
    for e in trace.domains.values():
        e.image[:] = e.image[0]
    write_trace(path, trace)
    assert main([str(root), "--no-report"]) == 0
    a = no_nan((root / "analysis" / "analysis.json").read_text())
    base, last = read_trace(root / "base" / "traces" / "phase0_step000100.safetensors"), read_trace(path)
    for d, pair in a["strategies"]["finetune"]["vs_base"][-1].items():
        assert pair["cka"]["image"] is None and pair["mutual_knn"]["image"] is None
        ref = G.linear_cka(F.normalize(base.domains[d].text.double(), dim=1),
                           F.normalize(last.domains[d].text.double(), dim=1))
        assert pair["cka"]["text"] == pytest.approx(ref) and 0 < ref < 1
        assert pair["procrustes"]["image"]["rigid_share"] is not None  # rank-deficient, still defined


def test_nothing_moved_shows_na(tmp_path, capsys):
    """The last checkpoint embeds every probe exactly as the base did: the rigid share is 0/0, null in
    analysis.json and n/a on the console."""
    root, path = tiny_run(tmp_path / "r")
    trace = read_trace(path)
    trace.domains = read_trace(root / "base" / "traces" / "phase0_step000100.safetensors").domains
    write_trace(path, trace)
    assert main([str(root), "--no-report"]) == 0
    out = capsys.readouterr().out
    a = no_nan((root / "analysis" / "analysis.json").read_text())
    for pair in a["strategies"]["finetune"]["vs_base"][-1].values():
        assert pair["procrustes"]["image"]["rigid_share"] is None and pair["procrustes"]["text"]["rigid_share"] is None
        assert pair["rotation"]["image"]["max"] == 0.0 and pair["cka"]["image"] == pytest.approx(1.0)
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("finetune"))
    assert "rigid n/a" in line
