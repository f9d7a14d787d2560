"""Layer-parallel ("fuzzy") drafting after EasySpec, with KV calibration, for a `CausalLMRunner` drafter.

The approximation. A `LayerPlan` splits the drafter's decoder layers 0..L-1 into consecutive groups.
Sequentially, layer l maps h to layer_l(h) = h + delta_l(h) with

    a_l(h)     = attn_l(rms_norm(h))                 (attention on layer l's own KV cache)
    delta_l(h) = a_l(h) + mlp_l(rms_norm(h + a_l(h)))

and the next layer reads the result. Under a plan, every layer of a group G reads the group's *input*
h, and the group's output is

    h_out = h + sum_{l in G} delta_l(h)

so the members of a group are independent and run at the same time. Each member still writes its own
KV entries for the new tokens, but computed from h instead of from the previous layer's output: that is
the whole approximation, and it is exact for groups of one (`LayerPlan.grouped(L, 1)` is sequential
drafting, bit for bit: singleton groups call the runner's own layer). The first layer of a group reads
an exact input only if every earlier group has size one.

Plans. Groups of a uniform size (`LayerPlan.grouped`) or explicit sizes (`LayerPlan.from_sizes`,
`LayerParallelConfig.group_sizes`). Where the approximation costs acceptance depends on the drafter: a
drafter cut from the first and last layers of a deep target changes its residual stream most in its own
first and last layer, and a plan that keeps those two alone (e.g. 1,2,2,2,1 for 8 layers) loses much
less acceptance than uniform pairs (measured figures in the README).

Execution. `LayerParallelExecutor` is installed as `runner.layer_executor` (see `install`):
- one device: the weights of each group are stacked once into contiguous `[n, in, out]` tensors (q/k/v
  fused, gate/up fused) and cached; a group's matmuls become `torch.baddbmm`/`torch.bmm` over the n members,
  the RMS statistics of h are shared, and the members' attention calls run over per-layer cache views.
  The stacks are copies: they are rebuilt when a source parameter changes (its version counter moves),
  so a drafter updated in place stays correct; they cost one extra copy of the drafter's layer weights.
- several devices (`LayerParallelConfig.devices`): layer l's weights and its KV cache shard live on
  devices[l % len(devices)]; a group's members run concurrently in a thread pool (CUDA kernels and CPU
  ops release the GIL), each on its device from a copy of h, and their updates are summed on the
  runner's device. Sequential forwards walk the layers across the devices. `split_target` uses the
  same executor with a sequential plan and contiguous placement to split the *target* of a
  multi-device pair into pipeline stages (exact: no approximation, no calibration).

Calibration. Fuzzy KV entries must not outlive the draft: the engine (specdec.SpecEngine._draft)
treats `drafter_len` as the length of the *exact* prefix of the drafter cache when the executor is
approximate. Each draft starts with one sequential (`exact=True`) drafter forward over the tokens the
exact prefix lacks: the tokens accepted at the last verification plus the new last token. It rewrites
only those positions and yields the first draft token exactly; the remaining gamma - 1 draft forwards
run layer-parallel and their entries are overwritten by the next calibration. The target verifies, so
output stays lossless whatever the drafter does.

Distillation. `training_forward` runs an HF drafter with the same approximation (no cache, causal
attention, differentiable, through the HF layer modules so DeepSpeed/ZeRO hooks still fire).

Not here: choosing devices for a replica (serve/), the benchmark CLI (it calls
`measure_layer_parallel`), the distillation loss (distill.py averages the sequential and the grouped
forward's losses when `layer_parallel_groups` names a plan with a group of several layers).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import logging
import statistics
import time
from typing import Sequence

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

logger = logging.getLogger(__name__)


# ----- configuration ------------------------------------------------------------------------------
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


@dataclasses.dataclass(frozen=True)
class LayerParallelConfig:
    """Per-SpecPair layer-parallel drafting: the group plan and (optionally) the pair's devices.

    The plan: `group_sizes` when given (consecutive groups of those sizes, summing to the drafter's
    layer count, e.g. (1, 2, 2, 2, 1) keeps the first and last layer sequential), else groups of
    `group_size`; 1 (or 0) switches the approximation off. `devices` empty = the drafter's own device,
    with stacked (batched) groups; several devices = one layer per device, run concurrently.
    """

    group_size: int = 2
    devices: tuple[str, ...] = ()
    group_sizes: tuple[int, ...] = ()

    def plan(self, num_layers: int) -> LayerPlan:
        return as_plan(self.group_sizes or self.group_size, num_layers)

    @property
    def enabled(self) -> bool:
        """Whether any group has more than one layer (else drafting is sequential)."""
        return max(self.group_sizes, default=self.group_size) > 1


def as_plan(spec: LayerPlan | int | Sequence[int], num_layers: int) -> LayerPlan:
    """A plan for a `num_layers` drafter from a LayerPlan, a uniform group size, or explicit group sizes."""
    if isinstance(spec, int):
        return LayerPlan.grouped(num_layers, max(1, spec))
    plan = spec if isinstance(spec, LayerPlan) else LayerPlan.from_sizes(spec)
    if plan.num_layers != num_layers:
        raise ValueError(f"layer-parallel plan {list(plan.sizes)} covers {plan.num_layers} layers, "
                         f"the drafter has {num_layers}")
    return plan


def parse_group_sizes(text: str) -> tuple[int, ...]:
    """'1,2,2,2,1' -> (1, 2, 2, 2, 1); '' -> () (no explicit plan). Raises ValueError with the text."""
    try:
        sizes = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ValueError(f"group sizes {text!r} must be comma-separated integers, e.g. 1,2,2,2,1") from None
    if any(n < 1 for n in sizes):
        raise ValueError(f"group sizes {text!r} must all be >= 1")
    return sizes


PLACEMENTS = ("round_robin", "contiguous")


# ----- the executor -------------------------------------------------------------------------------
@dataclasses.dataclass
class _GroupStack:
    """A group's weights stacked over its n members (one device)."""

    first: int
    n: int
    input_norm: torch.Tensor  # [n, 1, D]
    # [n, in, out], transposed and made contiguous: bmm(x, qkv) = x @ W^T. Contiguous, not a transposed
    # view: the CPU bmm of a transposed view ran 2-3x slower for groups of 3 and more.
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


