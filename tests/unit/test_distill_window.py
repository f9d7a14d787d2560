"""The recency window of distillation (draftsmith.distill_data.select_window / RecencyWindow) and the tags the
job puts on a registered version (jobs.distill.window_tags): the window is the most recent records, replay comes
only from older training records in the stated share and is the same for a seed, no limit is all traffic, the
held-out part never enters and does not depend on the window, and a domain seen only in old traffic survives
through replay."""

import datetime as dt
import math
import random

import pytest
from pydantic import ValidationError

from draftsmith.distill_data import RecencyWindow, build_distill_dataset, heldout_start, select_window
from draftsmith.traffic import TrafficRecord, TrafficWriter
from jobs.distill import WINDOW_TAGS, DistillJobConfig, window_params, window_tags

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
TARGET = dict(target_id="tiny", target_revision="rev", tokenizer_hash="tok")


def _minutes(n):
    return [T0 + dt.timedelta(minutes=i) for i in range(n)]


def _record(i, minute, first_token):
    """A record whose prompt starts with `first_token` (its 'domain') and is unique by `i`."""
    return TrafficRecord(
        request_id=f"r{i:04d}", created_at=T0 + dt.timedelta(minutes=minute), **TARGET, temperature=0.0,
        max_tokens=2, prompt_token_ids=[first_token, 10_000 + i], output_token_ids=[7, 8],
        target_topk_ids=[[7], [8]], target_topk_logprobs=[[-0.1], [-0.1]], accept_mask=[False, False],
        finish_reason="length")


def _log(tmp_path, records):
    uri = str(tmp_path / "traffic")
    with TrafficWriter(uri) as writer:
        for r in records:
            writer.add(r)
    return uri


# ------------------------------------------------------------------------------------- the pure rule


def test_window_is_the_most_recent_records_and_replay_only_older():
    """Detects a window that is not the newest N (e.g. the first N, or input order instead of time order), replay
    drawn from inside the window, a wrong replay count, or duplicates."""
    times = _minutes(100)
    shuffled = list(range(100))
    random.Random(3).shuffle(shuffled)
    created = [times[i] for i in shuffled]  # any input order: the rule sorts by time
    sel = select_window(created, RecencyWindow(window_records=20, replay_fraction=0.25))
    picked = [created[i] for i in sel.indices]
    assert picked == sorted(picked) and len(set(sel.indices)) == len(sel.indices)
    assert sel.window_records == 20 and sel.replay_records == 5 and sel.pool_records == 100
    assert picked[-20:] == times[80:]  # the newest 20, all of them
    assert all(t < times[80] for t in picked[:-20])  # replay strictly older than the window
    assert (sel.window_start, sel.window_end) == (times[80], times[99])
    assert sel.replay_start == picked[0] and sel.replay_end == picked[4] and sel.replay_end < sel.window_start


def test_replay_is_deterministic_for_a_seed_and_varies_with_it():
    """Detects an unseeded (non-reproducible) draw, or a seed that is ignored."""
    times = _minutes(200)
    a = select_window(times, RecencyWindow(window_records=40, replay_fraction=0.5, replay_seed=7))
    b = select_window(times, RecencyWindow(window_records=40, replay_fraction=0.5, replay_seed=7))
    c = select_window(times, RecencyWindow(window_records=40, replay_fraction=0.5, replay_seed=8))
    assert a.indices == b.indices and a.replay_records == 20
    assert a.indices[:20] != c.indices[:20] and a.indices[20:] == c.indices[20:]  # only the replay differs


def test_replay_share_rounds_up_and_is_capped_by_the_older_records():
    """Detects a share computed on the pool instead of the window, float error in the count (0.1 x 30), a
    replay larger than the older records, or replay with a fraction of 0."""
    times = _minutes(100)
    assert select_window(times, RecencyWindow(window_records=30, replay_fraction=0.1)).replay_records == 3
    assert select_window(times, RecencyWindow(window_records=10, replay_fraction=0.25)).replay_records == 3
    assert select_window(times, RecencyWindow(window_records=10, replay_fraction=0.0)).replay_records == 0
    capped = select_window(times[:12], RecencyWindow(window_records=10, replay_fraction=1.0))
    assert (capped.window_records, capped.replay_records, sorted(capped.indices)) == (10, 2, list(range(12)))


