"""python -m geomlab.tune CONFIG --out DIR: choose each strategy's strength on validation seeds.

The experiment file declares, before anything runs, the seeds to tune on (`tune.validation_seeds`),
the criterion (`tune.criterion`: the mean over those seeds of Last or Avg) and a grid per strategy
over its main knob (`[tune.grid.STRATEGY] KNOB = [values]`, the same number of points, at least
four, for every strategy in the grid). Every (seed, point) is one ordinary training run of that one
strategy, with the experiment's budget, under DIR/seedS/STRATEGY-KNOB=VALUE; the points of a seed
share that seed's base model, trained once with the seed's finetune run (DIR/seedS/finetune, the
table's reference row). A point is resumable like any run: a killed tune, run again, skips the
finished points and resumes the one it was in. The result: the tuning table (console,
DIR/tuning.md, DIR/report.html) and the tuned-values file (`--tuned-out`, default DIR/tuned.toml)
that a study names as `run.tuned` (docs/definitions.md, "Tuning").

`--strategies A,B` tunes those strategies of the grid only (the seed's reference run included), to
add strategies to a tuning: with a `--tuned-out` file that already exists, its other strategies'
values, scores and table rows are kept when its validation seeds, criterion and budget are this
tuning's (else refused), and the file says which tuning chose which strategies.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from geomlab import executor
from geomlab.config import CHOICES, RANGES, ConfigError, dumps, load_config, tomllib
from geomlab.io import WriteError, atomic_write_json, atomic_write_text
from geomlab.probe_kinds import SEEN_KIND, probe_kind
from geomlab.rundir import RunDir, RunDirError, config_differences, seed_dir

MIN_POINTS = 4
CRITERIA = {"last": "Last", "avg": "Avg"}  # tune.criterion -> the metric whose mean over seeds selects
COLUMNS = ("last", "avg", "domain0_r1", "last_domain_r1")  # the table's metrics, per point and seed
COLUMN_LABELS = {"last": "Last", "avg": "Avg", "domain0_r1": "domain-0 R@1", "last_domain_r1": "last-domain R@1"}
REFERENCE = "finetune"  # trained first on each seed, with the base model every point of that seed shares
TIE = 1e-12  # criterion means closer than this are a tie (R@1 values lie on a grid of 1/(2N))


class TuneError(ValueError):
    """A bad grid or tuning directory; the message names it."""


@dataclass(frozen=True)
class Point:
    strategy: str
    option: str
    value: float

    @property
    def label(self) -> str:
        return f"{self.strategy}-{self.option}={self.value:g}"


@dataclass
class Result:
    seed: int
    point: Point | None              # None: the seed's finetune reference run
    status: str = "pending"          # done | failed
    error: str = ""
    metrics: dict = field(default_factory=dict)


def grid_points(config: dict) -> list[Point]:
    """The grid of the config's [tune] section, checked: known strategies, each its main knob only,
    values in the option's range, the same number of points (at least MIN_POINTS) for every one."""
    from geomlab.strategies import STRATEGIES
    tune = config["tune"]
    if not tune["validation_seeds"]:
        raise TuneError("tune.validation_seeds is empty: name the seeds to tune on (never a seed a study reports)")
    if len(set(tune["validation_seeds"])) != len(tune["validation_seeds"]):
        raise TuneError(f"tune.validation_seeds {tune['validation_seeds']} names a seed twice")
    grid = tune["grid"]
    if not grid:
        raise TuneError("tune.grid is empty: add [tune.grid.STRATEGY] KNOB = [values] for each strategy to tune")
    points, sizes = [], {}
    for strategy, options in grid.items():
        if strategy not in STRATEGIES:
            raise TuneError(f"tune.grid.{strategy}: unknown strategy; valid: {', '.join(STRATEGIES)}")
        knob = STRATEGIES[strategy].knob
        if knob is None:
            raise TuneError(f"tune.grid.{strategy}: {strategy} has no strength knob to tune")
        if not isinstance(options, dict) or set(options) != {knob[0]}:
            raise TuneError(f"tune.grid.{strategy} must set exactly its main knob, {knob[0]} "
                            f"(got {sorted(options) if isinstance(options, dict) else options!r})")
        values = options[knob[0]]
        key = f"tune.grid.{strategy}.{knob[0]}"
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in values):
            raise TuneError(f"{key} must be a list of numbers, got {values!r}")
        if len(set(values)) != len(values):
            raise TuneError(f"{key} names a value twice: {values}")
        allowed = RANGES.get((strategy, knob[0]))
        for v in values:
            if allowed is not None and v not in allowed:
                raise TuneError(f"{key}: {v} is outside the option's range ({strategy}.{knob[0]} must be {allowed})")
        # an integer option (lora's rank) keeps integer values: its config key refuses a float
        cast = int if isinstance(config[strategy][knob[0]], int) else float
        if cast is int and any(v != int(v) for v in values):
            raise TuneError(f"{key} must be a list of integers, got {values!r}")
        sizes[strategy] = len(values)
        points += [Point(strategy, knob[0], cast(v)) for v in sorted(values)]
    if min(sizes.values()) < MIN_POINTS or len(set(sizes.values())) > 1:
        raise TuneError(f"tune.grid: every strategy gets the same number of points, at least {MIN_POINTS} "
                        f"(one budget for every method); got {', '.join(f'{s} {n}' for s, n in sizes.items())}")
    if tune["criterion"] not in CHOICES[("tune", "criterion")]:
        raise TuneError(f"tune.criterion must be one of {', '.join(CRITERIA)}")
    return points


