"""Distillation divergences between the target (teacher) and a drafter (student).

What it does: turns the teacher (logged top-k log-probs, or full logits recomputed
with the target) and the student's logits into two distributions over the same
bins, and computes a per-position divergence ("fkl", "rkl", "jsd", "tvd") and its
weighted mean. Pure torch.

What it does not do: run models, read traffic, choose which positions to train
on (callers pass ``weights`` / ``mask``; ``mismatch_weights`` helps), or log.

Bins. The traffic log keeps only the teacher's top-k at each position, so both
distributions are collapsed onto k + 1 bins: the k logged token ids plus one
"everything else" bin. Teacher tail mass is ``1 - sum(exp(topk_logprobs))``;
student tail mass is ``1 - sum`` of its probabilities on those ids, computed as a
log-sum-exp over the remaining columns (exact even when the tail is tiny). Teacher
ids the student cannot emit (trimmed draft vocabulary) get student mass 0 in their
bin. Every divergence here is an f-divergence (KL, reverse KL, JSD, TVD), so by the
data processing inequality the k+1-bin value is a LOWER BOUND of the full-vocabulary
divergence; it is exact per bin, and exact overall when the teacher is given as
full logits (``teacher_logits``): then the bins are the student's vocabulary plus a
tail bin for the target-vocabulary ids a trimmed drafter cannot emit.

Conventions. p = teacher, q = student.
  fkl: KL(p || q) = sum p (log p - log q)              (OSD's default; mode covering)
  rkl: KL(q || p)                                      (mode seeking)
  jsd: beta * KL(p || m) + (1 - beta) * KL(q || m),  m = beta p + (1 - beta) q
       (DistillSpec's JSD[beta]; beta = 0.5 is the symmetric Jensen-Shannon divergence)
  tvd: 0.5 * sum |p - q|
Probabilities below ``eps`` are floored to ``eps`` in log space, so an empty bin
contributes ~0 and never a NaN, in the value or the gradient.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# ---------------------------------------------------------------- divergences on bins
# Each takes log-probabilities logp, logq [N, B] (floored, float32) and returns [N].


def _fkl(logp: Tensor, logq: Tensor, beta: float) -> Tensor:
    return (logp.exp() * (logp - logq)).sum(-1)


def _rkl(logp: Tensor, logq: Tensor, beta: float) -> Tensor:
    return (logq.exp() * (logq - logp)).sum(-1)


def _jsd(logp: Tensor, logq: Tensor, beta: float) -> Tensor:
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
    kl_pm = (logp.exp() * (logp - logm)).sum(-1)
    kl_qm = (logq.exp() * (logq - logm)).sum(-1)
    return beta * kl_pm + (1.0 - beta) * kl_qm


def _tvd(logp: Tensor, logq: Tensor, beta: float) -> Tensor:
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


DIVERGENCES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "fkl": _fkl,
    "rkl": _rkl,
    "jsd": _jsd,
    "tvd": _tvd,
}

# ---------------------------------------------------------------- binning


def _log1mexp(log_s: Tensor) -> Tensor:
    """log(1 - exp(log_s)) for log_s <= 0; -inf when log_s == 0 (floored later)."""
    return torch.log(-torch.expm1(log_s.clamp(max=0.0)))


def teacher_bins(teacher_topk_logprobs: Tensor, eps: float = 1e-8) -> Tensor:
    """Teacher log-probs on k + 1 bins (top-k, tail).  [N, k] -> [N, k + 1]"""
    logp = teacher_topk_logprobs.float()
    tail = _log1mexp(torch.logsumexp(logp, dim=-1, keepdim=True))
    return torch.cat([logp, tail], dim=-1).clamp(min=math.log(eps))


def _student_columns(
    teacher_topk_ids: Tensor, vocab: int, student_token_ids: Tensor | None
) -> Tensor:
    """Student column of each teacher id, or ``vocab`` (a dummy column) when the student lacks it."""
    if student_token_ids is None:
        bad = (teacher_topk_ids < 0) | (teacher_topk_ids >= vocab)
        if bool(bad.any()):
            raise ValueError(
                f"teacher token ids outside the student vocabulary [0, {vocab}) "
                f"(max id {int(teacher_topk_ids.max())}); pass student_token_ids for a trimmed "
                "draft vocabulary, or check that drafter and target share a tokenizer"
            )
        return teacher_topk_ids
    size = int(max(int(student_token_ids.max()), int(teacher_topk_ids.max()))) + 1
    lookup = torch.full((size,), vocab, dtype=torch.long, device=teacher_topk_ids.device)
    lookup[student_token_ids.to(teacher_topk_ids.device)] = torch.arange(
        vocab, device=teacher_topk_ids.device
    )
    return lookup[teacher_topk_ids]


def student_bins(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    student_token_ids: Tensor | None = None,
    temperature: float = 1.0,
    eps: float = 1e-8,
) -> Tensor:
    """Student log-probs on the teacher's k + 1 bins.  [N, V], [N, k] -> [N, k + 1]"""
    n, vocab = student_logits.shape
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [N, V]
    cols = _student_columns(teacher_topk_ids, vocab, student_token_ids)  # [N, k], vocab = absent
    # A finite "minus infinity": a log-sum-exp over only such entries stays finite, so no NaN gradient.
    neg = torch.finfo(logq.dtype).min
    padded = torch.cat([logq, logq.new_full((n, 1), neg)], dim=-1)  # [N, V + 1]
    in_bins = padded.gather(-1, cols)  # [N, k]
    hit = torch.zeros_like(padded, dtype=torch.bool).scatter_(-1, cols, True)
    tail = torch.logsumexp(padded.masked_fill(hit, neg), dim=-1, keepdim=True)  # [N, 1]
    return torch.cat([in_bins, tail], dim=-1).clamp(min=math.log(eps))