def test_no_limit_is_all_traffic():
    """Detects a default that silently drops records when the window is off (None limits or no window)."""
    times = _minutes(50)[::-1]  # newest first: the selection still comes back in time order
    for window in (None, RecencyWindow(window_records=None, window_hours=None, replay_fraction=0.5)):
        sel = select_window(times, window)
        assert sel.indices == list(range(49, -1, -1)) and sel.replay_records == 0 and sel.window_records == 50
        assert (sel.window_start, sel.window_end, sel.replay_start) == (times[-1], times[0], None)
    assert not RecencyWindow(window_records=None).limited and RecencyWindow().limited
    empty = select_window([], RecencyWindow())
    assert empty.indices == [] and empty.window_start is None and empty.replay_records == 0


def test_window_hours_and_both_limits():
    """Detects an age limit measured from the wall clock or the oldest record instead of the newest record, or
    two limits combined with 'or' instead of 'and'."""
    times = [T0 + dt.timedelta(minutes=30 * i) for i in range(21)]  # 10 hours, every 30 minutes
    by_age = select_window(times, RecencyWindow(window_records=None, window_hours=2, replay_fraction=0))
    assert by_age.window_records == 5 and by_age.window_start == times[16]  # newest - 2 h, inclusive
    both = select_window(times, RecencyWindow(window_records=3, window_hours=2, replay_fraction=0))
    assert both.window_records == 3 and both.window_start == times[18]
    both = select_window(times, RecencyWindow(window_records=100, window_hours=2, replay_fraction=1))
    assert both.window_records == 5 and both.replay_records == 5 and both.replay_end < times[16]


def test_heldout_fraction_is_of_the_window_span_on_a_long_log():
    """Detects a held-out part sized on the whole log, which on a long log sits between the window and the
    newest traffic (the window would then never see the latest shift)."""
    times = _minutes(10_000)
    assert heldout_start(times, 0.1) == times[9_000]  # no window: a tenth of all history
    window = RecencyWindow(window_records=2000)
    cut = heldout_start(times, 0.1, window)
    assert cut == times[10_000 - math.ceil(math.ceil(2000 / 0.9) * 0.1)]  # 223 held out
    train = [t for t in times if t < cut]
    sel = select_window(train, window)
    assert sel.window_records == 2000 and sel.window_end == times[10_000 - 223 - 1]
    assert heldout_start(times[:500], 0.1, window) == heldout_start(times[:500], 0.1)  # short log: unchanged


# ------------------------------------------------------------------------------- through the dataset


def test_heldout_records_never_enter_and_do_not_depend_on_the_window(tmp_path):
    """Detects a window applied before the split (held-out records trained on, or the held-out part changed by
    the window), and stats that disagree with the training dataset."""
    uri = _log(tmp_path, [_record(i, i, 1) for i in range(60)])
    window = RecencyWindow(window_records=10, replay_fraction=0.5, replay_seed=1)
    data = build_distill_dataset(uri, **TARGET, heldout_fraction=0.1, window=window)
    s = data.stats
    since = dt.datetime.fromisoformat(s["heldout_since"])
    assert since == T0 + dt.timedelta(minutes=58)  # ceil(10 / 0.9) = 12 records in scope, ceil(1.2) = 2 held out
    assert len(data.heldout) == 2 and len(data.train) == 15 == s["train_records"]
    assert max(data.train["created_at"]) < since <= min(data.heldout["created_at"])
    assert (s["window_records"], s["replay_records"], s["window_pool_records"]) == (10, 5, 58)
    assert s["window_start"] == (T0 + dt.timedelta(minutes=48)).isoformat()
    assert s["window_end"] == (T0 + dt.timedelta(minutes=57)).isoformat()
    assert s["replay_end"] < s["window_start"] and s["train_output_tokens"] == 2 * 15
    ids = data.train["request_id"]
    assert ids[-10:] == [f"r{i:04d}" for i in range(48, 58)] and all(int(r[1:]) < 48 for r in ids[:5])
    # evaluation rebuilds the held-out part from the tag alone, without the window: the same records
    again = build_distill_dataset(uri, **TARGET, heldout_since=since)
    assert again.heldout["request_id"] == data.heldout["request_id"] and len(again.train) == 58


