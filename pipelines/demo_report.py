"""The demo's figures: the measured arms' summary in its JSON, and its run in the `draftsmith-demo` MLflow experiment.

What it does: `phase_figures` turns the per-phase pooled figures (draftsmith.timeline.phase_summary) into the
JSON fields the demo prints (token acceptance, tok/s and speedups of the arms, how each arm was warmed up),
`log_demo_run` writes them, the per-window figures and the demo's files to one MLflow run;
`training_run_figures` reads back what the distillation job's training run recorded (how many records trained
on features logged at serve time, the training time).

What it does not do: send requests or measure anything (pipelines/demo.py runs the loop, pipelines/replay.py
sends the requests, draftsmith.timeline pools them, jobs/distill_worker.py logs the training run).
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.demo import DemoConfig

DEMO_EXPERIMENT = "draftsmith-demo"


def warmup_description(cfg: DemoConfig, warmup_prompts: int, phase: str, gamma: int | str) -> str:
    """How a measured arm was warmed up, for the JSON (every arm is warmed alike)."""
    if not warmup_prompts:
        return "none"
    return (f"{warmup_prompts} held-out requests not in the measured set, {cfg.concurrency} clients, max_tokens "
            f"{cfg.max_tokens}, num_speculative_tokens {gamma}, not logged, not measured, just before '{phase}'")


def phase_figures(cfg: DemoConfig, phases: dict, warmup_prompts: int, failed: int) -> dict:
    """The JSON's figures of the measured arms (`phases`: timeline.phase_summary by phase name; a speculative
    phase's speculation-off arm, timed beside it in alternating rounds, is `<phase>_off`). Every tok/s is end to
    end over HTTP: output tokens over the wall time of the arm's own rounds (prefill, queueing and the network
    included). A run with a failed request (`failed`, warm-ups included) reports no speedup."""
    from pipelines.demo import off_phase

    before, after = phases["before"], phases["after"]
    references = {name: phases.get(off_phase(name)) for name in ("before", "after")}

    def speedup(phase) -> float | None:
        reference = references[phase.phase]
        ok = reference is not None and reference.tok_s > 0 and not failed
        return round(phase.tok_s / reference.tok_s, 3) if ok else None

    def tok_s(phase) -> float | None:
        return None if phase is None else round(phase.tok_s, 2)

    off = [p for p in references.values() if p is not None]
    pooled_off = (sum(p.tokens for p in off) / sum(p.seconds for p in off)
                  if off and sum(p.seconds for p in off) > 0 else None)
    arms = {"before": cfg.gamma, "after": cfg.gamma}
    arms.update({off_phase(name): 0 for name, p in references.items() if p is not None})
    return {
        "token_acceptance_before_swap": round(before.token_acceptance, 4),
        "token_acceptance_after_swap": round(after.token_acceptance, 4),
        # The drafter's own proposals (prompt lookup's left out): the mixed figure above also moves when the policy
        # changes how much each proposer drafts, this one only when the drafter predicts better.
        "drafter_token_acceptance_before_swap": round(before.drafter_token_acceptance, 4),
        "drafter_token_acceptance_after_swap": round(after.drafter_token_acceptance, 4),
        "acceptance_rate_before_swap": round(before.acceptance_rate, 4),
        "acceptance_rate_after_swap": round(after.acceptance_rate, 4),
        "mean_accepted_length_before_swap": round(before.mean_accepted_length, 3),
        "mean_accepted_length_after_swap": round(after.mean_accepted_length, 3),
        "tok_s_before_swap": round(before.tok_s, 2), "tok_s_after_swap": round(after.tok_s, 2),
        "tok_s_autoregressive": None if pooled_off is None else round(pooled_off, 2),
        "tok_s_autoregressive_before_swap": tok_s(references["before"]),
        "tok_s_autoregressive_after_swap": tok_s(references["after"]),
        "speedup_before_swap": speedup(before), "speedup_after_swap": speedup(after),
        "reference_rounds": cfg.reference_rounds if off else None,
        "tok_s_measure": "end to end over HTTP: output tokens / seconds from the first send to the last completion "
                         "of each of an arm's rounds, summed (prefill included); a speedup is a phase over the "
                         "speculation-off arm timed beside it in alternating rounds",
        "concurrency": cfg.concurrency, "num_speculative_tokens": cfg.gamma, "drafter": cfg.drafter,
        "engine": cfg.engine,
        "warmup": {arm: warmup_description(cfg, warmup_prompts, arm, gamma) for arm, gamma in arms.items()},
    }


def log_demo_run(mlflow_url: str, cfg: DemoConfig, groups, summary: dict, files: list[Path]) -> str:
    """One run in the `draftsmith-demo` experiment: params, figures per window (step = requests served), files."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=mlflow_url)
    experiment = client.get_experiment_by_name(DEMO_EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(DEMO_EXPERIMENT)
    run = client.create_run(experiment_id, run_name=f"demo-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}")
    now = int(time.time() * 1000)
    metrics = []
    for g in groups:
        for key in ("token_acceptance", "acceptance_rate", "mean_accepted_length", "tok_s"):
            metrics.append(Metric(f"served_{key}", float(g.as_dict()[key]), now, g.requests_served))
    metrics += [Metric(k, float(v), now, 0) for k, v in summary.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)]
    params = [Param(k, str(v)) for k, v in cfg.model_dump().items()]
    for start in range(0, len(metrics), 900):  # MLflow's log_batch takes at most 1000 metrics
        client.log_batch(run.info.run_id, metrics=metrics[start:start + 900], params=params if start == 0 else [])
    for path in files:
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def training_run_figures(mlflow_url: str, experiment: str, run_name: str) -> dict:
    """What the distillation job's training run (the newest run called `run_name` in `experiment`) recorded: the
    params `train_records`, `logged_feature_records` (training records whose target features were read from the
    traffic log instead of recomputed; absent when the drafter reads no features or the job was given no traffic
    log), `logged_feature_problems` (side files that could not be read, or "none"), and the metrics
    `train_seconds` (the job's Ray Train fit) and `feature_rows_logged` / `feature_rows_computed` (batch rows whose
    features came from the log / from the target's forward). Missing ones are None; no run: every value None."""
    from mlflow import MlflowClient

    keys = ("train_records", "logged_feature_records", "logged_feature_problems", "train_seconds",
            "feature_rows_logged", "feature_rows_computed")
    client = MlflowClient(tracking_uri=mlflow_url)
    found = client.get_experiment_by_name(experiment)
    runs = found and client.search_runs([found.experiment_id], filter_string=f"attributes.run_name = '{run_name}'",
                                        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return dict.fromkeys(keys)
    params, metrics = runs[0].data.params, runs[0].data.metrics

    def count(value):
        return int(value) if value is not None and str(value).lstrip("-").isdigit() else None

    return {"train_records": count(params.get("train_records")),
            "logged_feature_records": count(params.get("logged_feature_records")),
            "logged_feature_problems": params.get("logged_feature_problems"),
            "train_seconds": None if "train_seconds" not in metrics else round(metrics["train_seconds"], 1),
            **{key: None if key not in metrics else int(metrics[key])
               for key in ("feature_rows_logged", "feature_rows_computed")}}
