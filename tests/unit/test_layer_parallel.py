"""Layer-parallel drafting (EasySpec) with KV calibration, on tiny random models."""

import pytest
import torch

from draftsmith import layer_parallel as lp
from draftsmith.llama import ForwardContext
from draftsmith.models import TinyPreset, derive_drafter, tiny_model
from draftsmith.sampling import SamplingParams
from draftsmith.specdec import EngineConfig, Request, SpecEngine, runner_for

PROMPTS = [[1, 5, 9, 20, 33], [2, 7, 7, 100, 3, 4, 5, 6, 8], [40], [11, 12, 13, 14]]


@pytest.fixture(scope="module")
def pair():
    target = tiny_model(TinyPreset(num_hidden_layers=6))
    drafter = derive_drafter(target, "first4")
    return target, drafter


def _requests(max_tokens=24, temperature=0.0):
    return [Request(str(i), p, SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                              ignore_eos=True, seed=i))
            for i, p in enumerate(PROMPTS)]


def _engine(target, drafter, config=None, *, gamma=4, batch=4, topk=0):
    drafter_runner = runner_for(None, drafter)
    lp.install(drafter_runner, config)
    return SpecEngine(runner_for(target.model), drafter_runner,
                      config=EngineConfig(num_speculative_tokens=gamma, max_batch_size=batch,
                                          topk_logprobs=topk))


def _target_greedy(target):
    engine = SpecEngine(runner_for(target.model), None, config=EngineConfig(max_batch_size=4))
    return [r.output_token_ids for r in engine.generate(_requests())]


def _sequential_cache(drafter, tokens):
    """The drafter's KV entries for `tokens` from one ordinary sequential forward."""
    runner = runner_for(None, drafter)
    cache = runner.new_cache(1, 256)
    with torch.inference_mode():
        runner.hidden_states(torch.tensor([tokens]), torch.arange(len(tokens))[None], cache, slice(0, 1))
    return cache


def test_layer_plan_groups():
    assert lp.LayerPlan.grouped(5, 2).groups == ((0, 1), (2, 3), (4,))
    assert lp.LayerPlan.grouped(3, 1).is_sequential
    assert lp.LayerPlan.from_groups([[0], [1, 2]]).num_layers == 3
    with pytest.raises(ValueError):
        lp.LayerPlan.from_groups([[0, 2], [1]])
    assert lp.LayerParallelConfig(0).plan(4).is_sequential


def test_explicit_group_sizes():
    plan = lp.LayerParallelConfig(group_sizes=lp.parse_group_sizes("1, 2,2,2,1")).plan(8)
    assert plan.groups == ((0,), (1, 2), (3, 4), (5, 6), (7,)) and plan.sizes == (1, 2, 2, 2, 1)
    assert lp.LayerParallelConfig(group_sizes=(1, 3, 1)).enabled
    assert not lp.LayerParallelConfig(group_size=4, group_sizes=(1, 1)).enabled  # the sizes win
    assert lp.as_plan(3, 4).sizes == (3, 1) and lp.as_plan([2, 2], 4).sizes == (2, 2)
    assert lp.parse_group_sizes("") == ()
    with pytest.raises(ValueError, match="covers 5 layers, the drafter has 8"):
        lp.LayerParallelConfig(group_sizes=(2, 3)).plan(8)
    for bad in ("1,x,2", "2,0"):
        with pytest.raises(ValueError, match=bad):
            lp.parse_group_sizes(bad)


@pytest.mark.parametrize("group_size", [2, 3, 4])
@pytest.mark.parametrize("gamma,batch", [(1, 4), (3, 1), (3, 4), (5, 2)])
def test_greedy_output_equals_target(pair, group_size, gamma, batch):
    target, drafter = pair
    engine = _engine(target, drafter, lp.LayerParallelConfig(group_size), gamma=gamma, batch=batch)
    results = engine.generate(_requests())
    assert [r.output_token_ids for r in results] == _target_greedy(target)
    assert sum(r.stats.accepted for r in results) > 0  # the drafter is used, not bypassed


