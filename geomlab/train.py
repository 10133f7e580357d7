"""python -m geomlab.train: continual CLIP training with geometry traces.

A base model is trained on phase 0; every strategy then continues from that same base model
through the remaining phases. Checkpoints, traces (probe embeddings) and retrieval metrics are
written every `train.checkpoint_every` steps and at each phase end; `--resume` continues an
interrupted run from its newest saved state, mid-phase included.
"""
from __future__ import annotations

import sys

if __name__ == "__main__":  # --help and config errors answer before torch and open_clip load (seconds)
    from geomlab.train_args import check_command_line

    check_command_line(sys.argv[1:])

# The imports below load torch and open_clip: after the check above.
import contextlib
import copy
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from geomlab import __version__
from geomlab.config import ConfigError, dumps
from geomlab.data import CALIBRATION_KIND, SCORED_KINDS, SEEN_KIND, DataError, build_stream, with_pretrained_base
from geomlab.embed import embed_probe, embed_probes_together
from geomlab.geometry import retrieval_metrics
from geomlab.io import WriteError, atomic_torch_save, load_checkpoint
from geomlab.models import check_model_name, create_model, image_size, pretrained_kind, state_dict_of
from geomlab.rundir import DATA_POLICY_KEYS, RunDir, RunDirError, checkpoint_stem
from geomlab.runtime import resolve_device
from geomlab.strategies import Features, PhaseContext, get_strategy
from geomlab.reporting import TensorBoardReport, check_report_to, drift_from_base
from geomlab.traces import DomainEmbeddings, Trace, read_trace, stored, write_trace
from geomlab.train_args import parse_args_or_hint, read_config
from geomlab.zeroshot import evaluate as evaluate_zeroshot

LOGIT_SCALE_MAX = math.log(100)

FINE_TRACE_KINDS = (SEEN_KIND, CALIBRATION_KIND)  # the probe-set kinds a fine trace holds


# ----------------------------------------------------------------------------- command line

def resolve_config(args) -> dict:
    """read_config, then what needs torch and open_clip: strategy and model names, the pretrained
    weights' kind, a CUDA device."""
    config = read_config(args)
    for name in config["run"]["strategies"]:
        try:
            get_strategy(name)
        except ValueError as e:
            hint = (" (a list on the command line: run.strategies=finetune,modx or run.strategies='[\"finetune\"]')"
                    if name.startswith("[") or name.endswith("]") else "")
            raise ConfigError(f"run.strategies: {e}{hint}") from None
    try:
        check_model_name(config["model"]["name"])
    except ValueError as e:
        raise ConfigError(f"model.name: {e}") from None
    try:
        pretrained_kind(config["model"]["name"], config["model"]["pretrained"])
    except ValueError as e:
        raise ConfigError(f"model.pretrained: {e}") from None
    if config["run"]["device"] == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: 'cuda' requested but no CUDA device is available")
    return config


# ----------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """All-gather rows across ranks, keeping the gradient path (open_clip's gather_with_grad)."""
        if self.world == 1:
            return x
        import torch.distributed.nn.functional as dist_fn
        return torch.cat(dist_fn.all_gather(x.contiguous()), dim=0)

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over ranks, on every rank (a copy on one process)."""
        x = x.clone()
        if self.world > 1:
            torch.distributed.all_reduce(x)
        return x

    def on_main(self, work):
        """`work()` on rank 0 only (it writes files); an error it raises is raised on every rank, so
        that no rank waits for one that has stopped. Returns work's result on rank 0, else None."""
        result, error = None, None
        if self.main:
            try:
                result = work()
            except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                error = e
        if self.world > 1:
            box = [error]
            torch.distributed.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise error
        return result


def init_distributed(device: torch.device) -> Dist:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    import torch.distributed as dist
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Dist(rank=dist.get_rank(), world=dist.get_world_size())


# ----------------------------------------------------------------------------- pieces of a phase

class Interrupted(Exception):
    """SIGINT or SIGTERM: training stopped at a step boundary, after saving what --resume needs."""


class StopRequest:
    """Set by SIGINT/SIGTERM; the trainer reads it at each step boundary. A second signal of the same
    kind while stopping takes the default action (a second Ctrl-C ends the process at once)."""

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        import signal
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        import signal
        self.signal = signum
        signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc):
        import signal
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


class Diverged(RuntimeError):
    """Training produced a NaN or an infinity; the message says where and what to try."""


def first_nonfinite(tensors: dict) -> str | None:
    """The name of the first floating-point tensor in `tensors` (name -> tensor, nested dicts and
    lists too) holding a NaN or an infinity; None when all are finite."""
    flat = []

    def walk(name, t):
        if isinstance(t, dict):
            for k, v in t.items():
                walk(f"{name}.{k}" if name else str(k), v)
        elif isinstance(t, (list, tuple)):
            for i, v in enumerate(t):
                walk(f"{name}.{i}", v)
        elif isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel():
            flat.append((name, t))

    walk("", tensors)
    finite = {}
    for device in {t.device for _, t in flat}:  # one synchronisation per device
        here = [(name, t) for name, t in flat if t.device == device]
        finite.update(zip([name for name, _ in here],
                          torch.stack([torch.isfinite(t.detach()).all() for _, t in here]).tolist()))
    return next((name for name, _ in flat if not finite[name]), None)


