"""--executor ray on a local two-node Ray cluster (ray.cluster_utils.Cluster, one CPU per node): a
study equals the sequential runner's, a killed worker and a lost node are retried from the run's
last state, a diverging job fails alone, Ctrl-C/SIGTERM leaves every run resumable and a rerun
trains only what is left, a node that cannot see the run directory is refused; and the options'
refusals, without Ray imported on the default path.

One cluster for the module, and the drivers called in this process (connected to it), so that the
cluster's workers, once they have loaded torch, serve every test: a trainer process start costs
6-8 s on this machine."""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from geomlab import train, tune
from geomlab.io import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the jobs run one torch thread each (--cpus-per-run 1)
STEPS = 12
ARGS = ["data.probe_size=16", "data.calibration_size=8", "data.shapes.domains=2", "data.shapes.train_size=64",
        "train.batch_size=16", "train.base_steps=4", f"train.steps={STEPS}", "train.checkpoint_every=4",
        "train.log_every=1"]
STUDY = ["--seeds", "0,1", "--strategies", "finetune,joint", *ARGS]
# the sequential runner, reporting whether it imported Ray
SEQUENTIAL = ("import sys\nfrom geomlab import train\nstatus = train.main(sys.argv[1:])\n"
              "print('ray imported:', 'ray' in sys.modules)\nsys.exit(status)\n")


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, logging_level=logging.WARNING)
    # Each node's worker loads the trainer once, at the same time: the first strategy jobs of one
    # seed then start together (a worker that must first load torch starts seconds behind)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def load_trainer():  # (defined here: sent by value, the workers cannot import this test module)
        import geomlab.train  # noqa: F401

    load = ray.remote(num_cpus=1)(load_trainer)
    ray.get([load.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
             for n in ray.nodes() if n["Alive"]])
    yield c
    ray.shutdown()
    c.shutdown()


class Sequential:
    """The study trained by the sequential runner in a process of its own, started at once (it runs
    beside the cluster's tests) and waited for where its result is needed."""

    def __init__(self, out: Path):
        self.out = out
        self.proc = subprocess.Popen([sys.executable, "-c", SEQUENTIAL, "--out", str(out), *STUDY], cwd=ROOT,
                                     env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stdout = None

    def wait(self) -> Path:
        if self.stdout is None:
            self.stdout, err = self.proc.communicate(timeout=300)
            assert self.proc.returncode == 0, err[-3000:]
        return self.out


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    s = Sequential(tmp_path_factory.mktemp("sequential") / "study")
    yield s
    if s.proc.poll() is None:
        s.proc.kill()


def rows(stdout: str) -> dict:
    """The driver's job table: {job: (status, retries, error)}."""
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.split()[:3] == ["job", "status", "retries"])
    out = {}
    for ln in lines[start + 1:]:
        parts = ln.split(None, 3)
        if len(parts) < 3 or not parts[2].isdigit():
            break
        out[parts[0]] = (parts[1], int(parts[2]), parts[3] if len(parts) > 3 else "")
    return out


def final_weights(run: Path, strategy: str) -> dict:
    return load_checkpoint(run / strategy / "checkpoints" / f"phase1_step{STEPS:06d}.pt")["state_dict"]


def assert_same_weights(a: Path, b: Path, strategies) -> None:
    for s in strategies:
        x, y = final_weights(a, s), final_weights(b, s)
        assert max((x[k].float() - y[k].float()).abs().max().item() for k in x) <= 1e-6, (a, b, s)