def test_calibrated_cache_equals_sequential_drafter(pair):
    target, drafter = pair
    engine = _engine(target, drafter, lp.LayerParallelConfig(2), gamma=4, batch=4)
    for request in _requests(max_tokens=40):
        engine.add_request(request)
    checked_fuzzy = checked_exact = 0
    proposer = engine.proposer
    assert proposer.name == "layer_parallel" and proposer.calibrates
    while engine.has_work():
        engine.step()
        for slot, seq in enumerate(engine.active):
            if seq.finish_reason is not None or proposer.lengths[slot] == 0:
                continue
            ref = _sequential_cache(drafter, seq.tokens)
            n = proposer.lengths[slot]  # the exact (calibrated) prefix
            for mine, theirs in ((proposer.cache.k, ref.k), (proposer.cache.v, ref.v)):
                torch.testing.assert_close(mine[:, slot, :n], theirs[:, 0, :n], rtol=1e-4, atol=1e-5)
            checked_exact += 1
            # The accepted tokens past the exact prefix still hold fuzzy entries until the next draft.
            fuzzy_end = len(seq.tokens) - 1
            if fuzzy_end > n and not torch.allclose(proposer.cache.k[1:, slot, n:fuzzy_end],
                                                    ref.k[1:, 0, n:fuzzy_end], atol=1e-5):
                checked_fuzzy += 1
        # Calibrate explicitly now (the next draft would): the accepted positions become exact.
        seqs = [s for s in engine.active if s.finish_reason is None]
        if seqs:
            with torch.inference_mode():
                proposer.catch_up(engine._batch(seqs), max_lag=0)
            for slot, seq in enumerate(seqs):
                ref = _sequential_cache(drafter, seq.tokens)
                n = len(seq.tokens) - 1
                for mine, theirs in ((proposer.cache.k, ref.k), (proposer.cache.v, ref.v)):
                    torch.testing.assert_close(mine[:, slot, :n], theirs[:, 0, :n], rtol=1e-4, atol=1e-5)
    assert checked_exact > 10
    assert checked_fuzzy > 0  # there were fuzzy accepted entries for calibration to fix


def test_group_size_one_is_exactly_sequential(pair):
    target, drafter = pair
    engines = [_engine(target, drafter, None, gamma=3, batch=4),
               _engine(target, drafter, lp.LayerParallelConfig(1), gamma=3, batch=4)]
    drafts = [[], []]
    for engine, log in zip(engines, drafts):
        original = engine.proposer.propose

        def recording(*args, _original=original, _log=log, **kwargs):
            draft = _original(*args, **kwargs)
            _log.append(draft.tokens.clone())
            return draft

        engine.proposer.propose = recording
        for request in _requests(temperature=0.8):
            engine.add_request(request)
    outputs = [[], []]
    while engines[0].has_work():
        for engine, out in zip(engines, outputs):
            out.extend((o.request_id, o.new_token_ids) for o in engine.step())
        assert torch.equal(engines[0].proposer.cache.k, engines[1].proposer.cache.k)
        assert torch.equal(engines[0].proposer.cache.v, engines[1].proposer.cache.v)
        assert engines[0].proposer.lengths == engines[1].proposer.lengths
    assert not engines[1].has_work()
    assert outputs[0] == outputs[1]
    assert len(drafts[0]) == len(drafts[1]) and all(torch.equal(a, b) for a, b in zip(*drafts))


def _prefilled_context(runner, batch=2, prefix=7, new=3, seed=0):
    """A cache holding `prefix` tokens per row, and the context of a forward over `new` more."""
    gen = torch.Generator().manual_seed(seed)
    cache = runner.new_cache(batch + 1, 64)
    rows = slice(1, batch + 1)  # not starting at slot 0, as in a running engine
    ids = torch.randint(0, runner.vocab_size, (batch, prefix), generator=gen)
    runner.hidden_states(ids, torch.arange(prefix)[None].expand(batch, prefix), cache, rows)
    positions = prefix + torch.arange(new)[None].expand(batch, new)
    cos, sin = runner.rope(positions)
    ctx = ForwardContext(cache, rows, positions, cos, sin, runner.attention_mask(positions, prefix + new))
    h = torch.randn(batch, new, runner.config.hidden_size, generator=gen)
    return h, ctx


