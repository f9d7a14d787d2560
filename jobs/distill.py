"""The distillation job: traffic log -> Ray Train (DDP or DeepSpeed) -> challenger drafter in the registry.

Driver side (`run_distill`): optionally defers when Serve is busy (`serving_load`), builds the
train / held-out split of one target's traffic (pipelines/dataset.py), resolves the starting drafter
(the registry's champion, a local directory, or a derivation from the target), stages both for the
workers, runs a `TorchTrainer` with the scaling, strategy, checkpointing and failure policy of the
typed config, then saves the challenger as an HF drafter directory and registers it (alias
`challenger`). Worker side (`train_loop_per_worker`): reads only its config dict (house style 9),
trains `draftsmith.distill.DistillStudent` on its shard, checkpoints every N steps with
`ray.train.report`, resumes from `ray.train.get_checkpoint()` after a failure, and logs to MLflow from
rank 0 only, through `MlflowRunLogger`.

Not here: the algorithm (draftsmith.distill, draftsmith.losses), evaluation and the promotion gate
(jobs/ evaluation, draftsmith.registry), deciding when to distill (pipelines/ trigger).

Run: `ray job submit --working-dir . -- python -m jobs.distill --config infra/distill.yaml`, or
`draftsmith distill --config ...`, or `run_distill(DistillJobConfig(...))` from Python.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
DRAFTER_SUBDIR = "drafter"
DS_TAG = "ds"


# ------------------------------------------------------------------------------------------- config


class FaultInjection(BaseModel):
    """Testing aid: make one worker die (os._exit) once, to exercise FailureConfig and resume."""

    model_config = ConfigDict(extra="forbid")
    step: int = Field(description="die just before this (0-based) optimizer step")
    marker: str = Field(description="file created before dying; while it exists, the fault does not repeat")
    rank: int = Field(0, description="which worker dies")
    delay_s: float = Field(
        5.0, ge=0, description="wait before dying: Ray Train V2 collects reports when it polls the workers "
                               "(every 2 s), and a checkpoint reported less than a poll before a failure is lost")


class DistillJobConfig(BaseModel):
    """Everything a distillation run needs; load from YAML with `from_yaml` (see infra/distill.yaml)."""

    model_config = ConfigDict(extra="forbid")

    # traffic selection
    traffic_uri: str = Field(".state/traffic", description="traffic log root (local path, file://, s3://, ...)")
    since: dt.datetime | None = Field(None, description="first record time (inclusive, timezone-aware)")
    until: dt.datetime | None = Field(None, description="end of the window (exclusive, timezone-aware)")
    heldout_fraction: float = Field(0.1, ge=0, lt=1, description="most recent fraction held out for evaluation")
    sources: list[str] | None = Field(None, description="record sources to use (served, backfill); all if unset")
    # models
    target: str = Field("smollm2-135m-instruct", description="target model spec (preset, HF dir, .gguf)")
    drafter: str = Field(
        "models:/draftsmith-drafter@champion",
        description="starting drafter: models:/<name>@<alias> or /<version>, a local drafter dir, or "
                    "derived:<layers> (e.g. derived:first2+last1) or feature:<layers> (e.g. feature:last1, an "
                    "EAGLE-style drafter that reads the target's features)")
    fallback_derivation: str | None = Field(
        "derived:first2+last1", description="used when `drafter` is a models:/ alias that does not exist yet")
    draft_vocab_size: int | None = Field(None, ge=2, description="trimmed head size for a derived drafter")
    # algorithm (draftsmith.distill.DistillConfig)
    loss: Literal["fkl", "rkl", "jsd", "tvd"] = Field("fkl", description="divergence vs the logged top-k")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="JSD mixing weight")
    wrong_weight: float = Field(1.0, gt=0, description="weight of positions the drafter gets wrong (OSD)")
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    batch_size: int = Field(8, ge=1, description="records per step per worker")
    max_seq_len: int = Field(512, ge=2, description="prompt + output tokens per record")
    steps: int | None = Field(None, ge=1, description="optimizer steps (None: `epochs` passes)")
    epochs: int = Field(1, ge=1, description="passes over the train split when `steps` is unset")
    grad_clip: float | None = Field(1.0, description="max grad norm (None: off)")
    train_head: bool = Field(True, description="also train the final norm and a separate/trimmed head")
    full_teacher_logits: bool = Field(False, description="recompute full target logits (loads the target per worker)")
    layer_parallel_groups: PositiveInt | list[PositiveInt] | None = Field(
        None, description="layer-parallel-aware training, the sequential and the grouped forward's losses averaged: "
        "a group size, or the serving plan's group sizes (engine.layer_parallel_group_sizes, e.g. [1, 2, 2, 2, 1])")
    feature_loss_weight: float = Field(
        1.0, ge=0, description="a feature-reading drafter: weight of its regression of the target's next feature")
    feature_cache_gb: float = Field(
        2.0, ge=0, description="a feature-reading drafter: GB of target features kept per worker across epochs")
    seed: int = Field(0, description="data order and initialization seed")
    # scaling and strategy
    num_workers: int = Field(1, ge=1, description="Ray Train workers")
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL (CPU: gloo)")
    resources_per_worker: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0},
        description="Ray resources per worker: distillation never claims more than this spare capacity")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per worker (default 1 if >1 worker)")
    strategy: Literal["ddp", "deepspeed"] = Field("ddp", description="data parallelism")
    zero_stage: Literal[1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage")
    # checkpoints, failures, outputs
    checkpoint_every: int = Field(50, ge=1, description="steps between Ray Train checkpoints")
    log_every: int = Field(10, ge=1, description="steps between progress reports / MLflow metrics")
    max_failures: int = Field(1, ge=-1, description="worker failures to recover from (resume from checkpoint)")
    state_dir: str = Field(".state", description="Ray Train storage, staging and output root")
    run_name: str | None = Field(None, description="default: distill-<UTC time>")
    output_dir: str | None = Field(None, description="challenger dir (default <state_dir>/drafters/<run_name>)")
    # MLflow
    tracking_uri: str | None = Field(None, description="MLflow server; unset: no logging, no registration")
    registry_uri: str | None = Field(None, description="model registry (default: tracking_uri)")
    model_name: str = Field("draftsmith-drafter", description="registered model of the drafters")
    experiment: str = Field("draftsmith-distill", description="MLflow experiment of training runs")
    register_challenger: bool = Field(True, description="register the challenger (needs tracking_uri)")
    # spare compute
    only_when_serving_load_below: float | None = Field(
        None, description="defer (status 'deferred') when Serve's ongoing requests per replica exceed this")
    fault_injection: FaultInjection | None = Field(None, description="testing only")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides) -> "DistillJobConfig":
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.model_validate({**data, **overrides})

    def distill_config(self):
        from draftsmith.distill import DistillConfig

        return DistillConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DistillConfig)})


@dataclasses.dataclass
class DistillOutcome:
    drafter_dir: Path | None
    registered_version: str | None
    metrics: dict
    status: str = "trained"  # trained | deferred


def deepspeed_config(cfg: DistillJobConfig) -> dict:
    """The DeepSpeed config generated from the typed config (fp32; torch AdamW so CPUs need no kernels)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip or 0.0,
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay,
                                                  "torch_adam": True}},
        "zero_optimization": {"stage": cfg.zero_stage},
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# ------------------------------------------------------------------------------------------- helpers