def _weights_version(runner: CausalLMRunner) -> int:
    """Changes when a layer weight is replaced or updated in place (inference tensors have no counter)."""
    total = 0
    for lw in runner.layers:
        for field in dataclasses.fields(LayerWeights):
            t = getattr(lw, field.name)
            if t is not None:
                total += sum(weight_version(t))
    return total


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
        self._stacks: tuple[int, int, list[_GroupStack | None]] | None = None  # (runner id, version, stacks)
        self._device_weights: dict[int, list[LayerWeights]] = {}
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
        version = _weights_version(runner)
        if self._stacks is None or self._stacks[0] != id(runner) or self._stacks[1] != version:
            with torch.no_grad():
                built = [None if len(g) == 1 else self._stack(runner, g) for g in self.plan.groups]
            self._stacks = (id(runner), version, built)
        return self._stacks[2]

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
    def _weights_on_devices(self, runner: CausalLMRunner) -> list[LayerWeights]:
        weights = self._device_weights.get(id(runner))
        if weights is None:
            weights = [LayerWeights(**{f.name: None if getattr(lw, f.name) is None
                                       else getattr(lw, f.name).to(self.layer_device(i))
                                       for f in dataclasses.fields(LayerWeights)})
                       for i, lw in enumerate(runner.layers)]
            self._device_weights = {id(runner): weights}
        return weights

    def _multi_device(self, runner: CausalLMRunner, h: torch.Tensor, ctx: ForwardContext,
                      exact: bool) -> torch.Tensor:
        weights = self._weights_on_devices(runner)
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


