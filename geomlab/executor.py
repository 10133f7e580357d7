"""--executor ray: the runs of a study as jobs on a Ray cluster (docs/definitions.md, "Job").

A study is many independent trainings. A job is one part of one run directory, trained by the
trainer's own code (geomlab.train.run_job) exactly as the sequential runner trains it: a seed's base
model (phase 0) first, then each strategy of that seed (phases 1..T), and for a tune each grid
point. This module is the driver: it checks that every node sees the run directory, hands the jobs
to Ray in dependency order, retries a job whose worker or node was lost (the retry resumes from the
run's last saved state), reports progress on one line and ends with a table of every job.

Nothing here imports Ray or torch at import time: the default in-process runner never loads Ray,
and `python -m geomlab.train --help` still answers before torch.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from geomlab.config import ConfigError

# geomlab.io and geomlab.rundir load torch: imported where used, so that the command-line check
# (geomlab.train_args) stays free of it

RAY_OPTIONS = ("--address", "--cpus-per-run", "--gpus-per-run", "--max-retries")
PROGRESS_EVERY = 1.0  # seconds between a job's progress writes (a shared file system sees each)


# ----------------------------------------------------------------------------- command line

def add_options(p: argparse.ArgumentParser) -> None:
    """The executor's options, shared by python -m geomlab.train and python -m geomlab.tune."""
    p.add_argument("--executor", choices=("sequential", "ray"), default="sequential",
                   help="sequential (default): every run in this process, one after another; ray: each job "
                        "(a seed's base model, each strategy of a seed, each grid point) a task on a Ray cluster")
    p.add_argument("--address", help="with --executor ray: the Ray cluster to join (default: start a local one "
                                     "for this command and stop it at the end)")
    p.add_argument("--cpus-per-run", dest="cpus_per_run", type=float,
                   help="with --executor ray: CPUs each job holds, and its torch threads (default 1)")
    p.add_argument("--gpus-per-run", dest="gpus_per_run", type=float,
                   help="with --executor ray: GPUs each job holds (default 1 on a cluster with GPUs, else 0)")
    p.add_argument("--max-retries", dest="max_retries", type=int,
                   help="with --executor ray: times a job whose worker or node was lost is started again "
                        "(from its last saved state; default 3)")


def check_options(args) -> None:
    """ConfigError naming the first executor option that makes no sense as given."""
    if args.executor != "ray":
        for flag in RAY_OPTIONS:
            if getattr(args, flag[2:].replace("-", "_")) is not None:
                raise ConfigError(f"{flag} says how jobs run on a Ray cluster: it needs --executor ray")
        return
    if args.cpus_per_run is not None and not args.cpus_per_run > 0:
        raise ConfigError(f"--cpus-per-run must be > 0, got {args.cpus_per_run:g}")
    if args.gpus_per_run is not None and not args.gpus_per_run >= 0:
        raise ConfigError(f"--gpus-per-run must be >= 0, got {args.gpus_per_run:g}")
    if args.max_retries is not None and args.max_retries < 0:
        raise ConfigError(f"--max-retries must be >= 0, got {args.max_retries}")


def require_ray(prog: str):
    """The ray module, or ConfigError saying how to install it (an optional extra)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray, which is not installed: pip install 'geomlab[ray]'") from None
    return ray


@dataclass(frozen=True)
class Options:
    address: str | None = None
    cpus: float = 1.0
    gpus: float | None = None  # None: 1 when the cluster has GPUs
    max_retries: int = 3

    @classmethod
    def of(cls, args) -> "Options":
        return cls(args.address, args.cpus_per_run or 1.0, args.gpus_per_run,
                   3 if args.max_retries is None else args.max_retries)


# ----------------------------------------------------------------------------- jobs

@dataclass
class Job:
    """One job: `work(**kwargs, progress=...)` in a worker process, its output appended to `log`."""
    name: str                    # seed0/base, seed0/modx, seed100/wise-alpha=0.5; the table's row
    work: Callable               # a module-level function returning the trainer's exit status
    kwargs: dict
    log: Path
    after: tuple = ()            # names of the jobs that must be done first
    finished: bool = False       # done by an earlier command: skipped
    status: str = "queued"       # queued | running | done | failed | stopped
    error: str = ""
    retries: int = 0
    ref: object = field(default=None, repr=False)


def train_jobs(runs, root, changes: list[dict], command: str, report_to: str | None) -> list[Job]:
    """The jobs of python -m geomlab.train: per seed's run, its base model, then each strategy.
    A part that run.json records as complete is finished; the base job also runs when the
    command changes the run's config (it records the change, as the sequential runner does)."""
    from geomlab import train
    from geomlab.rundir import JOBS
    jobs = []
    top = root.root.resolve()  # (paths as every node names them)
    for (config, run), changed in zip(runs, changes):
        prefix = "" if run.root == root.root else f"{run.root.name}/"
        phases = len(run.run_json().get("phases") or [])
        common = dict(config=config, out=str(run.root.resolve()), command=command, root=str(top),
                      report_to=report_to)
        base = Job(f"{prefix}base", train.run_job, {**common, "job": "base"}, top / JOBS / f"{prefix}base.log",
                   finished=run.is_complete("base", 0) and not changed)
        jobs.append(base)
        for s in config["run"]["strategies"]:
            done = phases > 1 and all(run.is_complete(s, p) for p in range(1, phases))
            jobs.append(Job(f"{prefix}{s}", train.run_job, {**common, "job": s}, top / JOBS / f"{prefix}{s}.log",
                            after=(base.name,), finished=done))
    return jobs


