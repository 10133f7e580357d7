"""train.trace_every: fine traces (the probe sets' first images, embedded every N steps) at the right
steps, leaving training as it was, resumable, and reported to TensorBoard against the base model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from geomlab import train
from geomlab.data import ProbeSet
from geomlab.geometry import inter_modal_deviation, rotation_angles
from geomlab.io import load_checkpoint
from geomlab.rundir import RunDir
from geomlab.traces import read_trace

TRACE_SIZE, TRACE_EVERY, STEPS = 6, 2, 5
TINY = ["--strategies", "finetune", "data.probe_size=16", "data.shapes.domains=2", "data.shapes.train_size=48",
        "data.shapes.reference_size=0", "train.batch_size=8", f"train.base_steps={STEPS}", f"train.steps={STEPS}",
        "train.checkpoint_every=2", "train.log_every=1", f"train.trace_size={TRACE_SIZE}",
        "data.calibration_size=8"]
FINE = [f"train.trace_every={TRACE_EVERY}"]
# every TRACE_EVERY steps, step 0 (the phase-start weights) and the phase's last step
FINE_STEPS = [0, 2, 4, 5]


def train_run(out: Path, *args: str) -> None:
    assert train.main(["--out", str(out), *TINY, *args]) == 0


def losses(out: Path, strategy_dir: str) -> list:
    rows = [json.loads(line) for line in (out / strategy_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["phase"], r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def test_fine_traces_at_each_step_hold_the_first_rows_of_the_seen_and_calibration_sets(tmp_path):
    out = tmp_path / "run"
    train_run(out, *FINE)
    run = RunDir(out)
    for strategy_dir, phase in (("base", 0), ("finetune", 1)):
        fine = run.fine_traces(strategy_dir)
        assert [(p, s) for p, s, _ in fine] == [(phase, s) for s in FINE_STEPS]
        assert all(path == run.fine_trace_path(strategy_dir, phase, s) for _, s, path in fine)
        # not checkpoints: what the analyser reads is unchanged
        assert [c.step for c in run.checkpoints(strategy_dir)] == [2, 4, 5]
        for _, step, path in fine:
            trace = read_trace(path)
            assert (trace.phase, trace.step) == (phase, step)
            assert trace.extra == {"strategy": strategy_dir, "fine": "1", "trace_size": str(TRACE_SIZE)}
            if step == 0:
                continue
            full = read_trace(run.trace_path(strategy_dir, phase, step))   # same weights, every row
            # the seen probe sets and their calibration sets; the novel ones only at checkpoints
            assert list(trace.domains) == [d for d in full.domains if not d.endswith("/novel")]
            assert list(trace.domains) == ["d0_basic", "d1_neon", "d0_basic/calibration", "d1_neon/calibration"]
            for name, emb in trace.domains.items():
                want = full.domains[name].head(TRACE_SIZE)
                assert emb.image.shape[0] == TRACE_SIZE and torch.equal(emb.ids, want.ids)
                torch.testing.assert_close(emb.image.float(), want.image.float(), atol=2e-3, rtol=0)
                torch.testing.assert_close(emb.text.float(), want.text.float(), atol=2e-3, rtol=0)


def test_probe_head_keeps_the_captions_of_its_images():
    captions = ["a0", "a1", "b0", "c0", "c1", "c2"]
    probe = ProbeSet("p", torch.zeros(3, 3, 4, 4), captions, torch.tensor([0, 0, 1, 2, 2, 2]),
                     torch.tensor([10, 11, 12]), kind="calibration")
    head = probe.head(2)
    assert head.captions == ["a0", "a1", "b0"] and head.caption_image.tolist() == [0, 0, 1]
    assert head.ids.tolist() == [10, 11] and len(head.images) == 2 and head.kind == "calibration"
    assert probe.head(5) is probe


def stop_at_finetune_step(step: int):
    """A Trainer.stop_requested that asks to stop after `step` of finetune's phase 1 (it is asked
    after every step but a phase's last)."""
    calls = {"n": 0}

    def stop_requested(self):
        calls["n"] += 1
        return calls["n"] == (STEPS - 1) + step
    return stop_requested


def test_training_with_fine_traces_is_training_without(tmp_path, monkeypatch):
    train_run(tmp_path / "plain")
    train_run(tmp_path / "fine", *FINE)
    for strategy_dir in ("base", "finetune"):
        assert losses(tmp_path / "plain", strategy_dir) == losses(tmp_path / "fine", strategy_dir)
        for c in RunDir(tmp_path / "plain").checkpoints(strategy_dir):
            a = load_checkpoint(c.checkpoint)["state_dict"]
            b = load_checkpoint(RunDir(tmp_path / "fine").checkpoint_path(strategy_dir, c.phase, c.step))["state_dict"]
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (strategy_dir, c.stem)
    assert not RunDir(tmp_path / "plain").fine_traces("finetune")
    # and the generator state a resume would restore, mid-phase (a completed phase keeps no state):
    # embedding drew nothing from it, in the base phase's fine traces or in this phase's
    for d, args in (("plain_cut", ()), ("fine_cut", FINE)):
        monkeypatch.setattr(train.Trainer, "stop_requested", stop_at_finetune_step(3))
        assert train.main(["--out", str(tmp_path / d), *TINY, *args]) == 130
        monkeypatch.undo()
    rng = [load_checkpoint(RunDir(tmp_path / d).state_path("finetune"))["torch_rng"] for d in ("plain_cut", "fine_cut")]
    assert torch.equal(*rng)


