"""Experiment configs: TOML files, KEY=VALUE overrides, validated against one schema.

The schema is the default config below: every key a run may set, with its type taken from its
default. Unknown keys and wrong types are errors that name the key and list the valid ones.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import sys
from importlib import resources
from pathlib import Path

from geomlab.kernels import MODX_ALPHA, REDUCTIONS, ModxOptions
from geomlab.runtime import DEVICES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_EXPERIMENT = "shapes_5phase.toml"


class TableList:
    """Schema entry for a TOML array of tables (`[[data.sources]]`): each table is validated against
    `template` (missing keys take its defaults); the default value is an empty list."""

    def __init__(self, template: dict):
        self.template = template


# One source of real image-text data in a "datasets" stream ([[data.sources]], geomlab.data.phases).
SOURCE_TEMPLATE: dict = {
    "name": "",                  # phase / probe names derive from it
    "format": "",                # coco | karpathy | csv | wds
    "role": "train",             # train (phases) | probe (probe sets)
    "path": "",                  # annotation JSON, Karpathy JSON, CSV/TSV file, or tar shards ("a-{000..009}.tar")
    "images": "",                # image folder (coco, karpathy; csv: default = the CSV's folder)
    "splits": ["train"],         # karpathy: which "split" values to keep (train, restval, val, test)
    "k": 1,                      # split into k equal parts by index, one phase (probe set) each
    "shuffle": False,            # seeded permutation before the index split (paper: contiguous, false)
    "key": "",                   # split by this column (csv) / image field (json) / member extension (wds)
    "key_values": [],            # phase order of the key's values (default: sorted)
    "limit": 0,                  # keep only the first `limit` images (0 = all)
    "img_key": "filepath",       # csv: image column (open_clip's --csv-img-key)
    "caption_key": "title",      # csv: caption column (open_clip's --csv-caption-key)
    "separator": "",             # csv: "" = tab for .tsv/.tab files, comma otherwise
    "image_ext": ["jpg", "jpeg", "png", "webp"],   # wds: image member extensions
    "caption_ext": "txt",        # wds: caption member extension (one caption per line)
}

# Every valid key with its default. A list default means "list of that element type"; a dict is a
# section (or a stream's own options, e.g. [data.shapes]); a TableList is an array of tables.
SCHEMA: dict = {
    "run": {
        "name": "run",
        "seed": 0,
        "device": "auto",            # one of DEVICES; auto = cuda when available, else cpu
        "strategies": ["finetune", "modx", "joint"],
    },
    "model": {
        "name": "geomlab-tiny",
        "pretrained": "",            # local checkpoint path; "" = random init
        "precision": "fp32",
    },
    "data": {
        "stream": "shapes",
        "probe_size": 200,
        "on_bad_sample": "error",    # error | skip
        "num_workers": 0,
        "shapes": {"domains": 5, "train_size": 4000},
        "root": "",                  # real data: relative source paths resolve against it ("" = cwd)
        "datasets": {                # options of the "datasets" stream (real data, geomlab.data.phases)
            "train_captions": "all",     # all: every caption is a pair | first | random: one per image
            "augment": False,            # true: open_clip's training transform (random crop)
            "verify_images": False,      # decode every image up front (always done with on_bad_sample=skip)
        },
        "sources": TableList(SOURCE_TEMPLATE),
    },
    "train": {
        "batch_size": 64,
        "lr": 5e-4,
        "weight_decay": 0.1,
        "eps": 1e-8,
        "beta1": 0.9,
        "beta2": 0.98,
        "warmup_fraction": 0.2,
        "steps": 200,                # optimizer steps per continual phase (used when epochs = 0)
        "epochs": 0,                 # > 0: train this many epochs of the phase's data instead of `steps`
        "base_steps": 0,             # steps for the base phase (0 = same as `steps`)
        "checkpoint_every": 0,       # steps between checkpoints inside a phase (0 = phase end only)
        "log_every": 10,
        "eval_batch_size": 256,
    },
    "finetune": {},
    # alpha, temperature, reduction, off_diagonal_only: Mod-X's options, with the kernels' defaults
    "modx": {"alpha": MODX_ALPHA, **dataclasses.asdict(ModxOptions())},
    "joint": {},
}

CHOICES = {
    ("run", "device"): DEVICES,
    ("model", "precision"): ("fp32", "bf16", "fp16", "amp", "amp_bf16"),
    ("data", "on_bad_sample"): ("error", "skip"),
    ("data", "datasets", "train_captions"): ("all", "first", "random"),
    ("data", "sources", "format"): ("coco", "karpathy", "csv", "wds"),
    ("data", "sources", "role"): ("train", "probe"),
    ("modx", "reduction"): REDUCTIONS,
}


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it."""


