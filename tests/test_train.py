"""The trainer end to end on tiny runs: bad input, resume after SIGKILL, checkpoint format."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import geomlab.models  # noqa: F401  (registers geomlab's model configs with open_clip)
from geomlab import train
from geomlab.io import load_checkpoint
from geomlab.rundir import RunDir
from geomlab.traces import read_trace

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.probe_size=24", "data.shapes.domains=3", "data.shapes.train_size=96", "train.batch_size=16",
        "train.base_steps=6", "train.steps=4", "train.checkpoint_every=2", "train.log_every=2",
        "data.calibration_size=8"]


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "geomlab.train", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def snapshot(path: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in path.rglob("*")} if path.exists() else {}


@pytest.mark.parametrize("args, names", [
    (["train.lrr=1"], "train.lrr"),
    (["train.lr=fast"], "train.lr"),
    (["train.batch_size=1.5"], "train.batch_size"),
    (["nosection.key=1"], "nosection"),
    (["--strategies", "finetune,distill"], "distill"),
    (["model.name=no-such-model"], "no-such-model"),
    (["--config", "/nonexistent/exp.toml"], "/nonexistent/exp.toml"),
    (["modx.reduction=median"], "modx.reduction"),
    (["data.calibration_size=-1"], "config key 'data.calibration_size' must be >= 0, got -1"),
    (["data.calibration_size=1.5"], "config key 'data.calibration_size' must be a int, got 1.5"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, names):
    out = tmp_path / "run"
    assert train.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and names in err, err
    assert not out.exists()


def test_unknown_key_lists_valid_ones(tmp_path, capsys):
    assert train.main(["train.lrr=1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "train.batch_size" in err


def test_output_dir_of_a_different_run_is_refused_untouched(tmp_path):
    out = tmp_path / "run"
    first = run_cli("--out", str(out), "--strategies", "finetune", *TINY)
    assert first.returncode == 0, first.stderr[-2000:]
    before = snapshot(out)
    other = run_cli("--out", str(out), "--strategies", "finetune", *TINY, "train.lr=1e-4")
    assert other.returncode == 2
    assert "train.lr" in other.stderr and str(out) in other.stderr
    same_without_resume = run_cli("--out", str(out), "--strategies", "finetune", *TINY)
    assert same_without_resume.returncode == 2 and "--resume" in same_without_resume.stderr
    assert snapshot(out) == before

    # The run's layout (docs/definitions.md, "Run directory"), and what the files hold.
    for rel in ["config.toml", "run.json", "base/metrics.jsonl", "finetune/metrics.jsonl"]:
        assert (out / rel).is_file(), rel
    # a completed phase keeps no mid-phase state
    assert not (out / "base" / "state.pt").exists() and not (out / "finetune" / "state.pt").exists()
    info = json.loads((out / "run.json").read_text())
    assert info["completed"] == {"base": [0], "finetune": [1, 2]}
    assert len(info["probes"]) == 9  # per domain a seen and a novel probe set, then the calibration sets
    assert [info["probe_kinds"][p] for p in info["probes"]] == ["seen", "novel"] * 3 + ["calibration"] * 3
    scored = info["probes"][:6]
    ckpts = sorted(p.name for p in (out / "finetune" / "checkpoints").iterdir())
    assert ckpts == ["phase1_step000002.pt", "phase1_step000004.pt", "phase2_step000002.pt", "phase2_step000004.pt"]
    trace = read_trace(out / "finetune" / "traces" / "phase2_step000004.safetensors")
    assert list(trace.domains) == info["probes"] and trace.phase == 2 and trace.step == 4
    emb = trace.domains[info["probes"][0]]
    assert emb.image.shape[0] == 24 and torch.allclose(emb.image.float().norm(dim=1), torch.ones(24), atol=1e-2)
    evals = [json.loads(l) for l in (out / "finetune" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval"]
    assert len(evals) == 4 and set(evals[-1]["retrieval"]) == set(scored)  # calibration sets: traced, not scored
    assert {"image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10", "text_to_image_R@1"} <= set(
        evals[-1]["retrieval"][info["probes"][0]])


def test_geomlab_checkpoint_loads_with_open_clip(tmp_path):
    import open_clip
    out = tmp_path / "run"
    assert train.main(["--out", str(out), "--strategies", "finetune", "data.shapes.domains=2", *TINY[:1],
                       *TINY[2:]]) == 0
    path = out / "finetune" / "checkpoints" / "phase1_step000004.pt"
    ckpt = load_checkpoint(path)
    assert {"state_dict", "name", "phase", "step"} <= set(ckpt) and ckpt["name"] == "geomlab-tiny"
    model = open_clip.create_model("geomlab-tiny", pretrained=str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][k]), k


def final_weights(out: Path, strategy: str, phases: int, steps: int) -> dict:
    return load_checkpoint(out / strategy / "checkpoints" / f"phase{phases - 1}_step{steps:06d}.pt")["state_dict"]


def test_resume_after_sigkill_mid_phase_matches_uninterrupted(tmp_path):
    args = ["--strategies", "modx", "data.probe_size=16", "data.shapes.domains=3", "data.shapes.train_size=96",
            "train.batch_size=16", "train.base_steps=4", "train.steps=24", "train.checkpoint_every=4",
            "train.log_every=1", "data.calibration_size=8"]
    whole = tmp_path / "whole"
    assert run_cli("--out", str(whole), *args).returncode == 0

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "geomlab.train", "--out", str(cut), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = cut / "modx" / "state.pt"
    deadline = time.time() + 240
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    saved = load_checkpoint(state)
    assert saved["phase"] == 1 and 0 < saved["step"] < 24, "the kill must land inside phase 1"

    resumed = run_cli("--out", str(cut), "--resume", *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = final_weights(whole, "modx", 3, 24), final_weights(cut, "modx", 3, 24)
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    # metrics.jsonl has each step once, as if never interrupted
    rows = [json.loads(l) for l in (cut / "modx" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [(r["phase"], r["step"]) for r in rows if r["kind"] == "train"]
    assert train_steps == sorted(set(train_steps)) and len(train_steps) == 48


def one_process_and_torchrun(tmp_path: Path, args: list) -> tuple[Path, Path]:
    """The run of `args` on one process (tmp_path/one) and under torchrun on 2 ranks, gloo, one
    thread each (tmp_path/two); both must succeed."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli("--out", str(one), *args).returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    dist = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "geomlab.train", "--out", str(two), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert dist.returncode == 0, dist.stderr[-3000:]
    return one, two


