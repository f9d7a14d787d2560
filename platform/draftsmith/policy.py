"""The speculation policy: every step, how many tokens each row drafts (0 included) and with which proposer.

The rule is goodput maximisation, as in SmartSpec (Liu et al. 2024, "Optimizing Speculative Decoding for
Serving Large Language Models Using Goodput"): for each candidate step length G (0 = autoregressive) and
each way of proposing (the drafter for every row, prompt lookup where a row has a match and the drafter
elsewhere, or lookup alone), predict

    goodput(G) = sum over rows of E_i(g_i)  /  (verify_seconds(rows x (G + 1) tokens) + drafting seconds)

and take the best. verify_seconds has two parts: a curve over the forward's tokens (rows x (G + 1): the
weights' matrix products) and attention, `target_seconds_per_context_token` x (G + 1) x the rows' summed
context lengths: every verified position of every row reads its whole context, so the price of a longer
verification grows with the context (on a CPU it dominates past a few hundred tokens), padded rows included.
E_i(g) = 1 + sum_{k=1..g} prod_{j<=k} alpha_j is a row's expected emitted tokens when
it verifies g proposed tokens whose position-j conditional acceptance is alpha_j (the bonus or recovered
token is the 1). SmartSpec's rule was chosen over per-row confidence stopping (SpecDec++, EAGLE-2) because
the cost that decides whether speculation pays here is the batch's verification forward, shared by all rows
and padded to the longest row: only a batch-level rule sees it. Both inputs are kept live: `CostModel` holds
seconds per forward as a function of the tokens in it (measured at start, then moved by every step's own
timing), `AcceptanceEstimates` holds alpha_j per proposer (per drafter version, and lookup) from the
engine's verdicts, with a prior and exponential forgetting so a swapped drafter or a traffic shift is
followed.

A choice of G = 0 collects no acceptance evidence, so a proposer that has not been tried for
`probe_interval` steps is tried at G = 1 for one step (the cheapest way to learn that a drafter has become
worth it, e.g. after a hot swap); its cost is bounded by one single-token draft per `probe_interval` steps.

Pure Python over floats: no torch, no timing of its own. What it does not do: run models, measure (the
engine times its forwards and reports them here), or change outputs (any choice is lossless: the target
verifies whatever is proposed).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Sequence

DRAFTER = "drafter"
LOOKUP = "lookup"
NONE = "none"


# ------------------------------------------------------------------------------------------- costs


class CostCurve:
    """Seconds of one forward as a function of the tokens in it (rows x tokens per row), piecewise linear
    between measured points and linear beyond the last two. `observe` moves the nearest point towards a
    new measurement (exponential moving average), so the curve follows load and context growth."""

    def __init__(self, points: dict[int, float], *, smoothing: float = 0.1):
        if not points:
            raise ValueError("a cost curve needs at least one measured point")
        if any(n < 1 or s <= 0 or not math.isfinite(s) for n, s in points.items()):
            raise ValueError(f"cost points need tokens >= 1 and finite seconds > 0, got {points}")
        self.tokens = sorted(points)
        self.seconds = [float(points[n]) for n in self.tokens]
        self.smoothing = smoothing

    def __call__(self, tokens: int) -> float:
        xs, ys = self.tokens, self.seconds
        if len(xs) == 1:
            return ys[0] * max(1.0, tokens / xs[0])
        i = min(max(bisect.bisect_left(xs, tokens), 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        if tokens <= x0:
            return y0
        return max(y0, y0 + (y1 - y0) * (tokens - x0) / (x1 - x0))

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens < 1 or not seconds > 0 or not math.isfinite(seconds):
            return
        i = min(range(len(self.tokens)), key=lambda j: abs(math.log(self.tokens[j] / tokens)))
        # Scale the observation to the point's size before blending, so a neighbour's timing moves it sensibly.
        scaled = seconds * self(self.tokens[i]) / max(self(tokens), 1e-12)
        self.seconds[i] += self.smoothing * (scaled - self.seconds[i])

    def as_dict(self) -> dict[int, float]:
        return dict(zip(self.tokens, self.seconds))


@dataclasses.dataclass
class CostModel:
    """The step's cost parts: the target's verification forward (its tokens' curve, at no context, plus
    attention: seconds per verified position per context token), one drafter forward, lookup per row."""

    target: CostCurve
    drafter: CostCurve | None = None
    lookup_seconds_per_row: float = 0.0
    target_seconds_per_context_token: float = 0.0

    def attention_seconds(self, verify_tokens: int, context_tokens: int) -> float:
        """The context's part of a verification: each of a row's verify_tokens positions reads its context."""
        return self.target_seconds_per_context_token * verify_tokens * context_tokens

    def step_seconds(self, rows: int, verify_tokens: int, drafter_rows: int, draft_steps: int,
                     lookup_rows: int, context_tokens: int = 0) -> float:
        """`context_tokens`: the rows' context lengths summed (every row verifies verify_tokens positions)."""
        seconds = (self.target(rows * verify_tokens) + self.attention_seconds(verify_tokens, context_tokens)
                   + lookup_rows * self.lookup_seconds_per_row)
        if draft_steps and drafter_rows and self.drafter is not None:
            seconds += draft_steps * self.drafter(rows)  # the drafter runs over every row of the batch
        return seconds


