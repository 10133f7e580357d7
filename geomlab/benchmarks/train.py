"""Training step time: geomlab's strategies' steps against a bare open_clip loop and finetune.

The bare loop is what a researcher would write by hand: same model, batch and optimizer, open_clip's
ClipLoss, the logit-scale clamp, no checkpoints. geomlab's steps run through the trainer's own
`batches` (DataLoader over the strategy's data and step_indices), `train_step` and the strategy's
`after_step`, in phase 1 of the stream (its start_phase, e.g. EWC's Fisher or the replay buffer's
update, runs once before timing; end_phase runs once per phase and is not timed). Targets:
finetune <= 1.15x bare; modx, lwf, der, zscl <= 1.5x finetune; ewc, er, wise <= 1.2x finetune;
lora, nsp <= 1.3x and cclip <= 1.6x finetune. Each row's start_phase_s is its phase start, timed once
(nsp: the input covariances and their eigendecompositions).
The `finetune+trace_every=N` row (`--trace-every`, default 10) is finetune writing a fine trace
every N steps as the trainer does (Trainer.save_fine_trace, the config's train.trace_size); target
<= 1.10x finetune, the fine-trace overhead train.trace_size is chosen by.
Variants are timed in interleaved blocks and the median block is reported, so that a slow moment
of the machine does not land on one variant only.

`--data csv` trains on a CSV image-text list instead (`--csv FILE`, or a generated one of real JPEGs)
and adds a `loader` row: the same DataLoader path with no training step, so its images/s against
the training variants' images/s shows whether loading (decode + open_clip transform, with
data.num_workers workers) is the bottleneck.
"""
from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time

import torch

from geomlab.runtime import DEVICES

from .common import print_table, write_json

FINE_TRACE_TARGET = 1.10  # fine traces every 10 steps may cost at most 10% of the training time
TARGETS = {"finetune": ("bare", 1.15), "modx": ("finetune", 1.5), "lwf": ("finetune", 1.5),
           "der": ("finetune", 1.5), "zscl": ("finetune", 1.5), "ewc": ("finetune", 1.2),
           "er": ("finetune", 1.2), "wise": ("finetune", 1.2), "lora": ("finetune", 1.3),
           "nsp": ("finetune", 1.3), "cclip": ("finetune", 1.6)}


def add_arguments(p) -> None:
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--model", default="geomlab-tiny")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--blocks", type=int, default=5, help="timed blocks per variant (interleaved)")
    p.add_argument("--trace-every", type=int, default=10, help="train.trace_every of the fine-trace row "
                   "(0 = no such row); --steps a multiple of it gives every block the same number of traces")
    p.add_argument("--trace-size", type=int, default=None, help="train.trace_size (default: the config's)")
    p.add_argument("--config", default=None, help="experiment TOML (default: the embedded one)")
    p.add_argument("--data", default="shapes", choices=["shapes", "csv"], help="training data (default shapes)")
    p.add_argument("--csv", default=None, metavar="FILE", help="CSV with filepath,title columns (--data csv); "
                   "default: a generated one of --csv-images real JPEGs of --csv-px pixels")
    p.add_argument("--csv-images", type=int, default=512)
    p.add_argument("--csv-px", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=None, help="data.num_workers (default: the config's)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: elapsed time; cpu: this process's CPU time (steadier on a shared machine, "
                        "best with OMP_NUM_THREADS=1)")
    p.add_argument("--strategies", default=",".join(TARGETS),
                   help="comma-separated strategies to time (default: every one with a target)")


def _trainer(args):
    from geomlab.config import load_config
    from geomlab.rundir import RunDir
    from geomlab.train import Dist, Trainer
    overrides = [f"model.name={args.model!r}", f"train.batch_size={args.batch_size}", f"run.device={args.device!r}"]
    if args.num_workers is not None:
        overrides.append(f"data.num_workers={args.num_workers}")
    if args.trace_size is not None:
        overrides.append(f"train.trace_size={args.trace_size}")
    if args.data == "csv":
        overrides += csv_overrides(args)
    config = load_config(args.config, overrides)
    return Trainer(config, RunDir(tempfile.mkdtemp(prefix="geomlab-bench-")), Dist())


