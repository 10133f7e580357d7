"""open_clip models: geomlab's small JSON configs registered with open_clip, open_clip's pretrained
tags (downloaded and cached by open_clip) and local weights (loaded by geomlab)."""
from __future__ import annotations

import contextlib
import logging
import socket
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch

CONFIG_DIR = Path(__file__).parent / "model_configs"
# geomlab-tiny, geomlab-small, ... become known to open_clip.create_model / get_tokenizer (a repeat
# registration rescans the same folder: harmless).
open_clip.add_model_config(CONFIG_DIR)

# What open_clip logs on the root logger about weights geomlab handles itself: the "initialized
# randomly" warning (geomlab loads a local file right after, or trains from scratch on purpose) and
# the download failure it raises again as an error of its own.
_HANDLED_MESSAGES = ("No pretrained weights loaded for model", "Failed to download weights for tag")
# Seconds the Hugging Face hub gets to accept a connection before a tag's download is tried offline.
HUB_PROBE_TIMEOUT = 3.0


class _DropHandled(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_HANDLED_MESSAGES)


@contextmanager
def _quiet_weight_messages():
    """Inside: open_clip's messages about weights geomlab handles itself are dropped (a filter on the
    root logger, where open_clip logs them, removed on exit); every other message passes."""
    root, drop = logging.getLogger(), _DropHandled()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def available_models() -> list[str]:
    return open_clip.list_models()


def check_model_name(name: str) -> None:
    if name not in available_models():
        geomlab_names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ValueError(f"unknown model {name!r}: use one of geomlab's {', '.join(geomlab_names)} "
                         "or any open_clip architecture (open_clip.list_models())")


def pretrained_kind(name: str, pretrained: str | None) -> str:
    """What `pretrained` names for model `name`: "" (nothing: random initialisation), "file" (a local
    open_clip or geomlab checkpoint) or "tag" (one of open_clip's pretrained tags for the model,
    open_clip.list_pretrained()). ValueError otherwise, listing the model's tags."""
    if not pretrained:
        return ""
    if Path(pretrained).expanduser().is_file():
        return "file"
    if open_clip.get_pretrained_cfg(name, pretrained):
        return "tag"
    tags = open_clip.list_pretrained_tags_by_model(name)
    if "/" in pretrained or "\\" in pretrained or Path(pretrained).suffix:
        raise ValueError(f"{pretrained} does not exist (a local checkpoint file"
                         f"{', or one of the open_clip tags of ' + name + ': ' + ', '.join(tags) if tags else ''})")
    if tags:
        raise ValueError(f"{pretrained!r} is neither a file nor an open_clip pretrained tag of {name}; "
                         f"its tags: {', '.join(tags)}")
    raise ValueError(f"{pretrained!r} is not a file, and {name} has no open_clip pretrained tags: "
                     "pass a local checkpoint file")


@contextmanager
def _hub_offline_when_unreachable(name: str, tag: str):
    """Inside: the Hugging Face hub client in its offline mode when the hub does not accept a
    connection within HUB_PROBE_TIMEOUT (cached weights still load, missing ones fail at once:
    online, the client retries an unreachable hub for about a minute). Yields the unreachable
    host, or "" when the hub answered, is not used, or offline mode was already set."""
    if not open_clip.get_pretrained_cfg(name, tag).get("hf_hub"):
        yield ""
        return
    from huggingface_hub import constants as hub

    url = urlparse(hub.ENDPOINT)
    try:
        if not hub.HF_HUB_OFFLINE:
            port = url.port or (443 if url.scheme == "https" else 80)
            socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT).close()
        yield ""
        return
    except OSError:
        pass
    hub.HF_HUB_OFFLINE = True  # read by the client at each request
    try:
        yield url.netloc
    finally:
        hub.HF_HUB_OFFLINE = False


def _download_error(name: str, tag: str, error: Exception, unreachable: str = "") -> ValueError:
    """One line: which weights could not be downloaded, why, and how to pass them as a file."""
    cfg = open_clip.get_pretrained_cfg(name, tag)
    hub = cfg.get("hf_hub", "")
    where = f"huggingface.co/{hub.rstrip('/')}" if hub else cfg.get("url", "its url")
    why = (f"{unreachable} cannot be reached and they are not in the local cache" if unreachable else
           str(error).split("Last error: ")[-1].split(". ")[0].strip().rstrip("."))
    return ValueError(f"model.pretrained: open_clip cannot download the {tag!r} weights of {name} ({why}); with no network, "
                      f"fetch them elsewhere (from {where}) and pass the file: --pretrained PATH")


