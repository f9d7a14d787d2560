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
              "before_off": _phase("before_off", 200, 10), "after_off": _phase("after_off", 150, 10)}
    figures = phase_figures(cfg, phases, 8, failed=0)
    # each phase over the off arm timed beside it, not over one reference measured at another time
    assert figures["speedup_after_swap"] == 1.6 and figures["speedup_before_swap"] == 0.5
    assert figures["tok_s_autoregressive"] == 17.5  # both off arms pooled: 350 tokens in 20 s
    assert figures["tok_s_autoregressive_before_swap"] == 20.0 and figures["tok_s_autoregressive_after_swap"] == 15.0
    assert set(figures["warmup"]) == {"before", "after", "before_off", "after_off"}
    failed = phase_figures(cfg, phases, 8, failed=1)
    assert failed["speedup_after_swap"] is None and failed["speedup_before_swap"] is None
    assert failed["tok_s_after_swap"] == 24.0  # the figures stay, the ratio is withheld
    alone = phase_figures(cfg.model_copy(update={"autoregressive_reference": False}),
                          {"before": phases["before"], "after": phases["after"]}, 8, failed=0)
    assert alone["speedup_after_swap"] is None and alone["tok_s_autoregressive"] is None


class _Services:
    """What the demo reads from pipelines.local_services.LocalServices."""

    def __init__(self, spare_nodes=()):
        self.dashboard_url, self.mlflow_url, self.ray_address = "http://127.0.0.1:8265", "http://m", "127.0.0.1:6379"
        self.spare_nodes = list(spare_nodes)


def test_the_demo_runs_distillation_on_the_spare_node_by_default(tmp_path):
    """Detects: a demo that still trains on the serving head by default, a job driver or Ray Train worker that asks
    for CPU (the spare node has none: it would wait forever) or not for the spare resource (it could land on the
    head), or a spare node too small for the driver plus the worker."""
    from jobs.distill import DistillJobConfig
    from pipelines.demo import trigger_config
    from pipelines.local_services import SPARE_RESOURCE, spare_node_command

    cfg = DemoConfig(**QUICK)
    assert cfg.spare_slots >= 2
    distill_yaml, evaluate_yaml = write_job_configs(cfg, tmp_path, "http://127.0.0.1:5000")
    distill = DistillJobConfig.from_yaml(distill_yaml)
    assert distill.resources_per_worker == {SPARE_RESOURCE: 1}
    trigger = trigger_config(cfg, tmp_path, _Services(), distill_yaml, evaluate_yaml, min_new_records=10)
    assert trigger.entrypoint_num_cpus == 0 and trigger.entrypoint_num_gpus == 0
    assert trigger.entrypoint_resources == {SPARE_RESOURCE: 1}
    # the spare node the demo starts (start_demo_services) holds the driver and every worker
    command = " ".join(spare_node_command("127.0.0.1:6379", node_name="n", slots=cfg.spare_slots))
    assert "--num-cpus=0" in command and f'"{SPARE_RESOURCE}": {cfg.spare_slots}' in command
    needed = trigger.entrypoint_resources[SPARE_RESOURCE] + distill.num_workers * distill.resources_per_worker[
        SPARE_RESOURCE]
    assert needed <= cfg.spare_slots

    one_node = DemoConfig(**{**QUICK, "spare_slots": 0})
    distill_yaml, evaluate_yaml = write_job_configs(one_node, tmp_path, "http://127.0.0.1:5000")
    assert DistillJobConfig.from_yaml(distill_yaml).resources_per_worker == {"CPU": 1}
    assert trigger_config(one_node, tmp_path, _Services(), distill_yaml, evaluate_yaml, 10).entrypoint_resources == {}
    with pytest.raises(ValueError, match="driver but not its Ray Train worker"):
        DemoConfig(spare_slots=1)


def test_a_feature_drafter_is_served_with_its_features_logged(tmp_path):
    """Detects: the demo serving a feature drafter without `traffic.log_features` (its distillation would run the
    target over every record again), or logging features for a token drafter that never reads them."""
    from serve.config import ServeAppConfig

    feature = ServeAppConfig(**serve_args(DemoConfig(**QUICK), tmp_path, "http://127.0.0.1:5000"))
    assert DemoConfig().drafter.startswith("feature:") and feature.traffic.log_features and feature.traffic.enabled
    token = ServeAppConfig(**serve_args(DemoConfig(drafter="derived:first1"), tmp_path, "http://127.0.0.1:5000"))
    assert not token.traffic.log_features


