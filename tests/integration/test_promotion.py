"""Evaluation, the promotion gate and the trigger against a real MLflow server and a real local Ray cluster."""

import datetime as dt
import json
import sys
import uuid

import pytest
import yaml

from draftsmith.engine_config import EngineConfig
from draftsmith.gate import TEST_NAME
from draftsmith.models import derive_drafter, save_drafter, tiny_model
from draftsmith.registry import DrafterRegistry
from jobs.evaluate import PLOT_NAME, REPORT_NAME, EvaluateConfig, evaluate_and_gate
from pipelines.trigger import DistillTrigger, TriggerConfig
from slow_drafters import slow_drafters  # tests/slow_drafters.py (tests/ is on sys.path: conftest.py lives there)

pytestmark = pytest.mark.integration

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def drafter_dirs(tmp_path_factory):
    """Tiny drafters for the tiny target: layer 0 only, both layers (= the target), an unrelated random model."""
    root = tmp_path_factory.mktemp("drafters")
    target = tiny_model()
    out = {}
    for name, drafter in {"layer0": derive_drafter(target, [0]), "full": derive_drafter(target, [0, 1])}.items():
        out[name] = save_drafter(drafter, root / name, target.tokenizer)
    random = derive_drafter(target, [0, 1])
    random.model = tiny_model(seed=7).model
    random.meta["kind"] = "external"
    out["random"] = save_drafter(random, root / "random", target.tokenizer)
    return out


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "heldout.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Tell me about topic {i}, please."}) + "\n" for i in range(6)))
    return path


@pytest.fixture(scope="module")
def registry(mlflow_server):
    return DrafterRegistry(mlflow_server.url, model_name=f"promo-{uuid.uuid4().hex[:8]}")


def _config(registry, prompts_file, challenger, **kw):
    return EvaluateConfig(tracking_uri=registry.tracking_uri, model_name=registry.model_name, target="tiny",
                          challenger=challenger, prompts=f"jsonl:{prompts_file}", num_prompts=6, max_new_tokens=12,
                          max_prompt_tokens=48, temperatures=[0.0, 1.0],
                          engine=EngineConfig(num_speculative_tokens=4, max_batch_size=4), **kw)


def _register(registry, path, name, **tags):
    return registry.register_drafter(path, experiment="promotion-test", run_name=name,
                                     tags={"target_id": "tiny", "loss": "fkl", **tags})


@pytest.fixture
def slowed(monkeypatch):
    """Registry versions whose drafter runner sleeps on every forward (version -> seconds): a costlier drafter."""
    return slow_drafters(monkeypatch)


def test_gate_refuses_a_slower_drafter_that_accepts_more_and_promotes_a_faster_one(
        registry, drafter_dirs, prompts_file, slowed):
    first = _register(registry, drafter_dirs["layer0"], "layer0")
    registry.promote(first.version, reason="initial")

    # The target's own layers: accepts every token, but (slowed here) serves slower than the champion.
    costly = _register(registry, drafter_dirs["full"], "full")
    slowed[costly.version] = 0.02
    report: dict = {}
    decision = evaluate_and_gate(_config(registry, prompts_file, "challenger"), report_out=report)
    assert not decision.promoted, decision.reason
    assert decision.challenger_token_acceptance == 1.0 > decision.champion_token_acceptance
    assert "accepts more tokens but serves slower" in decision.reason
    assert registry.get_version_by_alias("champion").version == first.version
    v = registry.get_version(costly.version)
    assert v.tags["gate"] == "rejected" and "serves slower" in v.tags["gate_reason"]
    assert v.tags["gate_test"] == TEST_NAME and v.tags["gate_prompts"] == "6"
    assert v.tags["gate_champion_version"] == first.version and float(v.tags["gate_speed_ratio"]) < 1
    for key in ("gate_p_value", "gate_confidence", "gate_speed_ratio_interval", "gate_challenger_tok_s",
                "gate_champion_tok_s", "gate_challenger_token_acceptance", "gate_champion_token_acceptance"):
        assert key in v.tags, key
    # Metrics on both runs, the PNG and the JSON report on the challenger's run.
    for key in ("heldout_acceptance_rate", "heldout_token_acceptance", "heldout_mean_accepted_length",
                "heldout_acceptance_rate_greedy", "heldout_acceptance_rate_sampled",
                "heldout_token_acceptance_sampled", "heldout_mean_accepted_length_greedy"):
        assert key in v.metrics, key
    assert v.metrics["heldout_token_acceptance_greedy"] == 1.0
    assert "heldout_acceptance_rate" in registry.get_version(first.version).metrics
    files = {f.path for f in registry.client.list_artifacts(v.run_id, "evaluation")}
    assert files == {f"evaluation/{PLOT_NAME}", f"evaluation/{REPORT_NAME}"}
    local = registry.client.download_artifacts(v.run_id, f"evaluation/{PLOT_NAME}")
    assert open(local, "rb").read(4) == b"\x89PNG"
    assert len(report["paired"].tok_s[f"challenger v{costly.version}"]) == 6

    # The same drafter as the champion, while the champion (slowed here) costs more: promoted.
    faster = _register(registry, drafter_dirs["layer0"], "layer0-again")
    slowed[first.version] = 0.004
    decision = evaluate_and_gate(_config(registry, prompts_file, faster.version))
    assert decision.promoted and decision.p_value < 0.05 and decision.speed_ratio > 1, decision.reason
    assert registry.get_version_by_alias("champion").version == faster.version
    assert registry.get_version(faster.version).tags["gate_champion_version"] == first.version