# ---------------------------------------------------------------- public API


def _check_shapes(
    student_logits: Tensor,
    teacher_topk_ids: Tensor | None,
    teacher_topk_logprobs: Tensor | None,
    teacher_logits: Tensor | None,
    student_token_ids: Tensor | None,
    weights: Tensor | None,
    mask: Tensor | None,
) -> None:
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}; flatten batch dims")
    n, vocab = student_logits.shape
    if (teacher_logits is None) == (teacher_topk_ids is None and teacher_topk_logprobs is None):
        raise ValueError("give the teacher either as teacher_topk_ids + teacher_topk_logprobs or as teacher_logits")
    if teacher_logits is None:
        if teacher_topk_ids is None or teacher_topk_logprobs is None:
            raise ValueError("teacher_topk_ids and teacher_topk_logprobs go together")
        if teacher_topk_ids.shape != teacher_topk_logprobs.shape or teacher_topk_ids.dim() != 2:
            raise ValueError(
                f"teacher_topk_ids {tuple(teacher_topk_ids.shape)} and teacher_topk_logprobs "
                f"{tuple(teacher_topk_logprobs.shape)} must both be [N, k]"
            )
        if teacher_topk_ids.shape[0] != n:
            raise ValueError(f"teacher top-k has {teacher_topk_ids.shape[0]} positions, student_logits has {n}")
        if teacher_topk_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"teacher_topk_ids must be integer, got {teacher_topk_ids.dtype}")
    else:
        if teacher_logits.dim() != 2 or teacher_logits.shape[0] != n:
            raise ValueError(f"teacher_logits must be [N={n}, V_full], got {tuple(teacher_logits.shape)}")
        if student_token_ids is None and teacher_logits.shape[1] != vocab:
            raise ValueError(
                f"teacher_logits has {teacher_logits.shape[1]} columns but the student has {vocab}; "
                "pass student_token_ids for a trimmed draft vocabulary"
            )
    if student_token_ids is not None and student_token_ids.shape != (vocab,):
        raise ValueError(f"student_token_ids must be [V={vocab}], got {tuple(student_token_ids.shape)}")
    for name, t in (("weights", weights), ("mask", mask)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name} must be [N={n}], got {tuple(t.shape)}")


