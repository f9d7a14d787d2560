"""The distillation job end to end on local Ray and a real MLflow server: tiny target, engine traffic."""

import random

import pytest
import torch

from draftsmith.distill import DistillConfig
from draftsmith.models import derive_drafter, load_drafter, tiny_model
from draftsmith.registry import CHALLENGER, DrafterRegistry
from draftsmith.specdec import EngineConfig, Request, SpecEngine, runner_for
from draftsmith.sampling import SamplingParams
from jobs.distill import DistillJobConfig, FaultInjection, deepspeed_config, run_distill
from pipelines.backfill import generate_traffic
from draftsmith.distill_data import build_distill_dataset

pytestmark = pytest.mark.integration

WORDS = "the cat dog runs fast slow red blue green tree house sun moon a an is was".split()


@pytest.fixture(scope="module")
def target():
    return tiny_model()


@pytest.fixture(scope="module")
def traffic(tmp_path_factory, target):
    """Traffic served by the engine (target + an untrained derived drafter), as the Serve logger writes it."""
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(64)]
    uri = str(tmp_path_factory.mktemp("traffic") / "log")
    torch.set_num_threads(1)
    assert generate_traffic(target, derive_drafter(target, "first1"), prompts, uri, max_tokens=32) == 64
    return uri


def token_acceptance(target, drafter, prompts, gamma=4):
    """Greedy held-out token acceptance (alpha) measured by the engine."""
    config = EngineConfig(num_speculative_tokens=gamma, max_batch_size=8, max_model_len=256, topk_logprobs=0)
    engine = SpecEngine(runner_for(target.model), runner_for(None, drafter), config=config,
                        eos_token_ids=target.eos_token_ids)
    results = engine.generate([Request(f"h{i}", p, SamplingParams(max_tokens=32)) for i, p in enumerate(prompts)])
    accepted = sum(r.stats.accepted for r in results)
    compared = sum(r.stats.compared for r in results)
    return accepted / compared


def _config(traffic, tmp_path, mlflow_server, steps, **kw):
    base = dict(traffic_uri=traffic, target="tiny", drafter="derived:first1",
                train=DistillConfig(lr=3e-3, batch_size=8, steps=steps),
                num_workers=2, checkpoint_every=10, log_every=5, state_dir=str(tmp_path / "state"),
                tracking_uri=mlflow_server.url, heldout_fraction=0.15)
    return DistillJobConfig(**{**base, **kw})


def test_distillation_raises_heldout_acceptance_and_registers(ray_cluster, mlflow_server, traffic, target, tmp_path):
    cfg = _config(traffic, tmp_path, mlflow_server, 40, model_name="distill-e2e", run_name="e2e")
    heldout = build_distill_dataset(traffic, target_id="tiny", target_revision=target.revision,
                                    tokenizer_hash=target.tokenizer_hash, heldout_fraction=0.15).heldout
    prompts = heldout["prompt_token_ids"]
    before = token_acceptance(target, derive_drafter(target, "first1"), prompts)
    outcome = run_distill(cfg)
    assert outcome.status == "trained" and outcome.metrics["step"] == 40
    challenger = load_drafter(outcome.drafter_dir, target)
    after = token_acceptance(target, challenger, prompts)
    assert after > before + 0.05, (before, after)
    registry = DrafterRegistry(mlflow_server.url, model_name="distill-e2e")
    version = registry.get_version_by_alias(CHALLENGER)
    assert version is not None and version.version == outcome.registered_version
    assert version.tags["target_id"] == "tiny" and version.tags["loss"] == "fkl"
    assert version.tags["tokenizer_hash"] == target.tokenizer_hash and version.tags["traffic_since"]
    # rank 0 logged the loss curve to the training run
    run_id = version.tags["training_run_id"]
    history = registry.client.get_metric_history(run_id, "loss")
    assert len(history) >= 4 and history[-1].value < history[0].value


def test_feature_drafter_distils_through_the_job(ray_cluster, mlflow_server, traffic, target, tmp_path):
    """An EAGLE-style drafter (feature:<layers>) through Ray Train DDP: the workers load the target for its
    features, the challenger keeps its input map, the registry tags its kind, held-out acceptance rises."""
    cfg = _config(traffic, tmp_path, mlflow_server, 30, drafter="feature:last1", model_name="distill-feature",
                  run_name="feature")
    heldout = build_distill_dataset(traffic, target_id="tiny", target_revision=target.revision,
                                    tokenizer_hash=target.tokenizer_hash, heldout_fraction=0.15).heldout
    prompts = heldout["prompt_token_ids"]
    before = token_acceptance(target, derive_drafter(target, "last1", reads_target_features=True), prompts)
    outcome = run_distill(cfg)
    assert outcome.status == "trained" and outcome.metrics["step"] == 30
    assert outcome.metrics["feature_loss"] > 0
    challenger = load_drafter(outcome.drafter_dir, target)
    assert challenger.reads_target_features
    after = token_acceptance(target, challenger, prompts)
    assert after > before + 0.05, (before, after)
    version = DrafterRegistry(mlflow_server.url, model_name="distill-feature").get_version_by_alias(CHALLENGER)
    assert version.tags["drafter_kind"] == "feature"


def test_deepspeed_zero2_on_cpu_runs_a_few_steps(ray_cluster, traffic, tmp_path):
    # layer-parallel-aware on top: both forwards through the DeepSpeed engine's one forward per step
    cfg = DistillJobConfig(traffic_uri=traffic, target="tiny", drafter="derived:first2",
                           train=DistillConfig(steps=4, lr=3e-3, layer_parallel_groups=2),
                           num_workers=2, strategy="deepspeed", zero_stage=2, checkpoint_every=2, log_every=2,
                           state_dir=str(tmp_path / "state"), run_name="ds")
    assert deepspeed_config(cfg)["zero_optimization"] == {"stage": 2}
    outcome = run_distill(cfg)
    assert outcome.metrics["step"] == 4 and outcome.registered_version is None
    assert 0.0 <= outcome.metrics["top1_match_layer_parallel"] <= 1.0
    assert (outcome.drafter_dir / "model.safetensors").exists()


def test_resume_after_a_killed_worker(ray_cluster, mlflow_server, traffic, target, tmp_path):
    marker = tmp_path / "died"
    cfg = _config(traffic, tmp_path, mlflow_server, 12, checkpoint_every=5, max_failures=1,
                  model_name="distill-resume", run_name="resume",
                  fault_injection=FaultInjection(step=7, marker=str(marker), rank=1))
    outcome = run_distill(cfg)
    assert marker.exists()  # the worker really died once
    assert outcome.metrics["step"] == 12
    assert outcome.metrics["resumed_from_step"] == 5  # the checkpoint before the failure
    versions = DrafterRegistry(mlflow_server.url, model_name="distill-resume").list_versions()
    assert [v.version for v in versions] == [outcome.registered_version]


def test_deferred_when_serving_is_busy(ray_cluster, traffic, tmp_path):
    from serve.load import serving_load

    assert serving_load() == 0.0  # Serve is not running in this cluster
    cfg = DistillJobConfig(traffic_uri=traffic, target="tiny", drafter="derived:first1",
                           state_dir=str(tmp_path / "state"), only_when_serving_load_below=1.0)
    outcome = run_distill(cfg, load_probe=lambda: 5.0)
    assert outcome.status == "deferred" and outcome.drafter_dir is None
    assert outcome.metrics == {"serving_load": 5.0}
