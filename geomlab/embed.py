"""Probe sets and their embeddings: what the trainer records at every checkpoint, and the traces the
analyser computes itself for checkpoints that have none."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader
from tqdm import tqdm

from geomlab.config import load_config
from geomlab.data import ProbeSet, build_stream, shapes
from geomlab.data.readers import ImageDataset
from geomlab.io import load_checkpoint
from geomlab.models import create_model, image_size, state_dict_of, weight_mismatch
from geomlab.rundir import Checkpoint, Source
from geomlab.traces import DomainEmbeddings, Trace, read_trace, write_trace


class EmbedError(ValueError):
    """Probe data or a checkpoint cannot be embedded; the message names it."""


def _rng_untouched(device):
    """Embedding draws nothing that training would otherwise draw (a DataLoader takes its base seed
    from torch's generator): a run's weights do not depend on how often it embeds its probes
    (train.checkpoint_every, train.trace_every)."""
    return torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else [])


@torch.no_grad()  # evaluation: no autograd graph to hold (the model may be mid-training)
def embed_probe(model, tokenizer, probe: ProbeSet, device, batch_size: int = 256,
                num_workers: int = 0) -> DomainEmbeddings:
    """L2-normalised image and text features of one probe set. Images that are not held decoded
    (real data over data.probe_cache_mb) are decoded by `num_workers` DataLoader workers."""
    with _rng_untouched(device):
        return _embed_probe(model, tokenizer, probe, device, batch_size, num_workers)


def _embed_probe(model, tokenizer, probe, device, batch_size, num_workers):
    was_training = model.training
    model.eval()
    images = []
    if isinstance(probe.images, ImageDataset):  # real data: held decoded, or decoded by workers
        batches = probe.images.batches(batch_size, device, num_workers)
    else:  # ShapeWorld's rendered images
        batches = DataLoader(probe.images, batch_size=batch_size, shuffle=False)
    for batch in batches:
        images.append(F.normalize(model.encode_image(batch.to(device)).float(), dim=-1).cpu())
    texts = []
    captions = list(probe.captions)
    for i in range(0, len(captions), batch_size):
        tokens = tokenizer(captions[i:i + batch_size]).to(device)
        texts.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    model.train(was_training)
    return DomainEmbeddings(
        image=torch.cat(images), text=torch.cat(texts), ids=probe.ids.clone(),
        caption_image=None if probe.one_caption_per_image else probe.caption_image.clone())


@torch.no_grad()
def embed_probes_together(model, tokenizer, probes: list[ProbeSet], device, batch_size: int = 256,
                          num_workers: int = 0) -> dict[str, DomainEmbeddings]:
    """embed_probe of each of `probes` (name -> embeddings), their images and their captions run
    through the model in shared batches: for small probe sets (a fine trace's) one forward per
    probe set would cost more in per-call overhead than in arithmetic."""
    with _rng_untouched(device):
        return _embed_probes_together(model, tokenizer, probes, device, batch_size, num_workers)


def _embed_probes_together(model, tokenizer, probes, device, batch_size, num_workers):
    was_training = model.training
    model.eval()
    loader = DataLoader(ConcatDataset([p.images for p in probes]), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    images = torch.cat([F.normalize(model.encode_image(batch.to(device)).float(), dim=-1).cpu() for batch in loader])
    captions = [c for p in probes for c in p.captions]
    texts = torch.cat([F.normalize(model.encode_text(tokenizer(captions[i:i + batch_size]).to(device)).float(),
                                   dim=-1).cpu() for i in range(0, len(captions), batch_size)])
    model.train(was_training)
    out = {}
    image_rows = torch.split(images, [len(p.ids) for p in probes])
    text_rows = torch.split(texts, [len(p.captions) for p in probes])
    for p, image, text in zip(probes, image_rows, text_rows):
        out[p.name] = DomainEmbeddings(image=image, text=text, ids=p.ids.clone(),
                                       caption_image=None if p.one_caption_per_image else p.caption_image.clone())
    return out


# ----------------------------------------------------------------------------- probe data


def check_probe_spec(spec: str | None) -> None:
    if spec is None or spec == "shapes":
        return
    p = Path(spec)
    if p.suffix != ".toml" or not p.is_file():
        raise EmbedError(f"--probe {spec!r}: expected 'shapes' or the path of an experiment config (.toml)")


def load_probes(spec: str, image_size: int) -> list[ProbeSet]:
    """The probe sets named by `spec`: 'shapes' (every ShapeWorld probe split and calibration split,
    as the default config has them) or an experiment config."""
    check_probe_spec(spec)
    if spec == "shapes":
        return shapes.probe_sets(seed=0, image_size=image_size, probe_size=200, domains=5)
    try:
        cfg = load_config(spec)
        return build_stream(cfg["data"]["stream"], cfg["data"], image_size=image_size, preprocess=None,
                            seed=cfg["run"]["seed"]).probes
    except (ValueError, KeyError, OSError) as e:
        raise EmbedError(f"--probe {spec}: {e}") from None


class Probes:
    """The probe data named by --probe ('shapes' or an experiment config) or, without it, by the
    run's own config.toml. Each image size's probe sets are built once."""

    def __init__(self, spec: str | None, config_path: Path | None):
        self.spec, self.config_path = spec, config_path
        self._sets: dict[int, list[ProbeSet]] = {}

    @property
    def known(self) -> bool:
        return self.spec is not None or self.config_path is not None

    @property
    def name(self) -> str:
        return str(self.spec or self.config_path)

    def sets(self, image_size: int) -> list[ProbeSet]:
        if image_size not in self._sets:
            if not self.known:
                raise EmbedError("traces are missing and no probe data is known: pass --probe shapes or "
                                 "--probe CONFIG.toml")
            self._sets[image_size] = load_probes(self.name, image_size)
        return self._sets[image_size]

    def captions(self) -> dict[str, ProbeSet]:
        """Probe sets by name, for their captions (hover text): those already built for embedding,
        else --probe's, else re-rendered from a ShapeWorld run's config; {} when none is known."""
        if self._sets:
            return {p.name: p for p in next(iter(self._sets.values()))}
        try:
            if self.spec is not None:
                return {p.name: p for p in self.sets(32)}
            if self.config_path is not None:
                cfg = load_config(self.config_path)
                if cfg["data"]["stream"] == "shapes":
                    opts = cfg["data"].get("shapes", {})
                    # image_size 8: only the captions are wanted, and they do not depend on it; no
                    # calibration sets: the analyser shows none (their kind is known by name)
                    sets = shapes.probe_sets(seed=int(opts.get("seed", cfg["run"]["seed"])), image_size=8,
                                             probe_size=cfg["data"]["probe_size"], domains=opts.get("domains", 5),
                                             novel_share=opts.get("novel_share", shapes.NOVEL_SHARE),
                                             calibration_size=0)
                    return {p.name: p for p in sets}
        except Exception:  # noqa: BLE001 - captions only label hover text; ids are shown otherwise
            return {}
        return {}


# ----------------------------------------------------------------------------- traces of checkpoints


class Embedder:
    """Traces for checkpoints that have none: each checkpoint is embedded once, cached as a trace
    under `cache_dir`, and the cache is reused while the checkpoint file, the model and the probe
    data stay the same."""

    def __init__(self, cache_dir, probes: Probes, model: str | None = None, device: str | torch.device = "cpu"):
        self.cache_dir, self.probes, self.model_name, self.device = Path(cache_dir), probes, model, device
        self._models: dict = {}

    def cache_path(self, c: Checkpoint) -> Path:
        return self.cache_dir / "traces" / c.strategy_dir / f"{c.stem}.safetensors"

    def _fingerprint(self, c: Checkpoint, model: str) -> dict:
        st = c.checkpoint.stat()
        return {"source": str(c.checkpoint.resolve()), "size": str(st.st_size), "mtime_ns": str(st.st_mtime_ns),
                "probe": self.probes.name, "embedded_model": model}

    def cached(self, c: Checkpoint) -> Trace | None:
        path = self.cache_path(c)
        if not path.is_file() or c.checkpoint is None:
            return None
        try:
            trace = read_trace(path)
        except ValueError:
            return None
        fp = self._fingerprint(c, self.model_name or trace.model)
        return trace if all(trace.extra.get(k) == v for k, v in fp.items()) else None

    def embed(self, c: Checkpoint) -> Trace:
        ckpt = load_checkpoint(c.checkpoint)
        # geomlab checkpoints name their architecture; an open_clip checkpoint's "name" is its experiment's
        name = self.model_name or (ckpt.get("name") if c.phase is not None else None)
        if not name:
            raise EmbedError(f"{c.checkpoint}: which architecture? pass --model NAME")
        if name not in self._models:
            try:
                model, _, tokenizer = create_model(name, device=self.device)
            except ValueError as e:
                raise EmbedError(f"--model: {e}") from None
            self._models[name] = model, tokenizer
        model, tokenizer = self._models[name]
        weights = state_dict_of(ckpt)
        mismatch = weight_mismatch(model, weights)
        if mismatch:
            raise EmbedError(f"{c.checkpoint}: weights do not fit model {name!r}: {mismatch}")
        model.load_state_dict(weights, strict=True)
        domains = {p.name: embed_probe(model, tokenizer, p, self.device) for p in self.probes.sets(image_size(model))}
        trace = Trace(domains=domains, phase=c.phase if c.phase is not None else 0, step=c.step or 0, model=name,
                      extra=self._fingerprint(c, name))
        write_trace(self.cache_path(c), trace)
        return read_trace(self.cache_path(c))  # float16, exactly what a later run reads from the cache


def load_traces(source: Source, embedder: Embedder, quiet: bool = False) -> dict:
    """key -> (Trace, how) for every checkpoint of every series; how = trace | cache | embedded."""
    out: dict = {}
    todo = []
    for cks in source.series.values():
        for c in cks:
            if c.key in out or c in todo:
                continue
            if c.trace is not None:
                out[c.key] = (read_trace(c.trace), "trace")
            else:
                todo.append(c)
    if todo and embedder.model_name is None and source.kind == "checkpoints":
        raise EmbedError(f"{source.root}: a directory of open_clip checkpoints needs --model NAME (and --probe)")
    if todo and not embedder.probes.known:
        raise EmbedError(f"{source.root}: {len(todo)} checkpoint(s) have no trace; pass --probe shapes or "
                         "--probe CONFIG.toml to embed them")
    for c in tqdm(todo, desc="embedding checkpoints", unit="ckpt", disable=quiet or not todo, file=sys.stderr):
        trace = embedder.cached(c)
        out[c.key] = (trace, "cache") if trace is not None else (embedder.embed(c), "embedded")
    return out
