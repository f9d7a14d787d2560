"""`draftsmith demo` end to end on the tiny target, as a user runs it: a subprocess that starts its own
two-node Ray cluster (a serving head and a spare node, each a `ray start` process) and MLflow server, serves
over HTTP with the target's features logged, distills on the spare node through the Ray Jobs API from those
logged features, promotes and hot-swaps, then `draftsmith down` stops exactly what it started.

The tiny target is random, so no drafter can be expected to serve faster than another here: the demo runs
with `promotion: always` (the job evaluates without gating, the demo promotes) so that the promotion and the
hot swap always happen, and the figures are checked for consistency, not for gains (the README's figures come
from `make demo` on SmolLM2). It runs the demo's defaults otherwise: an untrained feature drafter with prompt
lookup beside it and `num_speculative_tokens: auto`.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from draftsmith.ports import pick_port
from pipelines.local_services import LocalServices, group_alive

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    state = tmp_path_factory.mktemp("demo") / "state"
    sets = {"target": "tiny", "state_dir": str(state), "train_prompts": 40, "heldout_prompts": 8,
            "warmup_prompts": 4, "distill_steps": 30, "eval_prompts": 4, "heldout_fraction": 0.2, "max_tokens": 16,
            "max_prompt_tokens": 200, "eval_temperatures": "[0.0]", "draft_vocab_size": 128, "torch_threads": 1,
            "promotion": "always", "progress_every_s": 2,
            "serve_port": pick_port(28000), "mlflow_port": pick_port(25000), "dashboard_port": pick_port(28265),
            "window": 8}
    argv = [sys.executable, "-m", "draftsmith.cli", "demo"]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[2])
    services = LocalServices.read(state)
    try:
        assert done.returncode == 0, done.stderr[-4000:]
        yield {"summary": json.loads(done.stdout.strip().splitlines()[-1]), "stdout": done.stdout,
               "stderr": done.stderr, "state": state, "services": services}
    finally:
        down = subprocess.run([sys.executable, "-m", "draftsmith.cli", "down", "--state-dir", str(state)],
                              capture_output=True, text=True, timeout=180)
        assert down.returncode == 0, down.stderr[-2000:]


def test_the_loop_promotes_and_swaps_without_failed_requests(demo_run):
    s = demo_run["summary"]
    for key in ("requests", "failed_requests", "token_acceptance_before_swap", "token_acceptance_after_swap",
                "tok_s_before_swap", "tok_s_after_swap", "tok_s_autoregressive", "champion_version", "plot",
                "mlflow_url"):
        assert key in s, key
    assert s["failed_requests"] == 0
    assert s["requests"] == 8 + 8 + 40 + 8 + 8  # before + its off arm, serve, after + its off arm
    assert s["warmup_requests"] == 4 * 4  # one warm-up per measured arm
    assert s["num_speculative_tokens"] == "auto" and s["drafter"].startswith("feature:")
    assert s["engine"]["prompt_lookup_max"] >= 1
    # each phase over the speculation-off arm timed beside it
    assert s["speedup_after_swap"] == pytest.approx(
        s["tok_s_after_swap"] / s["tok_s_autoregressive_after_swap"], rel=0.01)
    assert s["speedup_before_swap"] == pytest.approx(
        s["tok_s_before_swap"] / s["tok_s_autoregressive_before_swap"], rel=0.01)
    assert s["promoted"] and s["initial_version"] == "1" and s["champion_version"] == "2"
    assert Path(s["plot"]).read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(line) for line in (demo_run["state"] / "requests.jsonl").read_text().splitlines()]
    by_phase = {}
    for row in rows:
        by_phase.setdefault(row["phase"], set()).add(row["drafter_version"])
    # The replica served v1 before the swap and v2 after it, without a restart; gamma 0 drafts nothing.
    assert by_phase["before"] == {"1"} and by_phase["serve"] == {"1"} and by_phase["after"] == {"2"}
    assert by_phase["before_off"] == {"1"} and by_phase["after_off"] == {"2"}
    assert all(r["drafted"] == 0 for r in rows if r["phase"].endswith("_off"))
    # the on and off arms take turns in ABBA rounds: on, off, off, on
    order = [p for i, p in enumerate(r["phase"] for r in rows) if i == 0 or rows[i - 1]["phase"] != p]
    start = order.index("before")
    assert order[start:start + 3] == ["before", "before_off", "before"]
    assert "by phase:" in demo_run["stdout"]


def test_the_job_ran_on_the_spare_node_and_serving_stayed_off_it(demo_run):
    """Issue 20: the demo's distillation used the serving node's own CPUs; now its driver runs on the spare node,
    and no Serve actor (replica, ingress, logger, proxy) was placed there."""
    s = demo_run["summary"]
    services = demo_run["services"]
    assert len(services.spare_nodes) == 1 and s["spare_node_id"] == services.spare_nodes[0].node_id
    assert s["job_ran_on_spare_node"] is True and s["job_driver_node_id"] == s["spare_node_id"]
    assert s["serve_actors"] >= 4 and s["serve_actors_on_spare_node"] == []  # controller, proxy, 3 deployments
    assert any("ran on the spare node" in line for line in demo_run["stderr"].splitlines())


def test_the_distillation_trained_on_features_logged_at_serve_time(demo_run):
    """Issue 20: a feature drafter's distillation recomputed the target's hidden states that the engine had
    computed while serving; now the demo logs them (traffic.log_features) and the job reads them."""
    s = demo_run["summary"]
    assert s["log_features"] is True
    assert s["logged_feature_problems"] == "none"
    assert 0 < s["logged_feature_records"] == s["train_records"]  # every served record carries its features
    assert s["feature_rows_logged"] > 0 and s["train_seconds"] > 0
    assert list((demo_run["state"] / "traffic").rglob("*.features.arrow"))


def test_every_measured_arm_is_warmed_up_alike(demo_run):
    """Issue 18: "before" used to start cold after the deploy while "after" and the speculation-off arm ran
    warm. Now each arm of a pair is warmed just before the pair's rounds."""
    rows = [json.loads(line) for line in (demo_run["state"] / "requests.jsonl").read_text().splitlines()]
    phases = [r["phase"] for r in rows]
    for arm in ("before", "after", "before_off", "after_off"):
        warm = [i for i, p in enumerate(phases) if p == f"warmup:{arm}"]
        measured = [i for i, p in enumerate(phases) if p == arm]
        assert len(warm) == 4 and max(warm) < min(measured), arm  # the same warm-up, before the arm's rounds
    assert all(r["drafted"] == 0 for r in rows if r["phase"] in ("warmup:before_off", "warmup:after_off"))
    assert {r["drafter_version"] for r in rows if r["phase"] == "warmup:after"} == {"2"}
    warmup = demo_run["summary"]["warmup"]
    assert set(warmup) == {"before", "after", "before_off", "after_off"}
    assert all("4 held-out requests" in text and "8 clients" in text for text in warmup.values())


