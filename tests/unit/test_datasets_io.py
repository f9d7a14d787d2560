"""Prompt sources: the cut ShareGPT file, the train/held-out split, chat JSONL parsing."""

import json
import logging

import pytest

from draftsmith.datasets_io import (
    first_prompt_messages,
    load_prompt_source,
    load_sharegpt,
    read_chat_jsonl,
    sharegpt_conversations,
    sharegpt_path,
    sharegpt_split,
    to_chat_messages,
    user_turn_prompts,
)


def record(i, human="hi", gpt="hello"):
    return {"id": f"c{i}_0", "conversations": [{"from": "human", "value": f"{human} {i}"},
                                                {"from": "gpt", "value": gpt}]}


def test_installed_sharegpt_file_is_read_up_to_the_cut():
    load = load_sharegpt()
    assert load.complete_records > 17000 and len(load.conversations) == load.complete_records
    assert load.truncated_at_byte is not None and 0 < load.truncated_at_byte < load.file_size
    assert load.path == str(sharegpt_path().resolve())
    first = load.conversations[0]
    assert isinstance(first["id"], str) and first["conversations"][0]["from"] in ("human", "gpt", "system")
    assert load_sharegpt() is load  # cached within the process
    assert sharegpt_conversations() is load.conversations
    # Everything before the reported offset is a complete JSON array prefix.
    head = sharegpt_path().read_bytes()[: load.truncated_at_byte].decode().rstrip().rstrip(",")
    assert len(json.loads(head + "]")) == load.complete_records


def test_synthetic_cut_array(tmp_path, caplog):
    complete = [record(i) for i in range(3)]
    text = "[\n" + ",\n".join(json.dumps(r, indent=2) for r in complete) + ",\n"
    cut_at = len(text.encode())
    text += json.dumps(record(3, human="héllo wörld"), indent=2)[:40]  # cut mid-record
    path = tmp_path / "cut.json"
    path.write_text(text, encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        load = load_sharegpt(path)
    assert load.conversations == complete and load.complete_records == 3
    assert load.truncated_at_byte == cut_at
    assert str(path.name) in caplog.text and str(cut_at) in caplog.text


def test_synthetic_intact_and_multibyte_cut(tmp_path):
    intact = tmp_path / "ok.json"
    intact.write_text(json.dumps([record(0), record(1)]), encoding="utf-8")
    assert load_sharegpt(intact).truncated_at_byte is None
    assert load_sharegpt(intact).complete_records == 2
    # A cut inside a multi-byte character must not crash the decoder.
    data = json.dumps([record(0), record(1, human="日本語")], ensure_ascii=False).encode()
    cut = tmp_path / "mb.json"
    cut.write_bytes(data[: data.index("日".encode()) + 1])
    load = load_sharegpt(cut)
    assert load.complete_records == 1 and load.truncated_at_byte == data.index(b'{"id": "c1_0"')


def test_split_is_disjoint_and_deterministic():
    train, held = sharegpt_split("train", None), sharegpt_split("heldout", None)
    assert len(held) > 1000 and len(train) > 10 * 0.8 * len(held)
    train_ids, held_ids = {r["id"] for r in train}, {r["id"] for r in held}
    assert not train_ids & held_ids
    # Parts of one long chat ("x_0", "x_1") stay on one side; first prompts never repeat across sides.
    assert not {i.rsplit("_", 1)[0] for i in train_ids} & {i.rsplit("_", 1)[0] for i in held_ids}
    held_prompts = {first_prompt_messages(r)[-1]["content"] for r in held}
    assert not any(first_prompt_messages(r)[-1]["content"] in held_prompts for r in train)
    # Deterministic; the seed changes only the order, not the membership.
    first = [r["id"] for r in sharegpt_split("heldout", 50)]
    assert first == [r["id"] for r in sharegpt_split("heldout", 50)]
    other = sharegpt_split("heldout", None, seed=1)
    assert {r["id"] for r in other} == held_ids and [r["id"] for r in other] != [r["id"] for r in held]
    with pytest.raises(ValueError, match="split"):
        sharegpt_split("test", 1)


def test_chat_messages_conversion():
    conv = {"id": "x", "conversations": [
        {"from": "system", "value": "be nice"},
        {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
        {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"},
    ]}
    msgs = to_chat_messages(conv)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert to_chat_messages(conv["conversations"], max_turns=2) == msgs[:3]
    assert first_prompt_messages(conv) == msgs[:2]
    assert first_prompt_messages({"conversations": [{"from": "gpt", "value": "x"}]}) == []


def test_user_turn_prompts_give_each_user_turn_with_its_history():
    conv = {"id": "x", "conversations": [
        {"from": "system", "value": "be nice"}, {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
        {"from": "bot?", "value": "skipped"}, {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"},
        {"from": "human", "value": "q3"},
    ]}
    msgs = to_chat_messages(conv)
    prompts = user_turn_prompts(conv)
    assert prompts == [msgs[:2], msgs[:4], msgs[:6]] and prompts[1][-1] == {"role": "user", "content": "q2"}
    assert user_turn_prompts(conv, 2) == prompts[:2] and user_turn_prompts(conv["conversations"], 1) == prompts[:1]
    # chat messages (an OpenAI-style JSONL log) work the same way
    chat = [dict(m) for m in msgs]
    assert user_turn_prompts(chat, 2) == prompts[:2]
    assert first_prompt_messages(chat) == msgs[:2]
    assert user_turn_prompts({"conversations": [{"from": "gpt", "value": "x"}]}) == []
    with pytest.raises(ValueError, match="max_user_turns"):
        user_turn_prompts(conv, 0)


def test_load_prompt_source_sharegpt_uses_heldout_first_prompts():
    prompts = load_prompt_source("sharegpt", 5)
    assert len(prompts) == 5
    for msgs in prompts:
        assert msgs[-1]["role"] == "user" and msgs[-1]["content"].strip()
    held = sharegpt_split("heldout", None)
    assert prompts[0] == first_prompt_messages(held[0])
    assert load_prompt_source("sharegpt", 3, split="train")[0] != prompts[0]


def test_load_prompt_source_jsonl(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "What is 2+2?"},
        {"prompt": "   "},  # blank: skipped
        {"messages": [{"role": "system", "content": "terse"}, {"role": "user", "content": "Hi"}]},
        {"prompt": "third"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    got = load_prompt_source(f"jsonl:{path}", 10)
    assert got == [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "terse"}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "third"}],
    ]
    assert len(load_prompt_source(f"jsonl:{path}", 2)) == 2


BAD_LINES = ['{"prompt": "ok"', '{"text": "x"}', '{"messages": [{"role": "bot", "content": "x"}]}',
             '["a list"]', '{"prompt": 3}']


@pytest.mark.parametrize("bad", BAD_LINES)
def test_jsonl_errors_name_path_and_line(tmp_path, bad):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n\n' + bad + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:3: "):
        load_prompt_source(f"jsonl:{path}", 10)


def test_prompt_source_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown prompt source"):
        load_prompt_source("parquet:x", 1)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_prompt_source(f"jsonl:{tmp_path / 'missing.jsonl'}", 1)


def test_read_chat_jsonl(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
        + "\n"
        + json.dumps(record(0)) + "\n",
        encoding="utf-8",
    )
    assert list(read_chat_jsonl(path)) == [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [{"role": "user", "content": "hi 0"}, {"role": "assistant", "content": "hello"}],
    ]
    path.write_text(json.dumps({"prompt": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:1: expected one of the keys"):
        list(read_chat_jsonl(path))
