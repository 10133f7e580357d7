"""A study: one experiment run with several seeds, aggregated across them (docs/definitions.md,
"Statistics across seeds"; the object is analysis.json's "geomlab.study/1", docs/analysis_schema.md).

`aggregate(runs, analyses)` takes the single-seed runs of a study (`geomlab.rundir.discover_seeds`) and
their analyses (the analysis.json objects `geomlab.analyze.analyze` returns) and gives every headline
number as mean ± 95% CI across seeds, per-checkpoint curves as mean and band, each strategy against
finetune on the same seeds, and domain 0's geometry against its forgetting over every (strategy, seed).
"""
from __future__ import annotations

from geomlab.figures.study import fmt, label
from geomlab.figures.summary import MISSING, headline_numbers, pair_numbers
from geomlab.geometry.inference import (BOOTSTRAP_RESAMPLES, CONFIDENCE, PAIRED_TEST, mean_ci, paired_comparison,
                                        spearman)
from geomlab.rundir import SeedRun

STUDY_SCHEMA = "geomlab.study/1"
BASELINE = "finetune"
# headline numbers (figures.summary.headline_numbers, nested keys joined by ".") compared with BASELINE
COMPARED = ("last", "avg", "bwt", "transfer", "domain0_r1", "last_domain_r1",
            "vs_base.rotation_image", "vs_base.rotation_text", "vs_base.rigid_share_image",
            "vs_base.rigid_share_text", "vs_base.desync", "vs_base.alignment_drift", "vs_base.modality_gap")
# domain 0's geometry (last checkpoint against base) set against domain 0's forgetting
GEOMETRY_VS_FORGETTING = ("vs_base.rotation_image", "vs_base.rotation_text", "vs_base.rigid_share_image",
                          "vs_base.rigid_share_text", "vs_base.desync", "vs_base.alignment_drift")
FORGETTING = "domain0_forgetting"
NOT_AGGREGATED = ("checkpoints",)  # the same count in every seed: not a measurement
BOOTSTRAP_SEED = 0
SUMMARY_KEYS = ("last", "avg", "bwt", "domain0_r1", "last_domain_r1")  # the console's columns
ONE_SEED_NOTE = "one seed: no confidence intervals, no paired tests (they need at least two seeds)"


def _flatten(h: dict, prefix: str = "") -> dict:
    """The numeric leaves of a headline entry as {"vs_base.rotation_image": value, ...}; None (a number
    that does not exist) is left out."""
    out = {}
    for key, v in h.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{key}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and key not in NOT_AGGREGATED:
            out[f"{prefix}{key}"] = v
    return out


def _union(lists) -> list:
    return list(dict.fromkeys(x for xs in lists for x in xs))


def _per_seed(values_by_seed: list[dict], key: str) -> list:
    return [v.get(key) for v in values_by_seed]


def _band(columns: list[list]) -> dict:
    """Per x position, mean and CI over the seeds' values: {"mean", "ci", "n"} lists."""
    stats = [mean_ci(col) for col in columns]
    return {"mean": [s["mean"] for s in stats], "ci": [s["ci"] for s in stats], "n": [s["n"] for s in stats]}


def _checkpoint_key(c: dict) -> tuple:
    return c.get("strategy_dir") == "base", c.get("phase"), c.get("step"), c["stem"]


def _curves(series: list[dict], probe: str) -> dict:
    """One strategy's per-checkpoint curves over the seeds' series, on the checkpoints every seed has."""
    keys = [[_checkpoint_key(c) for c in s["checkpoints"]] for s in series]
    common = [k for k in keys[0] if all(k in ks for ks in keys[1:])]
    at = [[ks.index(k) for k in common] for ks in keys]  # per seed, the index of each common checkpoint
    first = series[0]
    out = {"checkpoints": [first["checkpoints"][i] for i in at[0]]}
    domains = list(first["retrieval"][0])
    out["r1"] = {d: _band([[0.5 * (s["retrieval"][i][d]["image_to_text_R@1"] + s["retrieval"][i][d]["text_to_image_R@1"])
                             for s, i in zip(series, idx)] for idx in zip(*at)]) for d in domains}
    geometry = [[pair_numbers(s["vs_base"][i][probe]) if s["vs_base"][i] else {} for s, i in zip(series, idx)]
                for idx in zip(*at)]
    names = _union(g.keys() for col in geometry for g in col)
    out["vs_base"] = {n: _band([[g.get(n) for g in col] for col in geometry]) for n in names}
    zeroshot = [[(s.get("zeroshot") or [None] * len(s["checkpoints"]))[i] or {} for s, i in zip(series, idx)]
                for idx in zip(*at)]
    sets = _union(z.keys() for col in zeroshot for z in col)
    out["zeroshot"] = {z: _band([[row.get(z) for row in col] for col in zeroshot]) for z in sets}
    return out


def _accuracy(series: list[dict]) -> dict | None:
    """The accuracy matrix's mean and CI per cell; None when the seeds' matrices differ in shape."""
    accs = [s["accuracy"] for s in series]
    if len({(len(a["matrix"]), len(a["matrix"][0]) if a["matrix"] else 0) for a in accs}) != 1:
        return None
    cells = [[mean_ci([a["matrix"][t][d] for a in accs]) for d in range(len(accs[0]["matrix"][t]))]
             for t in range(len(accs[0]["matrix"]))]
    return {"rows": accs[0]["rows"], "domains": accs[0]["domains"],
            "row_phases": [series[0]["checkpoints"][k]["phase"] for k in accs[0]["row_checkpoints"]],
            "mean": [[c["mean"] for c in row] for row in cells], "ci": [[c["ci"] for c in row] for row in cells]}


