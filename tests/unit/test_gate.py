"""draftsmith.gate: the exact paired Wilcoxon test, the bootstrap interval, and the rule (refuse ties and slower
drafters that accept more, detect a real gain at the sample size the gate runs on)."""

import math
import random

import pytest

from draftsmith.gate import TEST_NAME, bootstrap_interval, decide, wilcoxon_greater


def _brute_force(diffs):
    """The one-sided p-value by listing all 2^n sign flips of the midranks."""
    import itertools

    n = len(diffs)
    order = sorted(abs(d) for d in diffs)
    rank = {m: (order.index(m) + 1 + n - order[::-1].index(m)) / 2 for m in order}
    ranks = [rank[abs(d)] for d in diffs]
    observed = sum(r for r, d in zip(ranks, diffs) if d > 0)
    hits = sum(sum(r for r, s in zip(ranks, signs) if s) >= observed - 1e-9
               for signs in itertools.product((0, 1), repeat=n))
    return hits / 2 ** n


@pytest.mark.parametrize("seed", range(6))
def test_wilcoxon_is_exact(seed):
    rng = random.Random(seed)
    diffs = [d for d in (round(rng.gauss(0.05, 0.1), 2) for _ in range(6 + seed)) if d != 0]  # ties included
    assert wilcoxon_greater(diffs) == pytest.approx(_brute_force(diffs), rel=1e-12)
    distinct = [rng.gauss(0.05, 0.1) for _ in range(8 + 2 * seed)]
    stats = pytest.importorskip("scipy.stats")
    assert wilcoxon_greater(distinct) == pytest.approx(
        stats.wilcoxon(distinct, alternative="greater", method="exact").pvalue, rel=1e-9)


def test_wilcoxon_edges():
    assert wilcoxon_greater([]) == 1.0 and wilcoxon_greater([0.0, 0.0]) == 1.0
    assert wilcoxon_greater([0.1] * 8) == pytest.approx(1 / 256)  # every prompt in favour
    assert wilcoxon_greater([-0.1] * 8) == 1.0


def test_bootstrap_interval_is_seeded_and_covers_the_mean():
    values = [0.1, 0.2, 0.05, 0.15, 0.12, 0.08]
    low, high = bootstrap_interval(values, confidence=0.95)
    assert low < sum(values) / len(values) < high
    assert (low, high) == bootstrap_interval(values, confidence=0.95)


def test_a_tie_is_refused():
    same = [40.0] * 24
    d = decide(same, same)
    assert not d.promoted and d.p_value == 1.0 and d.speed_ratio == pytest.approx(1.0)
    rng = random.Random(1)
    base = [40.0 + rng.random() for _ in range(24)]
    scatter = [b * math.exp(s * 0.05) for b, s in zip(base, [1, -1] * 12)]  # symmetric around a ratio of 1
    d = decide(scatter, base)
    assert not d.promoted and d.p_value > 0.3


def test_a_slower_drafter_that_accepts_more_is_refused_with_the_reason():
    champion = [50.0, 48.0, 52.0, 47.0, 51.0, 49.0, 50.5, 48.5] * 3
    challenger = [x * 0.9 for x in champion]
    d = decide(challenger, champion, challenger_token_acceptance=0.8, champion_token_acceptance=0.5,
               challenger_pooled_tok_s=45.0, champion_pooled_tok_s=50.0, champion_version="3")
    assert not d.promoted
    assert "accepts more tokens but serves slower" in d.reason and "0.800 vs 0.500" in d.reason
    tags = d.tags()
    assert tags["gate_test"] == TEST_NAME and tags["gate_prompts"] == "24" and tags["gate_champion_version"] == "3"
    assert {"gate_p_value", "gate_speed_ratio", "gate_speed_ratio_interval", "gate_challenger_tok_s",
            "gate_champion_tok_s", "gate_challenger_token_acceptance", "gate_champion_token_acceptance",
            "gate_confidence"} <= set(tags)


def test_a_real_gain_is_detected_at_the_gates_sample_size():
    """A 10% gain whose per-prompt ratios scatter by as much (log sd 0.1), 24 prompts: detected in >= 90% of
    draws; with no gain, promoted in about 5% (the stated confidence)."""
    rng = random.Random(0)

    def rate(gain, trials=300):
        hits = 0
        for _ in range(trials):
            champion = [rng.uniform(20, 60) for _ in range(24)]
            challenger = [c * math.exp(math.log(1 + gain) + rng.gauss(0, 0.1)) for c in champion]
            hits += decide(challenger, champion, bootstrap_resamples=20).promoted
        return hits / trials

    assert rate(0.10) >= 0.9
    assert rate(0.0) <= 0.09


def test_confidence_is_checked_and_pairs_must_line_up():
    with pytest.raises(ValueError, match="confidence"):
        decide([1.0], [1.0], confidence=0.3)
    with pytest.raises(ValueError, match="one speed per prompt"):
        decide([1.0, 2.0], [1.0])
    assert not decide([], []).promoted
