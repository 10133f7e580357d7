"""Multi-seed studies end to end: `geomlab.train --seeds` lays out one complete run per seed, and
`geomlab.analyze` aggregates across seeds; every aggregated number is checked against the per-seed
analyses, recomputed here by hand."""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from geomlab import analyze, train
from geomlab.config import dumps, tomllib
from geomlab.geometry.synthetic import synthetic_run, synthetic_study
from geomlab.io import atomic_write_text
from geomlab.rundir import RunDir, discover_seeds
from geomlab.figures import study_figures
from geomlab.geometry.inference import mean_ci
from geomlab.io import load_checkpoint
from geomlab.study import COMPARED, CORRELATED, GEOMETRY_VS_FORGETTING, ONE_SEED_NOTE, summary
from geomlab.weights import weight_distance
from test_train import ROOT, TINY, snapshot

SMALL = dict(checkpoints=4, domains=3, n=40, d=16, weights=True)


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
    assert st["schema"] == "geomlab.study/2" and st["seeds"] == [0, 1, 2] and st["note"] is None
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
    # Holm across the strategies compared, within each metric: statsmodels on the raw p-values
    from statsmodels.stats.multitest import multipletests
    assert "Holm" in cmp["correction"]
    for key in COMPARED:
        raw = [cmp["rows"][s][key]["p_value"] for s in ("modx", "joint")]
        if None in raw:
            continue
        adjusted = multipletests(raw, method="holm")[1]
        for s, q in zip(("modx", "joint"), adjusted):
            c = cmp["rows"][s][key]
            assert c["p_holm"] == pytest.approx(q, rel=1e-12) and c["holm_family"] == 2


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
    assert r["n"] == 9 and r["clusters"] == 3 and r["rho"] == pytest.approx(ref.statistic, abs=1e-12)
    # 9 points: the exact permutation p, here from scipy with its own Spearman statistic
    ry = stats.rankdata(y)
    exact = stats.permutation_test((stats.rankdata(x),), lambda u, axis=-1: stats.pearsonr(u, ry, axis=axis).statistic,
                                   permutation_type="pairings", n_resamples=np.inf, vectorized=True)
    assert "exact permutation" in r["p_method"] and r["p_value"] == pytest.approx(exact.pvalue, rel=1e-9)
    # three strategies: too few clusters for a cluster bootstrap, and too few strategy means for any ρ
    assert r["ci"] is None and "3 clusters" in r["reason"] and r["seed"] == st["settings"]["bootstrap_seed"]
    assert all(m["rho"] is None and "3 points" in m["reason"] for m in g["strategy_means"].values())
    assert g["measures"] == list(CORRELATED) and g["control"] == "weight_distance"
    assert set(g["partial"]) == set(GEOMETRY_VS_FORGETTING)
    # the partial correlation given the weight distance, by its closed form on the ranks
    z = [p["weight_distance"] for p in g["points"]]
    rx, ry, rz = (stats.rankdata(v) for v in (x, y, z))
    rxy, rxz, ryz = (np.corrcoef(a, b)[0, 1] for a, b in ((rx, ry), (rx, rz), (ry, rz)))
    part = g["partial"]["vs_base.rigid_share_image"]
    if part["rho"] is not None:
        assert part["rho"] == pytest.approx((rxy - rxz * ryz) / np.sqrt((1 - rxz ** 2) * (1 - ryz ** 2)), abs=1e-9)


def test_weight_distance_per_checkpoint_and_in_the_headline(study):
    root, st, per_seed = study
    for s in (0, 1):
        series = per_seed[s]["strategies"]["modx"]
        base = load_checkpoint(root / f"seed{s}" / "base" / "checkpoints" / "phase0_step000100.pt")["state_dict"]
        last = sorted((root / f"seed{s}" / "modx" / "checkpoints").glob("*.pt"))[-1]
        by_hand = weight_distance(load_checkpoint(last)["state_dict"], base)
        assert series["weight_distance"][0] == 0.0
        assert series["weight_distance"][-1] == pytest.approx(by_hand, rel=1e-12)
        assert len(series["weight_distance"]) == len(series["checkpoints"])
        assert st["headline"]["modx"]["weight_distance"]["values"][s] == series["weight_distance"][-1]
    # methods that move less (the synthetic strategies move less in order) have the smaller distance
    means = [st["headline"][n]["weight_distance"]["mean"] for n in ("finetune", "modx", "joint")]
    assert means == sorted(means, reverse=True)
    band = st["curves"]["modx"]["weight_distance"]
    assert band["mean"][0] == 0.0 and band["ci"][0] is None and band["all_equal"][0]  # the base: all seeds equal
    # within each strategy: every (seed, checkpoint) but the base, against the domain-0 R@1 drop
    w = st["within_strategy"]
    assert w["drop"] == "domain0_r1_drop" and set(w["rows"]) == {"finetune", "modx", "joint"}
    r = w["rows"]["finetune"]["weight_distance"]
    assert r["n"] == 9 and r["clusters"] == 3 and r["rho"] is not None


def test_stores_and_the_console_summary(study):
    _, st, _ = study
    from geomlab.strategies import STRATEGIES
    assert st["stores"] == {n: STRATEGIES[n].stores for n in ("finetune", "modx", "joint")}
    text = summary(st)
    print(text)
    for n in ("finetune", "modx", "joint"):
        assert f"stores: {STRATEGIES[n].stores}" in text
    assert "Holm" in text and "weight distance" in text and "within each strategy" in text
    assert "p 0 " not in text and "± 0.000" not in text
    # a number some seeds lack shows its n; seeds that all agree say so, with no interval
    doctored = json.loads(json.dumps(st))
    doctored["headline"]["modx"]["last"] = {**mean_ci([0.5, None, 0.7]), "values": [0.5, None, 0.7]}
    doctored["headline"]["joint"]["last"] = {**mean_ci([0.6, 0.6, 0.6]), "values": [0.6, 0.6, 0.6]}
    doctored["comparison"]["rows"]["modx"]["last"].update(all_equal=True, ci=None, p_value=None, p_holm=None)
    text = summary(doctored)
    lines = {line.split()[0]: line for line in text.splitlines()[1:4]}
    assert "Last 0.600 ± " in lines["modx"] and "(n = 2)" in lines["modx"].split("Avg")[0]
    assert "Last 0.600 (all seeds equal)  Avg" in lines["joint"] and "(n = " not in lines["joint"]
    last_line = next(line for line in text.splitlines() if "Last − finetune" in line)
    assert "modx +" in last_line and "(all seeds equal)" in last_line


def test_captions_do_not_call_two_seed_intervals_evidence(study):
    _, st, _ = study
    captions = {sid: caption for sid, _, _, caption in study_figures(st)}
    assert "not evidence" in captions["geometry-forgetting"]  # three strategies: descriptive only
    assert "excludes 0 says" not in captions["geometry-forgetting"]
    two = {**st, "seeds": [0, 1]}
    for sid, caption in ((sid, c) for sid, _, _, c in study_figures(two)):
        if "interval" in caption or "CI" in caption:
            assert "not evidence" in caption, sid


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
