"""python -m geomlab.analyze CKPT_DIR: the geometry of a run, one strategy, or a directory of open_clip
checkpoints (SPEC §2, §5.2, §5.3).

Reads the probe-embedding traces; embeds checkpoints only where traces are missing (cached under
OUT/cache/); writes OUT/analysis.json (schema: docs/analysis_schema.md) and OUT/report.html, with
OUT = CKPT_DIR/analysis unless --out says otherwise. Never writes into CKPT_DIR's checkpoints.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SCHEMA_VERSION = "geomlab.analysis/1"
SPHERE_SAMPLES = 100  # probe pairs per domain shown in the 3-D view


class AnalyzeError(ValueError):
    """Bad input to the analyser; the message names it."""


@dataclass
class Checkpoint:
    stem: str                  # file stem, e.g. phase1_step000200 or epoch_3
    owner: str                 # directory it lives in: base, a strategy, or the plain directory's name
    phase: int | None
    step: int | None
    phase_end: bool
    checkpoint: Path | None    # .pt file, when present
    trace: Path | None         # .safetensors trace, when present

    @property
    def label(self) -> str:
        return f"{self.owner}/{self.stem}" if self.owner == "base" else self.stem

    @property
    def key(self) -> str:
        return f"{self.owner}/{self.stem}"


@dataclass
class Source:
    kind: str                  # run | strategy | checkpoints
    root: Path
    series: dict               # name -> list[Checkpoint] (first = the base phase-0 end checkpoint for runs)
    run_info: dict
    config_path: Path | None


_STEM = re.compile(r"^phase(\d+)_step(\d+)$")


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _stems(d: Path) -> dict[str, Checkpoint]:
    found: dict[str, Checkpoint] = {}
    for sub, suffix, field in (("checkpoints", ".pt", "checkpoint"), ("traces", ".safetensors", "trace")):
        for path in sorted((d / sub).glob(f"*{suffix}")) if (d / sub).is_dir() else []:
            m = _STEM.match(path.name[: -len(suffix)])
            if not m:
                continue
            stem = path.name[: -len(suffix)]
            c = found.setdefault(stem, Checkpoint(stem, d.name, int(m[1]), int(m[2]), False, None, None))
            setattr(c, field, path)
    return found


def _ordered(d: Path, completed: list | None) -> list[Checkpoint]:
    """A run subdirectory's checkpoints by (phase, step); the last of each phase is its end (when
    run.json lists the phase as completed, or when there is no run.json)."""
    cks = sorted(_stems(d).values(), key=lambda c: (c.phase, c.step))
    for i, c in enumerate(cks):
        last = i + 1 == len(cks) or cks[i + 1].phase != c.phase
        c.phase_end = last and (completed is None or c.phase in completed)
    return cks


def _is_run_subdir(d: Path) -> bool:
    return d.is_dir() and ((d / "checkpoints").is_dir() or (d / "traces").is_dir())


def discover(root: Path) -> Source:
    """Which of the three kinds of CKPT_DIR `root` is, and its checkpoints in order."""
    root = Path(root)
    if not root.exists():
        raise AnalyzeError(f"CKPT_DIR {root} does not exist")
    if not root.is_dir():
        raise AnalyzeError(f"CKPT_DIR {root} is not a directory")
    if (root / "run.json").is_file() or _is_run_subdir(root / "base"):
        run_info = _read_json(root / "run.json")
        completed = run_info.get("completed") if run_info else None
        base = _ordered(root / "base", None if completed is None else completed.get("base", []))
        base_end = [c for c in base if c.phase == 0 and c.phase_end]
        if not base_end:
            raise AnalyzeError(f"{root}: no phase-0 end checkpoint or trace in {root / 'base'}")
        names = run_info.get("strategies") or sorted(p.name for p in root.iterdir()
                                                     if p.name not in ("base", "analysis") and _is_run_subdir(p))
        series = {}
        for name in names:
            d = root / name
            if not _is_run_subdir(d):
                continue
            own = _ordered(d, None if completed is None else completed.get(name, []))
            if own:
                series[name] = [base_end[-1]] + own
        if not series:
            series["base"] = base
        cfg = root / "config.toml"
        return Source("run", root, series, run_info, cfg if cfg.is_file() else None)
    if _is_run_subdir(root):
        parent = root.parent
        run_info = _read_json(parent / "run.json")
        completed = run_info.get("completed") if run_info else None
        own = _ordered(root, None if completed is None else completed.get(root.name, []))
        if not own:
            raise AnalyzeError(f"{root}: no checkpoints or traces in {root / 'checkpoints'} or {root / 'traces'}")
        cks = own
        if root.name != "base" and _is_run_subdir(parent / "base"):
            base = [c for c in _ordered(parent / "base", None if completed is None else completed.get("base", []))
                    if c.phase == 0 and c.phase_end]
            cks = base[-1:] + own
        cfg = parent / "config.toml"
        return Source("strategy", root, {root.name: cks}, run_info, cfg if cfg.is_file() else None)
    files = sorted((p for p in root.iterdir() if p.suffix == ".pt" and p.is_file()), key=lambda p: _natural_key(p.name))
    if not files:
        raise AnalyzeError(f"{root}: no checkpoints (*.pt files, checkpoints/ or a geomlab run) found")
    name = root.resolve().name or "checkpoints"
    cks = []
    for i, p in enumerate(files):
        m = re.search(r"(\d+)", p.stem)
        cks.append(Checkpoint(p.stem, name, None, int(m[1]) if m else i, True, p, None))
    return Source("checkpoints", root, {name: cks}, {}, None)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnalyzeError(f"{path}: not readable JSON ({e})") from None


# ---------------------------------------------------------------------------------------------
# probes and embedding


def check_probe_spec(spec: str | None) -> None:
    if spec is None or spec == "shapes":
        return
    p = Path(spec)
    if p.suffix != ".toml" or not p.is_file():
        raise AnalyzeError(f"--probe {spec!r}: expected 'shapes' or the path of an experiment config (.toml)")


_PROBES: dict = {}


def load_probes(spec: str, image_size: int) -> list:
    """The probe sets named by --probe: 'shapes' (every ShapeWorld probe split) or an experiment config."""
    check_probe_spec(spec)
    key = (str(spec), int(image_size))
    if key not in _PROBES:
        _PROBES[key] = _load_probes(spec, image_size)
    return _PROBES[key]


def _load_probes(spec: str, image_size: int) -> list:
    if spec == "shapes":
        from geomlab.data import shapes
        return shapes.probe_sets(seed=0, image_size=image_size, probe_size=200, domains=5)
    from geomlab.config import load_config
    from geomlab.data import build_stream
    try:
        cfg = load_config(spec)
        return build_stream(cfg["data"]["stream"], cfg["data"], image_size=image_size, preprocess=None,
                            seed=cfg["run"]["seed"]).probes
    except (ValueError, KeyError, OSError) as e:
        raise AnalyzeError(f"--probe {spec}: {e}") from None


class Embedder:
    """Embeds checkpoints whose traces are missing; results are cached as traces under `cache_dir`."""

    def __init__(self, cache_dir: Path, model: str | None, probe: str | None, config_path: Path | None, device: str):
        self.cache_dir, self.model_name, self.probe, self.config_path = cache_dir, model, probe, config_path
        self.device = device
        self._models: dict = {}
        self._probes: dict = {}

    def _probe_sets(self, image_size: int):
        key = image_size
        if key not in self._probes:
            if self.probe is not None:
                self._probes[key] = load_probes(self.probe, image_size)
            elif self.config_path is not None:
                self._probes[key] = load_probes(str(self.config_path), image_size)
            else:
                raise AnalyzeError("traces are missing and no probe data is known: pass --probe shapes or --probe CONFIG.toml")
        return self._probes[key]

    def cache_path(self, c: Checkpoint) -> Path:
        return self.cache_dir / "traces" / c.owner / f"{c.stem}.safetensors"

    def _fingerprint(self, c: Checkpoint, model: str) -> dict:
        st = c.checkpoint.stat()
        return {"source": str(c.checkpoint.resolve()), "size": str(st.st_size), "mtime_ns": str(st.st_mtime_ns),
                "probe": str(self.probe or self.config_path), "embedded_model": model}

    def cached(self, c: Checkpoint, model: str | None):
        from geomlab.traces import read_trace
        path = self.cache_path(c)
        if not path.is_file() or c.checkpoint is None:
            return None
        try:
            trace = read_trace(path)
        except ValueError:
            return None
        fp = self._fingerprint(c, model or trace.model)
        return trace if all(trace.extra.get(k) == v for k, v in fp.items()) else None

    def embed(self, c: Checkpoint, ckpt: dict):
        from geomlab.embed import embed_probe
        from geomlab.models import create_model, image_size, state_dict_of
        from geomlab.traces import Trace, read_trace, write_trace

        name = self.model_name or (ckpt.get("name") if c.owner != "checkpoints" and c.phase is not None else None)
        if not name:
            raise AnalyzeError(f"{c.checkpoint}: which architecture? pass --model NAME")
        if name not in self._models:
            try:
                self._models[name] = create_model(name, device=self.device)
            except ValueError as e:
                raise AnalyzeError(f"--model: {e}") from None
        model, tokenizer = self._models[name]
        sd = state_dict_of(ckpt)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise AnalyzeError(f"{c.checkpoint}: weights do not fit model {name!r} ({first})") from None
        probes = self._probe_sets(image_size(model))
        domains = {p.name: embed_probe(model, tokenizer, p, self.device) for p in probes}
        trace = Trace(domains=domains, phase=c.phase if c.phase is not None else 0, step=c.step or 0, model=name,
                      extra=self._fingerprint(c, name))
        write_trace(self.cache_path(c), trace)
        return read_trace(self.cache_path(c))  # float16, exactly what a later run reads from the cache

    def captions(self, image_size: int = 32):
        try:
            return {p.name: p for p in self._probe_sets(image_size)}
        except Exception:  # noqa: BLE001 - captions are a nicety for hover text
            return {}


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_traces(source: Source, embedder: Embedder, quiet: bool = False) -> dict:
    """key -> (Trace, how) for every checkpoint of every series; how = trace | cache | embedded."""
    from tqdm import tqdm

    from geomlab.io import load_checkpoint
    from geomlab.traces import read_trace

    out: dict = {}
    todo = []
    for cks in source.series.values():
        for c in cks:
            if c.key in out or c in todo:
                continue
            if c.trace is not None:
                out[c.key] = (read_trace(c.trace), "trace")
            else:
                todo.append(c)
    if todo and embedder.model_name is None and source.kind == "checkpoints":
        raise AnalyzeError(f"{source.root}: a directory of open_clip checkpoints needs --model NAME (and --probe)")
    if todo and embedder.probe is None and embedder.config_path is None:
        raise AnalyzeError(f"{source.root}: {len(todo)} checkpoint(s) have no trace; pass --probe shapes or "
                           "--probe CONFIG.toml to embed them")
    bar = tqdm(todo, desc="embedding checkpoints", unit="ckpt", disable=quiet or not todo, file=sys.stderr)
    for c in bar:
        trace = embedder.cached(c, embedder.model_name)
        if trace is not None:
            out[c.key] = (trace, "cache")
            continue
        out[c.key] = (embedder.embed(c, load_checkpoint(c.checkpoint)), "embedded")
    return out


# ---------------------------------------------------------------------------------------------
# the analysis


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
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
        raise AnalyzeError(f"{label_a} and {label_b}: probe {domain!r} differs (sample ids or sizes); "
                           "traces must embed the same probe set")


def analyse(source: Source, traces: dict, *, captions: dict | None = None, exact_limit: int = 20_000,
            quiet: bool = False, backend: str = "auto", workers: int | None = None) -> dict:
    """Everything of SPEC §5.2 and §5.3 over every series of `source`; the analysis.json object.

    Runs with one BLAS/torch thread per worker (`workers` Python threads, default the usable cores):
    on small shared machines that is far faster than letting OpenMP/OpenBLAS threads spin."""
    from threadpoolctl import threadpool_limits

    from geomlab.geometry.measures import single_threaded_torch

    with threadpool_limits(1), single_threaded_torch():
        return _analyse(source, traces, captions=captions, exact_limit=exact_limit, quiet=quiet, backend=backend,
                        workers=workers)


def _analyse(source, traces, *, captions, exact_limit, quiet, backend, workers) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from geomlab.geometry.measures import default_workers

    from geomlab import kernels
    from geomlab.geometry import (accuracy_matrix, average_accuracy, bwt, forgetting, metrics_from_ranks,
                                  modality_gap, spatial_disorder)

    first = traces[next(iter(source.series.values()))[0].key][0]
    domains = list(first.domains)
    for key, (tr, _) in traces.items():
        if list(tr.domains) != domains:
            raise AnalyzeError(f"{key}: trace domains {list(tr.domains)} differ from {domains}")

    ranks: dict = {}
    per_ckpt: dict = {}
    for key, (tr, _) in traces.items():
        per_ckpt[key] = {"retrieval": {}, "modality_gap": {}}
        for d in domains:
            e = tr.domains[d]
            r = kernels.retrieval_ranks(e.image.float(), e.text.float(), e.caption_image, backend=backend)
            ranks[key, d] = r
            per_ckpt[key]["retrieval"][d] = metrics_from_ranks(*r)
            per_ckpt[key]["modality_gap"][d] = modality_gap(e.image, e.text)

    pairs = []
    for cks in source.series.values():
        for k in range(1, len(cks)):
            for ref in (cks[0], cks[k - 1]):
                if (ref.key, cks[k].key) not in pairs:
                    pairs.append((ref.key, cks[k].key))
    done: dict = {}
    for a, b in pairs:
        for d in domains:
            _check_same_probe(traces[a][0], traces[b][0], d, a, b)
    tasks = [(a, b, d) for a, b in pairs for d in domains]

    def one(task):
        a, b, d = task
        return task, spatial_disorder(traces[a][0].domains[d], traces[b][0].domains[d], exact_limit=exact_limit,
                                      ranks_a=ranks[a, d], ranks_b=ranks[b, d], backend=backend, workers=1)

    # (pair, domain) tasks on `workers` Python threads with one torch thread each: torch releases the
    # GIL, and on shared cores this beats OpenMP threads fighting each other by a wide margin.
    workers = default_workers() if workers is None else max(1, int(workers))
    bar = tqdm(total=len(tasks), desc="spatial disorder", unit="pair", disable=quiet or None, file=sys.stderr)
    with ThreadPoolExecutor(workers) as pool:
        for (a, b, d), res in pool.map(one, tasks):
            done.setdefault((a, b), {})[d] = res
            bar.update()
    bar.close()

    sphere_basis = _sphere_basis(first, domains)
    series = {}
    for name, cks in source.series.items():
        entry = {"checkpoints": [], "retrieval": [], "modality_gap": [], "vs_base": [None], "vs_previous": [None],
                 "sphere": []}
        for k, c in enumerate(cks):
            entry["checkpoints"].append({"label": c.label, "stem": c.stem, "owner": c.owner, "phase": c.phase,
                                         "step": c.step, "phase_end": c.phase_end, "source": traces[c.key][1],
                                         "path": str(c.trace or c.checkpoint)})
            entry["retrieval"].append(per_ckpt[c.key]["retrieval"])
            entry["modality_gap"].append(per_ckpt[c.key]["modality_gap"])
            if k:
                entry["vs_base"].append(done[cks[0].key, c.key])
                entry["vs_previous"].append(done[cks[k - 1].key, c.key])
            entry["sphere"].append(_sphere_points(traces[c.key][0], domains, sphere_basis))
        if source.kind == "checkpoints":
            rows = list(range(len(cks)))
        else:
            rows = [0] + [k for k, c in enumerate(cks) if k and c.phase_end]
        A = accuracy_matrix([per_ckpt[cks[k].key]["retrieval"] for k in rows], domains)
        f = forgetting(A)
        T = A.shape[0] - 1
        entry["accuracy"] = {
            "rows": [cks[k].label for k in rows], "row_checkpoints": rows, "domains": domains, "matrix": A,
            "average": average_accuracy(A), "forgetting": f,
            "mean_forgetting": float(f[:min(T, len(domains))].mean()) if T >= 1 and min(T, len(domains)) else float("nan"),
            "bwt": bwt(A) if source.kind != "checkpoints" else float("nan"),
        }
        series[name] = entry

    return _jsonable({
        "schema": SCHEMA_VERSION,
        "source": {"path": str(source.root), "kind": source.kind, "run": source.run_info},
        "domains": domains,
        "model": first.model,
        "strategies": series,
        "sphere": {"fit_at": next(iter(source.series.values()))[0].label,
                   "explained_variance": sphere_basis["explained"],
                   "samples": _sphere_samples(first, domains, sphere_basis, captions or {})},
        "settings": {"topology_exact_limit": exact_limit, "mutual_knn_k": 10, "sphere_samples": SPHERE_SAMPLES},
    })


def _sphere_basis(trace, domains) -> dict:
    """PCA (sklearn, 3 components) fitted on the first checkpoint's image and text embeddings."""
    from sklearn.decomposition import PCA

    rows, picks = [], {}
    for d in domains:
        e = trace.domains[d]
        n = e.image.shape[0]
        idx = torch.linspace(0, n - 1, min(n, SPHERE_SAMPLES)).round().long().unique()
        ci = e.caption_image if e.caption_image is not None else torch.arange(e.text.shape[0])
        first_caption = torch.full((n,), -1, dtype=torch.long)
        order = torch.arange(ci.numel() - 1, -1, -1)
        first_caption[ci[order]] = order  # the first caption of each image
        picks[d] = (idx, first_caption[idx])
        rows += [e.image.float(), e.text.float()]
    x = torch.cat(rows).numpy()
    pca = PCA(n_components=min(3, x.shape[1], x.shape[0])).fit(x)
    return {"pca": pca, "picks": picks, "explained": [float(v) for v in pca.explained_variance_ratio_]}