def point_config(config: dict, seed: int, point: Point | None) -> dict:
    """The config of one run of the tuning: the experiment's, on `seed`, with one strategy."""
    one = copy.deepcopy(config)
    one["run"].update(seed=seed, seeds=[], tuned="", strategies=[point.strategy if point else REFERENCE])
    # Phase-end checkpoints are all a point is scored on; evaluating and saving changes nothing that
    # trains (eval mode, no gradient, no random draw), so the points train exactly as the study's runs.
    one["train"]["checkpoint_every"] = 0
    # Nor does a point need fine traces: they are the analyser's lead/lag series (geometry along a
    # phase), and writing them trains nothing differently (tests/test_fine_traces.py); at
    # train.trace_every = 10 they cost about a tenth of a point's time.
    one["train"]["trace_every"] = 0
    if point is not None:
        one[point.strategy][point.option] = point.value
    return one


def run_metrics(run: RunDir, strategy: str) -> dict:
    """Last, Avg, domain-0 and last-domain R@1 of a finished run, on the probe sets that measure
    data seen in training (ShapeWorld's "novel" probes are left out of the headline numbers, and
    calibration sets, never scored, out of everything)."""
    from geomlab.geometry.forgetting import continual_metrics, learned_at
    info = run.run_json()
    kinds = info.get("probe_kinds", {})
    probes = [p for p in info["probes"] if probe_kind(p, kinds) == SEEN_KIND]
    rows = {0: run.accuracy_rows("base")[0], **run.accuracy_rows(strategy)}
    A = [[rows[t][p] for p in probes] for t in sorted(rows)]
    learned = [learned_at(info["probe_phases"][p]) for p in probes]
    m = continual_metrics(A, learned)
    final, last_phase = A[-1], len(A) - 1

    def mean_at(t):
        cols = [final[i] for i, tp in enumerate(learned) if tp == t]
        return math.fsum(cols) / len(cols) if cols else None
    return {"last": m["last"], "avg": m["avg"], "domain0_r1": mean_at(0), "last_domain_r1": mean_at(last_phase)}


def finished(run: RunDir, strategy: str) -> bool:
    phases = run.run_json().get("phases")
    return bool(phases) and all(run.is_complete(strategy, p) for p in range(1, len(phases)))


