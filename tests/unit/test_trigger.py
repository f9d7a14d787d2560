"""The distillation trigger: its policy, and the service loop with injected readers (no Ray, no MLflow, no traffic
files): never two jobs at once, a real restart from the state file, rollback wired into every poll, and a clean stop
on a stop event and on a real SIGTERM."""

import dataclasses
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from draftsmith.rollback import ServedCounts
from pipelines.trigger import (
    MISSING,
    DistillTrigger,
    Readers,
    Readings,
    TriggerBusy,
    TriggerConfig,
    TriggerState,
    decide_from,
    job_status_of,
)

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[2]


def readings(**kw):
    base = dict(records_since_last=0, last_training_until=None, last_submit_at=None, running_job=None,
                served_token_acceptance=None, served_requests=0, champion_token_acceptance=None, serving_load=0.1)
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
    (dict(records_since_last=200, served_token_acceptance=0.20, served_requests=80, champion_token_acceptance=0.30),
     True, "drift"),
    (dict(records_since_last=50, served_token_acceptance=0.20, served_requests=80, champion_token_acceptance=0.30),
     False, "only 50 new records"),
    (dict(records_since_last=200, served_token_acceptance=0.27, served_requests=80, champion_token_acceptance=0.30),
     False, "no drift"),
    (dict(records_since_last=200, served_token_acceptance=None, champion_token_acceptance=0.30), False, "no drift"),
])
def test_policy(kw, submit, words):
    d = decide_from(readings(**kw), CFG, NOW)
    assert d.submit is submit, d.reason
    assert words in d.reason


def test_drift_off_and_load_off():
    cfg = CFG.model_copy(update={"drift_threshold": None, "max_serving_load": None})
    r = readings(records_since_last=200, served_token_acceptance=0.0, champion_token_acceptance=0.9, serving_load=1.0)
    assert not decide_from(r, cfg, NOW).submit
    assert decide_from(readings(records_since_last=1000, serving_load=1.0), cfg, NOW).submit


# ------------------------------------------------------------------------------------------------ fakes


class FakeClient:
    """The Jobs API: records submissions; `status` is what every job reports (a callable for per-job answers)."""

    def __init__(self, status="RUNNING", fail_submit=False):
        self.submitted = []
        self.asked = []
        self.status = status
        self.fail_submit = fail_submit

    def submit_job(self, **kw):
        if self.fail_submit:
            raise ConnectionError("dashboard went away mid-request")
        self.submitted.append(kw)
        return kw["submission_id"]

    def get_job_status(self, job_id):
        self.asked.append(job_id)
        status = self.status(job_id) if callable(self.status) else self.status
        if status == MISSING:
            raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")
        return status

    def get_job_logs(self, job_id):
        return "log line\n" * 10


@dataclasses.dataclass
class FakeVersion:
    version: str
    tags: dict
    metrics: dict
    created_at: dt.datetime = NOW - dt.timedelta(days=1)


class FakeRegistry:
    """The DrafterRegistry methods the trigger uses, with DrafterRegistry.rollback's alias move and tags."""

    def __init__(self, versions, champion):
        self.versions = {v.version: v for v in versions}
        self.aliases = {"champion": champion}
        self.rollbacks = []

    def get_version_by_alias(self, alias):
        return self.versions.get(self.aliases.get(alias))

    def get_version(self, version):
        return self.versions[str(version)]

    def list_versions(self):
        return sorted(self.versions.values(), key=lambda v: int(v.version))

    def set_tags(self, version, **tags):
        self.versions[version].tags.update({k: str(v) for k, v in tags.items()})

    def promote(self, version, now):
        current = self.aliases["champion"]
        self.versions[version].tags.update(previous_champion=current, promoted_at=now.isoformat())
        self.aliases["champion"] = version

    def rollback(self, *, alias, reason, expected_version, now):
        current = self.get_version_by_alias(alias)
        assert current.version == expected_version
        prev = current.tags["previous_champion"]
        self.rollbacks.append((current.version, prev, reason))
        self.aliases[alias] = prev
        current.tags.update(gate="rolled_back", rolled_back_to=prev, rolled_back_at=now.isoformat(),
                            rollback_reason=reason)
        self.versions[prev].tags.update(restored_after=current.version, restored_at=now.isoformat(),
                                        rollback_reason=reason)
        return self.versions[prev]


