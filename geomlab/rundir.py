"""The run directory: where every file of a run lives, for the trainer that writes it and the
analyser that reads it (docs/definitions.md, "Run directory").

    runs/NAME/
      config.toml  run.json
      train.lock                     flock-ed by the one trainer writing the run (RunDir.lock)
      train.DIR.lock  run.json.lock  a study's job of one directory (RunDir.lock(job=DIR)); the short
                                     hold of each run.json update (RunDir.updating_run_json)
      jobs/                          with --executor ray: the jobs' logs and progress (geomlab.executor)
      base/ finetune/ ...            one directory per strategy (its `strategy_dir`; "base" is phase 0)
        checkpoints/phaseP_stepSSSSSS.pt
        traces/phaseP_stepSSSSSS.safetensors
        fine_traces/phaseP_stepSSSSSS.safetensors   with train.trace_every: embeddings of the probe
                                     sets' first images only, not checkpoints (RunDir.fine_traces)
        metrics.jsonl  state.pt
        strategy_state/phaseP.safetensors   a strategy's cross-phase state at the start of phase P
      tensorboard/STRATEGY_DIR/seedS/  event files, with `--report-to tensorboard`
      analysis/                      written by geomlab.analyze

    runs/NAME/                       a multi-seed run (run.seeds = [0, 1, ...]):
      config.toml  run.json          the config with run.seeds; run.json lists "seeds" and "seed_dirs"
      seed0/ seed1/ ...              one complete run each, as above (its config: run.seed = s, run.seeds = [])
      analysis/                      the study across seeds, and analysis/seedS/ each seed's analysis

`discover` also reads one strategy's directory on its own and plain directories of open_clip
checkpoints (`epoch_N.pt`, ...).
"""
from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import shutil
import sys
import time
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file as safetensors_load
from safetensors.torch import save as safetensors_save

from geomlab.config import tomllib, with_defaults
from geomlab.io import (WriteError, append_jsonl, atomic_write, atomic_write_json, atomic_write_text,
                        load_checkpoint, read_jsonl, sync_file_system)
from geomlab.traces import write_trace

CHECKPOINTS, TRACES = "checkpoints", "traces"
FINE_TRACES = "fine_traces"  # never read as checkpoints: no weights stand behind them
ANALYSIS = "analysis"  # the analyser's default output directory inside CKPT_DIR
JOBS = "jobs"  # geomlab.executor's logs, progress and storage marker, beside what the jobs train
_STEM = re.compile(r"^phase(\d+)_step(\d+)$")


class RunDirError(ValueError):
    """The directory cannot be used (or read) as asked; the message says why."""


def checkpoint_stem(phase: int, step: int) -> str:
    """The file stem shared by a checkpoint and its trace: phase1_step000200."""
    return f"phase{phase}_step{step:06d}"


def mean_r1(metrics: dict) -> float:
    return 0.5 * (metrics["image_to_text_R@1"] + metrics["text_to_image_R@1"])


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Every dotted config key whose value differs between `a` and `b`, sorted."""
    out = []
    for key in sorted(set(a) | set(b)):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out += config_differences(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            out.append(f"{prefix}{key}")
    return out


def seed_dir(seed: int) -> str:
    """The directory of one seed's run inside a multi-seed run: seed3."""
    return f"seed{seed}"


# What `--resume` may change: how the optimizer steps and what is logged, never what is trained or
# for how many steps (README, "Resume").
# What a data policy changes is which records a phase holds: a resume may change it only where no
# trained phase changes (checked against run.json's phase_pairs); the interrupted phase restarts.
DATA_POLICY_KEYS = ("data.on_bad_sample", "data.datasets.verify_images")
RESUME_MAY_CHANGE = ("train.lr", "train.weight_decay", "train.eps", "train.beta1", "train.beta2",
                     "train.warmup_fraction", "train.log_every", "train.eval_batch_size", "data.num_workers",
                     *DATA_POLICY_KEYS)


def _adds_strategies(old: dict, new: dict) -> bool:
    """run.strategies of `new` keeps every strategy of `old` (and adds some)."""
    before, after = _dotted(old, "run.strategies"), _dotted(new, "run.strategies")
    return isinstance(before, list) and isinstance(after, list) and set(before) <= set(after)


