"""`draftsmith demo`: the whole loop on one machine — serve, log, distill on spare compute, gate, hot-swap.

    draftsmith demo --quick        # what `make demo` runs: the CPU size (timings: docs/benchmarks.md)
    draftsmith down                # stop the Ray cluster and MLflow server the demo left up

What it does, in order (each step is the production path, run locally):
1. starts a local Ray head (`ray start`, dashboard on loopback) and a real MLflow server (SQLite,
   local artifacts), recorded in `<state>/services.json` (pipelines/local_services.py);
2. registers a drafter derived from the target (its first and last layers, a trimmed head; untrained)
   as version 1 and makes it `champion`;
3. deploys the Serve app (serve/app.py) whose SpecPair replica polls `models:/<name>@champion`;
4. replays ShareGPT prompts over HTTP with concurrent clients (pipelines/replay.py): first the
   held-out prompts with logging opted out ("before"), then train prompts, logged ("serve");
5. runs the trigger (pipelines/trigger.py) once: it sees the new records and the idle serving load and
   submits `jobs.distill && jobs.evaluate` through the Ray Jobs API; the job distills a challenger
   from the champion on the logged traffic (Ray Train), evaluates it against the champion on the
   most recent slice and lets the gate promote it;
6. waits for the replica to hot-swap to the new champion (no restart), replays the same held-out
   prompts again ("after"), and once more with speculation off ("autoregressive", the reference);
7. prints a table over time, writes a PNG (draftsmith.timeline), logs both and the figures to an
   MLflow run, prints the MLflow UI / Ray dashboard / endpoint addresses and leaves them up.
The last stdout line is one JSON object (requests, failed_requests, token_acceptance_before_swap,
token_acceptance_after_swap, tok_s_before_swap, tok_s_after_swap, champion_version, plot, mlflow_url, ...).

What it does not do: tune anything for you (the sizes are `DemoConfig` fields), or run on a remote
cluster (infra/ has the manifests for that).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_NAME = "draftsmith"
DEMO_EXPERIMENT = "draftsmith-demo"


class DemoConfig(BaseModel):
    """Sizes and knobs of the demo; `--quick` picks the values in QUICK."""

    model_config = ConfigDict(extra="forbid")

    state_dir: str = Field(".state/demo", description="Everything the demo writes (wiped at start).")
    target: str = Field("smollm2-135m-instruct", description="Target model spec.")
    model_name: str = Field("draftsmith-drafter", description="Registered model of the drafters.")
    drafter_layers: str = Field("first1+last1", description="Target layers the initial drafter keeps.")
    draft_vocab_size: int = Field(4096, ge=2, description="Trimmed head of the initial drafter (VocabTrim).")
    train_prompts: int = Field(2000, ge=8, description="ShareGPT train prompts replayed (and logged).")
    heldout_prompts: int = Field(64, ge=1, description="ShareGPT held-out prompts replayed before and after.")
    max_prompt_tokens: int = Field(128, ge=8, description="Prompts longer than this (templated) are skipped.")
    max_tokens: int = Field(64, ge=1, description="max_tokens of every request.")
    concurrency: int = Field(8, ge=1, description="Concurrent HTTP clients (and engine batch slots).")
    gamma: int = Field(4, ge=1, description="num_speculative_tokens served and evaluated.")
    window: int = Field(16, ge=1, description="Requests per row of the table over time.")
    distill_steps: int = Field(3000, ge=1, description="Optimizer steps of the distillation job.")
    distill_lr: float = Field(1e-3, gt=0, description="Distillation learning rate.")
    eval_prompts: int = Field(32, ge=1, description="Held-out traffic prompts the gate evaluates on.")
    eval_temperatures: list[float] = Field([0.0, 1.0], description="Temperatures the gate evaluates.")
    heldout_fraction: float = Field(0.08, gt=0, lt=1, description="Most recent traffic kept out of training "
                                                                  "for the gate's evaluation.")
    gate_margin: float = Field(0.02, description="Acceptance-rate margin a challenger must beat the champion by.")
    torch_threads: int = Field(2, ge=1, description="Torch threads of the replica and the training worker.")
    num_cpus: int = Field(4, ge=1, description="Logical CPUs of the local Ray head (replica 1, trainer 1, "
                                               "the rest for Serve's own actors).")
    serve_port: int = Field(8000, description="HTTP port of the endpoint (another free one if taken).")
    mlflow_port: int = Field(5000, description="MLflow UI port (another free one if taken).")
    dashboard_port: int = Field(8265, description="Ray dashboard port (another free one if taken; not in Ray's "
                                                  "worker port range 10002-19999).")
    job_timeout_s: float = Field(3600, gt=0, description="Give up on the distillation job after this long.")
    swap_timeout_s: float = Field(300, gt=0, description="Give up waiting for the hot swap after this long.")
    autoregressive_reference: bool = Field(True, description="Also replay held-out prompts with speculation off.")
    leave_up: bool = Field(True, description="Leave Ray, Serve and MLflow running (stop: `draftsmith down`).")


# The CPU size: enough logged train requests for a first distillation to raise held-out token acceptance
# (what it reaches and how long the loop takes: docs/benchmarks.md).
QUICK: dict[str, Any] = {"train_prompts": 320, "heldout_prompts": 24, "distill_steps": 600, "eval_prompts": 16,
                         "eval_temperatures": [0.0], "window": 12}


# ----------------------------------------------------------------------------------------- pieces


def demo_prompts(tokenizer, split: str, n: int, max_prompt_tokens: int) -> list[list[dict]]:
    """The first `n` ShareGPT first prompts of a split whose templated length fits `max_prompt_tokens`."""
    from draftsmith.datasets_io import first_prompt_messages, sharegpt_split

    out = []
    for conversation in sharegpt_split(split, None, seed=0):
        messages = first_prompt_messages(conversation)
        if not messages or not messages[-1]["content"].strip():
            continue
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= max_prompt_tokens:
            out.append(messages)
        if len(out) >= n:
            break
    if len(out) < n:
        logger.warning("only %d %s prompts fit in %d tokens (asked for %d)", len(out), split, max_prompt_tokens, n)
    return out


def register_initial_drafter(target, registry, cfg: DemoConfig, state: Path):
    """Version 1: an untrained drafter derived from the target, head trimmed to frequent reply tokens."""
    from draftsmith.datasets_io import sharegpt_split, to_chat_messages
    from draftsmith.models import derive_drafter, frequent_token_ids, save_drafter

    replies = []
    for conversation in sharegpt_split("train", 2000, seed=1):
        replies += [m["content"] for m in to_chat_messages(conversation, max_turns=2) if m["role"] == "assistant"]
    ids = target.tokenizer(replies, add_special_tokens=False)["input_ids"]
    vocab = frequent_token_ids(ids, cfg.draft_vocab_size, always=target.eos_token_ids)
    drafter = derive_drafter(target, cfg.drafter_layers, draft_vocab_ids=vocab)
    path = save_drafter(drafter, state / "drafters" / "initial", target.tokenizer)
    version = registry.register_drafter(
        path, experiment="draftsmith-distill", run_name="initial-derived-drafter",
        tags={"target_id": target.model_id, "target_revision": target.revision,
              "tokenizer_hash": target.tokenizer_hash, "loss": "none (untrained)", "parent_version": ""},
        params={"layers": cfg.drafter_layers, "draft_vocab_size": cfg.draft_vocab_size, "trained": False})
    return registry.promote(version.version, reason="initial drafter, derived from the target (untrained)")


def serve_args(cfg: DemoConfig, state: Path, mlflow_url: str) -> dict:
    """ServeAppConfig fields of the demo's app (serve/config.py)."""
    return {
        "target": cfg.target, "drafter": f"models:/{cfg.model_name}@champion", "mlflow_tracking_uri": mlflow_url,
        "drafter_poll_interval_s": 3.0,
        "engine": {"num_speculative_tokens": cfg.gamma, "max_batch_size": cfg.concurrency,
                   "max_model_len": cfg.max_prompt_tokens + cfg.max_tokens + 32, "topk_logprobs": 8},
        "traffic": {"uri": str(state / "traffic"), "flush_every_records": 64, "flush_every_seconds": 5.0},
        "placement": {"num_cpus": 1, "torch_threads": cfg.torch_threads},
        "autoscaling": {"enabled": False, "num_replicas": 1},
    }


