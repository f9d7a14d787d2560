"""Drafting with a model: the forward loop every drafter runner shares, and its per-slot cache bookkeeping.

A drafter proposer owns the drafter's slot KV cache and, per slot, `lengths[slot]`: how many leading
positions of that cache hold exactly what a sequential forward over the sequence's real tokens would
hold. Positions past it may hold anything (drafted tokens, approximate entries) and are rewritten before
they are read. With T = len(tokens) (the target cache holds T - 1 positions):

- before drafting, rows lacking more than `max_lag` positions are caught up in one exact forward
  (admission, a drafter swap, steps decoded without this drafter, lookup tokens verified instead of its own),
  whose seconds `last_catch_up_seconds` reports apart from the drafting's;
- the first draft forward feeds each row a window ending at its last real position (re-feeding cached
  positions rewrites them with the same values and keeps the batch rectangular) and yields draft 1; each
  later forward feeds the previous draft; after drafting the exact prefix is `drafted_length(T, G)`;
- `commit`: the accepted draft positions stand only as far as they were written exactly:
  lengths = min(lengths, T + accepted), accepted counting only this drafter's own tokens.

A subclass says how its positions read the sequence (`shift`: position p reads token p + shift),
what else they read (`features_at`), how far a row may lag before a separate catch-up (`max_lag`),
whether the first forward must be exact (`calibrates`) and what is exact after drafting
(`drafted_length`). Subclasses: token.py, feature.py, layer_parallel.py.

Not here: choosing between drafters and prompt lookup (chain.py), verification (sampling.py).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from draftsmith.llama import CausalLMRunner
from draftsmith.proposers.base import Draft, EngineView, Proposer, Rows
from draftsmith.sampling import processed_probs, sample_from


class DrafterProposer(Proposer):
    shift = 0  # position p of the drafter reads token p + shift
    calibrates = False  # the first draft forward runs exact (sequential) even if the runner approximates

    def __init__(self, runner: CausalLMRunner, view: EngineView):
        self.runner = runner
        self.view = view
        self.cache = runner.new_cache(view.slots, view.max_len)
        self.lengths = [0] * view.slots  # exact prefix of each slot's cache (see module doc)
        self.last_catch_up_seconds = 0.0

    # ----- the rules a subclass sets -------------------------------------------------------------
    def max_lag(self, shortest: int, gamma: int) -> int:
        """Positions a row may lack and still be fed by the first draft forward's window."""
        raise NotImplementedError

    def drafted_length(self, total: int, gamma: int) -> int:
        """The exact prefix of a row with `total` tokens after drafting `gamma` tokens."""
        raise NotImplementedError

    def features_at(self, slots: slice, positions: torch.Tensor) -> torch.Tensor | None:
        """What positions [B, S] read besides tokens (None: nothing)."""
        return None

    # ----- the interface -----------------------------------------------------------------------------
    def propose(self, rows: Rows, gammas: Sequence[int]) -> Draft:
        gamma, device, slots = max(gammas), self.view.device, rows.slots
        totals = [len(t) for t in rows.tokens]
        start = time.perf_counter()
        if self.catch_up(rows, self.max_lag(min(totals), gamma)):
            self.view.device.type == "cuda" and torch.cuda.synchronize(self.view.device)
            self.last_catch_up_seconds = time.perf_counter() - start
        else:
            self.last_catch_up_seconds = 0.0
        lengths = self.lengths[slots]
        width = max(1, max(t - self.shift - n for t, n in zip(totals, lengths)))
        ids = torch.tensor([t[-width:] for t in rows.tokens], device=device)
        ends = torch.tensor(totals, device=device) - self.shift  # each row's first drafted position
        positions = ends[:, None] - width + torch.arange(width, device=device)[None]
        logits, carry = self._forward(ids, positions, slots, self.features_at(slots, positions),
                                      logits_at=torch.full((len(rows),), width - 1, device=device),
                                      exact=self.calibrates)
        uniforms = None if rows.sampling is None else rows.uniforms(gamma)
        tokens, probs = [], []
        for i in range(gamma):
            token, prob = self._draft_token(logits, rows.sampling, None if uniforms is None else uniforms[:, i])
            tokens.append(token)
            probs.append(prob)
            if i < gamma - 1:
                # A row drafting fewer tokens than the widest pads past its length: clamp into the cache
                # (commit keeps only its accepted positions, all inside the context).
                positions = (ends + i).clamp(max=self.view.max_len - 1)
                logits, carry = self._forward(token[:, None], positions[:, None], slots, carry)
        for slot, total in zip(range(slots.start, slots.stop), totals):
            self.lengths[slot] = self.drafted_length(total, gamma)
        draft_probs = None if rows.sampling is None else torch.stack(probs, dim=1)
        return Draft(torch.stack(tokens, dim=1), draft_probs, list(gammas), [self.name] * len(rows))

    def commit(self, rows: Rows, draft: Draft, accepted: Sequence[int]) -> None:
        for slot, tokens, a in zip(range(rows.slots.start, rows.slots.stop), rows.tokens, accepted):
            self.lengths[slot] = min(self.lengths[slot], len(tokens) + a)

    def move_slot(self, src: int, dst: int) -> None:
        self.cache.copy_slot(src, dst, self.lengths[src])
        self.lengths[dst] = self.lengths[src]

    def release_slot(self, slot: int) -> None:
        self.lengths[slot] = 0

    def catch_up(self, rows: Rows, max_lag: int) -> bool:
        """If a row lacks more than max_lag positions, feed every row's missing ones in one exact forward;
        every row then holds T - 1 exact positions. Returns whether it ran."""
        slots, device = rows.slots, self.view.device
        lengths = self.lengths[slots]
        lag = [len(t) - 1 - n for t, n in zip(rows.tokens, lengths)]
        if max(lag) <= max_lag:
            return False
        width = max(lag)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, (tokens, n) in enumerate(zip(rows.tokens, lengths)):
            if lag[i] > 0:
                ids[i, : lag[i]] = torch.tensor(tokens[n + self.shift: n + self.shift + lag[i]])
        positions = torch.tensor(lengths, device=device)[:, None] + torch.arange(width, device=device)[None]
        # Rows with a shorter lag write padding past their length: never read before being overwritten.
        # Clamp so that padding never indexes past the cache (real positions stay <= max_len - 2).
        positions = positions.clamp(max=self.view.max_len - 1)
        self.runner.hidden_states(ids.to(device), positions, self.cache, slots, exact=True,
                                  features=self.features_at(slots, positions))
        for slot, tokens in zip(range(slots.start, slots.stop), rows.tokens):
            self.lengths[slot] = len(tokens) - 1
        return True

    # ----- internals ---------------------------------------------------------------------------------
    def _forward(self, ids, positions, slots, features, *, logits_at=None, exact=False):
        """One drafter forward -> (logits [B, 1, V_draft], what the next forward reads besides its token)."""
        if features is None:
            return self.runner.forward(ids, positions, self.cache, slots, logits_at=logits_at, exact=exact), None
        logits, drafted = self.runner.forward(ids, positions, self.cache, slots, logits_at=logits_at, exact=exact,
                                              features=features, return_features=True)
        return logits, drafted[:, -1:]

    def _draft_token(self, logits: torch.Tensor, sampling, uniforms):
        """logits [B, 1, V_draft] -> full-vocabulary token ids [B] and, when sampling, probs [B, V]."""
        head_ids = self.runner.head_token_ids
        if sampling is None:
            choice = logits[:, 0].argmax(-1)
            return (choice if head_ids is None else head_ids[choice]), None
        if head_ids is not None:  # a trimmed head proposes nothing outside its vocabulary
            full = logits.new_full((logits.shape[0], 1, self.view.vocab_size), float("-inf"))
            logits = full.index_copy_(2, head_ids, logits)
        probs = processed_probs(logits, *sampling)[:, 0]
        return sample_from(probs, uniforms), probs