def finite_values(row: dict) -> dict:
    """`row` (a metrics line) when every number in it is finite, else Diverged naming one that is not."""
    bad = next((k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)), None)
    if bad:
        raise Diverged(f"{bad} = {row[bad]}")
    return row


def phase_steps(config: dict, phase: int, dataset_len: int) -> int:
    t = config["train"]
    if phase == 0 and t["base"] == "pretrained":
        return 0
    if t["epochs"] > 0:
        return max(1, math.ceil(t["epochs"] * dataset_len / t["batch_size"]))
    if phase == 0 and t["base_steps"] > 0:
        return t["base_steps"]
    return t["steps"]


def lr_at(step: int, total: int, config: dict) -> float:
    """Linear warmup then cosine decay to zero, per phase."""
    t = config["train"]
    warmup = int(t["warmup_fraction"] * total)
    if step < warmup:
        return t["lr"] * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * t["lr"]


def batch_indices(seed: int, salt: int, n: int, batch_size: int, step: int) -> list[int]:
    """Indices of batch `step`: an endless sequence of seeded permutations, so a resumed run sees
    exactly the batches an uninterrupted one would, from the step number alone."""
    start, out = step * batch_size, []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + salt * 7919 + epoch))
        out.extend(perm[offset: offset + batch_size - len(out)].tolist())
    return out


class StepBatches(Sampler):
    """Batch sampler over steps start..total-1: yields this rank's slice of each step's global
    batch `indices(step)` (the strategy's step_indices, a function of the step alone)."""

    def __init__(self, indices, start, total, rank=0, world=1):
        self.indices, self.start, self.total, self.rank, self.world = indices, start, total, rank, world

    def __len__(self):
        return self.total - self.start

    def __iter__(self):
        for step in range(self.start, self.total):
            idx = self.indices(step)
            per_rank = len(idx) // self.world
            yield idx[self.rank * per_rank: (self.rank + 1) * per_rank]


def collate(tokenizer, items):
    """(image, caption, id) items -> (images [B, C, H, W], tokens [B, context])."""
    return torch.stack([it[0] for it in items]), tokenizer([it[1] for it in items])


def make_optimizer(model, config):
    t = config["train"]
    # As open_clip: no weight decay on gains, biases, embeddings' norms and the logit scale.
    no_decay = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if no_decay(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in params if not no_decay(n, p)], "weight_decay": t["weight_decay"]}]
    # fused: one kernel for all parameters (several times faster on the CPU than foreach)
    return torch.optim.AdamW(groups, lr=t["lr"], betas=(t["beta1"], t["beta2"]), eps=t["eps"], fused=True)


def encode(model, images, tokens):
    return F.normalize(model.encode_image(images), dim=-1), F.normalize(model.encode_text(tokens), dim=-1)


def unwrap(model):
    return model.module if hasattr(model, "module") else model




# ----------------------------------------------------------------------------- the trainer

def phase_salt(strategy_dir: str, phase: int) -> int:
    """What makes a (strategy directory, phase)'s draws its own: its batch order (Trainer.order) and
    the global generator at its start (Trainer.train_phase)."""
    return phase * 131 + sum(map(ord, strategy_dir))


