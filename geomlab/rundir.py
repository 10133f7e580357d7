"""The run directory (SPEC §3): what is where, what is complete, and what --resume needs."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

from geomlab.config import tomllib
from geomlab.io import atomic_write_json, atomic_write_text, load_checkpoint, read_jsonl


class RunDirError(ValueError):
    """The output directory cannot be used for this run; the message says why."""


def _first_difference(a, b, prefix=""):
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
                return _first_difference(a[key], b[key], f"{prefix}{key}.")
            return f"{prefix}{key}"
    return None


def mean_r1(metrics: dict) -> float:
    return 0.5 * (metrics["image_to_text_R@1"] + metrics["text_to_image_R@1"])


class RunDir:
    def __init__(self, root):
        self.root = Path(root)

    # -- creation

    def check(self, config: dict, config_text: str, resume: bool) -> None:
        """Check that the directory is free, or holds this very run (with --resume). Writes nothing."""
        stored = self.root / "config.toml"
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
        stored = self.root / "config.toml"
        if not stored.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(stored, config_text)

    def write_run_json(self, config: dict, trainer, version: str) -> None:
        import open_clip
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
        atomic_write_json(self.root / "run.json", info)

    # -- paths and progress

    def run_json(self) -> dict:
        path = self.root / "run.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def strategy_dir(self, where: str) -> Path:
        d = self.root / where
        (d / "checkpoints").mkdir(parents=True, exist_ok=True)
        (d / "traces").mkdir(parents=True, exist_ok=True)
        return d

    def is_complete(self, where: str, phase: int) -> bool:
        return phase in self.run_json().get("completed", {}).get(where, [])

    def mark_complete(self, where: str, phase: int) -> None:
        info = self.run_json()
        done = info.setdefault("completed", {}).setdefault(where, [])
        if phase not in done:
            done.append(phase)
        atomic_write_json(self.root / "run.json", info)

    def load_state(self, where: str):
        path = self.root / where / "state.pt"
        return load_checkpoint(path) if path.exists() else None

    def resume_step(self, where: str, phase: int) -> int:
        state = self.load_state(where)
        return state["step"] if state is not None and state["phase"] == phase else 0

    def phase_end_checkpoint(self, where: str, phase: int) -> Path:
        for path in sorted((self.root / where / "checkpoints").glob(f"phase{phase}_step*.pt"), reverse=True):
            return path
        raise RunDirError(f"{self.root / where}: no checkpoint for phase {phase}")

    def truncate_metrics(self, where: str, phase: int, step: int) -> None:
        """Drop metric lines written after the state we resume from (they will be written again)."""
        path = self.root / where / "metrics.jsonl"
        rows = read_jsonl(path)
        keep = [r for r in rows if (r["phase"], r["step"]) <= (phase, step)]
        if len(keep) != len(rows) or (path.exists() and not path.read_text().endswith("\n")):
            atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))

    # -- the result

    def accuracy_rows(self, where: str) -> dict[int, dict[str, float]]:
        """{phase: {probe: mean R@1}} from the phase-end evaluations in metrics.jsonl."""
        rows = {}
        for r in read_jsonl(self.root / where / "metrics.jsonl"):
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