def test_traffic_prompts_come_from_the_challengers_heldout_window(registry, drafter_dirs, tmp_path):
    from draftsmith.traffic import TrafficRecord, TrafficWriter

    target = tiny_model()
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    traffic = tmp_path / "traffic"
    with TrafficWriter(traffic) as writer:
        for i, prompt in enumerate([[5, 6, 7], [8, 9], [5, 6, 7], [5, 6, 7, 1, 40], [50, 51], [60, 61, 62]]):
            writer.add(TrafficRecord(
                request_id=f"r{i}", created_at=t0 + dt.timedelta(minutes=i), target_id="tiny",
                target_revision=target.revision, tokenizer_hash=target.tokenizer_hash, temperature=0.0,
                max_tokens=4, prompt_token_ids=prompt, output_token_ids=[i + 1], target_topk_ids=[[i + 1]],
                target_topk_logprobs=[[-0.1]], accept_mask=[False], finish_reason="length"))
    config = dict(prompts="traffic", traffic_uri=str(traffic), gate="skip", temperatures=[0.0])
    untagged = _register(registry, drafter_dirs["layer0"], "untagged")
    with pytest.raises(ValueError, match="heldout_since"):
        evaluate_and_gate(_config(registry, "unused", untagged.version).model_copy(update=config))
    tagged = _register(registry, drafter_dirs["layer0"], "tagged",
                       heldout_since=(t0 + dt.timedelta(minutes=2)).isoformat())
    report: dict = {}
    evaluate_and_gate(_config(registry, "unused", tagged.version).model_copy(update=config), report_out=report)
    assert report["report"].num_prompts == 2  # [5, 6, 7] and its next turn were trained on: left out


def _dashboard_url(ray):
    node = ray._private.worker._global_node
    url = node.webui_url or node.address_info.get("webui_url")
    return url if url.startswith("http") else f"http://{url}"


def test_trigger_submits_a_real_job_that_succeeds(ray_cluster, registry, drafter_dirs, prompts_file, tmp_path):
    from draftsmith.traffic import TrafficRecord, TrafficWriter

    target = tiny_model()
    now = dt.datetime.now(dt.timezone.utc)
    traffic = tmp_path / "traffic"
    with TrafficWriter(traffic) as writer:
        for i in range(5):
            writer.add(TrafficRecord(
                request_id=f"r{i}", created_at=now - dt.timedelta(minutes=i), target_id="tiny",
                target_revision=target.revision, tokenizer_hash=target.tokenizer_hash, temperature=0.0,
                max_tokens=4, prompt_token_ids=[5, 6, 7], output_token_ids=[8], target_topk_ids=[[8]],
                target_topk_logprobs=[[-0.1]], accept_mask=[False], finish_reason="length"))
    challenger = _register(registry, drafter_dirs["layer0"], "trigger-challenger")
    evaluate_yaml = tmp_path / "evaluate.yaml"
    evaluate_yaml.write_text(yaml.safe_dump(_config(
        registry, prompts_file, challenger.version, gate="skip").model_dump(mode="json") | {"temperatures": [0.0]}))
    cfg = TriggerConfig(ray_address=_dashboard_url(ray_cluster), traffic_uri=str(traffic), target_id="tiny",
                        tracking_uri=registry.tracking_uri, model_name=registry.model_name,
                        state_file=str(tmp_path / "trigger.json"), min_new_records=5, max_serving_load=None,
                        python=sys.executable, distill_config=None, evaluate_config=str(evaluate_yaml),
                        entrypoint_num_cpus=1, env_vars=OFFLINE)
    trigger = DistillTrigger(cfg)
    decision = trigger.decide()
    assert decision.submit, decision.reason
    job_id = trigger.maybe_submit()
    assert job_id
    outcome = trigger.wait(job_id, timeout_s=150, poll_s=1.0)
    assert outcome.status == "SUCCEEDED", outcome.logs_tail
    # The job logged its evaluation on the challenger's run; the trigger now waits for new records.
    assert "heldout_acceptance_rate" in registry.get_version(challenger.version).metrics
    again = trigger.decide()
    assert not again.submit and "next allowed" in again.reason
    assert again.readings.records_since_last == 0
