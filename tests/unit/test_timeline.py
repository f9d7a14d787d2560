"""draftsmith.timeline pools served figures with docs/design.md's definitions, in windows that never overlap."""

import pytest
from draftsmith.timeline import format_table, phase_summary, plot_timeline, windows


def _row(phase, started, finished, version="1", tokens=10, drafted=8, accepted=4, compared=6, steps=4,
         emitted=8, error=None):
    return {"phase": phase, "started": started, "finished": finished, "drafter_version": version,
            "completion_tokens": tokens, "drafted": drafted, "accepted": accepted, "compared": compared,
            "steps": steps, "emitted_in_steps": emitted, "error": error}


def test_windows_split_by_size_phase_and_version_and_pool_counters():
    rows = [_row("serve", 0.0, 1.0), _row("serve", 0.5, 2.0), _row("serve", 1.0, 3.0, accepted=0, compared=2),
            _row("serve", 2.0, 4.0, version="2"), _row("after", 10.0, 12.0, version="2")]
    groups = windows(rows, 2)
    assert [(g.phase, g.drafter_version, g.requests) for g in groups] == [
        ("serve", "1", 2), ("serve", "1", 1), ("serve", "2", 1), ("after", "2", 1)]
    first = groups[0]
    assert first.token_acceptance == pytest.approx(8 / 12)
    assert first.acceptance_rate == pytest.approx(8 / 16)
    assert first.mean_accepted_length == pytest.approx(16 / 8)
    # The first window starts at the phase's first send; later ones at the previous window's last completion.
    assert first.seconds == pytest.approx(2.0) and first.tok_s == pytest.approx(10.0)
    assert groups[1].seconds == pytest.approx(1.0)
    assert groups[2].seconds == pytest.approx(1.0)
    assert groups[3].seconds == pytest.approx(2.0)
    assert [g.requests_served for g in groups] == [2, 3, 4, 5]


def test_failed_requests_count_but_add_no_tokens():
    rows = [_row("before", 0.0, 1.0), _row("before", 0.0, 1.5, error="HTTP 500: boom")]
    summary = phase_summary(rows, "before")
    assert (summary.requests, summary.failed, summary.tokens, summary.requests_served) == (2, 1, 10, 1)
    assert summary.seconds == pytest.approx(1.5)
    assert "before" in format_table([summary])


def test_window_size_must_be_positive():
    with pytest.raises(ValueError, match="window size"):
        windows([], 0)


def test_plot_marks_the_version_change(tmp_path):
    rows = [_row("serve", 0, 1), _row("serve", 1, 2), _row("after", 3, 4, version="2"),
            _row("after", 4, 5, version="2")]
    path = plot_timeline(windows(rows, 1), tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_the_drafters_own_acceptance_leaves_prompt_lookup_out():
    """Pooled over requests, the drafter's token acceptance counts only the positions the drafter proposed: a
    phase whose lookup proposals are all accepted and whose drafter proposals are all rejected reads 0.0, while
    the mixed token acceptance reads 0.5."""
    rows = [dict(phase="after", started=0.0, finished=1.0, completion_tokens=8, drafter_version="2", drafted=8,
                 accepted=4, compared=8, lookup_accepted=4, lookup_compared=4, steps=4, emitted_in_steps=8)]
    group = phase_summary(rows, "after")
    assert group.token_acceptance == 0.5 and group.drafter_token_acceptance == 0.0
    assert group.as_dict()["drafter_token_acceptance"] == 0.0
    assert "drafter acc" in format_table([group])


def test_request_stats_count_lookup_positions_apart():
    """record_step counts the compared positions of lookup's drafts apart from the drafter's."""
    from draftsmith.request_stats import RequestStats

    stats = RequestStats()
    stats.record_step(3, 3, "lookup")  # 3 positions compared, all accepted
    stats.record_step(4, 1, "drafter")  # positions 1-2 compared, 1 accepted
    assert (stats.compared, stats.lookup_compared) == (5, 3)
    assert stats.token_acceptance == 4 / 5 and stats.drafter_token_acceptance == 1 / 2


def test_a_phase_measured_in_rounds_counts_only_its_own_wall_time():
    """What it detects: a phase timed in rounds that take turns with another arm (the demo's on/off pairs)
    being charged the other arm's time between its rounds (its tok/s then halves), in the phase summary or in
    its windows."""
    rows = [_row("before", 0.0, 2.0), _row("before", 0.0, 4.0),        # round 1: on, 4 s
            _row("before_off", 4.0, 6.0), _row("before_off", 4.0, 8.0),  # round 1: off, 4 s
            _row("before_off", 8.0, 11.0),                              # round 2: off, 3 s
            _row("before", 11.0, 13.0)]                                 # round 2: on, 2 s
    on, off = phase_summary(rows, "before"), phase_summary(rows, "before_off")
    assert on.seconds == pytest.approx(6.0) and on.tok_s == pytest.approx(30 / 6)
    assert off.seconds == pytest.approx(7.0) and off.requests == 3
    groups = windows(rows, 12)
    assert [(g.phase, g.requests) for g in groups] == [("before", 2), ("before_off", 3), ("before", 1)]
    assert [g.seconds for g in groups] == pytest.approx([4.0, 7.0, 2.0])