def seed_point_dir(reference: RunDir, target: RunDir, config_text: str) -> None:
    """Give a new point's run directory its seed's base model: base/ linked from the reference run
    (nothing writes into a finished phase again) and a run.json that records it complete."""
    tmp = target.root.with_name(target.root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copytree(reference.strategy_path("base"), tmp / "base", copy_function=os.link)
    (tmp / "config.toml").write_text(config_text)
    atomic_write_json(tmp / "run.json", {"completed": {"base": [0]}})
    os.replace(tmp, target.root)  # all or nothing: a half-made point directory is never left


def train_point(run: RunDir, config: dict, log: Path) -> tuple[int, str]:
    """Train (or resume) one run in-process, its console output to `log`; (exit status, error line)."""
    from geomlab import train
    config_path = run.root / "config.toml"
    if not config_path.exists():
        run.root.mkdir(parents=True, exist_ok=True)
        config_path.write_text(dumps(config))
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        status = train.main(["--config", str(config_path), "--out", str(run.root), "--resume"])
    return status, executor.error_line(log.read_text(), status) if status else ""


def point_job(config: dict, out: str, reference: str, strategy: str, *, command: str, progress=None) -> int:
    """A grid point as a job of its own (--executor ray): its run directory made from the seed's
    base model when new (seed_point_dir), then its strategy trained (geomlab.train.run_job)."""
    from geomlab import train
    run = RunDir(out)
    if not run.root.exists():
        seed_point_dir(RunDir(reference), run, dumps(config))
    return train.run_job(config, out, strategy, command=command, progress=progress)


def tune_jobs(config: dict, root: Path, points: list[Point], command: str) -> list:
    """The jobs of a tuning (--executor ray), per validation seed: the reference run's base model,
    then its finetune phases and every grid point, side by side (each point's base is the seed's)."""
    from geomlab import train
    from geomlab.executor import Job
    jobs, root = [], root.resolve()  # (paths as every node names them)
    for seed in config["tune"]["validation_seeds"]:
        seed_root, name = root / seed_dir(seed), seed_dir(seed)
        reference, one = RunDir(seed_root / REFERENCE), point_config(config, seed, None)
        common = dict(config=one, out=str(reference.root), command=command)
        log = seed_root / f"{REFERENCE}.log"
        base = Job(f"{name}/base", train.run_job, {**common, "job": "base"}, log,
                   finished=reference.is_complete("base", 0))
        jobs += [base, Job(f"{name}/{REFERENCE}", train.run_job, {**common, "job": REFERENCE}, log,
                           after=(base.name,), finished=finished(reference, REFERENCE))]
        for p in points:
            run = RunDir(seed_root / p.label)
            jobs.append(Job(f"{name}/{p.label}", point_job,
                            dict(config=point_config(config, seed, p), out=str(run.root), reference=str(reference.root),
                                 strategy=p.strategy, command=command),
                            seed_root / f"{p.label}.log", after=(base.name,), finished=finished(run, p.strategy)))
    return jobs


def ray_results(config: dict, root: Path, points: list[Point], results: list[Result], options) -> int:
    """Train the tuning's runs as jobs (tune_jobs) and fill `results` from them; run_jobs' status."""
    jobs = tune_jobs(config, root, points, " ".join(sys.argv))
    status = executor.run_jobs(jobs, options, root, "geomlab.tune", "rerun the same command to continue")
    by_name = {j.name: j for j in jobs}
    for r in results:
        job = by_name[f"{seed_dir(r.seed)}/{REFERENCE if r.point is None else r.point.label}"]
        run = RunDir(Path(job.kwargs["out"]))
        if job.status == "done":
            r.status, r.metrics = "done", run_metrics(run, REFERENCE if r.point is None else r.point.strategy)
        else:
            base = by_name[job.after[0]]
            r.status = "failed"
            r.error = (job.error if base.status == "done" else base.error if r.point is None else
                       f"the seed's base model ({root / seed_dir(r.seed) / REFERENCE}) did not train")
    return status


def select(results: list[Result], points: list[Point], criterion: str) -> dict:
    """{strategy: {"option", "value", "score", "scores": {value: mean or None}}}: per strategy the value
    whose criterion, averaged over the validation seeds, is highest; a value with a failed seed has
    no mean and is never chosen; ties go to the weaker regulariser (the knob's direction)."""
    from geomlab.strategies import STRATEGIES
    chosen = {}
    for strategy in dict.fromkeys(p.strategy for p in points):
        option, direction = STRATEGIES[strategy].knob
        scores = {}
        for p in (p for p in points if p.strategy == strategy):
            rs = [r for r in results if r.point == p]
            ok = all(r.status == "done" and r.metrics.get(criterion) is not None
                     and math.isfinite(r.metrics[criterion]) for r in rs)
            scores[p.value] = math.fsum(r.metrics[criterion] for r in rs) / len(rs) if ok and rs else None
        valid = {v: s for v, s in scores.items() if s is not None}
        if not valid:
            chosen[strategy] = {"option": option, "value": None, "score": None, "scores": scores}
            continue
        best = max(valid.values())
        tied = [v for v, s in valid.items() if best - s <= TIE]
        value = min(tied) if direction > 0 else max(tied)  # the weaker regulariser
        chosen[strategy] = {"option": option, "value": value, "score": valid[value], "scores": scores}
    return chosen


def _f(v, spec=".3f") -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, spec)


