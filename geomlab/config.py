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
from geomlab.probe_kinds import CALIBRATION_SIZE
from geomlab.runtime import DEVICES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_EXPERIMENT = "shapes_5phase.toml"


class FreeTable:
    """Schema entry for a table whose keys the config schema does not fix (`[tune.grid]`: strategy →
    option → values); its default is empty and its owner (geomlab.tune) checks its content."""


class TableList:
    """Schema entry for a TOML array of tables (`[[data.sources]]`): each table is validated against
    `template` (missing keys take its defaults); the default value is an empty list."""

    def __init__(self, template: dict):
        self.template = template


# One source of real image-text data in a "datasets" stream ([[data.sources]], geomlab.data.phases).
SOURCE_TEMPLATE: dict = {
    "name": "",                  # phase / probe names derive from it
    "format": "",                # coco | karpathy | csv | wds | imagefolder (role = "zeroshot" only)
    "role": "train",             # train (phases) | probe (probe sets) | zeroshot (zero-shot classification)
                                 # | reference (held-out pairs ZSCL distils on)
    "path": "",                  # annotation JSON, Karpathy JSON, CSV/TSV file, or tar shards ("a-{000..009}.tar")
    "images": "",                # image folder (coco, karpathy; csv: default = the CSV's folder)
    "splits": ["train"],         # karpathy: which "split" values to keep (train, restval, val, test)
    "k": 1,                      # split into k equal parts by index, one phase (probe set) each
    "shuffle": False,            # seeded permutation before the index split (paper: contiguous, false)
    "key": "",                   # split by this column (csv) / image field (json) / member extension (wds)
    "key_values": [],            # phase order of the key's values (default: sorted)
    "limit": 0,                  # keep only the first `limit` images (0 = all; imagefolder: per class)
    "img_key": "filepath",       # csv: image column (open_clip's --csv-img-key)
    "caption_key": "title",      # csv: caption column (open_clip's --csv-caption-key)
    "separator": "",             # csv: "" = tab for .tsv/.tab files, comma otherwise
    "image_ext": ["jpg", "jpeg", "png", "webp"],   # wds: image member extensions
    "caption_ext": "txt",        # wds: caption member extension (one caption per line)
    "measures": [],              # probe: the train source(s) whose data it measures (learned at their last phase)
    "templates": ["a photo of a {}."],  # zeroshot: prompt templates, "{}" = the class (folder) name
}

