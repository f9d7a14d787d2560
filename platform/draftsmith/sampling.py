"""Pure sampling math: sampling parameters, processed distributions and speculative verification.

Everything here is a function of tensors (and seeded uniforms), so the statistical test of losslessness
exercises exactly the code the engine runs. Greedy decoding is the temperature-0 case: the processed
distribution is one-hot on the argmax, and the same rejection rule then accepts a draft token iff it
equals the target's argmax, with the recovered token being that argmax.

Not here: models, caches, timing, requests (specdec.py).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters (OpenAI semantics; temperature 0 is greedy)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def processed_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                    top_p: torch.Tensor) -> torch.Tensor:
    """Distributions after temperature, top-k and top-p, applied identically to target and drafter.

    logits [B, S, V]; temperature, top_k, top_p [B] (temperature 0 -> one-hot argmax; top_k 0 -> off).
    Returns probs [B, S, V] in float32.
    """
    if logits.dim() != 3 or not (temperature.shape == top_k.shape == top_p.shape == logits.shape[:1]):
        raise ValueError(f"logits {tuple(logits.shape)} must be [B, S, V] with per-row parameters [B]")
    logits = logits.float()
    greedy = temperature == 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature).float()[:, None, None]
    vocab = logits.shape[-1]
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))[:, None, None]
        drop = ranks[None, None, :] >= k
        sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (the token crossing the threshold stays).
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop = drop | (mass_before >= top_p.float()[:, None, None])
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
    probs = scaled.softmax(-1)
    if bool(greedy.any()):
        one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None, None], one_hot, probs)
    return probs


def sample_from(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs [..., V], uniforms [...] in [0, 1) -> ids [...]."""
    cdf = probs.cumsum(-1)
    target = uniforms[..., None].to(cdf.dtype) * cdf[..., -1:]
    ids = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return ids.clamp_(max=probs.shape[-1] - 1)


@dataclasses.dataclass
class Verification:
    accepted: torch.Tensor  # [B] number of leading draft tokens accepted
    tokens: torch.Tensor  # [B, gamma + 1] accepted drafts, then the recovered/bonus token at index accepted


def verify_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor, gammas: torch.Tensor) -> Verification:
    """Greedy verification: accept the longest prefix equal to the target's argmax.

    draft_tokens [B, gamma]; target_logits [B, gamma + 1, V]; gammas [B] (a row compares only its first
    gammas[b] drafts, so rows with fewer speculative tokens share a batch).
    """
    batch, gamma = draft_tokens.shape
    if target_logits.shape[:2] != (batch, gamma + 1):
        raise ValueError(f"target_logits {tuple(target_logits.shape)} must be [B, gamma + 1, V] for drafts {tuple(draft_tokens.shape)}")
    target_ids = target_logits.argmax(-1)  # [B, gamma + 1]
    return _accept_prefix(draft_tokens, draft_tokens == target_ids[:, :gamma], gammas, target_ids)


def _accept_prefix(draft_tokens, matches, gammas, extra_candidates) -> Verification:
    gamma = draft_tokens.shape[1]
    in_range = torch.arange(gamma, device=draft_tokens.device)[None, :] < gammas[:, None]
    accepted = (matches & in_range).long().cumprod(-1).sum(-1)  # [B]
    rows = torch.arange(draft_tokens.shape[0], device=draft_tokens.device)
    tokens = torch.cat([draft_tokens, draft_tokens.new_zeros(draft_tokens.shape[0], 1)], dim=1)
    tokens[rows, accepted] = extra_candidates[rows, accepted]
    return Verification(accepted, tokens)


def verify_sampled(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                   gammas: torch.Tensor, accept_uniforms: torch.Tensor, extra_uniforms: torch.Tensor) -> Verification:
    """Speculative sampling (Leviathan et al.; Chen et al.): the output distribution equals the target's.

    draft_tokens [B, gamma]; draft_probs [B, gamma, V] (q, the distributions they were sampled from);
    target_probs [B, gamma + 1, V] (p); gammas [B]; accept_uniforms [B, gamma]; extra_uniforms [B].
    Accept draft i with probability min(1, p_i(x)/q_i(x)); at the first rejection sample the recovered
    token from norm(max(0, p - q)); when a row accepts all its gammas[b] drafts sample the bonus token
    from p at position gammas[b].
    """
    batch, gamma = draft_tokens.shape
    if draft_probs.shape[:2] != (batch, gamma) or target_probs.shape[:2] != (batch, gamma + 1):
        raise ValueError(f"draft_probs {tuple(draft_probs.shape)} / target_probs {tuple(target_probs.shape)} "
                         f"do not match drafts {tuple(draft_tokens.shape)}")
    index = draft_tokens[..., None]
    p_draft = target_probs[:, :gamma].gather(-1, index).squeeze(-1)  # [B, gamma]
    q_draft = draft_probs.gather(-1, index).squeeze(-1)
    # u < p/q  <=>  u * q < p (no division; q > 0 for a token that was sampled from q).
    matches = accept_uniforms.to(p_draft.dtype) * q_draft < p_draft
    in_range = torch.arange(gamma, device=draft_tokens.device)[None, :] < gammas[:, None]
    accepted = (matches & in_range).long().cumprod(-1).sum(-1)
    rows = torch.arange(batch, device=draft_tokens.device)
    p_next = target_probs[rows, accepted]  # [B, V]
    padded_q = torch.cat([draft_probs, draft_probs.new_zeros(batch, 1, draft_probs.shape[-1])], dim=1)
    q_next = padded_q[rows, accepted]
    # After a rejection: residual max(0, p - q). After all gammas[b] accepted: the bonus from p.
    rejected = accepted < gammas
    residual = torch.where(rejected[:, None], (p_next - q_next).clamp_min(0), p_next)
    empty = residual.sum(-1, keepdim=True) <= 0
    residual = torch.where(empty, p_next, residual)  # p == q exactly: rejection had probability 0
    extra = sample_from(residual, extra_uniforms)
    tokens = torch.cat([draft_tokens, draft_tokens.new_zeros(draft_tokens.shape[0], 1)], dim=1)
    tokens[rows, accepted] = extra
    return Verification(accepted, tokens)
