"""Integration fixtures. MLflow: one real tracking server on SQLite in a temp dir per session."""

import json
from pathlib import Path

import pytest

from draftsmith.mlflow_server import start_mlflow_server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real local MLflow server (SQLite backend, proxied artifacts); yields the handle (``.url``)."""
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture(scope="session")
def write_fake_drafter():
    """Writes a 1-layer random Llama as a drafter directory (with draftsmith_drafter.json) for registry tests."""

    def write(path: Path) -> Path:
        import torch
        import transformers

        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).save_pretrained(path)
        (Path(path) / "draftsmith_drafter.json").write_text(json.dumps(
            {"kind": "external", "target_id": "tiny-target", "target_revision": "r0", "tokenizer_hash": "abc123",
             "layers": None, "draft_vocab_size": None, "parent_version": None}))
        return Path(path)

    return write
