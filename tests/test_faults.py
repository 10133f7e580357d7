"""The trainer under faults, end to end through the CLIs: a diverged loss, a second writer, a
full disk, and the analyser reading a run that is still training."""
from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from geomlab import train
from geomlab.config import tomllib
from geomlab import rundir
from geomlab.io import (WriteError, append_jsonl, atomic_torch_save, atomic_write_json, load_checkpoint,
                        read_jsonl, sync_file_system)
from geomlab.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
# One thread: these runs share the CPU with each other (a trainer and the analyser, two trainers).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS = 8
ARGS = ["--strategies", "finetune", "data.probe_size=16", "data.shapes.domains=2", "data.shapes.train_size=64",
        "train.batch_size=16", "train.base_steps=2", f"train.steps={STEPS}", "train.checkpoint_every=2",
        "train.log_every=1", "data.calibration_size=8"]


def cli(module: str, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def start(out: Path, *args) -> tuple[subprocess.Popen, Path]:
    """A trainer in the background; its stderr goes to a file (a pipe nobody reads could fill)."""
    err = out.parent / f"{out.name}.stderr"
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "geomlab.train", "--out", str(out), *args], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=f, env=ENV)
    return proc, err


def wait_for(path: Path, proc: subprocess.Popen, timeout=240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the trainer ended (status {proc.returncode}) before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.005)