class FakeTraffic:
    """Served counters at times: served_counts(since, until) sums the entries in [since, until)."""

    def __init__(self):
        self.entries = []  # (time, version, setting, ServedCounts)

    def add(self, at, version, counts, setting="greedy"):
        self.entries.append((at, version, setting, counts))

    def served_counts(self, since, until):
        out = {}
        for at, version, setting, c in self.entries:
            if at >= since and (until is None or at < until):
                out[(version, setting)] = out.get((version, setting), ServedCounts()) + c
        return out


def served(speculated, token_acceptance, policy_off=0, tokens_per_request=20):
    compared = speculated * tokens_per_request
    return ServedCounts(requests=speculated + policy_off, speculated=speculated, drafted=compared,
                        accepted=round(compared * token_acceptance), compared=compared)


def make_trigger(tmp_path, counts, status="RUNNING", *, client=None, registry=None, traffic=None, **cfg):
    seen = {}

    def count_records(since):
        seen["since"] = since
        return counts() if callable(counts) else counts

    client = client or FakeClient(status)
    traffic = traffic or FakeTraffic()
    readers = Readers(count_records=count_records, served_counts=traffic.served_counts,
                      serving_load=lambda: 0.0, job_status=lambda job: job_status_of(client, job),
                      registry=lambda: registry)
    config = TriggerConfig(**{"state_file": str(tmp_path / "state.json"), "min_new_records": 10,
                              "min_interval_minutes": 0, "entrypoint_num_cpus": 2,
                              "entrypoint_resources": {"distill": 1}, "poll_seconds": 0.01, **cfg})
    return DistillTrigger(config, readers=readers, client_factory=lambda: client), client, seen


# ------------------------------------------------------------------------------------------------ submission


def test_maybe_submit_records_state_and_counts_since_last_window(tmp_path):
    trigger, client, seen = make_trigger(tmp_path, counts=20)
    assert trigger.decide(NOW).submit
    job = trigger.maybe_submit(NOW)
    assert job and len(client.submitted) == 1
    sub = client.submitted[0]
    traffic = os.path.abspath(".state/traffic")  # the trigger's own log, as the job must see it (job_overrides)
    assert sub["entrypoint"] == (f"python -m jobs.distill --config infra/distill.yaml --set traffic_uri={traffic} "
                                 f"--set state_dir={os.path.abspath('.state')} && "
                                 f"python -m jobs.evaluate --config infra/evaluate.yaml --set traffic_uri={traffic}")
    assert sub["entrypoint_num_cpus"] == 2 and sub["entrypoint_resources"] == {"distill": 1}
    assert ".venv" in sub["runtime_env"]["excludes"] and sub["runtime_env"]["working_dir"]
    state = TriggerState(tmp_path / "state.json").read()
    assert state["job_id"] == job and state["traffic_until"] == NOW.isoformat()
    assert state["job_state"] == "submitted"
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


def test_the_loop_never_runs_two_jobs_at_once(tmp_path):
    """Detects: a second submission while the first job runs, or while Ray cannot say (dashboard down), during a
    loop that sees new records at every poll."""
    status = {"now": "PENDING"}
    trigger, client, _ = make_trigger(tmp_path, counts=5000, status=lambda job: status["now"])
    for state in ("PENDING", "RUNNING", "UNKNOWN-TRANSPORT"):
        status["now"] = state
        if state == "UNKNOWN-TRANSPORT":
            client.status = lambda job: (_ for _ in ()).throw(ConnectionError("connection refused"))
        assert trigger.run(max_polls=5) == 5
        assert len(client.submitted) == 1, state
    assert "still running" in trigger.state.read()["last_decision"]
    first_job = client.submitted[0]["submission_id"]
    client.status = lambda job: "SUCCEEDED" if job == first_job else "RUNNING"  # the first job ended: one more
    trigger.run(max_polls=3)
    assert len(client.submitted) == 2
    assert client.submitted[0]["submission_id"] != client.submitted[1]["submission_id"]