def _bookkeeping(path: Path) -> bool:
    """A lock file or the executor's jobs/ folder: no part of what a run trained."""
    return path.name.endswith(".lock") or path.name == JOBS


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process
    return True


def _dotted(config: dict, key: str):
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


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
    ignored: list = field(default_factory=list)  # files of a checkpoint folder left out, each with why

    def run(self) -> "RunDir | None":
        """The run directory the series come from; None for a plain directory of checkpoints."""
        if self.kind == "checkpoints":
            return None
        return RunDir(self.root if self.kind == "run" else self.root.parent)

    def evaluations(self) -> dict[str, dict]:
        """Checkpoint key -> the trainer's "eval" row for it in its metrics.jsonl ({} for a plain
        directory of checkpoints, which has none)."""
        run = self.run()
        if run is None:
            return {}
        dirs = {c.strategy_dir for cks in self.series.values() for c in cks}
        return {f"{d}/{r['checkpoint']}": r for d in sorted(dirs) for r in read_jsonl(run.metrics_path(d))
                if r.get("kind") == "eval" and "checkpoint" in r}


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


LATEST = "epoch_latest.pt"  # open_clip's alias of its newest epoch_N.pt (--save-most-recent)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _plain_checkpoints(root: Path) -> tuple[list[Checkpoint], list[str]]:
    """A directory of open_clip checkpoints (`epoch_N.pt`, ...) in natural order, each one ending a
    "phase", and the files left out, each with why. open_clip's `epoch_latest.pt` is an alias: left
    out when its content equals an `epoch_N.pt`, else taken as the last epoch."""
    files = sorted((p for p in root.iterdir() if p.suffix == ".pt" and p.is_file() and p.name != LATEST),
                   key=lambda p: _natural_key(p.name))
    ignored = sorted(f"{p.name} (not a .pt checkpoint)" for p in root.iterdir()
                     if p.is_file() and p.suffix != ".pt" and not p.name.startswith("."))
    latest = root / LATEST
    if latest.is_file():
        digest = _digest(latest)
        twin = next((p for p in reversed(files) if p.stat().st_size == latest.stat().st_size and _digest(p) == digest), None)
        if twin is not None:
            ignored.insert(0, f"{LATEST} (the same file as {twin.name})")
        else:
            files.append(latest)
    name = root.resolve().name or "checkpoints"
    cks = []
    for i, p in enumerate(files):
        m = re.search(r"(\d+)", p.stem)
        step = int(m[1]) if m else (cks[-1].step + 1 if cks else i)
        cks.append(Checkpoint(p.stem, name, None, step, True, p, None))
    return cks, ignored


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
        if "seeds" in run_info:
            raise RunDirError(f"{root} is a multi-seed run: analyse it as a study (geomlab.analyze.analyze_study), "
                              f"or one seed's directory, e.g. {root / run_info['seed_dirs'][0]}")
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
    cks, ignored = _plain_checkpoints(root)
    if not cks:
        left = f" (left out: {'; '.join(ignored)})" if ignored else ""
        raise RunDirError(f"{root}: no checkpoints (*.pt files, checkpoints/ or a geomlab run) found{left}")
    return Source("checkpoints", root, {cks[0].strategy_dir: cks}, {}, None, ignored)


# Keys that may differ between runs analysed together as one study: what makes them different seeds.
SEED_KEYS = ("run.name", "run.seed", "run.seeds")


@dataclass
class SeedRun:
    """One complete single-seed run of a study."""
    seed: int
    root: Path
    config: dict               # its config.toml


def is_multi_seed(root) -> bool:
    """Whether `root` is a multi-seed run (its run.json lists "seeds")."""
    return Path(root).is_dir() and "seeds" in RunDir(root).run_json()