def error_lines(stderr: str) -> list[str]:
    """The lines that report an error (the rest is the progress bar and open_clip's warning)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if "error" in line.lower()]


def nonfinite_in(out: Path) -> list[str]:
    """Every file under `out` holding a NaN or an infinity: checkpoints, states, traces, metrics, run.json."""
    def tensors(obj):
        if isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v)
        elif isinstance(obj, torch.Tensor) and obj.is_floating_point():
            yield obj

    def strict_json(text):
        def refuse(constant):
            raise ValueError(constant)
        return json.loads(text, parse_constant=refuse)

    bad = []
    for path in sorted(out.rglob("*")):
        if path.suffix == ".pt":
            ok = all(torch.isfinite(t).all() for t in tensors(load_checkpoint(path)))
        elif path.suffix == ".safetensors":
            ok = all(torch.isfinite(t).all() for t in tensors(load_file(path)))
        elif path.suffix in (".jsonl", ".json"):
            try:
                lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
                for line in lines:
                    strict_json(line)
                ok = True
            except ValueError:
                ok = False
        else:
            continue
        if not ok:
            bad.append(str(path.relative_to(out)))
    return bad


def final_weights(out: Path) -> dict:
    return load_checkpoint(out / "finetune" / "checkpoints" / f"phase1_step{STEPS:06d}.pt")["state_dict"]


# ----------------------------------------------------------------------------- a full disk


@pytest.fixture(scope="module")
def stopped_by_full_disk(tmp_path_factory):
    """A run stopped in phase 1 by a file-size limit (RLIMIT_FSIZE: writes beyond it fail with EFBIG)
    set once its first phase-1 state is saved, between a checkpoint's size and a state's: the next
    checkpoint fits, the next state.pt does not. -> (run directory, exit status, stderr)."""
    out = tmp_path_factory.mktemp("full") / "run"
    proc, err = start(out, *ARGS)
    wait_for(out / "finetune" / "state.pt", proc)
    checkpoint = (out / "base" / "checkpoints" / "phase0_step000002.pt").stat().st_size
    state = (out / "finetune" / "state.pt").stat().st_size
    limit = (checkpoint + state) // 2
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
    status = proc.wait(timeout=240)
    return out, status, err.read_text()


def test_write_errors_name_the_file_and_leave_it_as_it_was(tmp_path):
    """geomlab.io under a file-size limit: torch.save's failure (a RuntimeError from its serializer),
    a JSON file and a metrics line all fail as a WriteError naming the file, and the file is unchanged."""
    script = textwrap.dedent(f"""
        import json, os, torch
        from geomlab.io import WriteError, append_jsonl, atomic_torch_save, atomic_write, atomic_write_json
        d = {str(tmp_path)!r}
        results = {{}}
        for name, write in [
                ("a.pt", lambda p: atomic_torch_save(p, {{"w": torch.ones(100_000)}})),
                ("r.json", lambda p: atomic_write_json(p, {{"x": "y" * 100_000}})),
                ("m.jsonl", lambda p: append_jsonl(p, {{"x": "y" * 100_000}})),
                # without fsync (metrics lines, fine traces): as all-or-nothing
                ("n.jsonl", lambda p: append_jsonl(p, {{"x": "y" * 100_000}}, durable=False)),
                ("f.bin", lambda p: atomic_write(p, lambda f: f.write(b"y" * 100_000), durable=False))]:
            try:
                write(os.path.join(d, name))
                results[name] = "written"
            except WriteError as e:
                results[name] = str(e)
        print(json.dumps(results))
    """)
    atomic_torch_save(tmp_path / "a.pt", {"w": torch.zeros(3)})
    atomic_write_json(tmp_path / "r.json", {"x": 1})
    append_jsonl(tmp_path / "m.jsonl", {"x": 1})
    append_jsonl(tmp_path / "n.jsonl", {"x": 1})
    (tmp_path / "f.bin").write_bytes(b"x")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    limit = 50_000
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=ENV, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    for name in before:
        assert results[name] == f"cannot write {tmp_path / name}: File too large", results
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # unchanged, no temporary files left
    assert torch.equal(load_checkpoint(tmp_path / "a.pt")["w"], torch.zeros(3))


def test_full_disk_stops_with_one_line_keeps_the_last_state_and_resume_matches(stopped_by_full_disk, tmp_path):
    stopped, status, stderr = stopped_by_full_disk
    assert status == 2, stderr[-3000:]
    errors = error_lines(stderr)
    assert len(errors) == 1 and f"cannot write {stopped / 'finetune' / 'state.pt'}: File too large" in errors[0], errors
    assert not list(stopped.rglob("*.tmp"))
    # The state that was there before is intact, and it is the state of its own checkpoint.
    state = load_checkpoint(stopped / "finetune" / "state.pt")
    assert state["phase"] == 1 and 0 < state["step"] < STEPS
    saved = load_checkpoint(stopped / "finetune" / "checkpoints" / f"phase1_step{state['step']:06d}.pt")
    assert all(torch.equal(state["model"][k], v) for k, v in saved["state_dict"].items())
    for path in stopped.rglob("*.pt"):
        load_checkpoint(path)  # every checkpoint on disk is complete

    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    resumed = cli("geomlab.train", "--out", str(run), "--resume", *ARGS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = tmp_path / "whole"
    assert cli("geomlab.train", "--out", str(whole), *ARGS).returncode == 0
    a, b = final_weights(whole), final_weights(run)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    rows = [json.loads(line) for line in (run / "finetune" / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["kind"], r["step"]) for r in rows]
    assert len(steps) == len(set(steps)) == STEPS + STEPS // 2  # each train and eval line once


# ----------------------------------------------------------------------------- divergence


def test_divergence_stops_with_one_line_writes_nothing_nonfinite_and_resumes_with_a_lower_lr(
        stopped_by_full_disk, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(stopped_by_full_disk[0], run)
    good = load_checkpoint(run / "finetune" / "state.pt")["step"]
    # A resume may change train.lr (README, "Resume"), not what is trained.
    assert train.main(["--out", str(run), "--resume", *ARGS, f"train.steps={STEPS + 1}"]) == 2
    assert "train.steps" in capsys.readouterr().err

    # One step at this rate takes the weights past float32's range; the next loss is NaN.
    diverged = cli("geomlab.train", "--out", str(run), "--resume", *ARGS, "train.lr=1e30")
    assert diverged.returncode == 3, diverged.stderr[-3000:]
    errors = error_lines(diverged.stderr)
    assert len(errors) == 1, errors
    last_good = run / "finetune" / "checkpoints" / f"phase1_step{good:06d}.pt"
    assert f"finetune phase 1 step {good + 2}:" in errors[0] and "train.lr (now 1e+30)" in errors[0], errors
    assert f"last good checkpoint: {last_good};" in errors[0] and "--resume" in errors[0], errors
    assert nonfinite_in(run) == []
    assert load_checkpoint(run / "finetune" / "state.pt")["step"] == good

    resumed = cli("geomlab.train", "--out", str(run), "--resume", *ARGS, "train.lr=1e-3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert nonfinite_in(run) == []
    assert tomllib.loads((run / "config.toml").read_text())["train"]["lr"] == 1e-3
    resumes = json.loads((run / "run.json").read_text())["resumes"]
    assert [r["changed"] for r in resumes] == [{"train.lr": [5e-4, 1e30]}, {"train.lr": [1e30, 1e-3]}]
    assert [r["at"] for r in resumes] == [{"finetune": [1, good]}] * 2
    assert math.isfinite(final_weights(run)["logit_scale"].item())


# ----------------------------------------------------------------------------- one writer, any readers


def test_second_trainer_is_refused_and_the_analyser_reads_a_run_in_progress(tmp_path):
    out = tmp_path / "run"
    long = [*ARGS, "train.steps=400", "train.checkpoint_every=4"]
    first, _ = start(out, *long)
    try:
        wait_for(out / "finetune" / "checkpoints" / "phase1_step000004.pt", first)
        first.send_signal(signal.SIGSTOP)  # paused, it still holds the lock (and leaves the CPU to the second)
        second = cli("geomlab.train", "--out", str(out), "--resume", *long)
        first.send_signal(signal.SIGCONT)
        assert second.returncode == 2, second.stderr[-3000:]
        errors = error_lines(second.stderr)
        assert len(errors) == 1 and f"pid {first.pid}:" in errors[0] and str(out) in errors[0], errors
        # it wrote nothing: the lock file and run.json still name the first trainer
        assert RunDir(out).lock_path.read_text().startswith(f"{first.pid} ")
        assert "train.steps=400" in json.loads((out / "run.json").read_text())["command"]

        analysis = tmp_path / "analysis"
        read = cli("geomlab.analyze", str(out), "--out", str(analysis), "--no-report", "-q")
        assert read.returncode == 0, read.stderr[-3000:]
        assert first.poll() is None, "the run must still be training while it is analysed"
        listed = json.loads((analysis / "analysis.json").read_text())["strategies"]["finetune"]["checkpoints"]
        assert len(listed) >= 2 and listed[0]["stem"] == "phase0_step000002"
        # every checkpoint it listed came with its trace, complete: nothing had to be embedded
        assert {c["source"] for c in listed} == {"trace"}
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel dropped the killed trainer's lock: the next trainer takes it at once.
    RunDir(out).lock().release()
    rows = read_jsonl(out / "finetune" / "metrics.jsonl")
    assert len({(r["kind"], r["step"]) for r in rows}) == len(rows)  # one writer: no line twice


# Records OpenMP's settings at the moment torch is first imported (libgomp reads them only then).
SPIN_PROBE = textwrap.dedent("""
    import os, sys
    seen = {}
    class FirstTorchImport:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" and not seen:
                seen["spin"] = os.environ.get("GOMP_SPINCOUNT")
            return None
    sys.meta_path.insert(0, FirstTorchImport())
    import geomlab.train
    print(seen["spin"])