def write_job_configs(cfg: DemoConfig, state: Path, mlflow_url: str) -> tuple[Path, Path]:
    """The distillation and evaluation configs the trigger's job runs with (jobs/distill.py, jobs/evaluate.py),
    written as plain YAML: this pipeline reaches the jobs through their entry points only."""
    from draftsmith.distill import DistillConfig

    traffic = str(state / "traffic")
    algorithm = DistillConfig(wrong_weight=2.0, lr=cfg.distill_lr, max_seq_len=cfg.max_prompt_tokens + cfg.max_tokens,
                              steps=cfg.distill_steps)
    distill = {
        "traffic_uri": traffic, "heldout_fraction": cfg.heldout_fraction, "target": cfg.target,
        "drafter": f"models:/{cfg.model_name}@champion", "fallback_derivation": None,
        "train": algorithm.model_dump(mode="json", exclude_defaults=True), "num_workers": 1, "resources_per_worker": {"CPU": 1}, "torch_threads": cfg.torch_threads,
        "checkpoint_every": max(1, cfg.distill_steps // 3), "log_every": 20, "max_failures": 1,
        "state_dir": str(state), "tracking_uri": mlflow_url, "model_name": cfg.model_name,
    }
    evaluate = {
        "tracking_uri": mlflow_url, "model_name": cfg.model_name, "target": cfg.target, "prompts": "traffic",
        "traffic_uri": traffic, "heldout_fraction": cfg.heldout_fraction, "num_prompts": cfg.eval_prompts,
        "max_prompt_tokens": cfg.max_prompt_tokens, "max_new_tokens": cfg.max_tokens, "gamma": cfg.gamma,
        "temperatures": cfg.eval_temperatures, "batch_size": cfg.concurrency, "margin": cfg.gate_margin,
    }
    paths = state / "distill.yaml", state / "evaluate.yaml"
    for path, data in zip(paths, (distill, evaluate)):
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return paths


def _get_json(url: str, *, timeout: float = 10.0, method: str = "GET") -> dict:
    import httpx

    response = httpx.request(method, url, timeout=timeout)
    response.raise_for_status()
    return response.json()


def wait_for_drafter(base: str, version: str, timeout_s: float) -> float:
    """Poll the replica's status until it serves `version`; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        status = _get_json(f"{base}/draftsmith/status")
        if str(status.get("drafter_version")) == str(version):
            return time.monotonic() - start
        if str(version) in status.get("refused", {}):
            raise RuntimeError(f"the replica refused drafter v{version}: {status['refused'][str(version)]}")
        time.sleep(1.0)
    raise TimeoutError(f"the replica did not swap to drafter v{version} within {timeout_s:.0f} s")


def run_job(trigger, timeout_s: float) -> tuple[str, Any]:
    """Let the trigger decide (it waits for idle serving) and submit; follow the job until it ends."""
    deadline = time.monotonic() + 120
    job_id = None
    while job_id is None:
        decision = trigger.decide()
        logger.info("trigger: %s (%s)", "submit" if decision.submit else "wait", decision.reason)
        if decision.submit:
            job_id = trigger.submit(reason=decision.reason)
        elif time.monotonic() > deadline:
            raise RuntimeError(f"the trigger did not submit within 120 s: {decision.reason}")
        else:
            time.sleep(5)
    print(f"[demo] distillation job {job_id} submitted through the Ray Jobs API", file=sys.stderr, flush=True)
    outcome = trigger.wait(job_id, timeout_s=timeout_s, poll_s=5.0)
    return job_id, outcome


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


# ----------------------------------------------------------------------------------------- the loop


def _say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def run_demo(cfg: DemoConfig) -> dict:
    """Run the loop (see the module docstring) and return the summary that `main` prints as JSON."""
    # `ray start` turns on token authentication; Ray reads the mode when it is imported (see local_services).
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray
    from draftsmith.models import load_model
    from draftsmith.ports import pick_port
    from draftsmith.registry import DrafterRegistry
    from draftsmith.timeline import format_table, phase_summary, plot_timeline, windows
    from ray import serve

    from pipelines.local_services import start_services, stop_services
    from pipelines.replay import replay
    from pipelines.trigger import DistillTrigger, TriggerConfig
    from serve.app import build_app

    started = time.monotonic()
    state = Path(cfg.state_dir).expanduser().resolve()
    for line in stop_services(state):
        _say(f"stopped the previous demo's {line}")
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)

    _say(f"loading the target {cfg.target} (the first run converts its GGUF once, ~30 s)")
    target = load_model(cfg.target)
    heldout = demo_prompts(target.tokenizer, "heldout", cfg.heldout_prompts, cfg.max_prompt_tokens)
    train = demo_prompts(target.tokenizer, "train", cfg.train_prompts, cfg.max_prompt_tokens)
    (state / "heldout_prompts.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in heldout))

    _say("starting a local Ray cluster and an MLflow server (SQLite) on 127.0.0.1")
    services = start_services(state, num_cpus=cfg.num_cpus, mlflow_port=cfg.mlflow_port,
                              dashboard_port=cfg.dashboard_port)
    ray.init(address=services.ray_address, configure_logging=False, log_to_driver=False)
    registry = DrafterRegistry(services.mlflow_url, model_name=cfg.model_name)
    initial = register_initial_drafter(target, registry, cfg, state)
    _say(f"registered the untrained drafter {cfg.drafter_layers} (+{cfg.draft_vocab_size}-token head) as "
         f"{cfg.model_name} v{initial.version} @champion")

    port = pick_port(cfg.serve_port)
    base = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(serve_args(cfg, state, services.mlflow_url)), name=APP_NAME, route_prefix="/")
    wait_for_drafter(base, initial.version, cfg.swap_timeout_s)
    _say(f"serving the OpenAI API at {base}/v1 with drafter v{initial.version}")

    common = {"concurrency": cfg.concurrency, "max_tokens": cfg.max_tokens, "num_speculative_tokens": cfg.gamma}
    results = replay(base, heldout, phase="before", log=False, **common)
    results += replay(base, train, phase="serve", log=True, **common)
    flushed = _get_json(f"{base}/draftsmith/flush", method="POST", timeout=60)
    _say(f"traffic log: {flushed.get('written')} records written to {state / 'traffic'}")

    distill_yaml, evaluate_yaml = write_job_configs(cfg, state, services.mlflow_url)
    logged = sum(r.ok for r in results if r.phase == "serve")
    trigger = DistillTrigger(TriggerConfig(
        ray_address=services.dashboard_url, traffic_uri=str(state / "traffic"), tracking_uri=services.mlflow_url,
        model_name=cfg.model_name, state_file=str(state / "trigger.json"),
        min_new_records=max(1, int(logged * 0.9)), drift_threshold=None, max_serving_load=1.0,
        ray_cluster_address=services.ray_address, min_interval_minutes=0, distill_config=str(distill_yaml),
        evaluate_config=str(evaluate_yaml), entrypoint_num_cpus=0, working_dir=str(REPO_ROOT),
        python=sys.executable))  # the local cluster runs this environment's interpreter
    job_started = time.monotonic()
    job_id, outcome = run_job(trigger, cfg.job_timeout_s)
    job_seconds = time.monotonic() - job_started
    if outcome.status != "SUCCEEDED":
        raise RuntimeError(f"distillation job {job_id} ended {outcome.status}; its log ends with:\n"
                           f"{outcome.logs_tail}")
    champion = registry.get_version_by_alias("champion")
    challenger = max(registry.list_versions(), key=lambda v: int(v.version))
    promoted = champion.version != initial.version
    gate_reason = challenger.tags.get("gate_reason", "")
    _say(f"job {job_id} succeeded in {job_seconds:.0f} s; gate: {gate_reason}")
    swap_seconds = None
    if promoted:
        swap_seconds = wait_for_drafter(base, champion.version, cfg.swap_timeout_s)
        _say(f"the replica hot-swapped to drafter v{champion.version} ({swap_seconds:.0f} s after promotion)")

    results += replay(base, heldout, phase="after", log=False, **common)
    if cfg.autoregressive_reference:
        results += replay(base, heldout, phase="autoregressive", log=False,
                          **{**common, "num_speculative_tokens": 0})

    rows = [r.as_row() for r in results]
    (state / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    groups = windows(rows, cfg.window)
    phases = {name: phase_summary(rows, name) for name in dict.fromkeys(r["phase"] for r in rows)}
    table = format_table(groups) + "\n\nby phase:\n" + format_table(phases.values())
    (state / "timeline.txt").write_text(table + "\n")
    plot = plot_timeline(groups, state / "timeline.png",
                         title=f"Draftsmith demo: {cfg.target}, gamma {cfg.gamma}, {cfg.concurrency} clients")
    before, after = phases["before"], phases["after"]
    summary = {
        "requests": len(rows), "failed_requests": sum(1 for r in rows if r["error"]),
        "token_acceptance_before_swap": round(before.token_acceptance, 4),
        "token_acceptance_after_swap": round(after.token_acceptance, 4),
        "acceptance_rate_before_swap": round(before.acceptance_rate, 4),
        "acceptance_rate_after_swap": round(after.acceptance_rate, 4),
        "mean_accepted_length_before_swap": round(before.mean_accepted_length, 3),
        "mean_accepted_length_after_swap": round(after.mean_accepted_length, 3),
        "tok_s_before_swap": round(before.tok_s, 2), "tok_s_after_swap": round(after.tok_s, 2),
        "tok_s_autoregressive": round(phases["autoregressive"].tok_s, 2) if "autoregressive" in phases else None,
        "initial_version": initial.version, "champion_version": champion.version, "promoted": promoted,
        "gate_reason": gate_reason, "job_id": job_id, "job_seconds": round(job_seconds, 1),
        "swap_seconds": None if swap_seconds is None else round(swap_seconds, 1),
        "train_requests_logged": logged, "plot": str(plot), "mlflow_url": services.mlflow_url,
        "ray_dashboard_url": services.dashboard_url, "endpoint": f"{base}/v1",
    }
    for version, phase in ((initial.version, before), (champion.version, after)):
        registry.log_metrics(version, {"served_token_acceptance": phase.token_acceptance,
                                       "served_acceptance_rate": phase.acceptance_rate,
                                       "served_tok_s": phase.tok_s})
    log_demo_run(services.mlflow_url, cfg, groups, summary, [plot, state / "timeline.txt", state / "requests.jsonl"])
    summary["elapsed_s"] = round(time.monotonic() - started, 1)
    print(table)
    ray.shutdown()  # disconnect this driver; the cluster, Serve and MLflow stay up
    if not cfg.leave_up:
        stop_services(state)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="draftsmith demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CPU size (QUICK; timings in docs/benchmarks.md)")
    parser.add_argument("--down", action="store_true", help="stop Ray and MLflow at the end")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any DemoConfig field (YAML value), e.g. --set train_prompts=100")
    args = parser.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the progress bars
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    for item in args.set:
        key, _, value = item.partition("=")
        values[key.strip()] = yaml.safe_load(value)
    if args.down:
        values["leave_up"] = False
    cfg = DemoConfig(**values)
    try:
        summary = run_demo(cfg)
    except BaseException:
        if not cfg.leave_up:
            from pipelines.local_services import stop_services

            stop_services(Path(cfg.state_dir).expanduser().resolve())
        raise
    gain = summary["token_acceptance_after_swap"] - summary["token_acceptance_before_swap"]
    print(f"\nDrafter v{summary['initial_version']} -> v{summary['champion_version']}: token acceptance "
          f"{summary['token_acceptance_before_swap']:.3f} -> {summary['token_acceptance_after_swap']:.3f} "
          f"({gain:+.3f}), {summary['tok_s_before_swap']:.1f} -> {summary['tok_s_after_swap']:.1f} output tok/s "
          f"(speculation off: {summary['tok_s_autoregressive']} tok/s); {summary['failed_requests']} failed requests.")
    if cfg.leave_up:
        print(f"MLflow UI (registry: {cfg.model_name}): {summary['mlflow_url']}\n"
              f"Ray dashboard: {summary['ray_dashboard_url']}\nOpenAI endpoint: {summary['endpoint']}\n"
              f"Plot: {summary['plot']}\nStop everything with `make down` (draftsmith down).")
    print(json.dumps(summary))
    return 0 if summary["failed_requests"] == 0 and summary["promoted"] else 1
