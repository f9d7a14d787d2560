"""Proposers: the ways of drafting the engine verifies, behind one interface (base.py).

Registered: none (no drafter), token (any drafter runner: the fallback), feature (EAGLE-style, reads the
target's features), layer_parallel (EasySpec, calibrated); when several accept a runner the latest wins. Prompt lookup is
not chosen by runner but by `EngineConfig.prompt_lookup_max`, and composed with the drafter in chain.py.
To add a way of drafting: a module here with a `@register(name, accepts=...)` subclass of `Proposer`
(or of `drafter.DrafterProposer` for a model-based one) and its import below.
"""

from __future__ import annotations

from draftsmith.engine_config import EngineConfig
from draftsmith.llama import CausalLMRunner
from draftsmith.proposers import feature, layer_parallel, none, token  # noqa: F401  (registration)
from draftsmith.proposers.base import DRAFTERS, Draft, EngineView, Proposer, Rows, drafter_proposer, register
from draftsmith.proposers.chain import LookupThenDrafter
from draftsmith.proposers.drafter import DrafterProposer
from draftsmith.proposers.lookup import LOOKUP, LookupProposer

__all__ = ["DRAFTERS", "Draft", "DrafterProposer", "EngineView", "LOOKUP", "LookupProposer", "LookupThenDrafter",
           "Proposer", "Rows", "build_proposer", "drafter_proposer", "register"]


def build_proposer(drafter: CausalLMRunner | None, config: EngineConfig, view: EngineView) -> Proposer:
    """The engine's proposer: the drafter's (by registration), behind prompt lookup when the config asks."""
    proposer = drafter_proposer(drafter, view)
    if config.prompt_lookup_max:
        lookup = LookupProposer(view, min_n=config.prompt_lookup_min, max_n=config.prompt_lookup_max)
        proposer = LookupThenDrafter(lookup, proposer)
    return proposer
