"""The proposer interface: what a way of drafting gives the engine, and the registry that picks one.

Vocabulary (shapes for a batch of B rows, V = the target's vocabulary):
- a *draft* is up to gamma tokens per row that the target verifies in one forward of gamma + 1 positions:
  `Draft.tokens` [B, G] (G = the widest row's length), `Draft.probs` [B, G, V] (the distributions q the tokens
  were sampled from; None when every row is greedy), `Draft.lengths` [B] (row b verifies its first lengths[b]
  tokens; 0 = the row decodes one token this step);
- *accepted* tokens are the draft's leading tokens the target agrees with (greedy: equal to its argmax;
  sampled: kept with probability min(1, p/q)); the verification then emits one more token per row: the
  *recovered* token at the first rejection (sampled from norm(max(0, p - q))) or the *bonus* token when all
  lengths[b] drafts were accepted (sampled from p). sampling.py holds that math.

A step reads: `draft = proposer.propose(rows, gammas)` -> verification -> `proposer.commit(rows, draft,
accepted)` (before the emitted tokens are appended to `rows.tokens`). A proposer that keeps a cache owns the
rule for how much of it is valid per slot (its `lengths`), including what happens when the engine moves a
sequence to another slot (`move_slot`) or frees one (`release_slot`); a new drafter is a new proposer, so a
drafter swap starts every slot from an empty cache.

Registration: `register(name, accepts)` adds a drafter proposer class (built as `cls(runner, view)`);
`drafter_proposer` picks, for a drafter runner, the most recently registered class that accepts it, and
the fallback (`register(..., fallback=True)`: the token drafter, which drafts with any runner) only when
none does. Adding a way of drafting is a new
module in this package with a `@register(...)` class, imported by the package's `__init__`.

Not here: the drafting itself (one module per way: token.py, feature.py, layer_parallel.py, lookup.py,
none.py, chain.py), verification (sampling.py), requests and slots (specdec.py).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from draftsmith.llama import CausalLMRunner


@dataclasses.dataclass(frozen=True)
class EngineView:
    """What a proposer may read of the engine: its slot count and context length, the target's vocabulary
    and device, and the target's stored final-normed hidden state per cached position [slots, max_len, D]."""

    slots: int
    max_len: int
    vocab_size: int
    device: torch.device
    target_features: torch.Tensor


@dataclasses.dataclass
class Rows:
    """The batch of one step: rows 0..B-1 live in the contiguous cache slots `slots`."""

    slots: slice
    tokens: Sequence[list[int]]  # each row's prompt + output so far (read only)
    sampling: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # temperature, top_k, top_p [B]; None = greedy
    uniforms: Callable[[int], torch.Tensor]  # count -> [B, count] draws from each row's own generator

    def __len__(self) -> int:
        return len(self.tokens)


@dataclasses.dataclass
class Draft:
    tokens: torch.Tensor  # [B, G] long
    probs: torch.Tensor | None  # [B, G, V] float, None when greedy
    lengths: list[int]  # [B] tokens each row verifies (<= G)
    sources: list[str]  # [B] name of the proposer whose tokens the row verifies

    @classmethod
    def zeros(cls, rows: Rows, width: int, view: EngineView, source: str = "") -> "Draft":
        """A draft of `width` placeholder tokens for every row, none of them to verify yet."""
        tokens = torch.zeros(len(rows), width, dtype=torch.long, device=view.device)
        probs = None if rows.sampling is None else torch.zeros(len(rows), width, view.vocab_size, device=view.device)
        return cls(tokens, probs, [0] * len(rows), [source] * len(rows))


class Proposer:
    """The interface every way of drafting implements; the defaults are those of a proposer without state."""

    name = ""
    speculates = True  # False: proposes nothing, so requests admitted with it decode autoregressively
    # Seconds the last `propose` spent catching a cache up rather than drafting (0: none): the speculation
    # policy's drafter cost is per draft forward, which a catch-up after a long autoregressive stretch is not.
    last_catch_up_seconds = 0.0

    def propose(self, rows: Rows, gammas: Sequence[int]) -> Draft:
        """Up to gammas[b] tokens for row b (0 = none)."""
        raise NotImplementedError

    def lookup_matches(self, rows: Rows, gammas: Sequence[int]) -> list[list[int]] | None:
        """Each row's prompt-lookup tokens (at most gammas[b]), or None when this proposer does not look up."""
        return None

    def propose_planned(self, rows: Rows, gammas: Sequence[int], found: Sequence[list[int]] | None) -> Draft:
        """Draft for a plan that chose per row: rows with tokens in `found` (from `lookup_matches`, cut to the
        row's length) verify those, the other rows with gammas[b] > 0 the drafter's. Without lookup: `propose`."""
        return self.propose(rows, gammas)

    def commit(self, rows: Rows, draft: Draft, accepted: Sequence[int]) -> None:
        """After verification, before the emitted tokens are appended: accepted[b] of row b's draft stood."""

    def move_slot(self, src: int, dst: int) -> None:
        """The sequence in slot `src` now lives in slot `dst` (the engine keeps slots contiguous)."""

    def release_slot(self, slot: int) -> None:
        """Slot `slot` is free; the next sequence admitted there starts from nothing."""


DrafterFactory = Callable[[CausalLMRunner, EngineView], Proposer]
DRAFTERS: dict[str, tuple[Callable[[CausalLMRunner | None], bool], DrafterFactory, bool]] = {}


def register(name: str, accepts: Callable[[CausalLMRunner | None], bool], *, fallback: bool = False):
    """Class decorator: `cls(runner, view)` drafts with runners for which `accepts(runner)` is true (a
    fallback only for runners no other registration accepts)."""

    def decorate(cls):
        cls.name = name
        DRAFTERS[name] = (accepts, cls, fallback)
        return cls

    return decorate


def drafter_proposer(runner: CausalLMRunner | None, view: EngineView) -> Proposer:
    """The proposer drafting with `runner` (None: no drafter): the latest registration that accepts it."""
    entries = list(DRAFTERS.values())[::-1]
    for accepts, factory, _ in sorted(entries, key=lambda entry: entry[2]):  # stable: fallbacks last
        if accepts(runner):
            return factory(runner, view)
    raise ValueError("no registered proposer drafts with this runner")
