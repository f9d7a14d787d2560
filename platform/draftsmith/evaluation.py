"""Drafter evaluation: acceptance and speed of drafters on the same prompts, measured by the engine.

What it does: decodes one list of prompts with the target and each drafter in a `SpecEngine` (same
gamma, greedy and seeded sampling), sums the engine's per-request counters into acceptance rate,
token acceptance and mean accepted length (docs/design.md, "Vocabulary"), times speculative decoding
against plain autoregressive decoding of the same engine (gamma 0), and draws a comparison PNG.
Also turns chat messages or the traffic log's most recent slice into prompt token ids.

What it does not do: no Ray, no MLflow (jobs/evaluate logs the report through the registry), no
promotion decision (`DrafterRegistry.promote_if_better`), no model loading (models.py).

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

    gamma: int
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
              gamma: int) -> list[Request]:
    # Per-prompt seeds: every drafter sees the same target randomness for prompt i.
    return [Request(f"eval-{i}", list(p), SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                                           seed=None if temperature == 0 else seed + i),
                    num_speculative_tokens=gamma)
            for i, p in enumerate(prompts)]


def _decode(engine: SpecEngine, prompts, temperature, max_new_tokens, seed, gamma) -> DecodeMetrics:
    start = time.perf_counter()
    results = engine.generate(_requests(prompts, temperature, max_new_tokens, seed, gamma))
    return DecodeMetrics.pooled(results, time.perf_counter() - start)


def evaluate_drafters(
    target: LoadedModel,
    drafters: dict[str, Drafter],
    prompts: list[list[int]],
    *,
    gamma: int = 4,
    max_new_tokens: int = 64,
    temperatures: Sequence[float] = (0.0, 1.0),
    seed: int = 0,
    batch_size: int = 8,
    measure_autoregressive: bool = True,
    warmup: bool = True,
    engine_options: dict | None = None,
) -> EvalReport:
    """Decode `prompts` with each drafter (same gamma, same seeds) and with none; pool the counters.

    `engine_options` are further EngineConfig fields (prompt lookup) for the drafters' engines (the
    autoregressive run never speculates); the gate passes none, so that it compares drafters alone.

    Greedy results are deterministic; sampled ones use seed `seed + i` for prompt i, identical across
    drafters, so differences come from the drafters (speculative sampling keeps the target's output
    distribution whatever the drafter). A short warm-up run per engine keeps one-off costs out of tok/s.
    """
    if not prompts:
        raise ValueError("evaluate_drafters needs at least one prompt")
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1 to evaluate drafters, got {gamma}")
    target_runner = runner_for(target.model)
    longest = max(len(p) for p in prompts)
    config = EngineConfig(num_speculative_tokens=gamma, max_batch_size=batch_size,
                          max_model_len=longest + max_new_tokens + gamma + 1, topk_logprobs=0,
                          seed=seed, **(engine_options or {}))
    temperatures = tuple(float(t) for t in temperatures)

    def engine_for(drafter: Drafter | None, version: str) -> SpecEngine:
        drafter_runner = None if drafter is None else runner_for(None, drafter)
        engine = SpecEngine(target_runner, drafter_runner, config=config, eos_token_ids=target.eos_token_ids,
                            drafter_version=version)
        for t in temperatures if warmup else ():  # the greedy and sampling paths warm up separately
            engine.generate(_requests(prompts[:1], t, min(8, max_new_tokens), seed, gamma))
        return engine

    per_drafter: dict[str, dict[float, DecodeMetrics]] = {}
    for name, drafter in drafters.items():
        engine = engine_for(drafter, name)
        per_drafter[name] = {}
        for t in temperatures:
            m = _decode(engine, prompts, t, max_new_tokens, seed, gamma)
            per_drafter[name][t] = m
            logger.info("%s %s: acceptance_rate %.3f token_acceptance %.3f mean_len %.2f %.1f tok/s",
                        name, temperature_label(t), m.acceptance_rate, m.token_acceptance,
                        m.mean_accepted_length, m.tok_s)
        del engine
    autoregressive: dict[float, DecodeMetrics] = {}
    if measure_autoregressive:
        engine = engine_for(None, "none")
        for t in temperatures:
            autoregressive[t] = _decode(engine, prompts, t, max_new_tokens, seed, 0)
            logger.info("autoregressive %s: %.1f tok/s", temperature_label(t), autoregressive[t].tok_s)
    return EvalReport(gamma=gamma, max_new_tokens=max_new_tokens, num_prompts=len(prompts),
                      prompt_tokens=sum(len(p) for p in prompts), temperatures=temperatures,
                      drafters=per_drafter, autoregressive=autoregressive)


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
              ("mean_accepted_length", "mean accepted length", (0, report.gamma + 1.6)),
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
    heldout_fraction: float = 0.1,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> list[list[int]]:
    """Distinct prompts of the most recent `heldout_fraction` of the target's traffic (newest first).

    The held-out slice is the distillation dataset's (draftsmith.distill_data), so a challenger is never
    evaluated on prompts it was trained on when both use the same fraction.
    """
    from draftsmith.distill_data import build_distill_dataset, heldout_prompts

    data = build_distill_dataset(traffic_uri, target_id=target.model_id, target_revision=target.revision,
                                 tokenizer_hash=target.tokenizer_hash, since=since, until=until,
                                 heldout_fraction=heldout_fraction)
    if len(data.heldout) == 0:
        raise ValueError(f"no held-out traffic for target {target.model_id} ({target.revision}) under {traffic_uri}: "
                         "serve or backfill some, or pass a `sharegpt` / `jsonl:PATH` prompt source")
    return heldout_prompts(data.heldout, n=n, max_prompt_tokens=max_prompt_tokens)


def self_drafter(target: LoadedModel) -> Drafter:
    """The target's own weights as a drafter (an upper bound: greedy token acceptance 1.0)."""
    return Drafter(target.model, {"kind": "external", "target_id": target.model_id,
                                  "target_revision": target.revision}, version="self")


__all__ = ["DecodeMetrics", "EvalReport", "evaluate_drafters", "plot_comparison", "prompts_from_messages",
           "heldout_prompts_from_traffic", "self_drafter", "temperature_label"]