class MlflowRunLogger:
    """The one MLflow helper of the job: an explicit-URI client writing to one run (no global state)."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id

    @classmethod
    def start(cls, tracking_uri: str, experiment: str, run_name: str, tags: dict) -> "MlflowRunLogger":
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        run = client.create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
        return cls(tracking_uri, run.info.run_id)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()
                                                    if isinstance(v, (int, float))])

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def serving_load(*, timeout_s: float = 2.0) -> float:
    """Ongoing requests per running Serve replica, from Serve's status and the nodes' metrics endpoints.

    0.0 when Serve is not running. Reads the `ray_serve_replica_processing_queries` gauges that each
    node exports for Prometheus (refreshed every few seconds). Needs a connected Ray.
    """
    import ray
    from ray import serve

    try:
        status = serve.status()
    except Exception:  # noqa: BLE001 - Serve not started on this cluster
        return 0.0
    replicas = sum(int(d.replica_states.get("RUNNING", 0))
                   for app in status.applications.values() for d in app.deployments.values())
    if replicas == 0:
        return 0.0
    ongoing = 0.0
    for node in ray.nodes():
        if not node.get("Alive") or not node.get("MetricsExportPort"):
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                text = response.read().decode("utf-8", errors="replace")
        except OSError as error:
            logger.warning("serving_load: metrics endpoint %s unreadable (%s)", url, error)
            continue
        for line in text.splitlines():
            if line.startswith("ray_serve_replica_processing_queries"):
                ongoing += float(line.rsplit(" ", 1)[-1])
    return ongoing / replicas


def _load_training_drafter(path: str):
    """A drafter dir loaded for training (no target needed: the driver already checked compatibility)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from draftsmith.models import DRAFT_HEAD_FILE, DRAFTER_META_FILE, FEATURE_FC_FILE, Drafter

    path = Path(path)
    meta = json.loads((path / DRAFTER_META_FILE).read_text()) if (path / DRAFTER_META_FILE).exists() else {}
    drafter = Drafter(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), meta)
    if (path / DRAFT_HEAD_FILE).exists():
        head = load_file(str(path / DRAFT_HEAD_FILE))
        drafter.head_weight, drafter.head_token_ids = head["weight"].float(), head["token_ids"].long()
    if (path / FEATURE_FC_FILE).exists():
        drafter.feature_fc = load_file(str(path / FEATURE_FC_FILE))["weight"].float()
    return drafter


