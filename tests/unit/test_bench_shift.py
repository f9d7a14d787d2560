"""`draftsmith bench shift`'s pure parts (schedule, figures, JSON) and its trigger loop, without Ray or a model.

Each test says what it detects; the whole command runs in tests/integration/test_bench_shift_end_to_end.py."""

import datetime as dt
import json
import time
from types import SimpleNamespace

import pytest
from pipelines.bench_shift import (
    CHAT,
    CODE,
    QUICK,
    ShiftConfig,
    TriggerLoop,
    build_summary,
    busy_seconds,
    chat_retention,
    conversation_domain,
    ended_jobs,
    format_shift_table,
    job_records,
    phase_schedule,
    plot_shift,
    record_accounting,
    recovery_requests,
    throughput_split,
    version_records,
    write_offline_config,
    write_shift_job_configs,
)

UTC = dt.timezone.utc


def test_schedule_probes_every_k_requests_and_settles_before_the_switch_probe():
    """Detects chunks crossing the switch, a missing or misplaced probe, wrong served counts, and the settle step
    coming after (instead of before) the probe that measures chat at the switch."""
    plan = phase_schedule(5, 7, 3)
    kinds = [(s.kind, s.domain, s.start, s.stop) for s in plan]
    assert kinds == [
        ("probe", CHAT, 0, 0),
        ("serve", CHAT, 0, 3), ("probe", CHAT, 0, 0),
        ("serve", CHAT, 3, 5), ("settle", None, 0, 0), ("probe", CODE, 0, 0),
        ("serve", CODE, 0, 3), ("probe", CODE, 0, 0),
        ("serve", CODE, 3, 6), ("probe", CODE, 0, 0),
        ("serve", CODE, 6, 7), ("probe", CODE, 0, 0),
    ]
    probes = [s for s in plan if s.kind == "probe"]
    assert [p.probe for p in probes] == list(range(6))
    assert [p.served for p in probes] == [0, 3, 5, 8, 11, 12]
    assert [p.code_served for p in probes] == [0, 0, 0, 3, 6, 7]
    assert [p.after_switch for p in probes] == [False, False, True, True, True, True]
    assert sum(s.stop - s.start for s in plan if s.kind == "serve" and s.domain == CHAT) == 5
    assert sum(s.stop - s.start for s in plan if s.kind == "serve" and s.domain == CODE) == 7
    with pytest.raises(ValueError):
        phase_schedule(0, 5, 3)


def test_conversation_domain_uses_the_first_exchange_for_code_and_the_whole_conversation_for_chat():
    """Detects a code phase fed prompts whose first exchange is prose, and a chat phase that lets in code."""
    chat = [{"from": "human", "value": "Tell me about the history of tea."},
            {"from": "gpt", "value": "Tea was first drunk in China..."}]
    code = [{"from": "human", "value": "Write a function that adds two numbers."},
            {"from": "gpt", "value": "```python\ndef add(a, b):\n    return a + b\n```"}]
    later = chat + [{"from": "human", "value": "Now in Python"},
                    {"from": "gpt", "value": "```python\nimport numpy as np\nprint(np.pi)\n```"}]
    assert conversation_domain(chat) == CHAT
    assert conversation_domain({"conversations": code}) == CODE
    assert conversation_domain(later) is None


def test_recovery_is_the_first_point_at_the_fraction_of_offline():
    """Detects an off-by-one in the crossing, a strict instead of inclusive comparison, and a figure reported
    without an offline drafter to compare with."""
    points = [(0, 0.2), (80, 0.5), (160, 0.72), (240, 0.9), (320, 0.6)]
    assert recovery_requests(points, 0.8, 0.9) == 160  # 0.72 == 0.9 * 0.8 counts
    assert recovery_requests(points, 1.0, 0.9) == 240
    assert recovery_requests(points, 2.0, 0.9) is None
    assert recovery_requests(points, None, 0.9) is None
    assert recovery_requests([(0, None), (80, 0.9)], 0.5, 0.9) == 80


def test_chat_retention_and_record_accounting():
    """Detects an inverted retention ratio, a division by a zero level, and lost/duplicate records miscounted
    (failed logged requests may or may not leave a record, so they count against neither)."""
    assert chat_retention(0.5, 0.45) == 0.9
    assert chat_retention(0.0, 0.3) is None and chat_retention(None, 0.3) is None
    assert record_accounting(100, 0, 100)["lost_records"] == 0
    assert record_accounting(100, 0, 97) == {"logged_requests_sent": 100, "logged_requests_answered": 100,
                                             "records_logged": 97, "lost_records": 3, "extra_records": 0}
    assert record_accounting(98, 2, 99) == {"logged_requests_sent": 100, "logged_requests_answered": 98,
                                            "records_logged": 99, "lost_records": 0, "extra_records": 0}
    assert record_accounting(100, 0, 104)["extra_records"] == 4


