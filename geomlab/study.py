"""A study: one experiment run with several seeds, aggregated across them (docs/definitions.md,
"Statistics across seeds"; the object is analysis.json's "geomlab.study/1", docs/analysis_schema.md).

`aggregate(runs, analyses)` takes the single-seed runs of a study (`geomlab.rundir.discover_seeds`) and
their analyses (the analysis.json objects `geomlab.analyze.analyze` returns) and gives every headline
number as mean ± 95% CI across seeds, per-checkpoint curves as mean and band, each strategy against
finetune on the same seeds (Holm-corrected across strategies), and domain 0's geometry and the weight
distance against its forgetting over every (strategy, seed), and within each strategy.
"""
from __future__ import annotations

from geomlab import disorder
from geomlab.figures.study import METRIC_LABELS, fmt, label
from geomlab.figures.summary import MISSING, format_number, headline_numbers, pair_numbers
from geomlab.geometry.forgetting import exact
from geomlab.geometry.inference import (ALL_EQUAL, BOOTSTRAP_RESAMPLES, CONFIDENCE, EXACT_BELOW, HOLM, MIN_CLUSTERS,
                                        MIN_POINTS, PAIRED_TEST, holm, mean_ci, paired_comparison, partial_spearman,
                                        spearman)
from geomlab.rundir import SeedRun

STUDY_SCHEMA = "geomlab.study/2"
BASELINE = "finetune"
# headline numbers (figures.summary.headline_numbers, nested keys joined by ".") compared with BASELINE
COMPARED = ("last", "avg", "bwt", "transfer", "domain0_r1", "last_domain_r1",
            "vs_base.rotation_image", "vs_base.rotation_text", "vs_base.rigid_share_image",
            "vs_base.rigid_share_text", "vs_base.desync", "vs_base.alignment_drift", "vs_base.modality_gap",
            "weight_distance")
# domain 0's geometry (last checkpoint against base) set against domain 0's forgetting
GEOMETRY_VS_FORGETTING = ("vs_base.rotation_image", "vs_base.rotation_text", "vs_base.rigid_share_image",
                          "vs_base.rigid_share_text", "vs_base.desync", "vs_base.alignment_drift",
                          "vs_base.modality_gap")
FORGETTING = "domain0_forgetting"
# ‖θ − θ_base‖ / ‖θ_base‖ at the last checkpoint: correlated with forgetting too, and the control of the
# partial correlations ("do methods that retain more also change the model less?")
CONTROL = "weight_distance"
CORRELATED = GEOMETRY_VS_FORGETTING + (CONTROL,)
R1_DROP = "domain0_r1_drop"  # within a strategy: domain-0 R@1 at the base − at the checkpoint
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
    return {"mean": [s["mean"] for s in stats], "ci": [s["ci"] for s in stats], "n": [s["n"] for s in stats],
            "all_equal": [s["all_equal"] for s in stats]}


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
    out["weight_distance"] = _band([[(s.get("weight_distance") or [None] * len(s["checkpoints"]))[i]
                                     for s, i in zip(series, idx)] for idx in zip(*at)])
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
            "mean": [[c["mean"] for c in row] for row in cells], "ci": [[c["ci"] for c in row] for row in cells],
            "n": [[c["n"] for c in row] for row in cells],
            "all_equal": [[c["all_equal"] for c in row] for row in cells]}


def _stores(strategies: list[str]) -> dict:
    """strategy -> what it keeps from earlier phases (`stores` of its geomlab.strategies class); None for
    a series that is no geomlab strategy (base, a plain directory)."""
    from geomlab.strategies import STRATEGIES  # the strategies pull in the data pipeline: only here
    return {s: getattr(STRATEGIES.get(s), "stores", None) for s in strategies}


def _correlations(points: list[dict]) -> dict:
    """Each measure against domain-0 forgetting over the (strategy, seed) points: Spearman with a
    cluster bootstrap over strategies; partial Spearman controlling for the weight distance; Spearman
    over the strategies' means (one point per strategy)."""
    clusters = [p["strategy"] for p in points]
    y, z = [p[FORGETTING] for p in points], [p[CONTROL] for p in points]
    pooled = {m: spearman([p[m] for p in points], y, clusters=clusters, seed=BOOTSTRAP_SEED) for m in CORRELATED}
    partial = {m: partial_spearman([p[m] for p in points], y, z, clusters=clusters, seed=BOOTSTRAP_SEED)
               for m in GEOMETRY_VS_FORGETTING}
    means = {}
    for m in CORRELATED:
        mx, my = [], []
        for s in dict.fromkeys(clusters):
            both = [(p[m], p[FORGETTING]) for p in points if p["strategy"] == s
                    and p[m] is not None and p[FORGETTING] is not None]
            if both:
                mx.append(sum(b[0] for b in both) / len(both))
                my.append(sum(b[1] for b in both) / len(both))
        means[m] = spearman(mx, my, n_resamples=0)
    return {"spearman": pooled, "partial": partial, "strategy_means": means}


