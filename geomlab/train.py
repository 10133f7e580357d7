"""python -m geomlab.train: continual CLIP training with geometry traces.

A base model is trained on phase 0; every strategy then continues from that same base model
through the remaining phases. Checkpoints, traces (probe embeddings) and retrieval metrics are
written every `train.checkpoint_every` steps and at each phase end; `--resume` continues an
interrupted run from its newest saved state, mid-phase included.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from geomlab import __version__
from geomlab.config import ConfigError, dumps, load_config
from geomlab.data import DataError, build_stream
from geomlab.embed import embed_probe
from geomlab.geometry import retrieval_metrics
from geomlab.io import atomic_torch_save, load_checkpoint
from geomlab.models import check_model_name, create_model, image_size, state_dict_of
from geomlab.rundir import RunDir, RunDirError, checkpoint_stem
from geomlab.runtime import resolve_device
from geomlab.strategies import Features, PhaseContext, get_strategy
from geomlab.traces import Trace, write_trace

LOGIT_SCALE_MAX = math.log(100)


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m geomlab.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="experiment TOML (default: the embedded experiments/shapes_5phase.toml)")
    p.add_argument("--strategies", help="comma-separated, shorthand for run.strategies")
    p.add_argument("--out", help="run directory (default: runs/<run.name>)")
    p.add_argument("--device", help="auto | cpu | cuda, shorthand for run.device")
    p.add_argument("--pretrained", help="local open_clip/geomlab checkpoint, shorthand for model.pretrained")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest saved state")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=3e-4")
    return p.parse_args(argv)


def resolve_config(args) -> dict:
    overrides = list(args.overrides)
    for flag, key in (("strategies", "run.strategies"), ("device", "run.device"), ("pretrained", "model.pretrained")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value!r}" if flag != "strategies" else f"{key}={value}")
    config = load_config(args.config, overrides)
    if not config["run"]["strategies"]:
        raise ConfigError("run.strategies is empty")
    for name in config["run"]["strategies"]:
        try:
            get_strategy(name)
        except ValueError as e:
            raise ConfigError(f"run.strategies: {e}") from None
    try:
        check_model_name(config["model"]["name"])
    except ValueError as e:
        raise ConfigError(f"model.name: {e}") from None
    if config["model"]["pretrained"] and not Path(config["model"]["pretrained"]).is_file():
        raise ConfigError(f"model.pretrained: {config['model']['pretrained']} does not exist")
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


def init_distributed(device: torch.device) -> Dist:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    import torch.distributed as dist
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Dist(rank=dist.get_rank(), world=dist.get_world_size())


# ----------------------------------------------------------------------------- pieces of a phase

def phase_steps(config: dict, phase: int, dataset_len: int) -> int:
    t = config["train"]
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
    """Batch sampler over steps start..total-1: yields this rank's slice of each step's indices."""

    def __init__(self, seed, salt, n, batch_size, start, total, rank=0, world=1):
        self.args = (seed, salt, n, batch_size)
        self.start, self.total, self.rank, self.per_rank = start, total, rank, batch_size // world

    def __len__(self):
        return self.total - self.start

    def __iter__(self):
        for step in range(self.start, self.total):
            idx = batch_indices(*self.args, step)
            yield idx[self.rank * self.per_rank: (self.rank + 1) * self.per_rank]


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

class Trainer:
    def __init__(self, config: dict, run: RunDir, dist: Dist):
        self.config, self.run, self.dist = config, run, dist
        self.device = resolve_device(config["run"]["device"])
        m = config["model"]
        self.model, transforms, self.tokenizer = create_model(m["name"], m["pretrained"] or None, m["precision"],
                                                              self.device)
        self.stream = build_stream(config["data"]["stream"], config["data"], image_size=image_size(self.model),
                                   preprocess=transforms, seed=config["run"]["seed"])
        self.num_phases = len(self.stream.phases)
        self.bar = None
        # Mixed precision as open_clip: "amp" = float16 autocast with a gradient scaler on CUDA
        # (bfloat16 on the CPU), "amp_bf16" = bfloat16 autocast; other precisions cast the weights.
        precision = m["precision"]
        self.autocast, self.scaler = contextlib.nullcontext, None
        if precision in ("amp", "amp_bf16"):
            half = torch.float16 if precision == "amp" and self.device.type == "cuda" else torch.bfloat16
            self.autocast = functools.partial(torch.autocast, self.device.type, dtype=half)
            if half is torch.float16:
                self.scaler = torch.amp.GradScaler(self.device.type)

    # -- evaluation and checkpoints (rank 0 only)

    def save_checkpoint(self, strategy_dir: str, phase: int, step: int, phase_end: bool) -> None:
        model = unwrap(self.model)
        # "epoch" = phase: open_clip's own checkpoints carry "epoch"
        atomic_torch_save(self.run.checkpoint_path(strategy_dir, phase, step), {
            "state_dict": model.state_dict(), "name": self.config["model"]["name"], "phase": phase,
            "step": step, "strategy": strategy_dir, "phase_end": phase_end, "epoch": phase})
        embeddings = {p.name: embed_probe(model, self.tokenizer, p, self.device, self.config["train"]["eval_batch_size"])
                      for p in self.stream.probes}
        write_trace(self.run.trace_path(strategy_dir, phase, step),
                    Trace(domains=embeddings, phase=phase, step=step, model=self.config["model"]["name"],
                          extra={"strategy": strategy_dir}))
        retrieval = {name: retrieval_metrics(e.image, e.text, e.caption_image) for name, e in embeddings.items()}
        self.run.append_metrics(strategy_dir, {"kind": "eval", "phase": phase, "step": step,
                                               "checkpoint": checkpoint_stem(phase, step), "phase_end": phase_end,
                                               "retrieval": retrieval})

    def save_state(self, strategy_dir, phase, step, optimizer) -> None:
        atomic_torch_save(self.run.state_path(strategy_dir), {
            "phase": phase, "step": step, "model": unwrap(self.model).state_dict(),
            "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {}})

    # -- one phase

    def batches(self, data, salt: int, start: int, total: int):
        """(images, tokens) of steps start..total-1, this rank's share, on the device. Loaded by
        DataLoader workers (data.num_workers) in the order the step numbers alone determine."""
        t = self.config["train"]
        sampler = StepBatches(self.config["run"]["seed"], salt, len(data), t["batch_size"], start, total,
                              self.dist.rank, self.dist.world)
        workers = self.config["data"]["num_workers"]
        loader = DataLoader(data, batch_sampler=sampler, num_workers=workers,
                            collate_fn=functools.partial(collate, self.tokenizer),
                            pin_memory=self.device.type == "cuda", persistent_workers=False,
                            prefetch_factor=4 if workers else None)
        for images, tokens in loader:
            yield images.to(self.device, non_blocking=True), tokens.to(self.device, non_blocking=True)

    def train_step(self, strategy, optimizer, images, tokens, lr: float):
        for group in optimizer.param_groups:
            group["lr"] = lr
        with self.autocast():
            # The model's own forward (not encode_*), so that DistributedDataParallel sees the step.
            image, text, logit_scale = self.model(images, tokens)[:3]
            feats = Features(image=image, text=text, image_all=self.dist.gather(image),
                             text_all=self.dist.gather(text), logit_scale=logit_scale,
                             row_offset=self.dist.rank * image.shape[0])
            loss, parts = strategy.loss(images, tokens, feats)
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

    def make_strategy(self, strategy_name: str):
        """The strategy for a phase, its config section as keyword arguments; call it while the
        model holds the phase-start weights."""
        cls = get_strategy(strategy_name)
        snapshot = copy.deepcopy(unwrap(self.model)).eval().requires_grad_(False) if cls.needs_previous_model else None
        context = PhaseContext(stream=self.stream, previous_model=snapshot, encode=encode, gather=self.dist.gather)
        return cls(context, **self.config[cls.name])

    def train_phase(self, strategy_dir: str, strategy_name: str, phase: int) -> None:
        cfg, t = self.config, self.config["train"]
        strategy = self.make_strategy(strategy_name)
        data = strategy.train_data(self.stream, phase)
        total = phase_steps(cfg, phase, len(data))
        optimizer = make_optimizer(self.model, cfg)
        state, start = self.run.load_state(strategy_dir), 0
        if state is not None and state["phase"] == phase:  # resume mid-phase
            unwrap(self.model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            if self.scaler is not None:
                self.scaler.load_state_dict(state["scaler"])
            start = state["step"]
        # Lines logged after the state we start from (a crash) are dropped: they will be logged again.
        if self.dist.main:
            self.run.truncate_metrics(strategy_dir, phase, start)
        every = t["checkpoint_every"]
        salt = phase * 131 + sum(map(ord, strategy_dir))

        self.model.train()
        self.bar.set_description(f"{strategy_dir} phase {phase}/{self.num_phases - 1}")
        for step, (images, tokens) in enumerate(self.batches(data, salt, start, total), start=start):
            loss, parts = self.train_step(strategy, optimizer, images, tokens, lr_at(step, total, cfg))
            done = step + 1
            self.bar.update(1)
            if self.dist.main and (done % t["log_every"] == 0 or done == total):
                row = {"kind": "train", "phase": phase, "step": done, "loss": loss.item(),
                       "lr": optimizer.param_groups[0]["lr"],
                       "logit_scale": unwrap(self.model).logit_scale.exp().item()}
                row.update({k: float(v.detach()) for k, v in parts.items()})
                self.run.append_metrics(strategy_dir, row)
                self.bar.set_postfix(loss=f"{loss.item():.3f}")
            if done == total or (every and done % every == 0):
                if self.dist.main:
                    self.save_checkpoint(strategy_dir, phase, done, phase_end=done == total)
                    self.save_state(strategy_dir, phase, done, optimizer)
                self.barrier()
        if self.dist.main:
            self.run.mark_complete(strategy_dir, phase)
        self.barrier()

    def barrier(self):
        if self.dist.world > 1:
            torch.distributed.barrier()

    # -- the whole run

    def fit(self) -> None:
        strategies = self.config["run"]["strategies"]
        # (strategy_dir, strategy, phase): phase 0 trains the shared base with finetune
        plan = [("base", "finetune", 0)] + [(s, s, p) for s in strategies for p in range(1, self.num_phases)]
        todo = [(d, s, p) for d, s, p in plan if not self.run.is_complete(d, p)]
        steps = {(d, p): phase_steps(self.config, p, len(get_strategy(s).train_data(self.stream, p)))
                 for d, s, p in todo}
        done_before = sum(self.run.resume_step(d, p) for d, _, p in todo)
        self.bar = tqdm(total=sum(steps.values()), initial=done_before, unit="step", dynamic_ncols=True,
                        disable=not self.dist.main, mininterval=1.0)
        for strategy_dir, strategy_name, phase in todo:
            if strategy_dir != "base":
                # Phase-start weights: every strategy starts phase 1 from the same base model.
                previous = self.run.phase_end_checkpoint("base" if phase == 1 else strategy_dir, phase - 1)
                unwrap(self.model).load_state_dict(state_dict_of(load_checkpoint(previous)))
            self.train_phase(strategy_dir, strategy_name, phase)
        self.bar.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = resolve_config(args)
        run = RunDir(Path(args.out) if args.out else Path("runs") / config["run"]["name"])
        dist = init_distributed(resolve_device(config["run"]["device"]))
        if config["train"]["batch_size"] % dist.world:
            raise ConfigError(f"train.batch_size ({config['train']['batch_size']}) must be a multiple of "
                              f"the number of processes ({dist.world})")
        run.check(config, dumps(config), resume=args.resume)  # every rank, before any rank writes
        torch.manual_seed(config["run"]["seed"])
        trainer = Trainer(config, run, dist)  # builds the model and the data stream; writes nothing
    except (ConfigError, RunDirError, FileNotFoundError, ValueError) as e:
        print(f"geomlab.train: error: {e}", file=sys.stderr)
        return 2
    trainer.barrier()
    if dist.main:
        run.create(dumps(config))
        run.write_run_json(config, trainer, __version__)
    if dist.world > 1:
        trainer.model = torch.nn.parallel.DistributedDataParallel(trainer.model)
    trainer.barrier()
    try:
        trainer.fit()
    except DataError as e:  # a bad record found while loading (e.g. a truncated image, in a worker)
        if trainer.bar is not None:
            trainer.bar.close()
        print(f"geomlab.train: error: {e}", file=sys.stderr)
        return 2
    if dist.main:
        run.write_run_json(config, trainer, __version__)
        print(run.summary(config))
        if trainer.stream.skipped:
            print(f"skipped {len(trainer.stream.skipped)} bad record(s) (data.on_bad_sample = \"skip\"); "
                  f"listed in {run.root / 'run.json'} under skipped_records")
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
