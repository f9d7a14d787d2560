"""CUDA checks of the engine (skipped without a GPU): lossless greedy decoding in bf16 and fp32."""

import pytest
import torch

from draftsmith.models import derive_drafter, tiny_model
from draftsmith.sampling import SamplingParams
from draftsmith.specdec import EngineConfig, Request, SpecEngine, runner_for

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_speculative_equals_autoregressive_on_cuda(dtype):
    target = tiny_model()
    target.model.to("cuda", dtype)
    drafter = runner_for(None, derive_drafter(target, [0]))
    prompts = [[5, 6, 7], [10, 11, 12, 13], [3]]

    def run(gamma, drafter_runner):
        engine = SpecEngine(runner_for(target.model), drafter_runner,
                            config=EngineConfig(num_speculative_tokens=gamma, max_batch_size=4), eos_token_ids=[])
        return [r.output_token_ids for r in engine.generate(
            [Request(str(i), p, SamplingParams(max_tokens=32)) for i, p in enumerate(prompts)])]

    assert run(4, drafter) == run(0, None)