def check_drafts_in_layers(runner: CausalLMRunner) -> None:
    """Raise ValueError if the runner cannot draft under a plan: a drafter reading the target's features
    drafts sequentially (the engine's feature path gives it no calibration forward)."""
    if runner.feature_fc is not None:
        raise ValueError("a drafter that reads the target's features drafts sequentially: unset the "
                         "layer-parallel plan to serve or measure it")


def install(runner: CausalLMRunner,
            config: LayerParallelConfig | LayerPlan | None) -> LayerParallelExecutor | None:
    """Set (or with None, clear) the runner's layer executor. Do it before a SpecEngine builds the cache."""
    if config is None:
        runner.layer_executor = None
        return None
    check_drafts_in_layers(runner)
    if isinstance(config, LayerPlan):
        executor = LayerParallelExecutor(config)
    else:
        executor = LayerParallelExecutor(config.plan(runner.num_layers), config.devices)
    runner.layer_executor = executor
    return executor


def split_target(runner: CausalLMRunner, devices: Sequence[str | torch.device]) -> LayerParallelExecutor | None:
    """Split a (target) runner's layers over `devices` in contiguous stages, exact sequential semantics.

    The stages' weights and KV cache shards live on their devices; embeddings, final norm and head stay
    on the runner's device. The layer weights are moved in place (`param.data`), so the HF module the
    runner reads moves with them and no second copy stays on the first device. One device or none:
    nothing to split, the runner is left as it is.
    """
    if len(devices) < 2:
        return None
    executor = LayerParallelExecutor(LayerPlan.grouped(runner.num_layers, 1), devices, placement="contiguous")
    with torch.no_grad():
        for index, lw in enumerate(runner.layers):
            device = executor.layer_device(index)
            for field in dataclasses.fields(LayerWeights):
                tensor = getattr(lw, field.name)
                if tensor is not None and tensor.device != device:
                    tensor.data = tensor.data.to(device)
    runner.layer_executor = executor
    runner.linear = F.linear  # prepacked copies (llama.PrepackedLinear) are of the CPU weights that just moved
    return executor


def reference_group_forward(runner: CausalLMRunner, group: Sequence[int], h: torch.Tensor,
                            ctx: ForwardContext) -> torch.Tensor:
    """The approximation as a per-layer loop over the runner's own layers (a test oracle)."""
    return h + sum(runner.layer(i, h, ctx) - h for i in group)


