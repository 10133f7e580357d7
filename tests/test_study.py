"""Multi-seed studies end to end: `geomlab.train --seeds` lays out one complete run per seed, and
`geomlab.analyze` aggregates across seeds; every aggregated number is checked against the per-seed
analyses, recomputed here by hand."""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import pytest
from scipy import stats

from geomlab import analyze, train
from geomlab.config import dumps, tomllib
from geomlab.geometry.synthetic import synthetic_run, synthetic_study
from geomlab.io import atomic_write_text
from geomlab.rundir import RunDir, discover_seeds
from geomlab.study import COMPARED, ONE_SEED_NOTE
from test_train import ROOT, TINY, snapshot

SMALL = dict(checkpoints=4, domains=3, n=40, d=16)


def by_hand_ci(values):
    """mean, t-interval: x̄ ± t_{0.975, n−1} s/√n, written out."""
    n = len(values)
    m = sum(values) / n
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return m, [m - half, m + half]


def r1(metrics):
    return 0.5 * (metrics["image_to_text_R@1"] + metrics["text_to_image_R@1"])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = synthetic_study(tmp_path_factory.mktemp("study") / "shapes", [0, 1, 2], **SMALL)
    st = analyze.analyze_study([root], report=False, quiet=True)
    seeds = {s: json.loads((root / "analysis" / f"seed{s}" / "analysis.json").read_text()) for s in (0, 1, 2)}
    return root, st, seeds


def test_study_numbers_equal_the_per_seed_analyses_by_hand(study):
    root, st, per_seed = study
    assert json.loads((root / "analysis" / "analysis.json").read_text()) == st
    assert st["schema"] == "geomlab.study/1" and st["seeds"] == [0, 1, 2] and st["note"] is None
    assert [r["analysis"] for r in st["runs"]] == ["seed0/analysis.json", "seed1/analysis.json", "seed2/analysis.json"]
    for name in ("finetune", "modx", "joint"):
        h = st["headline"][name]
        series = [per_seed[s]["strategies"][name] for s in (0, 1, 2)]
        # read straight from each seed's analysis.json: probe set k is learned at phase k (synthetic_run)
        by_key = {
            "last": [s["accuracy"]["last"] for s in series],
            "bwt": [s["accuracy"]["bwt"] for s in series],
            "domain0_r1": [s["accuracy"]["matrix"][-1][0] for s in series],
            "last_domain_r1": [s["accuracy"]["matrix"][-1][-1] for s in series],
            "domain0_forgetting": [s["accuracy"]["forgetting"][0] for s in series],
            "vs_base.rotation_text": [s["vs_base"][-1]["domain0"]["rotation"]["text"]["mean"] for s in series],
            "vs_base.alignment_drift": [s["vs_base"][-1]["domain0"]["deviation"]["alignment_drift"]["mean"]
                                        for s in series],
            "vs_base.modality_gap": [s["modality_gap"][-1]["domain0"] for s in series],
        }
        for key, values in by_key.items():
            mean, ci = by_hand_ci(values)
            assert h[key]["values"] == pytest.approx(values, abs=1e-12), key
            assert h[key]["n"] == 3 and h[key]["mean"] == pytest.approx(mean, abs=1e-12), key
            assert h[key]["ci"] == pytest.approx(ci, abs=1e-12), key
        # the mean forgetting curve and its band, at the last checkpoint, probe set domain1
        band = st["curves"][name]["r1"]["domain1"]
        mean, ci = by_hand_ci([r1(s["retrieval"][-1]["domain1"]) for s in series])
        assert band["mean"][-1] == pytest.approx(mean, abs=1e-12) and band["ci"][-1] == pytest.approx(ci, abs=1e-12)
        assert len(band["mean"]) == len(series[0]["checkpoints"])
        theta = [s["vs_base"][2]["domain0"]["rotation"]["image"]["mean"] for s in series]
        assert st["curves"][name]["vs_base"]["rotation_image"]["mean"][2] == pytest.approx(sum(theta) / 3, abs=1e-12)
        assert st["curves"][name]["vs_base"]["rotation_image"]["mean"][0] is None  # the base against itself: no pair
        cell = [s["accuracy"]["matrix"][1][2] for s in series]
        assert st["accuracy"][name]["mean"][1][2] == pytest.approx(sum(cell) / 3, abs=1e-12)


