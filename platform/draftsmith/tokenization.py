"""Tokenizer identity: fingerprints, the target/drafter compatibility check, and the tiny test tokenizer.

A drafter proposes token ids that the target verifies, so both must map ids to the same strings.
This module decides that (by a fingerprint of the vocabulary and special tokens) and says what
differs when they do not. It does not load tokenizers from a hub: callers pass loaded ones.
"""

from __future__ import annotations

import hashlib
import json
import logging

logger = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class IncompatibleTokenizerError(ValueError):
    """The drafter's tokenizer does not map ids to the same tokens as the target's."""


def _special_tokens(tokenizer) -> dict[str, str]:
    specials = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tokenizer, name, None)
        specials[name] = str(value) if value is not None else ""
    return specials


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable id (16 hex chars of sha256) of a tokenizer's vocabulary and special tokens.

    Works for any transformers tokenizer (`get_vocab()` + `special_tokens_map`) and
    for a raw `tokenizers.Tokenizer`. Two tokenizers with the same fingerprint map
    every token to the same id, so their traffic can be mixed.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    if hasattr(tokenizer, "special_tokens_map"):
        specials = {k: v if isinstance(v, str) else sorted(map(str, v))
                    for k, v in tokenizer.special_tokens_map.items()}
    elif hasattr(tokenizer, "get_added_tokens_decoder"):  # tokenizers.Tokenizer
        specials = {"special": sorted(t.content for t in tokenizer.get_added_tokens_decoder().values()
                                      if t.special)}
    else:
        specials = {}
    payload = json.dumps({"vocab": vocab, "special": specials}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def check_tokenizers_compatible(target_tokenizer, drafter_tokenizer, *, drafter_name: str = "drafter") -> None:
    """Raise IncompatibleTokenizerError, naming the first difference, unless both tokenizers agree."""
    if tokenizer_fingerprint(target_tokenizer) == tokenizer_fingerprint(drafter_tokenizer):
        return
    target_vocab, drafter_vocab = target_tokenizer.get_vocab(), drafter_tokenizer.get_vocab()
    if len(target_vocab) != len(drafter_vocab):
        detail = f"vocabulary sizes differ: target {len(target_vocab)}, {drafter_name} {len(drafter_vocab)}"
    else:
        by_id_target = {i: t for t, i in target_vocab.items()}
        by_id_drafter = {i: t for t, i in drafter_vocab.items()}
        diff = next((i for i in sorted(by_id_target) if by_id_target[i] != by_id_drafter.get(i)), None)
        if diff is not None:
            detail = f"token id {diff} is {by_id_target[diff]!r} for the target but {by_id_drafter.get(diff)!r}"
        else:
            detail = f"special tokens differ: {_special_tokens(target_tokenizer)} vs {_special_tokens(drafter_tokenizer)}"
    raise IncompatibleTokenizerError(
        f"The {drafter_name}'s tokenizer is incompatible with the target's ({detail}). A drafter must use "
        "the target's tokenizer: derive one from the target (`draftsmith drafter derive`) or pick a model "
        "of the same family."
    )


def build_tiny_tokenizer():
    """A byte-level tokenizer with 256 byte tokens plus ChatML specials: real encode/decode, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
