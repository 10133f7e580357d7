"""Kernel benchmark: time and peak memory of geomlab.kernels' backends against dense baselines.

Operations: clip_loss fwd+bwd, modx_loss fwd+bwd, topk (k=10, B queries × B gallery) and
retrieval_ranks (B images × B captions), for B in {1k, 4k, 16k, 64k} × d in {256, 512}.
Implementations: the backends `triton` (CUDA only), `torch` and `reference` of geomlab.kernels,
against `eager` (the dense formula written out in torch), `compile` (torch.compile of it),
`open_clip` (open_clip.loss.ClipLoss, clip only), `faiss` (IndexFlatIP, topk only, when faiss is
installed) and `gemm` (ranks only: one plain fp32 GEMM pass over the same N×N similarities in
GEMM_CHUNK² chunks, without any counting — the floor of an exact fp32 method). Two named target
rows: `topk-50k` (k=10, 50,000 × 50,000, d=256: at most 0.6× faiss's time) and `ranks-200k`
(N=200,000, d=256: at most 0.6× the `gemm` pass's time and < 1 GiB beyond the inputs); their
notes give the ratio measured in the same run. `--targets` picks them, `--ops`/`--sizes` the grid.

Data: random unit features for the losses. topk and ranks run over a data axis (`--data`, every
kind of common.DATA_KINDS by default, each on its own row): captions are their image's feature
plus noise of the scale that puts the positive at median rank 0, about 30, about 1% of N
(common.caption_noise), or unrelated features; topk's queries are the images, its gallery the
captions. Each row records the median image→caption rank measured on its data (`median_rank`,
exact ranks of MEDIAN_SAMPLE images). The `gemm` pass does not depend on the data: it runs once
per case (data `any`), and every data kind's ratio is to it.

How it measures. Every (op, B, d) group runs in a fresh worker process (so one case cannot
inherit another's cached memory, and an out-of-memory kill loses one group only).
* CUDA: CUDA events for time; torch.cuda.max_memory_allocated() − memory_allocated() before the
  call (after reset_peak_memory_stats) for peak memory beyond the inputs.
* CPU: wall time (time.perf_counter), from a worker with the default allocator. Peak memory, from
  a second worker: the process's resident-set high-water mark (VmHWM, reset through
  /proc/self/clear_refs before the call) minus the resident set before the call. That worker runs
  with MALLOC_MMAP_THRESHOLD_=65536, so glibc serves every buffer above 64 KiB with its own mmap
  and returns it on free: the high-water mark then follows the live allocations of the call
  (torch's CPU allocator does not cache), not memory left over from earlier calls. It counts
  everything the call touches (torch, faiss, Python objects). Its times are not used: mapping and
  unmapping every buffer slows allocation-heavy code unevenly.
Times are the median over repeats (repeats only while a call takes < 1 s; torch.compile is
warmed up first and its compile time is not counted, nor is that of the tile kernels the torch
backend of retrieval_ranks compiles once per process on the CPU). Dense baselines are skipped when their
estimated memory would not fit (CPU: 16 GiB; CUDA: 80% of the device); on the CPU, cases whose
estimated work exceeds --max-gflop are skipped too (a 2-core machine would take hours).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from .common import DATA_KINDS

OPS = ("clip", "modx", "topk", "ranks")
IMPLS = {
    "clip": ("triton", "torch", "reference", "eager", "compile", "open_clip"),
    "modx": ("triton", "torch", "reference", "eager", "compile"),
    "topk": ("triton", "torch", "reference", "eager", "compile", "faiss"),
    "ranks": ("triton", "torch", "reference", "eager", "compile", "gemm"),
}
DENSE = ("reference", "eager", "compile", "open_clip")
DEFAULT_SIZES = [(b, d) for b in (1024, 4096, 16384, 65536) for d in (256, 512)]
QUICK_SIZES = [(256, 64)]
TARGETS = {"topk-50k": ("topk", 50_000, 256), "ranks-200k": ("ranks", 200_000, 256)}
RANKS_TARGET_MIB = 1024.0
#: target time ratios of the named rows: ranks-200k against the gemm pass, topk-50k against faiss,
#: on every data kind; ranks of unrelated features (positives in the bulk of their rows) get
#: TARGET_RATIO_UNRELATED_RANKS
TARGET_RATIO = 0.6
TARGET_RATIO_UNRELATED_RANKS = 1.0
#: rows and columns of one chunk of the `gemm` pass (a 64 MiB fp32 buffer)
GEMM_CHUNK = 4096
#: the ops whose rows run over the data axis (common.DATA_KINDS); the losses take random features
DATA_OPS = ("topk", "ranks")
#: implementations whose time does not depend on the data: one row per case
DATA_FREE = ("gemm",)
CPU_DENSE_BYTES = 16 * 2**30
TOPK_K = 10


def add_arguments(parser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated BxD list, e.g. 1024x256,4096x512 (default: B in "
                             "1k,4k,16k,64k × d in 256,512)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"subset of {','.join(OPS)} ('none' for none)")
    parser.add_argument("--impls", default=None, help="subset of the implementations to run")
    parser.add_argument("--targets", default="topk-50k,ranks-200k",
                        help="named target rows to run ('none' for none)")
    parser.add_argument("--data", default=None,
                        help="data kinds of topk and ranks, a subset of " + ",".join(DATA_KINDS).replace("%", "%%")
                        + " (default: all)")  # (argparse formats help with %: rank1% would break --help)
    parser.add_argument("--max-gflop", type=float, default=None,
                        help="skip cases estimated above this work (default: 3000 on CPU, no limit on CUDA)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (B=256, d=64, no compile, no targets)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")


# ---------------------------------------------------------------------------------------------
# estimates
# ---------------------------------------------------------------------------------------------

def _gflop(op: str, b: int, d: int) -> float:
    gemm = 2.0 * b * b * d / 1e9
    return {"clip": 3 * gemm, "modx": 7 * gemm, "topk": gemm, "ranks": 1.1 * gemm}[op]


def _dense_bytes(op: str, impl: str, b: int, d: int) -> float:
    """Rough peak of the dense formulas: the number of live B×B fp32 matrices they keep."""
    mats = {"clip": 8, "modx": 16, "topk": 2, "ranks": 6}[op]
    if impl == "faiss":
        return 4.0 * b * 1024 * 4 + 8 * b * d
    if impl == "gemm":
        return 4.0 * GEMM_CHUNK * GEMM_CHUNK
    return mats * 4.0 * b * b


# ---------------------------------------------------------------------------------------------
# worker: runs one (op, B, d) group in its own process
# ---------------------------------------------------------------------------------------------

def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _make_case(op, impl, b, d, device, pair=None):
    """(fn, needs_warmup): a closure running the op once (fwd+bwd for the losses); topk and ranks
    run on `pair` = (images or queries, captions or gallery)."""
    import torch
    import torch.nn.functional as F

    import geomlab.kernels as K

    g = torch.Generator(device="cpu").manual_seed(0)

    def feats(n, grad=False):
        x = F.normalize(torch.randn(n, d, generator=g), dim=1).to(device)
        return x.requires_grad_(grad)

    if op in ("clip", "modx"):
        image, text = feats(b, True), feats(b, True)
        image_old, text_old = feats(b), feats(b)
        scale = torch.tensor(1 / 0.07, device=device)

        def dense_clip(i, t, s):
            logits = s * (i @ t.T)
            y = torch.arange(i.shape[0], device=i.device)
            return 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y))

        def dense_modx(i, t, io, to, s):
            sim, sim_old = i @ t.T, (io @ to.T).detach()
            y = torch.arange(i.shape[0], device=i.device)
            loss = 0.5 * (F.cross_entropy(s * sim, y) + F.cross_entropy(s * sim.T, y))
            kl = 0.0
            for x, xo in ((sim, sim_old), (sim.T, sim_old.T)):
                keep = xo.argmax(1) == y
                lo = torch.log_softmax(xo, 1)
                rows = (lo.exp() * (lo - torch.log_softmax(x, 1))).sum(1)
                kl = kl + (rows * keep).sum()
            return loss + 20.0 * 0.5 * kl

        if op == "clip":
            if impl in ("triton", "torch", "reference"):
                f = lambda: K.clip_loss(image, text, scale, backend=impl)  # noqa: E731
            elif impl == "eager":
                f = lambda: dense_clip(image, text, scale)  # noqa: E731
            elif impl == "compile":
                cf = torch.compile(dense_clip)
                f = lambda: cf(image, text, scale)  # noqa: E731
            elif impl == "open_clip":
                from open_clip.loss import ClipLoss
                loss = ClipLoss()
                f = lambda: loss(image, text, scale)  # noqa: E731
        else:
            if impl in ("triton", "torch", "reference"):
                f = lambda: K.modx_loss(image, text, image_old, text_old, scale, backend=impl)[0]  # noqa: E731
            elif impl == "eager":
                f = lambda: dense_modx(image, text, image_old, text_old, scale)  # noqa: E731
            elif impl == "compile":
                cf = torch.compile(dense_modx)
                f = lambda: cf(image, text, image_old, text_old, scale)  # noqa: E731

        def run():
            image.grad = text.grad = None
            f().backward()
        return run, impl == "compile"

    a, c = pair
    if op == "topk":
        if impl in ("triton", "torch", "reference"):
            return (lambda: K.topk(a, c, TOPK_K, backend=impl)), False
        dense = lambda q, gal: torch.topk(q @ gal.T, TOPK_K, dim=1)  # noqa: E731
        if impl == "eager":
            return (lambda: dense(a, c)), False
        if impl == "compile":
            cf = torch.compile(dense)
            return (lambda: cf(a, c)), True
        if impl == "faiss":
            import faiss
            an, cn = a.numpy(), c.numpy()

            def run():
                index = faiss.IndexFlatIP(d)
                index.add(cn)
                return index.search(an, TOPK_K)
            return run, False
    if op == "ranks":
        if impl in ("triton", "torch", "reference"):
            if impl == "torch" and device == "cpu":  # like `compile`'s warm-up, its tile kernels' one-off
                from .common import probe_pair  # compile and a small first call are not timed: a process's

                # first call ran about 2× slower (N = 50,000: 6.4 s against 3.3 s; after a call at
                # N = 4,352, 2.9 s). ≥ 2²⁴ pairs: bf16 tiles, int8 recounts, the compiled kernels
                K.retrieval_ranks(*probe_pair("unrelated", 4352, d), backend=impl)
            return (lambda: K.retrieval_ranks(a, c, backend=impl)), False
        if impl == "gemm":
            buf = torch.empty(GEMM_CHUNK * GEMM_CHUNK, device=device)

            def run():
                for i0 in range(0, b, GEMM_CHUNK):
                    i1 = min(b, i0 + GEMM_CHUNK)
                    for t0 in range(0, b, GEMM_CHUNK):
                        t1 = min(b, t0 + GEMM_CHUNK)
                        torch.mm(a[i0:i1], c[t0:t1].T, out=buf[: (i1 - i0) * (t1 - t0)].view(i1 - i0, t1 - t0))
            return run, False

        def dense(i, t):
            s = i @ t.T
            pos = s.diagonal()
            idx = torch.arange(s.shape[0], device=s.device)
            i2t = ((s > pos[:, None]) | ((s == pos[:, None]) & (idx[None, :] < idx[:, None]))).sum(1)
            t2i = ((s > pos[None, :]) | ((s == pos[None, :]) & (idx[:, None] < idx[None, :]))).sum(0)
            return i2t, t2i
        if impl == "eager":
            return (lambda: dense(a, c)), False
        if impl == "compile":
            cf = torch.compile(dense)
            return (lambda: cf(a, c)), True
    raise ValueError(f"no implementation {impl!r} for {op!r}")


def _measure(fn, warmup: bool, device: str, max_reps: int = 20) -> dict:
    import torch

    cuda = device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if warmup:
        fn()
        sync()
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        while sum(times) < 1.0 and len(times) < max_reps:
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        import gc
        gc.collect()
        _reset_hwm()
        base = _rss_kib("VmRSS")
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        peak = max(0, _rss_kib("VmHWM") - base) / 1024
        while sum(times) < 1.0 and len(times) < max_reps:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"ms": 1e3 * statistics.median(times), "peak_MiB": peak, "reps": len(times)}


def _worker(spec: dict) -> list[dict]:
    import torch

    from .common import median_rank, probe_pair

    torch.manual_seed(0)
    rows = []
    for data, impl in _runs(spec):
        row = {"case": spec["case"], "op": spec["op"], "B": spec["B"], "d": spec["d"], "impl": impl, "data": data}
        try:
            pair = None
            if spec["op"] in DATA_OPS:  # a data-free implementation ("any") gets unrelated features
                pair = probe_pair(data if data in DATA_KINDS else "unrelated", spec["B"], spec["d"],
                                  device=spec["device"])
            if data in DATA_KINDS:
                row["median_rank"] = median_rank(*pair)
            fn, warm = _make_case(spec["op"], impl, spec["B"], spec["d"], spec["device"], pair)
            # small cases: one untimed call first (lazy initialisation of thread pools, BLAS
            # buffers, autograd engine); big ones: the first call is the measured one
            warm = warm or _gflop(spec["op"], spec["B"], spec["d"]) < 200
            row.update(_measure(fn, warm, spec["device"], spec.get("max_reps", 20)))
            del fn
        except Exception as e:  # one failing implementation must not hide the others
            row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        if spec["case"] == "ranks-200k" and impl != "gemm" and row.get("peak_MiB") is not None:
            row["note"] = ("target ok" if row["peak_MiB"] < RANKS_TARGET_MIB else "target FAILED") + \
                f" (< {RANKS_TARGET_MIB:.0f} MiB)"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _runs(spec: dict) -> list[tuple[str, str]]:
    """(data, impl) of every row of a group: data-free implementations once (data "any"), the
    others once per data kind (ops without the data axis: data "random")."""
    if spec["op"] not in DATA_OPS:
        return [("random", impl) for impl in spec["impls"]]
    runs = [("any", impl) for impl in spec["impls"] if impl in DATA_FREE]
    return runs + [(data, impl) for data in spec["data"] for impl in spec["impls"] if impl not in DATA_FREE]


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------

def _device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    return requested


def _available(impl: str, device: str, quick: bool) -> str | None:
    """None if impl can run here, else the reason it is skipped."""
    if impl == "triton" and device != "cuda":
        return "triton: CUDA only"
    if impl == "compile" and quick:
        return "skipped in --quick"
    if impl == "faiss":
        if device != "cpu":
            return "faiss-cpu: CPU only"
        try:
            import faiss  # noqa: F401
        except ImportError:
            return "faiss not installed"
    if impl == "open_clip":
        try:
            import open_clip  # noqa: F401
        except ImportError:
            return "open_clip not installed"
    return None


def _plan(args, device):
    import torch

    if args.quick:
        sizes, targets = QUICK_SIZES, []
    else:
        sizes = DEFAULT_SIZES if not args.sizes else [
            tuple(int(x) for x in s.lower().split("x")) for s in args.sizes.split(",") if s]
        targets = [t for t in args.targets.split(",") if t and t != "none"]
    ops = [o for o in args.ops.split(",") if o and o != "none"]
    for o in ops:
        if o not in OPS:
            raise SystemExit(f"--ops: unknown op {o!r}; valid: {', '.join(OPS)}")
    only = set(args.impls.split(",")) if args.impls else None
    kinds = [k for k in (args.data or ",".join(DATA_KINDS)).split(",") if k]
    for k in kinds:
        if k not in DATA_KINDS:
            raise SystemExit(f"--data: unknown data kind {k!r}; valid: {', '.join(DATA_KINDS)}")
    if device == "cuda":
        mem_budget = 0.8 * torch.cuda.get_device_properties(0).total_memory
    else:
        mem_budget = CPU_DENSE_BYTES
    max_gflop = args.max_gflop if args.max_gflop is not None else (3000.0 if device == "cpu" else float("inf"))
    groups, skipped = [], []
    cases = [(f"{o}", o, b, d) for o in ops for b, d in sizes]
    for t in targets:
        if t not in TARGETS:
            raise SystemExit(f"--targets: unknown target {t!r}; valid: {', '.join(TARGETS)}")
        o, b, d = TARGETS[t]
        cases.append((t, o, b, d))
    for case, op, b, d in cases:
        impls = []
        for impl in IMPLS[op]:
            if only and impl not in only:
                continue
            if case in TARGETS and impl not in ("triton", "torch", "faiss", "gemm"):
                continue
            if case in TARGETS and impl == "torch" and device == "cuda":
                continue
            base = {"case": case, "op": op, "B": b, "d": d, "impl": impl}
            why = _available(impl, device, args.quick)
            if why is None and impl in (*DENSE, "faiss", "gemm") and _dense_bytes(op, impl, b, d) > mem_budget:
                why = f"skipped: dense needs ~{_dense_bytes(op, impl, b, d) / 2**30:.0f} GiB"
            if why is None and case not in TARGETS and _gflop(op, b, d) > max_gflop:
                why = f"skipped: ~{_gflop(op, b, d):.0f} GFLOP > --max-gflop {max_gflop:.0f}"
            if why:
                skipped.append({**base, "note": why})
            else:
                impls.append(impl)
        if impls:
            groups.append({"case": case, "op": op, "B": b, "d": d, "impls": impls, "device": device,
                           "data": kinds, "max_reps": 3 if args.quick else 20})
    return groups, skipped


def run(args) -> int:
    from .common import print_table, write_json

    device = _device(args.device)
    groups, skipped = _plan(args, device)
    rows = []
    # CPU: one worker for time (default allocator), one for memory (see the module docstring)
    envs = [dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")]
    if device == "cpu":
        envs.insert(0, dict(os.environ))
    # one worker process per group; --quick runs every group in a single worker (start-up time)
    batches = [groups] if args.quick else [[g] for g in groups]
    for batch in batches:
        if not batch:
            continue
        for spec in batch:
            print(f"# {spec['case']}: B={spec['B']} d={spec['d']} ({', '.join(spec['impls'])})",
                  file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "geomlab.benchmarks.kernels", "--worker", json.dumps(batch)]
        got, err = {}, None
        for n, env in enumerate(envs):
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
                for line in proc.stdout.splitlines():
                    if line.startswith("{"):
                        r = json.loads(line)
                        key = (r["case"], r["data"], r["impl"])
                        if n == 0 or key not in got:
                            got[key] = r
                        elif "peak_MiB" in r:  # the memory worker (CPU): its peak (and memory
                            got[key]["peak_MiB"] = r["peak_MiB"]  # verdict), the first one's time
                            if "note" in r:
                                got[key]["note"] = r["note"]
                if proc.returncode:
                    err = f"worker exited with {proc.returncode}"
                    if proc.stderr:
                        err += ": " + proc.stderr.strip().splitlines()[-1][:120]
            except subprocess.TimeoutExpired:
                err = f"timeout after {args.timeout:.0f} s"
        for spec in batch:
            for data, impl in _runs(spec):
                rows.append(got.get((spec["case"], data, impl))
                            or {k: spec[k] for k in ("case", "op", "B", "d")} | {"impl": impl, "data": data,
                                                                                  "note": err})
    rows += skipped
    order = {c: i for i, c in enumerate(dict.fromkeys(r["case"] for r in rows))}
    data_order = {k: i for i, k in enumerate(("any", "random", *DATA_KINDS))}
    rows.sort(key=lambda r: (order[r["case"]], r["op"], r["B"], r["d"], data_order.get(r.get("data"), -1),
                             IMPLS[r["op"]].index(r["impl"])))
    # speed-up over the dense eager formula of the same case and data
    eager = {(r["case"], r["B"], r["d"], r.get("data")): r["ms"] for r in rows if r["impl"] == "eager" and r.get("ms")}
    # named targets: time as a fraction of the baseline's, measured in the same run (a data-free
    # baseline, data "any", stands for every data kind)
    baseline = {(r["case"], r["B"], r["d"], r.get("data")): r["ms"] for r in rows
                if (r["op"], r["impl"]) in (("topk", "faiss"), ("ranks", "gemm")) and r.get("ms")}
    for r in rows:
        key = (r["case"], r["B"], r["d"], r.get("data"))
        if r.get("ms") and key in eager:
            r["x_eager"] = eager[key] / r["ms"]
        if key not in baseline:
            key = (*key[:3], "any")
        if r["impl"] in ("torch", "triton") and r.get("ms") and key in baseline:
            what = "faiss's" if r["op"] == "topk" else "the gemm pass's"
            ratio = f"{r['ms'] / baseline[key]:.2f}× {what} time"
            if r["case"] in TARGETS:
                unrelated_ranks = r["op"] == "ranks" and r.get("data") == "unrelated"
                ratio += f" (target ≤ {TARGET_RATIO_UNRELATED_RANKS if unrelated_ranks else TARGET_RATIO})"
            r["note"] = ratio if "note" not in r else f"{ratio}; {r['note']}"
    cols = ["case", "op", "B", "d", "data", "median_rank", "impl", "ms", "peak_MiB", "x_eager", "note"]
    print_table(rows, cols)
    write_json(args.json, "kernels", rows, device=device)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        for one in json.loads(sys.argv[2]):
            _worker(one)
    else:
        from geomlab import bench
        sys.exit(bench.main(["kernels", *sys.argv[1:]]))
