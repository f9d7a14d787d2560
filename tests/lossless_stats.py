"""Statistics for the lossless-sampling tests: exact reference distributions, chi-square tests, stated power.

What it does: given engine outputs (one request per seed) it computes, from the target model alone, the exact
distribution each output token should follow, and tests the outputs against it with Pearson's chi-square:

- every output position's conditional distribution, through the randomized probability integral transform
  (PIT): for a token x drawn at context c, U = F(x-) + V * p(x | c) with V ~ Uniform(0, 1) independent and
  F the CDF of the target's processed distribution p(. | c) over tokens ordered by decreasing probability.
  U is exactly Uniform(0, 1) when x ~ p(. | c), whatever c is (so the realised prefixes of different samples
  pool), and the U of successive tokens of one sequence are independent (the Rosenblatt transform). The
  test bins U into `PIT_BINS` equal cells: a biased conditional distribution moves mass between ranks;
- the joint distribution of the first two or three tokens: the few most likely prefixes are enumerated and
  their probabilities computed exactly from the target; every other outcome is pooled into one cell.

Power. Pearson's statistic on k cells under an alternative q (null p) is approximately noncentral chi-square
with k - 1 degrees of freedom and noncentrality n * sum((q - p)^2 / p) >= n * (sum |q - p|)^2 = 4 n TV(p, q)^2
(Cauchy-Schwarz). `detectable_tv` inverts that bound: every alternative whose binned distribution is at
least that far in total variation from the reference is detected with the stated power. It bounds the
binned variable (PIT cells, enumerated cells plus the pooled one), which is what a chi-square can see.

The reference processing (temperature, top-k, top-p) is written here again on purpose, in float64 from the
HF model's own logits: an error in `draftsmith.sampling.processed_probs` must not cancel out.

Not here: running the engine (the test modules do, through its public API only).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from scipy import optimize, stats

POWER = 0.9
PIT_BINS = 8
TV_BOUND = 0.03  # the requirement on every statistic's detectable bias


def detectable_tv(n: int, df: int, alpha: float, power: float = POWER) -> float:
    """The smallest total-variation distance between the binned observed and reference distributions that a
    Pearson chi-square test on n samples with df degrees of freedom at level alpha detects with `power`."""
    critical = stats.chi2.isf(alpha, df)
    noncentrality = optimize.brentq(lambda lam: stats.ncx2.sf(critical, df, lam) - power, 1e-9, 1e5)
    return math.sqrt(noncentrality / (4 * n))


@dataclasses.dataclass(frozen=True)
class Params:
    """The sampling parameters of one row (temperature 0 = greedy)."""

    temperature: float
    top_k: int = 0
    top_p: float = 1.0


def reference_probs(logits: torch.Tensor, params: Params) -> torch.Tensor:
    """logits [N, V] -> the processed distributions [N, V] in float64 (an independent implementation)."""
    logits = logits.double()
    if params.temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    scaled = logits / params.temperature
    order = scaled.argsort(dim=-1, descending=True, stable=True)
    sorted_logits = scaled.gather(-1, order)
    keep = torch.ones_like(sorted_logits, dtype=torch.bool)
    if params.top_k:
        keep[:, params.top_k:] = False
    probs = torch.where(keep, sorted_logits, -math.inf).softmax(-1)
    if params.top_p < 1:
        keep &= (probs.cumsum(-1) - probs) < params.top_p  # the token that crosses top_p is kept
    probs = torch.where(keep, sorted_logits, -math.inf).softmax(-1)
    return torch.zeros_like(probs).scatter_(-1, order, probs)


@torch.no_grad()
def next_token_probs(model, sequences: list[list[int]], params: Params, *, chunk: int = 512) -> torch.Tensor:
    """The target's processed next-token distribution after each (equally long) sequence: [N, V]."""
    out = []
    for start in range(0, len(sequences), chunk):
        ids = torch.tensor(sequences[start:start + chunk])
        out.append(reference_probs(model(ids).logits[:, -1].float(), params))
    return torch.cat(out)