# ----------------------------------------------------------------------------- in the worker

class _Progress:
    """Trainer.progress of a job: its phase and step, written to a small file the driver reads,
    at most every PROGRESS_EVERY seconds (and at each phase end)."""

    def __init__(self, path: Path, about: dict):
        self.path, self.about, self.last = path, about, 0.0
        self.write({})

    def write(self, where: dict) -> None:
        from geomlab.io import atomic_write
        text = json.dumps({**self.about, **where})
        # atomic (the driver never reads half a file) but not fsynced: rewritten every second, read
        # only by the live line, worthless after a crash; an fsync would cost about 2% of the job
        atomic_write(self.path, lambda f: f.write(text), mode="w", durable=False)

    def __call__(self, strategy_dir: str, phase: int, step: int, total: int) -> None:
        now = time.monotonic()
        if step == total or now - self.last >= PROGRESS_EVERY:
            self.last = now
            self.write({"dir": strategy_dir, "phase": phase, "step": step, "total": total, "time": time.time()})


def error_line(text: str, status: int) -> str:
    """The error a trainer's output (exit `status`) ends with: its last "error:" line; else its
    last line when it was stopped (130), else the status."""
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    if errors:
        return errors[-1].split("error:", 1)[1].strip()
    return lines[-1] if status == 130 and lines else f"exit status {status}"


def _work(work: Callable, kwargs: dict, log: str, progress: str, threads: int, cwd: str) -> dict:
    """A job, run in the Ray worker process itself: workers are reused, so torch and open_clip load
    once per worker rather than once per job (6-8 s each on a 2-core machine), while each job still
    has a process of its own for as long as it runs. A lost worker is a Ray system error, which the
    driver retries; the trainer's own failure is its exit status, returned here and never retried.
    The trainer's SIGINT handler runs here too: ray.cancel delivers SIGINT to the task, so a stopped
    study leaves every job's state saved for --resume. (Ray's default gives a task that holds a GPU
    a fresh worker each time, which also returns the GPU's memory.)

    It runs in the driver's working directory when this node has it: a config's relative paths
    (model.pretrained, a dataset) then mean what they mean to the driver."""
    import ray
    import torch

    torch.set_num_threads(max(1, int(threads)))  # the job's share of its node's CPUs
    reporter = _Progress(Path(progress), {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                                          "started": time.time()})
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    here = os.getcwd()
    with open(log, "a") as f:
        start = f.tell()
        with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            try:
                if os.path.isdir(cwd):
                    os.chdir(cwd)
                status = work(**kwargs, progress=reporter)
            except Exception as e:  # noqa: BLE001 - a bug, not a lost worker: reported, never retried
                import traceback
                traceback.print_exc()
                return {"status": 1, "error": f"{type(e).__name__}: {e}"}
            finally:
                os.chdir(here)
    with open(log) as f:
        f.seek(start)
        output = f.read()
    return {"status": status, "error": "" if status == 0 else error_line(output, status)}


def _read_marker(path: str) -> str:
    """What a node sees at the storage marker's path (a task pinned to that node)."""
    try:
        return Path(path).read_text()
    except OSError as e:
        return f"! {e.strerror or e}"


# ----------------------------------------------------------------------------- the driver

