"""The engine is lossless: greedy speculative output equals greedy autoregressive output token for token,
and speculative sampling reproduces the target's distribution."""

import pytest
import torch

from draftsmith.models import derive_drafter, tiny_model
from draftsmith.sampling import SamplingParams
from draftsmith.specdec import EngineConfig, Request, SpecEngine, runner_for

PROMPTS = [[5, 6, 7], [10, 11, 12, 13, 14, 15], [3], [100, 101, 102, 103], [40, 41], [7] * 9]


@pytest.fixture(scope="module")
def target():
    return tiny_model()


@pytest.fixture(scope="module")
def drafters(target):
    return {
        "layer0": runner_for(None, derive_drafter(target, [0])),
        "trimmed": runner_for(None, derive_drafter(target, [1], draft_vocab_ids=torch.arange(0, 259, 2))),
        "self": runner_for(target.model),  # perfect drafter: everything accepted
        "bad": runner_for(tiny_model(seed=123).model),  # unrelated random weights
        "feature": runner_for(None, derive_drafter(target, [1], reads_target_features=True)),  # EAGLE-style
    }


def engine(target, drafter, gamma, batch=8, **kwargs):
    config = EngineConfig(num_speculative_tokens=gamma, max_batch_size=batch, **kwargs)
    return SpecEngine(runner_for(target.model), drafter, config=config, eos_token_ids=[])


def outputs(eng, prompts, **params):
    results = eng.generate([Request(str(i), p, SamplingParams(**params)) for i, p in enumerate(prompts)])
    return results


@pytest.mark.parametrize("drafter_name", ["layer0", "trimmed", "self", "bad", "feature"])
@pytest.mark.parametrize("gamma", [1, 3, 6])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_speculative_equals_autoregressive(target, drafters, drafter_name, gamma, batch):
    expected = [r.output_token_ids for r in outputs(engine(target, None, 0), PROMPTS, max_tokens=24)]
    got = outputs(engine(target, drafters[drafter_name], gamma, batch), PROMPTS, max_tokens=24)
    assert [r.output_token_ids for r in got] == expected
    drafted = sum(r.stats.drafted for r in got)
    accepted = sum(r.stats.accepted for r in got)
    assert drafted > 0
    if drafter_name == "self":
        assert accepted == drafted
    if drafter_name == "bad":
        assert accepted < drafted


def test_greedy_matches_transformers_generate(target):
    result = outputs(engine(target, None, 0), [PROMPTS[1]], max_tokens=20)[0]
    with torch.no_grad():
        reference = target.model.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=20, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)
    assert result.output_token_ids == reference[0, len(PROMPTS[1]):].tolist()


def test_stats_follow_the_definitions(target, drafters):
    results = outputs(engine(target, drafters["layer0"], 4), PROMPTS, max_tokens=30)
    for r in results:
        s = r.stats
        assert s.compared <= s.drafted and s.accepted <= s.compared
        assert s.token_acceptance >= s.acceptance_rate
        assert 1.0 <= s.mean_accepted_length <= 5.0
        assert len(r.output_token_ids) == 30 == len(r.accept_mask) == r.topk_ids.shape[0]
        assert int(r.accept_mask.sum()) == s.accepted
        assert s.emitted_in_steps + 1 == len(r.output_token_ids)  # the first token comes from the prefill


