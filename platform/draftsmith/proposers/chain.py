"""Prompt lookup first, a drafter for the rest: the one place the two are composed.

A row with a lookup match verifies the lookup tokens; the others verify the drafter's. The drafter runs
only if some row that speculates this step lacks a match, and then drafts for every row (a rectangular
batch; a matched row gets as many drafter tokens as its lookup proposal, then overwritten). Its cache rule
sees only its own tokens as accepted: a row that verified lookup tokens commits 0 to the drafter, whose
cache then keeps only what the real tokens wrote. `propose_planned` takes the lookup tokens the step
already found and chose (the speculation policy picks lookup or the drafter per row), so nothing is looked
up twice.
"""

from __future__ import annotations

from typing import Sequence

from draftsmith.proposers.base import Draft, Proposer, Rows
from draftsmith.proposers.lookup import LookupProposer


class LookupThenDrafter(Proposer):
    name = "lookup+drafter"

    def __init__(self, lookup: LookupProposer, drafter: Proposer):
        self.lookup, self.drafter = lookup, drafter

    def lookup_matches(self, rows: Rows, gammas: Sequence[int]) -> list[list[int]]:
        return self.lookup.find(rows, gammas)

    def propose(self, rows: Rows, gammas: Sequence[int]) -> Draft:
        return self.propose_planned(rows, gammas, self.lookup.find(rows, gammas))

    def propose_planned(self, rows: Rows, gammas: Sequence[int], found: Sequence[list[int]] | None) -> Draft:
        found = found or [[] for _ in gammas]
        self.last_catch_up_seconds = 0.0
        if not self.drafter.speculates or all(f or not g for f, g in zip(found, gammas)):
            return self.lookup.overlay(Draft.zeros(rows, max(map(len, found)), self.lookup.view), found)
        draft = self.drafter.propose(rows, [len(f) or g for f, g in zip(found, gammas)])
        self.last_catch_up_seconds = self.drafter.last_catch_up_seconds
        return self.lookup.overlay(draft, found)

    def commit(self, rows: Rows, draft: Draft, accepted: Sequence[int]) -> None:
        own = self.drafter.name
        self.drafter.commit(rows, draft, [a if source == own else 0 for a, source in zip(accepted, draft.sources)])

    def move_slot(self, src: int, dst: int) -> None:
        self.drafter.move_slot(src, dst)

    def release_slot(self, slot: int) -> None:
        self.drafter.release_slot(slot)
