"""The distillation trigger's policy, with injected readers (no Ray, no MLflow, no traffic files)."""

import datetime as dt

import pytest

from pipelines.trigger import DistillTrigger, Readers, Readings, TriggerConfig, TriggerState, decide_from

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def readings(**kw):
    base = dict(records_since_last=0, last_training_until=None, last_submit_at=None, running_job=None,
                served_acceptance=None, served_records=0, champion_heldout=None, serving_load=0.1)
    return Readings(**{**base, **kw})


CFG = TriggerConfig(min_new_records=1000, drift_threshold=0.05, drift_min_new_records=100,
                    max_serving_load=0.5, min_interval_minutes=30)


@pytest.mark.parametrize("kw, submit, words", [
    (dict(records_since_last=999), False, "no drift"),
    (dict(records_since_last=1000), True, "new records"),
    (dict(records_since_last=5000, running_job="job-1"), False, "still running"),
    (dict(records_since_last=5000, last_submit_at=NOW - dt.timedelta(minutes=10)), False, "next allowed"),
    (dict(records_since_last=5000, last_submit_at=NOW - dt.timedelta(minutes=31)), True, "new records"),
    (dict(records_since_last=5000, serving_load=0.8), False, "no spare compute"),
    (dict(records_since_last=5000, serving_load=None), True, "new records"),  # unknown load does not block
    (dict(records_since_last=200, served_acceptance=0.20, served_records=80, champion_heldout=0.30), True, "drift"),
    (dict(records_since_last=50, served_acceptance=0.20, served_records=80, champion_heldout=0.30), False,
     "only 50 new records"),
    (dict(records_since_last=200, served_acceptance=0.27, served_records=80, champion_heldout=0.30), False,
     "no drift"),
    (dict(records_since_last=200, served_acceptance=None, champion_heldout=0.30), False, "no drift"),
])
def test_policy(kw, submit, words):
    d = decide_from(readings(**kw), CFG, NOW)
    assert d.submit is submit, d.reason
    assert words in d.reason


def test_drift_off_and_load_off():
    cfg = CFG.model_copy(update={"drift_threshold": None, "max_serving_load": None})
    r = readings(records_since_last=200, served_acceptance=0.0, champion_heldout=0.9, serving_load=1.0)
    assert not decide_from(r, cfg, NOW).submit
    assert decide_from(readings(records_since_last=1000, serving_load=1.0), cfg, NOW).submit


class FakeClient:
    def __init__(self):
        self.submitted = []

    def submit_job(self, **kw):
        self.submitted.append(kw)
        return kw["submission_id"]

    def get_job_status(self, job_id):
        return "SUCCEEDED"

    def get_job_logs(self, job_id):
        return "log line\n" * 10


def make_trigger(tmp_path, counts, status="RUNNING", **cfg):
    seen = {}

    def count_records(since):
        seen["since"] = since
        return counts

    readers = Readers(count_records=count_records, served_acceptance=lambda since: (None, 0),
                      champion_heldout=lambda: None, serving_load=lambda: 0.0,
                      registry_traffic_until=lambda: None, job_status=lambda job: status)
    config = TriggerConfig(state_file=str(tmp_path / "state.json"), min_new_records=10, min_interval_minutes=0,
                           entrypoint_num_cpus=2, entrypoint_resources={"distill": 1}, **cfg)
    client = FakeClient()
    return DistillTrigger(config, readers=readers, client_factory=lambda: client), client, seen


def test_maybe_submit_records_state_and_counts_since_last_window(tmp_path):
    trigger, client, seen = make_trigger(tmp_path, counts=20)
    assert trigger.decide(NOW).submit
    job = trigger.maybe_submit(NOW)
    assert job and len(client.submitted) == 1
    sub = client.submitted[0]
    assert sub["entrypoint"] == ("python -m jobs.distill --config infra/distill.yaml && "
                                 "python -m jobs.evaluate --config infra/evaluate.yaml")
    assert sub["entrypoint_num_cpus"] == 2 and sub["entrypoint_resources"] == {"distill": 1}
    assert ".venv" in sub["runtime_env"]["excludes"] and sub["runtime_env"]["working_dir"]
    state = TriggerState(tmp_path / "state.json").read()
    assert state["job_id"] == job and state["traffic_until"] == NOW.isoformat()
    # The job is still running: the next decision waits, and counts from the submitted window's end.
    later = NOW + dt.timedelta(hours=1)
    d = trigger.decide(later)
    assert not d.submit and "still running" in d.reason
    assert seen["since"] == NOW


def test_failed_job_keeps_its_records_counted(tmp_path):
    trigger, client, seen = make_trigger(tmp_path, counts=20, status="FAILED")
    trigger.state.write(job_id="old", submitted_at=NOW.isoformat(), traffic_until=NOW.isoformat(),
                        previous_traffic_until=(NOW - dt.timedelta(days=1)).isoformat())
    assert trigger.decide(NOW + dt.timedelta(hours=1)).submit
    assert seen["since"] == NOW - dt.timedelta(days=1)


def test_wait_returns_logs_on_failure(tmp_path):
    trigger, client, _ = make_trigger(tmp_path, counts=0, status="FAILED")
    outcome = trigger.wait("job-x", timeout_s=5, poll_s=0.01)
    assert outcome.status == "FAILED" and "log line" in outcome.logs_tail
    trigger, client, _ = make_trigger(tmp_path, counts=0, status="RUNNING")
    assert trigger.wait("job-y", timeout_s=0.05, poll_s=0.01).status.startswith("TIMEOUT")