def test_topk_logprobs_are_the_targets(target):
    result = outputs(engine(target, None, 0, topk_logprobs=5), [PROMPTS[0]], max_tokens=3)[0]
    ids = PROMPTS[0] + result.output_token_ids
    with torch.no_grad():
        logprobs = target.model(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = logprobs[len(PROMPTS[0]) - 1: len(ids) - 1].topk(5)
    torch.testing.assert_close(result.topk_logprobs, expected.values, atol=1e-4, rtol=1e-4)
    assert torch.equal(result.topk_ids, expected.indices)
    assert result.topk_ids[:, 0].tolist() == result.output_token_ids  # greedy token is the top-1


def test_kv_rollback_after_rejections_matches_a_fresh_prefill(target, drafters):
    eng = engine(target, drafters["bad"], 4, batch=2)
    eng.add_request(Request("a", PROMPTS[1], SamplingParams(max_tokens=40)))
    for _ in range(4):
        eng.step()
    seq = eng.active[0]
    assert seq.stats.drafted > seq.stats.accepted  # rejections happened, so stale entries were rolled back
    fresh = engine(target, None, 0, batch=1)
    prefix = seq.tokens[:-1]
    fresh.target.forward(torch.tensor([prefix]), torch.arange(len(prefix))[None], fresh.target_cache, slice(0, 1))
    n = seq.target_len
    assert n == len(prefix)
    torch.testing.assert_close(eng.target_cache.k[:, 0, :n], fresh.target_cache.k[:, 0, :n], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(eng.target_cache.v[:, 0, :n], fresh.target_cache.v[:, 0, :n], atol=1e-5, rtol=1e-4)


def test_eos_stop_strings_and_max_tokens(target):
    free = outputs(engine(target, None, 0), [PROMPTS[1]], max_tokens=12)[0]
    eos = free.output_token_ids[4]
    eng = SpecEngine(runner_for(target.model), None, config=EngineConfig(num_speculative_tokens=0), eos_token_ids=[eos])
    stopped = eng.generate([Request("x", PROMPTS[1], SamplingParams(max_tokens=12))])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.output_token_ids == free.output_token_ids[: free.output_token_ids.index(eos) + 1]
    assert free.finish_reason == "length"
    ids = stopped.output_token_ids[2:4]
    stop_ids = outputs(engine(target, None, 0), [PROMPTS[1]], max_tokens=12, stop_token_ids=tuple(ids[:1]))[0]
    assert stop_ids.finish_reason == "stop" and stop_ids.output_token_ids[-1] == ids[0]


def test_stop_string_truncates_text_and_streaming_never_leaks_it(target, drafters):
    tokenizer = target.tokenizer
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    base = SpecEngine(runner_for(target.model), drafters["layer0"], config=EngineConfig(num_speculative_tokens=3),
                      decode=decode).generate([Request("a", PROMPTS[3], SamplingParams(max_tokens=30))])[0]
    text = base.text
    assert len(text) > 6
    stop = text[4:6]
    eng = SpecEngine(runner_for(target.model), drafters["layer0"], config=EngineConfig(num_speculative_tokens=3), decode=decode)
    chunks = list(eng.stream(Request("b", PROMPTS[3], SamplingParams(max_tokens=30, stop=(stop,)))))
    assert chunks[-1].finished and chunks[-1].result.finish_reason == "stop"
    streamed = "".join(c.text_delta for c in chunks)
    assert streamed == chunks[-1].result.text == text[: text.find(stop)]


def test_continuous_admission_and_mixed_gammas(target, drafters):
    expected = [r.output_token_ids for r in outputs(engine(target, None, 0), PROMPTS, max_tokens=16)]
    eng = engine(target, drafters["layer0"], 4, batch=3)
    requests = [Request(str(i), p, SamplingParams(max_tokens=16), num_speculative_tokens=i % 3)
                for i, p in enumerate(PROMPTS)]
    eng.add_request(requests[0])
    finished = {}
    pending = requests[1:]
    while eng.has_work() or pending:
        if pending:
            eng.add_request(pending.pop(0))  # arrives while others are mid-decode
        for out in eng.step():
            if out.finished:
                finished[out.request_id] = out.result.output_token_ids
    assert [finished[str(i)] for i in range(len(PROMPTS))] == expected


def test_drafter_swap_mid_generation_is_lossless(target, drafters):
    expected = outputs(engine(target, None, 0), PROMPTS[:3], max_tokens=20)
    eng = engine(target, drafters["layer0"], 3)
    for i, p in enumerate(PROMPTS[:3]):
        eng.add_request(Request(str(i), p, SamplingParams(max_tokens=20)))
    results = {}
    for step in range(100):
        if step == 2:
            eng.set_drafter(drafters["trimmed"], "v2")
        for out in eng.step():
            if out.finished:
                results[out.request_id] = out.result
        if not eng.has_work():
            break
    assert [results[str(i)].output_token_ids for i in range(3)] == [r.output_token_ids for r in expected]
    assert {r.drafter_version for r in results.values()} == {"v2"}


def _reference_feature_drafting(target, drafter, prompt: list[int], output: list[int], gamma: int):
    """(drafted, accepted) of greedy EAGLE-style drafting recomputed from scratch at every step with the HF
    modules (no cache): position p reads (the target's normed hidden state at p, token p + 1); each later
    draft reads the drafter's own output feature."""
    import torch.nn.functional as F

    tokens = prompt + output
    with torch.no_grad():
        target_features = target.model.model(input_ids=torch.tensor([tokens])).last_hidden_state[0]
    head = drafter.head_weight if drafter.head_weight is not None else drafter.model.get_output_embeddings().weight
    embed = drafter.model.get_input_embeddings().weight
    drafted = accepted = 0
    emitted = 1  # the prefill's token
    while emitted < len(output):
        g = min(gamma, len(output) - emitted - 1)
        n = len(prompt) + emitted
        ids, features, drafts = list(tokens[1:n]), target_features[: n - 1], []
        for _ in range(g):
            with torch.no_grad():
                x = F.linear(torch.cat([F.embedding(torch.tensor([ids]), embed), features[None]], -1), drafter.feature_fc)
                h = drafter.model.model(inputs_embeds=x).last_hidden_state[0, -1]
            choice = int((h @ head.T).argmax())
            drafts.append(choice if drafter.head_token_ids is None else int(drafter.head_token_ids[choice]))
            ids.append(drafts[-1])
            features = torch.cat([features, h[None]])
        a = 0
        while a < g and drafts[a] == tokens[n + a]:
            a += 1
        drafted, accepted, emitted = drafted + g, accepted + a, emitted + a + 1
    return drafted, accepted


def test_feature_drafter_drafts_what_a_cacheless_reference_drafts(target):
    """The engine's caches, windows and catch-up for a feature-reading drafter change no draft: its counts
    per request equal a from-scratch recomputation, at batch 1 and 4; a swap to it mid-generation is lossless."""
    drafter = derive_drafter(target, [0, 1], reads_target_features=True, draft_vocab_ids=torch.arange(0, 259, 3))
    drafter.feature_fc = drafter.feature_fc + 0.3 * torch.randn(drafter.feature_fc.shape,
                                                               generator=torch.Generator().manual_seed(0))
    expected = outputs(engine(target, None, 0), PROMPTS, max_tokens=24)
    reference = [_reference_feature_drafting(target, drafter, PROMPTS[i], r.output_token_ids, 3)
                 for i, r in enumerate(expected)]
    assert 0 < sum(a for _, a in reference) < sum(d for d, _ in reference)  # both verdicts occur
    for batch in (1, 4):
        got = outputs(engine(target, runner_for(None, drafter), 3, batch), PROMPTS, max_tokens=24)
        assert [r.output_token_ids for r in got] == [r.output_token_ids for r in expected]
        assert [(r.stats.drafted, r.stats.accepted) for r in got] == reference
    eng = engine(target, runner_for(None, derive_drafter(target, [0])), 3)
    for i, p in enumerate(PROMPTS[:3]):
        eng.add_request(Request(str(i), p, SamplingParams(max_tokens=20)))
    results = {}
    for step in range(100):
        if step == 2:
            eng.set_drafter(runner_for(None, drafter), "feature")
        results.update({out.request_id: out.result for out in eng.step() if out.finished})
        if not eng.has_work():
            break
    assert [results[str(i)].output_token_ids for i in range(3)] == [r.output_token_ids[:20] for r in expected[:3]]
    assert {r.drafter_version for r in results.values()} == {"feature"}


def test_request_validation_messages(target):
    eng = engine(target, None, 0, max_model_len=64)
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        eng.validate(Request("a", [1] * 60, SamplingParams(max_tokens=10)))
    with pytest.raises(ValueError, match="empty"):
        eng.validate(Request("a", [], SamplingParams()))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.validate(Request("a", [10**6], SamplingParams(max_tokens=4)))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def _token_pair_distribution(target, prompt, top_k, temperature):
    """Exact P(x2) = sum_x1 P(x1) P(x2 | x1) under top-k/temperature processing, from the target itself."""
    from draftsmith.sampling import processed_probs

    def probs(ids):
        with torch.no_grad():
            logits = target.model(torch.tensor(ids)).logits[:, -1:]
        n = logits.shape[0]
        return processed_probs(logits, torch.full((n,), temperature), torch.full((n,), top_k),
                               torch.ones(n))[:, 0]

    p1 = probs([prompt])[0]
    support = p1.nonzero().flatten()
    p2 = probs([prompt + [int(t)] for t in support])
    return (p1[support, None] * p2).sum(0)


def _second_token_p_value(results, expected: torch.Tensor) -> float:
    """Chi-square p-value of the results' second output tokens (the first decided by draft + verification; the
    prefill samples the first) against the exact distribution `expected`; fails on a token outside its support."""
    scipy_stats = pytest.importorskip("scipy.stats")
    observed = torch.bincount(torch.tensor([r.output_token_ids[1] for r in results]), minlength=expected.numel())
    n = len(results)
    support = expected > 1e-9
    assert observed[~support].sum() == 0
    exp_counts = expected[support] * n
    keep = exp_counts >= 5
    obs = torch.cat([observed[support][keep], observed[support][~keep].sum()[None]]).double()
    exp = torch.cat([exp_counts[keep], exp_counts[~keep].sum()[None]]).double()
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()
    _, p_value = scipy_stats.chisquare(obs.numpy(), exp.numpy(), sum_check=False)
    return p_value


def test_speculative_sampling_reproduces_the_target_distribution(target, drafters):
    prompt, top_k, temperature, n = [5, 6, 7], 6, 1.3, 3000
    expected = _token_pair_distribution(target, prompt, top_k, temperature)
    eng = engine(target, drafters["layer0"], 3, batch=64)
    results = eng.generate([Request(str(i), prompt, SamplingParams(max_tokens=3, temperature=temperature, top_k=top_k,
                                                                     seed=i)) for i in range(n)])
    assert sum(r.stats.accepted for r in results) > 0 and sum(r.stats.drafted for r in results) > sum(
        r.stats.accepted for r in results)  # both branches (accept and recover) were exercised
    p_value = _second_token_p_value(results, expected)
    assert p_value > 1e-3, f"speculative samples do not follow the target distribution (p={p_value:.2e})"


def test_seeded_sampling_is_reproducible(target, drafters):
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7)
    a = outputs(engine(target, drafters["layer0"], 3), [PROMPTS[0]], **params.__dict__)[0]
    b = outputs(engine(target, drafters["layer0"], 3), [PROMPTS[0]], **params.__dict__)[0]
    assert a.output_token_ids == b.output_token_ids


@pytest.mark.parametrize("drafter_name", [None, "layer0", "trimmed", "feature", "bad"])
@pytest.mark.parametrize("batch", [1, 4])
def test_prompt_lookup_is_lossless_beside_any_drafter_and_without_one(target, drafters, drafter_name, batch):
    prompts = PROMPTS + [[20, 21, 22, 23, 20, 21, 22, 23, 20, 21]]  # repeats itself: lookup finds "20 21"
    expected = [r.output_token_ids for r in outputs(engine(target, None, 0), prompts, max_tokens=24)]
    drafter = drafters[drafter_name] if drafter_name else None
    got = outputs(engine(target, drafter, 4, batch, prompt_lookup_max=3, prompt_lookup_min=1), prompts, max_tokens=24)
    assert [r.output_token_ids for r in got] == expected
    looked_up = sum(r.stats.lookup_drafted for r in got)
    assert 0 < looked_up and 0 < sum(r.stats.lookup_accepted for r in got) <= looked_up
    if drafter_name is None:  # only lookup drafts; rows without a match decode one token
        assert sum(r.stats.drafted for r in got) == looked_up
    else:
        assert sum(r.stats.drafted for r in got) > looked_up
    for r in got:
        assert int(r.accept_mask.sum()) == r.stats.accepted and r.stats.emitted_in_steps + 1 == 24


def test_prompt_lookup_sampling_reproduces_the_target_distribution(target):
    """A lookup proposal is a one-hot draft: accepted with probability p(x), else resampled from p without x."""
    # Every other token occurs in the prompt followed by token 9, so lookup proposes 9 after half the first
    # tokens (a wrong acceptance rule would move mass to or from 9); no top-k: 9 always has some probability.
    vocab = target.model.config.vocab_size
    top_k, temperature, n = 0, 1.5, 3000
    prompt = [t for token in range(3, vocab, 2) for t in (token, 9)] + [5, 6, 7]
    expected = _token_pair_distribution(target, prompt, top_k, temperature)
    eng = engine(target, None, 3, batch=64, prompt_lookup_max=2, prompt_lookup_min=1)
    results = eng.generate([Request(str(i), prompt, SamplingParams(max_tokens=3, temperature=temperature, top_k=top_k,
                                                                     seed=i)) for i in range(n)])
    looked_up = sum(r.stats.lookup_drafted for r in results)
    assert 0 < sum(r.stats.lookup_accepted for r in results) < looked_up  # both accept and recover happened
    p_value = _second_token_p_value(results, expected)
    assert p_value > 1e-3, f"lookup samples do not follow the target distribution (p={p_value:.2e})"


def test_engine_config_checks_the_lookup_range():
    EngineConfig(prompt_lookup_max=0, prompt_lookup_min=2)  # off: not checked
    EngineConfig(prompt_lookup_max=1, prompt_lookup_min=1)
    with pytest.raises(ValueError, match=r"prompt_lookup_min \(3\) must be <= prompt_lookup_max \(2\)"):
        EngineConfig(prompt_lookup_max=2, prompt_lookup_min=3)
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        EngineConfig(prompt_lookup_max=3, prompt_lookup_min=0)


@pytest.mark.parametrize("drafter_name", ["layer0", "feature"])
def test_speculation_switches_off_for_large_batches_and_back_on(target, drafters, drafter_name):
    """disable_speculation_at_batch: steps with that many sequences decode autoregressively; once the batch
    shrinks the drafter catches up from the target's tokens and speculates again, output unchanged."""
    # Short and long requests: the batch of 4 shrinks to the long ones after the short ones finish.
    lengths = [4, 4, 30, 30]
    expected = [r.output_token_ids for r in engine(target, None, 0).generate(
        [Request(str(i), p, SamplingParams(max_tokens=n)) for i, (p, n) in enumerate(zip(PROMPTS, lengths))])]

    def run(threshold):
        eng = engine(target, drafters[drafter_name], 3, batch=4, disable_speculation_at_batch=threshold)
        return eng.generate([Request(str(i), p, SamplingParams(max_tokens=n))
                             for i, (p, n) in enumerate(zip(PROMPTS, lengths))])

    always, sometimes, never = run(0), run(3), run(1)
    for got in (always, sometimes, never):
        assert [r.output_token_ids for r in got] == expected
    drafted = [sum(r.stats.drafted for r in got) for got in (always, sometimes, never)]
    assert drafted[0] > drafted[1] > 0 and drafted[2] == 0
    assert all(r.stats.steps == len(r.output_token_ids) - 1 for r in never)  # one token per step
    assert sum(r.stats.drafted for r in sometimes[:2]) == 0  # the short ones only ever ran in a batch of >= 3


def test_engine_config_refuses_a_negative_batch_threshold():
    with pytest.raises(ValueError, match="disable_speculation_at_batch"):
        EngineConfig(disable_speculation_at_batch=-1)


@pytest.mark.parametrize("drafter_name", ["layer0", "feature"])
def test_rows_of_different_draft_lengths_at_the_context_limit(target, drafters, drafter_name):
    """A request that drafts nothing, with max_tokens at its limit, beside one drafting 4: the verification
    (padded to the widest draft) and the drafter's draft forwards must stay inside the cache."""
    max_len, prompt = 32, list(range(30, 56))
    short = Request("ar", prompt, SamplingParams(max_tokens=max_len - len(prompt) - 1), num_speculative_tokens=0)
    drafting = Request("spec", PROMPTS[0], SamplingParams(max_tokens=20), num_speculative_tokens=4)
    expected = outputs(engine(target, None, 0), [prompt], max_tokens=short.params.max_tokens)
    expected += outputs(engine(target, None, 0), [PROMPTS[0]], max_tokens=20)
    got = engine(target, drafters[drafter_name], 4, max_model_len=max_len).generate([short, drafting])
    assert [r.output_token_ids for r in got] == [r.output_token_ids for r in expected]
    assert [r.finish_reason for r in got] == ["length", "length"]
    assert got[1].stats.drafted > 0 and got[0].stats.drafted == 0