def check_storage(ray, folder: Path, nodes: list[dict]) -> str | None:
    """None when each of `nodes` (those that could run a job) reads the marker this driver writes in
    `folder`; else the refusal, naming the run directory and the first node that cannot see it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from geomlab.io import atomic_write_text
    token = uuid.uuid4().hex
    marker = folder / "storage-check"
    atomic_write_text(marker, token)
    try:
        read = ray.remote(_read_marker)
        refs = [read.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(marker)) for n in nodes]
        for node, ref in zip(nodes, refs):
            try:
                seen = ray.get(ref, timeout=300)
            except (ray.exceptions.RayError, TimeoutError) as e:
                seen = f"! the check did not finish: {type(e).__name__}"
            if seen != token:
                why = seen[2:] if seen.startswith("! ") else "another file is there"
                return (f"{folder.parent} is not visible from Ray node {node['NodeManagerAddress']} "
                        f"({node['NodeID'][:12]}: {why}); the run directory must be on storage every node "
                        "mounts at the same path")
    finally:
        marker.unlink(missing_ok=True)
    return None


def run_jobs(jobs: list[Job], options: Options, root: Path, prog: str, again: str) -> int:
    """Run `jobs` on Ray (joining options.address, else on a local Ray started and stopped here);
    their table on stdout. 0 when every job is done, 130 when stopped by SIGINT/SIGTERM (`again`
    says how to continue), 2 when the cluster cannot be used, else 1."""
    from geomlab.rundir import JOBS
    ray = require_ray(prog)
    root = Path(root).resolve()
    if all(j.finished for j in jobs):  # a rerun of a finished study: nothing to start Ray for
        for j in jobs:
            j.status = "done"
        print(table(jobs))
        return 0
    joined = ray.is_initialized()  # a notebook's or a test's connection: used, and left open
    if not joined:
        try:
            # no dashboard: it costs seconds to start and nothing here reads it; the jobs' output goes
            # to their logs (JOBS), not to this console
            ray.init(address=options.address or "local", include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            print(f"{prog}: error: --address {options.address}: cannot join the Ray cluster ({e})", file=sys.stderr)
            return 2
    try:
        gpus = options.gpus if options.gpus is not None else (1 if ray.cluster_resources().get("GPU", 0) else 0)
        alive = [n for n in ray.nodes() if n["Alive"]]
        nodes = [n for n in alive if n["Resources"].get("CPU", 0) >= options.cpus
                 and n["Resources"].get("GPU", 0) >= gpus]
        if not nodes:  # Ray would wait for such a node for ever
            most = max(alive, key=lambda n: (n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0)))["Resources"]
            print(f"{prog}: error: --cpus-per-run {options.cpus:g} --gpus-per-run {gpus:g}: no node of the cluster "
                  f"has that much (the largest: {most.get('CPU', 0):g} CPUs, {most.get('GPU', 0):g} GPUs)",
                  file=sys.stderr)
            return 2
        refused = check_storage(ray, root / JOBS, nodes)
        if refused:
            print(f"{prog}: error: {refused}", file=sys.stderr)
            return 2
        task = ray.remote(_work).options(num_cpus=options.cpus, num_gpus=gpus, max_retries=0)
        status = _schedule(ray, task, jobs, options, root / JOBS)
    finally:
        if not joined:
            ray.shutdown()
    print(table(jobs))
    if status == 130:
        print(f"{prog}: interrupted: every job saved what --resume needs; {again} (finished jobs are skipped)",
              file=sys.stderr)
    return status


def _progress_path(folder: Path, job: Job) -> Path:
    return folder / f"{job.name}.progress.json"


def _schedule(ray, task, jobs: list[Job], options: Options, folder: Path) -> int:
    from tqdm import tqdm

    # the trainer's own: the first SIGINT/SIGTERM asks the jobs to stop, a second one takes its
    # default action (installed after ray.init, which sets a SIGTERM handler of its own)
    from geomlab.train import StopRequest
    by_name = {j.name: j for j in jobs}
    for j in jobs:
        if j.finished:
            j.status = "done"
    running: dict = {}  # ray ref -> job

    def submit(j: Job) -> None:
        path = _progress_path(folder, j)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # it appears again when the job starts: queued until then
        j.ref = task.remote(j.work, j.kwargs, str(j.log), str(path), options.cpus, os.getcwd())
        running[j.ref] = j

    bar = tqdm(total=len(jobs), unit="job", dynamic_ncols=True, mininterval=0.5, bar_format="[{elapsed}] {desc}",
               file=sys.stderr, desc=f"jobs: {sum(not j.finished for j in jobs)} queued")
    cancelled = False
    with StopRequest() as stop:
        while True:
            if stop.signal is not None and not cancelled:
                cancelled = True
                for ref in running:
                    ray.cancel(ref)  # SIGINT to the trainer: it saves its state at the next step
                for j in jobs:
                    if j.status == "queued" and j.ref is None:
                        j.status = "stopped"
            for j in jobs:
                if j.status != "queued" or j.ref is not None or stop.signal is not None:
                    continue
                deps = [by_name[d] for d in j.after]
                failed = next((d for d in deps if d.status in ("failed", "stopped")), None)
                if failed is not None:
                    j.status, j.error = "failed", f"not run: {failed.name} {failed.status}"
                elif all(d.status == "done" for d in deps):
                    submit(j)
            if not running:
                break
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.2)  # (a stop request waits as long)
            for ref in ready:
                j = running.pop(ref)
                j.ref = None
                _settle(ray, j, ref, options, stop.signal is not None, submit, bar)
            _show(bar, jobs, folder)
        _show(bar, jobs, folder)
        bar.close()
    if stop.signal is not None or any(j.status == "stopped" for j in jobs):
        return 130
    return 0 if all(j.status == "done" for j in jobs) else 1


def _settle(ray, j: Job, ref, options: Options, stopping: bool, submit, bar) -> None:
    """Record a finished task's outcome; resubmit a job whose worker or node was lost."""
    try:
        out = ray.get(ref)
    except ray.exceptions.TaskCancelledError:
        j.status = "stopped"
        return
    except ray.exceptions.RayTaskError as e:  # raised outside the trainer (_work returns its errors)
        if stopping:
            # Ray's own handling of the stop's cancel around the task (once, in CI, a cancelled job
            # failed with a TypeError raised outside the trainer): as resumable as a stopped job
            j.status = "stopped"
            return
        j.status, j.error = "failed", str(e).strip().splitlines()[-1]
        return
    except ray.exceptions.RayError as e:  # the worker process or its node is gone
        what = type(e).__name__
        if stopping:
            j.status = "stopped"
        elif j.retries < options.max_retries:
            j.retries += 1
            bar.write(f"{j.name}: its worker was lost ({what}); retry {j.retries} of {options.max_retries} "
                      "continues from its last saved state", file=sys.stderr)
            j.status = "queued"
            submit(j)
        else:
            j.status = "failed"
            j.error = f"its worker was lost ({what}) and --max-retries {options.max_retries} retries are spent"
        return
    status = out["status"]
    j.status = "done" if status == 0 else "stopped" if status == 130 else "failed"
    j.error = out["error"] if status not in (0, 130) else ""