# Every valid key with its default. A list default means "list of that element type"; a dict is a
# section (or a stream's own options, e.g. [data.shapes]); a TableList is an array of tables.
SCHEMA: dict = {
    "run": {
        "name": "run",
        "seed": 0,
        "seeds": [],                 # [0, 1, 2]: one complete run per seed under one directory ([] = run.seed only)
        "device": "auto",            # one of DEVICES; auto = cuda when available, else cpu
        "strategies": ["finetune", "modx", "joint"],
        "tuned": "",                 # a tuned-values file (python -m geomlab.tune's output) whose values
                                     # apply over this file's and under the command line's; relative to
                                     # this file's folder, then to the packaged experiments folder
    },
    "model": {
        "name": "geomlab-tiny",
        "pretrained": "",            # local checkpoint path; "" = random init
        "precision": "fp32",
    },
    "data": {
        "stream": "shapes",
        "probe_size": 200,
        "calibration_size": CALIBRATION_SIZE,  # pairs per calibration set, one beside each seen probe set:
                                     # held out of the probe and of training, in every trace, never scored
                                     # (realignment fits, docs/definitions.md "Calibration split"); 0 = none
        "probe_cache_mb": 2048,      # real data: probe images are decoded once, before training, and kept
                                     # decoded (uint8, 3·S·S bytes each) up to this many MiB; 0 = re-decode
                                     # at every checkpoint (in data.num_workers DataLoader workers)
        "on_bad_sample": "error",    # error | skip
        "num_workers": 0,
        "shapes": {"domains": 5, "train_size": 4000,
                   "reference_size": 1000,   # reference-domain pairs (ZSCL's images), 0 = none
                   "reference_texts": 2000,   # ZSCL's text pool: captions of other reference samples
                   "novel_share": 0.25},      # share of each domain's combinations held out of training
                                              # (the novel probes'), 0 = none
        "root": "",                  # real data: relative source paths resolve against it ("" = cwd)
        "datasets": {                # options of the "datasets" stream (real data, geomlab.data.phases)
            "train_captions": "all",     # all: every caption is a pair | first | random: one per image
            "augment": False,            # true: open_clip's training transform (random crop)
            "verify_images": False,      # decode every training image up front (always done with
                                         # on_bad_sample=skip; probe images always are)
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
        "base": "train",             # train: phase 0 trains the base model on the stream's first phase;
                                     # pretrained: no base phase, the model.pretrained weights are phase 0
                                     # (row 0 of the accuracy matrix) and the stream's phases are 1..N
        "checkpoint_every": 0,       # steps between checkpoints inside a phase (0 = phase end only)
        "trace_every": 0,            # steps between fine traces inside every phase (0 = none): embeddings
                                     # only, of each seen probe set's and calibration set's first trace_size
                                     # images and their captions
        "trace_size": 24,            # images per seen or calibration set in a fine trace (docs/definitions.md,
                                     # "Traces"): ten sets of 24 keep trace_every = 10 near 10% of the demo's
                                     # training time (python -m geomlab.bench train, 2-core CPU)
        "log_every": 10,
        "allow_repeats": False,      # true: allow a batch larger than a phase (its pairs then repeat within
                                     # a batch, copies being each other's negatives); refused otherwise
        "eval_batch_size": 256,
    },
    # python -m geomlab.tune: the grid it searches, on seeds no study reports (docs/definitions.md, "Tuning")
    "tune": {
        "validation_seeds": [],      # the seeds tuning runs on; a study on any of them is refused
        "criterion": "last",         # what selects a value: its mean over the validation seeds (CRITERIA)
        "grid": FreeTable(),         # [tune.grid.STRATEGY] KNOB = [values]: each strategy's main knob
    },
    "finetune": {},
    # alpha, temperature, reduction, off_diagonal_only: Mod-X's options, with the kernels' defaults
    # (not the KL's row selection: keeping the rows the old model retrieves correctly IS Mod-X)
    "modx": {"alpha": MODX_ALPHA,
             **{k: v for k, v in dataclasses.asdict(ModxOptions()).items() if k != "selection"}},
    "joint": {},
    # The baselines' options: formulas and how each default was chosen in the README, "The strategies".
    "lwf": {
        "weight": 1.0,               # λ, weight of the distillation term (≥ 0)
        "temperature": 2.0,          # T, distillation temperature on logit-scaled similarities (> 0)
    },
    "ewc": {
        "weight": 1.4e3,             # λ of the penalty (λ/2)·Σ F·(θ − θ*)² (≥ 0)
        "fisher_batches": 2,         # batches of a phase's data its per-sample Fisher is averaged over (128 samples
                                     # at batch 64: each batch costs about 64 batch backward passes)
        "gamma": 1.0,                # online EWC: F ← γ·F_before + F_new at each phase start (≥ 0)
    },
    "er": {
        "buffer_size": 500,          # samples the reservoir keeps over every phase seen
        "replay_fraction": 0.5,      # share of each batch drawn from the buffer, in [0, 1)
    },
    "der": {
        "buffer_size": 500,
        "replay_fraction": 0.25,
        "alpha": 0.3,                # weight of the MSE to the stored targets on replayed samples (≥ 0)
        "beta": 0.0,                 # weight of the CLIP loss on a second replay draw (DER++; 0 = DER)
        "target": "logits",          # logits: similarity rows against the anchors | embedding: the features
        "anchor_size": 16,           # buffered pairs the stored similarity rows score against (≥ 1)
    },
    "wise": {
        "alpha": 0.5,                # weight of the fine-tuned model: θ ← (1 − α)·θ_start + α·θ_end
    },
    "zscl": {
        "weight": 8.0,               # λ of λ·½(KL + KL) from the base model (≥ 0); 8 = ZSCL's 2·T²
        "temperature": 2.0,          # T
        "avg_freq": 15,              # steps between the weight ensemble's samples
        "reference_batch_size": 16,  # reference pairs per step
    },
    "lora": {
        "rank": 4,                   # r of each adapter pair B·A (≥ 1)
        "scale": 2.0,                # ΔW = scale·B·A (peft's lora_alpha / r; C-CLIP: lora_alpha = 2r) (> 0)
        "dropout": 0.1,              # dropout on the adapters' input, in [0, 1) (C-CLIP: 0.1)
    },
    "cclip": {
        "rank": 4, "scale": 2.0, "dropout": 0.1,  # the adapters, as lora's
        "weight": 1.0,               # λ of λ·L_ckc (≥ 0); C-CLIP adds the two losses (λ = 1)
        "temperature": 0.07,         # τ of the CKC loss (> 0)
        "merge": 0.5,                # α: the share of the adapters' update merged at the phase end, in (0, 1]
    },
    "nsp": {
        "threshold": 0.01,           # the null space: eigenvalues ≤ threshold·λ_max of the earlier inputs'
                                     # covariance, in (0, 1] (1: every direction, finetune)
        "batches": 4,                # batches of a phase's data its input covariance is summed over (≥ 1)
    },
}

CHOICES = {
    ("run", "device"): DEVICES,
    ("model", "precision"): ("fp32", "bf16", "fp16", "amp", "amp_bf16"),
    ("data", "on_bad_sample"): ("error", "skip"),
    ("data", "datasets", "train_captions"): ("all", "first", "random"),
    ("data", "sources", "format"): ("coco", "karpathy", "csv", "wds", "imagefolder"),
    ("data", "sources", "role"): ("train", "probe", "reference", "zeroshot"),
    ("modx", "reduction"): REDUCTIONS,
    ("der", "target"): ("logits", "embedding"),
    ("tune", "criterion"): ("last", "avg"),
    ("train", "base"): ("train", "pretrained"),
}


@dataclasses.dataclass(frozen=True)
class Range:
    """The numbers a key accepts: lo ≤ value ≤ hi, an end left out when None or made strict."""
    lo: float | None = None
    hi: float | None = None
    strict_lo: bool = False
    strict_hi: bool = False

    def __contains__(self, v) -> bool:
        return ((self.lo is None or (v > self.lo if self.strict_lo else v >= self.lo))
                and (self.hi is None or (v < self.hi if self.strict_hi else v <= self.hi)))

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.strict_lo else '>='} {self.lo}"
        return f"in {'(' if self.strict_lo else '['}{self.lo}, {self.hi}{')' if self.strict_hi else ']'}"