def state_dict_of(checkpoint: dict) -> dict:
    """The model weights inside an open_clip/geomlab checkpoint (also accepts a bare state dict)."""
    sd = checkpoint.get("state_dict", checkpoint)
    if next(iter(sd), "").startswith("module."):  # saved from DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def create_model(name: str, pretrained: str | None = None, precision: str = "fp32",
                 device: str | torch.device = "cpu"):
    """(model, transforms, tokenizer), as open_clip.create_model_and_transforms builds them;
    transforms = {"train": open_clip's training image transform, "val": its evaluation one}.
    `pretrained`: an open_clip pretrained tag of the model (open_clip downloads and caches the
    weights, and its transforms follow the tag), or a local checkpoint file, loaded here."""
    from .io import load_checkpoint

    check_model_name(name)
    kind = pretrained_kind(name, pretrained)
    offline = _hub_offline_when_unreachable(name, pretrained) if kind == "tag" else contextlib.nullcontext("")
    with _quiet_weight_messages(), offline as unreachable:
        try:
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                name, pretrained=pretrained if kind == "tag" else None, precision=precision, device=device)
        except RuntimeError as e:
            if kind == "tag" and str(e).startswith("Failed to download"):
                raise _download_error(name, pretrained, e, unreachable) from None
            raise
    if kind == "file":
        sd = state_dict_of(load_checkpoint(Path(pretrained).expanduser()))
        mismatch = weight_mismatch(model, sd)
        if mismatch:
            raise ValueError(f"{pretrained}: weights do not fit model {name!r}: {mismatch}")
        model.load_state_dict(sd)
    return model, {"train": preprocess_train, "val": preprocess_val}, CachedTokenizer(open_clip.get_tokenizer(name))


class CachedTokenizer:
    """open_clip's tokenizer with a memo of each caption's token row: a stream's captions repeat
    (ShapeWorld's come from 864 per domain, probe captions are tokenized at every checkpoint) and
    open_clip's text cleaning and BPE cost about a fifth of a geomlab-tiny training step. At most
    `capacity` captions are kept; past that, new ones are tokenized without being kept."""

    def __init__(self, tokenizer, capacity: int = 200_000):
        self.tokenizer, self.capacity, self.rows = tokenizer, capacity, {}

    def __call__(self, texts, context_length: int | None = None):
        if context_length is not None or isinstance(texts, str):
            return self.tokenizer(texts, context_length) if context_length else self.tokenizer(texts)
        new = [t for t in dict.fromkeys(texts) if t not in self.rows]
        fresh = dict(zip(new, self.tokenizer(new))) if new else {}
        for text, row in fresh.items():
            if len(self.rows) < self.capacity:
                self.rows[text] = row
        return torch.stack([self.rows[t] if t in self.rows else fresh[t] for t in texts]) if texts else self.tokenizer(texts)

    def __getattr__(self, name):  # context_length, vocab_size, ... as open_clip's tokenizer has them
        return getattr(self.tokenizer, name)


def weight_mismatch(model, state_dict: dict, show: int = 3) -> str | None:
    """None when `state_dict` fits `model` key for key and shape for shape; else the first
    mismatches, named with their shapes (a wrong --model shows at once which tensors differ)."""
    own = model.state_dict()
    shape = lambda t: "×".join(map(str, t.shape)) or "scalar"  # noqa: E731
    parts = []
    differ = [k for k in state_dict if k in own and state_dict[k].shape != own[k].shape]
    if differ:
        parts.append(f"{len(differ)} tensor(s) of another shape, e.g. " + ", ".join(
            f"{k} {shape(state_dict[k])} in the file, {shape(own[k])} in the model" for k in differ[:show]))
    missing = [k for k in own if k not in state_dict]
    if missing:
        parts.append(f"{len(missing)} missing, e.g. " + ", ".join(f"{k} {shape(own[k])}" for k in missing[:show]))
    unexpected = [k for k in state_dict if k not in own]
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. " + ", ".join(
            f"{k} {shape(state_dict[k])}" for k in unexpected[:show]))
    return "; ".join(parts) or None


def image_size(model) -> int:
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)
