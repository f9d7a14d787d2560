"""Prompt lookup as a proposer: a row whose last n-gram occurred earlier verifies what followed it.

The match itself is draftsmith/prompt_lookup.py. A lookup proposal is deterministic: its q is one-hot,
which speculative sampling verifies exactly (accept with probability p(x), else resample from p without
x), so sampled output keeps the target's distribution. No cache, so nothing to commit or move. Alone it
proposes only for rows with a match (others decode one token); beside a drafter see chain.py.
"""

from __future__ import annotations

from typing import Sequence

import torch

from draftsmith.policy import LOOKUP
from draftsmith.prompt_lookup import lookup_proposal
from draftsmith.proposers.base import Draft, EngineView, Proposer, Rows


class LookupProposer(Proposer):
    name = LOOKUP

    def __init__(self, view: EngineView, *, min_n: int, max_n: int):
        self.view, self.min_n, self.max_n = view, min_n, max_n

    def find(self, rows: Rows, gammas: Sequence[int]) -> list[list[int]]:
        """Each row's lookup tokens (at most gammas[b]; [] without a match)."""
        return [lookup_proposal(tokens, min_n=self.min_n, max_n=self.max_n, count=g) if g else []
                for tokens, g in zip(rows.tokens, gammas)]

    def overlay(self, draft: Draft, found: Sequence[list[int]]) -> Draft:
        """Write the rows' lookup tokens (one-hot q when sampling) over `draft`, in place."""
        for row, tokens in enumerate(found):
            if not tokens:
                continue
            proposal = torch.tensor(tokens, device=draft.tokens.device)
            draft.tokens[row, : len(tokens)] = proposal
            if draft.probs is not None:
                draft.probs[row] = 0
                draft.probs[row, torch.arange(len(tokens), device=proposal.device), proposal] = 1
            draft.lengths[row] = len(tokens)
            draft.sources[row] = LOOKUP
        return draft

    def propose(self, rows: Rows, gammas: Sequence[int]) -> Draft:
        found = self.find(rows, gammas)
        return self.overlay(Draft.zeros(rows, max(map(len, found)), self.view, LOOKUP), found)
