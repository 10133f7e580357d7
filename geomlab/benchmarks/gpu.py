"""GPU check: one prepared run for a CUDA machine, and the sm_90 compile report for any machine.

`python -m geomlab.bench gpu --out DIR` (CUDA; without it, one line says so and it exits 0),
under 8 minutes on one H100/H200, writes DIR/gpu.json and DIR/gpu.md:
* tests: the kernel test files (tests/test_kernels_losses.py, tests/test_kernels_ranking.py, every
  dtype they cover) run natively, TRITON_INTERPRET=0, with the triton backend on CUDA tensors
  (the pytest plugin tests/triton_cuda_plugin.py moves its inputs; it also narrows autotuning to
  each kernel's first configuration, so the run compiles each kernel variant once);
* losses: Triton clip_loss and modx_loss forward+backward at B = 4,096, 16,384, 65,536, d = 512,
  bf16, against the dense formula (kernels.reference, eager) and torch.compile of it: time (CUDA
  events, median) and peak memory beyond the inputs (torch.cuda.max_memory_allocated);
* ranking: topk (k = 10) and retrieval_ranks at N = 200,000, d = 512 (bf16 and fp32), on every
  data kind of common.DATA_KINDS (positives at median rank 0, about 30, about 1% of N, unrelated
  features; each row records the measured median rank), against a chunked dense torch
  computation on the GPU (fp32 scores, row chunks of CHUNK_ROWS, timed once: its result is the
  one compared), with their agreement (identical ranks and top-k indices, largest top-k value
  difference).
Every case runs guarded: an error, out-of-memory or a timeout is recorded and the run goes on
(each group in its own process, so a crashed CUDA context loses one group only).

`python -m geomlab.bench gpu --compile {representative,all} --out DIR` needs no GPU: it compiles
the Triton kernels for GPUTarget("cuda", 90, 32) (Triton's bundled ptxas, a fresh cache, nothing
kept) and writes DIR/compile.json and DIR/compile.md: registers, spill bytes, shared memory and
the MMA instructions of each kernel variant and configuration. `representative` is the default
configuration of every kernel in bf16 and fp32 (what tests/test_kernels_compile.py checks);
`all` is every configuration, dtype and mode.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GPU_TARGET = ("cuda", 90, 32)
SM90_SHARED_BYTES = 232448  # the most shared memory one block may use on sm_90 (227 KiB)
LOSS_SIZES = (4096, 16384, 65536)
RANK_N = 200_000
D = 512
TOPK_K = 10
CHUNK_ROWS = 8192
#: seconds the whole GPU check may take, and its share for the native test run
BUDGET_S = 450
TESTS_S = 200
TEST_FILES = ("tests/test_kernels_losses.py", "tests/test_kernels_ranking.py")


def add_arguments(parser) -> None:
    parser.add_argument("--out", metavar="DIR", default="gpu-check",
                        help="directory for the JSON and markdown reports")
    parser.add_argument("--compile", choices=("representative", "all"), default=None,
                        help="compile the Triton kernels for sm_90 (no GPU needed) instead of the GPU check")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (--compile)")


# ---------------------------------------------------------------------------------------------
# the sm_90 compile report
# ---------------------------------------------------------------------------------------------

# pointer parameters of each kernel and their element types; "F": the features' dtype
_POINTERS = {
    "_loss_fwd": dict(X="F", Y="F", XO="F", YO="F", SCALE="fp32", ROWP="fp32", ROWI="i32", COLP="fp32",
                      COLI="i32"),
    "_loss_bwd": dict(A="F", Bf="F", AO="F", BO="F", SCALE="fp32", COEF="fp32", OWN="fp32", OTHER="fp32",
                      DA="fp32", DSR="fp32"),
    "_similarity_kernel": dict(a_ptr="F", b_ptr="F", c_ptr="fp32"),
    "_topk_kernel": dict(q_ptr="F", g_ptr="F", keys_ptr="i64"),
    "_ranks_kernel": dict(img_ptr="F", txt_ptr="F", ci_ptr="i32", pos_ptr="fp32", best_ptr="i32",
                          best_pos_ptr="fp32", rank_i_ptr="i32", rank_t_ptr="i32"),
}
_FLOAT_ARGS = {"inv_tau"}
# integer arguments a d = 512 launch specialises as multiples of 16 (as triton does for the real call)
_ALIGNED_INTS = {"D", "K", "stride_x", "stride_y", "stride_xo", "stride_yo", "stride_a", "stride_b", "stride_ao",
                 "stride_bo", "stride_am", "stride_bn",
                 "stride_cm", "stride_qm", "stride_gn", "stride_i", "stride_t"}
#: loss kernel modes: (HAS_CE, HAS_KL, both directions from one pass)
_LOSS_MODES = {"modx-fused": (True, True, True), "clip-fused": (True, False, True),
               "modx-direction": (True, True, False)}


def _variants(scope: str) -> list[dict]:
    """The kernel variants to compile: {kernel, label, dtype, constexprs, num_warps, num_stages}.
    Configurations are the GPU lists of the kernel modules, pruned as the launches prune them
    (d = 512, the feature dimension of the benchmarks)."""
    import torch

    from geomlab.kernels import _triton, losses_triton as L, ranking_triton as R

    assert not _triton.INTERPRET, "the compile report needs TRITON_INTERPRET unset or 0"
    full = scope == "all"
    dtypes = ("bf16", "fp32", "fp16") if full else ("bf16", "fp32")
    out = []

    def add(kernel, label, configs, dtype, **constexprs):
        for c in (configs if full else configs[:1]):
            out.append(dict(kernel=kernel.fn.__name__ if hasattr(kernel, "configs") else kernel.__name__,
                            module=kernel.fn.__module__ if hasattr(kernel, "configs") else kernel.__module__,
                            label=label, dtype=dtype, constexprs={**constexprs, **c.kwargs},
                            num_warps=c.num_warps, num_stages=c.num_stages))

    def pruned(kernel, dtype, **kwargs):
        prune = kernel.early_config_prune
        args = {"A": torch.empty(0, dtype=_torch_dtype(dtype))}
        return prune(kernel.configs, args, **kwargs) if prune else kernel.configs

    for dt in dtypes:
        add(R._similarity_kernel, "similarity", R._similarity_kernel.configs, dt)
        for k_pad in ((16, 128) if full else (16,)):
            add(R._topk_kernel, f"topk K_PAD={k_pad}", pruned(R._topk_kernel, dt, K_PAD=k_pad), dt, K_PAD=k_pad)
        for n in ((1000, 200_000) if full else (200_000,)):
            launch = R._rank_launch(n, _torch_dtype(dt))
            cfg = [_Config({k: launch[k] for k in ("BLOCK", "BLOCK_K")}, launch["num_warps"], launch["num_stages"])]
            for positives in (True, False):
                add(R._ranks_kernel, f"ranks {'positives' if positives else 'counts'} BLOCK={launch['BLOCK']}",
                    cfg, dt, POSITIVES=positives)
        block_ds = [L._block_d(D, _torch_dtype(dt))] + ([128] if full and dt != "fp32" else [])
        for mode, (ce, kl, both) in list(_LOSS_MODES.items())[:None if full else 1]:
            flags = dict(HAS_CE=ce, HAS_KL=kl, OFF_DIAG=False)
            add(L._loss_fwd, f"loss fwd {mode}", pruned(L._loss_fwd, dt, BOTH=both, HAS_KL=kl), dt, BOTH=both,
                ARGMAX=kl, **flags)
            # dX launch (own = rows, with the logit-scale gradient) and dY launch (own = columns)
            for own, other, scale_grad in ((True, both, True), (both, True, False)):
                if not full and not scale_grad:
                    continue
                for block_d in block_ds:
                    add(L._loss_bwd, f"loss bwd {mode} {'dX' if scale_grad else 'dY'} BLOCK_D={block_d}",
                        pruned(L._loss_bwd, dt), dt, OWN_STATS=own, OTHER_STATS=other, SCALE_GRAD=scale_grad,
                        BLOCK_D=block_d, **flags)
    return out


class _Config:
    """A launch configuration shaped like triton.Config (kwargs, num_warps, num_stages)."""

    def __init__(self, kwargs, num_warps, num_stages):
        self.kwargs, self.num_warps, self.num_stages = kwargs, num_warps, num_stages


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _compile_one(v: dict) -> dict:
    """Compile one variant for GPU_TARGET: its registers, spills, shared memory and MMA instructions."""
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(v["module"]), v["kernel"])
    fn = kernel.fn if hasattr(kernel, "configs") else kernel
    ptrs = _POINTERS[v["kernel"]]
    signature, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name in ptrs:
            signature[p.name] = "*" + (v["dtype"] if ptrs[p.name] == "F" else ptrs[p.name])
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[p.name] = "fp32" if p.name in _FLOAT_ARGS else "i32"
            if p.name in _ALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    row = {k: v[k] for k in ("label", "kernel", "dtype", "num_warps", "num_stages")}
    row["config"] = ",".join(f"{k}={c}" for k, c in v["constexprs"].items() if k.startswith("BLOCK") or k == "K_PAD")
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as cache, knobs.nvidia.scope(), knobs.cache.scope():
            knobs.nvidia.dump_ptxas_log = True  # ptxas -v: registers and spills
            knobs.cache.dir = cache
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(ASTSource(fn, signature, v["constexprs"], attrs),
                                          target=GPUTarget(*GPU_TARGET),
                                          options={"num_warps": v["num_warps"], "num_stages": v["num_stages"]})
        text = log.getvalue()
        regs = re.search(r"Used (\d+) registers", text)
        spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
        row.update(regs=int(regs.group(1)) if regs else None, spill_bytes=max(spills, default=0),
                   shared=compiled.metadata.shared,
                   mma=sorted(set(re.findall(r"\b(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)", compiled.asm["ptx"]))))
    except Exception as e:  # a compile error is a result of the report
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def compile_report(scope: str, jobs: int = 1) -> list[dict]:
    """Compile the scope's variants (in `jobs` processes) and return one row per variant."""
    variants = _variants(scope)
    if jobs <= 1:
        return [_compile_one(v) for v in variants]
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile_one, variants, chunksize=1)


