"""What the engine did for one request: its speculation counters and the rates derived from them.

What it does: `RequestStats` counts, per request, the steps, drafted / accepted / compared tokens, the
drafts by length and the verdicts by draft position, which proposers drafted, the steps the `auto` policy
switched speculation off, and the seconds spent; `record_step` adds one verification step's outcome.
`AcceptanceRates` derives the rates of docs/design.md's vocabulary from the counters (shared with
evaluation.py's and timeline.py's pooled counts).

What it does not do: decide anything (policy.py), or aggregate across requests (evaluation.py, serve/).
"""

from __future__ import annotations

import dataclasses

from draftsmith.policy import LOOKUP, positions_reached


def drafter_token_acceptance(accepted: int, compared: int, lookup_accepted: int, lookup_compared: int) -> float:
    """accepted / compared over the drafter's proposals only (0.0 when it proposed nothing)."""
    compared_drafter = compared - lookup_compared
    return (accepted - lookup_accepted) / compared_drafter if compared_drafter > 0 else 0.0


class AcceptanceRates:
    """The derived rates of docs/design.md's vocabulary, over counters named drafted, accepted, compared,
    steps and emitted_in_steps (per request here; pooled over requests in evaluation.py)."""

    drafted: int
    accepted: int
    compared: int
    steps: int
    emitted_in_steps: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def token_acceptance(self) -> float:
        return self.accepted / self.compared if self.compared else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.emitted_in_steps / self.steps if self.steps else 0.0

    def rates(self) -> dict[str, float]:
        """The three derived rates by name (for reports and JSON)."""
        return {"acceptance_rate": self.acceptance_rate, "token_acceptance": self.token_acceptance,
                "mean_accepted_length": self.mean_accepted_length}


@dataclasses.dataclass
class RequestStats(AcceptanceRates):
    """Per-request speculation counters: what was really done, whatever was configured."""

    drafted: int = 0
    accepted: int = 0
    compared: int = 0
    steps: int = 0  # target verification steps (the prefill's first token is not one)
    emitted_in_steps: int = 0
    lookup_drafted: int = 0  # of `drafted`, the tokens prompt lookup proposed
    lookup_accepted: int = 0  # of `accepted`, the tokens prompt lookup proposed
    lookup_compared: int = 0  # of `compared`, the draft positions prompt lookup proposed
    speculative_steps: int = 0  # steps that verified at least one proposed token
    policy_off_steps: int = 0  # steps in which the auto policy drafted nothing although the row could have
    # Index k - 1: steps in which draft position k was reached (proposed, and positions < k accepted) / accepted,
    # whichever proposer drafted: position_accepted[k-1] / position_tried[k-1] is the conditional acceptance.
    position_tried: list[int] = dataclasses.field(default_factory=list)
    position_accepted: list[int] = dataclasses.field(default_factory=list)
    draft_length_counts: dict[int, int] = dataclasses.field(default_factory=dict)  # steps by drafted length
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    prefill_seconds: float = 0.0

    @property
    def drafter_token_acceptance(self) -> float:
        """Token acceptance of the drafter's own proposals (prompt lookup's left out): what distillation moves."""
        return drafter_token_acceptance(self.accepted, self.compared, self.lookup_accepted, self.lookup_compared)

    @property
    def mean_drafted_per_step(self) -> float:
        return self.drafted / self.steps if self.steps else 0.0

    @property
    def proposer(self) -> str:
        """Which proposers drafted tokens for this request: drafter, lookup, drafter+lookup or none."""
        names = [name for name, n in (("drafter", self.drafted - self.lookup_drafted), ("lookup", self.lookup_drafted))
                 if n]
        return "+".join(names) or "none"

    def record_step(self, drafted: int, accepted: int, source: str, *, policy_off: bool = False) -> None:
        """One verification step that verified `drafted` tokens from proposer `source`, `accepted` of them."""
        reached = positions_reached(drafted, accepted)
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        self.compared += reached
        if source == LOOKUP:
            self.lookup_drafted += drafted
            self.lookup_accepted += accepted
            self.lookup_compared += reached
        self.speculative_steps += drafted > 0
        self.policy_off_steps += policy_off
        self.draft_length_counts[drafted] = self.draft_length_counts.get(drafted, 0) + 1
        while len(self.position_tried) < reached:
            self.position_tried.append(0)
            self.position_accepted.append(0)
        for k in range(reached):
            self.position_tried[k] += 1
            self.position_accepted[k] += k < accepted

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), **self.rates(), "mean_drafted_per_step": self.mean_drafted_per_step,
                "drafter_token_acceptance": self.drafter_token_acceptance, "proposer": self.proposer}
