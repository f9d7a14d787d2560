"""Greedy speculative decoding on the real SmolLM2 target equals transformers `generate()` token for token.

16 held-out ShareGPT prompts (chat template applied; the first 16 whose prompt is at most MAX_PROMPT_TOKENS
long), 64 new tokens each, EOS ignored so every token is compared. The reference is transformers'
`generate(do_sample=False)` at batch 1, computed once per prompt and shared by every case. Each drafting
method runs at engine batch 1 and 8: a token drafter cut from the target (`derived:`), an untrained feature
drafter (`feature:`, it drafts and is mostly rejected), prompt lookup alone, and a drafter under a layer-parallel
plan (`layer_parallel.install`, groups 1,2,1). Every case also checks that the method really drafted. The batch-1
cases decode the 16 prompts one after another and take minutes on a 2-core CPU: they are `heavy` (`make
test-heavy`); `make test` runs the batch-8 cases.
"""

from __future__ import annotations

import pytest
import torch

from draftsmith import layer_parallel
from draftsmith.datasets_io import load_prompt_source
from draftsmith.models import EMBEDDED_TARGET, derive_from_spec, load_model
from draftsmith.sampling import SamplingParams
from draftsmith.specdec import EngineConfig, Request, SpecEngine, runner_for

pytestmark = pytest.mark.slow

N_PROMPTS, NEW_TOKENS, MAX_PROMPT_TOKENS, GAMMA = 16, 64, 160, 4


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    """This module starts no Ray work: its decoding may use both cores (the suite's default is one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smollm2():
    return load_model(EMBEDDED_TARGET)


@pytest.fixture(scope="module")
def prompts(smollm2):
    tokenizer = smollm2.tokenizer
    chosen = []
    for messages in load_prompt_source("sharegpt", 400, split="heldout"):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if len(ids) <= MAX_PROMPT_TOKENS:
            chosen.append(ids)
        if len(chosen) == N_PROMPTS:
            return chosen
    pytest.fail(f"only {len(chosen)} held-out prompts of at most {MAX_PROMPT_TOKENS} tokens")


@pytest.fixture(scope="module")
def reference(smollm2, prompts):
    """transformers' greedy continuation of each prompt (batch 1: no padding), computed once."""
    outputs = []
    with torch.no_grad():
        for ids in prompts:
            out = smollm2.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                         max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                         pad_token_id=smollm2.tokenizer.eos_token_id)
            outputs.append(out[0, len(ids):].tolist())
    return outputs


@pytest.fixture(scope="module")
def target_runner(smollm2):
    return runner_for(smollm2.model)


def _drafter(smollm2, method: str):
    if method == "prompt lookup":
        return None
    if method == "layer-parallel":
        runner = runner_for(None, derive_from_spec(smollm2, "derived:first2+last2"))
        layer_parallel.install(runner, layer_parallel.LayerParallelConfig(group_sizes=(1, 2, 1)))
        return runner
    return runner_for(None, derive_from_spec(smollm2, {"token drafter": "derived:first2+last1",
                                                       "feature drafter": "feature:last1"}[method]))


@pytest.mark.timeout(1200)  # the first case also computes the shared transformers reference (16 x 64 tokens)
@pytest.mark.parametrize("batch", [8, pytest.param(1, marks=pytest.mark.heavy)])  # batch 1: make test-heavy
@pytest.mark.parametrize("method", ["token drafter", "feature drafter", "prompt lookup", "layer-parallel"])
def test_greedy_speculative_equals_transformers_generate(smollm2, prompts, reference, target_runner, method, batch):
    drafter = _drafter(smollm2, method)
    lookup = {"prompt_lookup_max": 3, "prompt_lookup_min": 1} if method == "prompt lookup" else {}
    engine = SpecEngine(target_runner, drafter, eos_token_ids=smollm2.eos_token_ids,
                        config=EngineConfig(num_speculative_tokens=GAMMA, max_batch_size=batch, max_model_len=512,
                                            topk_logprobs=0, **lookup))
    results = engine.generate([Request(str(i), ids, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
                               for i, ids in enumerate(prompts)])
    mismatched = [i for i, (r, ref) in enumerate(zip(results, reference)) if r.output_token_ids != ref]
    assert not mismatched, (
        f"{method} at batch {batch}: prompts {mismatched} differ from generate(); first: "
        f"{results[mismatched[0]].output_token_ids} vs {reference[mismatched[0]]}")
    drafted = sum(r.stats.drafted for r in results)
    assert drafted > 0, f"{method} at batch {batch} never drafted"
    if method == "prompt lookup":
        assert sum(r.stats.lookup_drafted for r in results) == drafted
    print(f"{method} batch {batch}: drafted {drafted}, accepted {sum(r.stats.accepted for r in results)}")
