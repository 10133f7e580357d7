"""Where work runs: the device behind "auto", and how many threads CPU work may use.

One home for both questions, so the trainer, the analyser, the geometry measures and the kernels
answer them the same way.
"""
from __future__ import annotations

import os
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Callable, Iterable, TypeVar

# torch's OpenMP (libgomp) lets a waiting thread spin 300,000 times before it sleeps. With another
# busy process on a 2-core machine those spins steal the cores the work needs: a finetune step
# (`python -m geomlab.bench train`) went from 40 ms idle to 150-2,840 ms. 10,000 spins keep the
# idle speed and hold 95 ms under that load; OMP_WAIT_POLICY=PASSIVE held 66-116 ms but cost 55%
# idle. libgomp reads this once, when torch loads it, so geomlab imports this module before torch;
# a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins. torch itself is imported where it is used,
# so that importing geomlab (and checking a config) does not load it.
OPENMP_SPIN_COUNT = "10000"
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)

DEVICES = ("auto", "cpu", "cuda")

T = TypeVar("T")
R = TypeVar("R")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" → cuda when a CUDA device is available, else cpu; anything else as torch reads it."""
    import torch

    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_workers(limit: int = 4) -> int:
    """Threads for tiled CPU work: the cores this process may use, at most `limit`."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, limit))


@contextmanager
def single_threaded():
    """Inside: torch's intra-op pool and every BLAS/OpenMP pool threadpoolctl knows run one thread.

    Callers parallelise over Python threads instead (torch releases the GIL): on a small machine
    shared with other processes that beats OpenMP threads spinning against each other by a wide
    margin. torch's thread count is process-wide, so torch work of other Python threads is
    single-threaded too while this is active; the previous counts are restored on exit."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


def map_threads(fn: Callable[[T], R], items: Iterable[T], workers: int) -> list[R]:
    """[fn(x) for x in items], on `workers` Python threads with single-threaded torch when workers > 1."""
    items = list(items)
    if workers <= 1 or len(items) < 2:
        return [fn(x) for x in items]
    with single_threaded(), ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def _one_thread_process() -> None:
    import torch

    torch.set_num_threads(1)


def map_processes(fn: Callable[[T], R], items: Iterable[T], workers: int,
                  done: Callable[[], None] | None = None) -> list[R]:
    """[fn(x) for x in items] on `workers` forked processes of one torch thread each (in this process
    when workers ≤ 1 or there is one item); `done()` after each item. For work that holds the GIL
    most of the time (many small tensor operations), where `map_threads` cannot use a second core.

    Forked as torch's DataLoader forks its workers (one torch thread in the child); the first
    exception is raised here and the items not started are cancelled."""
    items = list(items)
    if workers <= 1 or len(items) < 2:
        out = []
        for x in items:
            out.append(fn(x))
            if done:
                done()
        return out
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(min(workers, len(items)), mp_context=context, initializer=_one_thread_process) as pool:
        futures = {pool.submit(fn, x): i for i, x in enumerate(items)}
        out: list = [None] * len(items)
        try:
            for f in as_completed(futures):
                out[futures[f]] = f.result()
                if done:
                    done()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        return out
