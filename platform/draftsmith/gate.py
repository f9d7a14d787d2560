"""The promotion gate's rule: is the challenger drafter strictly faster than the champion, at a stated confidence?

What it does: takes per-prompt output tokens/s of both drafters, measured on the same prompts with the
same serving `EngineConfig` (policy included) by `evaluation.measure_speed_paired`, and decides. The
comparison is PAIRED per prompt: r_i = log(challenger tok/s / champion tok/s) for prompt i, so what a
prompt costs (its length, how predictable it is) cancels and only the drafters' difference is left.

The rule. Promote only if a one-sided Wilcoxon signed-rank test over prompts rejects "the challenger is
not faster" (H0: the r_i are symmetric about 0 or below it) at level 1 - confidence (default confidence
0.95, so p < 0.05), and the geometric-mean speed ratio is above 1. A tie (ratios scattered around 1, or
all exactly 1) gives a large p and is refused; a drafter that accepts more tokens but serves slower is
refused, and the reason says so. Token acceptance of both is reported beside the speeds, never gated on:
what the platform sells is speed.

Why this test and this sample size. Wilcoxon over the sign test: it uses how far each prompt's ratio is
from 1, not only its side, so it needs far fewer prompts for the same power (the sign test with n
prompts cannot go below p = 2^-n and loses about a third of the efficiency for symmetric noise). Over a
t-test: per-prompt timings on a shared CPU have heavy tails (a scheduler hiccup makes one prompt slow),
and ranks are robust to them. Its p-value is exact here (the null distribution of the rank sum is
enumerated, midranks for ties), so no normal approximation is needed at the small n the gate runs on. A
real gain of 10-15% whose per-prompt ratios scatter by about as much gives a standardised effect near
1; with 24-32 prompts the one-sided test at 0.05 then detects it with power well above 0.9 (and 8 prompts
all in the challenger's favour already give p = 1/256), while timing each prompt once per drafter keeps
the gate's own runtime short. The enumeration costs about n^3, so evaluation caps the sample at 256
prompts. Interleaving the two drafters per prompt (in alternating order) makes drift of the machine (other processes, thermal state) hit both arms alike, and both arms get
the same warm-up. A seeded percentile bootstrap over prompts gives a confidence interval of the
geometric-mean ratio, recorded beside the p-value.

What it does not do: time anything (evaluation.py), or touch the registry (registry.apply_gate records
the decision and moves the alias).
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Sequence

TEST_NAME = "wilcoxon_signed_rank_one_sided_paired_per_prompt"


def wilcoxon_greater(diffs: Sequence[float]) -> float:
    """Exact one-sided p-value of the Wilcoxon signed-rank test, H1: the differences lean positive.

    Zero differences are dropped (Wilcoxon's convention); tied magnitudes get midranks. The null
    distribution of the positive rank sum is enumerated over the 2^n sign assignments by dynamic
    programming on doubled ranks (integers), so it is exact with ties too. No differences: p = 1.
    """
    d = [float(x) for x in diffs if x != 0 and not math.isnan(x)]
    n = len(d)
    if n == 0:
        return 1.0
    order = sorted(range(n), key=lambda i: abs(d[i]))
    doubled = [0] * n  # 2 x midrank: an integer even with ties
    i = 0
    while i < n:
        j = i
        while j + 1 < n and abs(d[order[j + 1]]) == abs(d[order[i]]):
            j += 1
        for k in range(i, j + 1):
            doubled[order[k]] = i + j + 2  # ranks i+1 .. j+1, midrank (i + j + 2) / 2, doubled
        i = j + 1
    observed = sum(r for r, x in zip(doubled, d) if x > 0)
    counts = {0: 1}  # doubled positive rank sum -> number of sign assignments
    for r in doubled:
        nxt = dict(counts)
        for s, c in counts.items():
            nxt[s + r] = nxt.get(s + r, 0) + c
        counts = nxt
    at_least = sum(c for s, c in counts.items() if s >= observed)
    return at_least / 2 ** n


def bootstrap_interval(values: Sequence[float], *, confidence: float, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Two-sided percentile bootstrap interval of the mean of `values` (seeded: same data, same interval)."""
    n = len(values)
    if n == 0:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1.0 - confidence) / 2
    return means[int(tail * (resamples - 1))], means[int(math.ceil((1 - tail) * (resamples - 1)))]


