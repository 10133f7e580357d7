"""The replay buffer of ER and DER: a reservoir sample of every phase seen (the base phase
included), and each step's batch of new and replayed rows (docs/definitions.md, "Replay").

Phase P's start offers phase P − 1's data to the reservoir (Vitter's algorithm R), so the buffer
a phase replays holds earlier phases only; the buffer (its samples as (phase, index) and the
number of samples offered so far) is saved in strategy_state/phaseP.safetensors.
"""
from __future__ import annotations

import torch
from torch.utils.data import ConcatDataset, Dataset

from .base import PhaseContext, Strategy

REPLAY_ORDER = 1  # context.order stream of the replayed rows (0: the phase's own batches)


def reservoir_writes(capacity: int, seen: int, offered: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """Algorithm R: the (slot, item) writes, in order, when items 0..offered−1 follow `seen`
    earlier ones into a buffer of `capacity`. Item t, the (seen + t + 1)-th offered, fills slot
    seen + t while there is room, else replaces slot j, j uniform in [0, seen + t], when j < capacity;
    so every item offered so far is in the buffer with probability capacity / (items offered)."""
    u = torch.rand(offered, generator=generator, dtype=torch.float64).tolist()
    writes = []
    for t in range(offered):
        before = seen + t
        j = before if before < capacity else int(u[t] * (before + 1))
        if j < capacity:
            writes.append((j, t))
    return writes


class BufferData(Dataset):
    """The buffered samples as a dataset: item i is sample index[i] of phase phase[i]'s data."""

    def __init__(self, stream, phase: list[int], index: list[int]):
        self.stream, self.phase, self.index = stream, phase, index

    def __len__(self):
        return len(self.phase)

    def __getitem__(self, i):
        return self.stream.phases[self.phase[i]].train[self.index[i]]


class Replay(Strategy):
    """ER's and DER's shared part: the buffer, its update at the phase start, the batches."""

    def __init__(self, context: PhaseContext, *, buffer_size: int, replay_fraction: float):
        super().__init__(context)
        self.buffer_size, self.replay_fraction = buffer_size, replay_fraction

    def start_phase(self, model):
        phase = self.context.phase
        state = self.context.load_state(phase)
        if state is None:  # fold phase − 1 in (a resumed phase finds it saved)
            state = self.context.load_state(phase - 1) if phase > 1 else self.empty_state()
            if state is None:
                raise FileNotFoundError(f"{self.name}: the buffer saved at the start of phase {phase - 1} is missing")
            state = self.offer(model, state, phase - 1)
            self.context.save_state(phase, state)
        self.state = state
        self.buffer = BufferData(self.context.stream, state["phase"].tolist(), state["index"].tolist())
        B = self.context.batch_size
        self.n_replay = min(round(self.replay_fraction * B), B - 1) if len(self.buffer) else 0
        return ConcatDataset([self.context.data, self.buffer])

    def empty_state(self) -> dict:
        return {"phase": torch.zeros(0, dtype=torch.int64), "index": torch.zeros(0, dtype=torch.int64),
                "seen": torch.zeros(1, dtype=torch.int64)}

    def offer(self, model, state: dict, phase: int) -> dict:
        """The state after offering every sample of `phase`'s data to the reservoir."""
        seen = int(state["seen"])
        generator = torch.Generator().manual_seed(self.context.seed * 1_000_003 + phase)
        n = len(self.train_data(self.context.stream, phase))
        slots = {"phase": state["phase"].tolist(), "index": state["index"].tolist()}
        written = set()
        for j, t in reservoir_writes(self.buffer_size, seen, n, generator):
            if j == len(slots["phase"]):
                slots["phase"].append(phase)
                slots["index"].append(t)
            else:
                slots["phase"][j], slots["index"][j] = phase, t
            written.add(j)
        new = {"phase": torch.tensor(slots["phase"], dtype=torch.int64),
               "index": torch.tensor(slots["index"], dtype=torch.int64),
               "seen": torch.tensor([seen + n], dtype=torch.int64)}
        return self.store(model, state, new, sorted(written))

    def store(self, model, before: dict, after: dict, written: list[int]) -> dict:
        """What else a buffered sample keeps (DER: its embeddings); `written`: the slots just filled."""
        return after

    def step_indices(self, step):
        """(1 − replay_fraction)·B rows of new data in the phase's own order, then replay_fraction·B
        buffered rows (indices past the new data), cycling through seeded permutations of the buffer."""
        n, k = len(self.context.data), self.n_replay
        new = self.context.order(n, self.context.batch_size - k, step)
        replayed = self.context.order(len(self.buffer), k, step, REPLAY_ORDER) if k else []
        return new + [n + r for r in replayed]

    def replayed_slots(self, step) -> list[int]:
        """The buffer slots of step's replayed rows, in batch order (the last n_replay of its first B
        rows; rows a subclass adds ride after those B)."""
        B = self.context.batch_size
        return [r - len(self.context.data) for r in self.step_indices(step)[B - self.n_replay: B]]