def per_position_divergence(
    student_logits: Tensor,  # [N, V]
    *,
    teacher_topk_ids: Tensor | None = None,  # [N, k] int64, full-vocabulary ids
    teacher_topk_logprobs: Tensor | None = None,  # [N, k] log_softmax of teacher logits at T=1
    teacher_logits: Tensor | None = None,  # [N, V_full] alternative: full teacher logits
    student_token_ids: Tensor | None = None,  # [V] full id of each student column (trimmed vocab)
    divergence: str = "fkl",
    beta: float = 0.5,
    temperature: float = 1.0,
    eps: float = 1e-8,
) -> Tensor:
    """Divergence at each position, [N]. See the module docstring for bins and conventions."""
    _check_shapes(student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_logits,
                  student_token_ids, None, None)
    try:
        fn = DIVERGENCES[divergence]
    except KeyError:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {sorted(DIVERGENCES)}") from None
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if teacher_logits is not None:
        # Full teacher: the bins are the student's whole vocabulary (+ the tail the student cannot
        # emit), which is the top-k path with k = V.
        n, vocab = student_logits.shape
        ids = student_token_ids if student_token_ids is not None else torch.arange(vocab)
        ids = ids.to(device=teacher_logits.device, dtype=torch.long)
        teacher_topk_logprobs = F.log_softmax(teacher_logits.float(), dim=-1)[:, ids]  # [N, V]
        teacher_topk_ids = ids.unsqueeze(0).expand(n, vocab)
    logp = teacher_bins(teacher_topk_logprobs, eps)
    logq = student_bins(student_logits, teacher_topk_ids.long(), student_token_ids, temperature, eps)
    return fn(logp, logq, beta)


def distill_loss(
    student_logits: Tensor,  # [N, V]
    *,
    teacher_topk_ids: Tensor | None = None,  # [N, k]
    teacher_topk_logprobs: Tensor | None = None,  # [N, k]
    teacher_logits: Tensor | None = None,  # [N, V_full]
    student_token_ids: Tensor | None = None,  # [V]
    weights: Tensor | None = None,  # [N] per-position weight (e.g. mismatch_weights)
    mask: Tensor | None = None,  # [N] bool/0-1, False = padding
    divergence: str = "fkl",
    beta: float = 0.5,
    temperature: float = 1.0,
    eps: float = 1e-8,
) -> Tensor:
    """Weighted mean divergence over the unmasked positions (a scalar; 0 when nothing is unmasked)."""
    _check_shapes(student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_logits,
                  student_token_ids, weights, mask)
    d = per_position_divergence(
        student_logits, teacher_topk_ids=teacher_topk_ids, teacher_topk_logprobs=teacher_topk_logprobs,
        teacher_logits=teacher_logits, student_token_ids=student_token_ids, divergence=divergence,
        beta=beta, temperature=temperature, eps=eps,
    )  # [N]
    w = torch.ones_like(d) if weights is None else weights.to(d)
    if mask is not None:
        w = w * mask.to(d)
    return (w * d).sum() / w.sum().clamp(min=torch.finfo(d.dtype).tiny)


def mismatch_weights(
    student_argmax_ids: Tensor,  # [N] full-vocabulary ids (map a trimmed head through its token_ids)
    teacher_top1_ids: Tensor,  # [N]
    wrong_weight: float,
    right_weight: float = 1.0,
) -> Tensor:
    """Per-position weights [N]: ``wrong_weight`` where the drafter's argmax differs from the target's
    top-1 (the positions OSD trains on most), ``right_weight`` elsewhere."""
    if student_argmax_ids.shape != teacher_top1_ids.shape or student_argmax_ids.dim() != 1:
        raise ValueError(
            f"student_argmax_ids {tuple(student_argmax_ids.shape)} and teacher_top1_ids "
            f"{tuple(teacher_top1_ids.shape)} must both be [N]"
        )
    wrong = student_argmax_ids != teacher_top1_ids
    return torch.where(wrong, float(wrong_weight), float(right_weight)).float()