def _compile_markdown(rows: list[dict]) -> str:
    lines = ["| kernel variant | dtype | config | warps·stages | regs | spill B | shared B | MMA | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mma = ", ".join(m.split(".")[0] + "." + m.split(".")[-4] if m.startswith("wgmma") else m
                        for m in r.get("mma", [])) or "none"
        lines.append(f"| {r['label']} | {r['dtype']} | {r['config']} | {r['num_warps']}·{r['num_stages']} | "
                     f"{r.get('regs', '')} | {r.get('spill_bytes', r.get('error', ''))} | {r.get('shared', '')} | "
                     f"{mma} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def _run_compile(args) -> int:
    from .common import print_table, write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = compile_report(args.compile, args.jobs)
    for r in rows:
        r["over_shared"] = r.get("shared", 0) > SM90_SHARED_BYTES
    print_table(rows, ["label", "dtype", "config", "num_warps", "num_stages", "regs", "spill_bytes", "shared",
                       "seconds", "error"])
    for path in (str(out / "compile.json"), args.json):
        write_json(path, "gpu-compile", rows, target=list(GPU_TARGET), scope=args.compile,
                   seconds=round(time.perf_counter() - t0, 1))
    (out / "compile.md").write_text(_compile_markdown(rows))
    return 0



# ---------------------------------------------------------------------------------------------
# the GPU check
# ---------------------------------------------------------------------------------------------

def _repo_root() -> Path:
    import geomlab

    return Path(geomlab.__file__).resolve().parents[1]


def _run_tests(out: Path, timeout: float) -> dict:
    """The kernel test files, natively on CUDA: pytest in a subprocess (TRITON_INTERPRET=0)."""
    root = _repo_root()
    files = [f for f in TEST_FILES if (root / f).exists()]
    if not files:
        return {"note": f"no kernel test files under {root}"}
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join(p for p in (str(root / "tests"), os.environ.get("PYTHONPATH")) if p))
    junit = out / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "triton_cuda_plugin", "--junitxml", str(junit), *files]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        summary = (proc.stdout.strip().splitlines() or [""])[-1]
        result = {"returncode": proc.returncode, "summary": summary}
    except subprocess.TimeoutExpired:
        result = {"note": f"timeout after {timeout:.0f} s"}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if junit.exists():
        import xml.etree.ElementTree as ET

        result["failed"] = []
        for case in ET.parse(junit).getroot().iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                name = f"{case.get('classname')}::{case.get('name')}"
                result["failed"].append(f"{name}: {bad.get('message', '')[:200]}")
    return result


