"""`draftsmith bench decode`: this engine (autoregressive and speculative) against transformers.

Decodes the same prompts, every path for each batch in a rotating order (so machine drift hits every
path alike), with: this engine at gamma 0; this engine at gamma; transformers `generate()`; transformers
assisted generation with the same drafter and constant gamma; and assisted generation with its default
schedule (both refused, with the reason in the JSON, when transformers cannot run the engine's exact
drafter: a feature drafter, a trimmed head). `--gamma auto` adds a sweep of fixed gammas 0-6 beside the
policy's arm (the constant-gamma assisted path is then left out). Every arm is warmed alike before any
timing, all in one process (same threads). Cost ratios come from micro-measurements of single forward
steps. The last stdout line is one JSON object (its fields: `run`'s report).

Not here: serving (pipelines/bench_serve.py) or distillation (pipelines/bench_distill.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time

import torch

from draftsmith.datasets_io import load_prompt_source
from draftsmith.engine_config import add_config_arguments, config_options
from draftsmith.layer_parallel import (LayerParallelConfig, check_drafts_in_layers, measure_layer_parallel,
                                       parse_group_sizes, split_target)
from draftsmith.llama import PrepackedLinear
from draftsmith.models import (
    DERIVATION_PREFIXES,
    EMBEDDED_TARGET,
    LoadedModel,
    derive_from_spec,
    frequent_token_ids,
    load_drafter,
    load_model,
)
from draftsmith.sampling import SamplingParams
from draftsmith.specdec import EngineConfig, Request, SpecEngine, runner_for

logger = logging.getLogger(__name__)


def group_sizes_arg(text: str) -> tuple[int, ...]:
    """argparse type of --layer-parallel-plan: `parse_group_sizes`, its message the CLI's error."""
    try:
        return parse_group_sizes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=EMBEDDED_TARGET, help="preset, HF directory or .gguf file")
    parser.add_argument("--drafter", default="derived:first2+last1",
                        help="a drafter directory, or derived:<layers> (e.g. derived:first2+last1, derived:0,29), "
                        "or feature:<layers> (an EAGLE-style drafter reading the target's features, e.g. feature:last1), "
                        "or none (speculation by --prompt-lookup-max alone)")
    parser.add_argument("--draft-vocab", type=int, default=0,
                        help="trim the derived drafter's head to the N most frequent tokens of ShareGPT train replies")
    parser.add_argument("--prompts", default="sharegpt", help="sharegpt (held-out slice) or jsonl:PATH")
    parser.add_argument("--n-prompts", type=int, default=4)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    add_config_arguments(parser, {"num_speculative_tokens": "--gamma"})
    add_engine_option_arguments(parser)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layer-parallel", type=int, default=0,
                        help="also measure layer-parallel drafting with groups of this size")
    parser.add_argument("--layer-parallel-plan", type=group_sizes_arg, default=(), metavar="SIZES",
                        help="also measure layer-parallel drafting with these consecutive group sizes "
                        "(e.g. 1,2,2,2,1 for an 8-layer drafter: first and last layer sequential); "
                        "overrides --layer-parallel's uniform groups")
    parser.add_argument("--pair-devices", default="",
                        help="comma-separated devices of a multi-device pair (cuda:0,cuda:1): the target is split "
                        "over them in stages, a layer-parallel group's drafter layers run on them concurrently")
    parser.add_argument("--skip-hf", action="store_true", help="skip the transformers baselines")
    parser.add_argument("--no-prepack", action="store_true",
                        help="run this engine on the dense weights (default: oneDNN-prepacked copies on CPU)")
    parser.add_argument("--seed", type=int, default=0)


# EngineConfig fields the speculative engine takes from the command line beside its drafter (flags generated
# from the model: prompt lookup, speculation off for large batches).
ENGINE_OPTIONS = ("prompt_lookup_max", "prompt_lookup_min", "disable_speculation_at_batch")


def add_engine_option_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ENGINE_OPTIONS)


def engine_options(args: argparse.Namespace) -> dict:
    """The EngineConfig fields those arguments set ({} for none); ValueError on a value the engine refuses."""
    return config_options(args, ENGINE_OPTIONS)


def engine_config(args: argparse.Namespace, **fixed) -> EngineConfig:
    """The speculative engine's settings: what the command line set (--gamma and the engine options), then
    `fixed`. ValueError on a value the engine refuses."""
    return EngineConfig(**{**config_options(args, ("num_speculative_tokens", *ENGINE_OPTIONS)), **fixed})