def test_throughput_counts_concurrent_requests_once_and_splits_by_job():
    """Detects double-counted wall time of concurrent requests, idle gaps counted as serving time, and requests
    put on the wrong side of a job's interval."""
    assert busy_seconds([(0, 2), (1, 3), (5, 6)]) == 4
    rows = [  # two concurrent requests at 0-2 s, one at 10-12 s during a job, one failed
        {"started": 0.0, "finished": 2.0, "completion_tokens": 10, "error": None},
        {"started": 0.5, "finished": 2.0, "completion_tokens": 10, "error": None},
        {"started": 10.0, "finished": 12.0, "completion_tokens": 8, "error": None},
        {"started": 10.0, "finished": 11.0, "completion_tokens": 0, "error": "HTTP 500"},
    ]
    split = throughput_split(rows, [(9.0, 20.0)])
    assert split["without_job"] == 10.0 and split["during_job"] == 4.0 and split["ratio"] == 0.4
    assert split["requests_during_job"] == 1 and split["requests_without_job"] == 2
    assert throughput_split(rows, [])["during_job"] is None


def test_job_records_compare_driver_nodes_with_the_spare_node():
    """Detects a job on the head counted as on the spare node, and the offline job mislabelled."""
    infos = [{"submission_id": "draftsmith-distill-b", "status": "JobStatus.SUCCEEDED", "driver_node_id": "head",
              "start_time": 20_000, "end_time": 50_000, "metadata": {"reason": "80 new records"}},
             {"submission_id": "draftsmith-distill-a", "status": "SUCCEEDED", "driver_node_id": "spare1",
              "start_time": 10_000, "end_time": 30_000, "metadata": {}}]
    jobs = job_records(infos, ["spare1"], ["draftsmith-distill-b"], t0=5.0)
    assert [j["job_id"] for j in jobs] == ["draftsmith-distill-a", "draftsmith-distill-b"]  # by start
    assert [j["on_spare_node"] for j in jobs] == [True, False]
    assert [j["kind"] for j in jobs] == ["online", "offline"]
    assert jobs[0]["status"] == jobs[1]["status"] == "SUCCEEDED"
    assert jobs[0]["start_s"] == 5.0 and jobs[0]["seconds"] == 20.0 and jobs[1]["reason"] == "80 new records"


def test_ended_jobs_sees_a_job_replaced_in_the_same_poll():
    """Detects the failure the tiny run showed: a job that failed and was resubmitted within one poll (its id
    replaced in the state file) was never seen to end, and the switch waited for it forever."""
    running = {"job_id": "a", "job_result": None}
    assert ended_jobs(running, running, "RUNNING") == []
    assert ended_jobs(running, {"job_id": "a", "job_result": "SUCCEEDED"}, "SUCCEEDED") == [("a", "SUCCEEDED")]
    assert ended_jobs(running, {"job_id": "b", "job_result": None}, "FAILED") == [("a", "FAILED")]
    assert ended_jobs(running, {"job_id": "b", "job_result": None}, None) == [("a", "ENDED")]
    assert ended_jobs({"job_id": "a", "job_result": "FAILED"}, {"job_id": "b"}, None) == []  # already seen
    assert ended_jobs({}, {"job_id": "b"}, None) == []


def _figures(acc, drafter, tok_s, versions=("1",), requests=4, failed=0):
    return {"requests": requests, "failed": failed, "tokens": 100, "versions": list(versions),
            "token_acceptance": acc, "drafter_token_acceptance": drafter, "acceptance_rate": acc / 2,
            "mean_accepted_length": 1.5, "tok_s": tok_s, "lookup_share": 0.3, "seconds": 3.0}


def _window(probe, served, code_served, after, chat, code):
    return {"probe": probe, "at_s": probe * 10.0, "requests_served": served, "code_requests_served": code_served,
            "after_switch": after, "during_job": False, "chat": _figures(*chat), "code": _figures(*code)}


