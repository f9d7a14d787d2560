"""Drafter distillation on logged traffic: the settings, the student, the loss, one step and the training loop.

What it does: runs the drafter over prompt + output in one teacher-forced forward and reads its logits
at the positions that predicted each output token (`DistillStudent`, `student_logits`), compares them
with the target's logged top-k log-probabilities (or with full target logits recomputed on the same
batch when `full_teacher_logits` is set) through `draftsmith.losses`, optionally up-weighting the
positions where the drafter's argmax differs from the target's top-1 (as OSD does), and takes an
optimizer step (`train_step`). `train` is THE training loop (data order, step count, feature cache,
progress windows) that the Ray Train worker (jobs/distill.py) and the in-process benchmark
(pipelines/bench_distill.py) both run; what differs between them (DDP or DeepSpeed steps, checkpoints,
MLflow, a fault to inject, a time budget) comes in as a step function and callbacks.
Layer-parallel-aware training (`layer_parallel_groups`: a group size > 1 or the serving plan's group
sizes) adds the drafter's grouped forward (EasySpec's approximation, `layer_parallel.training_forward`)
to the same step and averages both losses. A drafter that reads the target's features (EAGLE-style,
models.py) trains on the target's final-normed hidden states of the same batch (`teacher_features`, or
features the caller cached): its position t reads (feature t, token t + 1) and is trained to predict the
target's token t + 2 (the divergence above) and the target's feature t + 1 (a smooth-L1 regression,
weighted by `feature_loss_weight`), because serving feeds its drafted feature back for the next draft.
Where the engine logged a record's features while serving it (serve's `traffic.log_features`,
draftsmith.traffic_features) and `logged_features` is on, `train` reads them instead of running the
target over the record; records without usable logged features are recomputed as before.
Pure torch.

What it does not do: read the traffic log or batch records (draftsmith.distill_data), distribute
training, checkpoint, or log to MLflow (jobs/distill.py does, with Ray Train, through `train`'s
callbacks), or save drafters (models.save_drafter).

Parameters. The student trains a copy of the drafter it is given (see `DistillStudent`). The embeddings
are always frozen (a derived drafter shares them with the target). The decoder layers always train;
`train_head` also trains the final norm and the head when the head is a separate tensor: the trimmed
VocabTrim head (`Drafter.head_weight`, trained as an `nn.Parameter`) or an untied `lm_head`. A full
head tied to the embeddings stays frozen with them.
"""

from __future__ import annotations

import copy as _copy
import dataclasses
import logging
import math
import time
from typing import Callable, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator
from torch import nn

from draftsmith import losses
from draftsmith.distill_data import DistillBatch, collate, rows
from draftsmith.models import Drafter

logger = logging.getLogger(__name__)

__all__ = ["DistillConfig", "DistillBatch", "DistillStudent", "TargetFeatureCache", "TrainCallback", "TrainResult",
           "batch_indices", "collate", "distill_loss", "logged_rows", "make_optimizer", "student_logits",
           "teacher_features", "teacher_logits", "total_steps", "train", "train_step", "trainable_parameters"]


