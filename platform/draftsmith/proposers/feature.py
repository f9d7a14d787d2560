"""An EAGLE-style drafter that reads the target's features (`runner.feature_fc`, see models.py).

Its position p reads (the target's final-normed hidden state at p, token p + 1), so it can be exact only
up to position T - 2 (T = len(tokens)), whose output drafts the first token; each later draft reads the
feature the drafter itself drafted. Those positions are not kept: after drafting (and after verification)
the exact prefix is T - 1, and the next step rewrites them from the target's verified features, so drafted
features never accumulate error. After a fully accepted step of G drafts a row lacks G + 1 positions,
all fed by the next draft's window (`max_lag`).
"""

from __future__ import annotations

import torch

from draftsmith.proposers.base import register
from draftsmith.proposers.drafter import DrafterProposer


@register("feature", accepts=lambda runner: runner is not None and runner.feature_fc is not None)
class FeatureDrafter(DrafterProposer):
    shift = 1

    def max_lag(self, shortest: int, gamma: int) -> int:
        return min(gamma + 1, shortest - 2)  # the window starts at position >= 0 in every row

    def drafted_length(self, total: int, gamma: int) -> int:
        return total - 1

    def features_at(self, slots: slice, positions: torch.Tensor) -> torch.Tensor:
        """The stored target features [B, S, D] of `slots` at positions [B, S]."""
        rows = torch.arange(slots.start, slots.stop, device=positions.device)
        return self.view.target_features[rows[:, None], positions]
