"""`draftsmith bench distill` end to end on the tiny target: generated traffic, a derived drafter trained
layer-parallel-aware, held-out evaluation; then a second run that starts from the saved drafter under a
spent time budget. Checks the JSON contract the issue names, not gains (the tiny target is random)."""

import json

import pytest
from draftsmith.datasets_io import sharegpt_split, user_turn_prompts

from pipelines import bench_distill

pytestmark = pytest.mark.integration

REQUIRED = ("records", "train_tokens", "train_seconds", "token_acceptance_before", "token_acceptance_after",
            "acceptance_rate_before", "acceptance_rate_after", "mean_accepted_length_before",
            "mean_accepted_length_after", "speculative_tok_s_before", "speculative_tok_s_after",
            "autoregressive_tok_s", "speedup_after")


def _run(capsys, *argv) -> dict:
    assert bench_distill.main(["--target", "tiny", "--heldout-n", "3", "--max-new-tokens", "8",
                               "--eval-batch-size", "3", "--torch-threads", "1", "--in-process", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture
def evaluation_threads(monkeypatch):
    """The torch threads every evaluation ran at, seen from inside draftsmith.evaluation."""
    import torch
    from draftsmith import evaluation

    seen, real = [], evaluation.evaluate_drafters

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_drafters", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a default unlike --torch-threads 1: "before" used to run at it
    yield seen
    torch.set_num_threads(threads)


def test_bench_distill_generate_train_evaluate_and_resume(capsys, tmp_path, evaluation_threads):
    traffic, saved = str(tmp_path / "traffic"), tmp_path / "drafter"
    # each conversation's first two user turns, each with its history, are answered
    expected = sum(len(user_turn_prompts(c, 2)) for c in sharegpt_split("train", 12, 0))
    assert expected > 12
    first = _run(capsys, "--traffic", "generate", "--n", "12", "--user-turns", "2", "--traffic-uri", traffic,
                 "--max-prompt-tokens", "64",
                 "--max-output-tokens", "16", "--backfill-batch-size", "4", "--layers", "first1+last1",
                 "--draft-vocab-size", "64", "--layer-parallel", "2", "--steps", "3", "--batch-size", "4",
                 "--save-drafter", str(saved))
    for key in REQUIRED:
        assert key in first, key
    assert first["records"] == expected and first["user_turns"] == 2 and first["steps"] == 3
    assert first["traffic_reused"] is False and first["train_tokens"] > 0
    assert first["layer_parallel_training"] == 2 and 0.0 <= first["final_top1_layer_parallel"] <= 1.0
    assert first["draft_vocab_size"] == 64 and (saved / "config.json").exists()
    assert 0.0 <= first["token_acceptance_after"] <= 1.0 and first["autoregressive_tok_s"] > 0
    assert first["verify_cost_ratio"] > 0 and first["predicted_speedup_measured_v"] > 0
    # issue 18: every arm at the same threads, warmed alike; c and v measured at the evaluation's batch
    assert evaluation_threads == [1, 1] and first["torch_threads"] == {"before": 1, "after": 1}
    assert set(first["warmup"]) == {"before", "after", "autoregressive"}
    assert first["cost_batch_size"] == 3 and first["cost_ratio"] > 0 and first["drafter_step_ms"] > 0
    assert first["measures"]["tok_s"].startswith("end to end")
    assert first["measures"]["predicted_speedup"].startswith("decode phase")

    # the same traffic, the saved drafter as the start, a budget already spent: no step, nothing lost
    second = _run(capsys, "--traffic-uri", traffic, "--reuse-traffic", "--init-drafter", str(saved),
                  "--steps", "50", "--max-train-minutes", "1e-9", "--layer-parallel-plan", "1,1",
                  "--prompt-lookup-max", "3", "--prompt-lookup-min", "1")
    assert second["records"] == expected and second["steps"] == 0
    assert second["traffic_reused"] is True and second["user_turns"] is None and second["init_drafter"] == str(saved)
    assert second["layer_parallel_training"] == [1, 1]
    assert second["token_acceptance_before"] == pytest.approx(second["token_acceptance_after"])
    assert second["token_acceptance_before"] == pytest.approx(first["token_acceptance_after"])
    # engine options beside the distilled drafter are measured separately, on the same prompts and baseline
    assert "engine_options" not in first and second["engine_options"] == {"prompt_lookup_min": 1,
                                                                          "prompt_lookup_max": 3}
    assert 0.0 <= second["token_acceptance_after_with_options"] <= 1.0 and second["speedup_after_with_options"] > 0
    assert set(second["warmup"]) == {"before", "after", "autoregressive", "after_with_options"}
    assert second["mean_accepted_length_after_with_options"] >= 1.0


def test_bench_distill_refuses_a_time_budget_for_ray_train():
    with pytest.raises(SystemExit):
        bench_distill.parse_args(["--max-train-minutes", "5"])
    with pytest.raises(SystemExit):
        bench_distill.parse_args(["--prompt-lookup-max", "1", "--prompt-lookup-min", "2"])
    with pytest.raises(SystemExit):
        bench_distill.parse_args(["--user-turns", "0"])


def test_bench_distill_refuses_a_malformed_plan():
    with pytest.raises(SystemExit):
        bench_distill.parse_args(["--in-process", "--layer-parallel-plan", "1,two"])
