"""The engine's side of `num_speculative_tokens: auto`: the speculation policy built, fed and reported.

What it does: measures the pair's cost profile when the engine starts (cost_profile.py; the drafter's curve
again when a drafter is swapped in, whose verdicts then go to a new acceptance key, `drafter:<version>`),
turns a step's rows into the policy's `RowState`s and returns its `StepPlan`, and after the step's
verification feeds back what happened: each proposer's verdicts (per draft position), the verification
forward's seconds by tokens, the drafter's seconds per forward, prompt lookup's seconds per row. It keeps
the exponential averages of predicted and measured speedup that `SpecEngine.policy_snapshot` reports.

What it does not do: choose (policy.py, a pure function), draft or verify (specdec.py, proposers/), or
change outputs: whatever the plan says, the target verifies it, so every plan is lossless.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from draftsmith.cost_profile import drafter_curve, measure_cost_model
from draftsmith.engine_config import EngineConfig
from draftsmith.llama import CausalLMRunner
from draftsmith.policy import LOOKUP, AcceptanceEstimates, CostModel, RowState, SpeculationPolicy, StepPlan

MAX_POSITIONS = 32  # EngineConfig's largest gamma: a request's explicit length is tracked too
SMOOTHING = 0.1  # weight of the newest step in the reported speedup averages and lookup's cost


@dataclasses.dataclass
class StepTimings:
    """Seconds of one decoding step's parts, as the engine measured them."""

    lookup: float
    draft: float  # drafter forwards (lookup and the drafter's catch-up excluded)
    verify: float
    total: float


class AutoSpeculation:
    """Owns the `SpeculationPolicy` of one engine (see the module docstring)."""

    def __init__(self, config: EngineConfig, target: CausalLMRunner, drafter: CausalLMRunner | None,
                 drafter_version: str, *, lookup: bool, cost_model: CostModel | None = None):
        self.max_rows = config.max_batch_size
        self.max_gamma = config.auto_max_speculative_tokens
        costs = cost_model or measure_cost_model(target, drafter, max_rows=self.max_rows,
                                                 max_tokens=self.max_gamma + 1, lookup=lookup)
        self.policy = SpeculationPolicy(costs, AcceptanceEstimates(MAX_POSITIONS), max_gamma=self.max_gamma,
                                        probe_interval=config.auto_probe_interval,
                                        drafter_key=self._key(drafter, drafter_version), lookup_enabled=lookup)
        self.predicted_speedup = 1.0
        self.measured_speedup = 1.0
        self.steps = 0

    @staticmethod
    def _key(drafter: CausalLMRunner | None, version: str) -> str | None:
        return None if drafter is None else f"drafter:{version}"

    def set_drafter(self, drafter: CausalLMRunner | None, version: str) -> None:
        """A new drafter: its own cost curve and acceptance key; the old one's evidence is dropped."""
        self.prepare_drafter(drafter, version)()

    def prepare_drafter(self, drafter: CausalLMRunner | None, version: str) -> Callable[[], None]:
        """`set_drafter` in two parts: what can fail (measuring the new drafter's cost curve) runs now, and the
        returned function, which cannot fail, installs it (so the engine's swap is all-or-nothing)."""
        key = self._key(drafter, version)
        if key == self.policy.drafter_key and drafter is not None:
            return lambda: None
        curve = None if drafter is None else drafter_curve(drafter, max_rows=self.max_rows)

        def install() -> None:
            if self.policy.drafter_key is not None:
                self.policy.estimates.forget(self.policy.drafter_key)
            self.policy.drafter_key = key
            self.policy.costs.drafter = curve

        return install

    def plan(self, caps: Sequence[int], matches: Sequence[list[int]] | None,
             fixed: Sequence[int | None], contexts: Sequence[int] | None = None) -> StepPlan:
        """The policy's plan for rows with these caps, lookup matches (None: lookup off), explicit lengths and
        context lengths (the tokens each row's verification reads; None: unknown, 0)."""
        lookups = [0] * len(caps) if matches is None else [len(m) for m in matches]
        contexts = [0] * len(caps) if contexts is None else list(contexts)
        return self.policy.choose([RowState(c, n, f, x) for c, n, f, x in zip(caps, lookups, fixed, contexts)])

    def switched_off(self, plan: StepPlan, caps: Sequence[int], matches: Sequence[list[int]] | None,
                     fixed: Sequence[int | None]) -> list[bool]:
        """Per row: the policy chose 0 tokens although the row could have drafted (room left, no explicit
        length of its own, and a drafter loaded or a lookup match found)."""
        drafter = self.policy.drafter_key is not None
        return [g == 0 and cap > 0 and f is None and (drafter or bool(matches and matches[i]))
                for i, (g, cap, f) in enumerate(zip(plan.gammas, caps, fixed))]

    def observe(self, plan: StepPlan, sources: Sequence[str], lengths: Sequence[int], accepted: Sequence[int],
                width: int, emitted: int, timings: StepTimings) -> None:
        """Feed one step back: verdicts per proposer, the step's timings, the speedup averages."""
        policy, costs, rows = self.policy, self.policy.costs, len(lengths)
        verdicts: dict[str, list[tuple[int, int]]] = {}
        for source, g, a in zip(sources, lengths, accepted):
            if g:
                key = LOOKUP if source == LOOKUP else policy.drafter_key
                if key is not None:
                    verdicts.setdefault(key, []).append((g, a))
        for key, rows_verdicts in verdicts.items():
            policy.estimates.update(key, rows_verdicts)
        policy.estimates.tick()
        # The curve is the context-free part: attention over the rows' contexts (priced apart) is taken out first.
        attention = costs.attention_seconds(width + 1, plan.context_tokens)
        costs.target.observe(rows * (width + 1), max(timings.verify - attention, 0.1 * timings.verify))
        if costs.drafter is not None and width and policy.drafter_key in verdicts:
            costs.drafter.observe(rows, timings.draft / width)
        if policy.lookup_enabled and rows:
            costs.lookup_seconds_per_row += SMOOTHING * (timings.lookup / rows - costs.lookup_seconds_per_row)
        autoregressive = policy.autoregressive_tokens_per_s(rows, plan.context_tokens)
        measured = emitted / timings.total / autoregressive if timings.total > 0 else 1.0
        first = self.steps == 0
        self.predicted_speedup = plan.predicted_speedup if first else self.predicted_speedup + SMOOTHING * (
            plan.predicted_speedup - self.predicted_speedup)
        self.measured_speedup = measured if first else self.measured_speedup + SMOOTHING * (
            measured - self.measured_speedup)
        self.steps += 1

    def snapshot(self) -> dict:
        estimates = self.policy.estimates
        keys = [k for k in (self.policy.drafter_key, LOOKUP if self.policy.lookup_enabled else None) if k]
        return {"predicted_speedup": self.predicted_speedup, "measured_speedup": self.measured_speedup,
                "alphas": {key: estimates.alphas(key)[: self.max_gamma] for key in keys}, "steps": self.steps}