def test_torchrun_two_ranks_follows_the_single_process_run(tmp_path):
    """Data-parallel (gloo, 2 ranks) computes the full-batch gradient: its weights track the
    single-process run's, to float noise, over base, Mod-X and ZSCL phases (ZSCL's 16 reference rows
    after the 16 phase rows: one rank holds phase rows only, the other reference rows only)."""
    args = ["--strategies", "modx,zscl", "data.probe_size=16", "data.shapes.domains=2", "data.shapes.train_size=64",
            "train.batch_size=16", "train.base_steps=4", "train.steps=4", "train.checkpoint_every=0",
            "data.shapes.reference_size=32", "data.shapes.reference_texts=64", "data.calibration_size=8"]
    one, two = one_process_and_torchrun(tmp_path, args)
    info = json.loads((two / "run.json").read_text())
    assert info["world_size"] == 2 and info["completed"] == {"base": [0], "modx": [1], "zscl": [1]}
    base = load_checkpoint(one / "base" / "checkpoints" / "phase0_step000004.pt")["state_dict"]
    for strategy in ("modx", "zscl"):
        a, b = final_weights(one, strategy, 2, 4), final_weights(two, strategy, 2, 4)
        # Attention key biases have an exactly zero true gradient (softmax is shift-invariant); Adam
        # turns the float noise there into full-size steps, so they are left out of the comparison.
        # The same holds for any single weight whose true gradient is about zero (e.g. one conv1 entry
        # on ShapeWorld's flat backgrounds), so the check is on the share of entries that differ: a
        # wrong data-parallel gradient moves most of them apart, float noise a few in 10⁵.
        keys = [k for k in a if not k.endswith("in_proj_bias")]
        moved = max((a[k].float() - base[k].float()).abs().max().item() for k in keys)
        apart = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in keys])
        share = (apart > 1e-5).double().mean().item()
        # (ZSCL's result averages the phase start in: it moves about half as far)
        assert moved > (1e-3 if strategy == "modx" else 5e-4) and share < 1e-4 and apart.max() < 1e-3, \
            (strategy, share, apart.max().item(), moved)