def discover_seeds(paths) -> list[SeedRun]:
    """The single-seed runs that `paths` hold together, in order: each multi-seed run's seed
    directories, each other path as one run. Every run needs its config.toml; the seeds must be
    distinct and the configs equal in everything but SEED_KEYS (else RunDirError naming the keys)."""
    runs: list[SeedRun] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise RunDirError(f"CKPT_DIR {path} does not exist" if not path.exists() else
                              f"CKPT_DIR {path} is not a directory")
        info = RunDir(path).run_json()
        roots = [path / d for d in info["seed_dirs"]] if "seeds" in info else [path]
        for root in roots:
            run = RunDir(root)
            if not run.config_path.is_file():
                raise RunDirError(f"{root}: no config.toml; runs analysed together must be geomlab runs")
            try:
                config = tomllib.loads(run.config_path.read_text())
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise RunDirError(f"{run.config_path} is not a readable config ({e})") from None
            runs.append(SeedRun(config["run"]["seed"], root, config))
    seen: dict[int, Path] = {}
    for r in runs:
        if r.seed in seen:
            raise RunDirError(f"seed {r.seed} appears twice ({seen[r.seed]} and {r.root}); "
                              "runs analysed together must have distinct seeds")
        seen[r.seed] = r.root
    for r in runs[1:]:
        keys = [k for k in config_differences(runs[0].config, r.config) if k not in SEED_KEYS]
        if keys:
            raise RunDirError(f"{runs[0].root} and {r.root} differ in more than the seed: {', '.join(keys)}")
    return runs


# ----------------------------------------------------------------------------- one run