class Trainer:
    def __init__(self, config: dict, run: RunDir, dist: Dist, report_to: str | None = None):
        self.config, self.run, self.dist = config, run, dist
        self.report = TensorBoardReport(run, config["run"]["seed"]) if report_to and dist.main else None
        self.device = resolve_device(config["run"]["device"])
        m = config["model"]
        self.model, transforms, self.tokenizer = create_model(m["name"], m["pretrained"] or None, m["precision"],
                                                              self.device)
        self.stream = build_stream(config["data"]["stream"], config["data"], image_size=image_size(self.model),
                                   preprocess=transforms, seed=config["run"]["seed"])
        if config["train"]["base"] == "pretrained":
            self.stream = with_pretrained_base(self.stream)
        for name in config["run"]["strategies"]:
            get_strategy(name).check_stream(self.stream)  # e.g. zscl needs a reference set
        self.num_phases = len(self.stream.phases)
        # What a fine trace embeds: the seen probe sets and their calibration sets, cut to their first
        # images (novel probe sets are read at checkpoints only: the disorder series are on seen data)
        self.fine_probes = [p.head(config["train"]["trace_size"]) for p in self.stream.probes
                            if p.kind in FINE_TRACE_KINDS]
        self.base_reference: DomainEmbeddings | None = None  # read once the base phase has ended
        self.bar = None
        self.stop: StopRequest | None = None  # set by main: SIGINT/SIGTERM stop at the next step
        self.out: Path | None = None  # set by main: the --out a resume names (a multi-seed run's root)
        self.job: str | None = None  # set by run_job: the one directory ("base" or a strategy) to train
        self.progress = None  # set by run_job: called (strategy_dir, phase, step, total) at each step
        # Mixed precision as open_clip: "amp" = float16 autocast with a gradient scaler on CUDA
        # (bfloat16 on the CPU), "amp_bf16" = bfloat16 autocast; other precisions cast the weights.
        precision = m["precision"]
        self.autocast, self.scaler = contextlib.nullcontext, None
        if precision in ("amp", "amp_bf16"):
            half = torch.float16 if precision == "amp" and self.device.type == "cuda" else torch.bfloat16
            self.autocast = functools.partial(torch.autocast, self.device.type, dtype=half)
            if half is torch.float16:
                self.scaler = torch.amp.GradScaler(self.device.type)

    def small_phases(self) -> list:
        """The phases with fewer pairs than a batch: their batches would repeat pairs."""
        return [p for p in self.stream.phases if 0 < len(p.train) < self.config["train"]["batch_size"]]

    def check_batches(self) -> None:
        small = self.small_phases()
        if small and not self.config["train"]["allow_repeats"]:
            raise ConfigError(f"train.batch_size ({self.config['train']['batch_size']}) is larger than phase "
                              f"{small[0].name!r} ({len(small[0].train)} pairs): its batches would repeat pairs, "
                              "copies being each other's negatives; lower train.batch_size, or set "
                              "train.allow_repeats=true")

    # -- evaluation and checkpoints (rank 0 only)

    def save(self, strategy_dir: str, phase: int, step: int, phase_end: bool, optimizer, strategy) -> None:
        """Checkpoint, trace, eval line and state at `step`. A finite loss can still leave non-finite
        weights after its step: they are checked first, and then nothing is written."""
        bad = first_nonfinite({"weights": unwrap(self.model).state_dict(), "optimizer": optimizer.state_dict(),
                               "strategy": strategy.state_dict()})
        if bad:
            raise Diverged(f"{bad} is not finite")
        self.save_checkpoint(strategy_dir, phase, step, phase_end, strategy.checkpoint_weights(unwrap(self.model)))
        self.save_state(strategy_dir, phase, step, optimizer, strategy)

    def save_checkpoint(self, strategy_dir: str, phase: int, step: int, phase_end: bool,
                        weights: dict | None = None) -> None:
        """`weights`: the open_clip state dict to write (default: the model's own)."""
        model = unwrap(self.model)
        weights = model.state_dict() if weights is None else weights
        embeddings = {p.name: embed_probe(model, self.tokenizer, p, self.device, self.config["train"]["eval_batch_size"],
                                          self.config["data"]["num_workers"])
                      for p in self.stream.probes}
        bad = first_nonfinite({"probe embeddings": {n: vars(e) for n, e in embeddings.items()}})
        if bad:
            raise Diverged(f"{bad} is not finite")
        # The trace before its checkpoint: a reader (geomlab.analyze on a run in progress) never finds
        # a checkpoint whose trace is still to come.
        write_trace(self.run.trace_path(strategy_dir, phase, step),
                    Trace(domains=embeddings, phase=phase, step=step, model=self.config["model"]["name"],
                          extra={"strategy": strategy_dir}))
        # "epoch" = phase: open_clip's own checkpoints carry "epoch"
        atomic_torch_save(self.run.checkpoint_path(strategy_dir, phase, step), {
            "state_dict": weights, "name": self.config["model"]["name"], "phase": phase,
            "step": step, "strategy": strategy_dir, "phase_end": phase_end, "epoch": phase})
        # calibration sets are in the trace only (realignment fits): scoring them would cost a retrieval
        # pass each and put them beside the probes in every table that reads metrics.jsonl
        scored = {p.name for p in self.stream.probes if p.kind in SCORED_KINDS}
        retrieval = {name: retrieval_metrics(e.image, e.text, e.caption_image)
                     for name, e in embeddings.items() if name in scored}
        row = {"kind": "eval", "phase": phase, "step": step, "checkpoint": checkpoint_stem(phase, step),
               "phase_end": phase_end, "retrieval": retrieval}
        if self.stream.zeroshot:
            row["zeroshot"] = evaluate_zeroshot(model, self.tokenizer, self.stream.zeroshot, self.device,
                                                {name: e.image for name, e in embeddings.items()},
                                                self.config["train"]["eval_batch_size"])
        self.log_metrics(strategy_dir, row)
        self.report_drift_from_base(strategy_dir, phase, step, embeddings, fine=False)

    def save_fine_trace(self, strategy_dir: str, phase: int, step: int) -> None:
        """A fine trace at `step` (train.trace_every): the probe sets' first train.trace_size images
        and their captions, embedded; no weights, no optimizer, no eval line."""
        n = self.config["train"]["trace_size"]
        embeddings = embed_probes_together(unwrap(self.model), self.tokenizer, self.fine_probes, self.device,
                                           self.config["train"]["eval_batch_size"], self.config["data"]["num_workers"])
        bad = first_nonfinite({"fine trace embeddings": {name: vars(e) for name, e in embeddings.items()}})
        if bad:
            raise Diverged(f"{bad} is not finite")
        self.run.write_fine_trace(strategy_dir, Trace(domains=embeddings, phase=phase, step=step,
                                                      model=self.config["model"]["name"],
                                                      extra={"strategy": strategy_dir, "fine": "1", "trace_size": n}),
                                  phase, step)
        self.report_drift_from_base(strategy_dir, phase, step, embeddings, fine=True)

    def report_drift_from_base(self, strategy_dir: str, phase: int, step: int, embeddings: dict, fine: bool) -> None:
        """With --report-to: the first probe set's drift_from_base scalars of a trace, when there is a
        base model to measure from (the base's own phase-0 traces wait for report_base_phase)."""
        if self.report is None or not self.run.is_complete("base", 0):
            return
        probe = self.stream.probes[0].name
        if self.base_reference is None:
            end = [c for c in self.run.checkpoints("base") if c.phase == 0 and c.phase_end and c.trace]
            self.base_reference = read_trace(end[-1].trace).domains[probe]
        now = stored(embeddings[probe])  # as in the trace file: the scalars are the trace's
        drift = drift_from_base(self.base_reference.head(len(now.ids)), now)
        self.report.add_drift_from_base(strategy_dir, probe, drift, self.line_step(strategy_dir, phase, step), fine)

    def report_base_phase(self) -> None:
        """With --report-to, once the base phase has ended: drift_from_base of the base's phase-0
        traces, written before there was a base model to measure them from."""
        if self.report is None:
            return
        traces = [(c.step, c.trace, False) for c in self.run.checkpoints("base") if c.phase == 0 and c.trace]
        traces += [(step, path, True) for phase, step, path in self.run.fine_traces("base") if phase == 0]
        for step, path, fine in traces:
            self.report_drift_from_base("base", 0, step, read_trace(path).domains, fine)

    def log_metrics(self, strategy_dir: str, row: dict) -> None:
        """A metrics.jsonl row, and its scalars with --report-to tensorboard (rank 0 only)."""
        self.run.append_metrics(strategy_dir, row)
        if self.report is not None:
            self.report.add(strategy_dir, row, self.line_step(strategy_dir, row["phase"], row["step"]))

    def line_step(self, strategy_dir: str, phase: int, step: int) -> int:
        """`step` of `phase` counted from the start of the strategy's line: the base phase, then its own."""
        return step + sum(phase_steps(self.config, p, len(get_strategy(
            "finetune" if p == 0 else strategy_dir).train_data(self.stream, p))) for p in range(phase))

    def save_state(self, strategy_dir, phase, step, optimizer, strategy) -> None:
        self.run.make_durable()  # the metrics lines and fine traces this state vouches for
        atomic_torch_save(self.run.state_path(strategy_dir), {
            "phase": phase, "step": step, "model": unwrap(self.model).state_dict(),
            "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "strategy": strategy.state_dict()})

    # -- one phase

    def batches(self, data, indices, start: int, total: int):
        """(images, tokens) of steps start..total-1, this rank's share of `indices(step)` rows of
        `data`, on the device. Loaded by DataLoader workers (data.num_workers) in step order."""
        sampler = StepBatches(indices, start, total, self.dist.rank, self.dist.world)
        workers = self.config["data"]["num_workers"]
        loader = DataLoader(data, batch_sampler=sampler, num_workers=workers,
                            collate_fn=functools.partial(collate, self.tokenizer),
                            pin_memory=self.device.type == "cuda", persistent_workers=False,
                            prefetch_factor=4 if workers else None,
                            # its workers' base seed from a generator of its own, not from the global one,
                            # which a resumed phase restores before this loader starts (LoRA's dropout
                            # then draws what an uninterrupted run draws)
                            generator=torch.Generator().manual_seed(self.config["run"]["seed"] * 7_919 + start))
        for images, tokens in loader:
            yield images.to(self.device, non_blocking=True), tokens.to(self.device, non_blocking=True)

    def train_step(self, strategy, optimizer, images, tokens, step: int, lr: float):
        for group in optimizer.param_groups:
            group["lr"] = lr
        with self.autocast():
            # The model's own forward (not encode_*), so that DistributedDataParallel sees the step.
            image, text, logit_scale = self.model(images, tokens)[:3]
            feats = Features(image=image, text=text, image_all=self.dist.gather(image),
                             text_all=self.dist.gather(text), logit_scale=logit_scale,
                             row_offset=self.dist.rank * image.shape[0])
            loss, parts = strategy.loss(images, tokens, feats, step)
        # A NaN or infinite loss (or logit scale) stops training before its step is applied, on
        # every rank alike (each rank's loss is its own share).
        finite = (torch.isfinite(loss.detach()).all() & torch.isfinite(logit_scale.detach()).all()).to(torch.int32)
        if self.dist.world > 1:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not finite.item():
            raise Diverged(f"loss = {loss.item():g}, logit scale = {logit_scale.detach().flatten()[0].item():g}"
                           if self.dist.world == 1 else "loss or logit scale is not finite on some rank")
        optimizer.zero_grad(set_to_none=True)
        # Kernel losses are this rank's share of the full-batch loss; DDP averages gradients.
        if self.scaler is None:
            (loss * self.dist.world).backward()
            optimizer.step()
        else:
            self.scaler.scale(loss * self.dist.world).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        with torch.no_grad():
            unwrap(self.model).logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        return loss, parts

    def order(self, salt: int, n: int, size: int, step: int, stream: int = 0) -> list[int]:
        """`size` rows of a dataset of n items for `step` (batch_indices); `stream` > 0 gives
        orders independent of the phase's own (stream 0)."""
        return batch_indices(self.config["run"]["seed"], salt + 100_003 * stream, n, size, step)

    def load_batch(self, dataset, rows):
        """(images, tokens) of `rows` of `dataset`, collated and on the device (no DataLoader)."""
        items = dataset.__getitems__(rows) if hasattr(dataset, "__getitems__") else [dataset[i] for i in rows]
        images, tokens = collate(self.tokenizer, items)
        return images.to(self.device), tokens.to(self.device)

    def make_strategy(self, strategy_dir: str, strategy_name: str, phase: int):
        """The strategy for a phase, its config section as keyword arguments; call it while the
        model holds the phase-start weights."""
        cls = get_strategy(strategy_name)
        frozen = lambda: copy.deepcopy(unwrap(self.model)).eval().requires_grad_(False)  # noqa: E731
        base = None
        if cls.needs_base_model:
            base = frozen()
            base.load_state_dict(state_dict_of(load_checkpoint(self.run.phase_end_checkpoint("base", 0))))
        salt = phase_salt(strategy_dir, phase)
        save = functools.partial(self.run.save_strategy_state, strategy_dir) if self.dist.main else lambda *a: None
        context = PhaseContext(
            stream=self.stream, phase=phase, data=cls.train_data(self.stream, phase),
            batch_size=self.config["train"]["batch_size"], order=functools.partial(self.order, salt),
            load_batch=self.load_batch, encode=encode, gather=self.dist.gather,
            load_state=functools.partial(self.run.load_strategy_state, strategy_dir), save_state=save,
            previous_model=frozen() if cls.needs_previous_model else None, base_model=base,
            seed=self.config["run"]["seed"], rank=self.dist.rank, world=self.dist.world, tokenizer=self.tokenizer,
            all_sum=self.dist.all_sum)
        return cls(context, **self.config[cls.name])

    def train_phase(self, strategy_dir: str, strategy_name: str, phase: int, start_checkpoint: Path | None) -> None:
        cfg, t = self.config, self.config["train"]
        if phase == 0 and t["base"] == "pretrained":  # no base phase: the weights as loaded end phase 0
            self.dist.on_main(lambda: self.save_checkpoint(strategy_dir, phase, 0, True))
            self.dist.on_main(lambda: self.run.mark_complete(strategy_dir, phase))
            self.dist.on_main(self.report_base_phase)
            return
        state, start = self.run.load_state(strategy_dir), 0
        total = phase_steps(cfg, phase, len(get_strategy(strategy_name).train_data(self.stream, phase)))
        if state is not None and state["phase"] == phase and state["step"] == total:
            # Stopped between the phase-end state and marking the phase complete: its checkpoint is
            # written (before the state), nothing is left to train.
            self.dist.on_main(lambda: self.run.mark_complete(strategy_dir, phase))
            if strategy_dir == "base":
                self.dist.on_main(self.report_base_phase)
            return
        # The global generator (peft's dropout: lora, cclip) starts every phase from the run's seed and
        # the phase's own salt, so that a phase draws the same whatever this process trained before it
        # (the strategies before it in a sequential run, a job of --executor ray, a strategy added by
        # --resume); a phase resumed mid-way restores its state's generator below.
        torch.manual_seed(self.config["run"]["seed"] * 1_000_003 + phase_salt(strategy_dir, phase))
        strategy = self.make_strategy(strategy_dir, strategy_name, phase)
        data = strategy.start_phase(unwrap(self.model))  # what strategy.step_indices index
        if self.dist.world > 1:
            # Over the parameters the strategy leaves trainable (lora: its adapters), built anew each phase
            self.model = torch.nn.parallel.DistributedDataParallel(unwrap(self.model))
        optimizer = make_optimizer(self.model, cfg)
        if state is not None and state["phase"] == phase:  # resume mid-phase
            unwrap(self.model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            if self.scaler is not None:
                self.scaler.load_state_dict(state["scaler"])
            strategy.load_state_dict(state.get("strategy", {}))
            start = state["step"]
        if start and self.dist.main:
            tqdm.write(f"resuming {strategy_dir} phase {phase} at step {start} of {total} "
                       f"(from {self.run.state_path(strategy_dir)})", file=sys.stderr)
        # Where a --resume after a divergence would start from.
        last_good = self.run.checkpoint_path(strategy_dir, phase, start) if start else start_checkpoint
        # Lines logged and fine traces written after the state we start from (a crash) are dropped:
        # they will be written again.
        self.dist.on_main(lambda: (self.run.truncate_metrics(strategy_dir, phase, start),
                                   self.run.truncate_fine_traces(strategy_dir, phase, start)))
        every, fine_every = t["checkpoint_every"], t["trace_every"]

        def fine_trace(step: int) -> None:
            try:
                self.dist.on_main(lambda: self.save_fine_trace(strategy_dir, phase, step))
            except Diverged as e:
                raise self.diverged(strategy_dir, phase, step, e, last_good, "nothing of it written") from None

        self.model.train()
        self.bar.set_description(f"{strategy_dir} phase {phase}/{self.num_phases - 1}")
        if fine_every and start == 0:  # the phase-start weights (a resumed phase has its trace already)
            fine_trace(0)
        for step, (images, tokens) in enumerate(self.batches(data, strategy.step_indices, start, total), start=start):
            done = step + 1
            try:
                loss, parts = self.train_step(strategy, optimizer, images, tokens, step, lr_at(step, total, cfg))
            except Diverged as e:
                raise self.diverged(strategy_dir, phase, done, e, last_good, "the step was not applied") from None
            strategy.after_step(unwrap(self.model), done)
            if done == total:
                strategy.end_phase(unwrap(self.model))  # may set the phase's result weights (WiSE-FT, ZSCL)
            self.bar.update(1)
            if self.progress is not None:
                self.progress(strategy_dir, phase, done, total)
            if done % t["log_every"] == 0 or done == total:
                row = {"kind": "train", "phase": phase, "step": done, "loss": loss.item(),
                       "lr": optimizer.param_groups[0]["lr"],
                       "logit_scale": unwrap(self.model).logit_scale.exp().item()}
                row.update({k: float(v.detach()) for k, v in parts.items()})
                try:
                    self.dist.on_main(lambda: self.log_metrics(strategy_dir, finite_values(row)))
                except Diverged as e:
                    raise self.diverged(strategy_dir, phase, done, e, last_good, "nothing of it written") from None
                self.bar.set_postfix(loss=f"{loss.item():.3f}")
            # Before the checkpoint and its state: a state at `done` implies the fine trace at `done`.
            if fine_every and (done % fine_every == 0 or done == total):
                fine_trace(done)
            if done == total or (every and done % every == 0):
                try:
                    self.dist.on_main(lambda: self.save(strategy_dir, phase, done, done == total, optimizer, strategy))
                except Diverged as e:
                    raise self.diverged(strategy_dir, phase, done, e, last_good, "nothing of it written") from None
                last_good = self.run.checkpoint_path(strategy_dir, phase, done)
            if done < total and self.stop_requested():
                if not (every and done % every == 0):  # (a checkpoint step has just saved its state)
                    self.dist.on_main(lambda: self.save_state(strategy_dir, phase, done, optimizer, strategy))
                raise Interrupted(f"interrupted at {strategy_dir} phase {phase} step {done}; saved "
                                  f"{self.run.state_path(strategy_dir)}; continue with: python -m geomlab.train "
                                  f"--out {self.out or self.run.root} --resume")
        self.dist.on_main(lambda: self.run.mark_complete(strategy_dir, phase))
        if strategy_dir == "base":
            self.dist.on_main(self.report_base_phase)

    def stop_requested(self) -> bool:
        """A SIGINT/SIGTERM arrived (on any rank: the ranks agree, so that all stop at one step)."""
        flag = self.stop is not None and self.stop.signal is not None
        if self.dist.world > 1:
            t = torch.tensor([int(flag)], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def diverged(self, strategy_dir, phase, step, error, last_good, what) -> Diverged:
        """The one-line report of a divergence at `step` of `phase`."""
        good = last_good or "none yet (phase 0 begins again)"
        return Diverged(f"{strategy_dir} phase {phase} step {step}: {error}, training stopped ({what}); last "
                        f"good checkpoint: {good}; lower train.lr (now {self.config['train']['lr']:g}) and rerun "
                        f"with --resume")

    def barrier(self):
        if self.dist.world > 1:
            torch.distributed.barrier()

    # -- the whole run

    def todo(self, every: bool = False) -> list[tuple[str, str, int]]:
        """(strategy_dir, strategy, phase) still to train; phase 0 trains the shared base with finetune.
        Only the job's directory when run_job set one, unless `every`."""
        strategies = self.config["run"]["strategies"]
        plan = [("base", "finetune", 0)] + [(s, s, p) for s in strategies for p in range(1, self.num_phases)]
        return [(d, s, p) for d, s, p in plan if not self.run.is_complete(d, p)
                and (every or self.job is None or d == self.job)]

    def fit(self) -> None:
        todo = self.todo()
        steps = {(d, p): phase_steps(self.config, p, len(get_strategy(s).train_data(self.stream, p)))
                 for d, s, p in todo}
        done_before = sum(self.run.resume_step(d, p) for d, _, p in todo)
        self.bar = tqdm(total=sum(steps.values()), initial=done_before, unit="step", dynamic_ncols=True,
                        disable=not self.dist.main, mininterval=1.0)
        for strategy_dir, strategy_name, phase in todo:
            previous = None
            if strategy_dir != "base":
                # Phase-start weights: every strategy starts phase 1 from the same base model.
                previous = self.run.phase_end_checkpoint("base" if phase == 1 else strategy_dir, phase - 1)
                unwrap(self.model).load_state_dict(state_dict_of(load_checkpoint(previous)))
            self.train_phase(strategy_dir, strategy_name, phase, previous)
        self.bar.close()
        if self.report is not None:
            self.report.close()


def describe(trainer: "Trainer", config: dict, root: RunDir) -> str:
    """What a run of `config` would train (`--dry-run`): phases, probe sets, strategies, steps."""
    stream, t = trainer.stream, config["train"]
    seeds = config["run"]["seeds"] or [config["run"]["seed"]]
    lines = [f"would write {root.root} · model {config['model']['name']} (pretrained: "
             f"{config['model']['pretrained'] or 'none'}) · device {trainer.device} · seeds {seeds} · batch "
             f"{t['batch_size']}", "phases:"]
    for p, phase in enumerate(stream.phases):
        n = len(phase.train)
        steps = phase_steps(config, p, n)
        if not steps:  # train.base = "pretrained"
            lines.append(f"  {p} {phase.name:24s} {n:>9,} pairs  {steps:>6,} steps: the model.pretrained "
                         "weights are the base model")
            continue
        who = "base model" if p == 0 else "each strategy"
        lines.append(f"  {p} {phase.name:24s} {n:>9,} pairs  {steps:>6,} steps ({steps * t['batch_size'] / n:.1f} "
                     f"epochs), {who}")
    lines.append("probe sets (images, captions; the phases that train on their data):")
    for probe in stream.probes:
        measured = ", ".join(map(str, probe.phases)) or "none (never trained on)"
        lines.append(f"  {probe.name:26s} {len(probe.ids):>7,} {len(probe.captions):>7,}  phase {measured}"
                     + ("" if probe.kind == SEEN_KIND else f" ({probe.kind})"))
    if stream.reference is not None:
        lines.append(f"reference set: {len(stream.reference):,} pairs, {len(stream.reference_texts or []):,} texts")
    for zs in stream.zeroshot:
        lines.append(f"zero-shot: {zs.name} ({len(zs.labels):,} images, {len(zs.classes)} classes)")
    lines.append("strategies:")
    for name in config["run"]["strategies"]:
        options = ", ".join(f"{k}={v}" for k, v in config.get(name, {}).items())
        lines.append(f"  {name}" + (f" ({options})" if options else ""))
    for phase in trainer.small_phases():
        allowed = ("allowed by train.allow_repeats" if t["allow_repeats"] else
                   "a run is refused unless train.allow_repeats = true")
        lines.append(f"warning: phase {phase.name!r} has {len(phase.train)} pairs, fewer than a batch "
                     f"({t['batch_size']}): its batches would repeat pairs ({allowed})")
    return "\n".join(lines)


def seed_runs(config: dict, root: RunDir) -> list[tuple[dict, RunDir]]:
    """(config, run directory) of each complete run to train: one per run.seeds inside `root`, each
    with run.seed = s and run.seeds = [] (a single-seed run of its own), or `root` itself."""
    if not config["run"]["seeds"]:
        return [(config, root)]
    runs = []
    for seed in config["run"]["seeds"]:
        one = copy.deepcopy(config)
        one["run"].update(seed=seed, seeds=[])
        runs.append((one, root.seed_run(seed)))
    return runs


def train_run(trainer: Trainer, config: dict, run: RunDir, dist: Dist, changed: dict, command: str | None = None) -> int:
    """Write the run's config.toml and run.json (recording what a resume `changed`), train every
    phase (the job's, under run_job), print the summary. 2 on bad data or a failed write, 3 when
    training diverged, 130 when stopped by SIGINT/SIGTERM. `command`: what run.json records as the
    command (default: this process's)."""

    def restart_for_data_policy():
        """A resume that changes a data policy (on_bad_sample, verify_images): allowed when every
        finished phase keeps its pairs; each unfinished phase then starts again from its start."""
        what = ", ".join(k for k in changed if k in DATA_POLICY_KEYS)
        before = run.run_json().get("phase_pairs")
        now = [len(p.train) for p in trainer.stream.phases]
        if before is None:
            raise RunDirError(f"{run.root}: its run.json does not record each phase's pairs (an older run), so "
                              f"a resume cannot check that changing {what} leaves its trained phases as they were")
        finished = {p for d in ["base", *config["run"]["strategies"]] for p in (run.completed_phases(d) or [])}
        for p in sorted(finished):
            if before[p] != now[p]:
                raise RunDirError(f"{run.root}: changing {what} changes phase {p} ({trainer.stream.phases[p].name}: "
                                  f"{before[p]} pairs trained, {now[p]} now), which is finished; start a new run "
                                  "with another --out")
        for d, _, p in trainer.todo(every=True):
            run.restart_phase(d, p)

    def start():
        if set(changed) & set(DATA_POLICY_KEYS):
            restart_for_data_policy()
        at = {}  # where each unfinished strategy directory resumes: the changes apply from there on
        for d, _, p in trainer.todo(every=True) if changed else ():
            at.setdefault(d, [p, run.resume_step(d, p)])
        if changed and not at:
            raise RunDirError(f"{run.root} holds a finished run: nothing is left to train with a different "
                              f"{', '.join(changed)}; choose another --out")
        run.create(dumps(config))
        run.write_run_json(config, trainer, __version__, command)
        if changed:
            run.record_resume(changed, at)

    try:
        dist.on_main(start)
        trainer.barrier()
        trainer.fit()
        dist.on_main(lambda: run.write_run_json(config, trainer, __version__, command))
    # a bad record found while loading (e.g. a truncated image, in a worker); a full disk; a NaN
    except (DataError, RunDirError, WriteError, Diverged) as e:
        if trainer.bar is not None:
            trainer.bar.close()
        if dist.main:
            hint = "; what was saved before is intact: make room and rerun with --resume" if isinstance(
                e, WriteError) else ""
            print(f"geomlab.train: error: {e}{hint}", file=sys.stderr)
        return 3 if isinstance(e, Diverged) else 2
    except Interrupted as e:
        if trainer.bar is not None:
            trainer.bar.close()
        if dist.main:
            print(str(e), file=sys.stderr)
        return 130
    if dist.main:
        print(run.summary(config))
        if trainer.stream.skipped:
            print(f"skipped {len(trainer.stream.skipped)} bad record(s) (data.on_bad_sample = \"skip\"); "
                  f"listed in {run.root / 'run.json'} under skipped_records")
    return 0


def run_job(config: dict, out, job: str, *, command: str, root=None, report_to: str | None = None,
            progress=None) -> int:
    """One job of a study (geomlab.executor): the phases of one directory of the single-seed run in
    `out` ("base": phase 0; a strategy: its phases 1..T), trained in this process as `python -m
    geomlab.train --out OUT --resume` trains them, beside the seed's other jobs. The trainer's exit
    status (0, 2, 3, 130), its error line printed as main prints it. `command`: the study's command
    (run.json's); `root`: the study's --out (what a resume names); `progress`: Trainer.progress."""
    run, dist, lock = RunDir(Path(out)), Dist(), None
    try:
        torch.manual_seed(config["run"]["seed"])
        trainer = Trainer(config, run, dist, report_to)
        trainer.job, trainer.progress = job, progress
        lock = run.lock(job=job, holder=f"{command} (its job {job} of {run.root})")
        # always as a resume: the driver checked the user's command; a retried job continues its run
        changes = run.check(config, dumps(config), resume=True)
    except (ConfigError, RunDirError, FileNotFoundError, ValueError) as e:
        if lock is not None:
            lock.release()
        print(f"geomlab.train: error: {e}", file=sys.stderr)
        return 2
    try:
        with StopRequest() as stop:
            trainer.stop, trainer.out = stop, Path(root or run.root)
            return train_run(trainer, config, run, dist, changes, command)
    finally:
        lock.release()


def main(argv=None) -> int:
    try:
        args = parse_args_or_hint(argv)
    except ConfigError as e:
        print(f"geomlab.train: error: {e}", file=sys.stderr)
        return 2
    dist, lock = Dist(), None
    try:
        check_report_to(args.report_to)
        if args.executor == "ray":
            from geomlab.executor import require_ray
            require_ray("geomlab.train")
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ConfigError("--executor ray runs each job of the study in a process of its own: start it "
                                  "with python, not torchrun (torchrun is how one run uses several GPUs)")
        config = resolve_config(args)
        root = RunDir(Path(args.out) if args.out else Path("runs") / config["run"]["name"])
        runs = seed_runs(config, root)
        dist = init_distributed(resolve_device(config["run"]["device"]))
        if config["train"]["batch_size"] % dist.world:
            raise ConfigError(f"train.batch_size ({config['train']['batch_size']}) must be a multiple of "
                              f"the number of processes ({dist.world})")

        def check() -> list[dict]:  # every rank, before any rank writes; what a resume changes
            if config["run"]["seeds"]:
                root.check(config, dumps(config), resume=args.resume)
            return [run.check(one, dumps(one), resume=args.resume) for one, run in runs]

        if args.dry_run:  # before any check of --out: a dry run looks at nothing there and writes nothing
            torch.manual_seed(runs[0][0]["run"]["seed"])
            print(describe(Trainer(*runs[0], dist), config, root))
            return 0
        check()
        torch.manual_seed(runs[0][0]["run"]["seed"])
        trainer = Trainer(*runs[0], dist, args.report_to)  # builds the model and the data stream; writes nothing
        trainer.check_batches()
        # One writer per run directory: rank 0 takes it for every rank, then checks again, as a
        # trainer that held it until now may have written meanwhile.
        lock = dist.on_main(root.lock)
        changes = check()
        trainer.barrier()  # no rank may still be checking once rank 0 writes (a half-written file fails the check)
    except (ConfigError, RunDirError, FileNotFoundError, ValueError) as e:
        if lock is not None:
            lock.release()
        if dist.main:
            print(f"geomlab.train: error: {e}", file=sys.stderr)
        return 2
    try:
        if config["run"]["seeds"]:
            try:
                dist.on_main(lambda: (root.create(dumps(config)), root.write_seeds_json(config, __version__)))
            except WriteError as e:
                if dist.main:
                    print(f"geomlab.train: error: {e}", file=sys.stderr)
                return 2
        if args.executor == "ray":  # every job on a Ray cluster; this process schedules and reports
            from geomlab.executor import Options, run_jobs, train_jobs
            return run_jobs(train_jobs(runs, root, changes, " ".join(sys.argv), args.report_to),
                            Options.of(args), root.root, "geomlab.train", "continue with the same command and --resume")
        with StopRequest() as stop:
            for k, (one, run) in enumerate(runs):
                if k:  # each seed its own base model, from its own initial weights
                    torch.manual_seed(one["run"]["seed"])
                    trainer = Trainer(one, run, dist, args.report_to)
                trainer.stop, trainer.out = stop, root.root
                status = train_run(trainer, one, run, dist, changes[k])
                if status:
                    return status
    finally:
        if lock is not None:
            lock.release()
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
