"""MLflow server down (issue 7, fault 4): serving goes on with its drafter, registration fails cleanly.

What it does: a real MLflow server (SQLite, its own temp dir, stopped by the test) holds a champion
drafter made from the tiny target. A SpecPair core (the replica's logic, real engine thread, no Ray)
serves from `models:/...@champion`; the server is stopped; the drafter poll must come back within a
bound (the MLflow retry limits the replica gets from `ServeAppConfig.mlflow_env()`), keep the
champion, and requests must still be answered with it. Then a registration whose server dies
mid-upload must fail with a clear RegistryError, quickly, and leave no new version.

What it does not do: the registry's own rollback paths with a live server (test_registry.py), or the
Serve-level drafter swap (test_serve.py).
"""

from __future__ import annotations

import asyncio
import time

import pytest
from mlflow import MlflowClient

from draftsmith import models
from draftsmith.mlflow_server import start_mlflow_server
from draftsmith.registry import DrafterRegistry, RegistryError
from serve.config import ServeAppConfig

pytestmark = pytest.mark.integration

NAME = "faults-drafter"


async def _answer(pair, prompt_ids: list[int]) -> dict:
    """One greedy answer with an explicit draft length: the drafter must really draft (auto may switch an
    untrained one off)."""
    from serve.pair_protocol import GenerateRequest

    final = None
    async for chunk in pair._run(GenerateRequest("r", prompt_ids, max_tokens=8, temperature=0, log=False,
                                               num_speculative_tokens=3)):
        assert chunk.error is None, chunk
        final = chunk.finish
    return {"usage": final.usage, "draftsmith": final.draftsmith}


def test_serving_keeps_its_drafter_and_registration_fails_cleanly_when_mlflow_is_down(tmp_path, monkeypatch):
    from serve.spec_pair import SpecPairImpl

    target = models.tiny_model()
    drafter_dir = models.save_drafter(models.derive_drafter(target, [0]), tmp_path / "drafter", target.tokenizer)
    state = tmp_path / "mlflow"
    server = start_mlflow_server(state)
    try:
        registry = DrafterRegistry(server.url, model_name=NAME)
        v1 = registry.register_drafter(drafter_dir, experiment="faults", run_name="v1", metrics={"m": 0.1})
        registry.promote(v1.version)
        cfg = {"target": "tiny", "drafter": f"models:/{NAME}@champion", "mlflow_tracking_uri": server.url,
               "drafter_poll_interval_s": 3600, "traffic": {"enabled": False}}
        # The replica process gets these through its runtime_env (ServeAppConfig.spec_pair_options).
        for key, value in ServeAppConfig(**cfg).mlflow_env().items():
            monkeypatch.setenv(key, value)
        pair = SpecPairImpl(cfg)
        assert pair.drafter_version == v1.version
        before = asyncio.run(_answer(pair, [1, 2, 3]))
        assert before["draftsmith"]["drafter_version"] == v1.version
    finally:
        server.stop()

    # The poll against the dead server gives up within the configured bound and keeps the champion.
    started = time.monotonic()
    assert pair.check_drafter() == v1.version
    poll_seconds = time.monotonic() - started
    assert poll_seconds < 60, f"a drafter poll against a dead MLflow took {poll_seconds:.0f} s"
    assert pair.refused == {} and pair.loop.alive
    after = asyncio.run(_answer(pair, [1, 2, 3]))
    assert after["draftsmith"]["drafter_version"] == v1.version and after["draftsmith"]["drafted"] > 0
    assert after["usage"] == before["usage"]
    pair.loop.stop()

    # Registration whose server dies mid-way (after the run exists, during the upload): a clear error,
    # within the bound, and no version. Run bookkeeping the server never saw cannot be rolled back.
    server = start_mlflow_server(state)
    try:
        registry = DrafterRegistry(server.url, model_name=NAME)
        real_upload = registry.client.log_artifacts

        def upload_while_the_server_dies(*args, **kwargs):
            server.stop()
            return real_upload(*args, **kwargs)

        monkeypatch.setattr(registry.client, "log_artifacts", upload_while_the_server_dies)
        started = time.monotonic()
        with pytest.raises(RegistryError) as caught:
            registry.register_drafter(drafter_dir, experiment="faults", run_name="v2", metrics={"m": 0.2})
        register_seconds = time.monotonic() - started
    finally:
        server.stop()
    message = str(caught.value)
    assert "Nothing was registered" in message and server.url in message and str(drafter_dir) in message
    assert register_seconds < 90, f"registration against a dead MLflow took {register_seconds:.0f} s"
    store = MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow.db'}")
    assert [str(v.version) for v in store.search_model_versions(f"name = '{NAME}'")] == [v1.version]
    assert str(store.get_model_version_by_alias(NAME, "champion").version) == v1.version
    print(f"fault 4: drafter poll against the dead server returned in {poll_seconds:.1f} s keeping v{v1.version}; "
          f"registration failed in {register_seconds:.1f} s with no new version")
