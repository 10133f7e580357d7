"""Continual strategies: one short module each.

A strategy is built once per phase, from what that phase needs (`PhaseContext`) and its own config
section as keyword arguments, and answers two questions: which data does this phase train on
(`train_data`), and what is the loss of a batch (`loss`). Nothing is shared between phases except
the model weights the trainer carries.
"""
from __future__ import annotations

from .base import Features, PhaseContext, Strategy
from .finetune import Finetune
from .joint import Joint
from .modx import ModX

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (Finetune, ModX, Joint)}


def get_strategy(name: str) -> type[Strategy]:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


__all__ = ["STRATEGIES", "Features", "PhaseContext", "Strategy", "get_strategy"]