def test_a_restart_resumes_from_the_state_file_without_submitting_twice(tmp_path):
    """Detects: a restarted trigger that forgets the running job (two jobs), asks Ray about the wrong job, recounts
    records the job trained on, or needs Ray to remember a job whose end was already seen."""
    t0 = NOW
    first, client, _ = make_trigger(tmp_path, counts=50, status="RUNNING")
    outcome = first.poll(t0)
    assert outcome.job_id and len(client.submitted) == 1
    job = outcome.job_id
    del first  # the process dies; only the state file remains

    new_records = {"n": 50}
    restarted, client2, seen = make_trigger(tmp_path, counts=lambda: new_records["n"], status="RUNNING")
    for minutes in (5, 10):
        again = restarted.poll(t0 + dt.timedelta(minutes=minutes))
        assert again.job_id is None and "still running" in again.decision.reason
    assert client2.submitted == [] and set(client2.asked) == {job}  # its status asked of Ray, by id

    client2.status = "SUCCEEDED"
    resumed = restarted.poll(t0 + dt.timedelta(minutes=15))
    assert seen["since"] == t0  # counting from the end of the window the job trained on
    assert resumed.job_id and resumed.job_id != job and len(client2.submitted) == 1
    state = TriggerState(tmp_path / "state.json").read()
    assert state["job_id"] == resumed.job_id and state["job_result"] is None

    # A third incarnation whose Ray has forgotten every job: the ended job is not asked about again.
    new_records["n"] = 0
    assert restarted.poll(t0 + dt.timedelta(minutes=20)).job_id is None  # sees the second job's end, records it
    third, client3, seen3 = make_trigger(tmp_path, counts=0, status=MISSING)
    third.poll(t0 + dt.timedelta(minutes=25))
    assert client3.asked == [] and seen3["since"] == t0 + dt.timedelta(minutes=15)


def test_a_crash_during_submission_cannot_hide_a_job(tmp_path):
    """Detects: a submission lost between the Jobs API call and the state write (it must be recorded before), and a
    never-arrived submission blocking the trigger forever."""
    trigger, client, _ = make_trigger(tmp_path, counts=50, client=FakeClient(fail_submit=True))
    trigger.state.write(traffic_until=(NOW - dt.timedelta(days=1)).isoformat())
    with pytest.raises(ConnectionError):
        trigger.poll(NOW)
    state = trigger.state.read()
    assert state["job_state"] == "submitting" and state["job_id"].startswith("draftsmith-distill-")
    # Restart: Ray may have the job after all -> it blocks.
    restarted, client2, _ = make_trigger(tmp_path, counts=50, status="RUNNING")
    assert "still running" in restarted.poll(NOW + dt.timedelta(minutes=1)).decision.reason
    assert client2.asked == [state["job_id"]] and client2.submitted == []
    # Ray never got it -> it ended without a result: its records still count, and the trigger submits again.
    client2.status = MISSING
    out = restarted.poll(NOW + dt.timedelta(minutes=2))
    assert out.job_id and len(client2.submitted) == 1
    assert restarted.state.read()["previous_traffic_until"] == (NOW - dt.timedelta(days=1)).isoformat()


def test_stop_event_ends_the_service_cleanly_and_one_service_per_state_file(tmp_path):
    """Detects: a service that ignores its stop (SIGTERM in main), leaves no state, or runs twice on one state."""
    trigger, client, _ = make_trigger(tmp_path, counts=0, poll_seconds=30)
    stop = threading.Event()
    thread = threading.Thread(target=trigger.run, args=(stop,))
    thread.start()
    deadline = time.monotonic() + 10
    while "last_poll_at" not in trigger.state.read():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    other, _, _ = make_trigger(tmp_path, counts=0)
    with pytest.raises(TriggerBusy):
        other.run(max_polls=1)
    started = time.monotonic()
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive() and time.monotonic() - started < 5  # not after the 30 s poll period
    state = trigger.state.read()
    assert state["stopped_at"] and state["polls"] == 1
    assert other.run(max_polls=1) == 1  # the lock is released with the service


def test_sigterm_stops_the_real_process_with_exit_code_0(tmp_path):
    """Detects: `python -m pipelines.trigger` (what `draftsmith trigger` runs) dying on SIGTERM without writing its
    state, or not stopping."""
    config = tmp_path / "trigger.yaml"
    config.write_text(yaml.safe_dump({"traffic_uri": str(tmp_path / "traffic"), "state_file": str(tmp_path / "s.json"),
                                      "tracking_uri": None, "max_serving_load": None, "ray_cluster_address": None,
                                      "poll_seconds": 0.2}))
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.trigger", "--config", str(config)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "s.json").exists() or "last_poll_at" not in json.loads((tmp_path / "s.json").read_text()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()[-2000:]
    state = json.loads((tmp_path / "s.json").read_text())
    assert state["stopped_at"] and state["polls"] >= 1 and "SIGTERM" in err.decode()


