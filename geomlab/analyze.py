"""python -m geomlab.analyze CKPT_DIR [CKPT_DIR ...]: the geometry of a run, one strategy, or a directory
of open_clip checkpoints; of a multi-seed run or several runs, a study across seeds.

Reads the probe-embedding traces; embeds checkpoints only where traces are missing (cached under
OUT/cache/); writes OUT/analysis.json (schema: docs/analysis_schema.md) and OUT/report.html, with
OUT = CKPT_DIR/analysis unless --out says otherwise. Never writes into CKPT_DIR's checkpoints.

A multi-seed run (`--seeds`), or several runs of one experiment given together, is a study: each seed's
run is analysed into OUT/seedS/, then aggregated across seeds (geomlab.study) into OUT/analysis.json
and OUT/report.html; OUT = the multi-seed run's analysis/ unless --out says otherwise (required with
several CKPT_DIRs).

From Python: `geomlab.analyze.analyze(CKPT_DIR, ...)` and `analyze_study([CKPT_DIR, ...], ...)` do the
same and return the analysis.json object.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from geomlab import disorder, kernels
from geomlab.data import CALIBRATION_KIND, NOVEL_KIND, probe_kind
from geomlab.embed import Embedder, Probes, check_probe_spec, load_traces
from geomlab.figures import headline_numbers, write_report
from geomlab.figures.summary import format_number as _fmt
from geomlab.geometry import (accuracy_matrix, continual_metrics, learned_at, metrics_from_ranks, modality_gap,
                              spatial_disorder)
from geomlab.geometry.checks import check_rows
from geomlab.geometry.forgetting import exact_mean
from geomlab.geometry.sphere import SPHERE_SAMPLES, SphereProjection
from geomlab.io import atomic_write_text
from geomlab.models import check_model_name
from geomlab.rundir import ANALYSIS, SeedRun, Source, discover, discover_seeds, is_multi_seed, seed_dir
from geomlab.runtime import DEVICES, cpu_workers, map_processes, map_threads, resolve_device, single_threaded
from geomlab.study import aggregate, summary
from geomlab.traces import read_trace
from geomlab.weights import WeightDistances

SCHEMA_VERSION = "geomlab.analysis/2"


class AnalyzeError(ValueError):
    """Bad input to the analyser; the message names it."""


def analyze(ckpt_dir, *, out=None, model: str | None = None, probe: str | None = None, device: str = "auto",
            exact_limit: int = 20_000, report: bool = True, quiet: bool = False, workers: int | None = None) -> dict:
    """Analyze CKPT_DIR (a run, one strategy's directory, or a directory of open_clip checkpoints) as
    `python -m geomlab.analyze` does: write OUT/analysis.json (and OUT/report.html unless
    `report=False`), OUT = `out` or CKPT_DIR/analysis, and return the analysis.json object.

    `model` is the open_clip architecture of plain checkpoints; `probe` the probe data to embed
    checkpoints without traces with ('shapes' or an experiment config .toml). Unless `quiet`, shows
    progress bars and prints a summary. `workers`: CPU threads for the measures (default: the cores
    this process may use, at most 4). Bad input raises a ValueError whose message names it
    (AnalyzeError; RunDirError for CKPT_DIR; EmbedError for probe data or a checkpoint that cannot
    be embedded; or an unreadable trace or checkpoint), and analysis.json is not written.
    """
    check_probe_spec(probe)
    if model is not None:
        try:
            check_model_name(model)
        except ValueError as e:
            raise AnalyzeError(f"--model: {e}") from None
    source = discover(ckpt_dir)
    out = Path(out) if out is not None else source.root / ANALYSIS
    for cks in source.series.values():
        for c in cks:
            if c.checkpoint is not None and out.resolve() == c.checkpoint.parent.resolve():
                raise AnalyzeError(f"--out {out} is a checkpoint directory; choose another")
    if device not in DEVICES:
        raise AnalyzeError(f"--device must be auto, cpu or cuda, got {device!r}")
    t0 = time.time()
    if source.ignored:
        print(f"left out of {source.root}: {'; '.join(source.ignored)}", file=sys.stderr)
    probes = Probes(probe, source.config_path)
    traces = load_traces(source, Embedder(out / "cache", probes, model, resolve_device(device)), quiet=quiet)
    result = _analysis(source, traces, captions=probes.captions(), exact_limit=exact_limit, quiet=quiet,
                       workers=cpu_workers() if workers is None else workers)
    distances = WeightDistances(out / "cache")  # from the .pt files, cached (geomlab.weights)
    for name, cks in source.series.items():
        result["strategies"][name]["weight_distance"] = distances.series(cks)
    distances.save()
    result["seconds"] = round(time.time() - t0, 2)
    report_path = _write(result, out, report)
    if not quiet:
        print_summary(result, out, report_path)
    return result


def _write(result: dict, out: Path, report: bool) -> Path | None:
    """OUT/analysis.json and (with `report`) OUT/report.html, each written atomically; the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "analysis.json", json.dumps(result, separators=(",", ":"), allow_nan=False) + "\n")
    report_path = write_report(result, out / "report.html") if report else None
    for p in (out / "analysis.json", report_path):
        if p is not None:
            p.chmod(0o644)
    return report_path


