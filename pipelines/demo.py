"""`draftsmith demo`: the whole loop on one machine — serve, log, distill on spare compute, gate, hot-swap.

    draftsmith demo --quick        # what `make demo` runs: the CPU size (timings: docs/benchmarks.md)
    draftsmith down                # stop the Ray cluster and MLflow server the demo left up

What it does, in order (each step is the production path, run locally):
1. starts a local Ray head (`ray start`, dashboard on loopback) that serves, a second Ray node that lends
   spare compute to distillation (`spare_slots` units of `draftsmith_spare` and no CPU, so nothing of
   serving can land there; `spare_slots: 0` keeps to one node) and a real MLflow server (SQLite, local
   artifacts), recorded in `<state>/services.json` (pipelines/local_services.py);
2. registers an untrained drafter derived from the target (by default an EAGLE-style feature drafter,
   `feature:last1`, with a trimmed head) as version 1 and makes it `champion`;
3. deploys the Serve app (serve/app.py) whose SpecPair replica polls `models:/<name>@champion`, with
   `num_speculative_tokens: auto` (the speculation policy) and prompt lookup beside the drafter; for a
   feature drafter it logs the target's features with each record (`traffic.log_features`), and its
   actors stay off the spare node (serve.config.SERVING_LABEL_SELECTOR);
4. replays ShareGPT prompts over HTTP with concurrent clients (pipelines/replay.py): first the
   held-out prompts with logging opted out ("before"), then train prompts, logged ("serve");
5. runs the trigger (pipelines/trigger.py) once: it sees the new records and the idle serving load and
   submits `jobs.distill && jobs.evaluate` through the Ray Jobs API, its driver and Ray Train worker
   asking for `draftsmith_spare` (so they run on the spare node); the job distills a challenger from the
   champion on the logged traffic (Ray Train; a feature drafter reads the features logged while serving
   instead of running the target again), evaluates it against the champion on the
   most recent slice and lets the gate promote it; while it runs, a line every `progress_every_s`
   seconds gives its steps, loss, elapsed and time left (pipelines/job_progress.py);
6. waits for the replica to hot-swap to the new champion (no restart) and replays the same held-out
   prompts again ("after"). Each speculative phase ("before", "after") is measured against speculation
   off on the same prompts ("before_off", "after_off"), the two arms timed in alternating rounds (ABBA,
   draftsmith.paired_rounds) so that both see the machine at the same minutes; every measured arm is
   preceded by the same warm-up (further held-out prompts, same concurrency and settings, not logged, not
   measured);
7. prints a table over time, writes a PNG (draftsmith.timeline), logs both and the figures to an
   MLflow run, prints the MLflow UI / Ray dashboard / endpoint addresses and leaves them up.
The last stdout line is one JSON object (requests, failed_requests, token_acceptance_before_swap,
token_acceptance_after_swap, tok_s_before_swap, tok_s_after_swap, tok_s_autoregressive (both off arms
pooled) and tok_s_autoregressive_before_swap / _after_swap, speedup_before_swap and speedup_after_swap
(each phase over the off arm timed beside it; None when a request failed), warmup, champion_version,
job_driver_node_id, spare_node_id, job_ran_on_spare_node, serve_actors_on_spare_node (none expected),
logged_feature_records, train_seconds, plot, mlflow_url, ...); tok/s figures are end to end over HTTP.

What it does not do: tune anything for you (the sizes are `DemoConfig` fields), or run on a remote
cluster (infra/ has the manifests for that).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.fields import FieldInfo

from draftsmith.engine_config import EngineConfig
from draftsmith.paired_rounds import round_schedule
from pipelines.demo_report import log_demo_run, phase_figures

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_NAME = "draftsmith"
DISTILL_EXPERIMENT = "draftsmith-distill"  # the job's training runs, where the demo reads its progress
DISTILL_RUN_NAME = "demo-distill"
WARMUP_PREFIX = "warmup:"  # phase name prefix of the requests that warm a measured arm up
OFF_SUFFIX = "_off"  # phase name suffix of the speculation-off arm measured beside a speculative phase


_GAMMA = EngineConfig.model_fields["num_speculative_tokens"]
# Engine settings the demo derives from its own sizes (gamma, concurrency, prompt and output lengths).
_DERIVED_ENGINE_FIELDS = ("num_speculative_tokens", "max_batch_size", "max_model_len", "topk_logprobs")


class DemoConfig(BaseModel):
    """Sizes and knobs of the demo; `--quick` picks the values in QUICK."""

    model_config = ConfigDict(extra="forbid")

    state_dir: str = Field(".state/demo", description="Everything the demo writes (wiped at start).")
    target: str = Field("smollm2-135m-instruct", description="Target model spec.")
    model_name: str = Field("draftsmith-drafter", description="Registered model of the drafters.")
    drafter: str = Field("feature:last1", description="The untrained initial drafter, derived from the target: "
                         "feature:<layers> (EAGLE-style, reads the target's features) or derived:<layers>.")
    draft_vocab_size: int = Field(4096, ge=2, description="Trimmed head of the initial drafter (VocabTrim).")
    train_prompts: int = Field(2000, ge=8, description="ShareGPT train prompts replayed (and logged).")
    heldout_prompts: int = Field(64, ge=1, description="ShareGPT held-out prompts replayed before and after.")
    warmup_prompts: int = Field(8, ge=0, description="Further held-out prompts replayed, not measured and not "
                                "logged, just before each measured phase (before, after, autoregressive) with that "
                                "phase's settings and concurrency, so that every phase is measured warm alike.")
    max_prompt_tokens: int = Field(128, ge=8, description="Prompts longer than this (templated) are skipped.")
    max_tokens: int = Field(64, ge=1, description="max_tokens of every request.")
    concurrency: int = Field(8, ge=1, description="Concurrent HTTP clients (and engine batch slots).")
    gamma: _GAMMA.annotation = FieldInfo.merge_field_infos(
        _GAMMA, default="auto", description="num_speculative_tokens served and evaluated by the gate: auto (the "
        "speculation policy decides every step) or a number of tokens.")
    engine: dict[str, Any] = Field(
        {"prompt_lookup_max": 3, "prompt_lookup_min": 1, "prepack_weights": True},
        description="Further engine settings (EngineConfig fields) of the served pair and the gate's evaluation; "
                    "num_speculative_tokens, max_batch_size and max_model_len follow gamma, concurrency and the "
                    "prompt and output lengths.")
    window: int = Field(16, ge=1, description="Requests per row of the table over time.")
    distill_steps: int = Field(3000, ge=1, description="Optimizer steps of the distillation job.")
    distill_lr: float = Field(1e-3, gt=0, description="Distillation learning rate.")
    eval_prompts: int = Field(32, ge=1, description="Held-out traffic prompts the gate evaluates on (the sample "
                              "size of its paired speed test; the held-out share of the logged train requests must "
                              "hold this many).")
    eval_temperatures: list[float] = Field([0.0, 1.0], description="Temperatures the gate evaluates.")
    heldout_fraction: float = Field(0.08, gt=0, lt=1, description="Most recent traffic kept out of training "
                                                                  "for the gate's evaluation.")
    gate_confidence: float = Field(0.95, ge=0.5, lt=1, description="The gate promotes a challenger only if it "
                                   "serves faster at this confidence (jobs/evaluate.py, draftsmith.gate).")
    promotion: Literal["gate", "always"] = Field("gate", description="gate: the job's gate decides; always: the job "
                                                 "evaluates without gating and the demo promotes the challenger "
                                                 "itself (a testing aid for a target on which no drafter can be "
                                                 "faster, such as the random `tiny` one).")
    torch_threads: int = Field(2, ge=1, description="Torch threads of the replica and the training worker.")
    num_cpus: int = Field(4, ge=1, description="Logical CPUs of the local Ray head, which serves (the replica 1, "
                                               "the rest for Serve's own actors; the distillation job too when "
                                               "spare_slots is 0).")
    spare_slots: int = Field(2, ge=0, description="Units of `draftsmith_spare` on a second local Ray node (no CPU) "
                             "where the distillation job's driver (1) and its Ray Train worker (1) run, as on a "
                             "production cluster's spare nodes. Both nodes share this machine's cores. 0: one node, "
                             "the job on the head's CPUs.")
    serve_port: int = Field(8000, description="HTTP port of the endpoint (another free one if taken).")
    mlflow_port: int = Field(5000, description="MLflow UI port (another free one if taken).")
    dashboard_port: int = Field(8265, description="Ray dashboard port (another free one if taken; not in Ray's "
                                                  "worker port range 10002-19999).")
    job_timeout_s: float = Field(3600, gt=0, description="Give up on the distillation job after this long.")
    progress_every_s: float = Field(15.0, gt=0, description="Seconds between progress lines of the distillation "
                                                            "job (steps, loss, time left).")
    swap_timeout_s: float = Field(300, gt=0, description="Give up waiting for the hot swap after this long.")
    autoregressive_reference: bool = Field(True, description="Measure each speculative phase (before, after) against "
                                           "speculation off on the same prompts, the two timed in alternating "
                                           "rounds (`reference_rounds`).")
    reference_rounds: int = Field(2, ge=1, description="Rounds of the on/off pair of a measured phase, in ABBA "
                                  "order, each on every rounds-th held-out prompt: a machine whose speed drifts "
                                  "over minutes slows both arms alike.")
    leave_up: bool = Field(True, description="Leave Ray, Serve and MLflow running (stop: `draftsmith down`).")

    @field_validator("spare_slots")
    @classmethod
    def _driver_and_worker(cls, value: int) -> int:
        if value == 1:
            raise ValueError("spare_slots 1 holds the job's driver but not its Ray Train worker: use 2 or more "
                             "(or 0 for one node)")
        return value

    @property
    def logs_features(self) -> bool:
        """A feature drafter trains on the target's features: serving logs them (traffic.log_features)."""
        return self.drafter.startswith("feature:")

    @field_validator("engine")
    @classmethod
    def _engine_settings(cls, value: dict[str, Any]) -> dict[str, Any]:
        derived = sorted(set(value) & set(_DERIVED_ENGINE_FIELDS))
        if derived:
            raise ValueError(f"engine.{derived[0]} follows the demo's sizes (gamma, concurrency, max_prompt_tokens, "
                             f"max_tokens): set those instead")
        EngineConfig(**value)  # the engine's own rules, one definition
        return value

    def engine_settings(self) -> dict[str, Any]:
        """The `engine:` section of the Serve app and of the gate's evaluation (EngineConfig fields)."""
        settings = {**self.engine, "num_speculative_tokens": self.gamma, "max_batch_size": self.concurrency}
        # room for the longest draft a step may verify (auto's cap included), plus its bonus token
        headroom = EngineConfig(**settings).max_speculative_tokens + 1
        return {**settings, "max_model_len": self.max_prompt_tokens + self.max_tokens + headroom}