def test_metrics_logged_after_the_resume_point_are_dropped(tmp_path):
    """A crash after some train lines but before the next state: those lines are logged again on
    resume, so they must go, including a torn last line and lines of a phase not yet checkpointed."""
    run = RunDir(tmp_path)
    metrics = run.metrics_path("modx")
    metrics.parent.mkdir(parents=True)
    rows = [{"kind": "train", "phase": 1, "step": s} for s in (1, 2, 3, 4)] + \
           [{"kind": "train", "phase": 2, "step": s} for s in (1, 2)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tr')
    run.truncate_metrics("modx", 2, 0)
    kept = [json.loads(l) for l in metrics.read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in kept] == [(1, 1), (1, 2), (1, 3), (1, 4)]
    run.truncate_metrics("modx", 1, 2)
    kept = [json.loads(l) for l in metrics.read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in kept] == [(1, 1), (1, 2)]


def test_calibration_sets_are_traced_never_scored(tmp_path, capsys):
    """Calibration sets are in every trace (the pairs realignment maps are fitted on) and in run.json's
    probe_kinds, and in no score: metrics.jsonl, the console summary, the accuracy matrix, analysis.json's
    domains and headline, the report."""
    from geomlab.analyze import main as analyze_main
    out = tmp_path / "run"
    assert train.main(["--out", str(out), "--strategies", "finetune", "data.probe_size=16", "data.shapes.domains=2",
                       "data.shapes.train_size=32", "data.calibration_size=12", "train.batch_size=16",
                       "train.base_steps=2", "train.steps=2", "train.log_every=2"]) == 0
    summary = capsys.readouterr().out
    info = json.loads((out / "run.json").read_text())
    calibration = ["d0_basic/calibration", "d1_neon/calibration"]
    assert [p for p, k in info["probe_kinds"].items() if k == "calibration"] == calibration
    assert [info["probe_phases"][p] for p in calibration] == [[0], [1]]
    for trace_path in sorted(out.rglob("*.safetensors")):
        trace = read_trace(trace_path)
        assert list(trace.domains) == info["probes"]
        for name in calibration:
            emb = trace.domains[name]
            assert emb.image.shape[0] == emb.text.shape[0] == 12 and emb.ids[0].item() % 10 ** 9 == 4 * 10 ** 8
    rows = [json.loads(line) for d in ("base", "finetune")
            for line in (out / d / "metrics.jsonl").read_text().splitlines()]
    assert all(not set(r["retrieval"]) & set(calibration) for r in rows if r["kind"] == "eval")
    assert "/calibration" not in summary
    assert analyze_main([str(out), "-q"]) == 0
    a = json.loads((out / "analysis" / "analysis.json").read_text())
    assert a["domains"] == ["d0_basic", "d0_basic/novel", "d1_neon", "d1_neon/novel"]
    acc = a["strategies"]["finetune"]["accuracy"]
    assert acc["domains"] == a["domains"] and all(len(row) == 4 for row in acc["matrix"])
    assert len(acc["forgetting"]) == 4 and acc["novel"]["probes"] == ["d0_basic/novel", "d1_neon/novel"]
    assert not set(a["sphere"]["samples"]) & set(calibration)
    assert "/calibration" not in (out / "analysis" / "report.html").read_text()
