"""The runtime of layer-parallel drafting: a `LayerPlan` and the layer executor that runs it on a runner.

`LayerParallelExecutor` is installed as `runner.layer_executor` (layer_parallel.install, split_target):
- one device: the weights of each group are stacked once into contiguous `[n, in, out]` tensors (q/k/v
  fused, gate/up fused) and cached; a group's matmuls become `torch.baddbmm`/`torch.bmm` over the n members,
  the RMS statistics of h are shared, and the members' attention calls run over per-layer cache views.
  The stacks are copies: they are rebuilt when a source weight changes (`weights_version`: each weight's
  storage and in-place update count), so a drafter updated in place or given new tensors stays correct;
  they cost one extra copy of the drafter's layer weights.
- several devices: layer l's weights and its KV cache shard (`ShardedKVCache`) live on `layer_device(l)`;
  a group's members run concurrently in a thread pool (CUDA kernels and CPU ops release the GIL), each on
  its device from a copy of h, and their updates are summed on the runner's device. The per-device weight
  copies are rebuilt under the same version rule as the stacks.

Both caches are held for one runner at a time through a weak reference, never by `id(runner)` (an id is
reused once its object is collected).

Not here: what the approximation is and when it is exact (layer_parallel.py's module doc), building plans
from settings, distillation's forward (layer_parallel.py).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import weakref
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from draftsmith.llama import (
    CausalLMRunner,
    ForwardContext,
    KVCache,
    LayerWeights,
    rotate_half,
    weight_version,
)

@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Consecutive groups of drafter layer indices covering 0..num_layers-1 in order."""

    groups: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        flat = [i for g in self.groups for i in g]
        if not self.groups or any(not g for g in self.groups) or flat != list(range(len(flat))):
            raise ValueError(f"LayerPlan groups {self.groups} must be non-empty consecutive runs "
                             "covering 0..L-1")

    @classmethod
    def grouped(cls, num_layers: int, group_size: int) -> "LayerPlan":
        """Groups of `group_size` consecutive layers (the last one may be smaller); 1 = sequential."""
        if num_layers < 1 or group_size < 1:
            raise ValueError(f"num_layers ({num_layers}) and group_size ({group_size}) must be >= 1")
        starts = range(0, num_layers, group_size)
        return cls(tuple(tuple(range(s, min(s + group_size, num_layers))) for s in starts))

    @classmethod
    def from_groups(cls, groups: Sequence[Sequence[int]]) -> "LayerPlan":
        return cls(tuple(tuple(int(i) for i in g) for g in groups))

    @classmethod
    def from_sizes(cls, sizes: Sequence[int]) -> "LayerPlan":
        """Consecutive groups of the given sizes: (1, 2, 2, 2, 1) = [0] [1 2] [3 4] [5 6] [7]."""
        if not sizes or any(int(n) < 1 for n in sizes):
            raise ValueError(f"group sizes {list(sizes)} must be a non-empty list of integers >= 1")
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return cls(tuple(tuple(range(s, s + int(n))) for s, n in zip(starts, sizes)))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(g) for g in self.groups)

    @property
    def num_layers(self) -> int:
        return self.groups[-1][-1] + 1

    @property
    def is_sequential(self) -> bool:
        return all(len(g) == 1 for g in self.groups)

PLACEMENTS = ("round_robin", "contiguous")


# ----- the executor -------------------------------------------------------------------------------
@dataclasses.dataclass
class _GroupStack:
    """A group's weights stacked over its n members (one device)."""

    first: int
    n: int
    input_norm: torch.Tensor  # [n, 1, D]
    # [n, in, out], transposed and made contiguous: bmm(x, qkv) = x @ W^T. Contiguous, not a transposed
    # view: the CPU bmm of a transposed view is slower for groups of 3 and more (docs/benchmarks.md).
    qkv: torch.Tensor  # [n, D, (H + 2 KV) * hd]
    qkv_bias: torch.Tensor | None  # [n, 1, (H + 2 KV) * hd]
    o: torch.Tensor  # [n, H * hd, D]
    post_norm: torch.Tensor  # [n, 1, D]
    gate_up: torch.Tensor  # [n, D, 2 I]
    down: torch.Tensor  # [n, I, D]