def test_old_domain_survives_only_with_replay(tmp_path):
    """Detects a replay that is ignored or drawn from the window: a domain logged only before the window (prompts
    starting with token 1) must still be trained on with replay, and is absent without it."""
    records = [_record(i, i, 1) for i in range(60)] + [_record(i, i, 2) for i in range(60, 120)]
    uri = _log(tmp_path, records)

    def domains(replay_fraction):
        window = RecencyWindow(window_records=40, replay_fraction=replay_fraction)
        data = build_distill_dataset(uri, **TARGET, heldout_fraction=0.0, window=window)
        firsts = [p[0] for p in data.train["prompt_token_ids"]]
        return {d: firsts.count(d) for d in (1, 2)}

    assert domains(0.0) == {1: 0, 2: 40}
    with_replay = domains(0.25)
    assert with_replay[1] > 0 and sum(with_replay.values()) == 50


def test_without_a_window_the_dataset_is_unchanged(tmp_path):
    """Detects the window leaking into callers that pass none (evaluation, benchmarks)."""
    uri = _log(tmp_path, [_record(i, i, 1) for i in range(30)])
    data = build_distill_dataset(uri, **TARGET, heldout_fraction=0.1)
    assert len(data.train) == 27 and data.stats["window_records"] == 27 and data.stats["replay_records"] == 0
    assert data.stats["window_pool_records"] == 27 and data.stats["replay_start"] is None


# ------------------------------------------------------------------------------------- the job's side


def test_job_tags_carry_the_window(tmp_path):
    """Detects a registered version that does not say which records it learnt from (missing / non-string tags,
    None written as 'None'), or params that lose the settings."""
    uri = _log(tmp_path, [_record(i, i, 1) for i in range(60)])
    window = RecencyWindow(window_records=10, replay_fraction=0.5)
    stats = build_distill_dataset(uri, **TARGET, heldout_fraction=0.1, window=window).stats
    tags = window_tags(stats)
    assert tuple(tags) == WINDOW_TAGS and all(isinstance(v, str) for v in tags.values())
    assert tags["window_records"] == "10" and tags["replay_records"] == "5"
    assert tags["window_start"] == (T0 + dt.timedelta(minutes=48)).isoformat()
    assert tags["window_end"] == (T0 + dt.timedelta(minutes=57)).isoformat()
    assert dt.datetime.fromisoformat(tags["replay_start"]) <= dt.datetime.fromisoformat(tags["replay_end"])
    no_replay = window_tags({**stats, "replay_records": 0, "replay_start": None, "replay_end": None})
    assert (no_replay["replay_records"], no_replay["replay_start"], no_replay["replay_end"]) == ("0", "", "")
    params = window_params(window, stats)
    assert params["window.window_records"] == 10 and params["window.window_hours"] == ""
    assert params["window.replay_fraction"] == 0.5 and params["window_records"] == "10"
    assert params["window_pool_records"] == 58


def test_job_config_window_defaults_and_overrides():
    """Detects a config without the continuous-loop default, an override that cannot turn the window off, or
    unchecked values."""
    cfg = DistillJobConfig()
    assert cfg.window == RecencyWindow(window_records=2000, window_hours=None, replay_fraction=0.25, replay_seed=0)
    off = DistillJobConfig.from_yaml(None, {"window.window_records": None})
    assert not off.window.limited
    hours = DistillJobConfig.from_yaml(None, {"window.window_hours": 6, "window.replay_fraction": 0.1})
    assert hours.window.window_hours == 6 and hours.window.window_records == 2000
    for bad in ({"window.replay_fraction": 1.5}, {"window.window_records": 0}, {"window.size": 3}):
        with pytest.raises(ValidationError):
            DistillJobConfig.from_yaml(None, bad)