# ------------------------------------------------------------------------------------------------ drift and rollback


def _registry_with_promotion(promoted_at):
    """v1 (evaluated 0.60 greedy; promoted over v0 a day before) was champion; v2 promoted over it at `promoted_at`."""
    v0 = FakeVersion("0", {}, {"heldout_token_acceptance_greedy": 0.90})
    v1 = FakeVersion("1", {}, {"heldout_token_acceptance_greedy": 0.60, "heldout_token_acceptance_sampled": 0.40})
    v2 = FakeVersion("2", {}, {"heldout_token_acceptance_greedy": 0.65})
    reg = FakeRegistry([v0, v1, v2], champion="0")
    reg.promote("1", promoted_at - dt.timedelta(days=1))
    reg.promote("2", promoted_at)
    return reg


def test_drift_compares_the_champions_served_token_acceptance_with_its_evaluated_figure(tmp_path):
    """Detects: drift read over another version's records, over sampled records against the greedy figure, or with
    policy-off requests counted as zero acceptance."""
    reg = FakeRegistry([FakeVersion("3", {}, {"heldout_token_acceptance_greedy": 0.60,
                                              "heldout_token_acceptance_sampled": 0.20})], champion="3")
    traffic = FakeTraffic()
    at = NOW - dt.timedelta(minutes=10)
    traffic.add(at, "3", served(60, 0.58, policy_off=500))  # within threshold; many policy-off requests
    traffic.add(at, "3", served(60, 0.10), setting="sampled")  # low, but sampled: not compared to greedy
    traffic.add(at, "2", served(60, 0.05))  # another version's records
    trigger, _, _ = make_trigger(tmp_path, counts=150, registry=reg, traffic=traffic, min_new_records=1000,
                                 drift_min_new_records=100, rollback_enabled=False)
    r = trigger.read(NOW)
    assert r.served_token_acceptance == pytest.approx(0.58) and r.served_requests == 60
    assert r.champion_token_acceptance == pytest.approx(0.60)
    assert not trigger.decide(NOW).submit
    traffic.add(at, "3", served(200, 0.30))  # the champion's served acceptance really fell
    d = trigger.decide(NOW)
    assert d.submit and "drift" in d.reason and d.readings.served_token_acceptance < 0.55


def test_the_loop_rolls_back_a_bad_promotion_once(tmp_path):
    """Detects: rollback not checked by the loop, checked before enough requests, judged against the wrong version,
    not recorded (so repeated), or repeated after the bad version is promoted again by hand."""
    promoted_at = NOW - dt.timedelta(hours=1)
    reg = _registry_with_promotion(promoted_at)
    traffic = FakeTraffic()
    traffic.add(promoted_at - dt.timedelta(minutes=30), "1", served(100, 0.62))  # v1 served before the promotion
    traffic.add(promoted_at + dt.timedelta(minutes=1), "2", served(30, 0.20, policy_off=400))
    trigger, client, _ = make_trigger(tmp_path, counts=0, registry=reg, traffic=traffic, rollback_min_requests=50,
                                      rollback_margin=0.1, min_new_records=10_000)
    first = trigger.poll(NOW)
    assert first.rollback.verdict == "wait" and reg.aliases["champion"] == "2"  # 30 speculating requests < 50

    traffic.add(promoted_at + dt.timedelta(minutes=20), "2", served(30, 0.20))
    out = trigger.poll(NOW + dt.timedelta(minutes=1))
    assert out.rollback.rollback and out.rolled_back_to == "1" and reg.aliases["champion"] == "1"
    assert out.rollback.reference == pytest.approx(0.62, abs=1e-3)  # v1's served figure, not its evaluated 0.60
    assert reg.rollbacks == [("2", "1", out.rollback.reason)] and "v2" in out.rollback.reason
    assert reg.versions["2"].tags["rolled_back_to"] == "1" and reg.versions["1"].tags["restored_after"] == "2"
    assert trigger.state.read()["rollbacks"]["2"]["restored"] == "1"
    assert client.submitted == []  # the distillation decision still ran after it: nothing due

    for minutes in (2, 3):  # v1 is champion through a rollback: not a new promotion, nothing to judge
        assert trigger.poll(NOW + dt.timedelta(minutes=minutes)).rollback is None
    reg.aliases["champion"] = "2"  # a person promotes v2 again: it is never rolled back twice
    assert trigger.poll(NOW + dt.timedelta(minutes=4)).rollback is None and reg.aliases["champion"] == "2"
    assert len(reg.rollbacks) == 1


