"""The demo's configuration and figures without running it: the configs it writes are valid for the jobs and
Serve, it starts from the best drafter configuration, and its JSON reports speedups only for a clean run."""

import pytest
from pipelines.demo import QUICK, DemoConfig, serve_args, write_job_configs
from pipelines.demo_report import phase_figures

from draftsmith.timeline import Pooled


def test_the_demo_starts_from_a_feature_drafter_with_lookup_and_auto_speculation(tmp_path):
    from jobs.distill import DistillJobConfig
    from jobs.evaluate import load_config
    from serve.config import ServeAppConfig

    cfg = DemoConfig(**QUICK)
    assert cfg.drafter.startswith("feature:") and cfg.gamma == "auto"
    served = ServeAppConfig(**serve_args(cfg, tmp_path, "http://127.0.0.1:5000")).engine
    assert served.num_speculative_tokens == "auto" and served.prompt_lookup_max == 3 and served.prepack_weights
    assert served.max_batch_size == cfg.concurrency >= 4
    distill_yaml, evaluate_yaml = write_job_configs(cfg, tmp_path, "http://127.0.0.1:5000")
    distill = DistillJobConfig.from_yaml(distill_yaml)
    assert distill.drafter.endswith("@champion") and distill.train.steps == cfg.distill_steps
    evaluate = load_config(evaluate_yaml)
    assert evaluate.engine.model_dump() == served.model_dump(include=set(evaluate.engine.model_dump()))
    assert evaluate.gate == "apply" and evaluate.num_prompts == cfg.eval_prompts
    # the gate's sample must fit in the held-out share of the logged train requests
    assert cfg.train_prompts * cfg.heldout_fraction >= cfg.eval_prompts
    assert load_config(write_job_configs(DemoConfig(promotion="always"), tmp_path, "u")[1]).gate == "skip"


def test_engine_settings_follow_the_demo_sizes_and_the_engine_rules():
    assert DemoConfig(gamma=3).engine_settings()["num_speculative_tokens"] == 3
    # the context leaves room for the longest draft a step verifies plus its bonus token (auto's cap too)
    for cfg, longest in ((DemoConfig(gamma=32), 32),
                         (DemoConfig(gamma="auto", engine={"auto_max_speculative_tokens": 32}), 32)):
        assert cfg.engine_settings()["max_model_len"] == cfg.max_prompt_tokens + cfg.max_tokens + longest + 1
    with pytest.raises(ValueError, match="follows the demo's sizes"):
        DemoConfig(engine={"max_batch_size": 2})
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        DemoConfig(engine={"prompt_lookup_max": 1, "prompt_lookup_min": 2})


def _phase(name, tokens, seconds, failed=0):
    return Pooled(name, "1", tokens=tokens, seconds=seconds, failed=failed)


def test_speedups_are_reported_only_for_a_clean_run():
    cfg = DemoConfig()
    phases = {"before": _phase("before", 100, 10), "after": _phase("after", 240, 10),
              "autoregressive": _phase("autoregressive", 200, 10)}
    figures = phase_figures(cfg, phases, 8, failed=0)
    assert figures["speedup_after_swap"] == 1.2 and figures["speedup_before_swap"] == 0.5
    assert set(figures["warmup"]) == {"before", "after", "autoregressive"}
    failed = phase_figures(cfg, phases, 8, failed=1)
    assert failed["speedup_after_swap"] is None and failed["speedup_before_swap"] is None
    assert failed["tok_s_after_swap"] == 24.0  # the figures stay, the ratio is withheld
