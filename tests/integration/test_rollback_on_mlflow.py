"""Automatic rollback against a real MLflow server: a good v1 is champion, a deliberately bad v2 (random weights) is
promoted over it, the traffic log (written by the real TrafficWriter, as the Serve logger writes it) shows v2's
served token acceptance far below v1's, and ONE trigger poll moves the champion alias back to v1, tags both
versions, records the rollback in its state file, and the registry source a replica's drafter watcher polls
resolves to v1 again. No Ray, no Serve: the Jobs API is never called (nothing is due to distill)."""

import datetime as dt
import uuid

import pytest

from draftsmith.registry import DrafterRegistry
from draftsmith.traffic import TrafficRecord, TrafficWriter
from pipelines.trigger import DistillTrigger, TriggerConfig

pytestmark = pytest.mark.integration

UTC = dt.timezone.utc


def _served(i, version, at, *, accepted, compared):
    """A served greedy record as serve/logger.record_from_result builds it (compared 0: the policy drafted nothing)."""
    n_out = 24
    return TrafficRecord(
        request_id=f"v{version}-{i}", created_at=at, source="served", target_id="tiny-target", target_revision="r0",
        tokenizer_hash="abc123", drafter_version=version, temperature=0.0, max_tokens=n_out,
        num_speculative_tokens=4 if compared else 0, prompt_token_ids=[5, 6, 7], output_token_ids=[8] * n_out,
        target_topk_ids=[[8]] * n_out, target_topk_logprobs=[[-0.1]] * n_out, accept_mask=[False] * n_out,
        drafted=compared + 4 if compared else 0, accepted=accepted, compared=compared, finish_reason="length",
        verify_steps=10, policy_off_steps=0 if compared else 10, proposer="drafter" if compared else "none")


class NoJobs:
    def __getattr__(self, name):
        raise AssertionError(f"the Jobs API was called ({name}): nothing was due")


def test_one_poll_rolls_a_bad_promotion_back(mlflow_server, write_fake_drafter, tmp_path):
    """Detects: the trigger not rolling back a collapsed promotion, moving the wrong alias, not tagging both
    versions, rolling back twice, or leaving the replicas' registry source on the bad version."""
    registry = DrafterRegistry(mlflow_server.url, model_name=f"rollback-{uuid.uuid4().hex[:8]}")
    good = registry.register_drafter(write_fake_drafter(tmp_path / "good"), experiment="rollback-test",
                                     run_name="good", metrics={"heldout_token_acceptance_greedy": 0.60})
    registry.promote(good.version, reason="first champion")
    traffic = tmp_path / "traffic"
    start = dt.datetime.now(UTC)
    with TrafficWriter(traffic) as writer:  # v1 serving well before the promotion
        for i in range(60):
            writer.add(_served(i, good.version, start - dt.timedelta(minutes=30) + dt.timedelta(seconds=i),
                               accepted=13, compared=20))

    import torch
    import transformers

    bad_dir = write_fake_drafter(tmp_path / "bad")
    torch.manual_seed(1234)  # a deliberately bad drafter: fresh random weights
    transformers.LlamaForCausalLM.from_pretrained(bad_dir).apply(
        lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None).save_pretrained(bad_dir)
    bad = registry.register_drafter(bad_dir, experiment="rollback-test", run_name="bad",
                                    metrics={"heldout_token_acceptance_greedy": 0.62})  # evaluated fine, serves badly
    registry.promote(bad.version, reason="forced over the gate")
    promoted_at = dt.datetime.fromisoformat(registry.get_version(bad.version).tags["promoted_at"])
    assert registry.get_version(bad.version).tags["previous_champion"] == good.version
    with TrafficWriter(traffic) as writer:  # what the replicas logged with v2: collapsed acceptance
        for i in range(60):
            writer.add(_served(i, bad.version, promoted_at + dt.timedelta(seconds=1 + i), accepted=3, compared=20))
        for i in range(60, 200):  # requests the policy switched speculation off for: not rejections
            writer.add(_served(i, bad.version, promoted_at + dt.timedelta(seconds=1 + i), accepted=0, compared=0))

    cfg = TriggerConfig(tracking_uri=registry.tracking_uri, model_name=registry.model_name,
                        traffic_uri=str(traffic), state_file=str(tmp_path / "trigger.json"), min_new_records=100_000,
                        max_serving_load=None, ray_cluster_address=None, rollback_margin=0.1,
                        rollback_min_requests=50)
    trigger = DistillTrigger(cfg, client_factory=NoJobs)
    outcome = trigger.poll()

    assert outcome.rollback is not None and outcome.rollback.rollback, outcome.rollback
    assert outcome.rollback.requests == 60  # the 140 policy-off requests are neither requests nor rejections
    assert outcome.rollback.token_acceptance == pytest.approx(3 / 20)
    assert outcome.rollback.reference == pytest.approx(13 / 20)  # v1's SERVED figure, not its evaluated 0.60
    assert outcome.rolled_back_to == good.version and not outcome.decision.submit
    assert registry.get_version_by_alias("champion").version == good.version
    bad_tags, good_tags = registry.get_version(bad.version).tags, registry.get_version(good.version).tags
    assert bad_tags["gate"] == "rolled_back" and bad_tags["rolled_back_to"] == good.version
    assert bad_tags["rollback_reason"] == outcome.rollback.reason and "0.150" in bad_tags["rollback_reason"]
    assert good_tags["restored_after"] == bad.version and good_tags["rollback_reason"] == outcome.rollback.reason
    assert dt.datetime.fromisoformat(good_tags["restored_at"]) >= promoted_at
    assert trigger.state.read()["rollbacks"][bad.version]["restored"] == good.version

    # What a replica's drafter watcher polls (serve/drafter_watcher.py): the alias now resolves to v1 again.
    from serve.drafter_source import make_source

    source = make_source(f"models:/{registry.model_name}@champion", tracking_uri=registry.tracking_uri,
                         cache_dir=tmp_path / "cache")
    assert source.current().version == good.version

    again = DistillTrigger(cfg, client_factory=NoJobs).poll()  # a restarted trigger: nothing more to do
    assert again.rollback is None and registry.get_version_by_alias("champion").version == good.version
