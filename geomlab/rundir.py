"""The run directory: where every file of a run lives, for the trainer that writes it and the
analyser that reads it (docs/definitions.md, "Run directory").

    runs/NAME/
      config.toml  run.json
      base/ finetune/ ...            one directory per strategy (its `strategy_dir`; "base" is phase 0)
        checkpoints/phaseP_stepSSSSSS.pt
        traces/phaseP_stepSSSSSS.safetensors
        metrics.jsonl  state.pt
      analysis/                      written by geomlab.analyze

`discover` also reads one strategy's directory on its own and plain directories of open_clip
checkpoints (`epoch_N.pt`, ...).
"""
from __future__ import annotations

import json
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from geomlab.config import tomllib
from geomlab.io import append_jsonl, atomic_write_json, atomic_write_text, load_checkpoint, read_jsonl

CHECKPOINTS, TRACES = "checkpoints", "traces"
ANALYSIS = "analysis"  # the analyser's default output directory inside CKPT_DIR
_STEM = re.compile(r"^phase(\d+)_step(\d+)$")


class RunDirError(ValueError):
    """The directory cannot be used (or read) as asked; the message says why."""


def checkpoint_stem(phase: int, step: int) -> str:
    """The file stem shared by a checkpoint and its trace: phase1_step000200."""
    return f"phase{phase}_step{step:06d}"


def mean_r1(metrics: dict) -> float:
    return 0.5 * (metrics["image_to_text_R@1"] + metrics["text_to_image_R@1"])


def _first_difference(a, b, prefix=""):
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
                return _first_difference(a[key], b[key], f"{prefix}{key}.")
            return f"{prefix}{key}"
    return None


# ----------------------------------------------------------------------------- reading


@dataclass
class Checkpoint:
    """One saved point of a series: a checkpoint file, its trace, or both."""
    stem: str                  # file stem, e.g. phase1_step000200 or epoch_3
    strategy_dir: str          # directory it lives in: base, a strategy, or the plain directory's name
    phase: int | None
    step: int | None
    phase_end: bool
    checkpoint: Path | None    # .pt file, when present
    trace: Path | None         # .safetensors trace, when present

    @property
    def label(self) -> str:
        return f"{self.strategy_dir}/{self.stem}" if self.strategy_dir == "base" else self.stem

    @property
    def key(self) -> str:
        return f"{self.strategy_dir}/{self.stem}"


@dataclass
class Source:
    """What `discover` found in a CKPT_DIR."""
    kind: str                  # run | strategy | checkpoints
    root: Path
    series: dict               # name -> list[Checkpoint] (first = the base phase-0 end checkpoint for runs)
    run_info: dict             # run.json, or {}
    config_path: Path | None   # the run's config.toml, when there is one


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _is_strategy_path(d: Path) -> bool:
    return d.is_dir() and ((d / CHECKPOINTS).is_dir() or (d / TRACES).is_dir())


def _stems(d: Path) -> dict[str, Checkpoint]:
    found: dict[str, Checkpoint] = {}
    for sub, suffix, field in ((CHECKPOINTS, ".pt", "checkpoint"), (TRACES, ".safetensors", "trace")):
        for path in sorted((d / sub).glob(f"*{suffix}")) if (d / sub).is_dir() else []:
            stem = path.name[: -len(suffix)]
            m = _STEM.match(stem)
            if not m:
                continue
            c = found.setdefault(stem, Checkpoint(stem, d.name, int(m[1]), int(m[2]), False, None, None))
            setattr(c, field, path)
    return found


def _plain_checkpoints(root: Path) -> list[Checkpoint]:
    """A directory of open_clip checkpoints (`epoch_N.pt`, ...) in natural order; each one ends a "phase"."""
    files = sorted((p for p in root.iterdir() if p.suffix == ".pt" and p.is_file()), key=lambda p: _natural_key(p.name))
    name = root.resolve().name or "checkpoints"
    cks = []
    for i, p in enumerate(files):
        m = re.search(r"(\d+)", p.stem)
        cks.append(Checkpoint(p.stem, name, None, int(m[1]) if m else i, True, p, None))
    return cks


