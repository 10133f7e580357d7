"""Synthetic geomlab run directories made of traces only: for tests, benchmarks and demos of the analyser.

Each strategy's spaces rotate by small random rotations (different for image and text, so the two
spaces desynchronise) plus noise that grows on the first probe set (so it is forgotten).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from geomlab.config import dumps, resolve
from geomlab.io import atomic_torch_save, atomic_write_json
from geomlab.probe_kinds import CALIBRATION_KIND, SEEN_KIND, calibration_name
from geomlab.rundir import RunDir, checkpoint_stem
from geomlab.traces import DomainEmbeddings, Trace, write_trace

from .retrieval import retrieval_metrics


def small_rotation(d: int, angle: float, gen: torch.Generator) -> torch.Tensor:
    """exp(K) for a random skew-symmetric K scaled so the largest eigen-angle is about `angle` radians."""
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    k = a - a.T
    k = k * (angle / torch.linalg.matrix_norm(k, ord=2))
    return torch.linalg.matrix_exp(k)


def synthetic_run(root, *, strategies=("finetune", "modx", "joint"), checkpoints: int = 12, domains: int = 5,
                  n: int = 500, d: int = 64, seed: int = 0, captions_per_image: int = 1, weights: bool = False,
                  calibration: int = 0, fine_rows: int = 0) -> Path:
    """Write runs/NAME-like `root`: run.json and traces for base (phase 0) and each strategy.

    A strategy has `checkpoints` checkpoints in all, counting the shared base phase-0 end one:
    phases 1..domains-1, spread evenly; probe set k is learned at phase k. With `captions_per_image`
    > 1 the traces carry `caption_image`. Each checkpoint also gets its metrics.jsonl "eval" row:
    retrieval from its trace and, standing in for a zero-shot set "domainK/i2t" per probe set,
    that probe set's image→text R@1. With `weights`, each checkpoint also gets a small .pt file (a
    state dict that drifts step by step, less for later strategies, from its own generator: the
    traces are the same either way), so that the weight distance from the base exists. With
    `calibration`, each probe set "domainK" has a calibration split "domainK/calibration" of that many
    pairs, drawn and moved like it; with `fine_rows`, every checkpoint also writes a fine trace of
    the first `fine_rows` pairs of each probe set (as `train.trace_every` does). Returns `root`.
    """
    run = RunDir(root)
    gen = torch.Generator().manual_seed(seed)
    names = [f"domain{k}" for k in range(domains)]
    base = {}
    sizes = {}
    for name in names:
        for split, size in ((name, n), (calibration_name(name), calibration)):
            if not size:
                continue
            img = F.normalize(torch.randn(size, d, generator=gen, dtype=torch.float64), dim=1)
            rep = img.repeat_interleave(captions_per_image, dim=0)
            txt = F.normalize(rep + 0.35 * torch.randn(rep.shape, generator=gen, dtype=torch.float64), dim=1)
            base[split] = (img, txt, torch.arange(size, dtype=torch.int64) + 10_000 * len(base))
            sizes[split] = size
    names_all = list(base)
    calibration_names = {calibration_name(name) for name in names}
    # the domain of each probe set and calibration split (a calibration split moves like its probe set)
    domain_of = {split: k for k, name in enumerate(names) for split in (name, calibration_name(name))}

    def caption_rows(size):
        return torch.arange(size).repeat_interleave(captions_per_image) if captions_per_image > 1 else None
    wgen = torch.Generator().manual_seed(seed + 1_000_003)
    base_weights = {"visual.proj": torch.randn(d, d, generator=wgen), "text.proj": torch.randn(d, d, generator=wgen),
                    "logit_scale": torch.tensor(2.6593), "positions": torch.arange(8)}

    def trace(state, phase, step, rows=None):
        def emb(v, size):
            size = size if rows is None else min(rows, size)
            ci = caption_rows(size)
            return DomainEmbeddings(v[0][:size].float(), v[1][:size * captions_per_image].float(), v[2][:size], ci)
        return Trace(domains={k: emb(v, sizes[k]) for k, v in state.items()}, phase=phase, step=step,
                     model="geomlab-tiny")

    def save(strategy_dir, state, phase, step, phase_end, w=None):
        if weights:
            atomic_torch_save(run.checkpoint_path(strategy_dir, phase, step), {
                "state_dict": w if w is not None else base_weights, "name": "geomlab-tiny", "phase": phase,
                "step": step, "strategy": strategy_dir, "phase_end": phase_end, "epoch": phase})
        t = trace(state, phase, step)
        write_trace(run.trace_path(strategy_dir, phase, step), t)
        if fine_rows:
            write_trace(run.fine_trace_path(strategy_dir, phase, step), trace(state, phase, step, fine_rows))
        retrieval = {k: retrieval_metrics(e.image, e.text, e.caption_image) for k, e in t.domains.items()}
        run.append_metrics(strategy_dir, {
            "kind": "eval", "phase": phase, "step": step, "checkpoint": checkpoint_stem(phase, step),
            "phase_end": phase_end, "retrieval": retrieval,
            "zeroshot": {f"{k}/i2t": m["image_to_text_R@1"] for k, m in retrieval.items()}})

    save("base", base, 0, 100, True)
    phases = max(domains - 1, 1)
    per_phase = [(checkpoints - 1) // phases + (1 if p < (checkpoints - 1) % phases else 0) for p in range(phases)]
    completed = {"base": [0]}
    for si, strategy in enumerate(strategies):
        scale = 1.0 / (1 + si)  # later strategies move less
        state = {k: (v[0].clone(), v[1].clone(), v[2]) for k, v in base.items()}
        w = dict(base_weights)
        for p, count in enumerate(per_phase, 1):
            for c in range(1, count + 1):
                new = {}
                for k, (img, txt, ids) in state.items():
                    di = domain_of[k]
                    ri = small_rotation(d, 0.08 * scale, gen)
                    rt = small_rotation(d, 0.05 * scale, gen)
                    noise = (0.12 if di == 0 else 0.03) * scale
                    img = F.normalize(img @ ri + noise * torch.randn(img.shape, generator=gen, dtype=torch.float64), dim=1)
                    txt = F.normalize(txt @ rt + noise * torch.randn(txt.shape, generator=gen, dtype=torch.float64), dim=1)
                    new[k] = (img, txt, ids)
                state = new
                w = {k: v + 0.02 * scale * torch.randn(v.shape, generator=wgen) if v.is_floating_point() else v
                     for k, v in w.items()}
                save(strategy, state, p, 50 * c, c == count, w)
        completed[strategy] = list(range(1, phases + 1))
    info = {"strategies": list(strategies), "phases": names, "probes": names_all, "completed": completed, "seed": seed,
            "device": "cpu", "model": "geomlab-tiny", "versions": {},
            "probe_phases": {name: [domain_of[name]] for name in names_all},
            "probe_kinds": {name: CALIBRATION_KIND if name in calibration_names else SEEN_KIND for name in names_all}}
    atomic_write_json(run.run_json_path, info)
    return run.root


def synthetic_study(root, seeds, *, strategies=("finetune", "modx", "joint"), **kw) -> Path:
    """Write a multi-seed run at `root` as `python -m geomlab.train --seeds` lays it out: config.toml
    and run.json listing the seeds, and one `synthetic_run` per seed (`kw` passed on) with its own
    config.toml (run.seed = s). Returns `root`."""
    run = RunDir(root)
    config = resolve({"run": {"seeds": list(seeds), "strategies": list(strategies)}})
    run.create(dumps(config))
    run.write_seeds_json(config, "synthetic")
    for s in seeds:
        synthetic_run(run.seed_run(s).root, strategies=strategies, seed=s, **kw)
        run.seed_run(s).create(dumps(resolve({"run": {"seed": s, "strategies": list(strategies)}})))
    return run.root
