"""The speculation policy as a pure function: a cost profile and acceptance estimates in, the step's plan out."""

import math

import pytest

from draftsmith.policy import (
    DRAFTER,
    LOOKUP,
    NONE,
    AcceptanceEstimates,
    CostCurve,
    CostModel,
    RowState,
    SpeculationPolicy,
    expected_tokens,
)

KEY = "drafter:v1"


def _flat_costs(draft_s: float = 0.004) -> CostModel:
    """A memory-bound target: verifying a few more tokens costs almost nothing (a GPU, or prepacked CPU at batch 1)."""
    return CostModel(CostCurve({1: 0.030, 8: 0.031, 64: 0.040}), CostCurve({1: draft_s, 8: draft_s * 1.2}))


def _linear_costs() -> CostModel:
    """A compute-bound target: seconds grow with every token verified (a large batch on a CPU)."""
    return CostModel(CostCurve({1: 0.030, 8: 0.240, 64: 1.920}), CostCurve({1: 0.004, 8: 0.030}))


def _trained(alpha_by_position: list[float], steps: int = 400, key: str = KEY) -> AcceptanceEstimates:
    """Estimates after `steps` verifications of rows drafting len(alpha_by_position) tokens with these exact
    conditional acceptances (expected counts, so the test is deterministic)."""
    est = AcceptanceEstimates(decay=1.0)
    tried, accepted = est._counts(key)
    reach = 1.0
    for k, alpha in enumerate(alpha_by_position):
        tried[k] = steps * reach
        accepted[k] = steps * reach * alpha
        reach *= alpha
    est.steps_since_tried[key] = 0
    return est


def test_expected_tokens_is_the_geometric_sum():
    for alpha in (0.0, 0.3, 0.8):
        for gamma in range(6):
            assert expected_tokens([alpha] * 8, gamma) == pytest.approx((1 - alpha ** (gamma + 1)) / (1 - alpha))


def test_speculation_off_when_the_drafter_is_never_accepted():
    policy = SpeculationPolicy(_flat_costs(), _trained([0.0] * 6), drafter_key=KEY)
    plan = policy.choose([RowState(cap=32)])
    assert plan.gammas == (0,) and plan.proposers == (NONE,)
    assert plan.predicted_speedup == pytest.approx(1.0)


def test_longer_drafts_when_acceptance_is_high_and_verification_cheap():
    high = SpeculationPolicy(_flat_costs(), _trained([0.9] * 8), drafter_key=KEY).choose([RowState(cap=32)])
    low = SpeculationPolicy(_flat_costs(), _trained([0.5] * 8), drafter_key=KEY).choose([RowState(cap=32)])
    assert high.gammas[0] >= 5
    assert 1 <= low.gammas[0] < high.gammas[0]
    assert high.predicted_speedup > low.predicted_speedup > 1.0


def test_a_compute_bound_batch_turns_speculation_off():
    """The same good drafter: worth drafting for one row on a flat cost curve, not for 8 rows on a linear one."""
    est = _trained([0.6] * 8)
    assert SpeculationPolicy(_flat_costs(), est, drafter_key=KEY).choose([RowState(cap=32)]).speculating
    plan = SpeculationPolicy(_linear_costs(), est, drafter_key=KEY).choose([RowState(cap=32)] * 8)
    assert not plan.speculating


def test_rows_keep_within_their_cap_and_lookup_within_its_match():
    est = _trained([0.9] * 8)
    tried, accepted = est._counts(LOOKUP)
    tried[:4] = [400.0] * 4
    accepted[:4] = [380.0] * 4
    policy = SpeculationPolicy(_flat_costs(), est, drafter_key=KEY, lookup_enabled=True)
    plan = policy.choose([RowState(cap=3), RowState(cap=32, lookup_tokens=3), RowState(cap=0)])
    assert plan.gammas[0] == 3 and plan.proposers[0] == DRAFTER
    assert plan.gammas[1] == 3 and plan.proposers[1] == LOOKUP
    assert plan.gammas[2] == 0 and plan.proposers[2] == NONE


def test_lookup_alone_when_the_drafter_does_not_pay_but_matches_do():
    est = _trained([0.05] * 8)
    tried, accepted = est._counts(LOOKUP)
    tried[:4] = [400.0] * 4
    accepted[:4] = [360.0] * 4
    policy = SpeculationPolicy(_flat_costs(draft_s=0.010), est, drafter_key=KEY, lookup_enabled=True)
    plan = policy.choose([RowState(cap=32, lookup_tokens=4), RowState(cap=32)])
    assert plan.proposers == (LOOKUP, NONE)
    assert plan.gammas[0] >= 2


def test_a_requests_explicit_length_is_honoured():
    policy = SpeculationPolicy(_flat_costs(), _trained([0.0] * 8), drafter_key=KEY)
    plan = policy.choose([RowState(cap=32, fixed_gamma=3), RowState(cap=32)])
    assert plan.gammas[0] == 3 and plan.proposers[0] == DRAFTER
    # The batch verifies 4 tokens per row anyway: the other row may draft too, never longer than that.
    assert plan.gammas[1] <= 3
    assert policy.choose([RowState(cap=2, fixed_gamma=3)]).gammas == (2,)  # within its cap
    assert SpeculationPolicy(_flat_costs(), _trained([0.9] * 8), drafter_key=KEY).choose(
        [RowState(cap=32, fixed_gamma=0)]).gammas == (0,)