def _show(bar, jobs: list[Job], folder: Path) -> None:
    """The live line: jobs queued / running / done / failed, the time so far, each running job's
    phase and step."""
    where = []
    for j in jobs:
        if j.status in ("queued", "running") and j.ref is not None:
            try:
                p = json.loads(_progress_path(folder, j).read_text())
            except (OSError, ValueError):
                j.status = "queued"
                continue
            j.status = "running"
            where.append(f"{j.name} p{p['phase']} {p['step']}/{p['total']}" if "phase" in p else f"{j.name} starting")
    count = {s: sum(j.status == s for j in jobs) for s in ("queued", "running", "done", "failed", "stopped")}
    bar.n = count["done"] + count["failed"] + count["stopped"]
    bar.set_description_str(f"jobs: {count['queued']} queued · {count['running']} running · {count['done']} done · "
                            f"{count['failed']} failed" + (f" · {count['stopped']} stopped" if count["stopped"] else "")
                            + "".join(f" | {w}" for w in where))


def table(jobs: list[Job]) -> str:
    """Every job: its status, the retries it took, and a failed job's error line."""
    width = max(len("job"), *(len(j.name) for j in jobs))
    lines = [f"{'job':{width}s}  {'status':7s}  retries  error"]
    for j in jobs:
        status = "done" if j.finished else j.status
        lines.append(f"{j.name:{width}s}  {status:7s}  {j.retries:7d}  {j.error}".rstrip()
                     + (" (done earlier)" if j.finished else ""))
    return "\n".join(lines)