def _summary(jobs=None, arms=None):
    cfg = ShiftConfig(chat_requests=4, code_requests=8, probe_every=4)
    windows = [_window(0, 0, 0, False, (0.1, 0.0, 20), (0.2, 0.0, 20)),
               _window(1, 4, 0, True, (0.5, 0.3, 22), (0.3, 0.1, 22)),
               _window(2, 8, 4, True, (0.48, 0.28, 21), (0.55, 0.35, 23)),
               _window(3, 12, 8, True, (0.47, 0.27, 21), (0.6, 0.4, 24))]
    arms = arms or {"end:chat": _figures(0.46, 0.27, 21), "end:code": _figures(0.62, 0.42, 25),
                    "off:chat": _figures(0.0, 0.0, 30), "off:code": _figures(0.0, 0.0, 20),
                    "offline:code": _figures(0.65, 0.45, 25, versions=("5",))}
    jobs = jobs if jobs is not None else [
        {"job_id": "j1", "kind": "online", "on_spare_node": True, "start_s": 5.0, "end_s": 15.0},
        {"job_id": "j2", "kind": "online", "on_spare_node": True, "start_s": 25.0, "end_s": 35.0},
        {"job_id": "j3", "kind": "offline", "on_spare_node": True, "start_s": 50.0, "end_s": 60.0}]
    versions = [{"version": "2", "promoted_at": "t", "promoted_s": 16.0, "previous_champion": "1",
                 "gate_reason": "faster", "rolled_back_at": None, "rolled_back_s": None, "rolled_back_to": None,
                 "rollback_reason": ""},
                {"version": "3", "promoted_at": "t2", "promoted_s": 36.0, "previous_champion": "2",
                 "gate_reason": "faster", "rolled_back_at": "t3", "rolled_back_s": 40.0, "rolled_back_to": "2",
                 "rollback_reason": "worse"}]
    return build_summary(cfg=cfg, windows=windows, arms=arms, jobs=jobs, versions=versions, spare_node_ids=["s"],
                         accounting=record_accounting(12, 0, 12), failed=0, requests=60,
                         serving_tok_s={"during_job": 20.0, "without_job": 25.0}, switch={"at_s": 20.0},
                         offline_version="5", online_version="2")


def test_summary_holds_the_issue_contract():
    """Detects a missing key of the issue's JSON list, figures taken from the wrong arm or probe (recovery against
    the offline drafter, retention against the chat level at the switch, speedup over speculation off), and a
    summary that is not JSON."""
    s = _summary()
    for key in ("windows", "versions", "promotions", "rollbacks", "jobs", "spare_node_ids", "recovery_requests",
                "offline_token_acceptance", "online_token_acceptance", "chat_retention", "failed_requests",
                "lost_records", "serving_tok_s", "code_speedup_end", "chat_speedup_end", "all_jobs_on_spare_node",
                "online_drafter_token_acceptance", "offline_drafter_token_acceptance", "recovery_requests_drafter"):
        assert key in s, key
    assert s["offline_token_acceptance"] == 0.65 and s["online_token_acceptance"] == 0.62
    assert s["failed_requests"] == 0 and s["windows"][0]["probe"] == 0
    json.dumps(s)


def test_summary_recovery_retention_and_speedups():
    """Detects recovery read from the wrong series or missing the end point, retention against the wrong chat
    level, and speedups over the wrong reference, with exact figures."""
    s = _summary()
    # code points after the switch: (0, 0.3), (4, 0.55), (8, 0.6), end (8, 0.62); 0.9 x 0.65 = 0.585
    assert s["recovery_requests"] == 8
    # drafter: (0, 0.1), (4, 0.35), (8, 0.4), end 0.42; 0.9 x 0.45 = 0.405 -> the end point
    assert s["recovery_requests_drafter"] == 8
    assert s["chat_token_acceptance_at_switch"] == 0.5 and s["chat_retention"] == 0.92  # 0.46 / 0.5
    assert s["code_speedup_end"] == 1.25 and s["chat_speedup_end"] == 0.7
    assert s["online_over_offline"] == pytest.approx(0.62 / 0.65, abs=1e-4)
    assert s["online_jobs"] == 2 and s["online_jobs_after_switch"] == 1
    assert [p["version"] for p in s["promotions"]] == ["2", "3"]
    assert s["rollbacks"] == [{"version": "3", "to": "2", "at": "t3", "at_s": 40.0, "reason": "worse"}]
    assert s["all_jobs_on_spare_node"] is True and s["lost_records"] == 0


def test_summary_flags_a_job_off_the_spare_node_and_no_jobs_at_all():
    """Detects `all_jobs_on_spare_node` true when a job ran elsewhere, or vacuously true with no job."""
    off = [{"job_id": "j", "kind": "online", "on_spare_node": False, "start_s": 1.0, "end_s": 2.0}]
    assert _summary(jobs=off)["all_jobs_on_spare_node"] is False
    assert _summary(jobs=[])["all_jobs_on_spare_node"] is False