def discover(root) -> Source:
    """Which of the three kinds of CKPT_DIR `root` is (a run, one strategy's directory, a plain
    directory of open_clip checkpoints), and its checkpoints in order."""
    root = Path(root)
    if not root.exists():
        raise RunDirError(f"CKPT_DIR {root} does not exist")
    if not root.is_dir():
        raise RunDirError(f"CKPT_DIR {root} is not a directory")
    if (root / "run.json").is_file() or _is_strategy_path(root / "base"):
        run = RunDir(root)
        run_info = run.run_json()
        base_end = [c for c in run.checkpoints("base") if c.phase == 0 and c.phase_end]
        if not base_end:
            raise RunDirError(f"{root}: no phase-0 end checkpoint or trace in {root / 'base'}")
        names = run_info.get("strategies") or sorted(p.name for p in root.iterdir()
                                                     if p.name not in ("base", ANALYSIS) and _is_strategy_path(p))
        series = {}
        for name in names:
            own = run.checkpoints(name) if _is_strategy_path(root / name) else []
            if own:
                series[name] = [base_end[-1]] + own
        if not series:
            series["base"] = run.checkpoints("base")
        return Source("run", root, series, run_info, run.config_path if run.config_path.is_file() else None)
    if _is_strategy_path(root):
        run = RunDir(root.parent)
        own = run.checkpoints(root.name)
        if not own:
            raise RunDirError(f"{root}: no checkpoints or traces in {root / CHECKPOINTS} or {root / TRACES}")
        cks = own
        if root.name != "base" and _is_strategy_path(run.strategy_path("base")):
            cks = [c for c in run.checkpoints("base") if c.phase == 0 and c.phase_end][-1:] + own
        return Source("strategy", root, {root.name: cks}, run.run_json(),
                      run.config_path if run.config_path.is_file() else None)
    cks = _plain_checkpoints(root)
    if not cks:
        raise RunDirError(f"{root}: no checkpoints (*.pt files, checkpoints/ or a geomlab run) found")
    return Source("checkpoints", root, {cks[0].strategy_dir: cks}, {}, None)


# ----------------------------------------------------------------------------- one run