NON_NEGATIVE, POSITIVE, AT_LEAST_ONE = Range(0), Range(0, strict_lo=True), Range(1)
RANGES = {
    ("data", "calibration_size"): NON_NEGATIVE,
    ("data", "shapes", "reference_size"): NON_NEGATIVE, ("data", "shapes", "reference_texts"): NON_NEGATIVE,
    ("data", "shapes", "novel_share"): Range(0, 1, strict_hi=True),
    ("lwf", "weight"): NON_NEGATIVE, ("lwf", "temperature"): POSITIVE,
    ("ewc", "weight"): NON_NEGATIVE, ("ewc", "fisher_batches"): AT_LEAST_ONE, ("ewc", "gamma"): NON_NEGATIVE,
    ("er", "buffer_size"): AT_LEAST_ONE, ("er", "replay_fraction"): Range(0, 1, strict_hi=True),
    ("der", "buffer_size"): AT_LEAST_ONE, ("der", "replay_fraction"): Range(0, 1, strict_hi=True),
    ("der", "alpha"): NON_NEGATIVE, ("der", "beta"): NON_NEGATIVE, ("der", "anchor_size"): AT_LEAST_ONE,
    ("wise", "alpha"): Range(0, 1),
    ("train", "trace_every"): NON_NEGATIVE, ("train", "trace_size"): AT_LEAST_ONE,
    ("zscl", "weight"): NON_NEGATIVE, ("zscl", "temperature"): POSITIVE,
    ("zscl", "avg_freq"): AT_LEAST_ONE, ("zscl", "reference_batch_size"): AT_LEAST_ONE,
    **{(s, k): r for s in ("lora", "cclip") for k, r in (("rank", AT_LEAST_ONE), ("scale", POSITIVE),
                                                          ("dropout", Range(0, 1, strict_hi=True)))},
    ("cclip", "weight"): NON_NEGATIVE, ("cclip", "temperature"): POSITIVE,
    ("cclip", "merge"): Range(0, 1, strict_lo=True),
    ("nsp", "threshold"): Range(0, 1, strict_lo=True), ("nsp", "batches"): AT_LEAST_ONE,
}