def test_summary_reports_no_figure_for_an_arm_whose_requests_all_failed():
    """Detects a speedup or acceptance computed from an arm that served nothing."""
    arms = {"end:chat": _figures(0.46, 0.27, 21), "end:code": _figures(0.0, 0.0, 0.0, requests=4, failed=4),
            "off:chat": _figures(0.0, 0.0, 30), "off:code": _figures(0.0, 0.0, 20),
            "offline:code": _figures(0.65, 0.45, 25)}
    s = _summary(arms=arms)
    assert s["online_token_acceptance"] is None and s["code_speedup_end"] is None


def test_table_and_plot(tmp_path):
    """Detects a table without one line per probe and arm, and a plot that is not a PNG."""
    s = _summary()
    table = format_shift_table(s["windows"], s["end"])
    assert len([line for line in table.splitlines() if line.startswith("probe ")]) == 4
    assert all(name in table for name in s["end"])
    png = plot_shift(s, tmp_path / "p.png", x_of_time=lambda t: t / 2, title="t")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_version_records_read_promotion_and_rollback_tags():
    """Detects times not made relative to the start, and the offline version not marked."""
    t0 = dt.datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    v = SimpleNamespace(version="3", created_at=dt.datetime(2026, 1, 1, 0, 1, tzinfo=UTC), tags={
        "promoted_at": "2026-01-01T00:02:00+00:00", "rolled_back_at": "2026-01-01T00:03:00+00:00",
        "rolled_back_to": "2", "previous_champion": "2", "gate": "rolled_back"})
    w = SimpleNamespace(version="4", created_at=dt.datetime(2026, 1, 1, 0, 4, tzinfo=UTC), tags={})
    out = version_records([w, v], t0, {"3": t0 + 130}, offline_version="4")
    assert [r["version"] for r in out] == ["3", "4"]
    assert out[0]["created_s"] == 60 and out[0]["promoted_s"] == 120 and out[0]["rolled_back_s"] == 180
    assert out[0]["first_served_s"] == 130 and out[0]["rolled_back_to"] == "2"
    assert out[1]["offline"] and not out[0]["offline"] and out[1]["promoted_s"] is None


def test_quick_sizes_follow_the_documented_reasoning():
    """Detects QUICK drifting from its stated rules: a window of twice the job cadence, a chat phase that makes
    exactly one job due, a gate sample that fits the first job's held-out records, and probes within the phases."""
    cfg = ShiftConfig(**QUICK)
    assert cfg.window_records == 2 * cfg.min_new_records
    assert cfg.min_new_records <= cfg.chat_requests < 2 * cfg.min_new_records
    assert cfg.min_new_records * cfg.heldout_fraction >= cfg.eval_prompts
    assert cfg.probe_every <= cfg.chat_requests and cfg.code_requests % cfg.probe_every == 0
    demo = cfg.demo_config()
    assert demo.concurrency == cfg.concurrency and demo.distill_steps == cfg.distill_steps


def test_job_configs_are_valid_for_the_jobs_and_put_the_worker_on_the_spare_node(tmp_path):
    """Detects online jobs without the recency window or asking for CPU (the spare node has none), a fixed run
    name shared by every job, and an offline job that holds traffic out, keeps a window, or starts elsewhere."""
    from jobs.distill import DistillJobConfig
    from jobs.evaluate import load_config

    cfg = ShiftConfig(**QUICK)
    distill_yaml, evaluate_yaml = write_shift_job_configs(cfg, tmp_path, "http://127.0.0.1:5000")
    online = DistillJobConfig.from_yaml(distill_yaml)
    assert online.resources_per_worker == {"draftsmith_spare": 1}
    assert online.window.window_records == 160 and online.window.replay_fraction == 0.25
    assert online.run_name is None and online.train.steps == cfg.distill_steps
    assert online.drafter.endswith("@champion") and online.traffic_uri == str(tmp_path / "traffic")
    assert load_config(evaluate_yaml).num_prompts == cfg.eval_prompts
    since = dt.datetime(2026, 1, 1, 12, tzinfo=UTC)
    offline = DistillJobConfig.from_yaml(write_offline_config(cfg, tmp_path, distill_yaml, since=since,
                                                              start_version="2"))
    assert offline.since == since and offline.window.window_records is None and offline.heldout_fraction == 0
    assert offline.drafter == "models:/draftsmith-drafter/2" and offline.train.steps == cfg.distill_steps
    assert offline.resources_per_worker == {"draftsmith_spare": 1}
    cfg2 = ShiftConfig(**{**QUICK, "offline_steps": 40})
    assert DistillJobConfig.from_yaml(write_offline_config(cfg2, tmp_path, distill_yaml, since=since,
                                                           start_version="1")).train.steps == 40