def test_resume_mid_phase_rewrites_exactly_the_fine_traces_of_an_uninterrupted_run(tmp_path, monkeypatch):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train_run(whole, *FINE)

    # SIGINT after step 3 of finetune's phase 1
    monkeypatch.setattr(train.Trainer, "stop_requested", stop_at_finetune_step(3))
    assert train.main(["--out", str(cut), *TINY, *FINE]) == 130
    monkeypatch.undo()
    run = RunDir(cut)
    assert load_checkpoint(run.state_path("finetune"))["step"] == 3
    # a crash after a fine trace but before its state: a stale trace past the resume step, to be rewritten
    shutil.copy(run.fine_trace_path("finetune", 1, 2), run.fine_trace_path("finetune", 1, 4))
    assert train.main(["--out", str(cut), "--resume", *TINY, *FINE]) == 0

    for strategy_dir in ("base", "finetune"):
        want, got = RunDir(whole).fine_traces(strategy_dir), run.fine_traces(strategy_dir)
        assert [(p, s) for p, s, _ in got] == [(p, s) for p, s, _ in want]
        for (_, step, a), (_, _, b) in zip(want, got):
            ta, tb = read_trace(a), read_trace(b)
            assert tb.step == step
            for name in ta.domains:
                for field in ("image", "text", "ids"):
                    assert torch.equal(getattr(ta.domains[name], field), getattr(tb.domains[name], field)), \
                        (strategy_dir, step, name, field)


def test_restart_phase_deletes_its_fine_traces(tmp_path):
    run = RunDir(tmp_path)
    for phase, step in ((1, 0), (1, 2), (2, 0), (2, 2)):
        path = run.fine_trace_path("modx", phase, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    run.restart_phase("modx", 2)
    assert [(p, s) for p, s, _ in run.fine_traces("modx")] == [(1, 0), (1, 2)]
    run.truncate_fine_traces("modx", 1, 0)
    assert [(p, s) for p, s, _ in run.fine_traces("modx")] == [(1, 0)]


def test_tensorboard_logs_drift_from_base_at_every_trace(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    train_run(out, *FINE, "--report-to", "tensorboard")
    run = RunDir(out)
    base_end = read_trace(run.trace_path("base", 0, STEPS))
    probe = list(base_end.domains)[0]
    base = base_end.domains[probe]

    def expected(trace_path):
        now = read_trace(trace_path).domains[probe]
        n = now.image.shape[0]
        keep = torch.arange(base.text.shape[0]) < n   # one caption per image (ShapeWorld)
        b_image, b_text = base.image[:n], base.text[keep]
        dev = inter_modal_deviation(b_image, b_text, now.image, now.text)
        return {"rotation_image": rotation_angles(b_image, now.image).mean().item(),
                "rotation_text": rotation_angles(b_text, now.text).mean().item(),
                "desync": dev["desync_mean"], "alignment_drift": dev["alignment_drift"].mean().item()}

    for strategy_dir, phase, offset in (("base", 0, 0), ("finetune", 1, STEPS)):
        ea = EventAccumulator(str(run.tensorboard_path(strategy_dir, 0)), size_guidance={"scalars": 0})
        ea.Reload()
        tags = set(ea.Tags()["scalars"])
        assert f"{probe}/image_to_text_R@1" in tags
        traces = {"": [(c.step, c.trace) for c in run.checkpoints(strategy_dir)],
                  "fine_": [(s, path) for _, s, path in run.fine_traces(strategy_dir)]}
        for prefix, at in traces.items():
            for measure in ("rotation_image", "rotation_text", "desync", "alignment_drift"):
                events = ea.Scalars(f"{probe}/{prefix}{measure}_from_base")
                # the same x axis as the R@1 curves
                assert sorted(e.step for e in events) == [offset + s for s, _ in at], (strategy_dir, prefix, measure)
                got = {e.step: e.value for e in events}
                for step, path in at:
                    assert got[offset + step] == pytest.approx(expected(path)[measure], abs=1e-4), \
                        (strategy_dir, prefix, measure, step)
    r1_steps = [e.step for e in ea.Scalars(f"{probe}/image_to_text_R@1")]
    assert r1_steps == [STEPS + c.step for c in run.checkpoints("finetune")]


@pytest.mark.parametrize("key, value", [("train.trace_size", 0), ("train.trace_every", -1)])
def test_out_of_range_keys_are_refused_by_name(tmp_path, capsys, key, value):
    assert train.main(["--out", str(tmp_path / "run"), *TINY, f"{key}={value}"]) == 2
    err = capsys.readouterr().err
    assert key in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
