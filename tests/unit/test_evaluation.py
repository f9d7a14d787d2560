"""draftsmith.evaluation on the tiny preset: consistent counters, the self-drafter bound, the PNG, the
challenger's held-out window (no training prompt reaches it), and the paired speed timing under the gate."""

import datetime as dt

import pytest

from draftsmith import evaluation
from draftsmith.engine_config import EngineConfig
from draftsmith.evaluation import (
    evaluate_drafters,
    heldout_prompts_from_traffic,
    measure_speed_paired,
    plot_comparison,
    prompts_from_messages,
    self_drafter,
)
from draftsmith.gate import decide
from draftsmith.models import derive_drafter, tiny_model
from draftsmith.traffic import TrafficRecord, TrafficWriter
from slow_drafters import slow_drafters  # tests/slow_drafters.py (tests/ is on sys.path: conftest.py lives there)

GAMMA = 4


@pytest.fixture(scope="module")
def target():
    return tiny_model()


@pytest.fixture(scope="module")
def prompts(target):
    messages = [[{"role": "user", "content": f"question {i}: {'why ' * i}is the sky blue?"}] for i in range(6)]
    return prompts_from_messages(target.tokenizer, messages, max_prompt_tokens=40)


@pytest.fixture(scope="module")
def report(target, prompts):
    drafters = {"self": self_drafter(target), "layer0": derive_drafter(target, [0])}
    return evaluate_drafters(target, drafters, prompts, max_new_tokens=24, temperatures=(0.0, 1.0),
                             engine=EngineConfig(num_speculative_tokens=GAMMA, max_batch_size=4, seed=0))


def test_prompts_use_chat_template_and_cut_from_the_left(target):
    long = [[{"role": "user", "content": "x" * 300}]]
    (ids,) = prompts_from_messages(target.tokenizer, long, max_prompt_tokens=32)
    assert len(ids) == 32
    assert target.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_counts_are_consistent(report, prompts):
    assert report.num_prompts == len(prompts) and report.temperatures == (0.0, 1.0)
    for name, by_t in report.drafters.items():
        for t, m in by_t.items():
            assert m.requests == len(prompts) and m.output_tokens > 0 and m.steps > 0
            assert 0 <= m.accepted <= m.compared <= m.drafted
            assert m.token_acceptance >= m.acceptance_rate
            assert 1.0 <= m.mean_accepted_length <= GAMMA + 1
            assert m.tok_s > 0
    for t, m in report.autoregressive.items():
        assert m.drafted == 0 and m.tok_s > 0


def test_target_as_its_own_drafter_is_always_accepted_greedy(report):
    greedy = report.get("self", 0.0)
    assert greedy.token_acceptance == 1.0 and greedy.acceptance_rate == 1.0
    # Sampled: q == p, so min(1, p/q) == 1 too.
    assert report.get("self", 1.0).token_acceptance == pytest.approx(1.0)
    assert report.get("layer0", 0.0).token_acceptance < 1.0


def test_greedy_output_is_the_same_for_every_drafter(report):
    # Lossless: greedy produces the target's tokens, so every drafter emits the same count.
    counts = {by_t[0.0].output_tokens for by_t in report.drafters.values()}
    assert counts == {report.autoregressive[0.0].output_tokens}


def test_flat_metrics_headline_is_greedy(report):
    flat = report.flat_metrics("layer0")
    assert flat["heldout_acceptance_rate"] == flat["heldout_acceptance_rate_greedy"]
    assert {"heldout_token_acceptance_sampled", "heldout_mean_accepted_length_sampled",
            "heldout_autoregressive_tok_s_greedy"} <= set(flat)


