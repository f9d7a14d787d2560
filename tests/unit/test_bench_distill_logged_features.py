"""`draftsmith bench distill --compare-logged-features` on the tiny target: the flag's validation, and a tiny
in-process run whose two training arms really differ in where the target's features come from.

What it detects: the flag accepted without what it needs (a feature drafter, generated traffic, the
in-process loop, a fixed number of steps); generated traffic logged without its features (the logged arm
would then recompute them); a logged arm that still runs the target's forward, or a recomputed arm that
reads the log; arms trained on different steps or data; a JSON or stderr table missing the figures the
comparison reports.
"""

import json

import pytest

from pipelines import bench_distill

NEEDED = ["--feature-drafter", "--traffic", "generate", "--in-process"]


@pytest.mark.parametrize("drop,message", [
    ("--feature-drafter", "add --feature-drafter"),
    ("--traffic", "add --traffic generate"),
    ("--in-process", "add --in-process"),
])
def test_the_flag_refuses_a_run_without_what_it_compares(capsys, drop, message):
    argv = list(NEEDED)
    at = argv.index(drop)
    del argv[at: at + (2 if drop == "--traffic" else 1)]
    with pytest.raises(SystemExit):
        bench_distill.parse_args(["--compare-logged-features", *argv])
    assert message in capsys.readouterr().err


def test_the_flag_refuses_a_time_budget_and_accepts_a_complete_run(capsys):
    with pytest.raises(SystemExit):
        bench_distill.parse_args(["--compare-logged-features", *NEEDED, "--max-train-minutes", "1"])
    assert "--max-train-minutes" in capsys.readouterr().err
    args = bench_distill.parse_args(["--compare-logged-features", *NEEDED])
    assert args.compare_logged_features and args.drafter_spec == "feature:last1"
    # off by default: the plain benchmark neither captures features nor trains twice
    assert not bench_distill.parse_args(NEEDED).compare_logged_features


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return f"jsonl:{path}"


def test_a_tiny_comparison_reads_the_log_in_one_arm_and_the_target_in_the_other(capsys, tmp_path, caplog):
    train = _jsonl(tmp_path / "train.jsonl", [
        {"messages": [{"role": "user", "content": f"Tell me about topic {i} and why it matters to {i * 7} people."}]}
        for i in range(10)])
    heldout = _jsonl(tmp_path / "heldout.jsonl", [{"prompt": f"Explain item {i} in short words."} for i in range(2)])
    caplog.set_level("INFO", logger="draftsmith.bench_distill")
    assert bench_distill.main([
        "--target", "tiny", "--compare-logged-features", *NEEDED, "--source", train, "--n", "10",
        "--heldout", heldout, "--heldout-n", "2", "--max-new-tokens", "6", "--eval-batch-size", "2",
        "--torch-threads", "1", "--max-prompt-tokens", "48", "--max-output-tokens", "12",
        "--backfill-batch-size", "5", "--batch-size", "4"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    # one epoch by default: 10 records in batches of 4 -> 3 steps, 12 rows (the last batch wraps around)
    comparison = result["logged_features_comparison"]
    assert result["steps"] == comparison["steps"] == 3 and comparison["records_trained_per_arm"] == 12
    assert comparison["schedule"].startswith("one epoch")
    assert result["records"] == result["train_records"] == result["logged_feature_records"] == 10
    assert result["logged_feature_problems"] == 0
    # the logged arm never ran the target; the recomputed arm never read the log (its cache spares the 2
    # records seen twice)
    assert result["feature_rows_logged_logged_features"] == 12
    assert result["feature_rows_computed_logged_features"] == 0
    assert result["feature_rows_logged_recomputed_features"] == 0
    assert result["feature_rows_computed_recomputed_features"] == 10
    # the same data, order and steps on features that agree (logged float16 in the engine vs recomputed)
    assert result["final_loss_logged_features"] == pytest.approx(result["final_loss_recomputed_features"], rel=2e-2)
    for arm in ("logged", "recomputed"):
        seconds = result[f"train_seconds_{arm}_features"]
        assert seconds > 0 and result[f"train_seconds_per_record_{arm}"] == pytest.approx(seconds / 12, abs=1e-4)
        assert 0.0 <= result[f"token_acceptance_after_{arm}_features"] <= 1.0
        assert result[f"speculative_tok_s_after_{arm}_features"] > 0
        assert result["warmup"][f"train_{arm}_features"].startswith("untimed")
    assert result["logged_features_speedup"] > 0
    assert result["train_seconds"] == pytest.approx(result["train_seconds_logged_features"], abs=0.01)
    assert result["token_acceptance_after"] == result["token_acceptance_after_logged_features"]
    assert result["torch_threads"]["train_logged_features"] == result["torch_threads"]["train_recomputed_features"]
    assert "speedup per record (recomputed / logged)" in caplog.text