class RunLock:
    """The trainer's hold on its run directory (RunDir.lock): an flock on train.lock."""

    def __init__(self, fd: int):
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file drops the lock
            self.fd = None


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

    @property
    def lock_path(self) -> Path:
        return self.root / "train.lock"

    def strategy_path(self, strategy_dir: str) -> Path:
        return self.root / strategy_dir

    def checkpoint_path(self, strategy_dir: str, phase: int, step: int) -> Path:
        return self.root / strategy_dir / CHECKPOINTS / f"{checkpoint_stem(phase, step)}.pt"

    def trace_path(self, strategy_dir: str, phase: int, step: int) -> Path:
        return self.root / strategy_dir / TRACES / f"{checkpoint_stem(phase, step)}.safetensors"

    def fine_trace_path(self, strategy_dir: str, phase: int, step: int) -> Path:
        """A fine trace (train.trace_every): embeddings of the probe sets' first images at `step`."""
        return self.root / strategy_dir / FINE_TRACES / f"{checkpoint_stem(phase, step)}.safetensors"

    def metrics_path(self, strategy_dir: str) -> Path:
        return self.root / strategy_dir / "metrics.jsonl"

    def state_path(self, strategy_dir: str) -> Path:
        return self.root / strategy_dir / "state.pt"

    def strategy_state_path(self, strategy_dir: str, phase: int) -> Path:
        """What a strategy carries from phase to phase (EWC's Fisher and θ*, a replay buffer), as it
        stands at the start of `phase`."""
        return self.root / strategy_dir / "strategy_state" / f"phase{phase}.safetensors"

    def save_strategy_state(self, strategy_dir: str, phase: int, tensors: dict) -> None:
        # contiguous clones: safetensors refuses views and tensors that share memory
        blob = safetensors_save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})
        atomic_write(self.strategy_state_path(strategy_dir, phase), lambda f: f.write(blob))

    def load_strategy_state(self, strategy_dir: str, phase: int) -> dict | None:
        """The tensors save_strategy_state wrote for `phase`, or None when there are none."""
        path = self.strategy_state_path(strategy_dir, phase)
        if not path.is_file():
            return None
        try:
            return safetensors_load(path)
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            raise RunDirError(f"{path}: not a readable safetensors file ({e})") from e

    def tensorboard_path(self, strategy_dir: str, seed: int) -> Path:
        """TensorBoard event files of one strategy directory and seed (`--report-to tensorboard`)."""
        return self.root / "tensorboard" / strategy_dir / f"seed{seed}"

    def failed_start(self) -> bool:
        """The directory holds a run that stopped before its first checkpoint (config.toml, run.json,
        perhaps metrics, but no checkpoint and no saved state): it is begun again, whatever its config."""
        return (self.config_path.is_file() and not any(self.root.rglob(f"{CHECKPOINTS}/*.pt"))
                and not any(self.root.rglob("state.pt")))

    def seed_run(self, seed: int) -> "RunDir":
        """One seed's complete run inside this multi-seed run."""
        return RunDir(self.root / seed_dir(seed))

    # -- creation

    def check(self, config: dict, config_text: str, resume: bool) -> dict:
        """Check that the directory is free, or holds this very run (with --resume), which may differ
        only in RESUME_MAY_CHANGE keys. Writes nothing; returns those changes, {key: [old, new]}."""
        stored = self.config_path
        if stored.exists() and not self.failed_start():
            try:
                old = with_defaults(tomllib.loads(stored.read_text()))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise RunDirError(f"{stored} is not a readable config ({e}); choose another --out") from None
            new = tomllib.loads(config_text)
            diffs = config_differences(old, new)
            # a strategy a resume adds comes with its own options (its section): nothing of it trained yet
            added = (set(_dotted(new, "run.strategies")) - set(_dotted(old, "run.strategies"))
                     if resume and _adds_strategies(old, new) else set())
            # [tune] says how `python -m geomlab.tune` searches; nothing a run trains reads it
            fixed = [k for k in diffs if k not in RESUME_MAY_CHANGE and not (
                k == "run.strategies" and added) and k.split(".")[0] not in {*added, "tune"}]
            if fixed:
                key = fixed[0]
                if key == "run.strategies" and resume:
                    gone = [s for s in _dotted(old, key) if s not in _dotted(new, key)]
                    raise RunDirError(f"{self.root}: a resume may add strategies but not remove one "
                                      f"({', '.join(gone)} trained here); list them too, or analyse a subset "
                                      "with python -m geomlab.analyze")
                if resume:
                    raise RunDirError(
                        f"{self.root}: config key {key!r} differs from the run's own config.toml "
                        f"({_dotted(old, key)!r} there, {_dotted(new, key)!r} here); a resume may change only "
                        f"{', '.join(RESUME_MAY_CHANGE)} and add strategies: drop that override (python -m "
                        f"geomlab.train --out {self.root} --resume reads the run's own config)")
                raise RunDirError(f"{self.root} holds a different run (config key {key!r} differs); "
                                  "choose another --out (only a run that stopped before its first checkpoint "
                                  "is begun again with a new config)")
            if not resume:
                changed = f" (with a different {', '.join(diffs)})" if diffs else ""
                raise RunDirError(f"{self.root} already holds this run{changed}; pass --resume to continue it "
                                  f"{'with the new values ' if diffs else ''}or choose another --out")
            return {k: [_dotted(old, k), _dotted(new, k)] for k in diffs}
        # (lock files alone: a trainer stopped before it wrote anything; jobs/: a study's driver)
        if self.root.exists() and not stored.exists() and (
                not self.root.is_dir() or any(not _bookkeeping(p) for p in self.root.iterdir())):
            raise RunDirError(f"{self.root} exists and is not a geomlab run directory; choose another --out")
        return {}

    def lock(self, job: str | None = None, holder: str | None = None) -> "RunLock":
        """Become the run directory's one writer (creating the directory), or raise RunDirError naming
        the process that is. The kernel drops the lock when its process ends, however it ends.

        With `job` (a strategy directory, or "base"), the writer of that directory only: a study's
        jobs of one seed run side by side (geomlab.executor), each holding train.JOB.lock, while the
        study's driver holds train.lock. `holder` is what the lock file says the holder runs
        (default: this process's command line)."""
        path = self.lock_path if job is None else self.root / f"train.{job}.lock"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise WriteError.of(path, e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            theirs = b""
            for _ in range(50):  # the holder writes its name just after it locks
                theirs = os.pread(fd, 4096, 0).strip()
                if theirs:
                    break
                time.sleep(0.02)
            os.close(fd)
            pid, _, command = theirs.decode(errors="replace").partition(" ")
            who = f"pid {pid}: {command}" if pid else "a process that has not said which"
            if pid.isdigit() and not _alive(int(pid)):
                who += "; it has ended, processes it started still hold the lock: retry in a few seconds"
            what = self.root if job is None else self.strategy_path(job)
            raise RunDirError(f"{what} is being written by another trainer ({who}); "
                              "wait for it to finish or stop it, then rerun with --resume") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {holder or ' '.join(sys.argv)}\n".encode(), 0)
        except OSError as e:
            os.close(fd)
            raise WriteError.of(path, e) from e
        return RunLock(fd)

    @contextmanager
    def updating_run_json(self):
        """Yield run.json's content (a dict) to change, then write it atomically, all under an flock
        of run.json.lock: a study's jobs of one seed update it side by side (each its own
        directory's entries), and none may lose another's update between its read and its write."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / "run.json.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise WriteError.of(self.root / "run.json.lock", e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held for a read and a small write: wait for it
            info = self.run_json()
            yield info
            atomic_write_json(self.run_json_path, info)
        finally:
            os.close(fd)

    def create(self, config_text: str) -> None:
        """Write config.toml (again, when a resume changed one of RESUME_MAY_CHANGE). A failed start's
        files go first: the run begins again."""
        if self.failed_start():
            for p in self.root.iterdir():
                if not _bookkeeping(p):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        if not self.config_path.exists() or self.config_path.read_text() != config_text:
            atomic_write_text(self.config_path, config_text)

    def record_resume(self, changed: dict, at: dict) -> None:
        """Add to run.json's "resumes" that a resume changed `changed` ({key: [old, new]}) from the
        positions `at` ({strategy_dir: [phase, step]}) on."""
        with self.updating_run_json() as info:
            info.setdefault("resumes", []).append({
                "changed": changed, "at": at, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})

    def write_run_json(self, config: dict, trainer, version: str, command: str | None = None) -> None:
        """`command`: the command that trains the run (default: this process's; a study's job
        names its driver's)."""
        with self.updating_run_json() as info:
            info.update({
                "name": config["run"]["name"], "seed": config["run"]["seed"], "device": str(trainer.device),
                "world_size": trainer.dist.world, "strategies": config["run"]["strategies"],
                "model": config["model"]["name"], "phases": [p.name for p in trainer.stream.phases],
                "probes": [p.name for p in trainer.stream.probes], "stream": trainer.stream.info,
                # which phases train on each probe set's data: the accuracy matrix's mapping
                "probe_phases": {p.name: list(p.phases) for p in trainer.stream.probes},
                # pairs each phase trains on: a resume that changes a data policy may change no finished one
                "phase_pairs": [len(p.train) for p in trainer.stream.phases],
                # "seen", "novel" (captions held out of training) or "calibration" (realignment-fit pairs,
                # never scored): the analyser reports seen and novel apart and leaves calibration sets out
                "probe_kinds": {p.name: p.kind for p in trainer.stream.probes},
                "versions": {"geomlab": version, "torch": torch.__version__, "open_clip": open_clip.__version__,
                             "python": platform.python_version()},
                "command": command or " ".join(sys.argv),
            })
            info.setdefault("completed", {})
            if trainer.stream.skipped:
                info["skipped_records"] = trainer.stream.skipped

    def write_seeds_json(self, config: dict, version: str) -> None:
        """A multi-seed run's own run.json: what it is and where each seed's run lives."""
        seeds = config["run"]["seeds"]
        atomic_write_json(self.run_json_path, {
            "name": config["run"]["name"], "seeds": seeds, "seed_dirs": [seed_dir(s) for s in seeds],
            "strategies": config["run"]["strategies"], "model": config["model"]["name"],
            "versions": {"geomlab": version, "torch": torch.__version__, "open_clip": open_clip.__version__,
                         "python": platform.python_version()},
            "command": " ".join(sys.argv)})

    def append_metrics(self, strategy_dir: str, row: dict) -> None:
        """One metrics.jsonl line, not fsynced: a line comes every train.log_every steps, and an fsync
        costs about 25 ms on a VM's disk (7% of a geomlab-tiny run at log_every = 10). The state that
        a resume starts from is written after make_durable, so every line it vouches for is on disk;
        later lines are dropped on resume (truncate_metrics)."""
        append_jsonl(self.metrics_path(strategy_dir), row, durable=False)

    def write_fine_trace(self, strategy_dir: str, trace, phase: int, step: int) -> None:
        """A fine trace, atomically but not fsynced (one every train.trace_every steps), as
        append_metrics's lines: the next state vouches for it after make_durable."""
        write_trace(self.fine_trace_path(strategy_dir, phase, step), trace, durable=False)

    def make_durable(self) -> None:
        """Everything written so far to the run directory's file system on disk
        (`sync_file_system`), before a state.pt that vouches for the metrics lines and fine traces
        written without an fsync of their own."""
        sync_file_system(self.root)

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
        """Record `phase` of `strategy_dir` as completed in run.json, then drop its state.pt: the next
        phase starts from this one's end checkpoint, and the state (weights and optimizer moments,
        about three times the checkpoint) would only hold disk until that phase writes its own."""
        with self.updating_run_json() as info:
            done = info.setdefault("completed", {}).setdefault(strategy_dir, [])
            if phase not in done:
                done.append(phase)
        self.state_path(strategy_dir).unlink(missing_ok=True)  # the trainer saved it at this phase's last step

    def checkpoints(self, strategy_dir: str) -> list[Checkpoint]:
        """A strategy directory's checkpoints and traces by (phase, step). The last of each phase is
        its end when run.json lists the phase as completed, or when run.json records nothing."""
        completed = self.completed_phases(strategy_dir)
        cks = sorted(_stems(self.strategy_path(strategy_dir)).values(), key=lambda c: (c.phase, c.step))
        for i, c in enumerate(cks):
            last = i + 1 == len(cks) or cks[i + 1].phase != c.phase
            c.phase_end = last and (completed is None or c.phase in completed)
        return cks

    def fine_traces(self, strategy_dir: str) -> list[tuple[int, int, Path]]:
        """A strategy directory's fine traces as (phase, step, path), by phase then step."""
        folder = self.strategy_path(strategy_dir) / FINE_TRACES
        found = []
        for path in folder.glob("*.safetensors") if folder.is_dir() else []:
            m = _STEM.match(path.name[: -len(".safetensors")])
            if m:
                found.append((int(m[1]), int(m[2]), path))
        return sorted(found)

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

    def restart_phase(self, strategy_dir: str, phase: int) -> None:
        """Forget an unfinished phase's progress (its saved state, checkpoints, traces, fine traces and
        metric lines), so that it trains again from its start."""
        state = self.load_state(strategy_dir)
        if state is not None and state["phase"] == phase:
            self.state_path(strategy_dir).unlink()
        for c in self.checkpoints(strategy_dir):
            if c.phase == phase:
                for path in (c.checkpoint, c.trace):
                    if path is not None:
                        path.unlink()
        for p, _, path in self.fine_traces(strategy_dir):
            if p == phase:
                path.unlink()
        self.truncate_metrics(strategy_dir, phase, 0)

    def truncate_metrics(self, strategy_dir: str, phase: int, step: int) -> None:
        """Drop metric lines written after the state we resume from (they will be written again)."""
        path = self.metrics_path(strategy_dir)
        rows = read_jsonl(path)
        keep = [r for r in rows if (r["phase"], r["step"]) <= (phase, step)]
        if len(keep) != len(rows) or (path.exists() and not path.read_text().endswith("\n")):
            atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))

    def truncate_fine_traces(self, strategy_dir: str, phase: int, step: int) -> None:
        """Delete fine traces written after the state we resume from (they will be written again),
        as truncate_metrics drops metric lines."""
        for p, s, path in self.fine_traces(strategy_dir):
            if (p, s) > (phase, step):
                path.unlink()

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
        order = self.run_json().get("probes") or []  # stream order (metrics.jsonl sorts its keys)
        probes = [p for p in order if p in base] + [p for p in base if p not in order]
        lines = [f"run: {self.root}", "mean R@1 (image→text, text→image) per probe set after each phase:",
                 f"  {'':14s} " + " ".join(f"{p:>{max(8, len(p))}s}" for p in probes)]
        lines.append(f"  {'base p0':14s} " + " ".join(f"{base[p]:{max(8, len(p))}.3f}" for p in probes))
        for s in config["run"]["strategies"]:
            for phase, row in sorted(self.accuracy_rows(s).items()):
                lines.append(f"  {s + ' p' + str(phase):14s} "
                             + " ".join(f"{row[p]:{max(8, len(p))}.3f}" for p in probes))
        return "\n".join(lines)