def _qwen2_tiny():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    config = Qwen2Config(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("group", [(0, 1), (1, 2, 3)])
def test_stacked_group_forward_equals_per_layer_loop(pair, arch, group):
    model = pair[1].model if arch == "llama" else _qwen2_tiny()
    runner = runner_for(model)
    executor = lp.LayerParallelExecutor(lp.LayerPlan.from_groups(
        [[i] for i in range(group[0])] + [list(group)]
        + [[i] for i in range(group[-1] + 1, runner.num_layers)]))
    with torch.inference_mode():
        h, ctx = _prefilled_context(runner)
        ref_cache_k, ref_cache_v = ctx.cache.k.clone(), ctx.cache.v.clone()
        stack = executor.stacks(runner)[executor.plan.groups.index(group)]
        got = executor.group_forward(runner, stack, h, ctx)
        got_k, got_v = ctx.cache.k.clone(), ctx.cache.v.clone()
        ctx.cache.k.copy_(ref_cache_k)
        ctx.cache.v.copy_(ref_cache_v)
        want = lp.reference_group_forward(runner, group, h, ctx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_k, ctx.cache.k, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_v, ctx.cache.v, rtol=1e-4, atol=1e-5)


def test_stacks_follow_in_place_weight_updates(pair):
    drafter = derive_drafter(pair[0], "first4")
    runner = runner_for(None, drafter)
    executor = lp.install(runner, lp.LayerParallelConfig(2))
    first = executor.stacks(runner)
    assert executor.stacks(runner) is first  # cached
    with torch.no_grad():
        drafter.model.model.layers[1].mlp.down_proj.weight.mul_(0.5)
    rebuilt = executor.stacks(runner)
    assert rebuilt is not first
    torch.testing.assert_close(rebuilt[0].down[1], drafter.model.model.layers[1].mlp.down_proj.weight.T)


def test_stacks_follow_swapped_weights(pair):
    """Swapping two layers' weights keeps the sum of storage addresses and update counts the old version key
    summed (so the old code kept stale stacks); the per-weight version tuple sees the swap."""
    runner = runner_for(None, derive_drafter(pair[0], "first4"))
    executor = lp.install(runner, lp.LayerParallelConfig(2))
    first = executor.stacks(runner)
    runner.layers[0].down, runner.layers[1].down = runner.layers[1].down, runner.layers[0].down
    rebuilt = executor.stacks(runner)
    assert rebuilt is not first
    torch.testing.assert_close(rebuilt[0].down[0], runner.layers[0].down.T)


def test_device_weight_copies_follow_weight_updates_and_runners(pair):
    """The per-device copies of a multi-device plan are rebuilt when a weight changes in place or is replaced,
    and belong to one runner (the old cache, keyed by id(runner) alone, served stale copies)."""
    target, drafter = pair
    devices = ("cpu:0", "cpu:1")  # distinct devices: .to() copies
    runner = runner_for(None, derive_drafter(target, "first4"))
    executor = lp.install(runner, lp.LayerParallelConfig(2, devices))
    plain = runner_for(None, derive_drafter(target, "first4"))
    lp.install(plain, lp.LayerParallelConfig(2))

    def hidden(r):
        ids = torch.tensor([PROMPTS[1]])
        with torch.no_grad():
            return r.hidden_states(ids, torch.arange(ids.shape[1])[None], r.new_cache(1, 32), slice(0, 1))

    torch.testing.assert_close(hidden(runner), hidden(plain))
    with torch.no_grad():
        for r in (runner, plain):
            r.layers[1].down.mul_(0.5)  # in place
    torch.testing.assert_close(hidden(runner), hidden(plain))
    for r in (runner, plain):
        r.layers[2].up = r.layers[2].up * 1.5  # replaced
    torch.testing.assert_close(hidden(runner), hidden(plain))
    other = runner_for(None, derive_drafter(tiny_model(TinyPreset(num_hidden_layers=6), seed=5), "first4"))
    other.layer_executor = executor  # the same executor now runs another runner: its own weights
    reference = runner_for(None, derive_drafter(tiny_model(TinyPreset(num_hidden_layers=6), seed=5), "first4"))
    lp.install(reference, lp.LayerParallelConfig(2))
    torch.testing.assert_close(hidden(other), hidden(reference))


def test_config_comes_from_the_engine_config():
    config = EngineConfig(layer_parallel_group_sizes=(1, 2, 1), layer_parallel_devices=("cpu", "cpu"))
    built = lp.LayerParallelConfig.from_engine(config)
    assert built == lp.LayerParallelConfig(1, ("cpu", "cpu"), (1, 2, 1)) and built.enabled
    assert lp.LayerParallelConfig() == lp.LayerParallelConfig.from_engine(EngineConfig())
    assert not lp.LayerParallelConfig().enabled  # EngineConfig's default: sequential drafting


def test_multi_device_plan_is_lossless_and_matches_single_device(pair):
    target, drafter = pair
    multi = _engine(target, drafter, lp.LayerParallelConfig(2, ("cpu", "cpu")), gamma=3, batch=4)
    single = _engine(target, drafter, lp.LayerParallelConfig(2), gamma=3, batch=4)
    assert isinstance(multi.proposer.cache, lp.ShardedKVCache)
    out_multi, out_single = multi.generate(_requests()), single.generate(_requests())
    assert [r.output_token_ids for r in out_multi] == _target_greedy(target)
    # Same approximation on both paths, so the same drafts are accepted.
    assert [r.stats.accepted for r in out_multi] == [r.stats.accepted for r in out_single]


def test_split_target_places_contiguous_stages_and_stays_exact(pair):
    target, drafter = pair
    split = runner_for(target.model)
    executor = lp.split_target(split, ["cpu:0", "cpu:1", "cpu:2"])  # three distinct "devices" on one CPU
    assert [executor.layer_device(i).index for i in range(6)] == [0, 0, 1, 1, 2, 2]  # contiguous stages
    drafting = lp.LayerParallelExecutor(lp.LayerPlan.grouped(6, 2), ["cpu:0", "cpu:1"])
    assert [drafting.layer_device(i).index for i in range(6)] == [0, 1, 0, 1, 0, 1]  # a group's members apart
    assert not executor.approximate and lp.split_target(runner_for(target.model), ["cpu"]) is None
    with pytest.raises(ValueError, match="placement"):
        lp.LayerParallelExecutor(lp.LayerPlan.grouped(2, 1), ["cpu", "cpu"], placement="diagonal")
    plain = runner_for(target.model)
    ids, positions = torch.tensor([PROMPTS[1]]), torch.arange(len(PROMPTS[1]))[None]
    with torch.inference_mode():
        expected = plain.forward(ids, positions, plain.new_cache(1, 32), slice(0, 1))
        cache = split.new_cache(1, 32)
        got = split.forward(ids, positions, cache, slice(0, 1))
    assert isinstance(cache, lp.ShardedKVCache)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # a multi-device pair: split target + drafter groups across the same devices, still the target's greedy
    drafter_runner = runner_for(None, drafter)
    lp.install(drafter_runner, lp.LayerParallelConfig(2, ("cpu", "cpu")))
    engine = SpecEngine(split, drafter_runner, config=EngineConfig(num_speculative_tokens=3, max_batch_size=4))
    assert [r.output_token_ids for r in engine.generate(_requests())] == _target_greedy(target)


def test_training_forward_group_one_equals_hf(pair):
    model = pair[1].model
    ids = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.model(ids).last_hidden_state  # after the final norm
        got = model.model.norm(lp.training_forward(model, ids, plan=1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_training_forward_matches_serving_approximation_and_is_differentiable(pair):
    model = pair[1].model
    ids = torch.randint(0, 259, (2, 10), generator=torch.Generator().manual_seed(1))
    runner = runner_for(model)
    lp.install(runner, lp.LayerParallelConfig(2))
    with torch.no_grad():
        positions = torch.arange(10)[None].expand(2, 10)
        served = runner.hidden_states(ids, positions, runner.new_cache(2, 16), slice(0, 2))
    hidden = lp.training_forward(model, ids, plan=2)
    torch.testing.assert_close(hidden.detach(), served, rtol=1e-4, atol=1e-5)
    sequential = lp.training_forward(model, ids, plan=1).detach()
    assert not torch.allclose(hidden.detach(), sequential, atol=1e-4)
    # an explicit plan, as served (first and last layer alone)
    lp.install(runner, lp.LayerParallelConfig(group_sizes=(1, 2, 1)))
    with torch.no_grad():
        served = runner.hidden_states(ids, positions, runner.new_cache(2, 16), slice(0, 2))
        explicit = lp.training_forward(model, ids, plan=(1, 2, 1))
    torch.testing.assert_close(explicit, served, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(explicit, hidden.detach(), atol=1e-4)
    torch.testing.assert_close(lp.training_forward(model, ids, plan=(1, 1, 1, 1)).detach(), sequential)
    hidden.pow(2).mean().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_measure_layer_parallel_reports_fields(pair):
    target, drafter = pair
    drafter_runner = runner_for(None, drafter)
    report = lp.measure_layer_parallel(runner_for(target.model), drafter_runner, PROMPTS[:2],
                                       plan=lp.LayerParallelConfig(group_sizes=(1, 2, 1)),
                                       gamma=3, max_new_tokens=12, repeats=1)
    assert report["group_sizes"] == [1, 2, 1]
    for key in ("draft_step_ms_sequential", "draft_step_ms_layer_parallel", "draft_speedup",
                "token_acceptance_sequential", "token_acceptance_layer_parallel", "acceptance_drop_rel",
                "speculative_tok_s_sequential", "speculative_tok_s_layer_parallel"):
        assert isinstance(report[key], float), key
    assert report["outputs_identical"]
    assert drafter_runner.layer_executor is None  # restored