def _write_jpegs(folder, name, n, px, start):
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["filepath,title"]
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        y, x = np.mgrid[:px, :px]
        a = np.stack([(x * (i % 7 + 1) + y) % 256, (y * (i % 5 + 1)) % 256, (x + y * i) % 256], -1).astype(np.uint8)
        a = np.clip(a.astype(np.int16) + rng.integers(-20, 20, a.shape), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(folder / f"{i}.jpg", quality=90)
        rows.append(f"{i}.jpg,a synthetic picture number {i} with pattern {i % 7} and {i % 5}")
    (folder / name).write_text("\n".join(rows) + "\n")
    return folder / name


def csv_overrides(args) -> list[str]:
    """A "datasets" stream over the CSV (plus a small generated probe CSV, which the stream needs)."""
    from pathlib import Path
    tmp = Path(tempfile.mkdtemp(prefix="geomlab-bench-csv-"))
    train_csv = Path(args.csv).resolve() if args.csv else _write_jpegs(tmp, "train.csv", args.csv_images, args.csv_px, 0)
    probe_csv = _write_jpegs(tmp / "probe", "probe.csv", 8, 64, 10 ** 6)
    return ['data.stream="datasets"', "data.probe_size=8",
            f'data.sources=[{{name="csv", format="csv", path="{train_csv}"}}, '
            f'{{name="probe", format="csv", role="probe", path="{probe_csv}"}}]']


def fine_trace_name(every: int) -> str:
    return f"finetune+trace_every={every}"


def _variants(trainer, names, trace_every: int = 0):
    """name -> (step(i, images, tokens), dataset, indices(step)): each variant with its own copy of
    the model, its own optimizer and its strategy started on phase 1 (bare: finetune's batches)."""
    from open_clip.loss import ClipLoss

    from geomlab.io import atomic_torch_save
    from geomlab.train import LOGIT_SCALE_MAX, lr_at, make_optimizer

    base_weights = copy.deepcopy(trainer.model.state_dict())
    pristine = copy.deepcopy(trainer.model)  # lora's start_phase changes its model: each variant copies this
    cfg = trainer.config
    phase = min(1, len(trainer.stream.phases) - 1)
    # the base model zscl distils from: here, the starting weights
    atomic_torch_save(trainer.run.checkpoint_path("base", 0, 0), {"state_dict": base_weights})
    variants, start_seconds = {}, {}

    # bare: a hand-written open_clip loop on the same batches
    bare_model = copy.deepcopy(trainer.model).train()
    bare_opt = make_optimizer(bare_model, cfg)
    clip_loss = ClipLoss()

    def bare(i, images, tokens):
        for g in bare_opt.param_groups:
            g["lr"] = lr_at(i, 1000, cfg)
        image, text, scale = bare_model(images, tokens)
        loss = clip_loss(image, text, scale)
        bare_opt.zero_grad(set_to_none=True)
        loss.backward()
        bare_opt.step()
        with torch.no_grad():
            bare_model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)

    for name in dict.fromkeys(["finetune", *names]):
        model = copy.deepcopy(pristine).train()
        trainer.model = model
        strategy = trainer.make_strategy(name, name, phase)
        t0 = time.perf_counter()
        data = strategy.start_phase(model)
        start_seconds[name] = time.perf_counter() - t0
        model.train()
        opt = make_optimizer(model, cfg)

        def step(i, images, tokens, model=model, strategy=strategy, opt=opt):
            trainer.model = model
            trainer.train_step(strategy, opt, images, tokens, i, lr_at(i, 1000, cfg))
            strategy.after_step(model, i + 1)
        variants[name] = (step, data, strategy.step_indices)
    if trace_every:
        finetune_step = variants["finetune"][0]

        def traced(i, images, tokens):  # the trainer's fine trace after every trace_every-th step
            finetune_step(i, images, tokens)
            if (i + 1) % trace_every == 0:
                trainer.save_fine_trace("bench", phase, i + 1)
        variants[fine_trace_name(trace_every)] = (traced, *variants["finetune"][1:])
    variants = {"bare": (bare, *variants["finetune"][1:]), **variants}
    if trainer.config["data"]["stream"] != "shapes":
        variants["loader"] = (lambda i, images, tokens: None, *variants["finetune"][1:])  # the DataLoader alone
    variants["start_phase_s"] = start_seconds
    return variants