def _rms_stat(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) in x's dtype (llama.rms_norm without the weight)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def weights_version(runner: CausalLMRunner) -> tuple:
    """Differs whenever a layer weight is replaced or updated in place: every weight's (storage address,
    in-place update count), in order (a sum of them could stay the same when two weights are swapped)."""
    return tuple(None if getattr(lw, field.name) is None else weight_version(getattr(lw, field.name))
                 for lw in runner.layers for field in dataclasses.fields(LayerWeights))


class _PerRunner:
    """A value derived from one runner's weights: rebuilt for another runner or when `weights_version` moves.
    The runner is held weakly, so a collected runner's id reused by a new one never matches."""

    def __init__(self, build: Callable[[CausalLMRunner], object]):
        self._build = build
        self._entry: tuple[weakref.ref, tuple, object] | None = None

    def get(self, runner: CausalLMRunner):
        version = weights_version(runner)
        entry = self._entry
        if entry is None or entry[0]() is not runner or entry[1] != version:
            with torch.no_grad():
                entry = self._entry = (weakref.ref(runner), version, self._build(runner))
        return entry[2]


class ShardedKVCache(KVCache):
    """A KVCache whose layer l lives on devices[l]; `k[l, rows]` indexes like the dense cache."""

    class _Layers:
        def __init__(self, tensors: list[torch.Tensor]):
            self.tensors = tensors

        def __getitem__(self, key):
            if isinstance(key, tuple) and isinstance(key[0], int):
                return self.tensors[key[0]][key[1:]]
            if isinstance(key, int):
                return self.tensors[key]
            raise TypeError("ShardedKVCache layers are indexed [layer, ...]")

        @property
        def shape(self):
            return (len(self.tensors), *self.tensors[0].shape)

    def __init__(self, devices: Sequence[torch.device], slots: int, max_len: int, kv_heads: int,
                 head_dim: int, *, dtype: torch.dtype):
        shape = (slots, max_len, kv_heads, head_dim)
        self.k = self._Layers([torch.zeros(shape, dtype=dtype, device=d) for d in devices])
        self.v = self._Layers([torch.zeros(shape, dtype=dtype, device=d) for d in devices])
        self.max_len = max_len

    @property
    def slots(self) -> int:
        return self.k.tensors[0].shape[0]

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        for t in (*self.k.tensors, *self.v.tensors):
            t[dst, :length] = t[src, :length]


