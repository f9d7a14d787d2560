"""`draftsmith bench serve`'s pure parts: its flags, the warm-up rule and the report (ratios only when every
arm, warm-ups and the in-process engine included, ran without errors)."""

import argparse

import pytest

from draftsmith.paired_rounds import round_schedule
from pipelines.bench_serve import _parser, combine, concurrency_levels, speculation_summary, warmup_size


def _run(tok_s: float, errors: int = 0, concurrency: int = 1) -> dict:
    return {"requests": 4 - errors, "errors": errors, "concurrency": concurrency, "output_tok_s": tok_s,
            "ttft_p50_ms": 10.0}


def _runs(errors_in: str | None = None) -> dict:
    runs = {}
    for c, (spec, off) in {1: (30.0, 20.0), 4: (60.0, 50.0)}.items():
        runs[f"speculative@{c}"] = _run(spec, concurrency=c)
        runs[f"speculation_off@{c}"] = _run(off, concurrency=c)
    if errors_in:
        runs[errors_in] = {**runs[errors_in], "errors": 1}
    return runs


def test_flags():
    args = _parser().parse_args([])
    assert args.gamma == "auto" and args.concurrency == [8]
    args = _parser().parse_args(["--gamma", "3", "-c", "1,4,8"])
    assert args.gamma == 3 and args.concurrency == [1, 4, 8]
    assert concurrency_levels("4, 4,1") == [4, 1]
    for bad in ("0", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            concurrency_levels(bad)
    with pytest.raises(SystemExit):
        _parser().parse_args(["--gamma", "sometimes"])


def test_every_arm_gets_the_same_warmup_rule():
    args = _parser().parse_args(["--warmup-per-client", "2"])
    assert warmup_size(args, 4, 48) == 8 and warmup_size(args, 1, 48) == 2 and warmup_size(args, 8, 5) == 5


def test_report_ratios_per_concurrency():
    warmups = {name: {"requests": 1} for name in _runs()}
    report = combine([1, 4], _runs(), warmups, {name: _run(1.0) for name in _runs()},
                     {"engine_tok_s": 40.0, "engine_tok_s_batched": 80.0})
    assert report["errors"] == 0 and report["concurrency"] == 4 and report["output_tok_s"] == 60.0
    assert report["speedup_output_tok_s"] == 1.2 and report["speedup_by_concurrency"] == {"1": 1.5, "4": 1.2}
    assert report["baseline"]["output_tok_s"] == 50.0 and report["output_tok_s_1_client"] == 30.0
    assert report["scaling_n_over_1"] == 2.0 and report["http_efficiency_1_client"] == 0.75
    assert report["engine_scaling_n_over_1"] == 2.0 and report["warmup"] == warmups


@pytest.mark.parametrize("where", ["speculation_off@1", "speculative@4", "warm-up", "engine"])
def test_an_error_in_any_arm_reports_no_ratio(where):
    """bench serve used to compute a speedup from runs with errors and ignored the baseline's in its exit code."""
    runs = _runs(where if "@" in where else None)
    warmup_runs = {name: _run(1.0, errors=int(where == "warm-up" and name == "speculative@1")) for name in runs}
    report = combine([1, 4], runs, {}, warmup_runs, {"engine_tok_s": 40.0}, "boom" if where == "engine" else None)
    assert report["errors"] == 1 and sum(report["arm_errors"].values()) == 1
    assert report["speedup_output_tok_s"] is None and set(report["speedup_by_concurrency"].values()) == {None}
    assert report["http_efficiency_1_client"] is None and report["scaling_n_over_1"] is None


def test_speculation_summary_from_the_responses():
    summary = speculation_summary([
        {"drafted": 6, "accepted": 3, "compared": 5, "steps": 4, "policy_off_steps": 1, "proposer": "drafter",
         "mean_accepted_length": 1.75},
        {"drafted": 0, "accepted": 0, "compared": 0, "steps": 4, "policy_off_steps": 4, "proposer": "none"}])
    assert summary["acceptance_rate"] == 0.5 and summary["mean_drafted_per_step"] == 0.75
    assert summary["policy_off_step_share"] == 0.625 and summary["proposers"] == {"drafter": 1, "none": 1}


def test_engine_settings_come_from_the_app_config_then_the_flags(tmp_path):
    """Every arm (HTTP and in-process) serves the app config's engine settings, a flag overrides one, and the
    sizes the benchmark derives (gamma, batch slots, context) never come from the file."""
    from pipelines.bench_serve import engine_config, resolve_drafter

    config = tmp_path / "serve.yaml"
    config.write_text("applications:\n  - args:\n      drafter: feature:last1\n      engine:\n"
                      "        prompt_lookup_max: 3\n        prompt_lookup_min: 1\n        max_batch_size: 99\n"
                      "        default_max_tokens: 7\n")
    args = _parser().parse_args(["--app-config", str(config), "-c", "1,4", "--prompt-lookup-min", "2"])
    resolve_drafter(args)
    settings = engine_config(args)
    assert args.drafter == "feature:last1"
    assert (settings.prompt_lookup_max, settings.prompt_lookup_min) == (3, 2)
    assert settings.max_batch_size == 4 and settings.num_speculative_tokens == "auto"
    explicit = _parser().parse_args(["--app-config", str(config), "--drafter", "none"])
    resolve_drafter(explicit)
    assert explicit.drafter is None


def test_the_default_app_config_is_the_served_one():
    """Without --app-config the benchmark serves infra/serve.yaml's drafter and engine settings."""
    from pipelines.bench_serve import app_config_args, engine_config, resolve_drafter

    args = _parser().parse_args([])
    resolve_drafter(args)
    served = app_config_args(args.app_config)
    assert args.drafter == served["drafter"]
    assert engine_config(args).prompt_lookup_max == served["engine"]["prompt_lookup_max"]


@pytest.mark.parametrize("n,rounds", [(48, 2), (48, 3), (5, 4), (3, 8)])
def test_paired_rounds_cover_every_prompt_once_in_abba_order(n, rounds):
    """What it detects: a round schedule that drops or repeats a prompt, or times one arm always first
    (then a machine slowing down over the run would favour that arm)."""
    schedule = round_schedule(n, rounds)
    indices = sorted(i for chunk, _ in schedule for i in chunk)
    assert indices == list(range(n))
    orders = [order for _, order in schedule]
    assert all(sorted(order) == [False, True] for order in orders)
    if len(orders) >= 2:
        assert orders[0] != orders[1]  # ABBA: the second round runs the arms the other way round
    firsts = [order[0] for order in orders]
    assert abs(firsts.count(True) - firsts.count(False)) <= 1
