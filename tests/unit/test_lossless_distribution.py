"""Speculative sampling keeps the target's distribution at every output position, with gamma 4, in every case.

Each test runs one engine over N_SAMPLES requests of one prompt, each with its own seed (a large batch, so the
samples are cheap), with max_tokens = GAMMA + 2: the prefill draws position 1 and the first verification step
covers positions 2..6 (four drafts and the recovered or bonus token). It then checks, against distributions
computed exactly from the target model (tests/lossless_stats.py: the HF model's own logits, an independent
temperature / top-k / top-p):

- the conditional distribution of every output position 1..6 given the realised prefix (randomized PIT, 8 cells);
- the joint distribution of the first three tokens (the most likely triples enumerated, the rest pooled).

The cases: partial acceptance with the recovered token at every depth, temperature with top-k and top-p, and
greedy rows in the same batch (one test); full acceptance and the bonus token; prompt-lookup proposals beside a
drafter; a feature-reading drafter; a layer-parallel drafter.

Each test also checks that the case it is about really happened (drafts accepted, rejected and recovered at
every depth, the bonus token, lookup proposals, greedy rows), from RequestStats and accept_mask.

False alarms and power. The seeds are fixed, so the tests are deterministic. Over random seeds a correct
engine fails a test with probability at most FAMILY_ALPHA = 1e-3 (Bonferroni: each of a test's 7 statistics
runs at 1e-3 / 7). At that level each statistic detects, with power 0.9, any bias of at least
0.0281 in total variation on its cells (PIT cells: N = 12,000, 7 degrees of freedom; joint: at most 8
enumerated cells plus the pooled one, at most 8 degrees of freedom: at most 0.0285); the mixed-batch test has
the same numbers over its 12,000 sampled rows. `test_the_stated_power_holds` recomputes them. Only the public API
of the engine is used.
"""

from __future__ import annotations

import collections

import pytest
import torch

pytest.importorskip("scipy")

from lossless_stats import (  # noqa: E402  (tests/ is on sys.path: tests/conftest.py lives there)
    TV_BOUND,
    Params,
    assert_all_pass,
    detectable_tv,
    joint_check,
    joint_cells,
    pit_check,
    pit_values,
)

from draftsmith import layer_parallel  # noqa: E402
from draftsmith.models import derive_drafter, tiny_model  # noqa: E402
from draftsmith.sampling import SamplingParams  # noqa: E402
from draftsmith.specdec import EngineConfig, Request, SpecEngine, runner_for  # noqa: E402

GAMMA = 4
MAX_TOKENS = GAMMA + 2
N_SAMPLES = 12_000
FAMILY_ALPHA = 1e-3
STATISTICS = MAX_TOKENS + 1  # one per output position, one joint
ALPHA = FAMILY_ALPHA / STATISTICS
JOINT_DEPTH, JOINT_CELLS = 3, 8
STATED_TV = {"position": 0.0281, "joint": 0.0285}


@pytest.fixture(scope="module")
def target():
    return tiny_model()


def _engine(target, drafter, **config) -> SpecEngine:
    config = EngineConfig(num_speculative_tokens=GAMMA, max_batch_size=256, max_model_len=128, topk_logprobs=0, **config)
    return SpecEngine(runner_for(target.model), drafter, config=config, eos_token_ids=[])


def _sample(engine: SpecEngine, prompt: list[int], rows: list[Params], seed: int):
    return engine.generate([Request(str(i), prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=p.temperature,
                                                                   top_k=p.top_k, top_p=p.top_p, seed=seed + i))
                            for i, p in enumerate(rows)])


def _first_step_accepted(result) -> int:
    """Drafts accepted by the first verification step (output positions 2..): its leading accept flags."""
    return int(result.accept_mask[1:].long().cumprod(0).sum())


def _check_distribution(name, target, prompt, results, rows, *, seed):
    """Every position's conditional (PIT) and the joint of the first three tokens of the sampled rows."""
    sampled = [i for i, p in enumerate(rows) if p.temperature > 0]
    outputs = [results[i].output_token_ids for i in sampled]
    u = pit_values(target.model, prompt, outputs, [rows[i] for i in sampled], seed=seed)
    checks = [pit_check(f"{name}: position {j + 1}", u[:, j], ALPHA) for j in range(MAX_TOKENS)]
    cells = joint_cells(target.model, prompt, rows[sampled[0]], depth=JOINT_DEPTH, n=len(outputs), max_cells=JOINT_CELLS)
    assert len(cells) >= 3, f"{name}: too few likely triples for a joint test ({len(cells)})"
    checks.append(joint_check(f"{name}: joint of positions 1-3", outputs, cells, ALPHA))
    assert_all_pass(checks, FAMILY_ALPHA)
    return checks