def test_the_report_says_where_the_job_ran():
    """Detects: a job reported as run on the spare node when its driver was elsewhere, or when there is none."""
    from types import SimpleNamespace

    from pipelines.demo import job_placement

    class Client:
        def __init__(self, node):
            self.node = node

        def get_job_info(self, job_id):
            return SimpleNamespace(driver_node_id=self.node)

    spare = _Services([SimpleNamespace(node_id="ab" * 28)])
    assert job_placement(Client("ab" * 28), "j", spare) == {
        "job_driver_node_id": "ab" * 28, "spare_node_id": "ab" * 28, "job_ran_on_spare_node": True}
    assert not job_placement(Client("cd" * 28), "j", spare)["job_ran_on_spare_node"]
    assert not job_placement(Client(""), "j", _Services())["job_ran_on_spare_node"]  # one node: no spare node


def test_the_training_runs_logged_feature_figures_are_read_back(monkeypatch):
    """Detects: the demo's JSON reading the wrong run, the wrong keys, or failing when the run has no such figures
    (a token drafter's run logs no logged_feature_records)."""
    from types import SimpleNamespace

    import mlflow

    from pipelines.demo_report import training_run_figures

    run = SimpleNamespace(data=SimpleNamespace(
        params={"train_records": "36", "logged_feature_records": "36", "logged_feature_problems": "none"},
        metrics={"train_seconds": 12.345, "feature_rows_logged": 120.0, "feature_rows_computed": 0.0}))
    asked = {}

    class Client:
        def __init__(self, tracking_uri):
            asked["uri"] = tracking_uri

        def get_experiment_by_name(self, name):
            return SimpleNamespace(experiment_id="7") if name == "draftsmith-distill" else None

        def search_runs(self, ids, filter_string, **kw):
            asked["filter"] = filter_string
            return [run]

    monkeypatch.setattr(mlflow, "MlflowClient", Client)
    figures = training_run_figures("http://m", "draftsmith-distill", "demo-distill")
    assert figures == {"train_records": 36, "logged_feature_records": 36, "logged_feature_problems": "none",
                       "train_seconds": 12.3, "feature_rows_logged": 120, "feature_rows_computed": 0}
    assert asked == {"uri": "http://m", "filter": "attributes.run_name = 'demo-distill'"}
    run.data.params, run.data.metrics = {"train_records": "5"}, {}
    assert training_run_figures("http://m", "draftsmith-distill", "x")["logged_feature_records"] is None
    assert set(training_run_figures("http://m", "other", "x").values()) == {None}


def test_the_spare_node_gets_a_ray_temp_dir_of_its_own(tmp_path, monkeypatch):
    """Detects: a spare node sharing the head's Ray temp dir, hence its runtime_resources folder: the head's
    runtime-env agent then deletes and re-unpacks a job's working_dir under the job's driver running on the spare
    node (the demo's job died with FileNotFoundError at os.getcwd); or a spare node left out of services.json, which
    `draftsmith down` would then not stop."""
    import pipelines.demo as demo
    import pipelines.local_services as local_services
    from pipelines.local_services import LocalServices, SpareNode, ray_temp_dir

    asked = {}

    def start_services(state, **kw):
        asked["head"] = (state, kw)
        services = LocalServices("127.0.0.1:6379", "http://127.0.0.1:8265", "http://m", 11, 12)
        services.write(state)
        return services

    def start_spare_node(state, **kw):
        asked["spare"] = (state, kw)
        return SpareNode("ab" * 28, "draftsmith-spare-x", 13, {"CPU": 0.0, "draftsmith_spare": 2.0}, "log")

    monkeypatch.setattr(local_services, "start_services", start_services)
    monkeypatch.setattr(local_services, "start_spare_node", start_spare_node)
    services = demo.start_demo_services(DemoConfig(), tmp_path)
    spare_state, spare_kw = asked["spare"]
    assert ray_temp_dir(spare_state) != ray_temp_dir(tmp_path) and "spare_slots" not in asked["head"][1]
    assert spare_kw["head_address"] == "127.0.0.1:6379" and spare_kw["slots"] == 2
    assert [n.pgid for n in LocalServices.read(tmp_path).spare_nodes] == [13] == [n.pgid for n in services.spare_nodes]
    asked.clear()
    assert not demo.start_demo_services(DemoConfig(spare_slots=0), tmp_path / "one").spare_nodes
    assert "spare" not in asked