class DistillConfig(BaseModel):
    """The distillation algorithm's settings: THE definition of each (jobs/distill.py nests them as `train:`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    loss: str = Field("fkl", description="Divergence between the drafter and the target's logged top-k: fkl, "
                      "rkl, jsd or tvd (draftsmith.losses.DIVERGENCES).")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="JSD mixing weight: beta * KL(p||m) + (1 - beta) * "
                            "KL(q||m).")
    wrong_weight: float = Field(1.0, gt=0, description="Weight of the positions where the drafter's argmax "
                                "differs from the target's top-1 (as OSD does); 1 = uniform.")
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(8, ge=1, description="Records per optimizer step per worker.")
    max_seq_len: int = Field(512, ge=2, description="Prompt + output tokens per record (the prompt is cut from "
                             "the left).")
    steps: int | None = Field(None, ge=1, description="Optimizer steps; unset: `epochs` passes over the data.")
    epochs: int = Field(1, ge=1, description="Passes over the train split when `steps` is unset.")
    grad_clip: float | None = Field(1.0, description="Max gradient norm (unset: no clipping).")
    train_head: bool = Field(True, description="Also train the final norm and a separate (trimmed or untied) "
                             "head.")
    full_teacher_logits: bool = Field(False, description="Recompute the target's full logits on each batch "
                                      "instead of reading the logged top-k (loads the target per worker).")
    layer_parallel_groups: PositiveInt | tuple[PositiveInt, ...] | None = Field(
        None, description="Layer-parallel-aware training: the sequential and the grouped forward's losses "
        "averaged (layer_parallel.training_forward). A group size, or the serving plan's consecutive group "
        "sizes (engine.layer_parallel_group_sizes, e.g. [1, 2, 2, 2, 1]); unset, 1 or all ones: sequential only.")
    feature_loss_weight: float = Field(1.0, ge=0, description="A feature-reading drafter: weight of its "
                                       "regression of the target's next feature, beside the token divergence.")
    feature_cache_gb: float = Field(2.0, ge=0, description="A feature-reading drafter: GB of target features "
                                    "(float16) kept per worker, so later epochs skip the target's forward "
                                    "(TargetFeatureCache); 0 recomputes every time.")
    logged_features: bool = Field(True, description="A feature-reading drafter: read the target's features "
                                  "logged at serve time (serve's traffic.log_features) for the records that have "
                                  "them, instead of recomputing them with the target's forward; records without "
                                  "them (or whose side file is unreadable) are recomputed.")
    seed: int = Field(0, description="Data order and initialization seed.")

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        if value not in losses.DIVERGENCES:
            raise ValueError(f"loss {value!r} unknown; choose one of {sorted(losses.DIVERGENCES)}")
        return value


class DistillStudent(nn.Module):
    """A drafter as one trainable module (what DDP / DeepSpeed wrap): HF decoder + full or trimmed head.

    It trains a copy: the parameters it trains are its own, the frozen ones (the embeddings, which a
    derived drafter shares with the target) are shared read-only, and the given drafter (possibly one that
    serves) keeps its weights and its parameters' `requires_grad` flags.
    """

    def __init__(self, drafter: Drafter, *, train_head: bool = True,
                 layer_parallel_groups: int | Sequence[int] | None = None):
        super().__init__()
        self.model = _training_copy(drafter.model, train_norm=train_head,
                                    train_lm_head=train_head and drafter.head_weight is None)
        self.meta = dict(drafter.meta)
        self.layer_parallel_plan = None  # the grouped forward's plan when layer-parallel-aware
        # [H, 2H]: the input map of a drafter that reads the target's features (always trained)
        self.feature_fc = None if drafter.feature_fc is None else nn.Parameter(drafter.feature_fc.detach().clone())
        if layer_parallel_groups and self.feature_fc is not None:
            raise ValueError("a feature-reading drafter drafts from the target's features, not under a layer-parallel "
                             "plan: leave layer_parallel_groups unset")
        if layer_parallel_groups:
            from draftsmith.layer_parallel import as_plan

            plan = as_plan(layer_parallel_groups, self.model.config.num_hidden_layers)
            self.layer_parallel_plan = None if plan.is_sequential else plan
        if drafter.head_weight is not None:
            self.head = nn.Parameter(drafter.head_weight.detach().clone().float().to(drafter.head_weight.dtype),
                                     requires_grad=train_head)
            self.register_buffer("head_token_ids", drafter.head_token_ids.clone().long())
        else:
            self.head = None
            self.head_token_ids = None


    @classmethod
    def for_config(cls, drafter: Drafter, config: DistillConfig) -> "DistillStudent":
        """The student `config` trains (its head and layer-parallel settings)."""
        return cls(drafter, train_head=config.train_head, layer_parallel_groups=config.layer_parallel_groups)

    @property
    def vocab_ids(self) -> torch.Tensor | None:
        """[V_draft] full-vocabulary id of each logit column, or None for the full vocabulary."""
        return self.head_token_ids

    def hidden_states(self, input_ids: torch.Tensor, *, layer_parallel: bool = False) -> torch.Tensor:
        """[B, L] -> final (normed) hidden states [B, L, H], sequential or under the layer-parallel plan."""
        if layer_parallel:
            from draftsmith.layer_parallel import training_forward

            # training_forward returns the hidden states before the final norm.
            hidden = training_forward(self.model, input_ids, plan=self.layer_parallel_plan)
            return self.model.model.norm(hidden)
        return self.model.model(input_ids=input_ids, use_cache=False).last_hidden_state

    @property
    def reads_target_features(self) -> bool:
        return self.feature_fc is not None

    def forward(self, input_ids: torch.Tensor, pred_positions: torch.Tensor,
                target_features: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, L], pred_positions [B, T] -> student logits [B, T, V_draft].

        A feature-reading drafter also takes the target's features [B, L, H] of input_ids and returns
        (logits [B, T, V_draft], its drafted features [B, L - 1, H]): position t reads (feature t, token
        t + 1) and drafts feature t + 1, so the logits for pred_position q come from position q - 1 (a
        pred_position of 0 has none: `distill_loss` masks it).

        Layer-parallel-aware (a plan with a group of several layers): logits [2B, T, V_draft], the sequential
        forward's rows first, then the layer-parallel forward's. Serving drafts the first token of each
        step sequentially (KV calibration) and the other gamma - 1 under the plan, so the drafter is
        trained for both; one forward call keeps DDP / DeepSpeed at one forward per backward.
        """
        if input_ids.dim() != 2 or pred_positions.dim() != 2 or input_ids.shape[0] != pred_positions.shape[0]:
            raise ValueError(f"input_ids [B, L] and pred_positions [B, T] expected, got "
                             f"{tuple(input_ids.shape)} and {tuple(pred_positions.shape)}")
        if self.reads_target_features:
            return self._feature_forward(input_ids, pred_positions, target_features)
        hidden = self.hidden_states(input_ids)  # [B, L, H]
        if self.layer_parallel_aware:
            hidden = torch.cat([hidden, self.hidden_states(input_ids, layer_parallel=True)])
            pred_positions = torch.cat([pred_positions, pred_positions])
        # Only the predicting positions go through the head: the head is most of a small drafter's cost.
        picked = hidden.gather(1, pred_positions[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, T, H]
        weight = self.head if self.head is not None else self.model.get_output_embeddings().weight
        return picked @ weight.to(picked.dtype).T

    def _feature_forward(self, input_ids, pred_positions, target_features):
        if target_features is None or target_features.shape[:2] != input_ids.shape:
            raise ValueError("a feature-reading drafter needs the target's features [B, L, H] of input_ids "
                             f"(teacher_features), got {None if target_features is None else tuple(target_features.shape)}")
        embeds = self.model.get_input_embeddings()(input_ids[:, 1:])
        inputs = torch.cat([embeds, target_features[:, :-1].to(embeds.dtype)], dim=-1) @ self.feature_fc.T
        drafted = self.model.model(inputs_embeds=inputs, use_cache=False).last_hidden_state  # [B, L - 1, H]
        at = (pred_positions - 1).clamp(min=0)
        picked = drafted.gather(1, at[..., None].expand(-1, -1, drafted.shape[-1]))  # [B, T, H]
        weight = self.head if self.head is not None else self.model.get_output_embeddings().weight
        return picked @ weight.to(picked.dtype).T, drafted

    @property
    def layer_parallel_aware(self) -> bool:
        return self.layer_parallel_plan is not None

    def to_drafter(self, version: str = "local") -> Drafter:
        """The trained drafter (shares tensors with this module; detach before further training)."""
        head = None if self.head is None else self.head.detach().clone()
        ids = None if self.head_token_ids is None else self.head_token_ids.clone()
        fc = None if self.feature_fc is None else self.feature_fc.detach().clone()
        return Drafter(self.model, dict(self.meta), head_token_ids=ids, head_weight=head, version=version,
                       feature_fc=fc)


def _trained_names(model: nn.Module, *, train_norm: bool, train_lm_head: bool) -> set[str]:
    """Names of the parameters training updates: the decoder layers, the final norm when asked, and the
    lm_head when asked and not tied to the (frozen) embeddings."""
    names = {f"model.layers.{n}" for n, _ in model.model.layers.named_parameters()}
    if train_norm:
        names |= {f"model.norm.{n}" for n, _ in model.model.norm.named_parameters()}
    if train_lm_head:
        lm_head = model.get_output_embeddings().weight
        if lm_head is model.get_input_embeddings().weight:
            logger.info("the drafter's head is tied to its (frozen, shared) embeddings: head stays frozen")
        else:
            names |= {n for n, p in model.named_parameters() if p is lm_head}
    return names


def _training_copy(model: nn.Module, **trained) -> nn.Module:
    """A copy of `model` whose trained parameters are its own tensors (requires_grad) and whose frozen ones
    share the original's storage through parameters of their own (requires_grad False): nothing of `model`,
    its weights or flags, changes when the copy trains."""
    trained = _trained_names(model, **trained)
    memo: dict[int, object] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name not in trained and id(p) not in memo:
            memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
    copy = _copy.deepcopy(model, memo)
    for name, p in copy.named_parameters():
        p.requires_grad_(name in trained)
    return copy


def _unwrap(student: nn.Module) -> DistillStudent:
    inner = student
    while not isinstance(inner, DistillStudent) and hasattr(inner, "module"):
        inner = inner.module  # DDP / DeepSpeed engine
    if not isinstance(inner, DistillStudent):
        raise TypeError(f"expected a DistillStudent (possibly wrapped), got {type(student).__name__}")
    return inner


def student_logits(student: nn.Module | Drafter, batch: DistillBatch,
                   target_features: torch.Tensor | None = None) -> torch.Tensor:
    """Student logits [B, T, V_draft] at the batch's predicting positions (a Drafter is wrapped first)."""
    if isinstance(student, Drafter):
        student = DistillStudent(student, train_head=False)
    if _unwrap(student).reads_target_features:
        return student(batch.input_ids, batch.pred_positions, target_features)[0]
    return student(batch.input_ids, batch.pred_positions)


@torch.no_grad()
def teacher_features(target_model: nn.Module, batch: DistillBatch) -> torch.Tensor:
    """The target's final-normed hidden states [B, L, H] of the batch's input_ids (no grad)."""
    return target_model.model(input_ids=batch.input_ids, use_cache=False).last_hidden_state


@torch.no_grad()
def teacher_logits(target_model: nn.Module, batch: DistillBatch, features: torch.Tensor | None = None) -> torch.Tensor:
    """The target's full logits [B, T, V] at the batch's predicting positions (no grad), from its
    `features` when given (teacher_features)."""
    hidden = teacher_features(target_model, batch) if features is None else features
    picked = hidden.gather(1, batch.pred_positions[..., None].expand(-1, -1, hidden.shape[-1]))
    return target_model.get_output_embeddings()(picked.to(target_model.dtype))


class TargetFeatureCache:
    """The target's features of each training record, computed by one teacher-forced target forward the
    first time the record is batched and kept (float16, on the CPU) while they fit in `max_bytes`; rows
    given logged features (`features(..., logged=)`) take those and need no forward.

    Why: a feature-reading drafter is a layer or two, so the target's forward over a batch costs several
    times its training step; it trains for many epochs on the same records. A record's features depend
    only on its own tokens (causal attention, right padding), so they are keyed by the record's index
    in the training data and reused in any later batch. Logged features are not kept here: their side
    file holds them already.
    """

    def __init__(self, target_model: nn.Module, max_bytes: float):
        self.target_model = target_model
        self.max_bytes = max_bytes
        self.bytes = 0
        self.computed = 0  # rows that needed the target's forward
        self.logged = 0  # rows that read features logged at serve time
        self._store: dict = {}

    def features(self, keys: Sequence, batch: DistillBatch,
                 logged: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """[B, L, H] target features of the batch's input_ids; `keys[i]` names batch row i's record, and
        `logged[i]`, when given and not None, is that row's features [its input length, H] as logged."""
        b, length = batch.input_ids.shape
        lengths = batch.input_lengths.tolist()
        out = torch.zeros(b, length, self.target_model.config.hidden_size, dtype=self.target_model.dtype,
                          device=batch.input_ids.device)
        from_log = set()
        for i, values in enumerate(logged or ()):
            if values is not None:
                out[i, : lengths[i]] = values.to(out.device, out.dtype)
                from_log.add(i)
        self.logged += len(from_log)
        missing = [i for i, key in enumerate(keys) if key not in self._store and i not in from_log]
        fresh_rows = set(missing)
        if missing:
            width = max(lengths[i] for i in missing)
            sub = dataclasses.replace(batch, input_ids=batch.input_ids[missing, :width])
            fresh = teacher_features(self.target_model, sub)
            self.computed += len(missing)
            for j, i in enumerate(missing):
                out[i, : lengths[i]] = fresh[j, : lengths[i]]
                kept = fresh[j, : lengths[i]].to("cpu", torch.float16)
                size = kept.numel() * kept.element_size()
                if self.bytes + size <= self.max_bytes:
                    self._store[keys[i]] = kept
                    self.bytes += size
        for i, key in enumerate(keys):
            if i not in fresh_rows and i not in from_log:
                out[i, : lengths[i]] = self._store[key].to(out.device, out.dtype)
        return out


def logged_rows(source, records: Sequence, batch: DistillBatch) -> list[torch.Tensor | None]:
    """Each batch row's logged target features cut to its input [input length, H] float16, or None.

    `source.lookup(request_id, positions)` (draftsmith.traffic_features.LoggedFeatures) gives a record's
    features at every position of its prompt + output but the last. `collate` may have cut the prompt's
    head (max_seq_len): the row then starts that many positions in; the features there were computed with
    the whole prompt before them, as serving computed them. All None when the batch's rows are not the
    records one to one (collate skipped one).
    """
    if len(records) != batch.input_ids.shape[0]:
        return [None] * batch.input_ids.shape[0]
    lengths, outputs = batch.input_lengths.tolist(), batch.mask.sum(1).tolist()
    out: list[torch.Tensor | None] = []
    for i, record in enumerate(records):
        prompt, output = len(record["prompt_token_ids"]), len(record["output_token_ids"])
        values = source.lookup(record["request_id"], prompt + output - 1) if "request_id" in record else None
        if values is None:
            out.append(None)
            continue
        start = prompt - (lengths[i] - outputs[i] + 1)  # the prompt tokens collate cut from the left
        out.append(torch.from_numpy(np.array(values[start: start + lengths[i]])))
    return out


def distill_loss(student: nn.Module, batch: DistillBatch, config: DistillConfig, *,
                 target_model: nn.Module | None = None,
                 target_features: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted divergence over real output positions, and stats (loss, top-1 match, tokens).

    A feature-reading drafter adds `feature_loss_weight` x its feature regression (stat `feature_loss`);
    its target features come from `target_features` [B, L, H] (a caller's cache) or from `target_model`.
    """
    inner = _unwrap(student)
    feature_loss = None
    mask = batch.mask
    if inner.reads_target_features:
        if target_features is None:
            if target_model is None:
                raise ValueError("a feature-reading drafter trains on the target's features: pass target_model= "
                                 "(or target_features=)")
            target_features = teacher_features(target_model, batch)
        logits, drafted = student(batch.input_ids, batch.pred_positions, target_features)
        # Position t drafts feature t + 1 for every t + 1 inside the record (padding ends where its last
        # predicting position does); a first output token predicted at position 0 has no drafting position.
        inside = torch.arange(drafted.shape[1], device=drafted.device)[None] < batch.input_lengths[:, None] - 1
        feature_loss = nn.functional.smooth_l1_loss(drafted[inside], target_features[:, 1:][inside].to(drafted.dtype))
        mask = batch.mask & (batch.pred_positions >= 1)
    else:
        logits = student(batch.input_ids, batch.pred_positions)  # [B, T, V_draft] ([2B, ...]: layer-parallel-aware)
    copies = logits.shape[0] // batch.input_ids.shape[0]  # the sequential and layer-parallel rows share targets
    mask = mask.repeat(copies, 1)
    flat = logits[mask]  # [N, V_draft]
    top_ids = batch.topk_ids.repeat(copies, 1, 1)[mask]  # [N, k]
    top_logprobs = batch.topk_logprobs.repeat(copies, 1, 1)[mask]  # [N, k]
    vocab_ids = inner.vocab_ids
    teacher_top1 = top_ids.gather(1, top_logprobs.argmax(-1, keepdim=True))[:, 0]  # [N]
    teacher_kwargs: dict[str, torch.Tensor] = {"teacher_topk_ids": top_ids, "teacher_topk_logprobs": top_logprobs}
    if config.full_teacher_logits:
        if target_model is None:
            raise ValueError("full_teacher_logits needs the target model: pass target_model=")
        full = teacher_logits(target_model, batch, target_features).repeat(copies, 1, 1)[mask].float()  # [N, V]
        teacher_kwargs = {"teacher_logits": full}
        teacher_top1 = full.argmax(-1)
    with torch.no_grad():
        argmax = flat.argmax(-1)
        student_top1 = argmax if vocab_ids is None else vocab_ids[argmax]
        match = (student_top1 == teacher_top1).float()
    weights = None
    if config.wrong_weight != 1.0:
        weights = losses.mismatch_weights(student_top1, teacher_top1, config.wrong_weight)
    loss = losses.distill_loss(flat, student_token_ids=vocab_ids, weights=weights, divergence=config.loss,
                               beta=config.jsd_beta, **teacher_kwargs)
    if feature_loss is not None:
        loss = loss + config.feature_loss_weight * feature_loss
    stats = {"loss": float(loss.detach()), "top1_match": float(match.mean()) if match.numel() else 0.0,
             "tokens": float(batch.mask.sum())}
    if feature_loss is not None:
        stats["feature_loss"] = float(feature_loss.detach())
    if copies == 2:  # the layer-parallel forward's own agreement (the rows after the sequential ones)
        stats["top1_match_layer_parallel"] = float(match[int(batch.mask.sum()):].mean()) if match.numel() else 0.0
    return loss, stats


def trainable_parameters(student: nn.Module) -> list[nn.Parameter]:
    return [p for p in student.parameters() if p.requires_grad]


def make_optimizer(student: nn.Module, config: DistillConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(trainable_parameters(student), lr=config.lr, weight_decay=config.weight_decay)


def train_step(student: nn.Module, optimizer: torch.optim.Optimizer, batch: DistillBatch, config: DistillConfig,
               *, target_model: nn.Module | None = None, target_features: torch.Tensor | None = None) -> dict[str, float]:
    """One optimizer step on one batch (plain torch or DDP); returns the loss stats and grad norm."""
    student.train()
    optimizer.zero_grad(set_to_none=True)
    loss, stats = distill_loss(student, batch, config, target_model=target_model, target_features=target_features)
    loss.backward()
    if config.grad_clip:
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(trainable_parameters(student), config.grad_clip))
    optimizer.step()
    return stats


# ------------------------------------------------------------------------------------------- the loop


def total_steps(config: DistillConfig, records: int, world: int = 1) -> int:
    """Optimizer steps of a run: `steps`, or `epochs` passes of `world` workers over `records`."""
    return config.steps or config.epochs * _steps_per_epoch(config, records, world)


def _steps_per_epoch(config: DistillConfig, records: int, world: int) -> int:
    return max(1, math.ceil(records / (config.batch_size * world)))


def batch_indices(config: DistillConfig, records: int, step: int, *, rank: int = 0, world: int = 1) -> list[int]:
    """The records worker `rank` of `world` trains on at `step`: a fresh permutation per epoch (seeded by
    seed + epoch, the same on every worker), each worker reading its own slice of it, wrapping at the end.
    A function of the step alone, so a run resumed from a checkpoint sees the data it would have seen."""
    epoch, within = divmod(step, _steps_per_epoch(config, records, world))
    order = torch.randperm(records, generator=torch.Generator().manual_seed(config.seed + epoch)).tolist()
    first = (within * world + rank) * config.batch_size
    return [order[(first + i) % records] for i in range(config.batch_size)]


class TrainCallback:
    """Hooks of `train` (each a no-op here): subclass and override what a caller needs."""

    def before_step(self, step: int) -> bool:
        """Called before each step; False stops the run before it (a time budget)."""
        return True

    def after_step(self, step: int, stats: dict[str, float]) -> None:
        """Called after each step with its stats (progress bars)."""

    def report(self, metrics: dict[str, float], *, checkpoint: bool) -> None:
        """Called every `report_every` steps, every `checkpoint_every` steps (checkpoint=True) and after the
        last step (checkpoint=True), with the figures averaged since the previous report."""


@dataclasses.dataclass
class TrainResult:
    step: int  # steps done, counting those before a resume
    total_steps: int
    tokens_per_worker: float
    last_stats: dict
    feature_rows_computed: int = 0  # batch rows whose target features needed the target's forward
    feature_rows_logged: int = 0  # batch rows that read features logged at serve time


_WINDOW_KEYS = ("loss", "top1_match", "tokens", "top1_match_layer_parallel", "feature_loss")


def train(student: DistillStudent, data, config: DistillConfig, *, model: nn.Module | None = None,
          step_fn: Callable[[DistillBatch, torch.Tensor | None], dict] | None = None,
          target_model: nn.Module | None = None, device: torch.device | str = "cpu", rank: int = 0, world: int = 1,
          start_step: int = 0, tokens_per_worker: float = 0.0, report_every: int | None = None,
          checkpoint_every: int | None = None, callbacks: Sequence[TrainCallback] = (),
          logged_features=None) -> TrainResult:
    """Train `student` on `data` (a column-oriented dataset of traffic rows, `datasets.Dataset`).

    `model` is what runs the step (the student, or its DDP wrapper); `step_fn(batch, target_features)`
    takes one optimizer step and returns its stats (default: `train_step` with AdamW over `model`; a
    DeepSpeed engine passes its own). `target_model` is needed for `full_teacher_logits` and for a
    feature-reading drafter, whose target features are cached per record (`feature_cache_gb`), or read
    from `logged_features` (draftsmith.traffic_features.LoggedFeatures: by the rows' request ids) when
    `config.logged_features` is on; the target still recomputes those of the records the log lacks.
    """
    model = model if model is not None else student
    if step_fn is None:
        optimizer = make_optimizer(model, config)

        def step_fn(batch, features):
            return train_step(model, optimizer, batch, config, target_model=target_model, target_features=features)

    feature_cache = None
    if student.reads_target_features:
        if target_model is None:
            raise ValueError("a feature-reading drafter trains on the target's features: pass target_model=")
        feature_cache = TargetFeatureCache(target_model, config.feature_cache_gb * 2**30)
    logged_features = logged_features if config.logged_features and feature_cache else None
    records, total = len(data), total_steps(config, len(data), world)
    window: dict[str, float] = {"n": 0}
    window_start, stats, done = time.perf_counter(), {}, start_step
    for step in range(start_step, total):
        if not all(callback.before_step(step) for callback in callbacks):
            break
        indices = batch_indices(config, records, step, rank=rank, world=world)
        recs = rows(data, indices)
        batch = collate(recs, max_seq_len=config.max_seq_len).to(device)
        features = None
        if feature_cache:
            logged = logged_rows(logged_features, recs, batch) if logged_features is not None else None
            features = feature_cache.features(indices, batch, logged)
        stats = step_fn(batch, features)
        tokens_per_worker += stats["tokens"]
        done = step + 1
        for callback in callbacks:
            callback.after_step(step, stats)
        for key in _WINDOW_KEYS:
            if key in stats:  # the last two only in layer-parallel-aware or feature-drafter training
                window[key] = window.get(key, 0.0) + stats[key]
        window["n"] += 1
        checkpoint = done == total or bool(checkpoint_every and done % checkpoint_every == 0)
        if not checkpoint and not (report_every and done % report_every == 0):
            continue
        elapsed = time.perf_counter() - window_start
        metrics = {"step": done, "total_steps": total, "epoch": step // _steps_per_epoch(config, records, world),
                   "resumed_from_step": start_step, "tokens_per_s": window.get("tokens", 0.0) * world / max(elapsed, 1e-9),
                   "train_tokens": tokens_per_worker * world}
        if feature_cache:  # how many rows the target's forward served and how many the log did, so far
            metrics.update(feature_rows_computed=feature_cache.computed, feature_rows_logged=feature_cache.logged)
        metrics.update({k: window[k] / window["n"] for k in _WINDOW_KEYS if k in window and k != "tokens"})
        window, window_start = {"n": 0}, time.perf_counter()
        for callback in callbacks:
            callback.report(metrics, checkpoint=checkpoint)
    return TrainResult(done, total, tokens_per_worker, stats,
                       feature_rows_computed=feature_cache.computed if feature_cache else 0,
                       feature_rows_logged=feature_cache.logged if feature_cache else 0)