def table_markdown(results: list[Result], chosen: dict, criterion: str, seeds: list[int]) -> str:
    head = ["strategy", "knob", "value", "seed", *(COLUMN_LABELS[c] for c in COLUMNS), "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        name, knob, value = ((REFERENCE, "–", "–") if r.point is None else
                             (r.point.strategy, r.point.option, f"{r.point.value:g}"))
        lines.append("| " + " | ".join([name, knob, value, str(r.seed), *(_f(r.metrics.get(c)) for c in COLUMNS),
                                        r.status if r.status == "done" else f"failed: {r.error}"]) + " |")
    sel = [f"| strategy | knob | value: mean {CRITERIA[criterion]} over seeds {', '.join(map(str, seeds))} | chosen |",
           "|---|---|---|---|"]
    for strategy, c in chosen.items():
        scores = ", ".join(f"{v:g}: {_f(s)}" for v, s in c["scores"].items())
        sel.append(f"| {strategy} | {c['option']} | {scores} | {'none' if c['value'] is None else format(c['value'], 'g')} |")
    return "\n".join(lines) + "\n\n" + "\n".join(sel) + "\n"


def console_table(results: list[Result], chosen: dict, criterion: str) -> str:
    lines = [f"{'point':28s} {'seed':>5s} " + " ".join(f"{COLUMN_LABELS[c]:>15s}" for c in COLUMNS)]
    for r in results:
        name = REFERENCE if r.point is None else r.point.label
        cells = " ".join(f"{_f(r.metrics.get(c)):>15s}" for c in COLUMNS) if r.status == "done" else f"failed: {r.error}"
        lines.append(f"{name:28s} {r.seed:>5d} {cells}")
    lines.append(f"chosen (highest mean {CRITERIA[criterion]} over the validation seeds; ties: the weaker regulariser):")
    for strategy, c in chosen.items():
        value = "none (every value failed)" if c["value"] is None else f"{c['value']:g} (mean {_f(c['score'])})"
        lines.append(f"  {strategy}.{c['option']} = {value}")
    return "\n".join(lines)


def only_strategies(points: list[Point], names: str | None) -> list[Point]:
    """The grid's points of the strategies `names` (comma-separated) names; all with None."""
    if names is None:
        return points
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    in_grid = list(dict.fromkeys(p.strategy for p in points))
    missing = [n for n in wanted if n not in in_grid]
    if not wanted or missing:
        raise TuneError(f"--strategies {names!r}: {', '.join(missing) or 'nothing'} not in the grid; "
                        f"the grid tunes {', '.join(in_grid)}")
    return [p for p in points if p.strategy in wanted]


#: what a tuned file's strategies must share for one file to hold them: the same question asked
KEPT_PROVENANCE = ("validation_seeds", "criterion", "budget")