def numbers(obj, path=""):
    """Every number in a JSON document, by its path."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def watch(condition, act, timeout=180):
    """A thread that calls act(found) once condition() returns something other than None."""
    done = []

    def loop():
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = condition()
            if found is not None:
                done.append(act(found))
                return
            time.sleep(0.005)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t, done


def lose(cluster, node) -> None:
    """The node is lost, as a machine is: its raylet and every process it started (its workers, the
    running job's among them) die at once. (cluster.remove_node alone stops the raylet, and an
    orphaned worker may still finish its task and report it.)"""
    from ray._private import ray_constants
    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, ppid = stat.read_text().rsplit(")", 1)[1].split()[2], stat.parent.name
        except (OSError, IndexError):
            continue
        parents.setdefault(int(pid), []).append(int(ppid))
    on_node, todo = [], [raylet]
    while todo:
        on_node += parents.get(todo[-1], [])
        todo += parents.get(todo.pop(), [])
    for pid in on_node:  # first: a running job must not finish in the meantime
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster.remove_node(node, allow_graceful=False)


def progress(out: Path, since: float = 0.0) -> list[dict]:
    """The progress files of the jobs started after `since`, each with its job's name."""
    found = []
    for path in (out / "jobs").rglob("*.progress.json"):
        try:
            p = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if p.get("started", 0) > since:
            found.append({**p, "job": str(path.relative_to(out / "jobs"))[: -len(".progress.json")]})
    return found


