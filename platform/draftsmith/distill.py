"""Drafter distillation on logged traffic: batching, the student forward, the loss and one training step.

What it does: turns TrafficRecords (or rows of the distillation dataset, see `pipelines/dataset.py`)
into padded batches (`collate`), runs the drafter over prompt + output in one teacher-forced forward
and reads its logits at the positions that predicted each output token (`DistillStudent`,
`student_logits`), compares them with the target's logged top-k log-probabilities (or with full
target logits recomputed on the same batch when `full_teacher_logits` is set) through
`draftsmith.losses`, optionally up-weighting the positions where the drafter's argmax differs from
the target's top-1 (as OSD does), and takes an optimizer step (`train_step`). Layer-parallel-aware
training (`layer_parallel_groups`: a group size > 1 or the serving plan's group sizes) adds the
drafter's grouped forward (EasySpec's approximation, `layer_parallel.training_forward`) to the same
step and averages both losses. A drafter that reads the target's features (EAGLE-style, models.py)
trains on the target's final-normed hidden states of the same batch (`teacher_features`, or features
the caller cached): its position t reads (feature t, token t + 1) and is trained to predict the
target's token t + 2 (the divergence above) and the target's feature t + 1 (a smooth-L1 regression,
weighted by `feature_loss_weight`), because serving feeds its drafted feature back for the next draft.
Pure torch.

What it does not do: read the traffic log (pipelines/), distribute training, checkpoint, or log to
MLflow (jobs/distill.py does, with Ray Train), or save drafters (models.save_drafter).

Parameters. The embeddings are always frozen (a derived drafter shares them with the target). The
decoder layers always train; `train_head` also trains the final norm and the head when the head is a
separate tensor: the trimmed VocabTrim head (`Drafter.head_weight`, trained as an `nn.Parameter`) or
an untied `lm_head`. A full head tied to the embeddings stays frozen with them.

Positions. The target's top-k logged at output position j is its distribution for output token j,
computed from the sequence up to (and excluding) that token, i.e. at index `prompt_len - 1 + j` of
prompt + output. Batches are right-padded, so causal attention never lets a real position see padding
and no attention mask is needed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from draftsmith import losses
from draftsmith.models import Drafter

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """The distillation algorithm's knobs (shapes and numbers only; the job adds I/O and scaling)."""

    loss: str = "fkl"  # fkl | rkl | jsd | tvd (draftsmith.losses.DIVERGENCES)
    jsd_beta: float = 0.5  # JSD mixing weight: beta * KL(p||m) + (1 - beta) * KL(q||m)
    wrong_weight: float = 1.0  # weight of positions where drafter argmax != target top-1 (OSD); 1 = uniform
    lr: float = 3e-4
    weight_decay: float = 0.0
    batch_size: int = 8  # records per optimizer step per worker
    max_seq_len: int = 512  # prompt + output tokens per record (prompt is cut from the left)
    steps: int | None = None  # optimizer steps; None: `epochs` passes over the data
    epochs: int = 1
    grad_clip: float | None = 1.0
    train_head: bool = True  # also the final norm and a separate (trimmed or untied) head
    full_teacher_logits: bool = False  # recompute the target's full logits instead of the logged top-k
    # Layer-parallel-aware training: the loss of the sequential and of the layer-parallel forward
    # (layer_parallel.training_forward), averaged. A group size (> 1), or the serving plan's explicit
    # group sizes (e.g. (1, 2, 2, 2, 1)); None, 1 or all-ones: sequential only.
    layer_parallel_groups: int | tuple[int, ...] | None = None
    # A feature-reading drafter's regression of the target's next feature, beside the token divergence.
    feature_loss_weight: float = 1.0
    # Its training loops keep each record's target features (float16) up to this many GB per worker,
    # so later epochs skip the target's forward (TargetFeatureCache); 0 recomputes every time.
    feature_cache_gb: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in losses.DIVERGENCES:
            raise ValueError(f"loss {self.loss!r} unknown; choose one of {sorted(losses.DIVERGENCES)}")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"jsd_beta must be in (0, 1), got {self.jsd_beta}")
        if self.wrong_weight <= 0 or self.lr <= 0 or self.batch_size < 1 or self.max_seq_len < 2:
            raise ValueError("wrong_weight and lr must be > 0, batch_size >= 1, max_seq_len >= 2")
        if self.feature_loss_weight < 0 or self.feature_cache_gb < 0:
            raise ValueError(f"feature_loss_weight and feature_cache_gb must be >= 0, got {self.feature_loss_weight} "
                             f"and {self.feature_cache_gb}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 (or None for epochs), got {self.steps}")
        groups = self.layer_parallel_groups
        sizes = list(groups) if isinstance(groups, (tuple, list)) else [groups]
        if groups is not None and (not sizes or min(sizes) < 1):
            raise ValueError(f"layer_parallel_groups must be a group size >= 1 or group sizes >= 1, got {groups}")


