"""A drafter whose layers run layer-parallel (EasySpec, draftsmith/layer_parallel.py), with KV calibration.

Its draft forwards approximate, so only positions written by an exact (sequential) forward count: the
first draft forward of every step runs exact over everything the exact prefix lacks (the tokens accepted
at the last verification plus the last real token) and yields the first draft; the other G - 1 draft
forwards run layer-parallel and their entries are overwritten by the next calibration. After drafting a
row of T tokens holds T exact positions, whatever was accepted. A row may lag up to G positions and still
be calibrated by the window (`max_lag`).
"""

from __future__ import annotations

from draftsmith.proposers.base import register
from draftsmith.proposers.drafter import DrafterProposer


def _approximates(runner) -> bool:
    return runner is not None and getattr(runner.layer_executor, "approximate", False)


@register("layer_parallel", accepts=_approximates)
class CalibratedDrafter(DrafterProposer):
    calibrates = True

    def max_lag(self, shortest: int, gamma: int) -> int:
        return min(gamma, shortest - 1)

    def drafted_length(self, total: int, gamma: int) -> int:
        return total
