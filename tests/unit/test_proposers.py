"""The proposer interface: every way of drafting is lossless behind it, and a new one is a class plus its
registration (no change to the engine)."""

import pytest
import torch

from draftsmith import layer_parallel as lp
from draftsmith import proposers
from draftsmith.models import TinyPreset, derive_drafter, tiny_model
from draftsmith.proposers import base
from draftsmith.sampling import SamplingParams
from draftsmith.specdec import EngineConfig, Request, SpecEngine, runner_for
from test_specdec import _second_token_p_value

PROMPTS = [[5, 6, 7], [10, 11, 12, 13, 14, 15], [3], [20, 21, 22, 23, 20, 21, 22, 23, 20, 21], [40, 41]]


class EchoProposer(base.Proposer):
    """A model-free way of drafting, defined here: propose the row's last token, gamma times."""

    def __init__(self, runner, view):
        self.view = view
        self.commits = 0

    def propose(self, rows, gammas):
        draft = base.Draft.zeros(rows, max(gammas), self.view, self.name)
        for row, (tokens, gamma) in enumerate(zip(rows.tokens, gammas)):
            draft.tokens[row, :gamma] = tokens[-1]
            if draft.probs is not None:  # a deterministic proposal: q is one-hot
                draft.probs[row, torch.arange(gamma), tokens[-1]] = 1
            draft.lengths[row] = gamma
        return draft

    def commit(self, rows, draft, accepted):
        self.commits += 1


@pytest.fixture
def echo_registered(monkeypatch):
    """Registers EchoProposer for runners marked `echo`, for this test only."""
    monkeypatch.setattr(base, "DRAFTERS", dict(base.DRAFTERS))
    base.register("echo", accepts=lambda runner: getattr(runner, "echo", False))(EchoProposer)


@pytest.fixture(scope="module")
def target():
    return tiny_model(TinyPreset(num_hidden_layers=4))


@pytest.fixture(scope="module")
def runners(target):
    layer_parallel = runner_for(None, derive_drafter(target, "first3"))
    lp.install(layer_parallel, lp.LayerParallelConfig(2))
    echo = runner_for(None, derive_drafter(target, [0]))
    echo.echo = True
    return {"none": None, "lookup": None, "token": runner_for(None, derive_drafter(target, [0])),
            "feature": runner_for(None, derive_drafter(target, [1], reads_target_features=True)),
            "layer_parallel": layer_parallel, "lookup+token": runner_for(None, derive_drafter(target, [1])),
            "echo": echo}


def _engine(target, runner, method, gamma=3, batch=4, **config):
    lookup = dict(prompt_lookup_max=3, prompt_lookup_min=1) if method.startswith("lookup") else {}
    return SpecEngine(runner_for(target.model), runner, eos_token_ids=[],
                      config=EngineConfig(num_speculative_tokens=gamma, max_batch_size=batch, **lookup, **config))


def test_each_runner_gets_its_registered_proposer(target, runners, echo_registered):
    names = {method: _engine(target, runner, method).proposer.name for method, runner in runners.items()}
    assert names == {"none": "none", "lookup": "lookup+drafter", "token": "token", "feature": "feature",
                     "layer_parallel": "layer_parallel", "lookup+token": "lookup+drafter", "echo": "echo"}
    assert _engine(target, runners["lookup+token"], "lookup").proposer.drafter.name == "token"


@pytest.mark.parametrize("method", ["none", "lookup", "token", "feature", "layer_parallel", "lookup+token", "echo"])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_output_is_the_targets_for_every_proposer(target, runners, echo_registered, method, batch):
    expected = [r.output_token_ids for r in _engine(target, None, "none", gamma=0).generate(
        [Request(str(i), p, SamplingParams(max_tokens=20)) for i, p in enumerate(PROMPTS)])]
    engine = _engine(target, runners[method], method, batch=batch)
    got = engine.generate([Request(str(i), p, SamplingParams(max_tokens=20)) for i, p in enumerate(PROMPTS)])
    assert [r.output_token_ids for r in got] == expected
    drafted = sum(r.stats.drafted for r in got)
    assert (drafted == 0) == (method == "none")
    if method == "echo":
        assert engine.proposer.commits > 0