# ------------------------------------------------------------------------------------------------ the loop


class _FakeState:
    def __init__(self):
        self.data = {}

    def read(self):
        return dict(self.data)


class _FakeTrigger:
    """Submits a job on its first poll; the job ends `job_polls` polls later (Ray would say so). With `fail_first`,
    the first job fails and the trigger submits a second in the same poll, as DistillTrigger.poll does."""

    def __init__(self, job_polls=3, fail_first=False):
        self.state, self.polls, self.job_polls, self.fail_first = _FakeState(), 0, job_polls, fail_first

    def poll(self):
        self.polls += 1
        job, seen = None, None
        if self.polls == 1:
            job = "job-1"
            self.state.data.update(job_id=job, job_result=None)
        elif self.polls == 1 + self.job_polls:
            if self.fail_first:
                seen, job = "FAILED", "job-2"
                self.state.data.update(job_id=job, job_result=None)
            else:
                seen = "SUCCEEDED"
                self.state.data["job_result"] = seen
        elif self.fail_first and self.polls == 1 + 2 * self.job_polls:
            seen = "SUCCEEDED"
            self.state.data["job_result"] = seen
        decision = SimpleNamespace(reason="r", submit=job is not None, readings=SimpleNamespace(job_status=seen))
        return SimpleNamespace(job_id=job, rolled_back_to=None, rollback=None, decision=decision,
                               as_dict=lambda: {"job_id": job})


class _FakeRegistry:
    def __init__(self):
        self.versions = ["1", "2"]
        self.champion = "1"
        self.promoted = []

    def list_versions(self):
        return [SimpleNamespace(version=v) for v in self.versions]

    def get_version_by_alias(self, alias):
        return SimpleNamespace(version=self.champion)

    def promote(self, version, reason):
        self.promoted.append(version)
        self.champion = version


def test_trigger_loop_settles_on_the_job_in_flight_and_promotes_with_promotion_always():
    """Detects `settle` returning before the job's end was handled (the switch would then be measured with the
    chat-phase drafter not yet promoted), `poll_now` answered by a poll that started before the call, and
    promotion `always` not promoting the job's challenger."""
    trigger, registry = _FakeTrigger(job_polls=3), _FakeRegistry()
    loop = TriggerLoop(trigger, registry, poll_seconds=60.0, promote_always=True)  # polls only when asked
    loop.start()
    try:
        started = time.monotonic()
        assert loop.settle(timeout_s=30, pause_s=0.05) == ["job-1"]
        assert time.monotonic() - started < 10  # poll_now woke the loop: no 60 s waits
        assert loop.handled == {"job-1": "SUCCEEDED"} and registry.promoted == ["2"]
        assert trigger.polls >= 4
        before = trigger.polls
        loop.poll_now()
        assert trigger.polls == before + 1
        assert loop.job_in_flight() is None
    finally:
        loop.stop()
    assert not loop._thread.is_alive()


def test_settle_waits_for_a_failed_job_resubmitted_by_the_trigger():
    """Detects settle waiting forever for a job whose end the trigger noted in the same poll it submitted the
    next one, and promotion `always` promoting after a failed job."""
    trigger, registry = _FakeTrigger(job_polls=2, fail_first=True), _FakeRegistry()
    loop = TriggerLoop(trigger, registry, poll_seconds=60.0, promote_always=True)
    loop.start()
    try:
        assert loop.settle(timeout_s=30, pause_s=0.05) == ["job-1", "job-2"]
        assert loop.handled == {"job-1": "FAILED", "job-2": "SUCCEEDED"}
        assert registry.promoted == ["2"]  # once, after the job that succeeded
    finally:
        loop.stop()


def test_trigger_loop_survives_a_failing_poll():
    """Detects the loop dying on an exception (DistillTrigger.run keeps polling; so must this loop)."""
    trigger = _FakeTrigger()
    calls = []

    def poll():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("MLflow down")
        return _FakeTrigger.poll(trigger)

    trigger.poll = poll
    loop = TriggerLoop(trigger, _FakeRegistry(), poll_seconds=60.0, promote_always=False)
    loop.start()
    try:
        loop.poll_now(timeout_s=10)
        loop.poll_now(timeout_s=10)
        assert any("error" in p for p in loop.polls) and len(calls) >= 2
        assert loop._thread.is_alive()
    finally:
        loop.stop()