# The CPU size: enough logged train requests for a first distillation to raise held-out token acceptance,
# measured at 4 clients (what it reaches and how long the loop takes: docs/benchmarks.md).
QUICK: dict[str, Any] = {"train_prompts": 320, "heldout_prompts": 24, "distill_steps": 600, "eval_prompts": 24,
                         "heldout_fraction": 0.1, "eval_temperatures": [0.0], "window": 12, "concurrency": 4}


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
    """Version 1: an untrained drafter derived from the target (`cfg.drafter`), head trimmed to frequent reply
    tokens. The registry and the gate treat it like any other version."""
    from draftsmith.datasets_io import sharegpt_split, to_chat_messages
    from draftsmith.models import derive_from_spec, frequent_token_ids, save_drafter

    replies = []
    for conversation in sharegpt_split("train", 2000, seed=1):
        replies += [m["content"] for m in to_chat_messages(conversation, max_turns=2) if m["role"] == "assistant"]
    ids = target.tokenizer(replies, add_special_tokens=False)["input_ids"]
    vocab = frequent_token_ids(ids, cfg.draft_vocab_size, always=target.eos_token_ids)
    drafter = derive_from_spec(target, cfg.drafter, draft_vocab_ids=vocab)
    path = save_drafter(drafter, state / "drafters" / "initial", target.tokenizer)
    version = registry.register_drafter(
        path, experiment=DISTILL_EXPERIMENT, run_name="initial-derived-drafter",
        tags={"target_id": target.model_id, "target_revision": target.revision,
              "tokenizer_hash": target.tokenizer_hash, "loss": "none (untrained)", "parent_version": "",
              "drafter_kind": drafter.meta.get("kind", "derived")},
        params={"drafter": cfg.drafter, "layers": drafter.meta.get("layers"),
                "draft_vocab_size": cfg.draft_vocab_size, "trained": False})
    return registry.promote(version.version, reason="initial drafter, derived from the target (untrained)")


