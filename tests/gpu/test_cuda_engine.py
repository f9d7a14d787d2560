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


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_multi_device_pair_splits_target_and_drafts_layer_parallel():
    from draftsmith import layer_parallel as lp

    target = tiny_model()
    target.model.to("cuda:0")
    devices = ["cuda:0", "cuda:1"]
    target_runner = runner_for(target.model)
    lp.split_target(target_runner, devices)
    last = target.model.model.layers[-1].mlp.down_proj.weight
    assert last.device == torch.device("cuda:1")  # moved in place, no second copy on cuda:0
    drafter = runner_for(None, derive_drafter(target, [0, 1]))
    lp.install(drafter, lp.LayerParallelConfig(2, tuple(devices)))
    prompts = [[5, 6, 7], [10, 11, 12, 13], [3]]
    requests = [Request(str(i), p, SamplingParams(max_tokens=32)) for i, p in enumerate(prompts)]
    engine = SpecEngine(target_runner, drafter, config=EngineConfig(num_speculative_tokens=4, max_batch_size=4),
                        eos_token_ids=[])
    reference = tiny_model()
    reference.model.to("cuda:0")
    plain = SpecEngine(runner_for(reference.model), None, config=EngineConfig(max_batch_size=4), eos_token_ids=[])
    assert [r.output_token_ids for r in engine.generate(requests)] == \
        [r.output_token_ids for r in plain.generate(requests)]