def test_options_are_refused_without_ray_or_with_torchrun(tmp_path, capsys, monkeypatch):
    config = tmp_path / "t.toml"
    config.write_text('[tune]\nvalidation_seeds = [100]\n[tune.grid.wise]\nalpha = [0.2, 0.5, 0.8, 1.0]\n')
    for flag, value in (("--address", "10.0.0.1:6379"), ("--cpus-per-run", "1"), ("--gpus-per-run", "1"),
                        ("--max-retries", "2")):
        for main, args in ((train.main, ["--out", str(tmp_path / "o")]),
                           (tune.main, [str(config), "--out", str(tmp_path / "o")])):
            assert main([*args, flag, value]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f"{flag} says how jobs run" in err and "--executor ray" in err, err
    assert train.main(["--out", str(tmp_path / "o"), "--executor", "ray", "--max-retries", "-1"]) == 2
    assert "--max-retries must be >= 0" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.main(["--out", str(tmp_path / "o"), "--executor", "ray", *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not torchrun" in err, err
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where Ray is not installed
    for main, args in ((train.main, ["--out", str(tmp_path / "o"), *ARGS]), (tune.main, [str(config), "--out",
                                                                                       str(tmp_path / "o")])):
        assert main([*args, "--executor", "ray"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "pip install 'geomlab[ray]'" in err, err
    assert not (tmp_path / "o").exists()


def test_a_seeds_strategies_run_side_by_side_and_a_lost_node_is_retried(sequential, cluster, tmp_path, capsys):
    """One seed, two strategies: once the base model is trained, its two strategy jobs take the two
    nodes at once (each updating the seed's run.json); the worker node is removed mid-phase."""
    out = tmp_path / "lost"
    worker = cluster.worker_nodes.copy().pop()

    def side_by_side():
        mid = {p["job"] for p in progress(out) if p.get("phase") == 1 and p["step"] < p["total"]}
        return True if {"finetune", "joint"} <= mid else None

    def on_worker():  # the strategy job on the worker node, mid-phase with its state saved
        return next((p for p in progress(out) if p["node"] == worker.node_id and p.get("phase") == 1
                     and (out / p["dir"] / "state.pt").exists()), None)

    both, seen = watch(side_by_side, lambda found: found)
    watcher, lost = watch(on_worker, lambda p: (lose(cluster, worker), p["job"])[1])
    try:
        status = train.main(["--out", str(out), "--executor", "ray", "--strategies", "finetune,joint", *ARGS])
        watcher.join()
    finally:
        cluster.add_node(num_cpus=1)  # for the tests after this one
        cluster.wait_for_nodes()
    captured = capsys.readouterr()
    assert status == 0 and lost, captured.err[-3000:]
    both.join(timeout=0)
    assert seen, "the seed's two strategy jobs were not seen running side by side"
    table = rows(captured.out)
    assert table[lost[0]][:2] == ("done", 1) and all(s == "done" for s, _, _ in table.values()), table
    seq = sequential.wait() / "seed0"
    assert_same_weights(seq, out, ("finetune", "joint"))
    a, b = (json.loads((d / "run.json").read_text()) for d in (seq, out))
    assert {k: v for k, v in a.items() if k != "command"} == {k: v for k, v in b.items() if k != "command"}


def test_a_study_on_two_nodes_equals_the_sequential_one_despite_a_killed_worker(sequential, cluster, tmp_path,
                                                                                 capsys):
    out = tmp_path / "ray"

    def saved():  # seed1/joint, mid-phase: its state at step 4 of 12 is saved
        state, at = out / "seed1" / "joint" / "state.pt", [p for p in progress(out) if p["job"] == "seed1/joint"]
        return at[0]["pid"] if state.exists() and at else None

    watcher, killed = watch(saved, lambda pid: os.kill(pid, signal.SIGKILL))
    status = train.main(["--out", str(out), "--executor", "ray", *STUDY])
    watcher.join()
    captured = capsys.readouterr()
    assert status == 0, captured.err[-3000:]
    assert killed, "the job was not killed"
    table = rows(captured.out)
    assert set(table) == {f"seed{s}/{j}" for s in (0, 1) for j in ("base", "finetune", "joint")}
    assert all(status == "done" for status, _, _ in table.values()), table
    assert table["seed1/joint"][1] == 1 and sum(r for _, r, _ in table.values()) == 1, table
    assert "seed1/joint: its worker was lost" in captured.err
    assert " running · " in captured.err and " p1 " in captured.err  # the live line: counts, phase and step

    seq = sequential.wait()
    assert "ray imported: False" in sequential.stdout  # the default runner never loads Ray
    for s in (0, 1):
        assert_same_weights(seq / f"seed{s}", out / f"seed{s}", ("finetune", "joint"))
        a, b = (json.loads((d / f"seed{s}" / "run.json").read_text()) for d in (seq, out))
        assert {k: v for k, v in a.items() if k != "command"} == {k: v for k, v in b.items() if k != "command"}
    from geomlab import analyze
    studies = [analyze.analyze_study([d], report=False, quiet=True) for d in (seq, out)]
    a, b = ({k: v for k, v in numbers(json.loads((d / "analysis" / "analysis.json").read_text()))
             if not k.endswith(".seconds")} for d in (seq, out))  # (how long the analysis took)
    assert a.keys() == b.keys() and len(a) > 100
    assert all(a[k] == b[k] or (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])) for k in a), \
        [k for k in a if a[k] != b[k]][:5]
    assert studies[0]["seeds"] == studies[1]["seeds"]


def test_sigterm_leaves_every_run_resumable_and_reruns_train_only_what_is_left(sequential, cluster, tmp_path,
                                                                              capsys):
    out = tmp_path / "cut"
    args = ["--out", str(out), "--executor", "ray", "--strategies", "finetune,joint", *ARGS]
    # no --address: the driver starts a local Ray of its own, and stops it
    proc = subprocess.Popen([sys.executable, "-m", "geomlab.train", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not any((out / s / "state.pt").exists() for s in ("finetune", "joint")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert "continue with the same command and --resume" in stderr.strip().splitlines()[-1]
    first = rows(stdout)
    assert first["base"][0] == "done" and "stopped" in {first["finetune"][0], first["joint"][0]}, first
    base = {p: p.stat().st_mtime_ns for p in (out / "base").rglob("*")}

    # the rerun (here on the module's cluster) trains only the stopped jobs, from their saved states
    assert train.main([*args, "--resume"]) == 0
    second = rows(capsys.readouterr().out)
    assert [j for j, (_, _, note) in second.items() if note != "(done earlier)"] == \
        [j for j, (status, _, _) in first.items() if status == "stopped"], (first, second)
    assert {p: p.stat().st_mtime_ns for p in (out / "base").rglob("*")} == base
    assert_same_weights(sequential.wait() / "seed0", out, ("finetune", "joint"))


def test_an_error_ray_raises_around_a_task_is_a_failure_except_while_stopping(cluster):
    """A RayTaskError comes from Ray's machinery around a task (the trainer's own errors are
    returned by _work): a failure, unless the study is stopping, when it is the cancel's doing and
    the job stays resumable (once, in CI, a cancelled job failed with a TypeError raised outside the
    trainer)."""
    import ray
    from geomlab.executor import Job, Options, _settle

    def raise_type_error():  # (sent by value: the workers cannot import this test module)
        raise TypeError("'Handlers' object is not callable")

    ref = ray.remote(num_cpus=0, max_retries=0)(raise_type_error).remote()
    ray.wait([ref])
    for stopping, status, error in ((False, "failed", "TypeError: 'Handlers' object is not callable"),
                                    (True, "stopped", "")):
        job = Job(name="finetune", work=None, kwargs={}, log=None)
        _settle(ray, job, ref, Options(), stopping, submit=None, bar=None)
        assert (job.status, job.error) == (status, error)


def test_a_tunes_points_are_jobs_a_diverging_one_fails_alone_and_retries_run_out(sequential, cluster, tmp_path,
                                                                                  capsys):
    config = tmp_path / "tune.toml"
    # modx.alpha = 1e39 is infinite in float32: that point's loss is not finite at its first step (exit 3)
    # the study's experiment (the embedded default), tuned on seed 0
    config.write_text((ROOT / "experiments" / "shapes_5phase.toml").read_text()
                      + '[tune]\nvalidation_seeds = [0]\ncriterion = "last"\n[tune.grid.modx]\nalpha = [1.0, 5.0, 20.0, 1e39]\n')
    out = tmp_path / "tune"
    # the worker of the point alpha = 5 is killed mid-phase, with no retries allowed
    watcher, killed = watch(lambda: next((p for p in progress(out) if p["job"] == "seed0/modx-alpha=5"
                                          and p.get("phase") == 1), None), lambda p: os.kill(p["pid"], signal.SIGKILL))
    assert tune.main([str(config), "--out", str(out), "--executor", "ray", "--max-retries", "0", *ARGS]) == 1
    watcher.join()
    table = rows(capsys.readouterr().out)
    assert len(table) == 6 and killed, table
    assert [j for j, (s, _, _) in table.items() if s != "done"] == ["seed0/modx-alpha=5", "seed0/modx-alpha=1e+39"]
    assert table["seed0/modx-alpha=1e+39"][2].startswith("modx phase 1 step 1: loss = "), table
    assert table["seed0/modx-alpha=5"][1:] == (0, "its worker was lost (WorkerCrashedError) and --max-retries 0 "
                                                  "retries are spent"), table
    tuned = (out / "tuned.toml").read_text()
    assert "[values.modx]" in tuned and tuned.count('status = "done"') == 3 and "modx phase 1 step 1" in tuned
    # the reference run is the study's seed 0 finetune run (a tune's runs evaluate at phase ends only)
    assert_same_weights(sequential.wait() / "seed0", out / "seed0" / "finetune", ("finetune",))


def test_a_run_directory_a_node_cannot_see_is_refused(cluster, tmp_path):
    """The driver writes its run directory on a tmpfs that only its own mount namespace sees: no
    node of the cluster can read the marker."""
    private = tmp_path / "private"
    private.mkdir()
    out = private / "study"
    command = (f"mount -t tmpfs tmpfs {private} && exec {sys.executable} -m geomlab.train --out {out} "
               f"--executor ray --address {cluster.address} --strategies finetune {' '.join(ARGS)}")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", command], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=180)
    err = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert r.returncode == 2 and len(err) == 1, r.stderr[-3000:]
    assert err[0].startswith(f"geomlab.train: error: {out} is not visible from Ray node ") and \
        "storage every node mounts" in err[0], err
