"""Drafter evaluation: acceptance and speed of drafters on the same prompts, measured by the engine.

What it does: decodes one list of prompts with the target and each drafter in a `SpecEngine` built from
the serving `EngineConfig` (the same speculation policy, gamma or `auto`, prompt lookup and batch size as
Serve; evaluation overrides only the context length and turns the traffic top-k off), greedy and seeded
sampling, sums the engine's per-request counters into acceptance rate, token acceptance and mean accepted
length (docs/design.md, "Vocabulary"), times speculative decoding against plain autoregressive decoding of
the same engine (gamma 0), and draws a comparison PNG. `measure_speed_paired` times two or more drafters
per prompt, interleaved, for the promotion gate (draftsmith.gate). Also turns chat messages, or a
challenger's held-out window of the traffic log, into prompt token ids.

What it does not do: no Ray, no MLflow (jobs/evaluate logs the report through the registry), no
promotion decision (draftsmith.gate decides, `DrafterRegistry.apply_gate` records), no model loading
(models.py).

Rates are pooled over all requests (sum of accepted / sum of drafted, ...), not averages of
per-request rates, so long answers weigh what they cost.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from pathlib import Path
from typing import Sequence

from draftsmith.models import Drafter, LoadedModel
from draftsmith.sampling import SamplingParams
from draftsmith.specdec import AcceptanceRates, EngineConfig, GenerationResult, Request, SpecEngine, runner_for

logger = logging.getLogger(__name__)

AUTOREGRESSIVE = "autoregressive"
# Report keys logged per drafter; `heldout_<key>` is the headline (greedy when evaluated).
HEADLINE_METRICS = ("acceptance_rate", "token_acceptance", "mean_accepted_length", "speculative_tok_s")


@dataclasses.dataclass(frozen=True)
class DecodeMetrics(AcceptanceRates):
    """Pooled counters of one (drafter, temperature) run over every prompt."""

    requests: int
    output_tokens: int
    seconds: float
    drafted: int = 0
    accepted: int = 0
    compared: int = 0
    steps: int = 0
    emitted_in_steps: int = 0

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), **self.rates(), "tok_s": self.tok_s}

    @classmethod
    def pooled(cls, results: Sequence[GenerationResult], seconds: float) -> "DecodeMetrics":
        s = [r.stats for r in results]
        return cls(requests=len(results), output_tokens=sum(len(r.output_token_ids) for r in results),
                   seconds=seconds, drafted=sum(x.drafted for x in s), accepted=sum(x.accepted for x in s),
                   compared=sum(x.compared for x in s), steps=sum(x.steps for x in s),
                   emitted_in_steps=sum(x.emitted_in_steps for x in s))


def temperature_label(temperature: float) -> str:
    return "greedy" if temperature == 0 else "sampled" if temperature == 1 else f"t{temperature:g}"


@dataclasses.dataclass
class EvalReport:
    """Per drafter and temperature: speculative metrics; per temperature: autoregressive tok/s."""

    gamma: int | str  # the engine's num_speculative_tokens ("auto": the policy chose per step)
    max_new_tokens: int
    num_prompts: int
    prompt_tokens: int
    temperatures: tuple[float, ...]
    drafters: dict[str, dict[float, DecodeMetrics]]
    autoregressive: dict[float, DecodeMetrics]

    def get(self, name: str, temperature: float = 0.0) -> DecodeMetrics:
        return self.drafters[name][temperature]

    def speedup(self, name: str, temperature: float = 0.0) -> float:
        """Speculative over autoregressive tokens/s; 0.0 where autoregressive decoding was not measured."""
        ar = self.autoregressive.get(temperature)
        return self.get(name, temperature).tok_s / ar.tok_s if ar and ar.tok_s else 0.0

    def headline_temperature(self) -> float:
        return 0.0 if 0.0 in self.temperatures else self.temperatures[0]

    def flat_metrics(self, name: str, prefix: str = "heldout_") -> dict[str, float]:
        """MLflow-ready metrics: `<prefix><metric>_<greedy|sampled>` plus unsuffixed headline values.

        The unsuffixed value (e.g. `heldout_acceptance_rate`, the gate's default metric) is the greedy
        one when greedy was evaluated: deterministic, so two drafters compare without sampling noise.
        """
        out: dict[str, float] = {}
        for temperature, m in self.drafters[name].items():
            values = {"acceptance_rate": m.acceptance_rate, "token_acceptance": m.token_acceptance,
                      "mean_accepted_length": m.mean_accepted_length, "speculative_tok_s": m.tok_s,
                      "speedup": self.speedup(name, temperature)}
            label = temperature_label(temperature)
            out.update({f"{prefix}{k}_{label}": float(v) for k, v in values.items()})
            if temperature == self.headline_temperature():
                out.update({f"{prefix}{k}": float(v) for k, v in values.items()})
        for temperature, m in self.autoregressive.items():
            out[f"{prefix}autoregressive_tok_s_{temperature_label(temperature)}"] = float(m.tok_s)
        return out

    def as_dict(self) -> dict:
        return {
            "gamma": self.gamma, "max_new_tokens": self.max_new_tokens, "num_prompts": self.num_prompts,
            "prompt_tokens": self.prompt_tokens, "temperatures": list(self.temperatures),
            "drafters": {n: {temperature_label(t): m.as_dict() for t, m in by_t.items()}
                         for n, by_t in self.drafters.items()},
            "autoregressive": {temperature_label(t): m.as_dict() for t, m in self.autoregressive.items()},
        }

    def table(self) -> str:
        """A human-readable table (for stderr)."""
        rows = [("drafter", "mode", "acc_rate", "tok_acc", "mean_len", "tok/s", "speedup", "drafted",
                 "compared")]
        for name, by_t in self.drafters.items():
            for t, m in by_t.items():
                rows.append((name, temperature_label(t), f"{m.acceptance_rate:.3f}",
                             f"{m.token_acceptance:.3f}", f"{m.mean_accepted_length:.2f}", f"{m.tok_s:.1f}",
                             f"{self.speedup(name, t):.2f}x" if t in self.autoregressive else "-",
                             str(m.drafted), str(m.compared)))
        for t, m in self.autoregressive.items():
            rows.append((AUTOREGRESSIVE, temperature_label(t), "-", "-", "1.00", f"{m.tok_s:.1f}", "1.00x",
                         "0", "0"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _requests(prompts: list[list[int]], temperature: float, max_new_tokens: int, seed: int,
              gamma: int | None = None, tag: str = "eval", indices: Sequence[int] | None = None) -> list[Request]:
    # Per-prompt seeds: every drafter sees the same target randomness for prompt i (`indices`: the prompts'
    # places in the whole list). gamma None: the engine's own setting (an integer or its policy).
    indices = range(len(prompts)) if indices is None else indices
    return [Request(f"{tag}-{i}", list(p), SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                                            seed=None if temperature == 0 else seed + i),
                    num_speculative_tokens=gamma)
            for i, p in zip(indices, prompts)]


def _decode(engine: SpecEngine, prompts, temperature, max_new_tokens, seed, gamma=None) -> DecodeMetrics:
    start = time.perf_counter()
    results = engine.generate(_requests(prompts, temperature, max_new_tokens, seed, gamma))
    return DecodeMetrics.pooled(results, time.perf_counter() - start)


def evaluation_engine_config(engine: EngineConfig, prompts: Sequence[Sequence[int]],
                             max_new_tokens: int) -> EngineConfig:
    """The serving config with what evaluation must change: a context that fits the longest prompt, the
    output and the longest draft, and no traffic top-k (nothing is logged)."""
    gamma = engine.num_speculative_tokens
    headroom = gamma if isinstance(gamma, int) else getattr(engine, "auto_max_speculative_tokens", 32)
    needed = max(len(p) for p in prompts) + max_new_tokens + headroom + 1
    return engine.model_copy(update={"max_model_len": max(engine.max_model_len, needed), "topk_logprobs": 0})


class _Engines:
    """One engine per drafter over ONE target runner (one prepacked copy of the target), each warmed alike:
    every temperature decodes the first prompt once before anything is timed."""

    def __init__(self, target: LoadedModel, config: EngineConfig, *, warmup_prompt: list[int] | None,
                 temperatures: Sequence[float], max_new_tokens: int):
        self.target, self.config = target, config
        self.target_runner = runner_for(target.model, prepack=config.prepack_weights)
        self.warmup = [] if warmup_prompt is None else [(warmup_prompt, t) for t in temperatures]
        self.max_new_tokens = max_new_tokens

    def build(self, drafter: Drafter | None, version: str) -> SpecEngine:
        drafter_runner = None if drafter is None else runner_for(None, drafter, prepack=self.config.prepack_weights)
        engine = SpecEngine(self.target_runner, drafter_runner, config=self.config,
                            eos_token_ids=self.target.eos_token_ids, drafter_version=version)
        for prompt, t in self.warmup:  # the greedy and sampling paths warm up separately
            engine.generate(_requests([prompt], t, min(8, self.max_new_tokens), self.config.seed, tag="warmup"))
        return engine


def evaluate_drafters(
    target: LoadedModel,
    drafters: dict[str, Drafter],
    prompts: list[list[int]],
    *,
    engine: EngineConfig = EngineConfig(),
    max_new_tokens: int = 64,
    temperatures: Sequence[float] = (0.0, 1.0),
    measure_autoregressive: bool = True,
    warmup: bool = True,
) -> EvalReport:
    """Decode `prompts` with each drafter under the serving `engine` config and with none; pool the counters.

    Every drafter's engine uses `evaluation_engine_config(engine, ...)`: the serving speculation settings
    (gamma or the `auto` policy, prompt lookup, batch size, seed), so what is measured is what Serve would
    do. The autoregressive run is the same engine without a drafter at gamma 0.

    Greedy results are deterministic; sampled ones use seed `engine.seed + i` for prompt i, identical
    across drafters, so differences come from the drafters (speculative sampling keeps the target's output
    distribution whatever the drafter). A short warm-up run per engine keeps one-off costs out of tok/s.
    """
    if not prompts:
        raise ValueError("evaluate_drafters needs at least one prompt")
    if engine.num_speculative_tokens == 0:
        raise ValueError("num_speculative_tokens is 0: nothing to evaluate (use an integer >= 1 or auto)")
    config = evaluation_engine_config(engine, prompts, max_new_tokens)
    temperatures = tuple(float(t) for t in temperatures)
    engines = _Engines(target, config, warmup_prompt=prompts[0] if warmup else None, temperatures=temperatures,
                       max_new_tokens=max_new_tokens)
    per_drafter: dict[str, dict[float, DecodeMetrics]] = {}
    for name, drafter in drafters.items():
        spec = engines.build(drafter, name)
        per_drafter[name] = {}
        for t in temperatures:
            m = _decode(spec, prompts, t, max_new_tokens, config.seed)
            per_drafter[name][t] = m
            logger.info("%s %s: acceptance_rate %.3f token_acceptance %.3f mean_len %.2f %.1f tok/s",
                        name, temperature_label(t), m.acceptance_rate, m.token_acceptance,
                        m.mean_accepted_length, m.tok_s)
        del spec
    autoregressive: dict[float, DecodeMetrics] = {}
    if measure_autoregressive:
        plain = engines.build(None, "none")
        for t in temperatures:
            autoregressive[t] = _decode(plain, prompts, t, max_new_tokens, config.seed, 0)
            logger.info("autoregressive %s: %.1f tok/s", temperature_label(t), autoregressive[t].tok_s)
    return EvalReport(gamma=config.num_speculative_tokens, max_new_tokens=max_new_tokens, num_prompts=len(prompts),
                      prompt_tokens=sum(len(p) for p in prompts), temperatures=temperatures,
                      drafters=per_drafter, autoregressive=autoregressive)


@dataclasses.dataclass
class PairedSpeed:
    """Per drafter: output tokens/s of every prompt (index i = prompt i for all) and the pooled counters."""

    tok_s: dict[str, list[float]]
    pooled: dict[str, DecodeMetrics]
    concurrency: int
    temperature: float


def measure_speed_paired(target: LoadedModel, drafters: dict[str, Drafter], prompts: list[list[int]], *,
                         engine: EngineConfig = EngineConfig(), max_new_tokens: int = 64, temperature: float = 0.0,
                         concurrency: int = 1, clock=time.perf_counter) -> PairedSpeed:
    """Time every drafter on every prompt under the serving `engine` config, interleaved, for a paired test.

    Prompts go in groups of `concurrency` (1: each prompt alone, so prompts are independent units); each
    group is decoded by every drafter in turn, the order rotating from group to group (A B, B A, ...), so
    drift of the machine hits all drafters alike. A prompt's speed is its output tokens over the time from
    its group's start to its own last token. Every engine is warmed the same way (the first group once,
    untimed) before anything is timed.
    """
    if not prompts or not drafters:
        raise ValueError("measure_speed_paired needs prompts and drafters")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    config = evaluation_engine_config(engine, prompts, max_new_tokens)
    config = config.model_copy(update={"max_batch_size": max(concurrency, 1)})
    engines_for = _Engines(target, config, warmup_prompt=None, temperatures=(), max_new_tokens=max_new_tokens)
    engines = {name: engines_for.build(drafter, name) for name, drafter in drafters.items()}
    groups = [list(range(i, min(i + concurrency, len(prompts)))) for i in range(0, len(prompts), concurrency)]
    for name, spec in engines.items():  # the same untimed warm-up for every drafter
        spec.generate(_requests([prompts[i] for i in groups[0]], temperature, max_new_tokens, config.seed,
                                tag="warmup"))
    names = list(engines)
    tok_s = {name: [0.0] * len(prompts) for name in names}
    results: dict[str, list] = {name: [] for name in names}
    seconds = dict.fromkeys(names, 0.0)
    for g, group in enumerate(groups):
        order = names[g % len(names):] + names[:g % len(names)]
        for name in order:
            spec = engines[name]
            requests = _requests([prompts[i] for i in group], temperature, max_new_tokens, config.seed,
                                 indices=group)
            index = {r.request_id: i for r, i in zip(requests, group)}
            for r in requests:
                spec.add_request(r)
            start = clock()
            while spec.has_work():
                for out in spec.step():
                    if out.finished:
                        elapsed = clock() - start
                        n_out = len(out.result.output_token_ids)
                        tok_s[name][index[out.request_id]] = n_out / elapsed if elapsed > 0 else 0.0
                        results[name].append(out.result)
            seconds[name] += clock() - start
    pooled = {name: DecodeMetrics.pooled(results[name], seconds[name]) for name in names}
    return PairedSpeed(tok_s=tok_s, pooled=pooled, concurrency=concurrency, temperature=temperature)


# ---------------------------------------------------------------------------------------------- plot


def plot_comparison(report: EvalReport, path: str | Path, *, names: Sequence[str] | None = None,
                    title: str | None = None) -> Path:
    """A PNG with one panel per metric, bars per drafter, grouped by greedy / sampled."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    names = list(names or report.drafters)
    panels = [("acceptance_rate", "acceptance rate", (0, 1.15)),
              ("token_acceptance", "token acceptance (alpha)", (0, 1.15)),
              ("mean_accepted_length", "mean accepted length",
               (0, report.gamma + 1.6) if isinstance(report.gamma, int) else None),
              ("tok_s", "speculative tok/s", None)]
    fig = Figure(figsize=(4 * len(panels), 3.6))
    width = 0.8 / max(1, len(names))
    colors = plt.get_cmap("tab10").colors
    for col, (attr, label, ylim) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), col + 1)
        for i, name in enumerate(names):
            values = [getattr(report.get(name, t), attr) for t in report.temperatures]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(report.temperatures))]
            bars = ax.bar(xs, values, width, label=name, color=colors[i % len(colors)])
            ax.bar_label(bars, fmt="%.2f" if attr != "tok_s" else "%.0f", fontsize=7)
        if attr == "tok_s":
            for j, t in enumerate(report.temperatures):
                ar = report.autoregressive.get(t)
                if ar is not None:
                    ax.hlines(ar.tok_s, j - 0.45, j + 0.45, colors="k", linestyles="--",
                              label=AUTOREGRESSIVE if j == 0 else None)
        ax.set_xticks(range(len(report.temperatures)), [temperature_label(t) for t in report.temperatures])
        ax.set_title(label, fontsize=10)
        if ylim:
            ax.set_ylim(*ylim)
        if col == 0 or attr == "tok_s":
            ax.legend(fontsize=7, loc="upper right" if attr == "tok_s" else "upper left")
    fig.suptitle(title or f"drafters on {report.num_prompts} held-out prompts, gamma {report.gamma}, "
                          f"{report.max_new_tokens} new tokens", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# ---------------------------------------------------------------------------------------------- prompts


def prompts_from_messages(tokenizer, message_lists: Sequence[list[dict]],
                          max_prompt_tokens: int) -> list[list[int]]:
    """Chat message lists -> prompt token ids (chat template, generation prompt, cut from the left).

    Cutting from the left keeps the end of the conversation and the assistant header, which is what
    the next token depends on.
    """
    out = []
    for messages in message_lists:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            out.append(list(ids[-max_prompt_tokens:]))
    return out


def heldout_prompts_from_traffic(
    traffic_uri: str,
    target: LoadedModel,
    *,
    n: int,
    max_prompt_tokens: int,
    heldout_since: dt.datetime,
    sources: tuple[str, ...] | None = None,
) -> list[list[int]]:
    """Distinct prompts of a challenger's held-out window of the target's traffic (newest first).

    `heldout_since` is the time the distillation job recorded on the challenger: THE split
    (draftsmith.distill_data.split_at) then keeps the records at or after it whose prompt no training
    record had (nor began with). Every record before `heldout_since` counts as training, a superset of
    any one job's window, so no prompt a challenger (or its ancestors) trained on reaches evaluation.
    """
    from draftsmith.distill_data import build_distill_dataset, heldout_prompts

    data = build_distill_dataset(traffic_uri, target_id=target.model_id, target_revision=target.revision,
                                 tokenizer_hash=target.tokenizer_hash, heldout_since=heldout_since,
                                 sources=sources)
    if len(data.heldout) == 0:
        raise ValueError(f"no held-out traffic for target {target.model_id} ({target.revision}) under "
                         f"{traffic_uri} "
                         f"at or after {heldout_since.isoformat()} that training did not see "
                         f"({data.stats['heldout_excluded']} left out): serve some more, or pass a `sharegpt` / "
                         "`jsonl:PATH` prompt source")
    return heldout_prompts(data.heldout, n=n, max_prompt_tokens=max_prompt_tokens)


def self_drafter(target: LoadedModel) -> Drafter:
    """The target's own weights as a drafter (an upper bound: greedy token acceptance 1.0)."""
    return Drafter(target.model, {"kind": "external", "target_id": target.model_id,
                                  "target_revision": target.revision}, version="self")


__all__ = ["DecodeMetrics", "EvalReport", "PairedSpeed", "evaluate_drafters", "evaluation_engine_config",
           "heldout_prompts_from_traffic", "measure_speed_paired", "plot_comparison", "prompts_from_messages",
           "self_drafter", "temperature_label"]
