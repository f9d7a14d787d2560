"""DrafterRegistry against a real MLflow server (SQLite, proxied artifacts)."""

import argparse
import io
import uuid

import pytest
import torch
import transformers
from mlflow import MlflowClient

from draftsmith.mlflow_server import start_mlflow_server
from draftsmith.gate import GateDecision
from draftsmith.registry import DrafterRegistry, RegistryError, add_registry_cli

pytestmark = pytest.mark.integration

TAGS = {"target_id": "tiny-target", "target_revision": "r0", "tokenizer_hash": "abc123",
        "traffic_window": "2026-01-01/2026-01-02", "loss": "fkl"}


@pytest.fixture(scope="module")
def drafter_dir(tmp_path_factory, write_fake_drafter):
    return write_fake_drafter(tmp_path_factory.mktemp("drafter"))


@pytest.fixture
def registry(mlflow_server):
    # A fresh model name per test: tests share one server but not state.
    return DrafterRegistry(mlflow_server.url, model_name=f"drafter-{uuid.uuid4().hex[:8]}")


def _register(reg, drafter_dir, acc, parent=None):
    return reg.register_drafter(drafter_dir, experiment="distill", run_name=f"acc-{acc}", tags=TAGS,
                                metrics={"heldout_acceptance_rate": acc}, params={"gamma": 4},
                                parent_version=parent)


def test_register_creates_tagged_version(registry, drafter_dir):
    v = _register(registry, drafter_dir, 0.2)
    assert v.version == "1" and v.aliases == ("challenger",)
    assert {k: v.tags[k] for k in TAGS} == TAGS
    assert v.metrics["heldout_acceptance_rate"] == pytest.approx(0.2)
    assert v.source == f"runs:/{v.run_id}/drafter"
    v2 = _register(registry, drafter_dir, 0.3, parent="1")
    assert v2.version == "2" and v2.tags["parent_version"] == "1"
    listed = registry.list_versions()
    assert [x.version for x in listed] == ["1", "2"]
    assert listed[0].aliases == () and listed[1].aliases == ("challenger",)


def _decision(promoted, champion_version, ratio=1.0):
    return GateDecision(promoted, f"test: ratio {ratio}", confidence=0.95, p_value=0.01 if promoted else 0.4,
                        prompts=24, speed_ratio=ratio, speed_ratio_interval=(ratio - 0.05, ratio + 0.05),
                        challenger_tok_s=30.0 * ratio, champion_tok_s=30.0, challenger_token_acceptance=0.7,
                        champion_token_acceptance=0.6, champion_version=champion_version)


def test_gate_promotes_refuses_and_rolls_back(registry, drafter_dir):
    v1 = _register(registry, drafter_dir, 0.20)
    d = registry.apply_gate(v1.version, GateDecision(True, "no champion yet"))
    assert d.promoted
    assert registry.get_version_by_alias("champion").version == "1"

    v2 = _register(registry, drafter_dir, 0.205)  # accepts more, serves no faster: refused, the test on its tags
    d = registry.apply_gate(v2.version, _decision(False, "1", ratio=0.98))
    assert not d.promoted
    v2 = registry.get_version(v2.version)
    assert v2.tags["gate"] == "rejected" and v2.tags["gate_reason"] == "test: ratio 0.98"
    assert v2.tags["gate_test"].startswith("wilcoxon") and v2.tags["gate_p_value"] == "0.4"
    assert v2.tags["gate_prompts"] == "24" and v2.tags["gate_speed_ratio_interval"] == "[0.9300, 1.0300]"
    assert {"gate_challenger_tok_s", "gate_champion_tok_s", "gate_challenger_token_acceptance",
            "gate_champion_token_acceptance"} <= set(v2.tags)
    assert v2.aliases == ("challenger",)
    assert registry.get_version_by_alias("champion").version == "1"

    v3 = _register(registry, drafter_dir, 0.35)
    stale = registry.apply_gate(v3.version, _decision(True, "2", ratio=1.2))  # measured against v2, not v1
    assert not stale.promoted and "moved" in stale.reason
    assert registry.get_version_by_alias("champion").version == "1"
    d = registry.apply_gate(v3.version, _decision(True, "1", ratio=1.2))
    assert d.promoted
    champ = registry.get_version_by_alias("champion")
    assert champ.version == "3" and champ.tags["previous_champion"] == "1" and champ.tags["gate"] == "promoted"
    assert champ.tags["gate_speed_ratio"] == "1.2"
    assert registry.get_version_by_alias("challenger") is None  # the promoted challenger gave it up

    assert registry.rollback().version == "1"
    assert registry.get_version_by_alias("champion").version == "1"
    assert registry.get_version("3").tags["gate"] == "rolled_back"

    registry.promote("2")  # forced, CLI style
    assert registry.get_version_by_alias("champion").version == "2"
    assert registry.get_version("2").tags["previous_champion"] == "1"


