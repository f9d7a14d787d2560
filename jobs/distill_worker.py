"""The distillation job's worker side: one Ray Train worker, its checkpoints and its MLflow logging.

What it does: `train_loop_per_worker` reads only its config dict (built by jobs/distill.py's
`run_distill`), loads the staged drafter and train split, wraps the student for DDP
(`ray.train.torch.prepare_model`) or DeepSpeed, resumes from `ray.train.get_checkpoint()` after a
failure, and runs THE training loop, `draftsmith.distill.train`, with callbacks: `_RayTrainReporter`
reports every `log_every` steps and checkpoints every `checkpoint_every` steps and after the last one
(where rank 0 also exports the trained drafter), logging to MLflow from rank 0 only (`MlflowRunLogger`);
`_Fault` makes one worker die once, to test the failure policy. A feature-reading drafter reads the
target features logged at serve time (`logged_features`: the side files of the traffic log the config
names as `traffic_uri`, for the train split's records and time span) where the log has them.

What it does not do: choose the data, the starting drafter or the scaling (jobs/distill.py), or define
the data order and the step (draftsmith.distill).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

from draftsmith.distill import DistillConfig, TrainCallback

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
DRAFTER_SUBDIR = "drafter"
DS_TAG = "ds"


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


# ------------------------------------------------------------------------------------------- worker


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker. Reads only `config` (built by `run_distill`)."""
    import datasets
    import ray.train
    import ray.train.torch
    import torch

    from draftsmith.distill import DistillStudent, distill_loss, make_optimizer, total_steps, train, train_step

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = config["torch_threads"] or (1 if world > 1 else None)
    if threads:
        torch.set_num_threads(threads)
    algo = DistillConfig.model_validate(config["distill"])
    torch.manual_seed(algo.seed)
    device = ray.train.torch.get_device()
    data = datasets.load_from_disk(config["train_dir"])
    student = DistillStudent.for_config(_load_training_drafter(config["drafter_dir"]), algo)
    target_model = None
    if algo.full_teacher_logits or student.reads_target_features:
        from draftsmith.models import load_model

        target_model = load_model(config["target"], device=str(device)).model
    logged = None
    if student.reads_target_features and algo.logged_features and config.get("traffic_uri"):
        logged = logged_features(config["traffic_uri"], data)
    deepspeed = config["strategy"] == "deepspeed"
    if deepspeed:
        import deepspeed as ds

        params = [p for p in student.parameters() if p.requires_grad]
        model, optimizer, _, _ = ds.initialize(model=student.to(device), model_parameters=params,
                                               config=config["deepspeed"])

        def step_fn(batch, features):
            model.train()
            loss, stats = distill_loss(model, batch, algo, target_model=target_model, target_features=features)
            model.backward(loss)
            model.step()
            return stats
    else:
        model = ray.train.torch.prepare_model(student)  # DDP when world > 1
        optimizer = make_optimizer(model, algo)

        def step_fn(batch, features):
            return train_step(model, optimizer, batch, algo, target_model=target_model, target_features=features)
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
                           "total_steps": total_steps(algo, len(data), world), "train_records": len(data)})
        if logged is not None:
            mlflow.log_params({"logged_feature_records": len(logged),
                               "logged_feature_problems": "; ".join(f"{p}: {r}" for p, r in logged.problems)
                               or "none"})
    callbacks = [_RayTrainReporter(student, model, optimizer, rank, world, deepspeed, config, mlflow)]
    if config.get("fault"):
        callbacks.insert(0, _Fault(rank, config["fault"]))
    train(student, data, algo, model=model, step_fn=step_fn, target_model=target_model, device=device, rank=rank,
          world=world, start_step=start, tokens_per_worker=tokens_seen, report_every=config["log_every"],
          checkpoint_every=config["checkpoint_every"], callbacks=callbacks, logged_features=logged)


def logged_features(traffic_uri: str, data):
    """The index of the features logged for `data`'s records (a train split with request_id and created_at
    columns), over the side files of the hours its records span; unreadable ones are reported in its
    `problems` and their records recomputed."""
    import datetime as dt

    import pyarrow.compute as pc

    from draftsmith.traffic_features import LoggedFeatures

    table = data.data.table if hasattr(data.data, "table") else data.data
    if table.num_rows == 0:
        return LoggedFeatures.index(traffic_uri, request_ids=())
    span = pc.min_max(table["created_at"])
    since, until = (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
                    for t in (span["min"].as_py(), span["max"].as_py() + dt.timedelta(microseconds=1)))
    logged = LoggedFeatures.index(traffic_uri, request_ids=table["request_id"].to_pylist(), since=since, until=until)
    logger.info("%d of %d training records have logged target features (%d unreadable side files)", len(logged),
                table.num_rows, len(logged.problems))
    return logged


class _Fault(TrainCallback):
    """Testing aid: this worker dies (os._exit) once, just before the configured step."""

    def __init__(self, rank: int, fault: dict):
        self.rank, self.fault = rank, fault

    def before_step(self, step: int) -> bool:
        fault = self.fault
        if self.rank == fault["rank"] and step == fault["step"] and not os.path.exists(fault["marker"]):
            Path(fault["marker"]).write_text(f"died at step {step}\n")
            time.sleep(fault["delay_s"])
            os._exit(1)
        return True


class _RayTrainReporter(TrainCallback):
    """Reports to Ray Train (with a checkpoint at checkpoint steps and the last one) and to MLflow (rank 0)."""

    def __init__(self, student, model, optimizer, rank: int, world: int, deepspeed: bool, config: dict, mlflow):
        self.student, self.model, self.optimizer, self.rank, self.world = student, model, optimizer, rank, world
        self.deepspeed, self.config, self.mlflow = deepspeed, config, mlflow

    def report(self, metrics: dict, *, checkpoint: bool) -> None:
        import ray.train
        import torch

        from draftsmith.models import save_drafter

        if self.mlflow:
            self.mlflow.log_metrics({k: v for k, v in metrics.items() if k != "total_steps"}, step=metrics["step"])
        if not checkpoint:
            ray.train.report(metrics)
            return
        done, final = metrics["step"], metrics["step"] == metrics["total_steps"]
        with tempfile.TemporaryDirectory() as tmp:
            if self.deepspeed:
                self.model.save_checkpoint(tmp, tag=DS_TAG)  # every rank writes its ZeRO shards
            if self.rank == 0:
                state = {"step": done, "tokens_per_worker": metrics["train_tokens"] / self.world}
                if not self.deepspeed:
                    state.update(student=self.student.state_dict(), optimizer=self.optimizer.state_dict())
                torch.save(state, Path(tmp) / STATE_FILE)
            if final:
                _export_drafter(self.student, Path(tmp) / DRAFTER_SUBDIR, self.rank,
                                self.deepspeed and self.config["zero_stage"] == 3, save_drafter)
            report_checkpoint = self.deepspeed or self.rank == 0
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
