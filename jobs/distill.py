"""The distillation job: traffic log -> Ray Train (DDP or DeepSpeed) -> challenger drafter in the registry.

Driver side (`run_distill`): optionally defers when Serve is busy (`serve.load.serving_load`), builds the
train / held-out split of one target's traffic and narrows its training side to the recency window plus
replayed older records (draftsmith.distill_data, `window:`), resolves the starting drafter
(the registry's champion, a local directory, or a derivation from the target), stages both for the
workers, runs a `TorchTrainer` with the scaling, strategy, checkpointing and failure policy of the
typed config, then saves the challenger as an HF drafter directory and registers it (alias
`challenger`), tagged with its held-out time and the window it learnt from (`window_tags`). Run as a Ray
Job, it refuses relative local paths (`refuse_relative_paths`: the driver runs in its uploaded copy of the
working dir, which has no `.state`). Worker side
(`train_loop_per_worker`): reads only its config dict, wraps the student for DDP or DeepSpeed and runs
THE training loop, `draftsmith.distill.train` (data order, steps), with callbacks that checkpoint every
N steps through `ray.train.report`, log to MLflow from rank 0 only (`MlflowRunLogger`) and inject a
fault when testing; it resumes from `ray.train.get_checkpoint()`.

Not here: the algorithm and its settings (draftsmith.distill.DistillConfig, nested here as `train:`),
the dataset, its held-out split and the window rule (draftsmith.distill_data, `RecencyWindow` nested here
as `window:`), evaluation and the promotion gate (jobs/evaluate.py, draftsmith.registry), deciding when
to distill (pipelines/trigger.py).

Run: `ray job submit --working-dir . -- python -m jobs.distill --config infra/distill.yaml --set
traffic_uri=$PWD/.state/traffic --set state_dir=$PWD/.state` (absolute paths: see above), or `draftsmith distill
--config ...`, or `run_distill(DistillJobConfig(...))` from Python.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from draftsmith.distill import DistillConfig
from draftsmith.distill_data import RecencyWindow
from draftsmith.local_paths import PathKind, relative_local_path
from jobs.distill_worker import DRAFTER_SUBDIR, MlflowRunLogger, train_loop_per_worker

logger = logging.getLogger(__name__)



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
    heldout_fraction: float = Field(
        0.1, ge=0, lt=1, description="most recent fraction held out for evaluation (of the window's span plus "
                                     "its held-out part when `window` limits it, else of all selected traffic)")
    window: RecencyWindow = Field(
        default_factory=RecencyWindow,
        description="the recency window over the training records and the replayed share of older ones "
                    "(draftsmith.distill_data.RecencyWindow); both limits unset: all traffic")
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
    train: DistillConfig = Field(default_factory=DistillConfig,
                                 description="the algorithm's settings (draftsmith.distill.DistillConfig)")
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
        None, description="defer (status 'deferred') while serving load, Serve's ongoing requests per SpecPair "
                          "replica (serve.load.serving_load), exceeds this")
    fault_injection: FaultInjection | None = Field(None, description="testing only")

    def local_paths(self) -> dict[str, tuple[str | None, PathKind]]:
        """The fields that may name a local path, with how each is read (`draftsmith.local_paths.relative_local_path`)."""
        return {"traffic_uri": (self.traffic_uri, "uri"), "state_dir": (self.state_dir, "dir"),
                "output_dir": (self.output_dir, "dir"), "tracking_uri": (self.tracking_uri, "tracking"),
                "registry_uri": (self.registry_uri, "tracking")}

    @classmethod
    def from_yaml(cls, path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> "DistillJobConfig":
        """The config of a YAML file (None: the defaults) with `overrides`, whose dotted keys reach into the
        nested sections (`{"train.steps": 20}`)."""
        import yaml

        data = (yaml.safe_load(Path(path).read_text()) or {}) if path else {}
        for key, value in (overrides or {}).items():
            *sections, name = key.split(".")
            node = data
            for section in sections:
                node = node.setdefault(section, {})
            node[name] = value
        return cls.model_validate(data)


@dataclasses.dataclass
class DistillOutcome:
    drafter_dir: Path | None
    registered_version: str | None
    metrics: dict
    status: str = "trained"  # trained | deferred


def deepspeed_config(cfg: DistillJobConfig) -> dict:
    """The DeepSpeed config generated from the typed config (fp32; torch AdamW so CPUs need no kernels)."""
    algo = cfg.train
    return {
        "train_micro_batch_size_per_gpu": algo.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": algo.grad_clip or 0.0,
        "optimizer": {"type": "AdamW", "params": {"lr": algo.lr, "weight_decay": algo.weight_decay,
                                                  "torch_adam": True}},
        "zero_optimization": {"stage": cfg.zero_stage},
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


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


WINDOW_TAGS = ("window_start", "window_end", "window_records", "replay_records", "replay_start", "replay_end")


def window_tags(stats: dict) -> dict[str, str]:
    """The registry tags that say which records a version learnt from, from `build_distill_dataset`'s stats:
    the window's first / last record time and record count, and the replayed records' count and time range
    (ISO times; "" when there is none)."""
    return {key: "" if stats.get(key) is None else str(stats[key]) for key in WINDOW_TAGS}


def window_params(window: RecencyWindow, stats: dict) -> dict[str, Any]:
    """MLflow params of the training run: the window's settings and what it selected. The settings are
    prefixed `window.` since `window_records` is also the selected count."""
    settings = {f"window.{k}": ("" if v is None else v) for k, v in window.model_dump().items()}
    return {**settings, **window_tags(stats), "window_pool_records": stats.get("window_pool_records", "")}


# ------------------------------------------------------------------------------------------- paths in a Ray Job

# The Jobs API sets the first for every job's driver (and strips RAY_JOB_ID from it, which Ray's worker processes
# carry): either says this process runs as part of a Ray job.
RAY_JOB_ENV = ("RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_JOB_ID")


def running_as_ray_job(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a Ray Job's driver (or a Ray worker), from its environment."""
    environ = os.environ if environ is None else environ
    return any(environ.get(name) for name in RAY_JOB_ENV)