def _sphere_points(trace, domains, basis) -> dict:
    import numpy as np
    out = {}
    for d in domains:
        e = trace.domains[d]
        idx, cap = basis["picks"][d]
        pts = {}
        for mod, x in (("image", e.image[idx]), ("text", e.text[cap.clamp(min=0)])):
            pca = basis["pca"]
            p = (x.double().numpy() - pca.mean_) @ pca.components_.T
            if p.shape[1] < 3:
                p = np.pad(p, ((0, 0), (0, 3 - p.shape[1])))
            p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
            pts[mod] = np.round(p, 4).tolist()
        out[d] = pts
    return out


def _sphere_samples(trace, domains, basis, captions: dict) -> dict:
    out = {}
    for d in domains:
        e = trace.domains[d]
        idx, cap = basis["picks"][d]
        ids = e.ids[idx].tolist()
        probe = captions.get(d)
        texts = None
        if probe is not None and len(probe.ids) == len(e.ids) and torch.equal(probe.ids, e.ids):
            texts = [str(probe.captions[int(c)]) if c >= 0 else "" for c in cap.tolist()]
        out[d] = {"ids": ids, "captions": texts}
    return out


def _run_captions(source: Source, probe: str | None) -> dict:
    """Probe captions for hover text: from --probe, or re-rendered from a ShapeWorld run's config."""
    cached = [v for (spec, _), v in _PROBES.items() if spec == str(probe if probe is not None else source.config_path)]
    if cached:
        return {p.name: p for p in cached[0]}
    try:
        if probe is not None:
            return {p.name: p for p in load_probes(probe, 32)}
        if source.config_path is not None:
            from geomlab.config import load_config
            cfg = load_config(source.config_path)
            if cfg["data"]["stream"] == "shapes":
                from geomlab.data import shapes
                opts = cfg["data"].get("shapes", {})
                sets = shapes.probe_sets(seed=int(opts.get("seed", cfg["run"]["seed"])), image_size=8,
                                         probe_size=cfg["data"]["probe_size"], domains=opts.get("domains", 5))
                return {p.name: p for p in sets}
    except Exception:  # noqa: BLE001 - captions only label hover text; ids are shown otherwise
        return {}
    return {}


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m geomlab.analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="a geomlab run, one strategy's directory, or a directory of open_clip checkpoints")
    p.add_argument("--out", help="output directory (default CKPT_DIR/analysis)")
    p.add_argument("--model", help="open_clip architecture of plain checkpoints (e.g. geomlab-tiny, ViT-B-32)")
    p.add_argument("--probe", help="probe data to embed with: 'shapes' or an experiment config .toml")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (for embedding checkpoints)")
    p.add_argument("--exact-limit", type=int, default=20_000, help="largest N for exact topology drift")
    p.add_argument("--no-report", action="store_true", help="write analysis.json only")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def run(args) -> dict:
    from geomlab.io import atomic_write_text

    check_probe_spec(args.probe)
    if args.model is not None:
        from geomlab.models import check_model_name
        try:
            check_model_name(args.model)
        except ValueError as e:
            raise AnalyzeError(f"--model: {e}") from None
    source = discover(Path(args.ckpt_dir))
    out = Path(args.out) if args.out else source.root / "analysis"
    for cks in source.series.values():
        for c in cks:
            if c.checkpoint is not None and out.resolve() == c.checkpoint.parent.resolve():
                raise AnalyzeError(f"--out {out} is a checkpoint directory; choose another")
    if args.device not in ("auto", "cpu", "cuda"):
        raise AnalyzeError(f"--device must be auto, cpu or cuda, got {args.device!r}")
    t0 = time.time()
    embedder = Embedder(out / "cache", args.model, args.probe, source.config_path, _device(args.device))
    traces = load_traces(source, embedder, quiet=args.quiet)
    captions = _run_captions(source, args.probe)
    result = analyse(source, traces, captions=captions, exact_limit=args.exact_limit, quiet=args.quiet)
    result["seconds"] = round(time.time() - t0, 2)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "analysis.json", json.dumps(result, separators=(",", ":"), allow_nan=False) + "\n")
    report = None
    if not args.no_report:
        from geomlab.figures import write_report
        report = write_report(result, out / "report.html")
    for p in (out / "analysis.json", report):
        if p is not None:
            p.chmod(0o644)
    if not args.quiet:
        print_summary(result, out, report)
    return result


