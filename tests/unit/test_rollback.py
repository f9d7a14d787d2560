"""The automatic rollback rule and served token acceptance, like with like (draftsmith.rollback), on hand-made
counters and on a real traffic table: no registry, no files, no Ray."""

import datetime as dt

import pyarrow as pa
import pytest

from draftsmith.rollback import (
    Comparison,
    ServedCounts,
    decide_rollback,
    evaluated_figures,
    expected_token_acceptance,
    of_version,
    served_counts,
    setting_label,
)
from draftsmith.traffic import TRAFFIC_SCHEMA, TrafficRecord

UTC = dt.timezone.utc


def counts(speculated, accepted, compared, policy_off=0):
    """`speculated` requests that compared `compared` draft tokens in all, plus `policy_off` that drafted nothing."""
    return ServedCounts(requests=speculated + policy_off, speculated=speculated, drafted=compared,
                        accepted=accepted, compared=compared)


def compare(new, reference=0.6):
    return expected_token_acceptance({"greedy": new}, reference_evaluated={"greedy": reference})


def decide(new, reference=0.6, margin=0.1, min_requests=50):
    return decide_rollback("2", "1", compare(new, reference), margin=margin, min_requests=min_requests)


def test_rolls_back_when_below_by_more_than_the_margin_after_enough_requests():
    """Detects: a bad promotion (0.30 against 0.60) kept, or rolled back with the wrong figures in the reason."""
    d = decide(counts(60, 300, 1000))
    assert d.rollback and d.verdict == "rollback"
    assert d.token_acceptance == pytest.approx(0.3) and d.reference == pytest.approx(0.6) and d.requests == 60
    assert "0.300" in d.reason and "0.600" in d.reason and "v1" in d.reason and "margin 0.1" in d.reason


def test_waits_before_min_requests():
    """Detects: a verdict (either way) on too few requests."""
    d = decide(counts(49, 100, 1000))
    assert d.verdict == "wait" and not d.rollback and "49 speculating requests" in d.reason
    assert decide(counts(50, 100, 1000)).rollback


def test_keeps_within_the_margin():
    """Detects: a rollback of a version that is worse by less than the margin (or exactly the margin)."""
    assert decide(counts(80, 550, 1000)).verdict == "keep"  # 0.55 vs 0.60, margin 0.1
    assert decide(counts(80, 500, 1000)).verdict == "keep"  # exactly the margin: not MORE than it
    assert decide(counts(80, 499, 1000)).verdict == "rollback"
    assert decide(counts(80, 700, 1000)).verdict == "keep"  # better: kept


def test_policy_off_requests_are_not_rejections_and_not_requests_of_the_verdict():
    """Detects: requests the policy let draft nothing read as zero acceptance (a good drafter rolled back because
    speculation was switched off under load), or counted towards min_requests."""
    good = counts(60, 580, 1000, policy_off=500)
    assert good.token_acceptance == pytest.approx(0.58)
    assert decide(good).verdict == "keep"
    waiting = decide(counts(10, 100, 200, policy_off=500))
    assert waiting.verdict == "wait" and waiting.requests == 10
    assert ServedCounts(requests=5).token_acceptance is None  # nothing compared: no reading, not 0


def test_reference_prefers_the_previous_champions_served_figure_and_weights_by_the_served_mix():
    """Detects: a greedy figure compared with a sampled one, or the previous champion's served figure ignored."""
    new = {"greedy": counts(60, 300, 600), "sampled": counts(60, 100, 400)}
    before = {"greedy": counts(100, 560, 800), "sampled": counts(10, 40, 100)}  # sampled: too few requests
    cmp = expected_token_acceptance(new, reference_served=before, reference_evaluated={"greedy": 0.9, "sampled": 0.5},
                                    min_reference_requests=50)
    # greedy from served (0.70), sampled from evaluated (0.50), weighted by the new version's compared tokens
    assert cmp.reference == pytest.approx((600 * 0.70 + 400 * 0.50) / 1000)
    assert cmp.token_acceptance == pytest.approx(0.4)
    assert cmp.sources["greedy"].startswith("served") and cmp.sources["sampled"].startswith("evaluated")


def test_settings_without_a_reference_are_left_out_on_both_sides():
    """Detects: served tokens at a setting the previous champion has no figure for dragging the comparison."""
    new = {"greedy": counts(60, 600, 1000), "t0.7": counts(60, 0, 1000)}
    cmp = expected_token_acceptance(new, reference_evaluated={"greedy": 0.6})
    assert cmp.token_acceptance == pytest.approx(0.6) and cmp.served.speculated == 60
    assert decide_rollback("2", "1", cmp, margin=0.1, min_requests=50).verdict == "keep"
    none = decide_rollback("2", "1", Comparison(ServedCounts(), None, {}), margin=0.1, min_requests=1)
    assert none.verdict == "wait"


def test_evaluated_figures_read_the_per_setting_run_metrics():
    """Detects: the acceptance RATE (accepted / drafted) or the unsuffixed headline taken for a setting's
    token acceptance."""
    metrics = {"heldout_token_acceptance": 0.61, "heldout_token_acceptance_greedy": 0.61,
               "heldout_token_acceptance_sampled": 0.52, "heldout_acceptance_rate_greedy": 0.3}
    assert evaluated_figures(metrics) == {"greedy": 0.61, "sampled": 0.52}


def test_setting_labels_are_evaluations_labels():
    """Detects: a served setting looked up under a metric name evaluation never logs."""
    from draftsmith.evaluation import temperature_label

    for t in (0.0, 1.0, 0.7):
        assert setting_label(t) == temperature_label(t)
    assert setting_label(0.0, top_p=0.9, top_k=5) == "greedy"  # greedy ignores top-p / top-k
    assert setting_label(1.0, top_p=0.9) is None and setting_label(1.0, top_k=20) is None


def _record(i, version, temperature=0.0, drafted=10, accepted=5, compared=8, source="served", top_p=1.0):
    return TrafficRecord(request_id=f"r{i}", created_at=dt.datetime(2026, 3, 1, 12, tzinfo=UTC), source=source,
                         target_id="t", target_revision="r", tokenizer_hash="h", drafter_version=version,
                         temperature=temperature, top_p=top_p, max_tokens=4, prompt_token_ids=[1],
                         output_token_ids=[2], target_topk_ids=[[2]], target_topk_logprobs=[[-0.1]],
                         accept_mask=[True], drafted=drafted, accepted=accepted, compared=compared,
                         finish_reason="length", verify_steps=3, policy_off_steps=3 if not drafted else 0,
                         proposer="drafter" if drafted else "none")


def test_served_counts_from_a_traffic_table():
    """Detects: backfilled rows, unevaluated sampling settings or another version's rows counted, or a
    policy-off row counted as a speculating request."""
    rows = [_record(0, "2"), _record(1, "2"), _record(2, "2", drafted=0, accepted=0, compared=0),
            _record(3, "2", temperature=1.0, accepted=1, compared=4), _record(4, "2", temperature=1.0, top_p=0.9),
            _record(5, "2", source="backfill"), _record(6, "1", accepted=8)]
    table = pa.Table.from_pylist([r.to_row() for r in rows], schema=TRAFFIC_SCHEMA)
    by = served_counts(table)
    assert of_version(by, "2", ("greedy",)) == {"greedy": ServedCounts(3, 2, 20, 10, 16)}
    assert of_version(by, "2")["sampled"] == ServedCounts(1, 1, 10, 1, 4)
    assert of_version(by, "1")["greedy"].token_acceptance == pytest.approx(1.0)
    assert served_counts(table.slice(0, 0)) == {}
