"""Training step time: geomlab's finetune and modx steps against a bare open_clip loop.

The bare loop is what a researcher would write by hand: same model, batch and optimizer, open_clip's
ClipLoss, the logit-scale clamp, no checkpoints. geomlab's steps run through the trainer's own
`fetch_batch` and `train_step`. Targets: finetune <= 1.15x bare, modx <= 1.5x finetune.
Variants are timed in interleaved blocks and the median block is reported, so that a slow moment
of the machine does not land on one variant only.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time

import torch

from .common import print_table, write_json

TARGETS = {"finetune": ("bare", 1.15), "modx": ("finetune", 1.5)}


def add_arguments(p) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="geomlab-tiny")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--blocks", type=int, default=5, help="timed blocks per variant (interleaved)")
    p.add_argument("--config", default=None, help="experiment TOML (default: the embedded one)")


def _trainer(args):
    from geomlab.config import load_config
    from geomlab.rundir import RunDir
    from geomlab.train import Dist, Trainer
    config = load_config(args.config, [f"model.name={args.model!r}", f"train.batch_size={args.batch_size}",
                                       f"run.device={args.device!r}"])
    return Trainer(config, RunDir(tempfile.mkdtemp(prefix="geomlab-bench-")), Dist())


def _variants(trainer):
    """name -> step(i) closures, each with its own copy of the model and its own optimizer."""
    from open_clip.loss import ClipLoss
    from geomlab.train import LOGIT_SCALE_MAX, lr_at, make_optimizer

    base_weights = copy.deepcopy(trainer.model.state_dict())
    cfg = trainer.config
    data = trainer.stream.phases[1].train
    variants = {}

    # bare: a hand-written open_clip loop on the same batches
    bare_model = copy.deepcopy(trainer.model).train()
    bare_opt = make_optimizer(bare_model, cfg)
    clip_loss = ClipLoss()

    def bare(i):
        images, tokens = trainer.fetch_batch(data, 0, i)
        for g in bare_opt.param_groups:
            g["lr"] = lr_at(i, 1000, cfg)
        image, text, scale = bare_model(images, tokens)
        loss = clip_loss(image, text, scale)
        bare_opt.zero_grad(set_to_none=True)
        loss.backward()
        bare_opt.step()
        with torch.no_grad():
            bare_model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
    variants["bare"] = bare

    for name in ("finetune", "modx"):
        trainer.model.load_state_dict(base_weights)
        model = copy.deepcopy(trainer.model).train()
        trainer.model = model
        strategy = trainer.make_strategy(name, 1)
        opt = make_optimizer(model, cfg)

        def step(i, model=model, strategy=strategy, opt=opt):
            trainer.model = model
            images, tokens = trainer.fetch_batch(data, 0, i)
            trainer.train_step(strategy, opt, images, tokens, lr_at(i, 1000, cfg))
        variants[name] = step
    return variants


def run(args) -> int:
    trainer = _trainer(args)
    variants = _variants(trainer)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    blocks = {name: [] for name in variants}
    for name, step in variants.items():  # warm-up
        for i in range(3):
            step(i)
    for b in range(args.blocks):
        for name, step in variants.items():
            sync()
            t0 = time.perf_counter()
            for i in range(args.steps):
                step(3 + b * args.steps + i)
            sync()
            blocks[name].append((time.perf_counter() - t0) / args.steps)
    ms = {name: 1000 * statistics.median(times) for name, times in blocks.items()}
    rows = []
    for name in variants:
        row = {"variant": name, "ms_per_step": ms[name], "model": args.model, "batch": args.batch_size,
               "threads": torch.get_num_threads()}
        if name in TARGETS:
            ref, target = TARGETS[name]
            row.update({"vs": ref, "ratio": ms[name] / ms[ref], "target": target,
                        "meets": ms[name] / ms[ref] <= target})
        rows.append(row)
    print_table(rows)
    write_json(args.json, "train", rows)
    return 0