def _pair_distribution(target, prompt, temperature):
    """Exact P(second output token) of the target under `temperature` (no top-k/top-p)."""
    from draftsmith.sampling import processed_probs

    def probs(ids):
        with torch.no_grad():
            logits = target.model(torch.tensor(ids)).logits[:, -1:]
        n = logits.shape[0]
        return processed_probs(logits, torch.full((n,), temperature), torch.zeros(n, dtype=torch.long),
                               torch.ones(n))[:, 0]

    p1 = probs([prompt])[0]
    support = p1.nonzero().flatten()
    return (p1[support, None] * probs([prompt + [int(t)] for t in support])).sum(0)


@pytest.mark.parametrize("method", ["lookup", "token", "feature", "layer_parallel", "lookup+token", "echo"])
def test_sampled_output_keeps_the_target_distribution_for_every_proposer(target, runners, echo_registered, method):
    """Chi-square of the second output token (the first one a draft and its verification decide) against the
    target's exact distribution; seeded, so deterministic. Both verdicts (accept and recover) occur."""
    prompt, temperature, n = [7, 9, 5, 7, 9, 5, 6, 7], 1.5, 1500
    if method.startswith("lookup"):  # every other token occurs followed by 9: lookup proposes 9 after half of them
        prompt = [t for token in range(3, target.model.config.vocab_size, 2) for t in (token, 9)] + prompt
    expected = _pair_distribution(target, prompt, temperature)
    engine = _engine(target, runners[method], method, gamma=2, batch=64)
    results = engine.generate([Request(str(i), prompt, SamplingParams(max_tokens=3, temperature=temperature, seed=i))
                               for i in range(n)])
    accepted, drafted = sum(r.stats.accepted for r in results), sum(r.stats.drafted for r in results)
    assert 0 < accepted < drafted
    p_value = _second_token_p_value(results, expected)
    assert p_value > 1e-3, f"{method}: samples do not follow the target distribution (p={p_value:.2e})"


@pytest.mark.parametrize("method", ["token", "feature", "layer_parallel"])
def test_per_row_gammas_including_zero_are_lossless(target, runners, method):
    """Rows of one batch draft different numbers of tokens (0 included), as a per-row speculation policy would
    ask, and the drafter cache stays exact per slot across admissions, releases and slot moves."""
    expected = [r.output_token_ids for r in _engine(target, None, "none", gamma=0).generate(
        [Request(str(i), p, SamplingParams(max_tokens=3 + 5 * i)) for i, p in enumerate(PROMPTS)])]
    engine = _engine(target, runners[method], method, gamma=4, batch=3)
    requests = [Request(str(i), p, SamplingParams(max_tokens=3 + 5 * i), num_speculative_tokens=(0, 4, 1, 3, 2)[i])
                for i, p in enumerate(PROMPTS)]
    got = engine.generate(requests)
    assert [r.output_token_ids for r in got] == expected
    assert got[0].stats.drafted == 0 and got[1].stats.drafted > 0


def test_lookup_first_runs_the_drafter_only_for_rows_without_a_match():
    view = base.EngineView(slots=2, max_len=16, vocab_size=10, device=torch.device("cpu"),
                           target_features=torch.zeros(2, 16, 4))
    calls = []

    class Recorder(base.Proposer):
        name = "recorder"

        def propose(self, rows, gammas):
            calls.append(list(gammas))
            draft = base.Draft.zeros(rows, max(gammas), view, self.name)
            draft.tokens.fill_(7)
            draft.lengths = list(gammas)
            return draft

        def commit(self, rows, draft, accepted):
            calls.append(("commit", list(accepted)))

    chain = proposers.LookupThenDrafter(proposers.LookupProposer(view, min_n=1, max_n=2), Recorder())
    matched, unmatched = [1, 2, 3, 1, 2], [4, 5, 6]
    rows = base.Rows(slice(0, 2), [matched, unmatched], None, lambda count: torch.zeros(2, count))
    draft = chain.propose(rows, [2, 0])  # the row without a match does not speculate: no drafter
    assert calls == [] and draft.lengths == [2, 0] and draft.sources[0] == proposers.LOOKUP
    assert draft.tokens[0].tolist() == [3, 1]
    draft = chain.propose(rows, [2, 3])
    assert calls == [[2, 3]] and draft.lengths == [2, 3] and draft.sources == [proposers.LOOKUP, "recorder"]
    assert draft.tokens.tolist() == [[3, 1, 7], [7, 7, 7]]
    chain.commit(rows, draft, [2, 1])  # the drafter hears only of its own tokens
    assert calls[-1] == ("commit", [0, 1])


def test_proposers_package_exports_the_interface():
    for name in ("Draft", "Rows", "Proposer", "register", "build_proposer", "DrafterProposer", "EngineView"):
        assert hasattr(proposers, name)
