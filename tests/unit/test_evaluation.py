"""draftsmith.evaluation on the tiny preset: consistent counters, the self-drafter bound, the PNG."""

import pytest

from draftsmith.evaluation import (
    evaluate_drafters,
    heldout_prompts_from_traffic,
    plot_comparison,
    prompts_from_messages,
    self_drafter,
)
from draftsmith.models import derive_drafter, tiny_model

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
    return evaluate_drafters(target, drafters, prompts, gamma=GAMMA, max_new_tokens=24, temperatures=(0.0, 1.0),
                             seed=0, batch_size=4)


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


def test_heldout_prompts_from_traffic_take_the_newest_slice(target, tmp_path):
    import datetime as dt

    from draftsmith.traffic import TrafficRecord, TrafficWriter

    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    with TrafficWriter(tmp_path / "log") as writer:
        for i in range(20):
            writer.add(TrafficRecord(
                request_id=f"r{i}", created_at=t0 + dt.timedelta(minutes=i), target_id=target.model_id,
                target_revision=target.revision, tokenizer_hash=target.tokenizer_hash, temperature=0.0,
                max_tokens=4, prompt_token_ids=[5, 6, i + 10], output_token_ids=[7], target_topk_ids=[[7]],
                target_topk_logprobs=[[-0.1]], accept_mask=[False], finish_reason="length"))
    got = heldout_prompts_from_traffic(str(tmp_path / "log"), target, n=10, max_prompt_tokens=2, heldout_fraction=0.2)
    assert got == [[6, 29], [6, 28], [6, 27], [6, 26]]
