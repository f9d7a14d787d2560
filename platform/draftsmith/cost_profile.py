"""Measure a pair's cost profile: the seconds of its forwards by shape, for the speculation policy.

What it does: times the target's verification forward (rows x tokens per row, logits and features for every
position, as the engine's step runs it) and one drafter forward (rows x 1 token) on scratch caches, after a
warm-up, and returns a `policy.CostModel`. The verification's price depends on the context each position reads
(attention), so the target is also timed at a short and a long context: the difference gives the seconds per
verified position per context token, and the tokens' curve is kept at no context (the policy adds each step's
own context back). The engine calls it when it
starts in `auto` mode and when a drafter is swapped in; afterwards every step's own timings keep the curves
current (`CostCurve.observe`).

What it does not do: choose anything (policy.py), or touch the engine's own caches (it allocates scratch ones,
freed on return).
"""

from __future__ import annotations

import random
import statistics
import time

import torch

from draftsmith.llama import CausalLMRunner
from draftsmith.policy import CostCurve, CostModel
from draftsmith.prompt_lookup import lookup_proposal


def _timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: first calls pay allocation and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _shapes(max_rows: int, max_tokens: int) -> list[tuple[int, int]]:
    rows = sorted({1, max_rows})
    tokens = sorted({1, 2, max(1, max_tokens // 2), max_tokens})
    return [(r, t) for r in rows for t in tokens]


@torch.inference_mode()
def target_curve(target: CausalLMRunner, *, max_rows: int, max_tokens: int, context: int = 64,
                 repeats: int = 2) -> CostCurve:
    """Seconds of a verification forward by total tokens (rows x tokens per row, at `context` cached positions)."""
    cache = target.new_cache(max_rows, context + max_tokens + 1)
    points: dict[int, float] = {}
    for rows, tokens in _shapes(max_rows, max_tokens):
        ids = torch.zeros(rows, tokens, dtype=torch.long, device=target.device)
        positions = (context + torch.arange(tokens, device=target.device))[None].expand(rows, tokens)
        seconds = _timed(lambda: target.forward(ids, positions, cache, slice(0, rows), return_features=True),
                         repeats, target.device)
        n = rows * tokens
        points[n] = min(points.get(n, seconds), seconds)
    return CostCurve(_monotone(points))


@torch.inference_mode()
def drafter_curve(drafter: CausalLMRunner, *, max_rows: int, context: int = 64, repeats: int = 3) -> CostCurve:
    """Seconds of one single-token draft forward by rows."""
    cache = drafter.new_cache(max_rows, context + 2)
    hidden = drafter.embed.shape[1]
    points: dict[int, float] = {}
    for rows in sorted({1, max(1, max_rows // 2), max_rows}):
        ids = torch.zeros(rows, 1, dtype=torch.long, device=drafter.device)
        positions = torch.full((rows, 1), context, device=drafter.device)
        features = None
        if drafter.feature_fc is not None:
            features = torch.zeros(rows, 1, hidden, dtype=drafter.dtype, device=drafter.device)
        points[rows] = _timed(lambda: drafter.forward(ids, positions, cache, slice(0, rows), features=features,
                                                      return_features=features is not None),
                              repeats, drafter.device)
    return CostCurve(_monotone(points))


@torch.inference_mode()
def attention_seconds_per_context_token(target: CausalLMRunner, *, rows: int, tokens: int, short: int = 64,
                                        long: int = 448, repeats: int = 3) -> float:
    """Seconds a verification adds per verified position per context token: the same forward (rows x tokens)
    timed after `short` and after `long` cached positions, the difference over the extra (position, context
    token) pairs; never negative (timing noise)."""
    cache = target.new_cache(rows, long + tokens + 1)
    ids = torch.zeros(rows, tokens, dtype=torch.long, device=target.device)
    seconds = {}
    for context in (short, long):
        positions = (context + torch.arange(tokens, device=target.device))[None].expand(rows, tokens)
        seconds[context] = _timed(lambda: target.forward(ids, positions, cache, slice(0, rows), return_features=True),
                                  repeats, target.device)
    return max(0.0, (seconds[long] - seconds[short]) / (rows * tokens * (long - short)))


def lookup_seconds_per_row(context: int = 512, repeats: int = 20) -> float:
    """Seconds prompt lookup takes for one row of `context` tokens with no match (its slowest case)."""
    rng = random.Random(0)  # one generator: distinct tokens, so that no n-gram matches
    tokens = [rng.randrange(50_000) for _ in range(context)]
    start = time.perf_counter()
    for _ in range(repeats):
        lookup_proposal(tokens, min_n=1, max_n=3, count=8)
    return (time.perf_counter() - start) / repeats


def measure_cost_model(target: CausalLMRunner, drafter: CausalLMRunner | None, *, max_rows: int,
                       max_tokens: int, lookup: bool = False, context: int = 64) -> CostModel:
    """The whole profile for a pair (drafter None: target and lookup only)."""
    per_context_token = attention_seconds_per_context_token(target, rows=min(4, max_rows),
                                                            tokens=min(4, max_tokens), short=context)
    curve = target_curve(target, max_rows=max_rows, max_tokens=max_tokens, context=context)
    return CostModel(
        target=without_context(curve, per_context_token, context),
        drafter=None if drafter is None else drafter_curve(drafter, max_rows=max_rows),
        lookup_seconds_per_row=lookup_seconds_per_row() if lookup else 0.0,
        target_seconds_per_context_token=per_context_token,
    )


def without_context(curve: CostCurve, per_context_token: float, context: int) -> CostCurve:
    """A curve timed at `context` cached positions, with the attention over them taken out (each of its n
    tokens read `context` positions); never below half of what was timed."""
    points = {n: max(0.5 * s, s - per_context_token * n * context) for n, s in curve.as_dict().items()}
    return CostCurve(_monotone(points), smoothing=curve.smoothing)


def _monotone(points: dict[int, float]) -> dict[int, float]:
    """More tokens never cost less: timing noise must not make the policy think a longer draft is free-er."""
    out, floor = {}, 0.0
    for n in sorted(points):
        floor = max(floor, points[n])
        out[n] = floor
    return out