def _time_cuda(fn, reps: int, budget_s: float = 2.0, warmup: bool = True) -> dict:
    """fn timed with CUDA events after one untimed call (compilation, autotuning; none without
    `warmup`): median ms over up to `reps` calls (fewer once they pass budget_s), and the first
    timed call's peak memory beyond what was allocated before it."""
    import torch

    if warmup:
        fn()
    torch.cuda.synchronize()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    while len(times) < reps and sum(times) < budget_s * 1e3:
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        if len(times) == 1:
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return {"ms": statistics.median(times), "peak_MiB": peak, "reps": len(times)}


def _guarded(row: dict, fn) -> dict:
    """row updated with fn()'s results, or with the error it raised (out-of-memory included)."""
    import torch

    try:
        row.update(fn())
    except Exception as e:
        row["note"] = f"error: {type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
    torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def _loss_rows() -> list[dict]:
    """clip_loss and modx_loss forward+backward, bf16, d = 512: triton, eager dense, compiled dense."""
    import torch
    import torch.nn.functional as F

    from geomlab import kernels
    from geomlab.kernels import MODX_ALPHA, ModxOptions, reference

    def dense_clip(i, t, s):
        return reference.clip_loss(i, t, s)

    def dense_modx(i, t, io, to, s):
        clip, kl_i, kl_t, _, _ = reference.modx_loss_parts(i, t, io, to, s, ModxOptions())
        return clip + MODX_ALPHA * 0.5 * (kl_i + kl_t)

    # one compilation per loss for all sizes (dynamic shapes): a static one would recompile per B
    compiled_clip, compiled_modx = torch.compile(dense_clip, dynamic=True), torch.compile(dense_modx, dynamic=True)
    impls = {"triton": {"clip": lambda i, t, io, to, s: kernels.clip_loss(i, t, s, backend="triton"),
                        "modx": lambda i, t, io, to, s: kernels.modx_loss(i, t, io, to, s, backend="triton")[0]},
             "eager": {"clip": lambda i, t, io, to, s: dense_clip(i, t, s), "modx": dense_modx},
             "compile": {"clip": lambda i, t, io, to, s: compiled_clip(i, t, s), "modx": compiled_modx}}
    rows = []
    for b in LOSS_SIZES:
        g = torch.Generator(device="cuda").manual_seed(0)

        def feats(grad=False):
            x = F.normalize(torch.randn(b, D, device="cuda", generator=g), dim=1).to(torch.bfloat16)
            return x.requires_grad_(grad)

        image, text, image_old, text_old = feats(True), feats(True), feats(), feats()
        scale = torch.tensor(1 / 0.07, device="cuda")
        for op in ("clip", "modx"):
            for impl, table in impls.items():
                def run(f=table[op]):
                    image.grad = text.grad = None
                    f(image, text, image_old, text_old, scale).backward()
                rows.append(_guarded({"group": "losses", "op": op, "impl": impl, "B": b, "d": D, "dtype": "bf16"},
                                     lambda: _time_cuda(run, reps=5)))
        del image, text, image_old, text_old
    return rows