def kept_from(path: Path, config: dict, points: list[Point]) -> dict | None:
    """The tuned file at `path` (None when there is none) to keep the strategies of that this tuning
    does not tune, checked to come from the same validation seeds, criterion and budget."""
    if not path.exists():
        return None
    try:
        old = tomllib.loads(path.read_text())
        provenance = old["provenance"]
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError) as e:
        raise TuneError(f"--tuned-out {path}: not a tuned-values file to add strategies to ({e})") from None
    new = tuned_provenance(config)
    for key in KEPT_PROVENANCE:
        if provenance.get(key) != new[key]:
            raise TuneError(f"--tuned-out {path} was tuned with another {key} ({provenance.get(key)!r}, this "
                            f"tuning {new[key]!r}); write to another file")
    tuned_now = {p.strategy for p in points}
    return {"values": {s: v for s, v in old.get("values", {}).items() if s not in tuned_now},
            "grid": {s: v for s, v in provenance.get("grid", {}).items() if s not in tuned_now},
            "scores": {s: v for s, v in provenance.get("scores", {}).items() if s not in tuned_now},
            # this tuning's reference rows stand for the earlier ones (the same runs: seeds and budget)
            "table": [r for r in old.get("table", []) if r.get("strategy") not in {*tuned_now, REFERENCE}],
            "tunings": provenance.get("tunings") or [{"written": provenance.get("written"),
                                                      "strategies": sorted(provenance.get("grid", {}))}]}


def tuned_provenance(config: dict) -> dict:
    tune = config["tune"]
    return {"validation_seeds": tune["validation_seeds"], "criterion": tune["criterion"],
            "budget": {k: config["train"][k] for k in ("base_steps", "steps", "epochs", "batch_size", "lr")}}


def tuned_file(config: dict, config_path: str, results: list[Result], chosen: dict, kept: dict | None = None) -> str:
    """The tuned-values file: the values, then their provenance and the whole tuning table; with
    `kept` (`kept_from`), the earlier file's other strategies too, and which tuning chose what."""
    import tomli_w
    tune = config["tune"]
    written = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    doc = {
        "values": {s: {c["option"]: c["value"]} for s, c in chosen.items() if c["value"] is not None},
        "provenance": {
            "experiment": config_path, "written": written,
            "validation_seeds": tune["validation_seeds"], "criterion": tune["criterion"],
            "criterion_text": f"the mean over the validation seeds of {CRITERIA[tune['criterion']]}; ties go to "
                              "the weaker regulariser",
            "budget": tuned_provenance(config)["budget"],
            "grid": {s: g for s, g in tune["grid"].items() if s in chosen},
            "scores": {s: {f"{v:g}": sc for v, sc in c["scores"].items() if sc is not None} for s, c in chosen.items()},
        },
        "table": [{"strategy": REFERENCE if r.point is None else r.point.strategy,
                   "option": "" if r.point is None else r.point.option,
                   "value": 0.0 if r.point is None else r.point.value, "seed": r.seed, "status": r.status,
                   **({"error": r.error} if r.error else {}),
                   **{c: r.metrics[c] for c in COLUMNS if r.metrics.get(c) is not None}} for r in results],
    }
    if kept is not None:
        doc["values"] = {**kept["values"], **doc["values"]}
        for key in ("grid", "scores"):
            doc["provenance"][key] = {**kept[key], **doc["provenance"][key]}
        doc["provenance"]["tunings"] = [*kept["tunings"], {"written": written, "strategies": sorted(chosen)}]
        doc["table"] = kept["table"] + doc["table"]
    return ("# Tuned values: written by python -m geomlab.tune; a study names this file as run.tuned.\n"
            "# [values] are applied over the experiment's options; [provenance] and [[table]] say how they were chosen.\n"
            + tomli_w.dumps(doc))