def build_drafter(target: LoadedModel, spec: str, draft_vocab: int = 0):
    """A drafter from a directory or a `derived:<layers>` / `feature:<layers>` spec (optionally with a trimmed head);
    None for `none`."""
    if spec == "none":
        return None
    if not spec.startswith(DERIVATION_PREFIXES):
        return load_drafter(spec, target)
    vocab_ids = None
    if draft_vocab:
        vocab_ids = frequent_token_ids(_reply_token_ids(target), draft_vocab, always=target.eos_token_ids)
    drafter = derive_from_spec(target, spec, draft_vocab_ids=vocab_ids)
    drafter.version = spec + (f"/v{draft_vocab}" if draft_vocab else "")
    return drafter


def _reply_token_ids(target: LoadedModel, n: int = 2000):
    from draftsmith.datasets_io import sharegpt_split, to_chat_messages

    for conversation in sharegpt_split("train", n):
        for message in to_chat_messages(conversation):
            if message["role"] == "assistant":
                yield target.tokenizer.encode(message["content"][:2000], add_special_tokens=False)


def render_prompts(target: LoadedModel, spec: str, n: int, max_prompt_tokens: int) -> list[list[int]]:
    """Chat-templated prompt ids, left-truncated to max_prompt_tokens (keeps the question's end)."""
    prompts = []
    for messages in load_prompt_source(spec, n):
        ids = target.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        prompts.append(ids[-max_prompt_tokens:])
    return prompts


def _median_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


@torch.inference_mode()
def measure_step_costs(target_runner, drafter_runner, context: int, gamma: int) -> dict:
    """Median times of one target step, one target verification of gamma+1 tokens, one drafter step (a
    feature-reading drafter's step reads a feature too, as it does when drafting; 0 without a drafter)."""
    device = target_runner.device
    ids = torch.randint(0, target_runner.embed.shape[0], (1, context), device=device)
    positions = torch.arange(context, device=device)[None]
    tcache = target_runner.new_cache(1, context + gamma + 2)
    _, features = target_runner.forward(ids, positions, tcache, slice(0, 1), return_features=True)
    one = torch.tensor([[5]], device=device)
    at = torch.tensor([[context]], device=device)
    many = torch.full((1, gamma + 1), 5, device=device)
    at_many = context + torch.arange(gamma + 1, device=device)[None]
    target_ms = _median_ms(lambda: target_runner.forward(one, at, tcache, slice(0, 1)))
    verify_ms = _median_ms(lambda: target_runner.forward(many, at_many, tcache, slice(0, 1)))
    costs = {"target_step_ms": target_ms, "verify_ms": verify_ms, "drafter_step_ms": 0.0, "cost_ratio": 0.0,
             "verify_cost_ratio": verify_ms / target_ms}
    if drafter_runner is None:
        return costs
    dcache = drafter_runner.new_cache(1, context + gamma + 2)
    reads_features = drafter_runner.feature_fc is not None
    drafter_runner.forward(ids, positions, dcache, slice(0, 1), features=features if reads_features else None)
    feature = features[:, -1:] if reads_features else None
    drafter_ms = _median_ms(lambda: drafter_runner.forward(one, at, dcache, slice(0, 1), features=feature,
                                                           return_features=reads_features))
    return {**costs, "drafter_step_ms": drafter_ms, "cost_ratio": drafter_ms / target_ms}


@dataclasses.dataclass
class PathTotals:
    tokens: int = 0
    seconds: float = 0.0
    # Decode phase alone: tokens after each request's first, time after the prefill (engine paths only).
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds

    def add_engine(self, results, seconds: float) -> None:
        """Engine results of one batch; requests admitted together share one prefill."""
        self.add(sum(len(r.output_token_ids) for r in results), seconds)
        self.decode_tokens += sum(len(r.output_token_ids) - 1 for r in results)
        self.decode_seconds += seconds - max(r.stats.prefill_seconds for r in results)

    @property
    def tok_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds else None

    @property
    def decode_tok_s(self) -> float | None:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else None


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def leviathan(alpha: float, gamma: int, cost_ratio: float, verify_cost_ratio: float = 1.0) -> tuple[float, float]:
    """Expected tokens per step E = (1 - a^(g+1)) / (1 - a) and speedup E / (g*c + v)."""
    expected = gamma + 1.0 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return expected, expected / (gamma * cost_ratio + verify_cost_ratio)


SWEEP = range(0, 7)  # the fixed gammas `--gamma auto` is measured against
WARMUP_TOKENS = 8