def _dense_topk(q, g, k):
    """Chunked dense top-k on the GPU: fp32 score rows (CHUNK_ROWS at a time) and torch.topk."""
    import torch

    out_v, out_i = [], []
    gf = g.float()
    for r0 in range(0, q.shape[0], CHUNK_ROWS):
        v, i = torch.topk(q[r0:r0 + CHUNK_ROWS].float() @ gf.T, k, dim=1)
        out_v.append(v)
        out_i.append(i)
    return torch.cat(out_v), torch.cat(out_i)


def _dense_ranks(image, text):
    """Chunked dense retrieval ranks (one caption per image) on the GPU, fp32 scores: each direction
    from its own row chunks, the positive taken from the chunk's own scores."""
    import torch

    def one_way(q, g):
        gf, ranks = g.float(), []
        for r0 in range(0, q.shape[0], CHUNK_ROWS):
            s = q[r0:r0 + CHUNK_ROWS].float() @ gf.T
            rows = torch.arange(s.shape[0], device=s.device)
            pos = s[rows, r0 + rows][:, None]
            cols = torch.arange(s.shape[1], device=s.device)[None, :]
            ranks.append(((s > pos) | ((s == pos) & (cols < (r0 + rows)[:, None]))).sum(1))
        return torch.cat(ranks)
    return one_way(image, text), one_way(text, image)


def _ranking_rows() -> list[dict]:
    """topk (k = 10) and retrieval_ranks at N = RANK_N, d = 512, bf16 and fp32, on every data kind:
    triton against the chunked dense computation, with their agreement."""
    import torch

    from geomlab import kernels

    from .common import DATA_KINDS, median_rank, probe_pair

    rows = []
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for data in DATA_KINDS:
            a, c = probe_pair(data, RANK_N, D, seed=1, device="cuda", dtype=dtype)
            base = {"group": "ranking", "B": RANK_N, "d": D, "dtype": name, "data": data,
                    "median_rank": median_rank(a, c)}
            rows += _ranking_kind(kernels, a, c, base)
            del a, c
    return rows