# The element type of a list key whose default is empty (other lists: their first default's type).
EMPTY_LIST_ELEMENT = {"run.seeds": 0, "tune.validation_seeds": 0}


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
        elem = default[0] if default else EMPTY_LIST_ELEMENT.get(key, "")
        default = default or [elem]  # so that the message names the element type
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
        if isinstance(schema[key], FreeTable):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} must be a table ([{path}]), got {value!r}")
            base[key] = copy.deepcopy(value)
        elif isinstance(schema[key], TableList):
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
            where = tuple(re.sub(r"\[\d+\]", "", path).split("."))
            choices = CHOICES.get(where)
            if choices and value not in choices:
                raise ConfigError(f"config key {path!r} must be one of {', '.join(choices)}, got {value!r}")
            if where in RANGES and value not in RANGES[where]:
                raise ConfigError(f"config key {path!r} must be {RANGES[where]}, got {value!r}")
            base[key] = value


def _defaults(schema: dict) -> dict:
    """A deep copy of `schema` with every TableList replaced by its default, an empty list."""
    return {k: _defaults(v) if isinstance(v, dict) else [] if isinstance(v, TableList)
            else {} if isinstance(v, FreeTable) else copy.deepcopy(v) for k, v in schema.items()}


def with_defaults(stored: dict, schema: dict | None = None) -> dict:
    """A run's stored config with every schema key it lacks at its default: a key that a later
    geomlab added (at its default) is then no difference on --resume."""
    schema = SCHEMA if schema is None else schema
    out = {k: with_defaults(v, schema[k]) if isinstance(v, dict) and isinstance(schema.get(k), dict) else v
           for k, v in stored.items()}
    return {**_defaults({k: v for k, v in schema.items() if k not in out}), **out}


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


def _apply_overrides(config: dict, overrides) -> None:
    for item in overrides:
        keys, value = parse_override(item)
        nested = value
        for k in reversed(keys):
            nested = {k: nested}
        _merge(config, nested, SCHEMA)


def tuned_path(name: str, folder: Path | None = None) -> Path:
    """Where run.tuned = `name` lives: as given when absolute, else in `folder` (the config file's),
    else in the packaged experiments folder."""
    path = Path(name)
    candidates = [path] if path.is_absolute() else [
        *([folder / path] if folder is not None else []), default_config_path().parent / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"run.tuned: tuned-values file {name!r} not found (looked in "
                      f"{', '.join(str(c.parent) for c in candidates)}); run python -m geomlab.tune to make it")


def load_tuned(path: Path) -> dict:
    """A tuned-values file: {"values": {strategy: {option: value}}, "provenance": {...}, ...}."""
    tuned = load_toml(path)
    values, provenance = tuned.get("values"), tuned.get("provenance")
    if not isinstance(values, dict) or not isinstance(provenance, dict) or not isinstance(
            provenance.get("validation_seeds"), list):
        raise ConfigError(f"{path}: not a tuned-values file (it needs [values.STRATEGY] tables and "
                          "[provenance] with validation_seeds)")
    return tuned


def check_seeds_untuned(config: dict, path, validation_seeds) -> None:
    """Refuse a run whose seeds include a seed the tuned values in `path` were chosen on."""
    reported = config["run"]["seeds"] or [config["run"]["seed"]]
    overlap = sorted(set(validation_seeds) & set(reported))
    if overlap:
        raise ConfigError(f"seed(s) {overlap} of this run ({reported}) are validation seeds of {path} "
                          f"({validation_seeds}): a study reports only seeds that no tuning choice looked at")


def resolve(file_values: dict, overrides: list[str] = (), source: str = "config",
            folder: Path | None = None) -> dict:
    """Defaults <- file values <- run.tuned's values <- overrides, validated. `folder`: where a
    relative run.tuned path is looked up first (the config file's folder)."""
    config = _defaults(SCHEMA)
    try:
        _merge(config, file_values, SCHEMA)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    probe = copy.deepcopy(config)
    _apply_overrides(probe, overrides)  # the final run.tuned (an override may set or clear it)
    if not probe["run"]["tuned"]:
        return probe
    path = tuned_path(probe["run"]["tuned"], folder)
    tuned = load_tuned(path)
    try:
        _merge(config, tuned["values"], SCHEMA)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    _apply_overrides(config, overrides)
    check_seeds_untuned(config, path, tuned["provenance"]["validation_seeds"])
    return config


def load_config(path=None, overrides: list[str] = ()) -> dict:
    path = Path(path) if path else default_config_path()
    return resolve(load_toml(path), overrides, source=str(path), folder=path.parent)


def dumps(config: dict) -> str:
    """The config as TOML (sections with scalars first, then nested sections)."""
    import tomli_w
    return tomli_w.dumps(config)