def test_paired_comparison_against_finetune(study):
    _, st, per_seed = study
    cmp = st["comparison"]
    assert cmp["baseline"] == "finetune" and list(cmp["rows"]) == ["modx", "joint"]
    assert cmp["metrics"] == list(COMPARED) and "ttest_rel" in cmp["test"]
    for key, get in (("last", lambda s: s["accuracy"]["last"]),
                     ("vs_base.desync", lambda s: s["vs_base"][-1]["domain0"]["deviation"]["desync"]["mean"])):
        a = [get(per_seed[s]["strategies"]["modx"]) for s in (0, 1, 2)]
        b = [get(per_seed[s]["strategies"]["finetune"]) for s in (0, 1, 2)]
        c = cmp["rows"]["modx"][key]
        mean, ci = by_hand_ci([x - y for x, y in zip(a, b)])
        assert c["n"] == 3 and c["mean_difference"] == pytest.approx(mean, abs=1e-12)
        assert c["ci"] == pytest.approx(ci, abs=1e-12)
        assert c["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-9)


def test_geometry_against_forgetting_spearman(study):
    _, st, per_seed = study
    g = st["geometry_vs_forgetting"]
    assert len(g["points"]) == 9  # (strategy, seed)
    x, y = [], []
    for name in ("finetune", "modx", "joint"):
        for s in (0, 1, 2):
            series = per_seed[s]["strategies"][name]
            x.append(series["vs_base"][-1]["domain0"]["procrustes"]["image"]["rigid_share"])
            y.append(series["accuracy"]["forgetting"][0])
    r = g["spearman"]["vs_base.rigid_share_image"]
    ref = stats.spearmanr(x, y)
    assert r["n"] == 9 and r["rho"] == pytest.approx(ref.statistic, abs=1e-12)
    assert r["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert r["ci"][0] <= r["rho"] <= r["ci"][1] and r["seed"] == st["settings"]["bootstrap_seed"]


def test_several_runs_given_together_are_one_study(study, tmp_path, capsys):
    root, st, _ = study
    # seeds 1 and 2 as separate runs: the same numbers as in the multi-seed run
    runs = []
    for s in (1, 2):
        runs.append(synthetic_run(tmp_path / f"run{s}", seed=s, **SMALL))
        RunDir(runs[-1]).create(dumps(tomllib.loads((root / f"seed{s}" / "config.toml").read_text())))
    out = tmp_path / "together"
    assert analyze.main([*map(str, runs), "--out", str(out), "--no-report", "-q"]) == 0
    together = json.loads((out / "analysis.json").read_text())
    assert together["seeds"] == [1, 2]
    for name, h in together["headline"].items():
        assert {k: v["values"] for k, v in h.items()} == {k: v["values"][1:] for k, v in st["headline"][name].items()}
    # several directories need --out
    assert analyze.main([*map(str, runs), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err
    assert not (runs[0] / "analysis").exists()


def test_runs_that_differ_in_more_than_the_seed_are_refused(study, tmp_path, capsys):
    root, _, _ = study
    other = synthetic_run(tmp_path / "other", seed=7, **SMALL)
    config = tomllib.loads((root / "seed0" / "config.toml").read_text())
    config["run"]["seed"], config["train"]["lr"], config["model"]["precision"] = 7, 1e-4, "bf16"
    atomic_write_text(other / "config.toml", dumps(config))
    out = tmp_path / "out"
    assert analyze.main([str(root / "seed0"), str(other), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.precision, train.lr" in err and "run.seed" not in err, err
    assert not out.exists()
    # a seed twice
    assert analyze.main([str(root / "seed0"), str(root), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "seed 0 appears twice" in err
    assert not out.exists()
    # a multi-seed run is not one run
    with pytest.raises(ValueError, match="multi-seed"):
        analyze.analyze(root, quiet=True)


def test_one_seed_has_no_intervals_and_says_so(tmp_path):
    root = synthetic_study(tmp_path / "one", [5], **SMALL)
    st = analyze.analyze_study([root], report=False, quiet=True)
    assert st["note"] == ONE_SEED_NOTE
    h = st["headline"]["modx"]["last"]
    assert h["n"] == 1 and h["ci"] is None and h["mean"] == h["values"][0]
    c = st["comparison"]["rows"]["modx"]["last"]
    assert c["n"] == 1 and c["ci"] is None and c["p_value"] is None
    assert all(ci is None for ci in st["curves"]["finetune"]["r1"]["domain0"]["ci"])


def run_train(*args):
    return subprocess.run([sys.executable, "-m", "geomlab.train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("args, names", [
    (["--seeds", ""], "--seeds"),
    (["--seeds", " , "], "--seeds"),
    (["--seeds", "0,1,0"], "seed 0 appears twice"),
    (["--seeds", "0,x"], "--seeds"),
    (["run.seeds=[2,2]"], "run.seeds"),
    (["run.seeds=[-1]"], "run.seeds"),
])
def test_bad_seed_lists_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, args, names):
    out = tmp_path / "run"
    assert train.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and names in err, err
    assert not out.exists()


def test_train_seeds_then_analyze(tmp_path):
    out = tmp_path / "seeds"
    done = run_train("--out", str(out), "--seeds", "0,1", "--strategies", "finetune", *TINY)
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads((out / "run.json").read_text())
    assert info["seeds"] == [0, 1] and info["seed_dirs"] == ["seed0", "seed1"]
    top = tomllib.loads((out / "config.toml").read_text())
    assert top["run"]["seeds"] == [0, 1]
    bases = []
    for s in (0, 1):
        run = RunDir(out / f"seed{s}")
        config = tomllib.loads(run.config_path.read_text())
        # each seed's directory is the complete single-seed run of that seed
        assert config == {**top, "run": {**top["run"], "seed": s, "seeds": []}}
        assert run.run_json()["seed"] == s and run.run_json()["completed"] == {"base": [0], "finetune": [1, 2]}
        bases.append(run.phase_end_checkpoint("base", 0).read_bytes())
    assert bases[0] != bases[1]  # each seed trains its own base model
    before = snapshot(out)
    again = run_train("--out", str(out), "--seeds", "0,1", "--strategies", "finetune", *TINY)
    assert again.returncode == 2 and "--resume" in again.stderr and snapshot(out) == before

    assert [r.seed for r in discover_seeds([out])] == [0, 1]
    done = subprocess.run([sys.executable, "-m", "geomlab.analyze", str(out), "--no-report", "-q"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    st = json.loads((out / "analysis" / "analysis.json").read_text())
    seed1 = json.loads((out / "analysis" / "seed1" / "analysis.json").read_text())
    assert st["seeds"] == [0, 1] and st["strategies"] == ["finetune"] and st["comparison"] is None
    assert st["headline"]["finetune"]["last"]["values"][1] == seed1["strategies"]["finetune"]["accuracy"]["last"]
    assert st["headline"]["finetune"]["last"]["n"] == 2
