"""python -m geomlab.bench {kernels,train,analyze,gpu}: speed and memory figures, printed and as JSON
(gpu: the one-shot check for a CUDA machine, and the sm_90 compile report)."""
from __future__ import annotations

import argparse
import importlib
import sys

SUITES = ("kernels", "train", "analyze", "gpu")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m geomlab.bench", description=__doc__)
    sub = parser.add_subparsers(dest="suite", required=True)
    for name in SUITES:
        module = importlib.import_module(f"geomlab.benchmarks.{name}")
        p = sub.add_parser(name, help=module.__doc__.splitlines()[0] if module.__doc__ else None)
        p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