def _d0_r1(series: dict, k: int, probes: list) -> object:
    """Domain 0's R@1 at checkpoint k, exact (a Fraction; None where a value is missing)."""
    values = [exact(series["retrieval"][k][p][d]) for p in probes for d in ("image_to_text_R@1", "text_to_image_R@1")]
    return None if any(v is None for v in values) else sum(values) / len(values)


def _within(strategy: str, analyses: list[dict], seeds: list) -> dict:
    """Within one strategy, over its seeds and checkpoints (the base left out): Spearman of each measure
    (domain 0's geometry against the base, the weight distance) against domain 0's R@1 drop from the
    base, with a cluster bootstrap over seeds."""
    rows = []
    for seed, a in zip(seeds, analyses):
        s = a["strategies"].get(strategy)
        if s is None:
            continue
        h = headline_numbers({**a, "strategies": {strategy: s}})[strategy]
        probe = h["geometry_probe"]
        d0 = s["accuracy"].get("domain0")
        probes = d0["probes"] if d0 else [probe]
        r0 = _d0_r1(s, 0, probes)
        wd = s.get("weight_distance") or [None] * len(s["checkpoints"])
        for k in range(1, len(s["checkpoints"])):
            rk = _d0_r1(s, k, probes)
            g = pair_numbers(s["vs_base"][k][probe]) if s["vs_base"][k] else {}
            rows.append({"seed": seed, R1_DROP: None if r0 is None or rk is None else float(r0 - rk), CONTROL: wd[k],
                         **{m: g.get(m.split(".", 1)[1]) for m in GEOMETRY_VS_FORGETTING}})
    drop = [r[R1_DROP] for r in rows]
    return {m: spearman([r[m] for r in rows], drop, clusters=[r["seed"] for r in rows], seed=BOOTSTRAP_SEED)
            for m in CORRELATED}


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
        rows = {s: {k: paired_comparison(_per_seed(flat[s], k), _per_seed(flat[BASELINE], k)) for k in COMPARED}
                for s in strategies if s != BASELINE}
        for k in COMPARED:  # one family per metric: the strategies compared with the baseline
            adjusted = holm([rows[s][k]["p_value"] for s in rows])
            for s, q in zip(rows, adjusted):
                rows[s][k].update(p_holm=q, holm_family=sum(a is not None for a in adjusted))
        comparison = {"baseline": BASELINE, "test": PAIRED_TEST, "correction": HOLM, "metrics": list(COMPARED),
                      "rows": rows}

    points = [{"strategy": s, "seed": seed, FORGETTING: f.get(FORGETTING), **{k: f.get(k) for k in CORRELATED}}
              for s in strategies for seed, f in zip(seeds, flat[s]) if f]
    correlations = _correlations(points)

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
        "stores": _stores(strategies),
        "geometry_vs_forgetting": {"forgetting": FORGETTING, "measures": list(CORRELATED), "control": CONTROL,
                                   "points": points, **correlations},
        "within_strategy": {"drop": R1_DROP, "measures": list(CORRELATED),
                            "rows": {s: _within(s, analyses, seeds) for s in strategies}},
        "disorder_or_loss": {s: disorder.aggregate([a["strategies"][s].get("disorder_or_loss") if s in a["strategies"]
                                                    else None for a in analyses], seeds) for s in strategies},
        "settings": {"bootstrap_resamples": BOOTSTRAP_RESAMPLES, "bootstrap_seed": BOOTSTRAP_SEED,
                     "min_points": MIN_POINTS, "exact_below": EXACT_BELOW,
                     "min_clusters": MIN_CLUSTERS},
    }


def _n_note(n: int, seeds: int) -> str:
    """" (n = 2)" where a number rests on fewer seeds than the study has; "" otherwise."""
    return f" (n = {n})" if n < seeds else ""


def _mean_pm(key: str, h: dict | None) -> str:
    """mean ± CI half-width; "(all seeds equal)" where there is no spread; "(n = k)" where fewer seeds
    than the study's have the number (h["values"] holds one entry per seed)."""
    if not h or h["mean"] is None:
        return MISSING
    text = fmt(key, h["mean"]) + (f" ± {fmt(key, (h['ci'][1] - h['ci'][0]) / 2).lstrip('+')}" if h["ci"] else "")
    return text + (f" ({ALL_EQUAL})" if h.get("all_equal") else "") + _n_note(h["n"], len(h.get("values") or []))