def aggregate(runs: list[SeedRun], analyses: list[dict], *, sources=(), paths: dict | None = None) -> dict:
    """The study object (analysis.json "geomlab.study/1") of `runs` (one per seed) and their
    `analyses`, in the same order. `sources`: the directories given (for the record); `paths` maps a
    seed to where its analysis.json was written, relative to the study's."""
    seeds = [r.seed for r in runs]
    headlines = [headline_numbers(a) for a in analyses]
    strategies = _union(h.keys() for h in headlines)
    flat = {s: [_flatten(h[s]) if s in h else {} for h in headlines] for s in strategies}
    probe = next(h[s]["geometry_probe"] for h in headlines for s in h)

    keys = _union(f.keys() for s in strategies for f in flat[s])
    headline = {s: {k: {**mean_ci(_per_seed(flat[s], k)), "values": _per_seed(flat[s], k)} for k in keys}
                for s in strategies}

    comparison = None
    if BASELINE in strategies and len(strategies) > 1:
        comparison = {"baseline": BASELINE, "test": PAIRED_TEST, "metrics": list(COMPARED), "rows": {
            s: {k: paired_comparison(_per_seed(flat[s], k), _per_seed(flat[BASELINE], k)) for k in COMPARED}
            for s in strategies if s != BASELINE}}

    points = [{"strategy": s, "seed": seed, FORGETTING: f.get(FORGETTING), **{k: f.get(k) for k in GEOMETRY_VS_FORGETTING}}
              for s in strategies for seed, f in zip(seeds, flat[s]) if f]
    correlations = {k: spearman([p[k] for p in points], [p[FORGETTING] for p in points], seed=BOOTSTRAP_SEED)
                    for k in GEOMETRY_VS_FORGETTING}

    curves, accuracy = {}, {}
    for s in strategies:
        series = [a["strategies"][s] for a in analyses if s in a["strategies"]]
        curves[s] = _curves(series, probe)
        accuracy[s] = _accuracy(series)

    first = analyses[0]
    return {
        "schema": STUDY_SCHEMA,
        "sources": [str(p) for p in sources],
        "seeds": seeds,
        "runs": [{"seed": r.seed, "path": str(r.root), "analysis": (paths or {}).get(r.seed)} for r in runs],
        "config": {**runs[0].config, "run": {k: v for k, v in runs[0].config["run"].items()
                                             if k not in ("seed", "seeds")}},
        "domains": first["domains"],
        "model": first["model"],
        "strategies": strategies,
        "geometry_probe": probe,
        "confidence": CONFIDENCE,
        "note": ONE_SEED_NOTE if len(seeds) < 2 else None,
        "headline": headline,
        "comparison": comparison,
        "curves": curves,
        "accuracy": accuracy,
        "geometry_vs_forgetting": {"forgetting": FORGETTING, "measures": list(GEOMETRY_VS_FORGETTING),
                                   "points": points, "spearman": correlations},
        "settings": {"bootstrap_resamples": BOOTSTRAP_RESAMPLES, "bootstrap_seed": BOOTSTRAP_SEED},
    }


def _mean_pm(key: str, h: dict | None) -> str:
    if not h or h["mean"] is None:
        return MISSING
    return fmt(key, h["mean"]) + (f" ± {fmt(key, (h['ci'][1] - h['ci'][0]) / 2).lstrip('+')}" if h["ci"] else "")


def summary(st: dict) -> str:
    """The console summary of a study: headline means ± CI half-widths, the paired comparison of Last
    and domain-0 R@1 against the baseline, and the Spearman correlations."""
    seeds = ", ".join(map(str, st["seeds"]))
    lines = [f"study of {len(st['seeds'])} seed(s) ({seeds}): {len(st['strategies'])} strategies, "
             f"{len(st['domains'])} probe sets, {st.get('seconds', 0):.1f} s" + (f"; {st['note']}" if st["note"] else "")]
    for name in st["strategies"]:
        h = st["headline"][name]
        lines.append(f"  {name:<10} " + "  ".join(f"{label(k)} {_mean_pm(k, h.get(k))}" for k in SUMMARY_KEYS))
    cmp = st["comparison"]
    if cmp and len(st["seeds"]) > 1:
        for k in ("last", "domain0_r1"):
            cells = []
            for name, row in cmp["rows"].items():
                c = row[k]
                if c["mean_difference"] is not None:
                    ci = "[{}, {}]".format(*(fmt("bwt", v) for v in c["ci"])) if c["ci"] else ""
                    p = f" p {c['p_value']:.2g}" if c["p_value"] is not None else ""
                    cells.append(f"{name} {fmt('bwt', c['mean_difference'])} {ci}{p}")
            lines.append(f"  {label(k)} − {cmp['baseline']} (paired t-test): " + "; ".join(cells))
    g = st["geometry_vs_forgetting"]
    cells = [f"{label(m)} {'n/a' if r['rho'] is None else format(r['rho'], '+.2f')}"
             + (" [{:+.2f}, {:+.2f}]".format(*r["ci"]) if r["ci"] else "") for m, r in g["spearman"].items()]
    n = max((r["n"] for r in g["spearman"].values()), default=0)
    lines.append(f"  Spearman ρ with {label(g['forgetting'])} over {n} (strategy, seed) points: " + "; ".join(cells))
    return "\n".join(lines)
