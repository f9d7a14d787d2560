"""A drafter that reads tokens alone (a model cut from the target, or any small Llama-family model).

Cache rule: position p holds token p. Drafting writes the last real token and the first G - 1 drafts
exactly, so after drafting G tokens a row of T tokens holds T + G - 1 exact positions, and after
verification the real ones among them: T + min(accepted, G - 1) (base class `commit`). After a fully
accepted step a row lacks one position, which the next draft's window feeds (`max_lag` 1); anything
longer is caught up separately.
"""

from __future__ import annotations

from draftsmith.proposers.base import register
from draftsmith.proposers.drafter import DrafterProposer


@register("token", accepts=lambda runner: runner is not None, fallback=True)
class TokenDrafter(DrafterProposer):
    def max_lag(self, shortest: int, gamma: int) -> int:
        return 1

    def drafted_length(self, total: int, gamma: int) -> int:
        return total + gamma - 1