def analyze_study(ckpt_dirs, *, out=None, model: str | None = None, probe: str | None = None,
                  device: str = "auto", exact_limit: int = 20_000, report: bool = True, quiet: bool = False) -> dict:
    """Analyze a study as `python -m geomlab.analyze` does for a multi-seed run or several runs given
    together: each seed's run with `analyze` into OUT/seedS/, then the aggregate across seeds into
    OUT/analysis.json ("geomlab.study/1", docs/analysis_schema.md) and OUT/report.html; returns it.

    OUT = `out`, or the multi-seed run's analysis/ when `ckpt_dirs` is that one run. Runs whose
    configs differ in more than the seed, repeated seeds, or several CKPT_DIRs without `out` raise a
    ValueError naming them before anything is written."""
    ckpt_dirs = [Path(p) for p in ckpt_dirs]
    runs = discover_seeds(ckpt_dirs)
    if out is None and len(ckpt_dirs) > 1:
        raise AnalyzeError("--out is required with several CKPT_DIRs: where the study goes")
    out = Path(out) if out is not None else ckpt_dirs[0] / ANALYSIS
    t0 = time.time()
    # One seed's analysis per process (each on one thread): most of an analysis is many small tensor
    # operations that hold the GIL, so a second core helps only through a second process.
    one = functools.partial(_analyze_seed, out=out, model=model, probe=probe, device=device,
                            exact_limit=exact_limit, report=report)
    bar = tqdm(total=len(runs), desc="seeds", unit="seed", disable=quiet or None, file=sys.stderr)
    # (CUDA does not survive a fork: embedding on the GPU keeps the seeds in this process)
    workers = 1 if resolve_device(device).type == "cuda" else cpu_workers()
    analyses = map_processes(one, runs, workers, done=bar.update)
    bar.close()
    paths = {r.seed: f"{seed_dir(r.seed)}/analysis.json" for r in runs}
    result = _jsonable(aggregate(runs, analyses, sources=ckpt_dirs, paths=paths))
    result["seconds"] = round(time.time() - t0, 2)
    report_path = _write(result, out, report)
    if not quiet:
        print(summary(result))
        print(f"analysis: {out / 'analysis.json'}" + (f"\nreport: {report_path}" if report_path else ""))
    return result


def _analyze_seed(run: SeedRun, *, out: Path, **options) -> dict:
    """One seed's run of a study, analysed into OUT/seedS/ on one thread (a worker of analyze_study)."""
    return analyze(run.root, out=out / seed_dir(run.seed), quiet=True, workers=1, **options)


