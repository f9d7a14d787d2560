"""A lean forward pass over a Llama-family HF model's weights, with a slot-based static KV cache.

Why not call the HF model: speculative decoding needs per-sequence cache lengths (ragged acceptance),
O(1) rollback (a length decrement, no copy) and a per-layer hook for layer-parallel drafting. The
runner reads the HF module's parameters in place (no copy), so a model trained or loaded with
transformers runs here unchanged; `prepack()` adds oneDNN-packed copies for CPU inference
(`PrepackedLinear`: a multi-token verification then costs about one single-token step). It supports
the decoder layers of Llama, Mistral (no sliding window) and Qwen2 (q/k/v biases).

Cache model: `KVCache.k[layer]` is `[slots, max_len, kv_heads, head_dim]`. A sequence owns a slot;
the engine owns each slot's length. A forward writes the new tokens' keys/values at their positions
and attends to every key at a position <= the query's. Positions past a slot's length may hold stale
values from a rejected draft: they are never read before being overwritten, because every forward
writes positions length..length+S-1 before its queries read them.

Features: `forward(..., return_features=True)` also returns the final-normed hidden states of every
position (what an EAGLE-style drafter reads from the target); a runner built with `feature_fc` is
such a drafter: its first layer's input is `feature_fc @ [embedding, features]` (see models.py).

This module knows nothing about drafting, sampling or requests (specdec.py does).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LayerWeights:
    input_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


class KVCache:
    """Static per-slot key/value storage for every layer of one model."""

    def __init__(self, num_layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, slots, max_len, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Move one sequence's first `length` entries to another slot (keeps active slots contiguous)."""
        self.k[:, dst, :length] = self.k[:, src, :length]
        self.v[:, dst, :length] = self.v[:, src, :length]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PrepackedLinear:
    """`F.linear` over oneDNN-prepacked copies of frozen CPU weights, the weights' dense copies otherwise.

    Why: on CPU the default GEMM (MKL through `F.linear`) takes markedly longer for a few input rows than
    for one, so verifying gamma + 1 tokens cost more than one single-token step; oneDNN's matmul over a
    weight reordered once into its blocked layout costs about the same for 1 to 8 rows, and its one-row
    product is itself faster (docs/benchmarks.md, "CPU weight prepacking"). A packed copy is
    used only while its weight is the tensor it was packed from, unchanged (same storage, same in-place
    version): a weight moved to another device, replaced or trained in place falls back to the dense
    path, never to a stale copy. The copies cost as much memory as the weights they pack.
    """

    def __init__(self, weights: Sequence[torch.Tensor], batch_hint: int):
        self._packed = {}
        for weight in weights:
            if id(weight) not in self._packed:
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
                # The weight itself is kept so that its id() cannot be reused by another tensor.
                self._packed[id(weight)] = (weight, weight_version(weight), packed)

    def packed_copy(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The copy a call with `weight` runs on; None where it runs densely (never packed, or changed since)."""
        entry = self._packed.get(id(weight))
        return entry[2] if entry is not None and entry[1] == weight_version(weight) else None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        packed = self.packed_copy(weight)
        if packed is None:
            return F.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    def __len__(self) -> int:
        return len(self._packed)


def weight_version(weight: torch.Tensor) -> tuple[int, int]:
    """Storage address and in-place update count (inference tensors have no counter: they cannot be updated)."""
    return weight.data_ptr(), 0 if weight.is_inference() else weight._version


def can_prepack(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether this build packs weights of `dtype` on `device` (oneDNN on CPU, float32 or bfloat16)."""
    return (torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class CausalLMRunner:
    """Forward passes of a Llama-family model over a KVCache; `head_*` selects a trimmed vocabulary head."""

    def __init__(self, hf_model, *, head_token_ids: torch.Tensor | None = None, head_weight: torch.Tensor | None = None,
                 feature_fc: torch.Tensor | None = None):
        config = hf_model.config
        base = hf_model.model
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.eps = config.rms_norm_eps
        self.embed = base.embed_tokens.weight
        self.final_norm = base.norm.weight
        self.head_token_ids = head_token_ids
        self.head = head_weight if head_weight is not None else hf_model.get_output_embeddings().weight
        self.feature_fc = feature_fc  # [D, 2D]: reads the target's features (EAGLE-style drafter)
        self.layers = [self._layer_weights(layer) for layer in base.layers]
        self.inv_freq = base.rotary_emb.inv_freq.float()
        self.rope_scaling = float(getattr(base.rotary_emb, "attention_scaling", 1.0))
        # layer_executor(runner, h, ctx, *, exact) runs the decoder stack; layer-parallel drafting swaps it
        # (see layer_parallel.py); exact=True asks it for the sequential forward.
        self.layer_executor: Callable | None = None
        # linear(x, weight, bias) runs every projection and the head: F.linear, or PrepackedLinear after prepack().
        self.linear: Callable = F.linear

    def prepack(self, batch_hint: int = 4) -> bool:
        """Run the projections, feature map and head on oneDNN-prepacked copies of their weights (CPU
        inference; see PrepackedLinear). `batch_hint` is the row count the packing is tuned for (any count
        works). False, and nothing changes, where this build or device cannot pack the weights' dtype."""
        if not can_prepack(self.dtype, self.device):
            return False
        weights = [self.head] + ([self.feature_fc] if self.feature_fc is not None else [])
        for lw in self.layers:
            weights += [lw.q, lw.k, lw.v, lw.o, lw.gate, lw.up, lw.down]
        try:
            self.linear = PrepackedLinear(weights, batch_hint)
        except RuntimeError as error:  # a oneDNN build without packing for this CPU: the dense path is correct
            logger.warning("weight prepacking unavailable, using dense weights: %s", error)
            return False
        return True

    @staticmethod
    def _layer_weights(layer) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        return LayerWeights(
            input_norm=layer.input_layernorm.weight,
            q=attn.q_proj.weight, k=attn.k_proj.weight, v=attn.v_proj.weight, o=attn.o_proj.weight,
            q_bias=attn.q_proj.bias, k_bias=attn.k_proj.bias, v_bias=attn.v_proj.bias,
            post_norm=layer.post_attention_layernorm.weight,
            gate=mlp.gate_proj.weight, up=mlp.up_proj.weight, down=mlp.down_proj.weight,
        )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def vocab_size(self) -> int:
        return self.head.shape[0]

    def new_cache(self, slots: int, max_len: int) -> KVCache:
        factory = getattr(self.layer_executor, "new_cache", None)  # a multi-device executor shards the cache
        if factory is not None:
            return factory(self, slots, max_len)
        return KVCache(self.num_layers, slots, max_len, self.num_kv_heads, self.head_dim,
                       dtype=self.dtype, device=self.device)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions [B, S] -> each [B, S, 1, head_dim]."""
        freqs = positions.to(self.inv_freq.device).float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return (emb.cos() * self.rope_scaling).to(self.dtype), (emb.sin() * self.rope_scaling).to(self.dtype)

    def attention_mask(self, positions: torch.Tensor, key_len: int) -> torch.Tensor | None:
        """[B, 1, S, key_len] bool: a query attends to every cached key at a position <= its own.

        None when one token per row at the same position (batch-1 decoding): every key up to key_len is
        visible, and SDPA's unmasked CPU kernel is several times faster than its masked one.
        """
        if positions.shape[1] == 1 and bool((positions == key_len - 1).all()):
            return None
        keys = torch.arange(key_len, device=positions.device)
        return (keys[None, None, :] <= positions[:, :, None])[:, None]

    def attend(self, lw: LayerWeights, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               cache_k: torch.Tensor, cache_v: torch.Tensor, positions: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """One layer's attention residual update. h [B, S, D]; cache_k/v [B, T, kv, hd] views of the slots."""
        batch, seq, _ = h.shape
        x = rms_norm(h, lw.input_norm, self.eps)
        q = self.linear(x, lw.q, lw.q_bias).view(batch, seq, self.num_heads, self.head_dim)
        k = self.linear(x, lw.k, lw.k_bias).view(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.linear(x, lw.v, lw.v_bias).view(batch, seq, self.num_kv_heads, self.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rows = torch.arange(batch, device=h.device)[:, None].expand(batch, seq)
        cache_k[rows, positions] = k
        cache_v[rows, positions] = v
        key_len = int(positions.max()) + 1 if mask is None else mask.shape[-1]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), cache_k[:, :key_len].transpose(1, 2), cache_v[:, :key_len].transpose(1, 2),
            attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.linear(out.transpose(1, 2).reshape(batch, seq, -1), lw.o)

    def mlp(self, lw: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        x = rms_norm(h, lw.post_norm, self.eps)
        return self.linear(F.silu(self.linear(x, lw.gate)) * self.linear(x, lw.up), lw.down)

    def layer(self, index: int, h: torch.Tensor, ctx: "ForwardContext") -> torch.Tensor:
        """One decoder layer, sequential semantics."""
        lw = self.layers[index]
        h = h + self.attend(lw, h, ctx.cos, ctx.sin, ctx.cache.k[index, ctx.rows], ctx.cache.v[index, ctx.rows],
                            ctx.positions, ctx.mask)
        return h + self.mlp(lw, h)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, rows: slice, *,
                logits_at: torch.Tensor | None = None, exact: bool = False, features: torch.Tensor | None = None,
                return_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run input_ids [B, S] at positions [B, S] on cache slots `rows`; write their KV entries.

        Returns logits [B, S, V] (or [B, 1, V] at the per-row index `logits_at` [B]); V is the trimmed
        vocabulary when the runner has a trimmed head. `exact` asks the layer executor (if any) for the
        sequential forward instead of its approximation (KV calibration). `features` [B, S, D] is a
        feature-reading drafter's other input; `return_features` adds the final-normed hidden states of
        every position, [B, S, D]: (logits, features).
        """
        if input_ids.shape != positions.shape or input_ids.dim() != 2:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and positions {tuple(positions.shape)} must be [B, S]")
        h = self.hidden_states(input_ids, positions, cache, rows, exact=exact, features=features)
        if return_features:
            normed = rms_norm(h, self.final_norm, self.eps)
            picked = normed if logits_at is None else normed[torch.arange(h.shape[0], device=h.device), logits_at][:, None]
            return self.linear(picked, self.head), normed
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at][:, None]
        return self.logits(h)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, rows: slice, *,
                      exact: bool = False, features: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings (with `features` through `feature_fc` for a feature-reading drafter) through the decoder
        stack; [B, S, D] before the final norm."""
        key_len = int(positions.max()) + 1
        cos, sin = self.rope(positions)
        ctx = ForwardContext(cache, rows, positions, cos, sin, self.attention_mask(positions, key_len))
        h = F.embedding(input_ids, self.embed)
        if (self.feature_fc is None) != (features is None):
            raise ValueError("a feature-reading drafter needs features=, any other model takes none")
        if features is not None:
            h = self.linear(torch.cat([h, features.to(h.dtype)], dim=-1), self.feature_fc)
        if self.layer_executor is not None:
            return self.layer_executor(self, h, ctx, exact=exact)
        for index in range(self.num_layers):
            h = self.layer(index, h, ctx)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(rms_norm(h, self.final_norm, self.eps), self.head)


@dataclasses.dataclass
class ForwardContext:
    """What every layer of one forward shares: the cache rows, positions, rotary tables and mask."""

    cache: KVCache
    rows: slice
    positions: torch.Tensor  # [B, S]
    cos: torch.Tensor  # [B, S, 1, head_dim]
    sin: torch.Tensor
    mask: torch.Tensor | None  # [B, 1, S, key_len]; None when every key is visible