def check_tune_dir(root: Path, config: dict) -> None:
    """DIR is new, or holds this very tune (then it is resumed); another tune there is refused."""
    stored = root / "config.toml"
    if stored.exists():
        old = tomllib.loads(stored.read_text())
        new = tomllib.loads(dumps(config))
        diffs = config_differences(old, new)
        if diffs:
            raise TuneError(f"{root} holds another tuning (config key {diffs[0]!r} differs); "
                            "choose another --out, or rerun with the same config to resume it")
    elif root.exists() and any(p.name != "train.lock" for p in root.iterdir()):
        raise TuneError(f"{root} exists and is not a tuning directory; choose another --out")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m geomlab.tune", description=__doc__.splitlines()[0])
    p.add_argument("config", help="experiment TOML with a [tune] section")
    p.add_argument("--out", required=True, help="tuning directory (rerun with the same config to resume)")
    p.add_argument("--tuned-out", dest="tuned_out", help="where to write the tuned-values file (default OUT/tuned.toml)")
    p.add_argument("--strategies", help="tune only these strategies of the grid (comma-separated); an existing "
                                        "--tuned-out file keeps the values of the others")
    executor.add_options(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=100")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    root = Path(args.out)
    lock = None
    try:
        executor.check_options(args)
        if args.executor == "ray":
            executor.require_ray("geomlab.tune")
        # The values being tuned must not come from an earlier tuning: run.tuned is cleared.
        config = load_config(args.config, [*args.overrides, "run.tuned=''"])
        config["run"].update(seeds=[], tuned="")
        points = only_strategies(grid_points(config), args.strategies)
        tuned_out = Path(args.tuned_out) if args.tuned_out else root / "tuned.toml"
        kept = kept_from(tuned_out, config, points) if args.strategies else None
        check_tune_dir(root, config)
        lock = RunDir(root).lock()
        atomic_write_text(root / "config.toml", dumps(config))
    except (ConfigError, TuneError, RunDirError, WriteError) as e:
        if lock is not None:
            lock.release()
        print(f"geomlab.tune: error: {e}", file=sys.stderr)
        return 2
    from tqdm import tqdm
    seeds, criterion = config["tune"]["validation_seeds"], config["tune"]["criterion"]
    jobs = [Result(s, p) for s in seeds for p in (None, *points)]
    try:
        if args.executor == "ray":  # every reference part and point a job on a Ray cluster
            status = ray_results(config, root, points, jobs, executor.Options.of(args))
            if status in (2, 130):  # the cluster refused the study, or it was stopped (resumable)
                return status
        else:
            bar = tqdm(total=len(jobs), unit="run", dynamic_ncols=True, desc="tune")
            for job in jobs:
                seed_root = root / seed_dir(job.seed)
                reference = RunDir(seed_root / REFERENCE)
                run = RunDir(seed_root / (REFERENCE if job.point is None else job.point.label))
                strategy = REFERENCE if job.point is None else job.point.strategy
                bar.set_postfix_str(f"seed {job.seed} {'finetune' if job.point is None else job.point.label}")
                if not finished(run, strategy):
                    one = point_config(config, job.seed, job.point)
                    if job.point is not None and not run.root.exists():
                        if not finished(reference, REFERENCE):
                            job.status, job.error = "failed", f"the seed's base model ({reference.root}) did not train"
                            bar.update(1)
                            continue
                        seed_point_dir(reference, run, dumps(one))
                    status, job.error = train_point(run, one, run.root.parent / f"{run.root.name}.log")
                    if status == 130:  # Ctrl-C: the point saved its state; the tune stops, resumable
                        bar.close()
                        print(f"geomlab.tune: interrupted in {run.root}; rerun the same command to resume", file=sys.stderr)
                        return 130
                    if status:
                        job.status = "failed"
                        tqdm.write(f"{run.root}: failed: {job.error}", file=sys.stderr)
                        bar.update(1)
                        continue
                job.status, job.metrics = "done", run_metrics(run, strategy)
                bar.update(1)
            bar.close()
        chosen = select(jobs, points, criterion)
        markdown = table_markdown(jobs, chosen, criterion, seeds)
        atomic_write_text(root / "tuning.md", "# Tuning table\n\n" + markdown)
        atomic_write_text(tuned_out, tuned_file(config, args.config, jobs, chosen, kept))
        from geomlab.figures.tuning import write_tuning_report
        report = write_tuning_report(jobs, chosen, config, root / "report.html")
    except (RunDirError, WriteError) as e:
        print(f"geomlab.tune: error: {e}", file=sys.stderr)
        return 2
    finally:
        lock.release()
    print(console_table(jobs, chosen, criterion))
    print(f"tuned values: {tuned_out}\ntable: {root / 'tuning.md'}\nreport: {report}")
    return 0 if all(j.status == "done" for j in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