def serve_args(cfg: DemoConfig, state: Path, mlflow_url: str) -> dict:
    """ServeAppConfig fields of the demo's app (serve/config.py)."""
    return {
        "target": cfg.target, "drafter": f"models:/{cfg.model_name}@champion", "mlflow_tracking_uri": mlflow_url,
        "drafter_poll_interval_s": 3.0,
        "engine": {**cfg.engine_settings(), "topk_logprobs": 8},
        "traffic": {"uri": str(state / "traffic"), "flush_every_records": 64, "flush_every_seconds": 5.0,
                    "log_features": cfg.logs_features},
        "placement": {"num_cpus": 1, "torch_threads": cfg.torch_threads},
        "autoscaling": {"enabled": False, "num_replicas": 1},
    }


def write_job_configs(cfg: DemoConfig, state: Path, mlflow_url: str) -> tuple[Path, Path]:
    """The distillation and evaluation configs the trigger's job runs with (jobs/distill.py, jobs/evaluate.py),
    written as plain YAML: this pipeline reaches the jobs through their entry points only. The job starts from
    the champion (the demo's feature drafter at first) and the gate evaluates at the serving engine settings. With a
    spare node, the Ray Train worker asks for the spare resource instead of a CPU (the driver's ask is the trigger's,
    `trigger_config`)."""
    from draftsmith.distill import DistillConfig

    from pipelines.local_services import SPARE_RESOURCE

    traffic = str(state / "traffic")
    algorithm = DistillConfig(wrong_weight=2.0, lr=cfg.distill_lr, max_seq_len=cfg.max_prompt_tokens + cfg.max_tokens,
                              steps=cfg.distill_steps)
    distill = {
        "traffic_uri": traffic, "heldout_fraction": cfg.heldout_fraction, "target": cfg.target,
        "drafter": f"models:/{cfg.model_name}@champion", "fallback_derivation": None,
        "train": algorithm.model_dump(mode="json", exclude_defaults=True), "num_workers": 1,
        "resources_per_worker": {SPARE_RESOURCE: 1} if cfg.spare_slots else {"CPU": 1},
        "torch_threads": cfg.torch_threads,
        "checkpoint_every": max(1, cfg.distill_steps // 3), "log_every": max(1, min(20, cfg.distill_steps // 10)),
        "max_failures": 1, "state_dir": str(state), "tracking_uri": mlflow_url, "model_name": cfg.model_name,
        "experiment": DISTILL_EXPERIMENT, "run_name": DISTILL_RUN_NAME,
    }
    evaluate = {
        "tracking_uri": mlflow_url, "model_name": cfg.model_name, "target": cfg.target, "prompts": "traffic",
        "traffic_uri": traffic, "num_prompts": cfg.eval_prompts,  # the challenger's own held-out window
        "max_prompt_tokens": cfg.max_prompt_tokens, "max_new_tokens": cfg.max_tokens,
        "engine": cfg.engine_settings(), "temperatures": cfg.eval_temperatures, "confidence": cfg.gate_confidence,
        "gate": "apply" if cfg.promotion == "gate" else "skip",
    }
    paths = state / "distill.yaml", state / "evaluate.yaml"
    for path, data in zip(paths, (distill, evaluate)):
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return paths


def trigger_config(cfg: DemoConfig, state: Path, services, distill_yaml: Path, evaluate_yaml: Path,
                   min_new_records: int):
    """The trigger of the demo's one distillation (pipelines/trigger.py): no drift, no interval, submit once
    `min_new_records` were logged and serving is idle. The job's driver asks for no CPU; with a spare node it asks
    for one unit of the spare resource, which only the spare node has, so the driver runs there."""
    from pipelines.local_services import SPARE_RESOURCE
    from pipelines.trigger import TriggerConfig

    return TriggerConfig(
        ray_address=services.dashboard_url, traffic_uri=str(state / "traffic"), tracking_uri=services.mlflow_url,
        model_name=cfg.model_name, state_file=str(state / "trigger.json"), min_new_records=min_new_records,
        drift_threshold=None, max_serving_load=1.0, ray_cluster_address=services.ray_address,
        min_interval_minutes=0, distill_config=str(distill_yaml), evaluate_config=str(evaluate_yaml),
        entrypoint_num_cpus=0, entrypoint_resources={SPARE_RESOURCE: 1} if cfg.spare_slots else {},
        working_dir=str(REPO_ROOT), python=sys.executable)  # the local cluster runs this environment's interpreter


def start_demo_services(cfg: DemoConfig, state: Path):
    """The Ray head and MLflow server (`start_services`), then the spare node (`start_spare_node`) recorded in the
    same services file, so that `draftsmith down` stops it with the head.

    The spare node gets a state folder of its own (`<state>/spare`, its log there); like every node it has a Ray
    temp dir of its own (`local_services.ray_temp_dir`)."""
    from pipelines.local_services import LocalServices, start_services, start_spare_node, stop_services

    services = start_services(state, num_cpus=cfg.num_cpus, mlflow_port=cfg.mlflow_port,
                              dashboard_port=cfg.dashboard_port)
    if not cfg.spare_slots:
        return services
    try:
        node = start_spare_node(state / "spare", head_address=services.ray_address,
                                dashboard_url=services.dashboard_url, slots=cfg.spare_slots)
    except Exception:
        stop_services(state)
        raise
    services = LocalServices.read(state) or services
    services.spare_nodes.append(node)
    services.write(state)
    return services


def job_placement(client, job_id: str, services) -> dict:
    """Where the job's driver ran (`JobDetails.driver_node_id`) against the services' spare node: the JSON's
    `job_driver_node_id`, `spare_node_id`, `job_ran_on_spare_node`."""
    spare = services.spare_nodes[0].node_id if services.spare_nodes else None
    try:
        driver = client.get_job_info(job_id).driver_node_id or None
    except Exception as error:  # noqa: BLE001 - a figure of the report, not a step of the loop
        logger.warning("could not read job %s's driver node: %s", job_id, error)
        driver = None
    return {"job_driver_node_id": driver, "spare_node_id": spare,
            "job_ran_on_spare_node": bool(spare) and driver == spare}


def serve_actor_placement(dashboard_url: str, spare_node: str | None) -> dict:
    """The live Serve actors (replicas of every deployment, proxies, the controller) and those on the spare node,
    which must be none (serve.config.SERVING_LABEL_SELECTOR): the JSON's `serve_actors`,
    `serve_actors_on_spare_node`."""
    from ray.util.state import list_actors

    actors = [a for a in list_actors(address=dashboard_url, filters=[("state", "=", "ALIVE")], limit=10_000,
                                     raise_on_missing_output=False)
              if a.class_name.startswith("ServeReplica:") or a.class_name in ("ProxyActor", "ServeController")]
    on_spare = sorted(a.class_name for a in actors if spare_node and a.node_id == spare_node)
    return {"serve_actors": len(actors), "serve_actors_on_spare_node": on_spare}


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


def run_job(trigger, cfg: DemoConfig, mlflow_url: str) -> tuple[str, Any]:
    """Let the trigger decide (it waits for idle serving) and submit; follow the job until it ends, printing
    its progress (steps, loss, time left) from the MLflow run its rank-0 worker logs to."""
    from pipelines.job_progress import DistillProgress

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
    where = " for the spare node (its driver and worker ask for draftsmith_spare)" if cfg.spare_slots else ""
    _say(f"distillation job {job_id} submitted through the Ray Jobs API{where} (progress every "
         f"{cfg.progress_every_s:g} s)")
    with DistillProgress(mlflow_url, DISTILL_EXPERIMENT, DISTILL_RUN_NAME, _say, every_s=cfg.progress_every_s):
        outcome = trigger.wait(job_id, timeout_s=cfg.job_timeout_s, poll_s=min(5.0, cfg.progress_every_s))
    return job_id, outcome


def measured_phase(base: str, prompts, warmup, cfg: DemoConfig, phase: str, gamma: int | None):
    """One measured arm: its warm-up (the `warmup` prompts, same settings and concurrency, not logged, not
    measured), then `prompts` (not logged). Returns (warm-up results, measured results)."""
    from pipelines.replay import replay

    common = {"concurrency": cfg.concurrency, "max_tokens": cfg.max_tokens, "num_speculative_tokens": gamma,
              "log": False}
    warm = replay(base, warmup, phase=f"{WARMUP_PREFIX}{phase}", **common) if warmup else []
    return warm, replay(base, prompts, phase=phase, **common)


def off_phase(phase: str) -> str:
    """The name of the speculation-off arm measured beside a speculative phase."""
    return f"{phase}{OFF_SUFFIX}"


def paired_phase(base: str, prompts, warmup, cfg: DemoConfig, phase: str) -> list:
    """A speculative phase (the replica's own num_speculative_tokens) and, with `autoregressive_reference`,
    speculation off beside it (`off_phase`): both warm-ups first, then `reference_rounds` rounds in ABBA
    order, each on an interleaved share of `prompts` (draftsmith.paired_rounds), so that the ratio compares
    arms timed on the same machine at the same minutes. Returns every result, warm-ups included."""
    from pipelines.replay import replay

    if not cfg.autoregressive_reference:
        return sum(measured_phase(base, prompts, warmup, cfg, phase, None), [])
    common = {"concurrency": cfg.concurrency, "max_tokens": cfg.max_tokens, "log": False}
    arms = {True: (phase, None), False: (off_phase(phase), 0)}
    results = []
    for name, gamma in arms.values():
        if warmup:
            results += replay(base, warmup, phase=f"{WARMUP_PREFIX}{name}", num_speculative_tokens=gamma, **common)
    for indices, order in round_schedule(len(prompts), cfg.reference_rounds):
        for arm in order:
            name, gamma = arms[arm]
            results += replay(base, [prompts[i] for i in indices], phase=name, num_speculative_tokens=gamma,
                              **common)
    return results


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

    from pipelines.demo_report import training_run_figures
    from pipelines.local_services import SPARE_RESOURCE, stop_services
    from pipelines.replay import replay
    from pipelines.trigger import DistillTrigger
    from serve.app import build_app

    started = time.monotonic()
    state = Path(cfg.state_dir).expanduser().resolve()
    for line in stop_services(state):
        _say(f"stopped the previous demo's {line}")
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)

    _say(f"loading the target {cfg.target} (the first run converts its GGUF once, ~30 s)")
    target = load_model(cfg.target)
    heldout = demo_prompts(target.tokenizer, "heldout", cfg.heldout_prompts + cfg.warmup_prompts,
                           cfg.max_prompt_tokens)
    heldout, warmup = heldout[:cfg.heldout_prompts], heldout[cfg.heldout_prompts:]
    train = demo_prompts(target.tokenizer, "train", cfg.train_prompts, cfg.max_prompt_tokens)
    (state / "heldout_prompts.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in heldout))

    spare_text = (f" (a serving head and a spare node with {cfg.spare_slots} x {SPARE_RESOURCE}, no CPU)"
                  if cfg.spare_slots else " (one node)")
    _say(f"starting a local Ray cluster{spare_text} and an MLflow server (SQLite) on 127.0.0.1")
    services = start_demo_services(cfg, state)
    spare_node = services.spare_nodes[0].node_id if services.spare_nodes else None
    ray.init(address=services.ray_address, configure_logging=False, log_to_driver=False)
    registry = DrafterRegistry(services.mlflow_url, model_name=cfg.model_name)
    initial = register_initial_drafter(target, registry, cfg, state)
    _say(f"registered the untrained drafter {cfg.drafter} (+{cfg.draft_vocab_size}-token head) as "
         f"{cfg.model_name} v{initial.version} @champion")

    port = pick_port(cfg.serve_port)
    base = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(serve_args(cfg, state, services.mlflow_url)), name=APP_NAME, route_prefix="/")
    wait_for_drafter(base, initial.version, cfg.swap_timeout_s)
    _say(f"serving the OpenAI API at {base}/v1 with drafter v{initial.version} (num_speculative_tokens "
         f"{cfg.gamma}, engine {cfg.engine}{'; logging the target features' if cfg.logs_features else ''})")

    # Speculative phases send no num_speculative_tokens: the replica's own (cfg.gamma) applies.
    results = paired_phase(base, heldout, warmup, cfg, "before")
    results += replay(base, train, phase="serve", log=True, concurrency=cfg.concurrency, max_tokens=cfg.max_tokens)
    flushed = _get_json(f"{base}/draftsmith/flush", method="POST", timeout=60)
    _say(f"traffic log: {flushed.get('written')} records written to {state / 'traffic'}")

    distill_yaml, evaluate_yaml = write_job_configs(cfg, state, services.mlflow_url)
    logged = sum(r.ok for r in results if r.phase == "serve")
    trigger = DistillTrigger(trigger_config(cfg, state, services, distill_yaml, evaluate_yaml,
                                            min_new_records=max(1, int(logged * 0.9))))
    job_started = time.monotonic()
    job_id, outcome = run_job(trigger, cfg, services.mlflow_url)
    job_seconds = time.monotonic() - job_started
    if outcome.status != "SUCCEEDED":
        raise RuntimeError(f"distillation job {job_id} ended {outcome.status}; its log ends with:\n"
                           f"{outcome.logs_tail}")
    placement = job_placement(trigger.client(), job_id, services)
    where = ("the spare node" if placement["job_ran_on_spare_node"] else "the head node" if not spare_node
             else "NOT the spare node")
    _say(f"job {job_id}'s driver ran on {where} ({(placement['job_driver_node_id'] or '?')[:12]})")
    training = training_run_figures(services.mlflow_url, DISTILL_EXPERIMENT, DISTILL_RUN_NAME)
    if cfg.logs_features:
        _say(f"training read the features logged at serve time for {training['logged_feature_records']} of "
             f"{training['train_records']} records (problems: {training['logged_feature_problems']}); "
             f"training took {training['train_seconds']} s")
    challenger = max(registry.list_versions(), key=lambda v: int(v.version))
    gate_reason = challenger.tags.get("gate_reason", "")
    if cfg.promotion == "always":
        gate_reason = "promotion: always (the demo promotes the challenger without a gate)"
        registry.promote(challenger.version, reason=gate_reason)
    champion = registry.get_version_by_alias("champion")
    promoted = champion.version != initial.version
    _say(f"job {job_id} succeeded in {job_seconds:.0f} s; gate: {gate_reason}")
    swap_seconds = None
    if promoted:
        swap_seconds = wait_for_drafter(base, champion.version, cfg.swap_timeout_s)
        _say(f"the replica hot-swapped to drafter v{champion.version} ({swap_seconds:.0f} s after promotion)")

    results += paired_phase(base, heldout, warmup, cfg, "after")

    serving_placement = serve_actor_placement(services.dashboard_url, spare_node)
    if serving_placement["serve_actors_on_spare_node"]:
        _say(f"WARNING: Serve actors on the spare node: {serving_placement['serve_actors_on_spare_node']}")

    every_row = [r.as_row() for r in results]
    (state / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in every_row))
    rows = [r for r in every_row if not r["phase"].startswith(WARMUP_PREFIX)]  # the timeline: measured + serve
    groups = windows(rows, cfg.window)
    phases = {name: phase_summary(rows, name) for name in dict.fromkeys(r["phase"] for r in rows)}
    table = format_table(groups) + "\n\nby phase:\n" + format_table(phases.values())
    (state / "timeline.txt").write_text(table + "\n")
    plot = plot_timeline(groups, state / "timeline.png",
                         title=f"Draftsmith demo: {cfg.target}, gamma {cfg.gamma}, {cfg.concurrency} clients")
    before, after = phases["before"], phases["after"]
    failed = sum(1 for r in every_row if r["error"])  # warm-up requests included
    summary = {
        "requests": len(rows), "warmup_requests": len(every_row) - len(rows), "failed_requests": failed,
        **phase_figures(cfg, phases, len(warmup), failed),
        "initial_version": initial.version, "champion_version": champion.version, "promoted": promoted,
        "gate_reason": gate_reason, "gate": {k: v for k, v in challenger.tags.items() if k.startswith("gate_")},
        "job_id": job_id, "job_seconds": round(job_seconds, 1), **placement, "spare_slots": cfg.spare_slots,
        "log_features": cfg.logs_features, **training, **serving_placement,
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
    gain = summary["drafter_token_acceptance_after_swap"] - summary["drafter_token_acceptance_before_swap"]
    print(f"\nDrafter v{summary['initial_version']} -> v{summary['champion_version']}: the drafter's token acceptance "
          f"{summary['drafter_token_acceptance_before_swap']:.3f} -> {summary['drafter_token_acceptance_after_swap']:.3f} "
          f"({gain:+.3f}; with prompt lookup's proposals {summary['token_acceptance_before_swap']:.3f} -> "
          f"{summary['token_acceptance_after_swap']:.3f}), {summary['tok_s_before_swap']:.1f} -> {summary['tok_s_after_swap']:.1f} output tok/s "
          f"(speculation off, timed beside each: {summary['tok_s_autoregressive_before_swap']} / "
          f"{summary['tok_s_autoregressive_after_swap']} tok/s: {summary['speedup_before_swap']}x before the swap, "
          f"{summary['speedup_after_swap']}x after); {summary['failed_requests']} failed requests.")
    if cfg.leave_up:
        print(f"MLflow UI (registry: {cfg.model_name}): {summary['mlflow_url']}\n"
              f"Ray dashboard: {summary['ray_dashboard_url']}\nOpenAI endpoint: {summary['endpoint']}\n"
              f"Plot: {summary['plot']}\nStop everything with `make down` (draftsmith down).")
    print(json.dumps(summary))
    return 0 if summary["failed_requests"] == 0 and summary["promoted"] else 1