# -------------------------------------------------------------------------------------- acceptance


class AcceptanceEstimates:
    """Per proposer, the conditional acceptance alpha_k of draft position k (given positions < k were
    accepted), from the verdicts of the steps that proposed: decayed counts plus a prior.

    The prior (`prior_alpha`, worth `prior_weight` observations) is what a proposer never verified is
    assumed to reach; `decay` (< 1) forgets old verdicts, so estimates follow a drafter swap (a new key) or
    a shift in traffic."""

    def __init__(self, max_positions: int = 16, *, prior_alpha: float = 0.5, prior_weight: float = 2.0,
                 decay: float = 0.995):
        self.max_positions = max_positions
        self.prior_alpha = prior_alpha
        self.prior_weight = prior_weight
        self.decay = decay
        self._tried: dict[str, list[float]] = {}
        self._accepted: dict[str, list[float]] = {}
        self.steps_since_tried: dict[str, int] = {}

    def _counts(self, proposer: str) -> tuple[list[float], list[float]]:
        if proposer not in self._tried:
            self._tried[proposer] = [0.0] * self.max_positions
            self._accepted[proposer] = [0.0] * self.max_positions
        return self._tried[proposer], self._accepted[proposer]

    def update(self, proposer: str, verdicts: Sequence[tuple[int, int]]) -> None:
        """Record one step's rows that `proposer` drafted for: (proposed, accepted) per row."""
        tried, accepted = self._counts(proposer)
        for k in range(self.max_positions):
            tried[k] *= self.decay
            accepted[k] *= self.decay
        for proposed, took in verdicts:
            for k in range(min(positions_reached(proposed, took), self.max_positions)):
                tried[k] += 1
                accepted[k] += k < took
        self.steps_since_tried[proposer] = 0

    def tick(self) -> None:
        """One engine step passed."""
        for key in self.steps_since_tried:
            self.steps_since_tried[key] += 1

    def forget(self, proposer: str) -> None:
        """Drop a proposer's evidence (a drafter that is no longer loaded)."""
        self._tried.pop(proposer, None)
        self._accepted.pop(proposer, None)
        self.steps_since_tried.pop(proposer, None)

    def alphas(self, proposer: str) -> list[float]:
        """alpha_1..alpha_max for `proposer`; positions never reached fall back to the prior."""
        tried, accepted = self._counts(proposer)
        w, a0 = self.prior_weight, self.prior_alpha
        return [(accepted[k] + w * a0) / (tried[k] + w) for k in range(self.max_positions)]

    def observations(self, proposer: str) -> float:
        return self._counts(proposer)[0][0]


def positions_reached(proposed: int, accepted: int) -> int:
    """Draft positions a verification reached: proposed, and every earlier position accepted."""
    return min(proposed, accepted + 1)


def expected_tokens(alphas: Sequence[float], gamma: int) -> float:
    """Expected tokens one verification emits when gamma tokens are proposed (the bonus or recovered token
    included): 1 + sum_{k<=gamma} prod_{j<=k} alpha_j."""
    total, reach = 1.0, 1.0
    for k in range(gamma):
        reach *= alphas[k] if k < len(alphas) else alphas[-1]
        total += reach
    return total


# ------------------------------------------------------------------------------------------ choice


@dataclasses.dataclass(frozen=True)
class RowState:
    """What the policy knows of one decoding row this step.

    cap: the most tokens it may draft (remaining output and context, and the request's own limit);
    lookup_tokens: tokens prompt lookup found for it (0: no match, or lookup off);
    fixed_gamma: a request's explicit num_speculative_tokens (honoured as asked, within cap);
    context: the tokens its verification reads besides its own (prompt and output so far)."""

    cap: int
    lookup_tokens: int = 0
    fixed_gamma: int | None = None
    context: int = 0


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The policy's choice for one step: per-row draft length and proposer, and what it predicted."""

    gammas: tuple[int, ...]
    proposers: tuple[str, ...]  # DRAFTER, LOOKUP or NONE per row
    predicted_tokens_per_s: float
    autoregressive_tokens_per_s: float
    probe: bool = False
    context_tokens: int = 0  # the rows' context lengths summed, as priced

    @property
    def predicted_speedup(self) -> float:
        return self.predicted_tokens_per_s / self.autoregressive_tokens_per_s if self.autoregressive_tokens_per_s else 1.0

    @property
    def speculating(self) -> bool:
        return any(self.gammas)


