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
step and averages both losses. Pure torch.

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
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in losses.DIVERGENCES:
            raise ValueError(f"loss {self.loss!r} unknown; choose one of {sorted(losses.DIVERGENCES)}")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"jsd_beta must be in (0, 1), got {self.jsd_beta}")
        if self.wrong_weight <= 0 or self.lr <= 0 or self.batch_size < 1 or self.max_seq_len < 2:
            raise ValueError("wrong_weight and lr must be > 0, batch_size >= 1, max_seq_len >= 2")
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

    def forward(self, input_ids: torch.Tensor, pred_positions: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L], pred_positions [B, T] -> student logits [B, T, V_draft].

        Layer-parallel-aware (a plan with a group of several layers): logits [2B, T, V_draft], the sequential
        forward's rows first, then the layer-parallel forward's. Serving drafts the first token of each
        step sequentially (KV calibration) and the other gamma - 1 under the plan, so the drafter is
        trained for both; one forward call keeps DDP / DeepSpeed at one forward per backward.
        """
        if input_ids.dim() != 2 or pred_positions.dim() != 2 or input_ids.shape[0] != pred_positions.shape[0]:
            raise ValueError(f"input_ids [B, L] and pred_positions [B, T] expected, got "
                             f"{tuple(input_ids.shape)} and {tuple(pred_positions.shape)}")
        hidden = self.hidden_states(input_ids)  # [B, L, H]
        if self.layer_parallel_aware:
            hidden = torch.cat([hidden, self.hidden_states(input_ids, layer_parallel=True)])
            pred_positions = torch.cat([pred_positions, pred_positions])
        # Only the predicting positions go through the head: the head is most of a small drafter's cost.
        picked = hidden.gather(1, pred_positions[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, T, H]
        weight = self.head if self.head is not None else self.model.get_output_embeddings().weight
        return picked @ weight.to(picked.dtype).T

    @property
    def layer_parallel_aware(self) -> bool:
        return self.layer_parallel_plan is not None

    def to_drafter(self, version: str = "local") -> Drafter:
        """The trained drafter (shares tensors with this module; detach before further training)."""
        head = None if self.head is None else self.head.detach().clone()
        ids = None if self.head_token_ids is None else self.head_token_ids.clone()
        return Drafter(self.model, dict(self.meta), head_token_ids=ids, head_weight=head, version=version)


def _unwrap(student: nn.Module) -> DistillStudent:
    inner = student
    while not isinstance(inner, DistillStudent) and hasattr(inner, "module"):
        inner = inner.module  # DDP / DeepSpeed engine
    if not isinstance(inner, DistillStudent):
        raise TypeError(f"expected a DistillStudent (possibly wrapped), got {type(student).__name__}")
    return inner


def student_logits(student: nn.Module | Drafter, batch: DistillBatch) -> torch.Tensor:
    """Student logits [B, T, V_draft] at the batch's predicting positions (a Drafter is wrapped first)."""
    if isinstance(student, Drafter):
        student = DistillStudent(student, train_head=False)
    return student(batch.input_ids, batch.pred_positions)


@torch.no_grad()
def teacher_logits(target_model: nn.Module, batch: DistillBatch) -> torch.Tensor:
    """The target's full logits [B, T, V] at the batch's predicting positions (no grad)."""
    hidden = target_model.model(input_ids=batch.input_ids, use_cache=False).last_hidden_state
    picked = hidden.gather(1, batch.pred_positions[..., None].expand(-1, -1, hidden.shape[-1]))
    return target_model.get_output_embeddings()(picked)


def distill_loss(student: nn.Module, batch: DistillBatch, config: DistillConfig, *,
                 target_model: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted divergence over real output positions, and stats (loss, top-1 match, tokens)."""
    inner = _unwrap(student)
    logits = student(batch.input_ids, batch.pred_positions)  # [B, T, V_draft] ([2B, ...]: layer-parallel-aware)
    copies = logits.shape[0] // batch.input_ids.shape[0]  # the sequential and layer-parallel rows share targets
    mask = batch.mask.repeat(copies, 1)
    flat = logits[mask]  # [N, V_draft]
    top_ids = batch.topk_ids.repeat(copies, 1, 1)[mask]  # [N, k]
    top_logprobs = batch.topk_logprobs.repeat(copies, 1, 1)[mask]  # [N, k]
    vocab_ids = inner.vocab_ids
    teacher_top1 = top_ids.gather(1, top_logprobs.argmax(-1, keepdim=True))[:, 0]  # [N]
    teacher_kwargs: dict[str, torch.Tensor] = {"teacher_topk_ids": top_ids, "teacher_topk_logprobs": top_logprobs}
    if config.full_teacher_logits:
        if target_model is None:
            raise ValueError("full_teacher_logits needs the target model: pass target_model=")
        full = teacher_logits(target_model, batch).repeat(copies, 1, 1)[mask].float()  # [N, V]
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
    stats = {"loss": float(loss.detach()), "top1_match": float(match.mean()) if match.numel() else 0.0,
             "tokens": float(batch.mask.sum())}
    if copies == 2:  # the layer-parallel forward's own agreement (the rows after the sequential ones)
        stats["top1_match_layer_parallel"] = float(match[int(batch.mask.sum()):].mean()) if match.numel() else 0.0
    return loss, stats


def trainable_parameters(student: nn.Module) -> list[nn.Parameter]:
    return [p for p in student.parameters() if p.requires_grad]


def make_optimizer(student: nn.Module, config: DistillConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(trainable_parameters(student), lr=config.lr, weight_decay=config.weight_decay)


def train_step(student: nn.Module, optimizer: torch.optim.Optimizer, batch: DistillBatch, config: DistillConfig,
               *, target_model: nn.Module | None = None) -> dict[str, float]:
    """One optimizer step on one batch (plain torch or DDP); returns the loss stats and grad norm."""
    student.train()
    optimizer.zero_grad(set_to_none=True)
    loss, stats = distill_loss(student, batch, config, target_model=target_model)
    loss.backward()
    if config.grad_clip:
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(trainable_parameters(student), config.grad_clip))
    optimizer.step()
    return stats