def _rows(dataset, indices: list[int]) -> list[dict]:
    columns = dataset[indices]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


# ------------------------------------------------------------------------------------------- worker


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker. Reads only `config` (built by `run_distill`)."""
    import datasets
    import ray.train
    import ray.train.torch
    import torch

    from draftsmith.distill import (
        DistillConfig,
        DistillStudent,
        TargetFeatureCache,
        collate,
        distill_loss,
        make_optimizer,
        train_step,
    )
    from draftsmith.models import save_drafter

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = config["torch_threads"] or (1 if world > 1 else None)
    if threads:
        torch.set_num_threads(threads)
    algo = DistillConfig(**config["distill"])
    torch.manual_seed(algo.seed)
    device = ray.train.torch.get_device()
    data = datasets.load_from_disk(config["train_dir"])
    per_epoch = max(1, math.ceil(len(data) / (algo.batch_size * world)))
    total = algo.steps or algo.epochs * per_epoch
    student = DistillStudent(_load_training_drafter(config["drafter_dir"]), train_head=algo.train_head,
                             layer_parallel_groups=algo.layer_parallel_groups)
    target_model, feature_cache = None, None
    if algo.full_teacher_logits or student.reads_target_features:
        from draftsmith.models import load_model

        target_model = load_model(config["target"], device=str(device)).model
    if student.reads_target_features:
        feature_cache = TargetFeatureCache(target_model, algo.feature_cache_gb * 2**30)
    deepspeed = config["strategy"] == "deepspeed"
    if deepspeed:
        import deepspeed as ds

        params = [p for p in student.parameters() if p.requires_grad]
        model, optimizer, _, _ = ds.initialize(model=student.to(device), model_parameters=params,
                                               config=config["deepspeed"])
    else:
        model = ray.train.torch.prepare_model(student)  # DDP when world > 1
        optimizer = make_optimizer(model, algo)
    start, tokens_seen = 0, 0.0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt:
            state = torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=False)
            start, tokens_seen = state["step"], state.get("tokens_per_worker", 0.0)
            if deepspeed:
                model.load_checkpoint(ckpt, tag=DS_TAG)
            else:
                student.load_state_dict(state["student"])
                optimizer.load_state_dict(state["optimizer"])
        logger.info("rank %d resumed from step %d", rank, start)
    mlflow = MlflowRunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 and config["run_id"] else None
    if mlflow and start == 0:
        mlflow.log_params({**config["distill"], "strategy": config["strategy"], "num_workers": world,
                           "total_steps": total, "train_records": len(data)})
    fault = config.get("fault")
    window = {"loss": 0.0, "top1_match": 0.0, "tokens": 0.0, "n": 0}
    window_start = time.perf_counter()
    for step in range(start, total):
        if fault and rank == fault["rank"] and step == fault["step"] and not os.path.exists(fault["marker"]):
            Path(fault["marker"]).write_text(f"died at step {step}\n")
            time.sleep(fault["delay_s"])
            os._exit(1)
        epoch, within = divmod(step, per_epoch)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(algo.seed + epoch)).tolist()
        first = (within * world + rank) * algo.batch_size
        indices = [order[(first + i) % len(data)] for i in range(algo.batch_size)]
        batch = collate(_rows(data, indices), max_seq_len=algo.max_seq_len).to(device)
        features = feature_cache.features(indices, batch) if feature_cache else None
        if deepspeed:
            model.train()
            loss, stats = distill_loss(model, batch, algo, target_model=target_model, target_features=features)
            model.backward(loss)
            model.step()
        else:
            stats = train_step(model, optimizer, batch, algo, target_model=target_model, target_features=features)
        for key in ("loss", "top1_match", "tokens", "top1_match_layer_parallel", "feature_loss"):
            if key in stats:  # the last two only in layer-parallel-aware or feature-drafter training
                window[key] = window.get(key, 0.0) + stats[key]
        window["n"] += 1
        tokens_seen += stats["tokens"]
        done = step + 1
        if done % config["log_every"] and done % config["checkpoint_every"] and done != total:
            continue
        elapsed = time.perf_counter() - window_start
        metrics = {"step": done, "total_steps": total, "epoch": epoch, "resumed_from_step": start,
                   "loss": window["loss"] / window["n"], "top1_match": window["top1_match"] / window["n"],
                   "tokens_per_s": window["tokens"] * world / max(elapsed, 1e-9),
                   "train_tokens": tokens_seen * world}
        for key in ("top1_match_layer_parallel", "feature_loss"):
            if key in window:
                metrics[key] = window[key] / window["n"]
        window = {"loss": 0.0, "top1_match": 0.0, "tokens": 0.0, "n": 0}
        window_start = time.perf_counter()
        if mlflow:
            mlflow.log_metrics({k: v for k, v in metrics.items() if k != "total_steps"}, step=done)
        if done % config["checkpoint_every"] and done != total:
            ray.train.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            if deepspeed:
                model.save_checkpoint(tmp, tag=DS_TAG)  # every rank writes its ZeRO shards
            if rank == 0:
                state = {"step": done, "tokens_per_worker": tokens_seen}
                if not deepspeed:
                    state.update(student=student.state_dict(), optimizer=optimizer.state_dict())
                torch.save(state, Path(tmp) / STATE_FILE)
            if done == total:
                _export_drafter(student, Path(tmp) / DRAFTER_SUBDIR, rank, deepspeed and config["zero_stage"] == 3,
                                save_drafter)
            report_checkpoint = deepspeed or rank == 0
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if report_checkpoint else None)


def _export_drafter(student, out: Path, rank: int, zero3: bool, save_drafter) -> None:
    """Rank 0 writes the trained drafter as an HF dir (under ZeRO-3 every rank gathers the params first)."""
    import contextlib

    gather = contextlib.nullcontext()
    if zero3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(student.parameters()), modifier_rank=None)
    with gather:
        if rank == 0:
            save_drafter(student.to_drafter(), out)


# ------------------------------------------------------------------------------------------- driver


def _registry(cfg: DistillJobConfig):
    from draftsmith.registry import DrafterRegistry

    if not cfg.tracking_uri:
        raise ValueError("a models:/ drafter or registration needs tracking_uri (the MLflow server)")
    return DrafterRegistry(cfg.tracking_uri, cfg.registry_uri, model_name=cfg.model_name)


def resolve_starting_drafter(cfg: DistillJobConfig, target, train_output_ids, staging: Path):
    """(Drafter, parent_version | None) from a models:/ URI, a local dir, `derived:<layers>` or `feature:<layers>`."""
    from draftsmith.models import DERIVATION_PREFIXES, derive_from_spec, frequent_token_ids, load_drafter

    spec = cfg.drafter
    if spec.startswith("models:/"):
        from draftsmith.registry import RegistryError

        registry = _registry(cfg)
        try:
            version = registry.resolve(spec)
        except RegistryError as error:
            if not cfg.fallback_derivation:
                raise
            logger.info("%s; starting from %s instead", error, cfg.fallback_derivation)
            spec = cfg.fallback_derivation
        else:
            local = registry.download(version.version, staging / "parent")
            return load_drafter(local, target, version=version.version), version.version
    if spec.startswith(DERIVATION_PREFIXES):
        vocab = None
        if cfg.draft_vocab_size:
            vocab = frequent_token_ids(train_output_ids, cfg.draft_vocab_size, always=target.eos_token_ids)
        return derive_from_spec(target, spec, draft_vocab_ids=vocab), None
    return load_drafter(spec, target, version=Path(spec).name), None


def _train_output_ids(dataset) -> list[list[int]]:
    return dataset["output_token_ids"]


def run_distill(cfg: DistillJobConfig, *, load_probe: Callable[[], float] | None = None) -> DistillOutcome:
    """Select traffic, train on Ray Train, save and register the challenger. See the module docstring.

    `load_probe` measures serving load for `only_when_serving_load_below` (default `serving_load`).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from draftsmith.models import DRAFTER_META_FILE, load_model, save_drafter
    from pipelines.dataset import build_distill_dataset

    if not ray.is_initialized():
        ray.init(configure_logging=False)
    if cfg.only_when_serving_load_below is not None:
        load = (load_probe or serving_load)()
        if load > cfg.only_when_serving_load_below:
            logger.info("serving load %.2f > %.2f: distillation deferred", load, cfg.only_when_serving_load_below)
            return DistillOutcome(None, None, {"serving_load": load}, status="deferred")
    run_name = cfg.run_name or f"distill-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}"
    state_dir = Path(cfg.state_dir).expanduser().resolve()
    staging = state_dir / "distill" / run_name
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    target = load_model(cfg.target)
    data = build_distill_dataset(cfg.traffic_uri, target_id=target.model_id, target_revision=target.revision,
                                 tokenizer_hash=target.tokenizer_hash, since=cfg.since, until=cfg.until,
                                 heldout_fraction=cfg.heldout_fraction,
                                 sources=tuple(cfg.sources) if cfg.sources else None)
    if len(data.train) == 0:
        raise ValueError(f"no training traffic for target {target.model_id} ({target.revision}) under "
                         f"{cfg.traffic_uri} in the window [{cfg.since}, {cfg.until}): serve or backfill some")
    drafter, parent_version = resolve_starting_drafter(cfg, target, _train_output_ids(data.train), staging)
    save_drafter(drafter, staging / "start", target.tokenizer)
    data.train.save_to_disk(str(staging / "train"))
    window = {"since": cfg.since.isoformat() if cfg.since else data.stats["first_record_at"],
              "until": cfg.until.isoformat() if cfg.until else data.stats["last_record_at"]}
    tags = {"target_id": target.model_id, "target_revision": target.revision,
            "tokenizer_hash": target.tokenizer_hash, "traffic_since": window["since"],
            "traffic_until": window["until"], "heldout_since": data.stats["heldout_since"] or "",
            "loss": cfg.loss, "parent_version": parent_version or "", "strategy": cfg.strategy,
            "drafter_kind": drafter.meta.get("kind", "external")}
    run_logger = MlflowRunLogger.start(cfg.tracking_uri, cfg.experiment, run_name, tags) if cfg.tracking_uri else None
    loop_config = {
        "distill": dataclasses.asdict(cfg.distill_config()),
        "train_dir": str(staging / "train"), "drafter_dir": str(staging / "start"), "target": cfg.target,
        "strategy": cfg.strategy, "zero_stage": cfg.zero_stage, "deepspeed": deepspeed_config(cfg),
        "checkpoint_every": cfg.checkpoint_every, "log_every": cfg.log_every, "torch_threads": cfg.torch_threads,
        "tracking_uri": cfg.tracking_uri, "run_id": run_logger.run_id if run_logger else None,
        "fault": cfg.fault_injection.model_dump() if cfg.fault_injection else None,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=dict(cfg.resources_per_worker)),
        run_config=RunConfig(name=run_name, storage_path=str(state_dir / "ray_train"),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception:
        if run_logger:
            run_logger.finish("FAILED")
        raise
    train_seconds = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError(f"distillation run {run_name} finished without a checkpoint: see Ray Train logs")
    out_dir = Path(cfg.output_dir).expanduser().resolve() if cfg.output_dir else state_dir / "drafters" / run_name
    shutil.rmtree(out_dir, ignore_errors=True)
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(Path(ckpt) / DRAFTER_SUBDIR, out_dir)
    target.tokenizer.save_pretrained(out_dir)
    meta_path = out_dir / DRAFTER_META_FILE
    meta = json.loads(meta_path.read_text())
    meta.update(parent_version=parent_version, traffic_window=window, loss=cfg.loss, run_name=run_name,
                training_run_id=run_logger.run_id if run_logger else None)
    meta_path.write_text(json.dumps(meta, indent=2))
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    metrics.update(train_seconds=train_seconds, records=data.stats["records"],
                   train_records=data.stats["train_records"], heldout_records=data.stats["heldout_records"],
                   train_output_tokens=data.stats["train_output_tokens"])
    version = None
    if run_logger:
        run_logger.log_metrics({"train_seconds": train_seconds}, step=int(metrics.get("step", 0)))
        run_logger.finish()
    if cfg.register_challenger and cfg.tracking_uri:
        registered = _registry(cfg).register_drafter(
            out_dir, experiment=cfg.experiment, run_name=f"{run_name}-challenger",
            tags={**tags, "training_run_id": run_logger.run_id if run_logger else ""},
            metrics={f"train_{k}": v for k, v in metrics.items()},
            params={"loss": cfg.loss, "lr": cfg.lr, "steps": metrics.get("step"), "strategy": cfg.strategy},
            parent_version=parent_version)
        version = registered.version
    logger.info("distillation %s: challenger %s (version %s) in %.1f s", run_name, out_dir, version, train_seconds)
    return DistillOutcome(out_dir, version, metrics)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.distill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file with DistillJobConfig fields (e.g. infra/distill.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field (YAML value), e.g. --set steps=20 --set num_workers=2")
    parser.add_argument("--only-when-serving-load-below", type=float, default=None,
                        help="exit with status 'deferred' when Serve's ongoing requests per replica exceed this")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import yaml

    overrides: dict[str, Any] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    if args.only_when_serving_load_below is not None:
        overrides["only_when_serving_load_below"] = args.only_when_serving_load_below
    cfg = DistillJobConfig.from_yaml(args.config, **overrides) if args.config else DistillJobConfig(**overrides)
    outcome = run_distill(cfg)
    print(json.dumps({"status": outcome.status, "drafter_dir": str(outcome.drafter_dir) if outcome.drafter_dir
                      else None, "registered_version": outcome.registered_version, **outcome.metrics}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