@dataclasses.dataclass
class SpeculationPolicy:
    """Chooses each step's plan from a cost model and live acceptance estimates (see the module docstring)."""

    costs: CostModel
    estimates: AcceptanceEstimates
    max_gamma: int = 8
    probe_interval: int = 64
    drafter_key: str | None = None  # the loaded drafter's key in `estimates` (e.g. "drafter:v3"); None: no drafter
    lookup_enabled: bool = False

    def autoregressive_tokens_per_s(self, rows: int, context_tokens: int = 0) -> float:
        """The rate of a step drafting nothing: one token per row; with lookup enabled, every step pays it."""
        return rows / self.costs.step_seconds(rows, 1, 0, 0, rows if self.lookup_enabled else 0, context_tokens)

    def choose(self, rows: Sequence[RowState]) -> StepPlan:
        n = len(rows)
        ar = self.autoregressive_tokens_per_s(n, sum(r.context for r in rows))
        best = StepPlan((0,) * n, (NONE,) * n, ar, ar, context_tokens=sum(r.context for r in rows))
        drafter_alphas = self.estimates.alphas(self.drafter_key) if self.drafter_key else None
        lookup_alphas = self.estimates.alphas(LOOKUP) if self.lookup_enabled else None
        top = min(self.max_gamma, max((r.cap for r in rows), default=0))
        modes = self._modes(drafter_alphas is not None, lookup_alphas is not None)
        if any(r.fixed_gamma for r in rows) and modes:
            best = None  # rows that asked for a length get it in every plan, G = 0 for the others included
        for use_lookup, use_drafter in modes:
            for gamma in range(0 if best is None else 1, top + 1):
                plan = self._plan(rows, gamma, use_lookup, use_drafter, drafter_alphas, lookup_alphas, ar)
                if best is None or plan.predicted_tokens_per_s > best.predicted_tokens_per_s:
                    best = plan
        probe = self._probe(rows, best, drafter_alphas, lookup_alphas, ar)
        return probe or best

    @staticmethod
    def _modes(has_drafter: bool, has_lookup: bool) -> list[tuple[bool, bool]]:
        modes = []
        if has_drafter:
            modes.append((False, True))
        if has_lookup:
            modes.append((True, False))
        if has_drafter and has_lookup:
            modes.append((True, True))
        return modes

    def _row(self, row: RowState, gamma: int, use_lookup: bool, use_drafter: bool,
             drafter_alphas, lookup_alphas) -> tuple[int, str, float]:
        """(draft length, proposer, expected tokens) of one row under a mode and step length."""
        gamma = min(gamma if row.fixed_gamma is None else row.fixed_gamma, row.cap)
        if gamma <= 0:
            return 0, NONE, 1.0
        if use_lookup and row.lookup_tokens:
            g = min(gamma, row.lookup_tokens)
            return g, LOOKUP, expected_tokens(lookup_alphas, g)
        if use_drafter:
            return gamma, DRAFTER, expected_tokens(drafter_alphas, gamma)
        return 0, NONE, 1.0

    def _plan(self, rows, gamma, use_lookup, use_drafter, drafter_alphas, lookup_alphas, ar) -> StepPlan:
        chosen = [self._row(r, gamma, use_lookup, use_drafter, drafter_alphas, lookup_alphas) for r in rows]
        return self._priced(chosen, ar, sum(r.context for r in rows))

    def _priced(self, chosen: list[tuple[int, str, float]], ar: float, context: int, probe: bool = False) -> StepPlan:
        gammas = tuple(g for g, _, _ in chosen)
        proposers = tuple(p for _, p, _ in chosen)
        verify = 1 + max(gammas, default=0)
        drafter_rows = sum(p == DRAFTER for p in proposers)
        # The drafter, once it runs, drafts for every row as long as the longest (lookup rows included).
        draft_steps = max(gammas) if drafter_rows else 0
        lookup_rows = len(chosen) if self.lookup_enabled else 0
        seconds = self.costs.step_seconds(len(chosen), verify, drafter_rows, draft_steps, lookup_rows, context)
        tokens = sum(e for _, _, e in chosen)
        return StepPlan(gammas, proposers, tokens / seconds, ar, probe, context)

    def _probe(self, rows, best: StepPlan, drafter_alphas, lookup_alphas, ar) -> StepPlan | None:
        """A one-token trial of a proposer the plan has not used for probe_interval steps, else None. Rows
        with an explicit length keep what the best plan gave them."""
        for key, alphas, used in ((self.drafter_key, drafter_alphas, DRAFTER), (LOOKUP, lookup_alphas, LOOKUP)):
            if alphas is None or used in best.proposers:
                continue
            if self.estimates.steps_since_tried.setdefault(key, 0) < self.probe_interval:
                continue
            alphas_of = {DRAFTER: drafter_alphas, LOOKUP: lookup_alphas}
            chosen = [self._row(r, 1, used == LOOKUP, used == DRAFTER, drafter_alphas, lookup_alphas)
                      if r.fixed_gamma is None else (g, p, expected_tokens(alphas_of[p], g) if g else 1.0)
                      for r, g, p in zip(rows, best.gammas, best.proposers)]
            if any(p == used for _, p, _ in chosen):
                return self._priced(chosen, ar, sum(r.context for r in rows), probe=True)
        return None
