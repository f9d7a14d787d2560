"""Incremental detokenization: linear cost on long outputs, same text, deltas and stop strings as a full decode."""

import random

import pytest

from draftsmith.detokenize import IncrementalDetokenizer
from draftsmith.models import derive_drafter, tiny_model
from draftsmith.sampling import SamplingParams
from draftsmith.specdec import EngineConfig, Request, SpecEngine, runner_for


@pytest.fixture(scope="module")
def target():
    return tiny_model()


def _decode(target):
    return lambda ids: target.tokenizer.decode(ids, skip_special_tokens=True)


def test_a_long_answer_decodes_a_linear_number_of_tokens(target):
    """The old engine decoded the whole output after every token (twice with a stop string): ~n^2 tokens."""
    decoded = []
    decode = _decode(target)
    engine = SpecEngine(runner_for(target.model), None, config=EngineConfig(num_speculative_tokens=0, max_batch_size=2),
                        decode=lambda ids: decoded.append(len(ids)) or decode(ids))
    n = 600
    chunks = list(engine.stream(Request("a", [5, 6, 7], SamplingParams(max_tokens=n, stop=("\x00never\x01",),
                                                                       ignore_eos=True))))
    result = chunks[-1].result
    assert len(result.output_token_ids) == n
    assert sum(decoded) <= 12 * n, f"{sum(decoded)} tokens decoded for {n} output tokens"
    assert "".join(c.text_delta for c in chunks) == result.text == decode(result.output_token_ids)


@pytest.mark.parametrize("seed", range(4))
def test_streamed_deltas_and_stop_strings_match_a_full_decode(target, seed):
    decode = _decode(target)
    rng = random.Random(seed)
    ids = [rng.randrange(3, 259) for _ in range(300)]  # byte-level: many incomplete UTF-8 characters
    full = decode(ids)
    plain = IncrementalDetokenizer(decode)
    streamed = ""
    for token in ids:
        plain.add(token)
        streamed += plain.stream_delta()
        assert not streamed.endswith("\ufffd") and decode(plain.ids).startswith(streamed)
    assert streamed + plain.final_delta(plain.full_text()) == full
    start = rng.randrange(50, len(full) - 10)
    stop = full[start: start + 3]
    cut = full.find(stop)
    stopping = IncrementalDetokenizer(decode, stops=("\x00none", stop))
    streamed = ""
    for count, token in enumerate(ids, 1):
        if stopping.add(token):
            break
        streamed += stopping.stream_delta()
    assert stopping.stopped == full[:cut]
    assert stop not in decode(ids[:count - 1]) and stop in decode(ids[:count])  # found as soon as it appeared
    assert stopping.stopped.startswith(streamed)  # nothing past the cut was streamed


def test_end_of_sequence_tokens_are_not_text(target):
    decode = _decode(target)
    detokenizer = IncrementalDetokenizer(decode, skip_ids=frozenset({50}))
    for token in (72, 50, 105):
        detokenizer.add(token)
    assert detokenizer.full_text() == decode([72, 105])


def _text_engine(target, eos=()):
    drafter = runner_for(target.model)  # a perfect drafter: steps emit several tokens each
    return SpecEngine(runner_for(target.model), drafter, config=EngineConfig(num_speculative_tokens=4),
                      eos_token_ids=eos, decode=_decode(target))


def test_a_stop_string_at_the_very_start_is_cut(target):
    """The old engine took an empty cut text for 'no cut' and returned the full text, stop string included."""
    text = _text_engine(target).generate([Request("a", [5, 6, 7], SamplingParams(max_tokens=30))])[0].text
    stop = text[:2]
    chunks = list(_text_engine(target).stream(Request("b", [5, 6, 7], SamplingParams(max_tokens=30, stop=(stop,)))))
    assert chunks[-1].result.finish_reason == "stop" and chunks[-1].result.text == ""
    assert "".join(c.text_delta for c in chunks) == ""


def test_end_of_sequence_with_stop_strings_keeps_the_last_steps_text(target):
    """The old engine kept the previous step's text when an end-of-sequence token finished a request that had
    stop strings, losing the text of the last step's other tokens."""
    free = _text_engine(target).generate([Request("a", [5, 6, 7], SamplingParams(max_tokens=30))])[0]
    eos = free.output_token_ids[9]
    got = _text_engine(target, eos=[eos]).generate(
        [Request("b", [5, 6, 7], SamplingParams(max_tokens=30, stop=("\x00never",)))])[0]
    output = got.output_token_ids
    assert got.finish_reason == "stop" and output[-1] == eos
    assert got.text == _decode(target)([t for t in output if t != eos])


def test_the_earliest_stop_string_cuts_whatever_its_place_in_the_list():
    """One token completing two stop strings: the text ends before the one that begins first."""
    vocab = ["ab", "xcdyefz", "q"]
    detokenizer = IncrementalDetokenizer(lambda ids: "".join(vocab[i] for i in ids), stops=("ef", "cd"))
    assert not detokenizer.add(0)
    assert detokenizer.add(1)
    assert detokenizer.stopped == "abx"


def test_a_stop_string_completed_by_the_last_allowed_token_stops_and_cuts(target):
    """The old engine applied max_tokens first: finish_reason 'length' and the stop string left in the text."""
    decode = _decode(target)
    output = _text_engine(target).generate([Request("a", [5, 6, 7], SamplingParams(max_tokens=30))])[0].output_token_ids
    for n in range(10, 30):  # a token that completes a 2-character stop string seen nowhere before it
        text, before = decode(output[:n]), decode(output[:n - 1])
        if "\ufffd" not in text and len(text) > len(before) and text[-2:] not in before:
            break
    stop = text[-2:]
    chunks = list(_text_engine(target).stream(Request("b", [5, 6, 7], SamplingParams(max_tokens=n, stop=(stop,)))))
    result = chunks[-1].result
    assert result.output_token_ids == output[:n]
    assert result.finish_reason == "stop" and result.text == text[:-2]
    assert "".join(c.text_delta for c in chunks) == text[:-2]