def assisted_refusal(drafter) -> str | None:
    """Why transformers' assisted generation cannot run the engine's exact drafter (None: it can)."""
    if drafter is None:
        return "no drafter: speculation by prompt lookup alone"
    if drafter.reads_target_features:
        return "the drafter reads the target's features, which transformers cannot feed it"
    if drafter.head_token_ids is not None:
        return "the drafter's head is trimmed, transformers would run its full-vocabulary head"
    return None


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    target = load_model(args.target, device=args.device)
    drafter = build_drafter(target, args.drafter, args.draft_vocab)
    gamma = engine_config(args).num_speculative_tokens
    auto = gamma == "auto"
    if drafter is None and not engine_config(args).prompt_lookup_max:
        raise SystemExit("--drafter none speculates by prompt lookup alone: add --prompt-lookup-max")
    prepack = not args.no_prepack
    target_runner = runner_for(target.model, prepack=prepack)
    drafter_runner = drafter and runner_for(None, drafter, prepack=prepack)
    if args.layer_parallel or args.layer_parallel_plan:
        if drafter_runner is None:
            raise SystemExit("a layer-parallel plan groups a drafter's layers: --drafter none has none")
        if auto:
            raise SystemExit("the layer-parallel measurement runs a fixed gamma: give --gamma N")
        try:  # before the benchmark, not after it
            check_drafts_in_layers(drafter_runner)
        except ValueError as error:
            raise SystemExit(str(error)) from None
    tokenizer = target.tokenizer
    prompts = render_prompts(target, args.prompts, args.n_prompts, args.max_prompt_tokens)
    logger.info("%d prompts, %d-%d tokens", len(prompts), min(map(len, prompts)), max(map(len, prompts)))
    pair_devices = [d.strip() for d in args.pair_devices.split(",") if d.strip()]
    if len(pair_devices) > 1:
        if not args.skip_hf:
            raise SystemExit("--pair-devices splits the target's HF module across devices, which transformers' "
                             "generate() does not run: add --skip-hf")
        split_target(target_runner, pair_devices)
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    headroom = max(engine_config(args).max_speculative_tokens, max(SWEEP) if auto else 0)
    max_len = max(map(len, prompts)) + args.max_new_tokens + headroom + 2
    fixed = dict(max_batch_size=args.batch_size, max_model_len=max_len, topk_logprobs=0, seed=args.seed)
    spec_config = engine_config(args, **fixed)

    def engine(config):
        return SpecEngine(target_runner, drafter_runner if config.num_speculative_tokens else None, config=config,
                          eos_token_ids=target.eos_token_ids, drafter_version=drafter.version if drafter else "none")

    # The arms, each its own engine over the same runners; "ar" is gamma 0, "spec" the configured gamma.
    engines = {"ar": engine(EngineConfig(**fixed, num_speculative_tokens=0))}
    if auto:
        engines.update({f"gamma_{g}": engine(engine_config(args, **fixed, num_speculative_tokens=g))
                        for g in SWEEP if g})
    engines["spec"] = engine(spec_config)
    refusal = assisted_refusal(drafter)
    # With auto, transformers' own schedule (assisted, default) is the counterpart; a constant gamma is not one.
    assisted = ["hf_assisted_default"] if auto else ["hf_assisted", "hf_assisted_default"]
    hf_paths = [] if args.skip_hf or args.batch_size != 1 else ["hf"] + ([] if refusal else assisted)
    hf_drafter = drafter and drafter.model
    eos = list(target.eos_token_ids)
    hf_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0, eos_token_id=eos,
                     pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0])
    if args.temperature > 0:
        hf_kwargs.update(temperature=args.temperature, top_p=1.0, top_k=0)
    hf_extra = {"hf": {}, "hf_assisted_default": dict(assistant_model=hf_drafter),
                "hf_assisted": dict(assistant_model=hf_drafter, num_assistant_tokens=gamma,
                                    num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0)}

    def hf_generate(name, ids, max_new_tokens=args.max_new_tokens):
        with torch.inference_mode():
            out = target.model.generate(torch.tensor([ids], device=args.device),
                                        **{**hf_kwargs, "max_new_tokens": max_new_tokens}, **hf_extra[name])
        return out.shape[1] - len(ids)

    paths = {name: PathTotals() for name in (*engines, "hf", "hf_assisted", "hf_assisted_default")}
    outputs: dict[str, list] = {name: [] for name in engines}
    # Every arm is warmed alike before any timing: one batch of the first prompts, WARMUP_TOKENS new tokens
    # (allocations, lazy init, and for auto the policy's first acceptance evidence).
    warm, warm_tokens = prompts[: args.batch_size], min(WARMUP_TOKENS, args.max_new_tokens)
    warmup = {name: f"{len(warm)} prompt(s) x {warm_tokens} tokens, untimed" for name in (*engines, *hf_paths)}
    for name, eng in engines.items():
        eng.generate([Request(f"warm-{i}", ids, dataclasses.replace(params, max_tokens=warm_tokens))
                      for i, ids in enumerate(warm)])
    for name in hf_paths:
        hf_generate(name, warm[0], warm_tokens)
    batches = [prompts[i: i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    from tqdm import tqdm

    arms = [*engines, *hf_paths]
    for b, batch in enumerate(tqdm(batches, desc="bench decode", file=sys.stderr, disable=None)):
        requests = [Request(f"{b}-{i}", ids, params) for i, ids in enumerate(batch)]
        for name in arms[b % len(arms):] + arms[: b % len(arms)]:  # rotated: no arm always runs first
            if name in engines:
                results, seconds = _timed(lambda: engines[name].generate(requests))
                paths[name].add_engine(results, seconds)
                outputs[name] += results
            else:
                paths[name].add(*_timed(lambda: hf_generate(name, batch[0])))

    spec_results, ar_outputs = outputs["spec"], [r.output_token_ids for r in outputs["ar"]]
    drafted = sum(r.stats.drafted for r in spec_results)
    accepted = sum(r.stats.accepted for r in spec_results)
    compared = sum(r.stats.compared for r in spec_results)
    steps = sum(r.stats.steps for r in spec_results)
    emitted = sum(r.stats.emitted_in_steps for r in spec_results)
    lookup_drafted = sum(r.stats.lookup_drafted for r in spec_results)
    lookup_accepted = sum(r.stats.lookup_accepted for r in spec_results)
    alpha = accepted / compared if compared else 0.0
    mean_accepted_length = emitted / steps if steps else 0.0
    # With auto, the costs and the Leviathan figures are those of the mean draft length the policy chose.
    drafted_per_step = max(1, round(drafted / steps)) if auto and steps else gamma if not auto else 1
    costs = measure_step_costs(target_runner, drafter_runner, int(statistics.median(map(len, prompts))),
                               drafted_per_step)
    _, theoretical = leviathan(alpha, drafted_per_step, costs["cost_ratio"])
    predicted = mean_accepted_length / (drafted_per_step * costs["cost_ratio"] + costs["verify_cost_ratio"])
    mismatches = None
    if args.temperature == 0:  # every engine arm against autoregressive decoding
        mismatches = sum(a != r.output_token_ids for name in engines for a, r in zip(ar_outputs, outputs[name]))
    ar_tok_s, spec_tok_s = paths["ar"].tok_s, paths["spec"].tok_s

    def ratio(a, b):
        return a / b if a and b else None

    report = {
        "target": target.model_id,
        "drafter": drafter.version if drafter else "none",
        "drafter_layers": drafter.num_layers if drafter else 0,
        "draft_vocab_size": drafter.meta.get("draft_vocab_size") if drafter else None,
        "device": args.device,
        "prepacked_weights": isinstance(target_runner.linear, PrepackedLinear),
        "n_prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "gamma": gamma,
        "prompt_lookup": [spec_config.prompt_lookup_min, spec_config.prompt_lookup_max]
        if spec_config.prompt_lookup_max else None,
        "disable_speculation_at_batch": spec_config.disable_speculation_at_batch or None,
        "batch_size": args.batch_size,
        "temperature": args.temperature,
        "output_tokens": paths["spec"].tokens,
        "autoregressive_tok_s": ar_tok_s,
        "speculative_tok_s": spec_tok_s,
        "autoregressive_decode_tok_s": paths["ar"].decode_tok_s,
        "speculative_decode_tok_s": paths["spec"].decode_tok_s,
        "hf_generate_tok_s": paths["hf"].tok_s,
        "hf_assisted_tok_s": paths["hf_assisted"].tok_s,
        "hf_assisted_default_tok_s": paths["hf_assisted_default"].tok_s,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "token_acceptance": alpha,
        "mean_accepted_length": mean_accepted_length,
        "lookup_drafted_share": lookup_drafted / drafted if drafted else 0.0,  # of drafted tokens, lookup's
        "lookup_acceptance_rate": lookup_accepted / lookup_drafted if lookup_drafted else 0.0,
        **costs,
        "theoretical_speedup": theoretical,
        "predicted_speedup": predicted,
        "speedup_vs_autoregressive": ratio(spec_tok_s, ar_tok_s),
        "speedup_vs_hf_assisted": ratio(spec_tok_s, paths["hf_assisted"].tok_s),
        "autoregressive_vs_hf_generate": ratio(ar_tok_s, paths["hf"].tok_s),
        "engine_efficiency": ratio(ratio(spec_tok_s, ar_tok_s), predicted),
        "greedy_mismatches": mismatches,
        "hf_assisted_refused": refusal if not args.skip_hf and args.batch_size == 1 else None,
        "threads": torch.get_num_threads(),
        "warmup": warmup,
    }
    if auto:
        sweep = {g: paths[f"gamma_{g}" if g else "ar"].tok_s for g in SWEEP}
        best = max(sweep, key=lambda g: sweep[g] or 0.0)
        report.update(sweep_tok_s={str(g): tok_s for g, tok_s in sweep.items()}, auto_tok_s=spec_tok_s,
                      best_fixed_gamma=best, best_fixed_tok_s=sweep[best], auto_vs_best_fixed=ratio(spec_tok_s, sweep[best]),
                      mean_drafted_per_step=drafted / steps if steps else 0.0,
                      policy=engines["spec"].policy_snapshot())
    if args.layer_parallel or args.layer_parallel_plan:
        plan = LayerParallelConfig.from_engine(engine_config(
            args, layer_parallel_group_size=max(1, args.layer_parallel), layer_parallel_devices=tuple(pair_devices),
            layer_parallel_group_sizes=args.layer_parallel_plan))
        report.update(measure_layer_parallel(target_runner, drafter_runner, prompts, plan=plan, gamma=gamma,
                                             max_new_tokens=args.max_new_tokens, batch_size=args.batch_size))
    return report


def summary_table(report: dict) -> str:
    def fmt(value, spec=".1f"):
        return "n/a" if value is None else format(value, spec)

    rows = [
        ("this engine, autoregressive", fmt(report["autoregressive_tok_s"]), "1.00x"),
        (f"this engine, speculative (gamma {report['gamma']})", fmt(report["speculative_tok_s"]),
         fmt(report["speedup_vs_autoregressive"], ".2f") + "x"),
        ("transformers generate()", fmt(report["hf_generate_tok_s"]), ""),
        ("transformers assisted, same drafter+gamma", fmt(report["hf_assisted_tok_s"]), ""),
        ("transformers assisted, default schedule", fmt(report["hf_assisted_default_tok_s"]), ""),
    ]
    lines = [f"Target {report['target']}, drafter {report['drafter']} ({report['drafter_layers']} layers), "
             f"{report['n_prompts']} prompts x {report['max_new_tokens']} new tokens, batch {report['batch_size']}, "
             f"{report['device']}", "", f"{'decoding path':44s} {'tokens/s':>9s} {'vs AR':>7s}"]
    lines += [f"{name:44s} {tok_s:>9s} {speedup:>7s}" for name, tok_s, speedup in rows]
    lines += [
        "",
        f"decode phase alone (after each prefill): autoregressive {fmt(report['autoregressive_decode_tok_s'])} tok/s, "
        f"speculative {fmt(report['speculative_decode_tok_s'])} tok/s",
        f"token acceptance (alpha) {report['token_acceptance']:.3f}, acceptance rate {report['acceptance_rate']:.3f}, "
        f"mean accepted length {report['mean_accepted_length']:.2f} tokens/step",
        f"drafter/target step cost c = {report['cost_ratio']:.3f}, verification cost v = {report['verify_cost_ratio']:.2f}; "
        f"predicted speedup {report['predicted_speedup']:.2f}x (Leviathan, v=1: {report['theoretical_speedup']:.2f}x)",
        f"greedy mismatches vs autoregressive: {report['greedy_mismatches']}",
    ]
    if "sweep_tok_s" in report:
        sweep = ", ".join(f"{g}: {fmt(t)}" for g, t in report["sweep_tok_s"].items())
        lines.insert(-1, f"fixed-gamma sweep (tok/s) {sweep}; auto {fmt(report['auto_tok_s'])} = "
                         f"{fmt(report['auto_vs_best_fixed'], '.2f')}x the best fixed (gamma {report['best_fixed_gamma']}), "
                         f"{report['mean_drafted_per_step']:.2f} drafted per step")
    if report["prompt_lookup"]:
        lines.insert(-2, f"prompt lookup (n-grams {report['prompt_lookup'][0]}-{report['prompt_lookup'][1]}): "
                         f"{report['lookup_drafted_share']:.2f} of drafted tokens, acceptance rate "
                         f"{report['lookup_acceptance_rate']:.3f} (the predicted speedup assumes a drafter step per draft)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="draftsmith bench decode", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        engine_config(args)
    except ValueError as error:
        parser.error(str(error))
    report = run(args)
    print(summary_table(report), flush=True)
    print(json.dumps(report))
    return 0
