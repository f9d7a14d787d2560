"""No secret reaches MLflow: params and tags named like credentials are redacted at registration.

What it does: drives `DrafterRegistry.register_drafter` against a recording stand-in for the MLflow
client (a mock, to isolate what the registry sends) and checks that a token in the params or tags is
replaced by `[redacted]` while ordinary values pass through.

What it does not do: talk to a server (tests/integration/test_registry.py does).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

from draftsmith.registry import REDACTED, DrafterRegistry, redact_secrets

SECRET = "sk-live-0123456789"


class RecordingClient:
    def __init__(self):
        self.sent: list = []

    def get_experiment_by_name(self, name):
        return SimpleNamespace(experiment_id="1")

    def create_run(self, experiment_id, run_name, tags):
        self.sent.append(("run tags", tags))
        return SimpleNamespace(info=SimpleNamespace(run_id="run1"))

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.sent.append(("params", {p.key: p.value for p in params}))
        self.sent.append(("tags", {t.key: t.value for t in tags}))

    def log_artifacts(self, *args):
        pass

    def set_terminated(self, run_id):
        pass

    def create_registered_model(self, name):
        pass

    def create_model_version(self, name, source, run_id, tags):
        self.sent.append(("version tags", tags))
        return SimpleNamespace(version="1")

    def set_registered_model_alias(self, *args):
        pass

    def get_model_version(self, name, version):
        return SimpleNamespace(name=name, version=version, aliases=["challenger"], tags={}, source="runs:/run1/drafter",
                               run_id="run1", creation_timestamp=0)

    def get_run(self, run_id):
        return SimpleNamespace(data=SimpleNamespace(metrics={}))


def test_secret_params_and_tags_never_reach_mlflow(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    client = RecordingClient()
    registry = DrafterRegistry("http://unused", client=client)
    registry.register_drafter(tmp_path, experiment="e", run_name="r",
                              params={"lr": 0.001, "auth_token": SECRET, "MLFLOW_TRACKING_PASSWORD": SECRET,
                                      "hf_api_key": SECRET, "tokens_per_step": 4},
                              tags={"target_id": "tiny", "bearer_token": SECRET})
    sent = json.dumps(client.sent)
    assert SECRET not in sent
    params = dict(client.sent)["params"]
    assert params["lr"] == "0.001" and params["auth_token"] == REDACTED and params["hf_api_key"] == REDACTED
    assert dict(client.sent)["version tags"]["target_id"] == "tiny"
    assert params["tokens_per_step"] == "4" and params["MLFLOW_TRACKING_PASSWORD"] == REDACTED  # name parts only
    assert redact_secrets({"auth_token": None, "x": SECRET}) == {"auth_token": None, "x": SECRET}