@dataclasses.dataclass(frozen=True)
class GateDecision:
    """The gate's verdict and everything it rests on (recorded on the challenger's version tags)."""

    promoted: bool
    reason: str
    test: str = TEST_NAME
    confidence: float | None = None
    p_value: float | None = None
    prompts: int = 0
    speed_ratio: float | None = None  # geometric mean of challenger / champion tok/s over prompts
    speed_ratio_interval: tuple[float, float] | None = None
    challenger_tok_s: float | None = None  # pooled: all output tokens / all seconds
    champion_tok_s: float | None = None
    challenger_token_acceptance: float | None = None
    champion_token_acceptance: float | None = None
    champion_version: str | None = None

    def tags(self) -> dict[str, str]:
        """String tags for the registry (`gate_*`), None values left out."""
        values = {
            "gate_test": self.test, "gate_confidence": self.confidence, "gate_p_value": self.p_value,
            "gate_prompts": self.prompts, "gate_speed_ratio": self.speed_ratio,
            "gate_speed_ratio_interval": (None if self.speed_ratio_interval is None else
                                          "[{:.4f}, {:.4f}]".format(*self.speed_ratio_interval)),
            "gate_challenger_tok_s": self.challenger_tok_s, "gate_champion_tok_s": self.champion_tok_s,
            "gate_challenger_token_acceptance": self.challenger_token_acceptance,
            "gate_champion_token_acceptance": self.champion_token_acceptance,
            "gate_champion_version": self.champion_version,
        }
        return {k: (f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in values.items() if v is not None}

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def decide(challenger_tok_s: Sequence[float], champion_tok_s: Sequence[float], *, confidence: float = 0.95,
           challenger_pooled_tok_s: float | None = None, champion_pooled_tok_s: float | None = None,
           challenger_token_acceptance: float | None = None, champion_token_acceptance: float | None = None,
           champion_version: str | None = None, bootstrap_seed: int = 0,
           bootstrap_resamples: int = 2000) -> GateDecision:
    """The rule of the module docstring over per-prompt tokens/s (index i = the same prompt in both lists)."""
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    if len(challenger_tok_s) != len(champion_tok_s):
        raise ValueError("the paired comparison needs one speed per prompt for each drafter")
    pairs = [(a, b) for a, b in zip(challenger_tok_s, champion_tok_s) if a > 0 and b > 0]
    # Rounded far below any real difference: float noise must not break a tie of magnitudes (it would rank
    # one side systematically above the other).
    logs = [round(math.log(a / b), 9) for a, b in pairs]
    n = len(logs)
    common = dict(confidence=confidence, prompts=n, challenger_tok_s=challenger_pooled_tok_s,
                  champion_tok_s=champion_pooled_tok_s, challenger_token_acceptance=challenger_token_acceptance,
                  champion_token_acceptance=champion_token_acceptance, champion_version=champion_version)
    if n == 0:
        return GateDecision(False, "no prompt was timed for both drafters: nothing to compare", **common)
    p = wilcoxon_greater(logs)
    ratio = math.exp(sum(logs) / n)
    low, high = bootstrap_interval(logs, confidence=confidence, resamples=bootstrap_resamples,
                                   seed=bootstrap_seed)
    alpha = 1 - confidence
    promoted = p < alpha and ratio > 1
    speeds = (f"speed ratio {ratio:.3f} (challenger/champion tok/s, {confidence:.0%} interval "
              f"[{math.exp(low):.3f}, {math.exp(high):.3f}]), one-sided Wilcoxon p={p:.4g} over {n} prompts")
    accepts_more = (challenger_token_acceptance is not None and champion_token_acceptance is not None
                    and challenger_token_acceptance > champion_token_acceptance)
    acceptance = ("" if challenger_token_acceptance is None or champion_token_acceptance is None else
                  f"; token acceptance {challenger_token_acceptance:.3f} vs {champion_token_acceptance:.3f}")
    if promoted:
        reason = f"challenger serves faster at confidence {confidence:.0%}: {speeds}{acceptance}"
    elif ratio <= 1 and accepts_more:
        reason = f"refused: the challenger accepts more tokens but serves slower: {speeds}{acceptance}"
    elif ratio <= 1:
        reason = f"refused: the challenger serves no faster: {speeds}{acceptance}"
    else:
        reason = (f"refused: the challenger is not faster at confidence {confidence:.0%} "
                  f"(p={p:.4g} >= {alpha:.4g}): {speeds}{acceptance}")
    return GateDecision(promoted, reason, p_value=p, speed_ratio=ratio,
                        speed_ratio_interval=(math.exp(low), math.exp(high)), **common)


__all__ = ["GateDecision", "TEST_NAME", "bootstrap_interval", "decide", "wilcoxon_greater"]
