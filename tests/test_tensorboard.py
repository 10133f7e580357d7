"""`--report-to tensorboard`: the event files hold what metrics.jsonl holds, per strategy and seed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from geomlab import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--strategies", "finetune", "data.probe_size=16", "data.shapes.domains=2", "data.shapes.train_size=48",
        "data.shapes.reference_size=0", "data.calibration_size=8", "train.batch_size=8", "train.base_steps=4",
        "train.steps=4", "train.checkpoint_every=2", "train.log_every=1"]


def test_event_files_hold_the_metrics_of_every_strategy_and_seed(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "geomlab.train", "--out", str(out), "--report-to", "tensorboard",
                        *TINY, "run.seed=3"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "No pretrained weights loaded" not in r.stderr   # open_clip's warning is not geomlab's output
    base_steps = 4
    for strategy_dir, offset in (("base", 0), ("finetune", base_steps)):
        logdir = out / "tensorboard" / strategy_dir / "seed3"
        ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
        ea.Reload()
        rows = [json.loads(line) for line in (out / strategy_dir / "metrics.jsonl").read_text().splitlines()]
        train_rows = [row for row in rows if row["kind"] == "train"]
        eval_rows = [row for row in rows if row["kind"] == "eval"]
        assert len(train_rows) == 4 and len(eval_rows) == 2
        keys = [k for k in train_rows[0] if k not in ("kind", "phase", "step")]
        assert {"loss", "lr", "logit_scale"} <= set(keys) and len(keys) > 3   # and the loss's parts
        tags = set(ea.Tags()["scalars"])
        for k in keys:
            got = [(e.step, e.value) for e in ea.Scalars(f"train/{k}")]
            want = [(offset + row["step"], row[k]) for row in train_rows]
            assert [s for s, _ in got] == [s for s, _ in want], (strategy_dir, k)
            assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6, abs=1e-7), (strategy_dir, k)
        probes = list(eval_rows[0]["retrieval"])
        assert len(probes) == 4  # two domains, each a seen and a novel probe set ("d0_basic/novel")
        for probe in probes:
            for k in ("image_to_text_R@1", "text_to_image_R@1"):
                assert f"{probe}/{k}" in tags
                got = [(e.step, e.value) for e in ea.Scalars(f"{probe}/{k}")]
                want = [(offset + row["step"], row["retrieval"][probe][k]) for row in eval_rows]
                assert [s for s, _ in got] == [s for s, _ in want]
                assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-7)


def test_without_tensorboard_the_flag_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)   # import tensorboard raises ImportError
    out = tmp_path / "run"
    assert train.main(["--report-to", "tensorboard", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'geomlab[tensorboard]'" in err, err
    assert train.main(["--report-to", "wandb", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--report-to" in err and "'wandb'" in err, err
    assert not out.exists()
