"""Model loading and drafters: derivation, trimmed heads, save/load round trips, tokenizer refusal."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from draftsmith.models import (
    ModelLoadError,
    derive_drafter,
    frequent_token_ids,
    load_drafter,
    parse_layer_spec,
    save_drafter,
    tiny_model,
)
from draftsmith.tokenization import IncompatibleTokenizerError, build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def target():
    return tiny_model()


def test_import_platform_is_the_standard_library_from_the_repo_root():
    code = "import platform, draftsmith; print(platform.__file__); print(platform.python_version())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "site-packages" not in out.splitlines()[0] and "/platform/" not in out.splitlines()[0].replace("platform.py", "")
    assert not (REPO / "platform" / "__init__.py").exists()


def test_parse_layer_spec():
    assert parse_layer_spec("first2+last1", 30) == [0, 1, 29]
    assert parse_layer_spec("0,5,7", 30) == [0, 5, 7]
    with pytest.raises(ValueError, match="0..29"):
        parse_layer_spec("last31", 30)


def test_derived_drafter_copies_the_chosen_layers(target):
    drafter = derive_drafter(target, [1])
    assert drafter.num_layers == 1
    torch.testing.assert_close(drafter.model.model.layers[0].mlp.up_proj.weight, target.model.model.layers[1].mlp.up_proj.weight)
    torch.testing.assert_close(drafter.model.model.embed_tokens.weight, target.model.model.embed_tokens.weight)
    assert drafter.meta["layers"] == [1] and drafter.meta["tokenizer_hash"] == target.tokenizer_hash


def test_save_and_load_round_trip_with_trimmed_head(target, tmp_path):
    vocab = frequent_token_ids([[5, 5, 6], [7, 5]], 3, always=[2])
    assert vocab.tolist() == [2, 5, 6]
    drafter = derive_drafter(target, [0], draft_vocab_ids=vocab)
    save_drafter(drafter, tmp_path / "d", tokenizer=target.tokenizer)
    meta = json.loads((tmp_path / "d" / "draftsmith_drafter.json").read_text())
    assert meta["draft_vocab_size"] == 3
    loaded = load_drafter(tmp_path / "d", target, version="7")
    assert loaded.version == "7" and loaded.head_token_ids.tolist() == [2, 5, 6]
    torch.testing.assert_close(loaded.head_weight, drafter.head_weight)
    # The directory is an ordinary HF model directory.
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "d").config.num_hidden_layers == 1


def test_feature_drafter_round_trip_and_refusal(target, tmp_path):
    from draftsmith.models import FEATURE_FC_FILE, derive_from_spec
    from safetensors.torch import save_file

    drafter = derive_from_spec(target, "feature:last1")
    hidden = target.model.config.hidden_size
    assert drafter.reads_target_features and drafter.feature_fc.shape == (hidden, 2 * hidden)
    assert drafter.meta["kind"] == "feature" and drafter.meta["layers"] == [1]
    assert not derive_from_spec(target, "derived:last1").reads_target_features
    with pytest.raises(ValueError, match="derived:<layers> or feature:<layers>"):
        derive_from_spec(target, "eagle:last1")
    save_drafter(drafter, tmp_path / "f", tokenizer=target.tokenizer)
    loaded = load_drafter(tmp_path / "f", target)
    torch.testing.assert_close(loaded.feature_fc, drafter.feature_fc)
    save_file({"weight": torch.zeros(hidden, hidden)}, str(tmp_path / "f" / FEATURE_FC_FILE))
    with pytest.raises(ModelLoadError, match=f"{FEATURE_FC_FILE}.*need \\({hidden}, {2 * hidden}\\)"):
        load_drafter(tmp_path / "f", target)


def test_incompatible_tokenizer_is_refused_with_the_difference(target, tmp_path):
    other = build_tiny_tokenizer()
    vocab = other.get_vocab()
    renamed = {tok: i for tok, i in vocab.items()}
    # Same size, one token renamed: build a different tokenizer from the same vocabulary.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    key = next(t for t, i in renamed.items() if i == 50)
    renamed["XX"] = renamed.pop(key)
    raw = Tokenizer(models.BPE(vocab=renamed, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    odd = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    save_drafter(derive_drafter(target, [0]), tmp_path / "odd", tokenizer=odd)
    with pytest.raises(IncompatibleTokenizerError, match="token id 50"):
        load_drafter(tmp_path / "odd", target)


def test_missing_or_pickled_weights_are_refused(target, tmp_path):
    drafter_dir = save_drafter(derive_drafter(target, [0]), tmp_path / "d", tokenizer=target.tokenizer)
    (drafter_dir / "model.safetensors").rename(drafter_dir / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle-based weights are refused"):
        load_drafter(drafter_dir, target)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_drafter(tmp_path / "nothing-here", target)