def test_a_promotion_that_passes_probation_is_judged_once(tmp_path):
    """Detects: a kept version judged again at every poll (later traffic drift would then read as a bad promotion)."""
    promoted_at = NOW - dt.timedelta(hours=1)
    reg = _registry_with_promotion(promoted_at)
    traffic = FakeTraffic()  # v1 never served: the reference is its evaluated figure
    traffic.add(promoted_at + dt.timedelta(minutes=1), "2", served(60, 0.55))
    trigger, _, _ = make_trigger(tmp_path, counts=0, registry=reg, traffic=traffic, min_new_records=10_000)
    out = trigger.poll(NOW)
    assert out.rollback.verdict == "keep" and out.rollback.reference == pytest.approx(0.60)
    assert trigger.state.read()["probation"]["2"]["verdict"] == "keep"
    assert reg.versions["2"].tags["probation"] == "passed"
    traffic.add(promoted_at + dt.timedelta(minutes=30), "2", served(500, 0.10))  # later collapse: drift, not rollback
    assert trigger.poll(NOW + dt.timedelta(minutes=1)).rollback is None and reg.aliases["champion"] == "2"


def test_rollback_disabled_and_no_previous_champion(tmp_path):
    """Detects: a rollback when it is switched off, or an attempt on a first champion (nothing to go back to)."""
    promoted_at = NOW - dt.timedelta(hours=1)
    reg = _registry_with_promotion(promoted_at)
    traffic = FakeTraffic()
    traffic.add(promoted_at + dt.timedelta(minutes=1), "2", served(100, 0.05))
    off, _, _ = make_trigger(tmp_path, counts=0, registry=reg, traffic=traffic, rollback_enabled=False)
    assert off.poll(NOW).rollback is None and reg.aliases["champion"] == "2"
    first = FakeRegistry([FakeVersion("1", {}, {})], champion="1")
    alone, _, _ = make_trigger(tmp_path / "b", counts=0, registry=first, traffic=traffic)
    assert alone.poll(NOW).rollback is None


# ------------------------------------------------------------------------------------------------ paths in the job


def _job_configs(entrypoint: str, tmp_path) -> dict:
    """The configs the jobs build from the trigger's entrypoint, through their own config loading (the `--set`
    values parsed as jobs.distill.main and jobs.evaluate.main parse them)."""
    import shlex

    from jobs.distill import DistillJobConfig
    from jobs.evaluate import load_config

    out = {}
    for command in entrypoint.split(" && "):
        argv = shlex.split(command)
        module, config = argv[2], argv[argv.index("--config") + 1]
        sets = {}
        for i, token in enumerate(argv):
            if token == "--set":
                key, _, value = argv[i + 1].partition("=")
                sets[key] = yaml.safe_load(value)
        out[module] = (DistillJobConfig.from_yaml(config, sets) if module == "jobs.distill"
                       else load_config(config, sets))
    return out