def refuse_relative_paths(job: str, paths: dict[str, tuple[str | None, PathKind]],
                          environ: Mapping[str, str] | None = None) -> None:
    """In a Ray Job, raise ValueError naming every field of `paths` that is a relative local path.

    Why: a Ray Job's driver runs in its own copy of the uploaded working_dir, on whichever node the job lands, and
    the upload leaves out `.state`; a relative `traffic_uri` would silently read an empty log there, a relative
    `state_dir` write checkpoints and the challenger into a copy that is deleted. Outside a Ray Job the working
    directory is the user's own, and relative paths mean what they say."""
    if not running_as_ray_job(environ):
        return
    bad = {name: value for name, (value, kind) in paths.items() if relative_local_path(value, kind)}
    if bad:
        listed = ", ".join(f"{name}={value!r}" for name, value in bad.items())
        raise ValueError(
            f"{job} runs as a Ray Job, whose working directory is its uploaded copy of the working_dir (without "
            f".state), so these relative paths would name a temporary copy: {listed}. Give each as an absolute path "
            f"or a URI (e.g. --set {next(iter(bad))}=/absolute/path); `draftsmith trigger` does so for its traffic_uri "
            f"and for the job configs' relative paths.")


def run_distill(cfg: DistillJobConfig, *, load_probe: Callable[[], float] | None = None) -> DistillOutcome:
    """Select traffic, train on Ray Train, save and register the challenger. See the module docstring.

    `load_probe` measures serving load for `only_when_serving_load_below` (default
    `serve.load.serving_load`: ongoing requests per SpecPair replica). In a Ray Job, relative local paths are
    refused (`refuse_relative_paths`).
    """
    refuse_relative_paths("jobs.distill", cfg.local_paths())
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from draftsmith.distill_data import build_distill_dataset
    from draftsmith.models import DRAFTER_META_FILE, load_model, save_drafter

    if not ray.is_initialized():
        ray.init(configure_logging=False)
    if cfg.only_when_serving_load_below is not None:
        if load_probe is None:
            from serve.load import serving_load as load_probe
        load = load_probe()
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
                                 sources=tuple(cfg.sources) if cfg.sources else None, window=cfg.window)
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
            "loss": cfg.train.loss, "parent_version": parent_version or "", "strategy": cfg.strategy,
            "drafter_kind": drafter.meta.get("kind", "external"), **window_tags(data.stats)}
    run_logger = MlflowRunLogger.start(cfg.tracking_uri, cfg.experiment, run_name, tags) if cfg.tracking_uri else None
    if run_logger:
        run_logger.log_params(window_params(cfg.window, data.stats))
    loop_config = {
        "distill": cfg.train.model_dump(mode="json"),
        "train_dir": str(staging / "train"), "drafter_dir": str(staging / "start"), "target": cfg.target,
        "strategy": cfg.strategy, "zero_stage": cfg.zero_stage, "deepspeed": deepspeed_config(cfg),
        "checkpoint_every": cfg.checkpoint_every, "log_every": cfg.log_every, "torch_threads": cfg.torch_threads,
        "tracking_uri": cfg.tracking_uri, "run_id": run_logger.run_id if run_logger else None,
        "fault": cfg.fault_injection.model_dump() if cfg.fault_injection else None,
        # The workers (on the spare node, in their own working dir) read the logged features beside the log.
        "traffic_uri": cfg.traffic_uri if "://" in cfg.traffic_uri else str(Path(cfg.traffic_uri).resolve()),
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
    meta.update(parent_version=parent_version, traffic_window=window, loss=cfg.train.loss, run_name=run_name,
                training_run_id=run_logger.run_id if run_logger else None,
                recency_window={**window_tags(data.stats), "settings": cfg.window.model_dump()})
    meta_path.write_text(json.dumps(meta, indent=2))
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    metrics.update(train_seconds=train_seconds, records=data.stats["records"],
                   train_records=data.stats["train_records"], heldout_records=data.stats["heldout_records"],
                   heldout_excluded=data.stats["heldout_excluded"],
                   train_output_tokens=data.stats["train_output_tokens"],
                   window_records=data.stats["window_records"], replay_records=data.stats["replay_records"])
    version = None
    if run_logger:
        run_logger.log_metrics({"train_seconds": train_seconds}, step=int(metrics.get("step", 0)))
        run_logger.finish()
    if cfg.register_challenger and cfg.tracking_uri:
        registered = _registry(cfg).register_drafter(
            out_dir, experiment=cfg.experiment, run_name=f"{run_name}-challenger",
            tags={**tags, "training_run_id": run_logger.run_id if run_logger else ""},
            metrics={f"train_{k}": v for k, v in metrics.items()},
            params={"loss": cfg.train.loss, "lr": cfg.train.lr, "steps": metrics.get("step"), "strategy": cfg.strategy},
            parent_version=parent_version)
        version = registered.version
    logger.info("distillation %s: challenger %s (version %s) in %.1f s", run_name, out_dir, version, train_seconds)
    return DistillOutcome(out_dir, version, metrics)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.distill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file with DistillJobConfig fields (e.g. infra/distill.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field (YAML value), e.g. --set train.steps=20 --set num_workers=2")
    parser.add_argument("--only-when-serving-load-below", type=float, default=None,
                        help="exit with status 'deferred' when Serve's ongoing requests per SpecPair replica "
                             "exceed this")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import yaml

    overrides: dict[str, Any] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    if args.only_when_serving_load_below is not None:
        overrides["only_when_serving_load_below"] = args.only_when_serving_load_below
    cfg = DistillJobConfig.from_yaml(args.config, overrides)
    outcome = run_distill(cfg)
    print(json.dumps({"status": outcome.status, "drafter_dir": str(outcome.drafter_dir) if outcome.drafter_dir
                      else None, "registered_version": outcome.registered_version, **outcome.metrics}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