def test_promotion_moves_the_alias_it_is_given(registry, drafter_dir):
    v1 = _register(registry, drafter_dir, 0.2)
    registry.apply_gate(v1.version, GateDecision(True, "first"), alias="production")
    assert registry.get_version_by_alias("production").version == v1.version
    assert registry.get_version_by_alias("champion") is None


def test_download_and_resolve(registry, drafter_dir, tmp_path):
    v = _register(registry, drafter_dir, 0.4)
    registry.promote(v.version)
    assert registry.resolve(f"models:/{registry.model_name}@champion").version == v.version
    assert registry.resolve(f"models:/{registry.model_name}/{v.version}").run_id == v.run_id
    with pytest.raises(RegistryError, match="no version with alias"):
        registry.resolve(f"models:/{registry.model_name}@nope")
    local = registry.download("champion", tmp_path / "dl")
    assert (local / "draftsmith_drafter.json").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(local)
    ref = transformers.AutoModelForCausalLM.from_pretrained(drafter_dir)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids).logits, ref(ids).logits)


def test_failure_midway_leaves_no_version(registry, drafter_dir, monkeypatch):
    _register(registry, drafter_dir, 0.1)
    before = registry.client.search_runs([registry.client.get_experiment_by_name("distill").experiment_id])

    def boom(*a, **k):
        raise ConnectionError("server went away")

    monkeypatch.setattr(registry.client, "set_registered_model_alias", boom)  # fails after the version exists
    with pytest.raises(RegistryError, match="server went away"):
        _register(registry, drafter_dir, 0.2)
    monkeypatch.undo()
    assert [v.version for v in registry.list_versions()] == ["1"]
    after = registry.client.search_runs([registry.client.get_experiment_by_name("distill").experiment_id])
    assert {r.info.run_id for r in after} == {r.info.run_id for r in before}  # the new run was deleted


def test_stopped_server_raises_and_registers_nothing(drafter_dir, tmp_path, monkeypatch):
    state = tmp_path / "mlflow"
    with start_mlflow_server(state) as server:
        reg = DrafterRegistry(server.url, model_name="drafter")
        _register(reg, drafter_dir, 0.1)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's default retries ~4 min
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    with pytest.raises(RegistryError, match="Nothing was registered"):
        _register(reg, drafter_dir, 0.2)
    # Read the stopped server's store directly (faster than restarting it).
    store = MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow.db'}")
    assert [str(v.version) for v in store.search_model_versions("name = 'drafter'")] == ["1"]


def test_cli_list_promote_rollback(registry, drafter_dir, mlflow_server):
    _register(registry, drafter_dir, 0.25)
    _register(registry, drafter_dir, 0.5)
    parser = argparse.ArgumentParser()
    add_registry_cli(parser.add_subparsers(dest="command"))
    common = ["registry", "--tracking-uri", mlflow_server.url, "--model-name", registry.model_name]

    def run(*argv):
        args, out = parser.parse_args([*common, *argv]), io.StringIO()
        assert args.func(args, out=out) == 0
        return out.getvalue()

    run("promote", "1")
    run("promote", "2")
    table = run("list")
    assert "champion" in table and "0.5000" in table and "0.2500" in table
    assert "version 1" in run("rollback")
    assert registry.get_version_by_alias("champion").version == "1"