def _fmt(v, spec=".3f"):
    return "n/a" if v is None else format(v, spec)


def print_summary(result: dict, out: Path, report: Path | None) -> None:
    src = result["source"]
    print(f"analysed {src['kind']} {src['path']}: {len(result['strategies'])} series, "
          f"{len(result['domains'])} probe sets, {result.get('seconds', 0):.1f} s")
    for name, s in result["strategies"].items():
        acc = s["accuracy"]
        last = s["vs_base"][-1] if len(s["vs_base"]) > 1 else None
        line = f"  {name:<12} avg R@1 {_fmt(acc['average'])}  BWT {_fmt(acc['bwt'], '+.3f')}"
        if last:
            d0 = result["domains"][0]
            g = last[d0]
            line += (f"  | {d0} vs base: θ img {_fmt(g['rotation']['image']['mean'], '.1f')}° txt "
                     f"{_fmt(g['rotation']['text']['mean'], '.1f')}°  rigid {_fmt(g['procrustes']['image']['rigid_share'], '.2f')}"
                     f"  desync {_fmt(g['deviation']['desync']['mean'], '.1f')}°"
                     f"  AUC(Δφ→forgot) {_fmt(g['flips']['image_to_text']['auc_alignment_drift'], '.2f')}")
        print(line)
    print(f"analysis: {out / 'analysis.json'}")
    if report is not None:
        print(f"report: {report}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except (AnalyzeError, FileNotFoundError) as e:
        print(f"geomlab.analyze: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # unreadable trace or checkpoint: the message names the file
        print(f"geomlab.analyze: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