def test_an_unused_drafter_is_probed_with_one_token_after_the_interval():
    est = _trained([0.0] * 8)
    policy = SpeculationPolicy(_flat_costs(), est, drafter_key=KEY, probe_interval=5)
    plans = []
    for _ in range(6):
        plans.append(policy.choose([RowState(cap=32), RowState(cap=32)]))
        est.tick()
    assert [p.probe for p in plans] == [False] * 5 + [True]
    assert plans[-1].gammas == (1, 1) and plans[-1].proposers == (DRAFTER, DRAFTER)


def test_estimates_follow_a_shift_and_stay_conditional():
    est = AcceptanceEstimates(decay=0.98, prior_weight=2.0)
    for _ in range(300):
        est.update(KEY, [(4, 4)])  # every position accepted
    assert est.alphas(KEY)[3] > 0.95
    for _ in range(300):
        est.update(KEY, [(4, 1)])  # first accepted, second rejected, 3rd and 4th never reached
    alphas = est.alphas(KEY)
    assert alphas[0] > 0.95 and alphas[1] < 0.05
    # Not reached lately: the decayed old evidence and the prior, not the rejections at position 2.
    assert alphas[2] > 0.5


def test_cost_curve_interpolates_and_follows_observations():
    curve = CostCurve({1: 0.01, 10: 0.02})
    assert curve(1) == pytest.approx(0.01)
    assert curve(5.5) == pytest.approx(0.015)
    assert curve(19) == pytest.approx(0.03)  # linear beyond the last point
    for _ in range(200):
        curve.observe(10, 0.04)
    assert curve(10) == pytest.approx(0.04, rel=0.01)
    with pytest.raises(ValueError):
        CostCurve({0: 0.01})
    with pytest.raises(ValueError):
        CostCurve({1: math.nan})


def test_a_probe_keeps_explicit_lengths_as_the_best_plan_had_them():
    """A lookup probe must not take the drafter (or anything) away from a row that asked for 3 tokens."""
    est = _trained([0.9] * 8)
    tried, accepted = est._counts(LOOKUP)
    tried[:4] = [400.0] * 4  # lookup never accepted: the best plan leaves it out
    est.steps_since_tried[LOOKUP] = 5
    policy = SpeculationPolicy(_flat_costs(), est, drafter_key=KEY, lookup_enabled=True, probe_interval=5)
    plan = policy.choose([RowState(cap=32, fixed_gamma=3), RowState(cap=32, lookup_tokens=2)])
    assert plan.probe
    assert plan.gammas == (3, 1) and plan.proposers == (DRAFTER, LOOKUP)


def test_the_drafter_is_priced_for_as_many_forwards_as_the_longest_row():
    """The drafter drafts for every row as long as the longest, a lookup row's included."""
    costs = _flat_costs()
    policy = SpeculationPolicy(costs, _trained([0.9] * 8), drafter_key=KEY, lookup_enabled=True)
    plan = policy._priced([(4, LOOKUP, 2.0), (1, DRAFTER, 1.5)], ar=1.0, context=300)
    assert plan.predicted_tokens_per_s == pytest.approx(3.5 / costs.step_seconds(2, 5, 1, 4, 2, 300))


def test_the_autoregressive_baseline_pays_lookup_too():
    """With lookup enabled every step looks up, drafting or not: a costly lookup is no reason not to use it."""
    est = AcceptanceEstimates(decay=1.0)
    tried, accepted = est._counts(LOOKUP)
    tried[:4], accepted[:4] = [400.0] * 4, [120.0] * 4
    costs = CostModel(CostCurve({1: 0.030, 8: 0.031, 64: 0.040}), lookup_seconds_per_row=0.030)
    policy = SpeculationPolicy(costs, est, lookup_enabled=True)
    assert policy.autoregressive_tokens_per_s(1) == pytest.approx(1 / 0.060)
    plan = policy.choose([RowState(cap=32, lookup_tokens=1)])
    assert plan.proposers == (LOOKUP,) and plan.predicted_speedup > 1.0


def _attention_costs(per_context_token: float) -> CostModel:
    """A CPU-like target: the matrix products cost little more for a few more tokens, but every verified position
    reads its row's whole context (attention)."""
    return CostModel(CostCurve({1: 0.060, 4: 0.070, 8: 0.085, 16: 0.110, 64: 0.300}), CostCurve({1: 0.002, 8: 0.003}),
                     target_seconds_per_context_token=per_context_token)


def test_a_long_context_prices_a_batchs_verification_higher():
    """What it detects: a policy blind to context. At batch 4 with a lookup acceptance that pays at short contexts,
    the same rows at 400 tokens of context each must switch speculation off (every extra verified position reads
    1600 context tokens), while one row at that context still speculates (its verification reads only its own)."""
    est = AcceptanceEstimates(decay=1.0)
    tried, accepted = est._counts(LOOKUP)
    tried[:4], accepted[:4] = [400.0] * 4, [120.0] * 4  # alpha 0.3 at every position
    policy = SpeculationPolicy(_attention_costs(10e-6), est, lookup_enabled=True)
    short = policy.choose([RowState(cap=8, lookup_tokens=3, context=20)] * 4)
    long = policy.choose([RowState(cap=8, lookup_tokens=3, context=400)] * 4)
    single = policy.choose([RowState(cap=8, lookup_tokens=3, context=400)])
    assert short.speculating and not long.speculating and single.speculating
    # the price is the model's: curve over tokens plus attention over (verified positions x context tokens)
    costs = policy.costs
    assert costs.step_seconds(4, 2, 0, 0, 0, 1600) == pytest.approx(costs.target(8) + 10e-6 * 2 * 1600)
    assert long.autoregressive_tokens_per_s == pytest.approx(4 / (costs.target(4) + 10e-6 * 1600))
