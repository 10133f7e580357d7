"""Continual strategies: one short module each.

A strategy is built once per phase, from what that phase needs (`PhaseContext`) and its own config
section as keyword arguments, and answers which data the phase trains on, how each step's batch is
composed, and what the loss of a batch is; named hooks at fixed points of the phase (start, after
each step, end) let it keep and apply what it carries (base.py lists them, in the order the
trainer calls them). Between phases only the model weights and the strategy's own saved state in
the run directory carry over.
"""
from __future__ import annotations

from .base import Features, PhaseContext, Strategy
from .cclip import CCLIP
from .der import DER
from .er import ER
from .ewc import EWC
from .finetune import Finetune
from .joint import Joint
from .lora import LoRA
from .lwf import LwF
from .modx import ModX
from .nsp import NSP
from .wise import WiSE
from .zscl import ZSCL

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (Finetune, ModX, Joint, LwF, EWC, ER, DER, WiSE, ZSCL,
                                                                  LoRA, CCLIP, NSP)}


def get_strategy(name: str) -> type[Strategy]:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


__all__ = ["STRATEGIES", "Features", "PhaseContext", "Strategy", "get_strategy"]