""")


@pytest.mark.parametrize("env, expected", [
    ({}, "10000"),                                   # the default: short spins, set before torch loads
    ({"GOMP_SPINCOUNT": "500"}, "500"),              # a user's spin count wins
    ({"OMP_WAIT_POLICY": "PASSIVE"}, "None"),        # so does a user's wait policy (not overridden)
])
def test_openmp_spin_count_is_set_before_torch_loads_and_a_users_setting_wins(env, expected):
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", SPIN_PROBE], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**base, **env})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


def test_sync_file_system_syncs_the_given_one_and_names_a_missing_path(tmp_path):
    (tmp_path / "x").write_text("written")
    assert sync_file_system(tmp_path) is None
    with pytest.raises(WriteError, match=str(tmp_path / "gone")):
        sync_file_system(tmp_path / "gone")


def test_lines_and_fine_traces_skip_fsync_and_every_state_is_written_after_a_sync(tmp_path, monkeypatch):
    """A metrics line (every train.log_every steps) and a fine trace (every train.trace_every) are
    not fsynced, an fsync costing about as much as a geomlab-tiny step; each state.pt, which a
    resume trusts for every line and fine trace before it, is written after the run directory's
    file system is synced (syncfs(2), `sync_file_system`)."""
    events = []
    out = tmp_path / "r"

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    def sync_file_system(path):
        assert Path(path) == out  # the run's own file system, not every one (sync(2))
        events.append(("sync", str(path)))
        real_sync(path)

    real_sync = rundir.sync_file_system
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "sync", lambda: events.append(("sync(2)", "")))
    monkeypatch.setattr(rundir, "sync_file_system", sync_file_system)
    assert train.main(["--out", str(out), *ARGS, "train.trace_every=1", "train.trace_size=4"]) == 0
    synced = [p for kind, p in events if kind == "fsync"]
    assert not [p for p in synced if p.endswith("metrics.jsonl") or "/fine_traces/" in p], synced
    states = [i for i, (kind, p) in enumerate(events) if kind == "fsync" and Path(p).name.startswith(".state.pt.")]
    assert len(states) == 1 + STEPS // 2  # the base phase's end, then every checkpoint_every = 2 steps
    assert all(events[i - 1][0] == "sync" for i in states), events
    assert ("sync(2)", "") not in events
    rows = read_jsonl(out / "finetune" / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert len(list((out / "finetune" / "fine_traces").iterdir())) == STEPS + 1
