"""Live reports of a training run, `--report-to tensorboard` (open_clip's flag): what metrics.jsonl
records, as TensorBoard scalars, so that a long run can be watched while it trains.

One event-file directory per strategy directory and seed (RunDir.tensorboard_path); the x axis is
the step counted from the start of the strategy's line (the base phase, then its own phases), so
base and strategy curves join up. Scalars: train/loss, train/<each loss part>, train/lr,
train/logit_scale at every logged step, and <probe set>/image_to_text_R@1, <probe
set>/text_to_image_R@1 at every checkpoint.
"""
from __future__ import annotations

from geomlab.rundir import RunDir

REPORT_TO = ("tensorboard",)
INSTALL_HINT = ("--report-to tensorboard needs the tensorboard package: install geomlab's extra, "
                "pip install 'geomlab[tensorboard]' (or pip install tensorboard)")
R_AT_1 = ("image_to_text_R@1", "text_to_image_R@1")


def check_report_to(value: str | None) -> None:
    """ValueError (one line) for an unknown target, or for tensorboard when it is not installed."""
    if value is None:
        return
    if value not in REPORT_TO:
        raise ValueError(f"--report-to: expected one of {', '.join(REPORT_TO)}, got {value!r}")
    try:
        import tensorboard  # noqa: F401  (an optional dependency: the tensorboard extra)
    except ImportError:
        raise ValueError(INSTALL_HINT) from None


class TensorBoardReport:
    """Scalars of metrics rows, written to one SummaryWriter per strategy directory."""

    def __init__(self, run: RunDir, seed: int):
        # lazy: tensorboard is an optional dependency, imported only when reports are asked for
        from torch.utils.tensorboard import SummaryWriter
        self.run, self.seed, self._writer_class, self.writers = run, seed, SummaryWriter, {}

    def writer(self, strategy_dir: str):
        if strategy_dir not in self.writers:
            self.writers[strategy_dir] = self._writer_class(
                log_dir=str(self.run.tensorboard_path(strategy_dir, self.seed)), flush_secs=10)
        return self.writers[strategy_dir]

    def add(self, strategy_dir: str, row: dict, step: int) -> None:
        """Scalars of one metrics.jsonl row (kind "train" or "eval") at x = `step`."""
        w = self.writer(strategy_dir)
        if row["kind"] == "train":
            for key, value in row.items():
                if key not in ("kind", "phase", "step"):
                    w.add_scalar(f"train/{key}", value, step)
        elif row["kind"] == "eval":
            for probe, metrics in row["retrieval"].items():
                for key in R_AT_1:
                    w.add_scalar(f"{probe}/{key}", metrics[key], step)
            w.flush()  # checkpoints are rare: show them at once

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers = {}