class RunDir:
    """A geomlab run directory: its paths, what is complete, what --resume needs, the result."""

    def __init__(self, root):
        self.root = Path(root)

    # -- paths

    @property
    def config_path(self) -> Path:
        return self.root / "config.toml"

    @property
    def run_json_path(self) -> Path:
        return self.root / "run.json"

    def strategy_path(self, strategy_dir: str) -> Path:
        return self.root / strategy_dir

    def checkpoint_path(self, strategy_dir: str, phase: int, step: int) -> Path:
        return self.root / strategy_dir / CHECKPOINTS / f"{checkpoint_stem(phase, step)}.pt"

    def trace_path(self, strategy_dir: str, phase: int, step: int) -> Path:
        return self.root / strategy_dir / TRACES / f"{checkpoint_stem(phase, step)}.safetensors"

    def metrics_path(self, strategy_dir: str) -> Path:
        return self.root / strategy_dir / "metrics.jsonl"

    def state_path(self, strategy_dir: str) -> Path:
        return self.root / strategy_dir / "state.pt"

    # -- creation

    def check(self, config: dict, config_text: str, resume: bool) -> None:
        """Check that the directory is free, or holds this very run (with --resume). Writes nothing."""
        stored = self.config_path
        if stored.exists():
            try:
                old = tomllib.loads(stored.read_text())
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise RunDirError(f"{stored} is not a readable config ({e}); choose another --out") from None
            diff = _first_difference(old, tomllib.loads(config_text))
            if diff:
                raise RunDirError(f"{self.root} holds a different run (config key {diff!r} differs); "
                                  "choose another --out")
            if not resume:
                raise RunDirError(f"{self.root} already holds this run; pass --resume to continue it "
                                  "or choose another --out")
            return
        if self.root.exists() and (not self.root.is_dir() or any(self.root.iterdir())):
            raise RunDirError(f"{self.root} exists and is not a geomlab run directory; choose another --out")

    def create(self, config_text: str) -> None:
        if not self.config_path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.config_path, config_text)

    def write_run_json(self, config: dict, trainer, version: str) -> None:
        info = self.run_json()
        info.update({
            "name": config["run"]["name"], "seed": config["run"]["seed"], "device": str(trainer.device),
            "world_size": trainer.dist.world, "strategies": config["run"]["strategies"],
            "model": config["model"]["name"], "phases": [p.name for p in trainer.stream.phases],
            "probes": [p.name for p in trainer.stream.probes], "stream": trainer.stream.info,
            "versions": {"geomlab": version, "torch": torch.__version__, "open_clip": open_clip.__version__,
                         "python": platform.python_version()},
            "command": " ".join(sys.argv),
        })
        info.setdefault("completed", {})
        if trainer.stream.skipped:
            info["skipped_records"] = trainer.stream.skipped
        atomic_write_json(self.run_json_path, info)

    def append_metrics(self, strategy_dir: str, row: dict) -> None:
        path = self.metrics_path(strategy_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(path, row)

    # -- progress

    def run_json(self) -> dict:
        """run.json, or {} when there is none."""
        path = self.run_json_path
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunDirError(f"{path}: not readable JSON ({e})") from None

    def completed_phases(self, strategy_dir: str) -> list[int] | None:
        """The phases run.json records as completed; None when it records no completion at all."""
        completed = self.run_json().get("completed")
        return None if completed is None else completed.get(strategy_dir, [])

    def is_complete(self, strategy_dir: str, phase: int) -> bool:
        return phase in (self.completed_phases(strategy_dir) or [])

    def mark_complete(self, strategy_dir: str, phase: int) -> None:
        info = self.run_json()
        done = info.setdefault("completed", {}).setdefault(strategy_dir, [])
        if phase not in done:
            done.append(phase)
        atomic_write_json(self.run_json_path, info)

    def checkpoints(self, strategy_dir: str) -> list[Checkpoint]:
        """A strategy directory's checkpoints and traces by (phase, step). The last of each phase is
        its end when run.json lists the phase as completed, or when run.json records nothing."""
        completed = self.completed_phases(strategy_dir)
        cks = sorted(_stems(self.strategy_path(strategy_dir)).values(), key=lambda c: (c.phase, c.step))
        for i, c in enumerate(cks):
            last = i + 1 == len(cks) or cks[i + 1].phase != c.phase
            c.phase_end = last and (completed is None or c.phase in completed)
        return cks

    def load_state(self, strategy_dir: str):
        path = self.state_path(strategy_dir)
        return load_checkpoint(path) if path.exists() else None

    def resume_step(self, strategy_dir: str, phase: int) -> int:
        state = self.load_state(strategy_dir)
        return state["step"] if state is not None and state["phase"] == phase else 0

    def phase_end_checkpoint(self, strategy_dir: str, phase: int) -> Path:
        saved = [c.checkpoint for c in self.checkpoints(strategy_dir) if c.phase == phase and c.checkpoint]
        if not saved:
            raise RunDirError(f"{self.strategy_path(strategy_dir)}: no checkpoint for phase {phase}")
        return saved[-1]

    def truncate_metrics(self, strategy_dir: str, phase: int, step: int) -> None:
        """Drop metric lines written after the state we resume from (they will be written again)."""
        path = self.metrics_path(strategy_dir)
        rows = read_jsonl(path)
        keep = [r for r in rows if (r["phase"], r["step"]) <= (phase, step)]
        if len(keep) != len(rows) or (path.exists() and not path.read_text().endswith("\n")):
            atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))

    # -- the result

    def accuracy_rows(self, strategy_dir: str) -> dict[int, dict[str, float]]:
        """{phase: {probe: mean R@1}} from the phase-end evaluations in metrics.jsonl."""
        rows = {}
        for r in read_jsonl(self.metrics_path(strategy_dir)):
            if r.get("kind") == "eval" and r.get("phase_end"):
                rows[r["phase"]] = {d: mean_r1(m) for d, m in r["retrieval"].items()}
        return rows

    def summary(self, config: dict) -> str:
        base = self.accuracy_rows("base").get(0, {})
        probes = list(base)
        lines = [f"run: {self.root}", "mean R@1 (image→text, text→image) per probe set after each phase:",
                 "  " + " ".join(f"{'':14s}") + " ".join(f"{p[:8]:>8s}" for p in probes)]
        lines.append(f"  {'base p0':14s} " + " ".join(f"{base[p]:8.3f}" for p in probes))
        for s in config["run"]["strategies"]:
            for phase, row in sorted(self.accuracy_rows(s).items()):
                lines.append(f"  {s + ' p' + str(phase):14s} " + " ".join(f"{row[p]:8.3f}" for p in probes))
        return "\n".join(lines)
