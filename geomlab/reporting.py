"""Live reports of a training run, `--report-to tensorboard` (open_clip's flag): what metrics.jsonl
records, as TensorBoard scalars, so that a long run can be watched while it trains.

One event-file directory per strategy directory and seed (RunDir.tensorboard_path); the x axis is
the step counted from the start of the strategy's line (the base phase, then its own phases), so
base and strategy curves join up. Scalars: train/loss, train/<each loss part>, train/lr,
train/logit_scale at every logged step, and <probe set>/image_to_text_R@1, <probe
set>/text_to_image_R@1 at every checkpoint.

Beside them, the first probe set's geometry against the base model (its phase-0-end trace), at every
trace: <probe set>/<measure>_from_base at checkpoints, <probe set>/fine_<measure>_from_base at fine
traces (train.trace_every; over their first train.trace_size images, the base's rows cut alike), the
measures being DRIFT_FROM_BASE (drift_from_base; docs/definitions.md). A base-line trace written
before phase 0 ends, when there is no base model yet, is logged once phase 0 ends.
"""
from __future__ import annotations

from geomlab.geometry import DISORDER_SCALARS, disorder_scalars
from geomlab.rundir import RunDir
from geomlab.traces import DomainEmbeddings

REPORT_TO = ("tensorboard",)
INSTALL_HINT = ("--report-to tensorboard needs the tensorboard package: install geomlab's extra, "
                "pip install 'geomlab[tensorboard]' (or pip install tensorboard)")
R_AT_1 = ("image_to_text_R@1", "text_to_image_R@1")
DRIFT_FROM_BASE = DISORDER_SCALARS


def drift_from_base(base: DomainEmbeddings, now: DomainEmbeddings) -> dict[str, float]:
    """The DRIFT_FROM_BASE scalars of one probe set, base → now (same rows), in degrees: mean
    rotation angle of the images and of the captions ("Rotation angle"), mean eigen-angle of
    R_Iᵀ R_T ("Rotation desynchronisation") and mean alignment drift Δφ ("Inter-modal deviation")."""
    if not (base.ids.shape == now.ids.shape and bool((base.ids == now.ids).all())):
        raise ValueError("drift_from_base: the two traces do not hold the same images (ids differ)")
    return disorder_scalars(base, now)


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

    def add_drift_from_base(self, strategy_dir: str, probe: str, drift: dict[str, float], step: int,
                            fine: bool) -> None:
        """drift_from_base's scalars of `probe` at x = `step`, of a fine trace or a checkpoint's."""
        w = self.writer(strategy_dir)
        for key, value in drift.items():
            w.add_scalar(f"{probe}/{'fine_' if fine else ''}{key}_from_base", value, step)

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers = {}
