"""open_clip models: geomlab's small JSON configs registered with open_clip, and local weights."""
from __future__ import annotations

from pathlib import Path

import open_clip
import torch

CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def register_model_configs() -> None:
    """Make geomlab-tiny, geomlab-small, ... known to open_clip.create_model / get_tokenizer."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def available_models() -> list[str]:
    register_model_configs()
    return open_clip.list_models()


def check_model_name(name: str) -> None:
    if name not in available_models():
        geomlab_names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ValueError(f"unknown model {name!r}: use one of geomlab's {', '.join(geomlab_names)} "
                         "or any open_clip architecture (open_clip.list_models())")


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
    `pretrained` is a local checkpoint path, loaded here; nothing is ever downloaded."""
    from .io import load_checkpoint

    check_model_name(name)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=None, precision=precision, device=device)
    if pretrained:
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"model.pretrained: {pretrained} does not exist")
        sd = state_dict_of(load_checkpoint(pretrained))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"{pretrained}: weights do not fit model {name!r} "
                             f"(missing {list(missing)[:4]}, unexpected {list(unexpected)[:4]})")
    return model, {"train": preprocess_train, "val": preprocess_val}, open_clip.get_tokenizer(name)


def image_size(model) -> int:
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)