def _ranking_kind(kernels, a, c, base: dict) -> list[dict]:
    """The ranking rows of one data kind and dtype (`base`: the fields they share)."""
    rows, results = [], {}
    for op, impl, fn in (("topk", "triton", lambda: kernels.topk(a, c, TOPK_K, backend="triton")),
                         ("topk", "dense-chunked", lambda: _dense_topk(a, c, TOPK_K)),
                         ("ranks", "triton", lambda: kernels.retrieval_ranks(a, c, backend="triton")),
                         ("ranks", "dense-chunked", lambda: _dense_ranks(a, c))):
        def measure(fn=fn, key=(op, impl)):
            if key[1] == "dense-chunked":  # plain torch, nothing to warm up: its one timed call gives the result
                return _time_cuda(lambda: results.__setitem__(key, fn()), reps=1, warmup=False)
            results[key] = fn()
            return _time_cuda(fn, reps=2, budget_s=5.0)
        rows.append(_guarded({**base, "op": op, "impl": impl}, measure))
    agree = {**base, "impl": "triton vs dense-chunked"}
    if ("topk", "triton") in results and ("topk", "dense-chunked") in results:
        (v, i), (dv, di) = results["topk", "triton"], results["topk", "dense-chunked"]
        rows.append(_guarded({**agree, "op": "topk"}, lambda: {"note": (
            f"values max |diff| {float((v - dv).abs().max()):.2e}, "
            f"{float((i == di).float().mean()):.6f} of the indices equal")}))
    if ("ranks", "triton") in results and ("ranks", "dense-chunked") in results:
        got, want = results["ranks", "triton"], results["ranks", "dense-chunked"]
        rows.append(_guarded({**agree, "op": "ranks"}, lambda: {"note": (
            f"ranks differing: {int((got[0] != want[0]).sum())} image→text, "
            f"{int((got[1] != want[1]).sum())} text→image")}))
    return rows


#: the measured groups and the seconds each may take at most
GROUPS = {"losses": (_loss_rows, 160), "ranking": (_ranking_rows, 150)}


def _run_group(name: str, timeout: float) -> list[dict]:
    """One group in its own process; its rows (or a row saying why there are none)."""
    cmd = [sys.executable, "-m", "geomlab.benchmarks.gpu", "--worker", name]
    rows, err = [], None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, TRITON_INTERPRET="0"))
        rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode:
            err = f"worker exited with {proc.returncode}: " + (proc.stderr.strip().splitlines() or [""])[-1][:160]
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        err = f"timeout after {timeout:.0f} s"
    if err:
        rows.append({"group": name, "note": err})
    return rows


def _markdown(result: dict) -> str:
    tests = result["tests"]
    lines = [f"# GPU check ({result['machine'].get('cuda_device', '?')})", "",
             f"Tests (TRITON_INTERPRET=0, {', '.join(TEST_FILES)}): {tests.get('summary') or tests.get('note')} "
             f"({tests.get('seconds', '?')} s)", ""]
    lines += [f"- FAILED {f}" for f in tests.get("failed", [])]
    lines += ["", "| group | op | impl | B | d | dtype | data | median rank | ms | peak MiB | × eager | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = ("" if r.get(k) is None else f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k])
                 for k in ("group", "op", "impl", "B", "d", "dtype", "data", "median_rank", "ms", "peak_MiB",
                           "x_eager", "note"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Total {result['seconds']} s."]
    return "\n".join(lines) + "\n"


def _run_gpu(args) -> int:
    import torch

    from .common import machine, write_json

    if not torch.cuda.is_available():
        print("gpu check: no CUDA device on this machine, nothing measured "
              "(`--compile all` compiles the kernels for sm_90 without one)")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    tests = _run_tests(out, TESTS_S)
    print(f"# tests: {tests.get('summary') or tests.get('note')}", flush=True)
    rows = []
    for name, (_, cap) in GROUPS.items():
        left = BUDGET_S - (time.monotonic() - t0)
        if left < 20:
            rows.append({"group": name, "note": "skipped: time budget spent"})
            continue
        rows += _run_group(name, min(cap, left))
    eager = {(r.get("op"), r.get("B")): r["ms"] for r in rows if r.get("impl") == "eager" and r.get("ms")}
    for r in rows:
        if r.get("ms") and (r.get("op"), r.get("B")) in eager:
            r["x_eager"] = eager[r["op"], r["B"]] / r["ms"]
    result = {"machine": machine(), "tests": tests, "rows": rows, "seconds": round(time.monotonic() - t0, 1)}
    for path in (str(out / "gpu.json"), args.json):
        write_json(path, "gpu", rows, tests=tests, seconds=result["seconds"])
    (out / "gpu.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


def run(args) -> int:
    return _run_compile(args) if args.compile else _run_gpu(args)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        GROUPS[sys.argv[2]][0]()
    else:
        from geomlab import bench
        sys.exit(bench.main(["gpu", *sys.argv[1:]]))