@dataclasses.dataclass
class DistillBatch:
    """Padded tensors for B records with at most T output positions and teacher top-k of width k."""

    input_ids: torch.Tensor  # [B, L] prompt + output[:-1], right-padded with pad_id
    pred_positions: torch.Tensor  # [B, T] index into L of the logits that predict output token t
    output_ids: torch.Tensor  # [B, T] the output tokens (padding: 0)
    topk_ids: torch.Tensor  # [B, T, k] target top-k ids (padding: 0)
    topk_logprobs: torch.Tensor  # [B, T, k] target log-probs (padding: log(1/k))
    mask: torch.Tensor  # [B, T] bool, True = a real output position
    accept_mask: torch.Tensor  # [B, T] bool, the logged accept flags (informational)

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    @property
    def input_lengths(self) -> torch.Tensor:
        """[B] real (unpadded) length of each row of input_ids: its last predicting position + 1."""
        return (self.pred_positions * self.mask).amax(1) + 1

    def to(self, device: torch.device | str) -> "DistillBatch":
        return DistillBatch(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def _field(record: Any, name: str):
    return record[name] if isinstance(record, Mapping) else getattr(record, name)


def collate(records: Sequence[Any], *, max_seq_len: int = 512, pad_id: int = 0) -> DistillBatch:
    """Records (TrafficRecord or dataset rows with the traffic columns) -> one padded DistillBatch.

    Records with no output token or no prompt are skipped. A record longer than `max_seq_len` keeps
    at most half the budget for its prompt tail when the output needs the rest, then the output head.
    """
    rows = []
    for rec in records:
        prompt = list(_field(rec, "prompt_token_ids"))
        output = list(_field(rec, "output_token_ids"))
        if not prompt or not output:
            continue
        n_out = min(len(output), max_seq_len - min(len(prompt), max_seq_len // 2))
        n_prompt = min(len(prompt), max_seq_len - n_out)
        prompt = prompt[len(prompt) - n_prompt:]
        rows.append((prompt, output[:n_out], _field(rec, "target_topk_ids")[:n_out],
                     _field(rec, "target_topk_logprobs")[:n_out], list(_field(rec, "accept_mask"))[:n_out]))
    if not rows:
        raise ValueError("collate got no record with both prompt and output tokens")
    k = max(len(r[2][0]) for r in rows)
    if k == 0 or any(len(ids) != k for r in rows for ids in r[2]):
        raise ValueError("records disagree on the teacher top-k width (or it is 0): log with one topk_logprobs")
    b = len(rows)
    seq_len = max(len(p) + len(o) - 1 for p, o, *_ in rows)
    t = max(len(o) for _, o, *_ in rows)
    input_ids = torch.full((b, seq_len), pad_id, dtype=torch.long)
    pred_positions = torch.zeros(b, t, dtype=torch.long)
    output_ids = torch.zeros(b, t, dtype=torch.long)
    topk_ids = torch.zeros(b, t, k, dtype=torch.long)
    topk_logprobs = torch.full((b, t, k), -math.log(k), dtype=torch.float32)
    mask = torch.zeros(b, t, dtype=torch.bool)
    accept = torch.zeros(b, t, dtype=torch.bool)
    for i, (prompt, output, ids, logprobs, acc) in enumerate(rows):
        seq = prompt + output[:-1]
        n = len(output)
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        pred_positions[i, :n] = torch.arange(len(prompt) - 1, len(prompt) - 1 + n)
        output_ids[i, :n] = torch.tensor(output, dtype=torch.long)
        topk_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
        topk_logprobs[i, :n] = torch.tensor(logprobs, dtype=torch.float32)
        mask[i, :n] = True
        accept[i, : len(acc)] = torch.tensor(acc, dtype=torch.bool)
    return DistillBatch(input_ids, pred_positions, output_ids, topk_ids, topk_logprobs, mask, accept)


class DistillStudent(nn.Module):
    """A drafter as one trainable module (what DDP / DeepSpeed wrap): HF decoder + full or trimmed head."""

    def __init__(self, drafter: Drafter, *, train_head: bool = True,
                 layer_parallel_groups: int | Sequence[int] | None = None):
        super().__init__()
        self.model = drafter.model
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
            self.head = nn.Parameter(drafter.head_weight.detach().clone().float().to(drafter.head_weight.dtype))
            self.register_buffer("head_token_ids", drafter.head_token_ids.clone().long())
        else:
            self.head = None
            self.head_token_ids = None
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.model.model.layers.parameters():
            p.requires_grad_(True)
        if train_head:
            for p in self.model.model.norm.parameters():
                p.requires_grad_(True)
            if self.head is None:
                lm_head = self.model.get_output_embeddings().weight
                if lm_head is self.model.get_input_embeddings().weight:
                    logger.info("the drafter's head is tied to its (frozen, shared) embeddings: head stays frozen")
                else:
                    lm_head.requires_grad_(True)
        elif self.head is not None:
            self.head.requires_grad_(False)

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
    first time the record is batched and kept (float16, on the CPU) while they fit in `max_bytes`.

    Why: a feature-reading drafter is a layer or two, so the target's forward over a batch costs several
    times its training step; it trains for many epochs on the same records. A record's features depend
    only on its own tokens (causal attention, right padding), so they are keyed by the record's index
    in the training data and reused in any later batch.
    """

    def __init__(self, target_model: nn.Module, max_bytes: float):
        self.target_model = target_model
        self.max_bytes = max_bytes
        self.bytes = 0
        self.computed = 0  # rows that needed the target's forward
        self._store: dict = {}

    def features(self, keys: Sequence, batch: DistillBatch) -> torch.Tensor:
        """[B, L, H] target features of the batch's input_ids; `keys[i]` names batch row i's record."""
        b, length = batch.input_ids.shape
        lengths = batch.input_lengths.tolist()
        out = torch.zeros(b, length, self.target_model.config.hidden_size, dtype=self.target_model.dtype,
                          device=batch.input_ids.device)
        missing = [i for i, key in enumerate(keys) if key not in self._store]
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
            if i not in fresh_rows:
                out[i, : lengths[i]] = self._store[key].to(out.device, out.dtype)
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