class LayerParallelExecutor:
    """`runner.layer_executor` that runs a LayerPlan; `exact=True` forwards run the layers sequentially."""

    def __init__(self, plan: LayerPlan, devices: Sequence[str | torch.device] = (), *,
                 placement: str = "round_robin"):
        if placement not in PLACEMENTS:
            raise ValueError(f"placement {placement!r} unknown: use one of {PLACEMENTS}")
        self.plan = plan
        self.devices = [torch.device(d) for d in devices]
        self.placement = placement
        self._stacks = _PerRunner(lambda runner: [None if len(g) == 1 else self._stack(runner, g)
                                                  for g in self.plan.groups])
        self._device_weights = _PerRunner(self._copy_to_devices)
        many = len(self.devices) > 1
        self._pool = concurrent.futures.ThreadPoolExecutor(len(self.devices)) if many else None

    @property
    def approximate(self) -> bool:
        """True when drafts differ from sequential ones; the engine then calibrates (see module doc)."""
        return not self.plan.is_sequential

    @property
    def multi_device(self) -> bool:
        return len(self.devices) > 1

    def layer_device(self, index: int) -> torch.device:
        """round_robin: a group's members on different devices (drafting); contiguous: equal stages
        of consecutive layers (a pipeline split of the target: one hop per stage, not per layer)."""
        if self.placement == "contiguous":
            return self.devices[index * len(self.devices) // self.plan.num_layers]
        return self.devices[index % len(self.devices)]

    def new_cache(self, runner: CausalLMRunner, slots: int, max_len: int) -> KVCache:
        if not self.multi_device:
            return KVCache(runner.num_layers, slots, max_len, runner.num_kv_heads, runner.head_dim,
                           dtype=runner.dtype, device=runner.device)
        return ShardedKVCache([self.layer_device(i) for i in range(runner.num_layers)], slots, max_len,
                              runner.num_kv_heads, runner.head_dim, dtype=runner.dtype)

    def __call__(self, runner: CausalLMRunner, h: torch.Tensor, ctx: ForwardContext, *,
                 exact: bool = False) -> torch.Tensor:
        """h [B, S, D] embeddings -> [B, S, D] before the final norm; writes every layer's KV entries."""
        if self.plan.num_layers != runner.num_layers:
            raise ValueError(f"LayerPlan covers {self.plan.num_layers} layers, "
                             f"the drafter has {runner.num_layers}")
        if self.multi_device:
            return self._multi_device(runner, h, ctx, exact)
        if exact:
            for index in range(runner.num_layers):
                h = runner.layer(index, h, ctx)
            return h
        stacks = self.stacks(runner)
        for group, stack in zip(self.plan.groups, stacks):
            h = runner.layer(group[0], h, ctx) if stack is None else self.group_forward(runner, stack, h, ctx)
        return h

    # ----- one device: stacked weights ------------------------------------------------------------
    def stacks(self, runner: CausalLMRunner) -> list[_GroupStack | None]:
        """The cached stacked weights (None for singleton groups), rebuilt if the runner's weights changed."""
        return self._stacks.get(runner)

    @staticmethod
    def _stack(runner: CausalLMRunner, group: tuple[int, ...]) -> _GroupStack:
        lws = [runner.layers[i] for i in group]
        has_bias = lws[0].q_bias is not None
        return _GroupStack(
            first=group[0],
            n=len(group),
            input_norm=torch.stack([lw.input_norm for lw in lws])[:, None, :].clone(),
            qkv=torch.stack([torch.cat([lw.q, lw.k, lw.v]) for lw in lws]).transpose(1, 2).contiguous(),
            qkv_bias=torch.stack([torch.cat([lw.q_bias, lw.k_bias, lw.v_bias]) for lw in lws])[:, None, :]
            if has_bias else None,
            o=torch.stack([lw.o for lw in lws]).transpose(1, 2).contiguous(),
            post_norm=torch.stack([lw.post_norm for lw in lws])[:, None, :].clone(),
            gate_up=torch.stack([torch.cat([lw.gate, lw.up]) for lw in lws]).transpose(1, 2).contiguous(),
            down=torch.stack([lw.down for lw in lws]).transpose(1, 2).contiguous(),
        )

    @staticmethod
    def group_forward(runner: CausalLMRunner, stack: _GroupStack, h: torch.Tensor,
                      ctx: ForwardContext) -> torch.Tensor:
        """h + sum of the group's residual updates, all computed from h, as batched matmuls. h [B, S, D]."""
        batch, seq, dim = h.shape
        n, heads, kv, hd = stack.n, runner.num_heads, runner.num_kv_heads, runner.head_dim
        flat = h.reshape(1, batch * seq, dim)
        x = stack.input_norm * _rms_stat(flat, runner.eps)  # [n, BS, D]
        if stack.qkv_bias is None:
            qkv = torch.bmm(x, stack.qkv)
        else:
            qkv = torch.baddbmm(stack.qkv_bias, x, stack.qkv)
        q, k, v = qkv.view(n, batch, seq, heads + 2 * kv, hd).split([heads, kv, kv], dim=3)
        q = q * ctx.cos + rotate_half(q) * ctx.sin  # [n, B, S, H, hd]
        k = k * ctx.cos + rotate_half(k) * ctx.sin
        rows = torch.arange(batch, device=h.device)[:, None].expand(batch, seq)
        key_len = int(ctx.positions.max()) + 1 if ctx.mask is None else ctx.mask.shape[-1]
        outs = []
        for j in range(n):  # attention has no weights to batch; per-layer calls avoid copying the cache
            cache_k = ctx.cache.k[stack.first + j, ctx.rows]
            cache_v = ctx.cache.v[stack.first + j, ctx.rows]
            cache_k[rows, ctx.positions] = k[j]
            cache_v[rows, ctx.positions] = v[j]
            keys, values = cache_k[:, :key_len].transpose(1, 2), cache_v[:, :key_len].transpose(1, 2)
            outs.append(F.scaled_dot_product_attention(
                q[j].transpose(1, 2), keys, values, attn_mask=ctx.mask, enable_gqa=kv != heads,
            ).transpose(1, 2).reshape(batch * seq, heads * hd))
        attn = torch.bmm(torch.stack(outs), stack.o)  # [n, BS, D]
        mid = flat + attn
        gate_up = torch.bmm(stack.post_norm * _rms_stat(mid, runner.eps), stack.gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        mlp = torch.bmm(F.silu(gate) * up, stack.down)
        return h + (attn + mlp).sum(0).view(batch, seq, dim)

    # ----- several devices: one layer per device, concurrent ---------------------------------------
    def _copy_to_devices(self, runner: CausalLMRunner) -> list[LayerWeights]:
        return [LayerWeights(**{f.name: None if getattr(lw, f.name) is None
                                else getattr(lw, f.name).to(self.layer_device(i))
                                for f in dataclasses.fields(LayerWeights)})
                for i, lw in enumerate(runner.layers)]

    def _multi_device(self, runner: CausalLMRunner, h: torch.Tensor, ctx: ForwardContext,
                      exact: bool) -> torch.Tensor:
        weights = self._device_weights.get(runner)
        local: dict[torch.device, tuple] = {}

        def context_on(device):
            if device not in local:
                local[device] = tuple(None if t is None else t.to(device)
                                      for t in (ctx.cos, ctx.sin, ctx.positions, ctx.mask))
            return local[device]

        def attend(index: int, x: torch.Tensor) -> torch.Tensor:
            cos, sin, positions, mask = context_on(self.layer_device(index))
            return runner.attend(weights[index], x, cos, sin, ctx.cache.k[index, ctx.rows],
                                 ctx.cache.v[index, ctx.rows], positions, mask)

        def layer(index: int, h: torch.Tensor) -> torch.Tensor:
            """Sequential semantics, the same operations in the same order as runner.layer (bit-exact)."""
            h = h.to(self.layer_device(index))  # the residual stream follows the layer: one hop per stage
            h = h + attend(index, h)
            return h + runner.mlp(weights[index], h)

        def delta(index: int, x: torch.Tensor) -> torch.Tensor:
            x = x.to(self.layer_device(index))
            attn = attend(index, x)
            return attn + runner.mlp(weights[index], x + attn)

        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def delta_in_thread(index: int, x: torch.Tensor) -> torch.Tensor:
            # Grad and inference modes are thread-local: give the worker the caller's.
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return delta(index, x)

        for device in dict.fromkeys(self.devices):
            context_on(device)  # built up front: the worker threads only read `local`
        groups = [(i,) for i in range(runner.num_layers)] if exact else self.plan.groups
        home = h.device
        for group in groups:
            if len(group) == 1:
                h = layer(group[0], h)
                continue
            futures = [self._pool.submit(delta_in_thread, i, h) for i in group]
            h = h + torch.stack([f.result().to(h.device) for f in futures]).sum(0)
        return h.to(home)


def reference_group_forward(runner: CausalLMRunner, group: Sequence[int], h: torch.Tensor,
                            ctx: ForwardContext) -> torch.Tensor:
    """The approximation as a per-layer loop over the runner's own layers (a test oracle)."""
    return h + sum(runner.layer(i, h, ctx) - h for i in group)