def _depths(results) -> collections.Counter:
    return collections.Counter(_first_step_accepted(r) for r in results)


def test_the_stated_power_holds():
    """The docstring's figures: detectable TV at power 0.9 for N_SAMPLES at each statistic's level."""
    assert detectable_tv(N_SAMPLES, 7, ALPHA) == pytest.approx(STATED_TV["position"], abs=5e-5)
    assert detectable_tv(N_SAMPLES, JOINT_CELLS, ALPHA) == pytest.approx(STATED_TV["joint"], abs=5e-5)
    assert max(STATED_TV.values()) <= TV_BOUND


def test_partial_acceptance_residual_top_k_top_p_in_a_mixed_batch(target):
    """A drafter cut from the target's first layer: the first step stops at every depth 0..3 (the recovered token,
    from norm(max(0, p - q))) and sometimes accepts all four (bonus); the sampled rows use temperature 0.6 with
    top-k 40 and top-p 0.9 (applied to both distributions; no token may leave the target's support); one row in four
    is greedy and must equal greedy autoregressive decoding token for token. Detectable TV over the 12,000 sampled
    rows: 0.0281 per position, <= 0.0285 joint (power 0.9, alpha 1.4e-4 each, false alarm <= 1e-3)."""
    prompt = [5, 6, 7]
    sampled = Params(0.6, top_k=40, top_p=0.9)
    rows = [Params(0.0) if i % 4 == 3 else sampled for i in range(N_SAMPLES * 4 // 3)]
    results = _sample(_engine(target, runner_for(None, derive_drafter(target, [0]))), prompt, rows, seed=1_000_000)
    greedy = _engine(target, None).generate([Request("g", prompt, SamplingParams(max_tokens=MAX_TOKENS))])[0]
    assert all(r.output_token_ids == greedy.output_token_ids for r, p in zip(results, rows) if p.temperature == 0)
    assert sum(p.temperature > 0 for p in rows) == N_SAMPLES
    depths = _depths([r for r, p in zip(results, rows) if p.temperature > 0])
    assert all(depths[d] >= 50 for d in range(GAMMA + 1)), f"first-step accepted lengths {sorted(depths.items())}"
    _check_distribution("partial acceptance, top-k/top-p, mixed batch", target, prompt, results, rows, seed=1)


def test_full_acceptance_and_the_bonus_token(target):
    """A drafter that is a copy of the target: every draft is accepted and position 6 is the bonus token drawn
    from p at the fifth verified position. Detectable TV: 0.0281 per position, <= 0.0285 joint (power 0.9,
    alpha 1.4e-4 each, false alarm <= 1e-3)."""
    prompt = [10, 11, 12, 13]
    rows = [Params(0.6)] * N_SAMPLES
    results = _sample(_engine(target, runner_for(target.model)), prompt, rows, seed=2_000_000)
    assert _depths(results)[GAMMA] >= 0.99 * N_SAMPLES  # q == p up to the last bits: all accepted
    assert all(not r.accept_mask[-1] for r in results)  # the last token is the bonus, not a draft
    _check_distribution("full acceptance", target, prompt, results, rows, seed=2)


def _lookup_prompt(target) -> list[int]:
    """The target's greedy continuation of [5, 6, 7], then its first five tokens again: a sequence whose last
    tokens occurred before, so lookup finds matches (the tiny random target rarely repeats itself, so its
    proposals are mostly rejected: the one-hot residual p without x is the branch this exercises most)."""
    seed = [5, 6, 7]
    continuation = _engine(target, None).generate([Request("p", seed, SamplingParams(max_tokens=16))])[0]
    tokens = seed + continuation.output_token_ids
    return tokens + tokens[:5]


def test_prompt_lookup_proposals(target):
    """Prompt lookup (prompt_lookup_max 3, min 1) beside a drafter, temperature 0.3: rows whose context repeats
    verify one-hot lookup proposals (accepted with probability p(x), else resampled from p without x), the others the
    drafter's. Detectable TV: 0.0281 per position, <= 0.0285 joint (power 0.9, alpha 1.4e-4 each, false
    alarm <= 1e-3)."""
    prompt = _lookup_prompt(target)
    rows = [Params(0.3)] * N_SAMPLES
    engine = _engine(target, runner_for(None, derive_drafter(target, [0])), prompt_lookup_max=3, prompt_lookup_min=1)
    results = _sample(engine, prompt, rows, seed=5_000_000)
    looked_up = sum(r.stats.lookup_drafted for r in results)
    lookup_accepted = sum(r.stats.lookup_accepted for r in results)
    assert looked_up >= N_SAMPLES // 4 and 200 <= lookup_accepted < looked_up - 200, (looked_up, lookup_accepted)
    assert sum(r.stats.drafted for r in results) > looked_up  # the drafter drafted for the other rows
    _check_distribution("prompt lookup", target, prompt, results, rows, seed=5)


def test_feature_drafter(target):
    """An EAGLE-style drafter (models' `feature:` derivation: the target's last layer reading the target's features
    through a perturbed map): drafts are accepted and rejected at several depths. Detectable TV: 0.0281 per
    position, <= 0.0285 joint (power 0.9, alpha 1.4e-4 each, false alarm <= 1e-3)."""
    prompt = [3, 50, 60, 70, 80]
    drafter = derive_drafter(target, [1], reads_target_features=True)
    drafter.feature_fc = drafter.feature_fc + 0.2 * torch.randn(drafter.feature_fc.shape,
                                                               generator=torch.Generator().manual_seed(0))
    rows = [Params(0.6)] * N_SAMPLES
    results = _sample(_engine(target, runner_for(None, drafter)), prompt, rows, seed=6_000_000)
    depths = _depths(results)
    assert depths[0] >= 300 and depths[1] >= 300 and depths[2] >= 50, f"first-step accepted lengths {sorted(depths.items())}"
    _check_distribution("feature drafter", target, prompt, results, rows, seed=6)


def test_layer_parallel_drafter(target):
    """A two-layer drafter (a copy of the target's layers) under a layer-parallel plan of one group of two
    (layer_parallel.install): the first draft is exact (KV calibration), the later ones approximate, so acceptance
    is partial. Detectable TV: 0.0281 per position, <= 0.0285 joint (power 0.9, alpha 1.4e-4 each, false
    alarm <= 1e-3)."""
    prompt = [7, 7, 8, 9]
    drafter = runner_for(None, derive_drafter(target, [0, 1]))
    layer_parallel.install(drafter, layer_parallel.LayerParallelConfig(group_size=2))
    rows = [Params(0.7)] * N_SAMPLES
    results = _sample(_engine(target, drafter), prompt, rows, seed=7_000_000)
    depths = _depths(results)
    assert depths[1] >= 300 and depths[GAMMA] >= 300, f"first-step accepted lengths {sorted(depths.items())}"
    _check_distribution("layer-parallel drafter", target, prompt, results, rows, seed=7)


@torch.no_grad()
def _ancestral_samples(model, prompt: list[int], params: Params, n: int, seed: int) -> list[list[int]]:
    """n exact samples of MAX_TOKENS tokens from the target, drawn directly (no engine)."""
    from lossless_stats import reference_probs

    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt] * n)
    for _ in range(MAX_TOKENS):
        probs = reference_probs(model(ids).logits[:, -1].float(), params)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return ids[:, len(prompt):].tolist()