RAY_JOB = {"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}  # what the Jobs API sets for a job's driver


def test_the_job_sees_absolute_paths_for_the_log_and_its_state(tmp_path, monkeypatch):
    """Detects (issue 20): a job submitted by the trigger reading `.state/traffic` and writing `.state` inside its
    uploaded copy of the working dir (which has no .state): an empty log and lost checkpoints, silently. The
    trigger's own traffic_uri and every relative local path of the job configs (defaults included) must reach the
    job absolute, and absolute ones, URIs and servers must be left as they are."""
    from jobs.distill import refuse_relative_paths

    monkeypatch.chdir(tmp_path)  # where the trigger runs: its relative paths mean this folder
    distill = tmp_path / "distill.yaml"
    distill.write_text(yaml.safe_dump({"traffic_uri": "elsewhere/traffic", "output_dir": "out",
                                       "tracking_uri": "sqlite:///mlflow.db", "registry_uri": "http://m:5000"}))
    evaluate = tmp_path / "evaluate.yaml"
    evaluate.write_text(yaml.safe_dump({"tracking_uri": "file:./mlruns", "prompts": "traffic"}))
    trigger, client, _ = make_trigger(tmp_path, counts=20, traffic_uri="logs/traffic",
                                      distill_config=str(distill), evaluate_config="evaluate.yaml",
                                      working_dir=str(tmp_path))
    before = _job_configs(f"python -m jobs.distill --config {distill} && "
                          f"python -m jobs.evaluate --config {evaluate}", tmp_path)
    with pytest.raises(ValueError, match="traffic_uri='elsewhere/traffic'.*state_dir='.state'.*output_dir='out'"):
        refuse_relative_paths("jobs.distill", before["jobs.distill"].local_paths(), environ=RAY_JOB)
    assert trigger.maybe_submit(NOW)
    jobs = _job_configs(client.submitted[0]["entrypoint"], tmp_path)
    d, e = jobs["jobs.distill"], jobs["jobs.evaluate"]
    assert d.traffic_uri == e.traffic_uri == str(tmp_path / "logs" / "traffic")  # the log the trigger counted
    assert d.state_dir == str(tmp_path / ".state") and d.output_dir == str(tmp_path / "out")  # the default too
    assert d.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db" and d.registry_uri == "http://m:5000"
    assert e.tracking_uri == f"file://{tmp_path}/mlruns"
    for module, cfg in jobs.items():  # what the jobs check first when they run as a Ray Job
        refuse_relative_paths(module, cfg.local_paths(), environ=RAY_JOB)

    remote = make_trigger(tmp_path / "r", counts=20, traffic_uri="s3://bucket/traffic", distill_config="x.yaml",
                          evaluate_config=None, working_dir="s3://bucket/code.zip")[0]
    assert remote.job_overrides("distill", "x.yaml") == ["traffic_uri=s3://bucket/traffic"]  # unreadable here
    spaced = make_trigger(tmp_path / "s", counts=20, traffic_uri="/data/my traffic", evaluate_config=None,
                          distill_config=str(distill))[0]
    assert _job_configs(spaced.entrypoint(), tmp_path)["jobs.distill"].traffic_uri == "/data/my traffic"


def test_the_trigger_knows_the_jobs_path_fields_and_reads_paths_as_they_do():
    """Detects: a job config path field the trigger does not make absolute (or with another default), or an absolute
    form that a job would still read as relative (the rule is draftsmith.local_paths, shared by both)."""
    from draftsmith.local_paths import absolute_local, relative_local_path
    from jobs.distill import DistillJobConfig
    from jobs.evaluate import EvaluateConfig
    from pipelines.trigger import JOB_PATH_FIELDS

    for job, model in (("distill", DistillJobConfig), ("evaluate", EvaluateConfig)):
        fields = {k: kind for k, (value, kind) in model().local_paths().items() if k != "traffic_uri"}
        assert {k: kind for k, (kind, _) in JOB_PATH_FIELDS[job].items()} == fields, job
        assert {k: default for k, (_, default) in JOB_PATH_FIELDS[job].items()} == {
            k: model.model_fields[k].default for k in fields}, job
    cases = [(".state/traffic", "uri"), ("/abs/traffic", "uri"), ("s3://b/traffic", "uri"), ("~/t", "uri"),
             ("file:///abs/t", "uri"), (".state", "dir"), ("/abs", "dir"), ("~/state", "dir"), ("mlruns", "tracking"),
             ("./mlruns", "tracking"), ("/abs/mlruns", "tracking"), ("file:./mlruns", "tracking"),
             ("file:///abs/mlruns", "tracking"), ("sqlite:///m.db", "tracking"), ("sqlite:////abs/m.db", "tracking"),
             ("http://127.0.0.1:5000", "tracking"), ("databricks", "tracking"), ("databricks-uc", "tracking"),
             ("postgresql://u@h/db", "tracking"), ("", "dir"), (None, "tracking")]
    for value, kind in cases:
        if value:
            fixed = absolute_local(value, kind)
            assert not relative_local_path(fixed, kind), (value, kind, fixed)
            assert (fixed == value) == (not relative_local_path(value, kind)), (value, kind, fixed)
    assert relative_local_path(".state/traffic", "uri") and relative_local_path("file:./m", "tracking")
    assert not relative_local_path("http://h", "tracking") and not relative_local_path("~/x", "dir")


def test_the_jobs_refuse_relative_local_paths_only_in_a_ray_job(monkeypatch):
    """Detects: jobs.distill or jobs.evaluate run by the Jobs API with a relative local path (it would silently read
    or write the job's temporary copy of the working dir), or refusing one outside a Ray Job, where it is fine."""
    from jobs.distill import DistillJobConfig, refuse_relative_paths, run_distill, running_as_ray_job
    from jobs.evaluate import EvaluateConfig, evaluate_and_gate

    for name in ("RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    assert not running_as_ray_job()
    refuse_relative_paths("jobs.distill", DistillJobConfig().local_paths())  # a user's shell: relative is fine
    assert running_as_ray_job(RAY_JOB) and running_as_ray_job({"RAY_JOB_ID": "02000000"})
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    import ray

    def no_cluster(*args, **kwargs):  # a job that does not refuse would go on to start Ray: fail fast instead
        raise AssertionError("the job went on past its path check")

    monkeypatch.setattr(ray, "init", no_cluster)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(ValueError, match=r"jobs.distill runs as a Ray Job.*traffic_uri='.state/traffic', "
                                         r"state_dir='.state'.*--set traffic_uri="):
        run_distill(DistillJobConfig())  # before anything starts: no Ray, no MLflow needed for the refusal
    with pytest.raises(ValueError, match=r"jobs.evaluate runs as a Ray Job.*traffic_uri='t'"):
        evaluate_and_gate(EvaluateConfig(traffic_uri="t"))
    refuse_relative_paths("jobs.distill", DistillJobConfig(traffic_uri="s3://b/t", state_dir="/abs").local_paths())


# ------------------------------------------------------------------------------------------------ like with like


def test_drift_is_read_only_against_a_figure_evaluated_at_the_serving_engine_settings(tmp_path):
    """Detects: drift computed against an evaluated figure measured at other engine settings than serving uses
    (another draft length cap, batch or prompt lookup: the policy drafts differently, so the figures differ without
    any drift), or a tag jobs/evaluate writes that the trigger cannot read."""
    from jobs.evaluate import engine_tag

    from draftsmith.engine_config import EngineConfig
    from pipelines.trigger import engine_mismatch

    serving = {"num_speculative_tokens": "auto", "max_batch_size": 8, "prompt_lookup_max": 3}
    same = engine_tag(EngineConfig(**serving, max_model_len=4096))  # fields serving does not name may differ
    other = engine_tag(EngineConfig(num_speculative_tokens="auto", max_batch_size=1, prompt_lookup_max=3))
    assert engine_mismatch(serving, same) == (True, None)
    ok, note = engine_mismatch(serving, other)
    assert not ok and "max_batch_size evaluated 1, served 8" in note
    assert engine_mismatch(serving, None)[0] and "unverified" in engine_mismatch(serving, None)[1]
    assert engine_mismatch(None, other) == (True, None)
    with pytest.raises(ValueError):
        TriggerConfig(serving_engine={"no_such_field": 1})

    reg = FakeRegistry([FakeVersion("3", {"heldout_engine": other}, {"heldout_token_acceptance_greedy": 0.60})],
                       champion="3")
    traffic = FakeTraffic()
    traffic.add(NOW - dt.timedelta(minutes=10), "3", served(200, 0.30))  # far below 0.60
    trigger, _, _ = make_trigger(tmp_path, counts=150, registry=reg, traffic=traffic, min_new_records=1000,
                                 rollback_enabled=False, serving_engine=serving)
    outcome = trigger.poll(NOW)
    assert not outcome.decision.submit and "max_batch_size evaluated 1" in outcome.decision.reason
    assert "max_batch_size" in trigger.state.read()["drift_engine"]
    reg.versions["3"].tags["heldout_engine"] = same  # evaluated like serving: the drop is drift
    d = trigger.decide(NOW)
    assert d.submit and "drift" in d.reason and d.readings.served_token_acceptance == pytest.approx(0.30)


def test_infra_trigger_expects_the_engine_that_infra_serves_and_evaluates():
    """Detects: infra/trigger.yaml's serving_engine drifting from infra/serve.yaml's engine section, or
    infra/evaluate.yaml evaluating at settings the trigger would then refuse to compare."""
    from jobs.evaluate import engine_tag, load_config

    from pipelines.trigger import engine_mismatch

    trigger = yaml.safe_load((REPO / "infra/trigger.yaml").read_text())
    serve_app = yaml.safe_load((REPO / "infra/serve.yaml").read_text())["applications"][0]["args"]
    expected = trigger["serving_engine"]
    assert expected and {k: serve_app["engine"][k] for k in expected} == expected
    assert engine_mismatch(expected, engine_tag(load_config(REPO / "infra/evaluate.yaml").engine)) == (True, None)
