"""Speculative sampling on the real SmolLM2 target, over its full 49,152-token vocabulary, keeps its distribution.

The engine samples N_SEQUENCES continuations of one prompt (one request per seed) at temperature 1, no top-k or
top-p, gamma 4, with a drafter that is the target with its final norm scaled by 1.4 (q sharper than p, so drafts
are accepted at most depths, rejected and recovered at others, and fully accepted steps end with the bonus token).
The reference is the HF model's own distribution at every realised prefix (tests/lossless_stats.py): each output
token's randomized PIT over the whole vocabulary ordered by probability, so no token is dropped (the rare ones
share the PIT cells of low rank). Under the null the PIT values of a sequence's tokens are independent
uniforms, so all positions pool into one chi-square with 4 cells.

Power: N_SEQUENCES * NEW_TOKENS = 4,096 PIT values, 3 degrees of freedom, alpha 0.05 (the false-alarm rate over
seeds; the seeds are fixed, so the test is deterministic): any bias of at least 0.0294 in total variation on the
4 PIT cells is detected with power 0.9 (`detectable_tv`, asserted below). The engine runs all sequences as one
batch on two threads (no Ray work runs during this test): the smallest sample that keeps the bound under 0.03 is
what keeps the test's cost within the suite's budget. Per-position and joint statistics at that
power need 10,000+ sequences per position, which the tiny model's tests (tests/unit/test_lossless_distribution.py)
afford and this CPU does not on a 135M-parameter target.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("scipy")

from lossless_stats import TV_BOUND, Params, assert_all_pass, detectable_tv, pit_check, pit_values  # noqa: E402

from draftsmith.models import EMBEDDED_TARGET, derive_drafter, load_model  # noqa: E402
from draftsmith.sampling import SamplingParams  # noqa: E402
from draftsmith.specdec import EngineConfig, Request, SpecEngine, runner_for  # noqa: E402

# Minutes on a 2-core CPU (a 135M-parameter target and drafter over 4,096 tokens): `make test-heavy` runs it.
pytestmark = [pytest.mark.slow, pytest.mark.heavy]

N_SEQUENCES, NEW_TOKENS, GAMMA, ALPHA, BINS = 128, 32, 4, 5e-2, 4
STATED_TV = 0.0294


@pytest.fixture(scope="module")
def smollm2():
    return load_model(EMBEDDED_TARGET)


def test_stated_power():
    assert detectable_tv(N_SEQUENCES * NEW_TOKENS, BINS - 1, ALPHA) == pytest.approx(STATED_TV, abs=5e-5)
    assert STATED_TV <= TV_BOUND


def test_sampled_tokens_follow_smollm2_over_its_full_vocabulary(smollm2):
    """Detectable TV 0.0294 on the 4 PIT cells (power 0.9, alpha 0.05)."""
    prompt = smollm2.tokenizer("Once upon a time, in a small village,")["input_ids"]
    drafter = derive_drafter(smollm2, list(range(smollm2.model.config.num_hidden_layers)))
    with torch.no_grad():
        drafter.model.model.norm.weight.mul_(1.4)
    engine = SpecEngine(runner_for(smollm2.model), runner_for(None, drafter), eos_token_ids=(),
                        config=EngineConfig(num_speculative_tokens=GAMMA, max_batch_size=N_SEQUENCES, max_model_len=128,
                                            topk_logprobs=0))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = engine.generate([Request(str(i), prompt, SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0,
                                                                          seed=8_000_000 + i))
                                   for i in range(N_SEQUENCES)])
        outputs = [r.output_token_ids for r in results]
        u = pit_values(smollm2.model, prompt, outputs, [Params(1.0)] * len(outputs), seed=8, chunk=4)
    finally:
        torch.set_num_threads(threads)
    drafted, accepted = sum(r.stats.drafted for r in results), sum(r.stats.accepted for r in results)
    assert 0.2 * drafted < accepted < 0.95 * drafted, (drafted, accepted)  # accepted, rejected and recovered
    assert any(r.accept_mask[1:GAMMA + 1].all() for r in results)  # first steps fully accepted: bonus tokens
    assert_all_pass([pit_check("SmolLM2, positions 1-32 pooled", u.reshape(-1), ALPHA, bins=BINS)], ALPHA)
