"""geomlab.runtime: work spread over processes (the analyser's seeds) keeps order and errors."""
import os

import pytest
import torch

from geomlab.runtime import map_processes


def _square_where(x):
    if x == 3:
        raise ValueError("item 3 is bad")
    return x * x, os.getpid(), torch.get_num_threads()


def test_map_processes_keeps_order_and_runs_one_thread_per_process():
    calls = []
    out = map_processes(_square_where, [5, 1, 4, 2], 2, done=lambda: calls.append(1))
    assert [v for v, _, _ in out] == [25, 1, 16, 4]
    assert all(pid != os.getpid() for _, pid, _ in out)
    assert {threads for _, _, threads in out} == {1}
    assert len(calls) == 4


def test_map_processes_raises_the_first_error_and_runs_in_process_with_one_worker():
    with pytest.raises(ValueError, match="item 3 is bad"):
        map_processes(_square_where, [1, 3, 2], 2)
    out = map_processes(_square_where, [2, 1], 1)
    assert [v for v, _, _ in out] == [4, 1] and {pid for _, pid, _ in out} == {os.getpid()}