# ----- distillation -------------------------------------------------------------------------------
def training_forward(drafter_model, input_ids: torch.Tensor, *, plan: LayerPlan | int | Sequence[int],
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable layer-parallel forward of an HF Llama-family model: hidden states [B, S, D].

    input_ids [B, S]; attention_mask [B, S] (1 = token) optional, as in HF; `plan`: see `as_plan`.
    Returns the hidden states *before* the final norm (apply `model.model.norm` then the head for
    logits). A sequential plan equals the HF model's own forward; larger groups apply the module's
    approximation with causal attention over the sequence and no cache. Calls the HF decoder-layer
    modules, so ZeRO-3 gathering works.
    """
    from transformers.masking_utils import create_causal_mask

    if input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} must be [B, S]")
    base = drafter_model.model
    h = base.embed_tokens(input_ids)
    position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    # No cache either way; transformers renamed the argument (`past_key_values` -> `cache`) within 5.x.
    no_cache = {"cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values": None}
    mask = create_causal_mask(config=base.config, inputs_embeds=h, attention_mask=attention_mask,
                              position_ids=position_ids, **no_cache)
    rope = base.rotary_emb(h, position_ids=position_ids)
    layers = base.layers[: base.config.num_hidden_layers]
    for group in as_plan(plan, len(layers)).groups:
        outs = [layers[i](h, attention_mask=mask, position_embeddings=rope, position_ids=position_ids)
                for i in group]
        outs = [o[0] if isinstance(o, tuple) else o for o in outs]
        h = outs[0] if len(outs) == 1 else h + sum(o - h for o in outs)
    return h


# ----- measurement --------------------------------------------------------------------------------
def measure_layer_parallel(target_runner: CausalLMRunner, drafter_runner: CausalLMRunner,
                           prompts_token_ids: Sequence[Sequence[int]], *, plan: LayerParallelConfig,
                           gamma: int, max_new_tokens: int, batch_size: int = 1, repeats: int = 3) -> dict:
    """Greedy speculative decoding of the same prompts, sequential vs layer-parallel drafting.

    Runs alternate (sequential, layer-parallel) `repeats` times after one warm-up each; timings are
    medians over repeats. draft_step_ms = draft-stage seconds per verification step (calibration
    included); tok/s = generated tokens / wall seconds of `SpecEngine.generate` (prefill included).
    EOS is ignored so both modes generate the same number of tokens. The drafter's previous executor is
    restored afterwards.
    """
    from draftsmith.sampling import SamplingParams
    from draftsmith.specdec import EngineConfig, Request, SpecEngine

    prompts = [list(p) for p in prompts_token_ids]
    if not prompts:
        raise ValueError("measure_layer_parallel needs at least one prompt")
    config = EngineConfig(num_speculative_tokens=gamma, max_batch_size=batch_size, topk_logprobs=0,
                          max_model_len=max(map(len, prompts)) + max_new_tokens + gamma + 2)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    previous = drafter_runner.layer_executor

    def run(mode: str, subset: list[list[int]]) -> dict:
        install(drafter_runner, plan if mode == "layer_parallel" else None)
        engine = SpecEngine(target_runner, drafter_runner, config=config)
        requests = [Request(f"{mode}-{i}", p, params) for i, p in enumerate(subset)]
        start = time.perf_counter()
        results = engine.generate(requests)
        wall = time.perf_counter() - start
        stats = [r.stats for r in results]
        steps = sum(s.steps for s in stats)
        return {
            "draft_step_ms": 1000 * sum(s.draft_seconds for s in stats) / max(1, steps),
            "tok_s": sum(len(r.output_token_ids) for r in results) / wall,
            "accepted": sum(s.accepted for s in stats),
            "compared": sum(s.compared for s in stats),
            "outputs": [r.output_token_ids for r in results],
        }

    try:
        for mode in ("sequential", "layer_parallel"):
            run(mode, prompts[:1])
        runs: dict[str, list[dict]] = {"sequential": [], "layer_parallel": []}
        for repeat in range(repeats):
            for mode in ("sequential", "layer_parallel"):
                runs[mode].append(run(mode, prompts))
                logger.info("repeat %d %s: %.2f ms/draft step", repeat, mode, runs[mode][-1]["draft_step_ms"])
    finally:
        drafter_runner.layer_executor = previous

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    seq, par = runs["sequential"][0], runs["layer_parallel"][0]
    alpha_seq = seq["accepted"] / max(1, seq["compared"])
    alpha_par = par["accepted"] / max(1, par["compared"])
    return {
        "group_size": plan.group_size,
        "group_sizes": list(plan.plan(drafter_runner.num_layers).sizes),
        "gamma": gamma,
        "devices": list(plan.devices),
        "num_prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "repeats": repeats,
        "draft_step_ms_sequential": median("sequential", "draft_step_ms"),
        "draft_step_ms_layer_parallel": median("layer_parallel", "draft_step_ms"),
        "draft_speedup": median("sequential", "draft_step_ms") / median("layer_parallel", "draft_step_ms"),
        "token_acceptance_sequential": alpha_seq,
        "token_acceptance_layer_parallel": alpha_par,
        "compared_tokens_sequential": seq["compared"],
        "compared_tokens_layer_parallel": par["compared"],
        "acceptance_drop_rel": (alpha_seq - alpha_par) / alpha_seq if alpha_seq else 0.0,
        "speculative_tok_s_sequential": median("sequential", "tok_s"),
        "speculative_tok_s_layer_parallel": median("layer_parallel", "tok_s"),
        "outputs_identical": seq["outputs"] == par["outputs"],
    }