def run(args) -> int:
    trainer = _trainer(args)
    names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        print(f"geomlab.bench train: error: --strategies: unknown {', '.join(unknown)}; valid: "
              f"{', '.join(TARGETS)}", file=sys.stderr)
        return 2
    if args.trace_every < 0:
        print("geomlab.bench train: error: --trace-every must be >= 0", file=sys.stderr)
        return 2
    variants = _variants(trainer, names, args.trace_every)
    start_seconds = variants.pop("start_phase_s")
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    blocks = {name: [] for name in variants}
    for name, (step, data, indices) in variants.items():  # warm-up
        for i, (images, tokens) in enumerate(trainer.batches(data, indices, 0, 3)):
            step(i, images, tokens)
    for b in range(args.blocks):
        for name, (step, data, indices) in variants.items():
            first = 3 + b * args.steps
            sync()
            t0 = clock()
            # Every variant loads its batches through the trainer's DataLoader, as a bare loop would.
            for i, (images, tokens) in enumerate(trainer.batches(data, indices, first, first + args.steps),
                                                 start=first):
                step(i, images, tokens)
            sync()
            blocks[name].append((clock() - t0) / args.steps)
    ms = {name: 1000 * statistics.median(times) for name, times in blocks.items()}
    rows = []
    for name in variants:
        row = {"variant": name, "ms_per_step": ms[name], "clock": args.clock, "model": args.model,
               "batch": args.batch_size,
               "threads": torch.get_num_threads(), "images_per_s": 1000 * args.batch_size / ms[name],
               "workers": trainer.config["data"]["num_workers"]}
        if name in start_seconds:
            row["start_phase_s"] = start_seconds[name]
        if name in TARGETS:
            ref, target = TARGETS[name]
            row.update({"vs": ref, "ratio": ms[name] / ms[ref], "target": target,
                        "meets": ms[name] / ms[ref] <= target})
        if args.trace_every and name == fine_trace_name(args.trace_every):
            row.update({"vs": "finetune", "ratio": ms[name] / ms["finetune"], "target": FINE_TRACE_TARGET,
                        "meets": ms[name] / ms["finetune"] <= FINE_TRACE_TARGET,
                        "trace_size": trainer.config["train"]["trace_size"]})
        rows.append(row)
    print_table(rows)
    if args.trace_every:
        traced = fine_trace_name(args.trace_every)
        # On a shared machine the median blocks can land on different loads; the fastest blocks are
        # each variant's least disturbed ones, so their ratio is the steadier estimate of the cost.
        fastest = {name: 1000 * min(blocks[name]) for name in ("finetune", traced)}
        print(f"fine traces (train.trace_size = {trainer.config['train']['trace_size']}, "
              f"{len(trainer.fine_probes)} probe sets, {torch.get_num_threads()} threads): median blocks "
              f"{1000 / ms['finetune']:.2f} steps/s with train.trace_every=0, {1000 / ms[traced]:.2f} with "
              f"train.trace_every={args.trace_every}: {100 * (ms[traced] / ms['finetune'] - 1):+.1f}% time per step; "
              f"fastest blocks {1000 / fastest['finetune']:.2f} and {1000 / fastest[traced]:.2f} steps/s: "
              f"{100 * (fastest[traced] / fastest['finetune'] - 1):+.1f}% (target <= "
              f"{100 * (FINE_TRACE_TARGET - 1):.0f}%)")
    if "loader" in ms:
        # Workers = 0: loading runs serially inside every step, so it bounds the step once it takes
        # half of it. Workers > 0: it overlaps the step, and bounds it once the loader alone is
        # nearly as slow as the step (the step then waits for data).
        workers = trainer.config["data"]["num_workers"]
        fastest = min(v for n, v in ms.items() if n != "loader")
        share = ms["loader"] / fastest
        limit = 0.8 if workers else 0.5
        print(f"loader alone: {1000 * args.batch_size / ms['loader']:.0f} images/s with {workers} worker(s); "
              f"fastest training step: {1000 * args.batch_size / fastest:.0f} images/s (loading included). "
              f"Loading = {100 * share:.0f}% of that step's time: it {'IS' if share >= limit else 'is not'} "
              f"the bottleneck ({'serial' if not workers else 'overlapped'} loading; limit {100 * limit:.0f}%).")
    write_json(args.json, "train", rows)
    return 0