# ----------------------------------------------------------------------------- the analysis


_PLAIN = (str, int, bool, type(None))  # kept as they are (exact types: a subclass takes the long way)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        # A study's analysis holds millions of numbers, mostly in lists of plain floats (histograms,
        # series): those take the short way, with the same rule for NaN and inf as below.
        if all(type(v) is float for v in x):
            return [v if math.isfinite(v) else None for v in x]
        return [v if type(v) in _PLAIN else _jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        return _jsonable(x.item())
    return x


def _check_same_probe(tr_a, tr_b, domain, label_a, label_b):
    ea, eb = tr_a.domains[domain], tr_b.domains[domain]
    if ea.image.shape != eb.image.shape or ea.text.shape != eb.text.shape or not torch.equal(ea.ids, eb.ids):
        raise AnalyzeError(f"{label_a} and {label_b}: probe {domain!r} differs (image ids or sizes); "
                           "traces must embed the same probe set")


def _check_embeddings(source: Source, traces: dict, domains: list) -> None:
    """Refuse, naming the trace (or the checkpoint it was embedded from) and the probe set, embeddings
    with NaN, inf or zero rows (a diverged model): no measure turns them into a number."""
    paths = {c.key: c.trace or c.checkpoint for cks in source.series.values() for c in cks}
    for key, (tr, _) in traces.items():
        for d in domains:
            e = tr.domains[d]
            try:
                check_rows(f"{paths[key]}, probe set {d!r}", nonzero=True, image=e.image, text=e.text)
            except ValueError as err:
                raise AnalyzeError(str(err)) from None


def _analysis(source: Source, traces: dict, *, captions: dict, exact_limit: int, quiet: bool, workers: int) -> dict:
    """Every measure over every series of `source` (traces: key -> (Trace, how)); the analysis.json object.

    Runs with one BLAS/torch thread per worker on `workers` Python threads: on small shared
    machines that is far faster than letting OpenMP/OpenBLAS threads spin."""
    # Calibration sets are in the traces for realignment fits alone (docs/definitions.md, "Calibration
    # split"): every measure below, and so analysis.json's domains, covers the scored probe sets only,
    # which every trace must hold alike (calibration sets may differ: a run from before they existed,
    # resumed, has them in its later traces only).
    first = traces[next(iter(source.series.values()))[0].key][0]
    kind = dict(zip(first.domains, _kinds(source, list(first.domains), captions)))
    domains = [d for d in first.domains if kind[d] != CALIBRATION_KIND]
    kinds = [kind[d] for d in domains]
    for key, (tr, _) in traces.items():
        scored = [d for d, k in zip(tr.domains, _kinds(source, list(tr.domains), captions))
                  if k != CALIBRATION_KIND]
        if scored != domains:
            raise AnalyzeError(f"{key}: trace domains {scored} differ from {domains}")
    first = _scored_only(first, domains)

    pairs = []
    for cks in source.series.values():
        for k in range(1, len(cks)):
            for ref in (cks[0], cks[k - 1]):
                if (ref.key, cks[k].key) not in pairs:
                    pairs.append((ref.key, cks[k].key))
    for a, b in pairs:
        for d in domains:
            _check_same_probe(traces[a][0], traces[b][0], d, a, b)
    _check_embeddings(source, traces, domains)

    with single_threaded():
        ranks: dict = {}
        per_ckpt: dict = {}
        for key, (tr, _) in traces.items():
            per_ckpt[key] = {"retrieval": {}, "modality_gap": {}}
            for d in domains:
                e = tr.domains[d]
                r = kernels.retrieval_ranks(e.image.float(), e.text.float(), e.caption_image)
                ranks[key, d] = r
                per_ckpt[key]["retrieval"][d] = metrics_from_ranks(*r)
                per_ckpt[key]["modality_gap"][d] = modality_gap(e.image, e.text)

        tasks = [(a, b, d) for a, b in pairs for d in domains]
        bar = tqdm(total=len(tasks), desc="spatial disorder", unit="pair", disable=quiet or None, file=sys.stderr)

        def one(task):
            a, b, d = task
            res = spatial_disorder(traces[a][0].domains[d], traces[b][0].domains[d], exact_limit=exact_limit,
                                   ranks_a=ranks[a, d], ranks_b=ranks[b, d], workers=1)
            bar.update()
            return res

        done: dict = {}
        for (a, b, d), res in zip(tasks, map_threads(one, tasks, workers)):
            done.setdefault((a, b), {})[d] = res
        bar.close()

        sphere = SphereProjection.fit(first)
        learned, evaluations = _learned(source, domains), source.evaluations()
        series = {name: _series(source, cks, traces, per_ckpt, done, sphere, domains, learned, evaluations, kinds)
                  for name, cks in source.series.items()}
        _disorder_or_loss(source, traces, series, domains, learned, kinds, quiet)

    seed = source.run_info.get("seed")
    return _jsonable({
        "schema": SCHEMA_VERSION,
        "source": {"path": str(source.root), "kind": source.kind, "run": source.run_info},
        "domains": domains,
        "model": first.model,
        "strategies": series,
        "sphere": {"fit_at": next(iter(source.series.values()))[0].label,
                   "explained_variance": sphere.explained_variance,
                   "samples": sphere.samples(first, captions)},
        "settings": {"topology_exact_limit": exact_limit, "mutual_knn_k": 10, "sphere_samples": SPHERE_SAMPLES},
        # the same numbers as a study's, over this run's one seed (no CIs, no forecast test)
        "disorder_or_loss": {name: disorder.aggregate([s.get("disorder_or_loss")], [seed]) for name, s in series.items()},
    })


def _disorder_or_loss(source: Source, traces: dict, series: dict, domains: list, learned: list | None,
                      kinds: list, quiet: bool) -> None:
    """Each series' "disorder_or_loss" entry (geomlab.disorder): realignment at its phase ends, and the
    geometry along its fine traces; None where the run has neither calibration splits nor fine traces."""
    run = source.run()
    cache: dict = {}

    def read(path):
        if path not in cache:
            cache[path] = read_trace(path)
        return cache[path]

    for name, cks in tqdm(source.series.items(), desc="disorder or loss", unit="series", disable=quiet or None,
                          file=sys.stderr):
        entry = series[name]
        rows = entry["accuracy"]["row_checkpoints"]
        at = entry["accuracy"]["learned_at"]
        realigned = disorder.realignment_rows(cks, traces, domains, kinds, at, rows)
        fine = disorder.fine_series(run, cks[-1].strategy_dir, domains, kinds, at, read) if run else None
        entry["disorder_or_loss"] = ({"realignment": realigned, "series": fine} if realigned or fine else None)


def _learned(source: Source, domains: list) -> list | None:
    """t_p of each probe set, from run.json's probe_phases; None (no mapping, nothing guessed) for a
    plain directory of checkpoints, or a run whose run.json does not map every probe set."""
    phases = source.run_info.get("probe_phases")
    if source.kind == "checkpoints" or not isinstance(phases, dict) or not set(domains) <= set(phases):
        return None
    return [learned_at(phases[d]) for d in domains]


def _probes_learned_at(A, domains: list, learned: list | None, t: int) -> dict | None:
    """{"probes": the probe sets learned at phase t, "r1": their mean final-row R@1}; None when none is."""
    cols = [p for p, tp in enumerate(learned or []) if tp == t]
    return {"probes": [domains[p] for p in cols], "r1": exact_mean(A[-1, cols].tolist())} if cols else None


def _kinds(source: Source, domains: list, probes: dict) -> list:
    """Each probe set's kind, "seen", "novel" (its captions held out of training) or "calibration":
    from run.json's probe_kinds, else from the probe sets known (`--probe`, the run's config), else
    by its name (geomlab.data.probe_kind: a calibration set's name ends in "/calibration")."""
    kinds = source.run_info.get("probe_kinds")
    kinds = kinds if isinstance(kinds, dict) else {n: p.kind for n, p in probes.items() if hasattr(p, "kind")}
    return [probe_kind(d, kinds) for d in domains]


def _scored_only(trace, domains: list):
    """`trace` with only the probe sets `domains` (the sphere view is fitted on them alone)."""
    return dataclasses.replace(trace, domains={d: trace.domains[d] for d in domains})


def _metrics_on(A, domains: list, learned: list | None, cols: list, T: int) -> dict:
    """Last, Avg, BWT, Transfer, forgetting, mean forgetting, "domain0" and "last_domain" of the
    probe sets `cols` alone (columns of A)."""
    names, sub = [domains[p] for p in cols], None if learned is None else [learned[p] for p in cols]
    return {**continual_metrics(A[:, cols], sub), "domain0": _probes_learned_at(A[:, cols], names, sub, 0),
            "last_domain": _probes_learned_at(A[:, cols], names, sub, T)}


def _series(source: Source, cks: list, traces: dict, per_ckpt: dict, done: dict, sphere: SphereProjection,
            domains: list, learned: list | None, evaluations: dict, kinds: list | None = None) -> dict:
    """One strategy's entry of analysis.json: its checkpoints, per-checkpoint measures, pairs, accuracy
    and the trainer's zero-shot accuracies."""
    entry = {"checkpoints": [], "retrieval": [], "modality_gap": [], "vs_base": [None], "vs_previous": [None],
             "sphere": []}
    for k, c in enumerate(cks):
        entry["checkpoints"].append({"label": c.label, "stem": c.stem, "strategy_dir": c.strategy_dir,
                                     "phase": c.phase, "step": c.step, "phase_end": c.phase_end,
                                     "source": traces[c.key][1], "path": str(c.trace or c.checkpoint)})
        entry["retrieval"].append(per_ckpt[c.key]["retrieval"])
        entry["modality_gap"].append(per_ckpt[c.key]["modality_gap"])
        if k:
            entry["vs_base"].append(done[cks[0].key, c.key])
            entry["vs_previous"].append(done[cks[k - 1].key, c.key])
        entry["sphere"].append(sphere.points(traces[c.key][0]))
    if source.kind == "checkpoints":
        rows = list(range(len(cks)))
    else:
        rows = [0] + [k for k, c in enumerate(cks) if k and c.phase_end]
    A = accuracy_matrix([per_ckpt[cks[k].key]["retrieval"] for k in rows], domains)
    # the mapping speaks of phases: it applies when row t is the end of phase t
    if [cks[k].phase for k in rows] != list(range(len(rows))):
        learned = None
    # the headline metrics on the seen probe sets; the same on the novel ones (captions held out of
    # training, docs/definitions.md "Held-out combinations") under "novel"; forgetting: every probe set
    novel = [p for p, k in enumerate(kinds or []) if k == NOVEL_KIND]
    seen = [p for p in range(len(domains)) if p not in novel] or list(range(len(domains)))
    entry["accuracy"] = {
        "rows": [cks[k].label for k in rows], "row_checkpoints": rows, "domains": domains, "matrix": A,
        "learned_at": learned, **_metrics_on(A, domains, learned, seen, len(rows) - 1),
    }
    entry["accuracy"]["forgetting"] = continual_metrics(A, learned)["forgetting"]
    if novel:
        m = _metrics_on(A, domains, learned, novel, len(rows) - 1)
        del m["forgetting"]
        entry["accuracy"]["novel"] = {"probes": [domains[p] for p in novel], **m}
    entry["zeroshot"] = [evaluations.get(c.key, {}).get("zeroshot") for c in cks]
    return entry


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m geomlab.analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt_dirs", nargs="+", metavar="CKPT_DIR",
                   help="a geomlab run, one strategy's directory, or a directory of open_clip checkpoints; "
                        "a multi-seed run or several runs of one experiment: a study across seeds")
    p.add_argument("--out", help="output directory (default CKPT_DIR/analysis; required with several CKPT_DIRs)")
    p.add_argument("--model", help="open_clip architecture of plain checkpoints (e.g. geomlab-tiny, ViT-B-32)")
    p.add_argument("--probe", help="probe data to embed with: 'shapes' or an experiment config .toml")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (for embedding checkpoints)")
    p.add_argument("--exact-limit", type=int, default=20_000, help="largest N for exact topology drift")
    p.add_argument("--no-report", action="store_true", help="write analysis.json only")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def print_summary(result: dict, out: Path, report: Path | None) -> None:
    src = result["source"]
    print(f"analysed {src['kind']} {src['path']}: {len(result['strategies'])} series, "
          f"{len(result['domains'])} probe sets, {result.get('seconds', 0):.1f} s")
    for name, h in headline_numbers(result).items():
        line = (f"  {name:<12} Last {_fmt(h['last'])}  Avg {_fmt(h['avg'])}  BWT {_fmt(h['bwt'], '+.3f')}"
                f"  forgetting {_fmt(h['mean_forgetting'])}  Transfer {_fmt(h['transfer'])}")
        g = h["vs_base"]
        if g:
            line += (f"  | {h['geometry_probe']} vs base: θ img {_fmt(g['rotation_image'], '.1f')}° txt "
                     f"{_fmt(g['rotation_text'], '.1f')}°  rigid {_fmt(g['rigid_share_image'], '.2f')}"
                     f"  desync {_fmt(g['desync'], '.1f')}°"
                     f"  AUC(Δφ→forgot) {_fmt(g['auc_alignment_drift'], '.2f')}")
        print(line)
        n = h.get("novel")
        if n:  # the same on the novel probe sets (captions held out of training)
            print(f"  {'  novel':<12} Last {_fmt(n['last'])}  Avg {_fmt(n['avg'])}  BWT {_fmt(n['bwt'], '+.3f')}"
                  f"  forgetting {_fmt(n['mean_forgetting'])}  Transfer {_fmt(n['transfer'])}"
                  f"  domain-0 R@1 {_fmt(n['domain0_r1'])} (seen {_fmt(h['domain0_r1'])})")
    for name, d in (result.get("disorder_or_loss") or {}).items():
        line = disorder.summary_line(name, d)
        if line:
            print(line)
    if src["kind"] != "checkpoints" and any(a.get("accuracy", {}).get("learned_at") is None
                                            for a in result["strategies"].values()):
        print("  (Avg, BWT, forgetting, Transfer: n/a because no probe set is mapped to the phase that learns "
              "it: give each probe source measures = [\"TRAIN SOURCE\"], docs/definitions.md, \"Accuracy matrix\")")
    print(f"analysis: {out / 'analysis.json'}")
    if report is not None:
        print(f"report: {report}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    options = dict(out=args.out, model=args.model, probe=args.probe, device=args.device,
                   exact_limit=args.exact_limit, report=not args.no_report, quiet=args.quiet)
    try:
        if len(args.ckpt_dirs) > 1 or is_multi_seed(args.ckpt_dirs[0]):
            analyze_study(args.ckpt_dirs, **options)
        else:
            analyze(args.ckpt_dirs[0], **options)
    except (ValueError, FileNotFoundError) as e:  # bad input; an unreadable trace or checkpoint names the file
        print(f"geomlab.analyze: error: {e}", file=sys.stderr)
        return 2
    if args.quiet and not args.no_report:  # -q hides progress and the summary, never where the result is
        print(f"report: {(Path(args.out) if args.out else Path(args.ckpt_dirs[0]) / ANALYSIS) / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
