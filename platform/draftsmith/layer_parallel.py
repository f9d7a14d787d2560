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
`LayerParallelConfig.group_sizes`), from a pair's `EngineConfig` (`LayerParallelConfig.from_engine`). Where
the approximation costs acceptance depends on the drafter: a drafter cut from the first and last layers of a
deep target changes its residual stream most in its own first and last layer, and a plan that keeps those
two alone (e.g. 1,2,2,2,1 for 8 layers) loses much less acceptance than uniform pairs (docs/benchmarks.md).

Execution (layer_executor.py): `install` sets a `LayerParallelExecutor` as `runner.layer_executor`; on one
device a group's weights are stacked and its matmuls batched, on several devices (`LayerParallelConfig.devices`)
a group's members run concurrently, one layer per device. `split_target` uses the same executor with a
sequential plan and contiguous placement to split the *target* of a multi-device pair into pipeline stages
(exact: no approximation, no calibration).

Calibration. Fuzzy KV entries must not outlive the draft: the engine drafts with an approximating runner
through proposers/layer_parallel.py, whose exact cache prefix per slot excludes every fuzzy entry. Each
draft starts with one sequential (`exact=True`) drafter forward over the tokens the exact prefix lacks: the
tokens accepted at the last verification plus the new last token. It rewrites only those positions and
yields the first draft token exactly; the remaining gamma - 1 draft forwards run layer-parallel and their
entries are overwritten by the next calibration. The target verifies, so output stays lossless whatever
the drafter does.

Distillation. `training_forward` runs an HF drafter with the same approximation (no cache, causal
attention, differentiable, through the HF layer modules so DeepSpeed/ZeRO hooks still fire).

Not here: the executor (layer_executor.py), choosing devices for a replica (serve/), the benchmark CLI (it
calls `measure_layer_parallel`), the distillation loss (distill.py averages the sequential and the grouped
forward's losses when `layer_parallel_groups` names a plan with a group of several layers).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import statistics
import time
from typing import Sequence

import torch
import torch.nn.functional as F

from draftsmith.engine_config import EngineConfig
from draftsmith.layer_executor import (  # noqa: F401  (re-exported: the package's layer-parallel API)
    PLACEMENTS,
    LayerParallelExecutor,
    LayerPlan,
    ShardedKVCache,
    reference_group_forward,
    weights_version,
)
from draftsmith.llama import CausalLMRunner, LayerWeights

logger = logging.getLogger(__name__)


# ----- configuration ------------------------------------------------------------------------------
def _engine_default(name: str):
    return EngineConfig.model_fields[f"layer_parallel_{name}"].default


@dataclasses.dataclass(frozen=True)
class LayerParallelConfig:
    """A pair's layer-parallel drafting, as `EngineConfig`'s layer_parallel_* settings define it (build it
    with `from_engine`; the defaults are EngineConfig's): the group plan and (optionally) the pair's devices.

    The plan: `group_sizes` when given (consecutive groups of those sizes, summing to the drafter's
    layer count, e.g. (1, 2, 2, 2, 1) keeps the first and last layer sequential), else groups of
    `group_size`; 1 (or 0) switches the approximation off. `devices` empty = the drafter's own device,
    with stacked (batched) groups; several devices = one layer per device, run concurrently.
    """

    group_size: int = _engine_default("group_size")
    devices: tuple[str, ...] = _engine_default("devices")
    group_sizes: tuple[int, ...] = _engine_default("group_sizes")

    @classmethod
    def from_engine(cls, config: EngineConfig) -> "LayerParallelConfig":
        return cls(config.layer_parallel_group_size, tuple(config.layer_parallel_devices),
                   tuple(config.layer_parallel_group_sizes))

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
    from draftsmith.specdec import Request, SpecEngine

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