def _signed(key: str, v) -> str:
    """A difference in `key`'s format, with its sign."""
    spec = METRIC_LABELS.get(key, (key, ".3f"))[1]
    return format_number(v, spec if spec.startswith("+") else "+" + spec)


def _difference(key: str, c: dict, seeds: int) -> str:
    """A paired comparison cell: mean difference, CI, raw and Holm-adjusted p, or "all seeds equal"."""
    text = _signed(key, c["mean_difference"])
    if c.get("all_equal"):
        text += f" ({ALL_EQUAL})"
    else:
        text += " [{}, {}]".format(*(_signed(key, v) for v in c["ci"])) if c["ci"] else ""
        text += f" p {c['p_value']:.2g}" if c["p_value"] is not None else ""
        text += f" (Holm {c['p_holm']:.2g})" if c.get("p_holm") is not None else ""
    return text + _n_note(c["n"], seeds)


def _rho(r: dict | None) -> str:
    """ρ [CI] p, or n/a with its reason."""
    if r is None:
        return MISSING
    if r["rho"] is None:
        return f"{MISSING} ({r['reason']})" if r.get("reason") else MISSING
    return (f"{r['rho']:+.2f}" + (" [{:+.2f}, {:+.2f}]".format(*r["ci"]) if r["ci"] else "")
            + (f" p {r['p_value']:.2g}" if r["p_value"] is not None else ""))


def summary(st: dict) -> str:
    """The console summary of a study: headline means ± CI half-widths, the paired comparison of Last
    and domain-0 R@1 against the baseline, and the Spearman correlations."""
    seeds = ", ".join(map(str, st["seeds"]))
    lines = [f"study of {len(st['seeds'])} seed(s) ({seeds}): {len(st['strategies'])} strategies, "
             f"{len(st['domains'])} probe sets, {st.get('seconds', 0):.1f} s" + (f"; {st['note']}" if st["note"] else "")]
    stores = st.get("stores") or {}
    for name in st["strategies"]:
        h = st["headline"][name]
        lines.append(f"  {name:<10} " + "  ".join(f"{label(k)} {_mean_pm(k, h.get(k))}" for k in SUMMARY_KEYS)
                     + f"  stores: {stores.get(name) or MISSING}")
        if f"novel.{SUMMARY_KEYS[0]}" in h:  # the same on the novel probe sets (captions held out of training)
            lines.append(f"  {'  novel':<10} " + "  ".join(f"{label(k)} {_mean_pm(k, h.get(f'novel.{k}'))}"
                                                          for k in SUMMARY_KEYS))
    cmp = st["comparison"]
    if cmp and len(st["seeds"]) > 1:
        for k in ("last", "domain0_r1", "weight_distance"):
            cells = [f"{name} {_difference(k, row[k], len(st['seeds']))}" for name, row in cmp["rows"].items()
                     if k in row and row[k]["mean_difference"] is not None]
            lines.append(f"  {label(k)} − {cmp['baseline']} (paired t-test; Holm across strategies): "
                         + ("; ".join(cells) or MISSING))
    g = st["geometry_vs_forgetting"]
    n = max((r["n"] for r in g["spearman"].values()), default=0)
    k = max((r["clusters"] for r in g["spearman"].values()), default=0)
    ci = (f"[cluster-bootstrap 95% CI over {k} strategies]" if k >= MIN_CLUSTERS else
          f"(no CI: {k} strategies, a cluster bootstrap needs {MIN_CLUSTERS})")
    lines.append(f"  Spearman ρ with {label(g['forgetting'])} over {n} (strategy, seed) points {ci} p; "
                 f"partial ρ given {label(g['control'])}; ρ over strategy means:")
    for m in g["measures"]:
        r = g["spearman"][m]
        lines.append(f"    {label(m):<24} {_rho(r)}" + _n_note(r["n"], n)
                     + (f"; partial {_rho(g['partial'][m])}" if m in g["partial"] else "")
                     + f"; means {_rho(g['strategy_means'][m])}")
    lines += [line for name in st["strategies"]
              if (line := disorder.summary_line(name, (st.get("disorder_or_loss") or {}).get(name)))]
    w = st.get("within_strategy")
    if w:
        lines.append(f"  within each strategy (seeds × checkpoints): Spearman ρ with {label(w['drop'])}")
        for name, row in w["rows"].items():
            nn = max((r["n"] for r in row.values()), default=0)
            lines.append(f"    {name:<10} n = {nn}: " + "; ".join(
                f"{label(m)} {MISSING if r['rho'] is None else format(r['rho'], '+.2f')}" for m, r in row.items()))
    return "\n".join(lines)
