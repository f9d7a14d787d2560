"""`draftsmith bench shift` end to end on the tiny target, as a user runs it: a subprocess that starts a Ray head, a
spare node and MLflow, serves with features logged, runs the continuous trigger while it replays chat then code
traffic with held-out probes, trains the offline drafter, and stops everything it started.

The tiny target is random, so no drafter serves faster than another and its acceptance figures mean nothing: the
run uses `promotion: always` (the benchmark promotes every challenger, so swaps happen) and checks the contract of
the JSON (keys, 0 failed requests, 0 lost records, every job's driver on the spare node, the probes' shape), not
gains. It takes minutes on a 2-core CPU (three Ray jobs): `heavy`.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from draftsmith.ports import pick_port
from pipelines.local_services import LocalServices, group_alive

pytestmark = [pytest.mark.integration, pytest.mark.heavy, pytest.mark.timeout(1800)]

CHAT_N, CODE_N, EVERY, HELDOUT = 12, 16, 8, 4


@pytest.fixture(scope="module")
def shift_run(tmp_path_factory):
    state = tmp_path_factory.mktemp("shift") / "state"
    sets = {"chat_requests": CHAT_N, "code_requests": CODE_N, "probe_every": EVERY, "heldout_prompts": HELDOUT,
            "min_new_records": 8, "window_records": 16, "distill_steps": 10, "eval_prompts": 2,
            "heldout_fraction": 0.25, "max_tokens": 16, "max_prompt_tokens": 200, "draft_vocab_size": 128,
            "torch_threads": 1, "promotion": "always", "poll_seconds": 1, "rollback_min_requests": 4,
            "flush_every_records": 4, "flush_every_seconds": 1, "concurrency": 4,
            "serve_port": pick_port(28100), "mlflow_port": pick_port(25100), "dashboard_port": pick_port(28365)}
    argv = [sys.executable, "-m", "draftsmith.cli", "bench", "shift", "--target", "tiny", "--state-dir", str(state)]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=1700, cwd=Path(__file__).parents[2])
        services = LocalServices.read(state)
        assert done.returncode == 0, done.stderr[-6000:]
        yield {"summary": json.loads(done.stdout.strip().splitlines()[-1]), "stdout": done.stdout,
               "stderr": done.stderr, "state": state, "services_left": services}
    finally:
        # The command stops what it started; this only cleans up after a failure.
        subprocess.run([sys.executable, "-m", "draftsmith.cli", "down", "--state-dir", str(state)],
                       capture_output=True, text=True, timeout=180)


def test_the_json_holds_the_issue_contract(shift_run):
    s = shift_run["summary"]
    for key in ("windows", "versions", "promotions", "rollbacks", "jobs", "spare_node_ids", "recovery_requests",
                "offline_token_acceptance", "online_token_acceptance", "chat_retention", "failed_requests",
                "lost_records", "serving_tok_s", "code_speedup_end", "chat_speedup_end", "plot", "mlflow_run_id",
                "online_drafter_token_acceptance", "offline_drafter_token_acceptance"):
        assert key in s, key
    assert s["failed_requests"] == 0
    assert s["lost_records"] == 0 and s["extra_records"] == 0
    assert s["records_logged"] == s["logged_requests_sent"] == CHAT_N + CODE_N  # probes and end arms opted out
    assert isinstance(s["offline_token_acceptance"], float) and isinstance(s["online_token_acceptance"], float)
    assert s["code_tok_s_speculation_off"] > 0 and s["code_speedup_end"] is not None
    assert Path(s["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert s["traffic_log_bytes"]["features"] > 0  # traffic.log_features was on


def test_every_job_ran_on_the_spare_node(shift_run):
    s = shift_run["summary"]
    jobs = s["jobs"]
    assert s["online_jobs"] >= 1 and any(j["kind"] == "offline" for j in jobs)
    # A failed job is resubmitted (by the trigger, or the offline attempt); the loop must still have succeeded.
    assert any(j["status"] == "SUCCEEDED" for j in jobs if j["kind"] == "online"), jobs
    assert [j["status"] for j in jobs if j["kind"] == "offline"][-1] == "SUCCEEDED", jobs
    assert s["failed_jobs"] == sum(j["status"] != "SUCCEEDED" for j in jobs)
    assert s["spare_node_ids"] and all(j["driver_node_id"] in s["spare_node_ids"] for j in jobs), jobs
    assert s["all_jobs_on_spare_node"] is True


def test_probes_measure_both_domains_at_fixed_intervals(shift_run):
    s = shift_run["summary"]
    windows = s["windows"]
    # a probe at 0, after each chunk of EVERY logged requests, chunks not crossing the switch
    assert [w["requests_served"] for w in windows] == [0, 8, 12, 20, 28]
    assert [w["code_requests_served"] for w in windows] == [0, 0, 0, 8, 16]
    assert [w["after_switch"] for w in windows] == [False, False, True, True, True]
    for w in windows:
        assert w["chat"]["requests"] == w["code"]["requests"] == HELDOUT and w["chat"]["failed"] == 0
    rows = [json.loads(line) for line in (shift_run["state"] / "requests.jsonl").read_text().splitlines()]
    phases = {r["phase"] for r in rows}
    assert {"serve:chat", "serve:code", "end:chat", "end:code", "off:chat", "off:code", "offline:code"} <= phases
    assert all(r["drafted"] == 0 for r in rows if r["phase"].startswith("off:"))  # speculation off
    assert {r["drafter_version"] for r in rows if r["phase"] == "offline:code"} == {s["offline_version"]}


def test_promotions_swapped_the_replica_and_the_offline_drafter_is_marked(shift_run):
    s = shift_run["summary"]
    assert len(s["promotions"]) >= 2  # v1 (initial) and at least the chat job's challenger
    versions = {v["version"]: v for v in s["versions"]}
    assert versions[s["offline_version"]]["offline"] and not versions[s["online_version"]]["offline"]
    assert s["switch"]["champion_version"] != "1"  # the loop settled: the chat job's challenger served at the switch
    assert {"2"} <= {v for w in s["windows"] if w["after_switch"] for v in w["code"]["versions"]}


def test_the_mlflow_run_holds_the_figures_and_the_services_are_stopped(shift_run):
    from mlflow import MlflowClient

    state, s = shift_run["state"], shift_run["summary"]
    for name in ("shift.png", "shift.txt", "summary.json", "requests.jsonl", "trigger_polls.jsonl"):
        assert (state / name).exists(), name
    assert "probe 0" in shift_run["stdout"]
    # The server is down (leave_up is false): read its SQLite store and artifact folder directly.
    client = MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(s["mlflow_run_id"])
    assert run.data.metrics["failed_requests"] == 0
    assert run.data.metrics["offline_token_acceptance"] == pytest.approx(s["offline_token_acceptance"], abs=1e-6)
    assert "code_token_acceptance" in run.data.metrics
    logged = {p.name for p in (state / "mlflow" / "artifacts").rglob("*") if p.is_file()}
    assert {"shift.png", "shift.txt", "summary.json"} <= logged
    assert shift_run["services_left"] is None  # stop_services ran and removed services.json