def test_the_checks_pass_exact_samples_and_catch_a_small_bias(target):
    """The statistics are neither vacuous nor trigger-happy: exact ancestral samples from the target pass, and the
    same samples with position 3 replaced by the target's most likely token 8% of the time (a bias below 0.08 in
    total variation on that position) fail."""
    prompt, params = [5, 6, 7], Params(0.6)
    outputs = _ancestral_samples(target.model, prompt, params, N_SAMPLES, seed=11)
    _check_distribution("exact samples", target, prompt, [_Output(o) for o in outputs], [params] * N_SAMPLES, seed=11)
    flip = torch.rand(N_SAMPLES, generator=torch.Generator().manual_seed(12)) < 0.08
    with torch.no_grad():
        mode = target.model(torch.tensor([prompt + o[:2] for o in outputs])).logits[:, -1].argmax(-1).tolist()
    biased = [o[:2] + [m] + o[3:] if replace else o for o, m, replace in zip(outputs, mode, flip.tolist())]
    u = pit_values(target.model, prompt, biased, [params] * N_SAMPLES, seed=11)
    assert pit_check("biased samples: position 3", u[:, 2], ALPHA).p_value < ALPHA


class _Output:
    """The one field of GenerationResult the checks read."""

    def __init__(self, tokens: list[int]):
        self.output_token_ids = tokens
