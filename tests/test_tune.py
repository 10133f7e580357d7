"""python -m geomlab.tune end to end on tiny runs, its grid checks, its selection, and the study's
refusal of seeds a tuning has looked at."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from geomlab import train, tune
from geomlab.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]

TINY = """
[run]
name = "tinytune"
[model]
name = "geomlab-tiny"
[data]
stream = "shapes"
probe_size = 16
calibration_size = 8
[data.shapes]
domains = 2
train_size = 64
[train]
batch_size = 16
base_steps = 4
steps = 3
log_every = 1
trace_every = 1
[tune]
validation_seeds = [100]
criterion = "last"
"""


def write_config(tmp_path: Path, grid: str, name="tune.toml") -> Path:
    path = tmp_path / name
    path.write_text(TINY + grid)
    return path


WISE = "[tune.grid.wise]\nalpha = [0.2, 0.5, 0.8, 1.0]\n"


@pytest.mark.parametrize("grid, names", [
    ("[tune.grid.wise]\nalpha = [0.2, 0.5, 0.8]\n", "at least 4"),
    ("[tune.grid.wise]\nalpha = [0.2, 0.5, 0.8, 0.9]\n[tune.grid.er]\nreplay_fraction = [0.1, 0.2, 0.3, 0.4, 0.5]\n",
     "same number of points"),
    ("[tune.grid.nosuch]\nx = [1, 2, 3, 4]\n", "tune.grid.nosuch"),
    ("[tune.grid.finetune]\nx = [1, 2, 3, 4]\n", "no strength knob"),
    ("[tune.grid.lwf]\ntemperature = [1, 2, 3, 4]\n", "main knob, weight"),
    ("[tune.grid.wise]\nalpha = [0.2, 0.5, 0.8, 1.5]\n", "tune.grid.wise.alpha: 1.5"),
    ("[tune.grid.wise]\nalpha = [0.2, 0.5, 0.5, 0.8]\n", "twice"),
    ("", "tune.grid is empty"),
])
def test_bad_grid_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, grid, names):
    out = tmp_path / "out"
    assert tune.main([str(write_config(tmp_path, grid)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("geomlab.tune: error:") and names in err, err
    assert not out.exists()


def test_no_validation_seeds_is_refused(tmp_path, capsys):
    path = write_config(tmp_path, WISE)
    assert tune.main([str(path), "--out", str(tmp_path / "o"), "tune.validation_seeds=[]"]) == 2
    assert "tune.validation_seeds is empty" in capsys.readouterr().err


def _result(strategy, option, value, seed, last):
    r = tune.Result(seed, tune.Point(strategy, option, value), status="done")
    r.metrics = {"last": last}
    return r


def test_selection_takes_the_best_mean_and_breaks_ties_towards_the_weaker_regulariser():
    modx = [tune.Point("modx", "alpha", v) for v in (1.0, 5.0, 20.0, 80.0)]
    wise = [tune.Point("wise", "alpha", v) for v in (0.2, 0.5, 0.8, 1.0)]
    lasts = {("modx", 1.0): (0.30, 0.40), ("modx", 5.0): (0.50, 0.30), ("modx", 20.0): (0.45, 0.35),
             ("modx", 80.0): (0.2, 0.1),
             ("wise", 0.2): (0.5, 0.5), ("wise", 0.5): (0.1, 0.2), ("wise", 0.8): (0.6, 0.4), ("wise", 1.0): (0.0, 0.0)}
    results = [_result(s, "alpha", v, seed, lasts[s, v][i]) for (s, v) in lasts for i, seed in enumerate((100, 101))]
    chosen = tune.select(results, modx + wise, "last")
    # modx: 5 and 20 tie at 0.40 (1: 0.35): the smaller α regularises less
    assert chosen["modx"]["value"] == 5.0 and chosen["modx"]["scores"][80.0] == pytest.approx(0.15)
    # wise: 0.2 and 0.8 tie at 0.5: α is the fine-tuned model's weight, so the larger α regularises less
    assert chosen["wise"]["value"] == 0.8
    # a value with a failed seed has no mean and is never chosen
    results[0].status, results[1].status = "failed", "failed"   # modx α = 1, both seeds
    results[2].metrics["last"] = 0.9                             # modx α = 5 now 0.6
    chosen = tune.select(results, modx + wise, "last")
    assert chosen["modx"]["scores"][1.0] is None and chosen["modx"]["value"] == 5.0


def _table(path: Path) -> list[dict]:
    return tomllib.loads(path.read_text())["table"]


ER = "[tune.grid.er]\nreplay_fraction = [0.125, 0.25, 0.5, 0.75]\n"


def test_tune_resumes_after_sigkill_without_rerunning_finished_points(tmp_path):
    config = write_config(tmp_path, WISE + ER)
    whole = tmp_path / "whole"
    assert tune.main([str(config), "--out", str(whole), "--strategies", "wise"]) == 0
    expected = _table(whole / "tuned.toml")
    tuned = tomllib.loads((whole / "tuned.toml").read_text())
    # the choice equals the table's best mean Last (one seed), ties to the larger α
    points = [r for r in expected if r["strategy"] == "wise"]
    best = max(r["last"] for r in points)
    assert tuned["values"]["wise"]["alpha"] == max(r["value"] for r in points if r["last"] == best)
    assert tuned["provenance"]["validation_seeds"] == [100] and tuned["provenance"]["criterion"] == "last"
    assert (whole / "tuning.md").read_text().count("| wise |") == 5  # four points and the selection row
    assert "plotly" in (whole / "report.html").read_text()
    assert not (whole / "seed100" / "er-replay_fraction=0.5").exists()
    assert not list(whole.rglob("fine_traces"))  # the experiment's train.trace_every: not for a point

    # a strategy added to the tuning: its points only, the file keeps wise's value and rows
    wise_tuned = (whole / "tuned.toml").read_text()
    assert tune.main([str(config), "--out", str(whole), "--strategies", "er",
                      "--tuned-out", str(whole / "tuned.toml")]) == 0
    merged = tomllib.loads((whole / "tuned.toml").read_text())
    assert merged["values"]["wise"] == tuned["values"]["wise"] and "replay_fraction" in merged["values"]["er"]
    assert [t["strategies"] for t in merged["provenance"]["tunings"]] == [["wise"], ["er"]]
    assert set(merged["provenance"]["grid"]) == {"wise", "er"}
    rows = [(r["strategy"], r["value"], r["last"]) for r in merged["table"]]
    assert sorted(r for r in rows if r[0] == "wise") == sorted((r["strategy"], r["value"], r["last"])
                                                              for r in expected if r["strategy"] == "wise")
    assert sum(r[0] == "er" for r in rows) == 4 and sum(r[0] == "finetune" for r in rows) == 1
    # a file tuned under another budget is refused before anything runs
    (tmp_path / "other_budget.toml").write_text(wise_tuned.replace("steps = 3", "steps = 30"))
    assert tune.main([str(config), "--out", str(whole), "--strategies", "er",
                      "--tuned-out", str(tmp_path / "other_budget.toml")]) == 2

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "geomlab.tune", str(config), "--out", str(cut), "--strategies",
                             "wise"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = cut / "seed100" / "wise-alpha=0.5"
    deadline = time.time() + 240
    while not second.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = [cut / "seed100" / "finetune", cut / "seed100" / "wise-alpha=0.2"]
    before = {p: p.stat().st_mtime_ns for d in done for p in d.rglob("*") if p.name != "train.lock"}
    assert any(p.suffix == ".pt" for p in before)

    resumed = subprocess.run([sys.executable, "-m", "geomlab.tune", str(config), "--out", str(cut), "--strategies",
                              "wise"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before, "a finished point was trained again"
    got = _table(cut / "tuned.toml")
    assert [(r["strategy"], r["value"], r["last"], r["avg"]) for r in got] == \
        [(r["strategy"], r["value"], r["last"], r["avg"]) for r in expected]

    # the same directory with another grid is refused, untouched
    other = write_config(tmp_path, "[tune.grid.wise]\nalpha = [0.1, 0.5, 0.8, 1.0]\n" + ER, "other.toml")
    snap = {p: p.stat().st_mtime_ns for p in cut.rglob("*")}
    r = subprocess.run([sys.executable, "-m", "geomlab.tune", str(other), "--out", str(cut)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "holds another tuning" in r.stderr and "tune.grid.wise.alpha" in r.stderr
    assert {p: p.stat().st_mtime_ns for p in cut.rglob("*")} == snap


TUNED = """
[values.wise]
alpha = 0.8
[provenance]
validation_seeds = [100, 3]
criterion = "last"
"""


def test_a_study_on_a_validation_seed_is_refused(tmp_path, capsys):
    (tmp_path / "tuned.toml").write_text(TUNED)
    config = tmp_path / "study.toml"
    config.write_text(TINY.replace('name = "tinytune"', 'name = "s"\ntuned = "tuned.toml"'))
    # the tuned values apply over the file's, and the command line's over them
    assert load_config(config, ["run.seeds=[0, 1]"])["wise"]["alpha"] == 0.8
    assert load_config(config, ["run.seeds=[0, 1]", "wise.alpha=0.3"])["wise"]["alpha"] == 0.3
    out = tmp_path / "out"
    assert train.main(["--config", str(config), "--out", str(out), "--seeds", "0,3,4", "--strategies", "wise"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "seed(s) [3]" in err and "validation seeds" in err, err
    assert not out.exists()
    with pytest.raises(ConfigError, match="seed"):
        load_config(config, ["run.seed=100"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(config, ["run.tuned='missing.toml'"])


def test_the_study_takes_the_committed_tuned_values_on_seeds_tuning_never_saw():
    from geomlab.strategies import STRATEGIES
    config = load_config(ROOT / "experiments" / "shapes_baselines.toml")
    tuned = tomllib.loads((ROOT / "experiments" / "tuned" / "shapes_5phase.toml").read_text())
    knobbed = {s for s in config["run"]["strategies"] if STRATEGIES[s].knob is not None}
    assert set(tuned["values"]) == knobbed == set(config["tune"]["grid"])
    for strategy, values in tuned["values"].items():
        assert values == {STRATEGIES[strategy].knob[0]: config[strategy][STRATEGIES[strategy].knob[0]]}
        assert values[STRATEGIES[strategy].knob[0]] in config["tune"]["grid"][strategy][STRATEGIES[strategy].knob[0]]
    assert tuned["provenance"]["grid"] == config["tune"]["grid"]  # made from this very grid
    assert config["run"]["seeds"] == [0, 1, 2, 3, 4]
    assert not set(config["run"]["seeds"]) & set(tuned["provenance"]["validation_seeds"])
    # every point on every validation seed is in the table, and the choice is its best mean Last
    rows = [r for r in tuned["table"] if r["strategy"] in knobbed]
    assert len(rows) == sum(len(v) for g in config["tune"]["grid"].values() for v in g.values()) * len(
        tuned["provenance"]["validation_seeds"])
    for strategy, values in tuned["values"].items():
        mine = [r for r in rows if r["strategy"] == strategy]
        means = {v: sum(r["last"] for r in mine if r["value"] == v) / len(tuned["provenance"]["validation_seeds"])
                 for v in {r["value"] for r in mine}}
        assert means[next(iter(values.values()))] == pytest.approx(max(means.values()), abs=1e-12)


def test_a_resume_may_change_the_tune_section_and_add_a_strategy_with_its_options(tmp_path):
    from geomlab.config import dumps
    from geomlab.rundir import RunDir, RunDirError
    config = load_config(write_config(tmp_path, WISE), ["run.strategies=finetune"])
    run = RunDir(tmp_path / "run")
    run.create(dumps(config))
    (tmp_path / "run" / "finetune" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "finetune" / "checkpoints" / "phase0_step000004.pt").write_bytes(b"")  # it has trained
    later = load_config(write_config(tmp_path, WISE + ER, "later.toml"), ["run.strategies=finetune,er",
                                                                          "er.replay_fraction=0.3"])
    assert set(run.check(later, dumps(later), resume=True)) == {"run.strategies", "tune.grid.er", "er.replay_fraction"}
    changed = load_config(write_config(tmp_path, WISE, "changed.toml"), ["run.strategies=finetune", "train.steps=9"])
    with pytest.raises(RunDirError, match="train.steps"):
        run.check(changed, dumps(changed), resume=True)
