"""The command line of python -m geomlab.train: its arguments and the config they name, read and
checked without torch or open_clip (geomlab.train calls check_command_line before it imports them,
so that --help and a config error answer at once)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from geomlab import executor
from geomlab.config import SCHEMA, ConfigError, load_config

DESCRIPTION = "python -m geomlab.train: continual CLIP training with geometry traces."


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m geomlab.train", description=DESCRIPTION)
    p.add_argument("--config", help="experiment TOML (default: the embedded experiments/shapes_5phase.toml)")
    p.add_argument("--strategies", help="comma-separated, shorthand for run.strategies")
    p.add_argument("--out", help="run directory (default: runs/<run.name>)")
    p.add_argument("--device", help="auto | cpu | cuda, shorthand for run.device")
    p.add_argument("--pretrained", help="an open_clip pretrained tag of the model (e.g. openai, laion2b_s34b_b79k) "
                   "or a local open_clip/geomlab checkpoint, shorthand for model.pretrained")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest saved state "
                   "(without --config: from the run's own config.toml)")
    p.add_argument("--report-to", dest="report_to", metavar="tensorboard",
                   help="also write the metrics as TensorBoard event files, to watch a run live "
                        "(needs the tensorboard extra)")
    p.add_argument("--seeds", help="comma-separated seeds, shorthand for run.seeds: one complete run per seed")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="print the phases, probe sets, strategies and steps this command would train; write nothing")
    executor.add_options(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=3e-4")
    return p.parse_args(argv)


def run_config_path(args) -> str | None:
    """The experiment file to read: --config; on --resume without it, the run's own config.toml (so
    that a resume needs only --out and --resume, whatever overrides the run was started with)."""
    if args.config is None and args.resume and args.out:
        own = Path(args.out) / "config.toml"
        if own.is_file():
            return str(own)
    return args.config


def parse_args_or_hint(argv=None):
    """parse_args, with a pointer to the KEY=VALUE form for a flag that is a config key (`--lr 1e-4`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    keys = {k: f"{section}.{k}" for section, table in SCHEMA.items() if isinstance(table, dict) for k in table}
    keys.update({f"{section}.{k}": f"{section}.{k}" for section, table in SCHEMA.items() if isinstance(table, dict)
                 for k in table})
    known = {"--config", "--strategies", "--out", "--device", "--pretrained", "--resume", "--report-to", "--seeds",
             "--dry-run", "--help", "-h", "--executor", *executor.RAY_OPTIONS}
    for i, arg in enumerate(argv):
        flag, _, value = arg.partition("=")
        name = flag[2:].replace("-", "_")
        if flag.startswith("--") and flag not in known and name in keys:
            value = value or (argv[i + 1] if i + 1 < len(argv) else "VALUE")
            raise ConfigError(f"{flag} is not an option; config keys are set as KEY=VALUE: {keys[name]}={value}")
    args = parse_args(argv)
    executor.check_options(args)
    return args


def read_config(args) -> dict:
    """The run's config: the experiment file (run_config_path) with the flags' and KEY=VALUE
    overrides, validated against the schema; ConfigError naming the key or argument at fault."""
    overrides = list(args.overrides)
    for flag, key in (("strategies", "run.strategies"), ("device", "run.device"), ("pretrained", "model.pretrained")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value!r}" if flag != "strategies" else f"{key}={value}")
    if args.seeds is not None:
        try:
            seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--seeds must be comma-separated integers (e.g. 0,1,2), got {args.seeds!r}") from None
        if not seeds:
            raise ConfigError("--seeds: empty seed list; give comma-separated integers, e.g. 0,1,2")
        overrides.append(f"run.seeds={seeds}")
    config = load_config(run_config_path(args), overrides)
    seeds = config["run"]["seeds"]
    if any(isinstance(s, bool) or s < 0 for s in seeds):
        raise ConfigError(f"run.seeds must be non-negative integers, got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"run.seeds: seed {next(s for s in seeds if seeds.count(s) > 1)} appears twice in "
                          f"{seeds}; each seed is one run")
    if not config["run"]["strategies"]:
        raise ConfigError("run.strategies is empty")
    if config["train"]["base"] == "pretrained" and not config["model"]["pretrained"]:
        raise ConfigError("train.base = \"pretrained\" makes the model.pretrained weights phase 0, but "
                          "model.pretrained is empty: give --pretrained TAG_OR_FILE, or train.base=train")
    return config


def check_command_line(argv: list[str]) -> None:
    """--help, a bad argument or a config error, answered (and the process ended: exit 0 or 2)
    before python -m geomlab.train imports torch and open_clip, which take seconds to load."""
    try:
        read_config(parse_args_or_hint(argv))
    except ConfigError as e:
        print(f"geomlab.train: error: {e}", file=sys.stderr)
        sys.exit(2)