def default_config_path() -> Path:
    return Path(str(resources.files("geomlab.experiments").joinpath(DEFAULT_EXPERIMENT)))


def _type_name(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, list):
        return f"list of {_type_name(value[0]) if value else 'str'}"
    return type(value).__name__


def _check_value(key: str, value, default):
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        elem = default[0] if default else ""
        if isinstance(value, str) and isinstance(elem, str):  # "a,b" for a list of strings
            value = [v.strip() for v in value.split(",") if v.strip()]
        ok = isinstance(value, list) and all(isinstance(v, type(elem)) for v in value)
    else:
        ok = False
    if not ok:
        raise ConfigError(f"config key {key!r} must be a {_type_name(default)}, got {value!r}")
    return value


def _merge(base: dict, update: dict, schema: dict, prefix: str = "") -> None:
    for key, value in update.items():
        path = f"{prefix}{key}"
        if key not in schema:
            valid = ", ".join(f"{prefix}{k}" for k in schema)
            hint = difflib.get_close_matches(key, list(schema), n=1)
            hint = f" (did you mean {prefix}{hint[0]}?)" if hint else ""
            raise ConfigError(f"unknown config key {path!r}{hint}; valid keys here: {valid}")
        if isinstance(schema[key], TableList):
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(f"config key {path!r} must be a list of tables ([[{path}]]), got {value!r}")
            tables = []
            for i, v in enumerate(value):
                table = _defaults(schema[key].template)
                _merge(table, v, schema[key].template, prefix=f"{path}[{i}].")
                tables.append(table)
            base[key] = tables
        elif isinstance(schema[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} is a section, got {value!r}")
            _merge(base.setdefault(key, {}), value, schema[key], prefix=f"{path}.")
        else:
            value = _check_value(path, value, schema[key])
            choices = CHOICES.get(tuple(re.sub(r"\[\d+\]", "", path).split(".")))
            if choices and value not in choices:
                raise ConfigError(f"config key {path!r} must be one of {', '.join(choices)}, got {value!r}")
            base[key] = value


def _defaults(schema: dict) -> dict:
    """A deep copy of `schema` with every TableList replaced by its default, an empty list."""
    return {k: _defaults(v) if isinstance(v, dict) else [] if isinstance(v, TableList) else copy.deepcopy(v)
            for k, v in schema.items()}


def parse_override(item: str) -> tuple[list[str], object]:
    """`train.lr=3e-4` -> (["train", "lr"], 3e-4). Values are TOML; bare words are strings."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like SECTION.KEY=VALUE")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string such as modx.reduction=mean
    return key.split("."), value


def load_toml(path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def resolve(file_values: dict, overrides: list[str] = (), source: str = "config") -> dict:
    """Defaults <- file values <- overrides, validated."""
    config = _defaults(SCHEMA)
    try:
        _merge(config, file_values, SCHEMA)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    for item in overrides:
        keys, value = parse_override(item)
        nested = value
        for k in reversed(keys):
            nested = {k: nested}
        _merge(config, nested, SCHEMA)
    return config


def load_config(path=None, overrides: list[str] = ()) -> dict:
    path = Path(path) if path else default_config_path()
    return resolve(load_toml(path), overrides, source=str(path))


def dumps(config: dict) -> str:
    """The config as TOML (sections with scalars first, then nested sections)."""
    import tomli_w
    return tomli_w.dumps(config)