@torch.no_grad()
def pit_values(model, prompt: list[int], outputs: list[list[int]], params: list[Params], *,
               seed: int, chunk: int = 256) -> np.ndarray:
    """Randomized PIT values [N, M] of N equally long outputs of one prompt (row i drawn with params[i]).

    Raises AssertionError if a token has probability 0 under the reference (outside top-k / top-p)."""
    rng = torch.Generator().manual_seed(seed)
    m = len(outputs[0])
    assert all(len(o) == m for o in outputs), "outputs must be equally long (no EOS, fixed max_tokens)"
    values = []
    for start in range(0, len(outputs), chunk):
        rows = outputs[start:start + chunk]
        ids = torch.tensor([prompt + o for o in rows])
        logits = model(ids).logits[:, len(prompt) - 1: len(prompt) - 1 + m].float()  # [B, M, V]
        probs = torch.empty(logits.shape, dtype=torch.float64)
        row_params = params[start:start + chunk]
        for group in set(row_params):
            members = torch.tensor([i for i, p in enumerate(row_params) if p == group])
            probs[members] = reference_probs(logits[members].flatten(0, 1), group).view(len(members), m, -1)
        chosen = torch.tensor(rows)[..., None]  # [B, M, 1]
        p_x = probs.gather(-1, chosen)
        bad = (p_x[..., 0] <= 0).nonzero().tolist()
        assert not bad, (f"(sample, output position) {[(start + i, j + 1) for i, j in bad[:5]]} emitted tokens outside "
                         f"the target's support under {[row_params[i] for i, _ in bad[:5]]}")
        # Tokens ranked before x: higher probability, or equal probability and a smaller id.
        vocab = torch.arange(probs.shape[-1])
        before = (probs > p_x) | ((probs == p_x) & (vocab < chosen))
        jitter = torch.rand(len(rows), m, generator=rng, dtype=torch.float64)
        values.append((probs * before).sum(-1) + jitter * p_x[..., 0])
    return torch.cat(values).clamp(0, 1 - 1e-12).numpy()


@dataclasses.dataclass
class Check:
    """One chi-square statistic: its name, sample size, degrees of freedom, p-value and detectable bias."""

    name: str
    n: int
    df: int
    p_value: float
    alpha: float

    @property
    def tv(self) -> float:
        return detectable_tv(self.n, self.df, self.alpha)

    def __str__(self) -> str:
        return f"{self.name}: n={self.n} df={self.df} p={self.p_value:.3g} (alpha {self.alpha:.2g}, TV {self.tv:.4f})"


def pit_check(name: str, u: np.ndarray, alpha: float, bins: int = PIT_BINS) -> Check:
    """Chi-square of PIT values against Uniform(0, 1) over `bins` equal cells."""
    counts = np.bincount(np.minimum((u * bins).astype(int), bins - 1), minlength=bins)
    _, p_value = stats.chisquare(counts, np.full(bins, len(u) / bins))
    return Check(name, len(u), bins - 1, float(p_value), alpha)


@torch.no_grad()
def joint_cells(model, prompt: list[int], params: Params, *, depth: int, n: int, max_cells: int,
                min_expected: float = 25.0, branch: int = 16) -> dict[tuple[int, ...], float]:
    """The exact probabilities of the most likely first-`depth` token tuples (depth 2 or 3), at most `max_cells`
    of them, each with at least `min_expected` expected samples out of n. The rest is pooled by the caller."""
    p1 = next_token_probs(model, [prompt], params)[0]
    tuples = {(int(t),): float(p1[t]) for t in p1.argsort(descending=True)[:branch]}
    for _ in range(depth - 1):
        prefixes = sorted(tuples, key=tuples.get, reverse=True)[:branch]
        probs = next_token_probs(model, [prompt + list(p) for p in prefixes], params)
        tuples = {prefix + (int(t),): tuples[prefix] * float(row[t])
                  for prefix, row in zip(prefixes, probs) for t in row.argsort(descending=True)[:branch]}
    best = sorted(tuples, key=tuples.get, reverse=True)[:max_cells]
    return {c: tuples[c] for c in best if tuples[c] * n >= min_expected}


def joint_check(name: str, outputs: list[list[int]], cells: dict[tuple[int, ...], float], alpha: float) -> Check:
    """Chi-square of the outputs' leading tuples over the enumerated cells plus one pooled cell."""
    depth = len(next(iter(cells)))
    index = {c: i for i, c in enumerate(cells)}
    counts = np.zeros(len(cells) + 1)
    for out in outputs:
        counts[index.get(tuple(out[:depth]), len(cells))] += 1
    probs = np.array(list(cells.values()) + [max(0.0, 1 - sum(cells.values()))])
    assert probs[-1] * len(outputs) >= 5, "the pooled cell is too small for the chi-square approximation"
    _, p_value = stats.chisquare(counts, probs / probs.sum() * len(outputs))
    return Check(name, len(outputs), len(cells), float(p_value), alpha)


def assert_all_pass(checks: list[Check], family_alpha: float) -> None:
    """Every statistic above its (Bonferroni) level and every detectable bias within TV_BOUND."""
    report = "\n".join(str(c) for c in checks)
    print(f"family alpha {family_alpha:g}\n{report}")
    for check in checks:
        assert check.tv <= TV_BOUND, f"{check.name} detects only TV >= {check.tv:.4f} (> {TV_BOUND}): more samples"
    failed = [c for c in checks if c.p_value < c.alpha]
    assert not failed, "output does not follow the target's distribution:\n" + "\n".join(str(c) for c in failed)