def test_the_distillation_job_shows_its_progress(demo_run):
    """Issue 19: the demo printed nothing for minutes after "submitted"; now steps, loss and time left."""
    lines = [line for line in demo_run["stderr"].splitlines() if "distillation job" in line]
    assert any("submitted" in line for line in lines)
    assert any("distillation job ended: 30/30 steps" in line and "loss" in line for line in lines), lines[-5:]


def test_only_the_serve_phase_is_logged_and_the_job_trained_on_it(demo_run):
    from draftsmith.traffic import read_traffic

    records = list(read_traffic(demo_run["state"] / "traffic"))
    assert len(records) == demo_run["summary"]["train_requests_logged"] == 40  # before/after opted out
    assert {r.drafter_version for r in records} == {"1"}


def test_mlflow_shows_the_versions_aliases_and_demo_figures(demo_run):
    from draftsmith.registry import DrafterRegistry
    from mlflow import MlflowClient

    url = demo_run["summary"]["mlflow_url"]
    registry = DrafterRegistry(url, model_name="draftsmith-drafter")
    versions = {v.version: v for v in registry.list_versions()}
    assert set(versions) == {"1", "2"}
    assert "champion" in versions["2"].aliases
    assert versions["2"].tags.get("parent_version") == "1"
    assert "heldout_acceptance_rate" in versions["2"].metrics  # the gate's evaluation
    evaluated = json.loads(versions["2"].tags["heldout_engine"])  # ... and the engine settings it measured with
    s = demo_run["summary"]
    assert evaluated["num_speculative_tokens"] == "auto" and evaluated["max_batch_size"] == s["concurrency"]
    assert evaluated["prompt_lookup_max"] == s["engine"]["prompt_lookup_max"]
    assert "served_token_acceptance" in versions["2"].metrics  # what the demo measured while it served
    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("draftsmith-demo")
    run = client.search_runs([experiment.experiment_id])[0]
    assert run.data.metrics["token_acceptance_after_swap"] == pytest.approx(
        demo_run["summary"]["token_acceptance_after_swap"], abs=1e-3)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"timeline.png", "timeline.txt", "requests.jsonl"} <= artifacts


def test_down_stops_exactly_what_the_demo_started(demo_run):
    services = demo_run["services"]
    assert services is not None and services.ray_pgid and services.mlflow_pgid and services.spare_nodes
    subprocess.run([sys.executable, "-m", "draftsmith.cli", "down", "--state-dir", str(demo_run["state"])],
                   check=True, capture_output=True, timeout=180)
    assert not group_alive(services.ray_pgid) and not group_alive(services.mlflow_pgid)
    assert not any(group_alive(node.pgid) for node in services.spare_nodes)
    assert LocalServices.read(demo_run["state"]) is None
