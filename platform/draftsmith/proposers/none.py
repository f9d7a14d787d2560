"""No drafting: every row decodes one token per step (the engine without a drafter and without lookup)."""

from __future__ import annotations

from typing import Sequence

from draftsmith.proposers.base import Draft, EngineView, Proposer, Rows, register


@register("none", accepts=lambda runner: runner is None)
class NoProposer(Proposer):
    speculates = False

    def __init__(self, runner=None, view: EngineView | None = None):
        self.view = view

    def propose(self, rows: Rows, gammas: Sequence[int]) -> Draft:
        return Draft.zeros(rows, 0, self.view, self.name)