def test_plot_written(report, tmp_path):
    path = plot_comparison(report, tmp_path / "cmp.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _record(target, i, minute, prompt, output=(7,)):
    return TrafficRecord(
        request_id=f"r{i}", created_at=T0 + dt.timedelta(minutes=minute), target_id=target.model_id,
        target_revision=target.revision, tokenizer_hash=target.tokenizer_hash, temperature=0.0, max_tokens=4,
        prompt_token_ids=list(prompt), output_token_ids=list(output), target_topk_ids=[[t] for t in output],
        target_topk_logprobs=[[-0.1]] * len(output), accept_mask=[False] * len(output), finish_reason="length")


def test_heldout_prompts_are_the_newest_window(target, tmp_path):
    with TrafficWriter(tmp_path / "log") as writer:
        for i in range(20):
            writer.add(_record(target, i, i, [5, 6, i + 10]))
    got = heldout_prompts_from_traffic(str(tmp_path / "log"), target, n=10, max_prompt_tokens=2,
                                       heldout_since=T0 + dt.timedelta(minutes=16))
    assert got == [[6, 29], [6, 28], [6, 27], [6, 26]]


def test_no_training_prompt_reaches_evaluation(target, tmp_path):
    """A log where the old rules leak: the same prompt with another answer on both sides of the split (dedupe
    keeps both), and a later turn whose prompt holds an earlier training prompt and its answer. The job's split
    (heldout_since chosen from heldout_fraction) and evaluation's window from that time agree, and no prompt
    that was trained on, nor one that starts with it, is evaluated."""
    from draftsmith.distill_data import build_distill_dataset

    first_turn, answer = [5, 6, 7], [8, 9]
    records = [_record(target, i, i, [20 + i, 21, 22]) for i in range(12)]  # distinct training prompts
    records.append(_record(target, 12, 12, first_turn, answer))  # trained on
    later = [
        _record(target, 13, 13, first_turn, [30, 31]),  # the same prompt, another answer: held-out side
        _record(target, 14, 14, first_turn + answer + [40, 41]),  # its next turn: contains the training prompt
        _record(target, 15, 15, [50, 51, 52]),  # genuinely new
        _record(target, 16, 16, [60, 61]),  # genuinely new
    ]
    uri = str(tmp_path / "log")
    with TrafficWriter(uri) as writer:
        for r in records + later:
            writer.add(r)
    job = build_distill_dataset(uri, target_id=target.model_id, target_revision=target.revision,
                                tokenizer_hash=target.tokenizer_hash, heldout_fraction=0.2)
    heldout_since = dt.datetime.fromisoformat(job.stats["heldout_since"])
    assert heldout_since == T0 + dt.timedelta(minutes=13)  # 17 records, ceil(0.2 * 17) = 4 held out
    trained = [tuple(p) for p in job.train["prompt_token_ids"]]
    assert tuple(first_turn) in trained
    assert job.stats["heldout_excluded"] == 2  # the other answer and the next turn
    prompts = heldout_prompts_from_traffic(uri, target, n=32, max_prompt_tokens=64, heldout_since=heldout_since)
    assert prompts == [[60, 61], [50, 51, 52]]
    for prompt in prompts:
        assert not any(tuple(prompt[:len(t)]) == t for t in trained)


def test_records_sharing_the_cut_time_are_all_held_out(target, tmp_path):
    uri = str(tmp_path / "log")
    with TrafficWriter(uri) as writer:
        for i in range(10):
            writer.add(_record(target, i, min(i, 7), [100 + i]))  # records 7, 8, 9 share one time
    from draftsmith.distill_data import build_distill_dataset

    data = build_distill_dataset(uri, target_id=target.model_id, target_revision=target.revision,
                                 tokenizer_hash=target.tokenizer_hash, heldout_fraction=0.2)
    assert data.stats["heldout_since"] == (T0 + dt.timedelta(minutes=7)).isoformat()
    assert len(data.train) == 7 and len(data.heldout) == 3
    assert max(data.train["created_at"]) < min(data.heldout["created_at"])


# ---------------------------------------------------------------------------- the gate's timing


@pytest.fixture
def slowed(monkeypatch):
    """Make the named drafters' runners sleep on every forward (version -> seconds): a costlier drafter."""
    return slow_drafters(monkeypatch)


def _paired(target, prompts, drafters):
    paired = measure_speed_paired(target, drafters, prompts, max_new_tokens=24,
                                  engine=EngineConfig(num_speculative_tokens=GAMMA, max_batch_size=8))
    (a, b) = drafters
    return decide(paired.tok_s[a], paired.tok_s[b], challenger_pooled_tok_s=paired.pooled[a].tok_s,
                  champion_pooled_tok_s=paired.pooled[b].tok_s,
                  challenger_token_acceptance=paired.pooled[a].token_acceptance,
                  champion_token_acceptance=paired.pooled[b].token_acceptance, champion_version="1"), paired


def test_gate_refuses_a_drafter_that_accepts_more_but_serves_slower(target, prompts, slowed):
    best = self_drafter(target)  # accepts every token
    slowed[best.version] = 0.02
    decision, paired = _paired(target, prompts, {"challenger": best, "champion": derive_drafter(target, [0])})
    assert decision.challenger_token_acceptance == 1.0 > decision.champion_token_acceptance
    assert not decision.promoted and decision.speed_ratio < 1
    assert "accepts more tokens but serves slower" in decision.reason
    assert decision.prompts == len(prompts) and all(v > 0 for v in paired.tok_s["champion"])


def test_gate_promotes_a_drafter_that_serves_faster(target, prompts, slowed):
    champion = derive_drafter(target, [0])
    champion.version = "slow-champion"
    slowed[champion.version] = 0.004
    decision, _ = _paired(target, prompts, {"challenger": derive_drafter(target, [0]), "champion": champion})
    assert decision.promoted, decision.reason
    assert decision.p_value < 0.05 and decision.speed_ratio > 1
    assert decision.tags()["gate_prompts"] == str(len(prompts))


def test_paired_timing_interleaves_and_warms_every_drafter_alike(target, prompts, monkeypatch):
    added: list[tuple[str, str]] = []
    real_add = evaluation.SpecEngine.add_request

    def add_request(self, request):
        added.append((self.drafter_version, request.request_id))
        return real_add(self, request)

    monkeypatch.setattr(evaluation.SpecEngine, "add_request", add_request)
    a, b = derive_drafter(target, [0]), derive_drafter(target, [1])
    a.version, b.version = "a", "b"
    paired = measure_speed_paired(target, {"a": a, "b": b}, prompts[:4], max_new_tokens=8,
                                  engine=EngineConfig(num_speculative_tokens=2))
    assert added[:2] == [("a", "warmup-0"), ("b", "warmup-0")]  # the same untimed warm-up for each
    # per prompt, both drafters back to back, the order alternating so that drift hits both alike
    assert added[2:] == [("a", "eval-0"), ("b", "eval-0"), ("b", "eval-1"), ("a", "eval-1"),
                         ("a", "eval-2"), ("b", "eval-2"), ("b", "eval-3"), ("a", "eval-3")]
    assert len(paired.tok_s["a"]) == 4 and paired.pooled["a"].requests == 4
