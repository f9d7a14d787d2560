"""`draftsmith bench decode` end to end on the tiny model: every path runs and the JSON line is complete."""

import json

import pytest
import torch

from draftsmith import bench_decode
from draftsmith.llama import can_prepack

REQUIRED = ["autoregressive_tok_s", "speculative_tok_s", "hf_generate_tok_s", "hf_assisted_tok_s",
            "hf_assisted_default_tok_s", "acceptance_rate", "token_acceptance", "mean_accepted_length",
            "cost_ratio", "verify_cost_ratio", "theoretical_speedup", "predicted_speedup",
            "speedup_vs_autoregressive", "speedup_vs_hf_assisted", "greedy_mismatches", "device", "n_prompts",
            "gamma", "batch_size"]


def test_bench_decode_on_tiny_prints_one_json_line(capsys):
    assert bench_decode.main(["--target", "tiny", "--drafter", "derived:0", "--n-prompts", "2", "--gamma", "4",
                              "--max-new-tokens", "8", "--max-prompt-tokens", "32"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert [key for key in REQUIRED if key not in report] == []
    assert report["greedy_mismatches"] == 0 and report["n_prompts"] == 2
    assert report["prepacked_weights"] is can_prepack(torch.float32, "cpu")
    assert report["token_acceptance"] >= report["acceptance_rate"]
    assert 1.0 <= report["mean_accepted_length"] <= report["gamma"] + 1
    assert "tokens/s" in "\n".join(lines[:-1])  # the human-readable table comes first


def test_leviathan_expected_tokens_and_speedup():
    expected, speedup = bench_decode.leviathan(0.5, 4, 0.1, 1.0)
    assert abs(expected - (1 - 0.5 ** 5) / 0.5) < 1e-12
    assert abs(speedup - expected / 1.4) < 1e-12
    assert bench_decode.leviathan(1.0, 4, 0.0)[0] == 5


def test_bench_decode_measures_an_explicit_layer_parallel_plan(capsys):
    assert bench_decode.main(["--target", "tiny", "--drafter", "derived:0,1", "--n-prompts", "2", "--gamma", "4", "--skip-hf",
                              "--max-new-tokens", "8", "--max-prompt-tokens", "32", "--batch-size", "2",
                              "--layer-parallel-plan", "2", "--no-prepack"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["group_sizes"] == [2] and report["outputs_identical"]
    assert report["prepacked_weights"] is False
    assert report["draft_speedup"] > 0 and 0.0 <= report["token_acceptance_layer_parallel"] <= 1.0


def test_bench_decode_refuses_a_malformed_plan(capsys):
    with pytest.raises(SystemExit):
        bench_decode.main(["--target", "tiny", "--layer-parallel-plan", "1;2"])
    assert "--layer-parallel-plan" in capsys.readouterr().err


def test_bench_decode_runs_a_feature_drafter(capsys):
    """A drafter reading the target's features: the engine paths and transformers' plain generate() run,
    transformers' assisted generation (which cannot feed it features) is left out, and no plan applies."""
    assert bench_decode.main(["--target", "tiny", "--drafter", "feature:last1", "--n-prompts", "2", "--gamma", "4",
                              "--max-new-tokens", "8", "--max-prompt-tokens", "32"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["greedy_mismatches"] == 0 and report["drafter_step_ms"] > 0
    assert report["hf_generate_tok_s"] and report["hf_assisted_tok_s"] is None
    assert "features" in report["hf_assisted_refused"]
    with pytest.raises(SystemExit, match="drafts sequentially"):
        bench_decode.main(["--target", "tiny", "--drafter", "feature:last1", "--layer-parallel", "2", "--gamma", "4"])


def test_bench_decode_reports_prompt_lookup_beside_the_drafter(capsys):
    assert bench_decode.main(["--target", "tiny", "--drafter", "derived:0", "--n-prompts", "2", "--skip-hf",
                              "--max-new-tokens", "24", "--max-prompt-tokens", "32", "--prompt-lookup-max", "3",
                              "--prompt-lookup-min", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert report["prompt_lookup"] == [1, 3] and report["greedy_mismatches"] == 0
    assert report["disable_speculation_at_batch"] is None
    assert 0 < report["lookup_drafted_share"] <= 1 and 0 <= report["lookup_acceptance_rate"] <= 1
    assert any(line.startswith("prompt lookup (n-grams 1-3)") for line in out)
    with pytest.raises(SystemExit):
        bench_decode.main(["--target", "tiny", "--prompt-lookup-max", "2", "--prompt-lookup-min", "3"])
    assert "must be <= prompt_lookup_max" in capsys.readouterr().err


def test_bench_decode_speculates_by_prompt_lookup_alone(capsys):
    assert bench_decode.main(["--target", "tiny", "--drafter", "none", "--n-prompts", "2", "--max-new-tokens", "24",
                              "--max-prompt-tokens", "32", "--prompt-lookup-max", "3", "--prompt-lookup-min", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["drafter"] == "none" and report["cost_ratio"] == 0 and report["greedy_mismatches"] == 0
    assert report["lookup_drafted_share"] == 1.0 and report["hf_assisted_tok_s"] is None
    with pytest.raises(SystemExit, match="add --prompt-lookup-max"):
        bench_decode.main(["--target", "tiny", "--drafter", "none"])


def test_bench_decode_switches_speculation_off_at_a_batch_size(capsys):
    assert bench_decode.main(["--target", "tiny", "--drafter", "derived:0", "--n-prompts", "2", "--skip-hf",
                              "--max-new-tokens", "8", "--max-prompt-tokens", "32", "--batch-size", "2",
                              "--disable-speculation-at-batch", "2", "--gamma", "4"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["disable_speculation_at_batch"] == 2 and report["greedy_mismatches"] == 0
    assert report["mean_accepted_length"] == 1.0  # both prompts decode together to the end: never speculated


def test_bench_decode_sweeps_fixed_gammas_beside_auto(capsys):
    """`--gamma auto`: every fixed gamma 0-6 and the policy decode the same prompts, warmed alike, all checked
    against autoregressive decoding; the JSON adds the sweep and keeps the existing fields."""
    assert bench_decode.main(["--target", "tiny", "--drafter", "derived:0", "--n-prompts", "4", "--skip-hf",
                              "--max-new-tokens", "12", "--max-prompt-tokens", "32", "--batch-size", "2",
                              "--gamma", "auto", "--prompt-lookup-max", "3", "--prompt-lookup-min", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert [key for key in REQUIRED if key not in report] == []
    assert report["gamma"] == "auto" and report["greedy_mismatches"] == 0
    assert set(report["sweep_tok_s"]) == {str(g) for g in range(7)} and all(report["sweep_tok_s"].values())
    assert report["best_fixed_tok_s"] == max(report["sweep_tok_s"].values())
    assert report["sweep_tok_s"][str(report["best_fixed_gamma"])] == report["best_fixed_tok_s"]
    assert report["auto_vs_best_fixed"] == pytest.approx(report["auto_tok_s"] / report["best_fixed_tok_s"])
    assert report["auto_tok_s"] == report["speculative_tok_s"]
    assert set(report["warmup"]) == {"ar", "spec", *(f"gamma_{g}" for g in range(1, 7))}
    assert report["policy"]["steps"] > 0 and set(report["policy"]["alphas"]) == {"drafter:derived:0", "lookup"}
    assert any(line.startswith("fixed-gamma sweep") for line in out)


def test_bench_decode_refuses_assisted_generation_it_cannot_run_alike(capsys):
    """A trimmed head: transformers would run another drafter, so assisted generation is refused with the reason;
    the transformers baselines it runs are warmed like the engine's arms."""
    from draftsmith.models import tiny_model

    assert bench_decode.main(["--target", "tiny", "--drafter", "derived:0", "--n-prompts", "2", "--gamma", "4",
                              "--max-new-tokens", "6", "--max-prompt-tokens", "32"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["hf_assisted_refused"] is None and set(report["warmup"]) >= {"hf", "hf_assisted", "ar", "spec"}
    target = tiny_model()
    trimmed = bench_decode.derive_from_spec(target, "derived:0", draft_vocab_ids=torch.arange(0, 64))
    assert "trimmed" in bench_decode.assisted_refusal(trimmed)
    assert "features" in bench_decode.assisted_refusal(bench_decode.derive_from_spec(target, "feature:last1"))
