"""Ray job entry point: evaluate a challenger drafter against the champion on its held-out window, then gate.

    ray job submit --working-dir . -- python -m jobs.evaluate --config infra/evaluate.yaml \
        --set traffic_uri=$PWD/.state/traffic      # a Ray Job needs absolute local paths

What it does: reads the champion alias the config names ONCE, loads the target, the challenger (a
registry version or alias) and that champion through `DrafterRegistry`, builds held-out prompts (the
challenger's own held-out window of the traffic log: records at or after the `heldout_since` its
distillation job recorded on it, less any prompt seen in training; or ShareGPT's held-out split, or a
JSONL file), and runs the engine with the SERVING configuration (`engine:`, the same section as
infra/serve.yaml's, speculation policy included). It measures both drafters' acceptance, greedy and
sampled (`draftsmith.evaluation.evaluate_drafters`), logs the metrics to both versions' runs and a
comparison PNG plus the JSON report to the challenger's run, then times both drafters per prompt,
interleaved (`measure_speed_paired`), and applies the gate (`draftsmith.gate.decide`: promote only if the
challenger serves strictly faster at the stated confidence, on a paired one-sided Wilcoxon test over
prompts), recorded on the challenger's tags by `DrafterRegistry.apply_gate`. Both versions evaluated are tagged
`heldout_engine` (`engine_tag`: the engine settings their held-out figures were measured with), so that a served
figure is compared with them only at the same settings. In a Ray Job it refuses relative local paths
(`jobs.distill.refuse_relative_paths`).

What it does not do: train (jobs/distill), decide when to run (pipelines/trigger), serve.
It needs no Ray API: a Ray job runs it as a process on the cluster.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from draftsmith.engine_config import EngineConfig
from draftsmith.evaluation import (
    EvalReport,
    PairedSpeed,
    evaluate_drafters,
    heldout_prompts_from_traffic,
    measure_speed_paired,
    plot_comparison,
    prompts_from_messages,
)
from draftsmith.gate import GateDecision, decide
from draftsmith.models import load_drafter, load_model
from draftsmith.registry import CHAMPION, DEFAULT_MODEL_NAME, DrafterRegistry, DrafterVersion
from jobs.distill import PathKind, refuse_relative_paths

logger = logging.getLogger(__name__)

PLOT_NAME = "heldout_comparison.png"
REPORT_NAME = "heldout_report.json"


class EvaluateConfig(BaseModel):
    """What to evaluate, on which prompts, under which serving configuration, and the promotion gate."""

    model_config = ConfigDict(extra="forbid")

    tracking_uri: str = Field("http://127.0.0.1:5000", description="MLflow tracking server URL.")
    registry_uri: str | None = Field(None, description="MLflow registry URI (default: the tracking URI).")
    model_name: str = Field(DEFAULT_MODEL_NAME, description="Registered model of the drafter versions.")
    target: str = Field("smollm2-135m-instruct", description="Target model spec (preset, HF dir, .gguf).")
    device: str = Field("cpu", description="Torch device for target and drafters.")
    challenger: str = Field("challenger", description="Version number or alias of the drafter to evaluate.")
    champion_alias: str = Field(CHAMPION, description="Alias of the drafter serving now: read once, compared "
                                "against, and the alias a promotion moves.")
    prompts: str = Field(
        "traffic", description="Held-out prompt source: `traffic` (the challenger's held-out window of the traffic "
                               "log: records at or after the `heldout_since` its distillation job recorded, less "
                               "any prompt seen in training), `sharegpt` (its held-out split) or `jsonl:PATH`.")
    traffic_uri: str | None = Field(None, description="Traffic log URI (needed when prompts is `traffic`).")
    num_prompts: int = Field(32, ge=1, le=256, description="Held-out prompts to decode (also the gate's sample "
                             "size). At most 256: the gate's exact Wilcoxon p-value enumerates the rank-sum "
                             "distribution, whose cost grows with the cube of the sample size.")
    max_prompt_tokens: int = Field(256, ge=1, description="Prompts keep this many tokens (the end).")
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per prompt.")
    temperatures: list[float] = Field([0.0, 1.0], description="0 is greedy; others are seeded sampling "
                                      "(prompt i uses seed engine.seed + i for every drafter).")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="The serving engine configuration "
                                 "(infra/serve.yaml's `engine:` section): both drafters are measured with it, "
                                 "speculation policy included; evaluation changes only the context length and "
                                 "the traffic top-k.")
    confidence: float = Field(0.95, ge=0.5, lt=1, description="The gate promotes only if the challenger is faster "
                              "at this confidence: one-sided paired Wilcoxon p-value below 1 - confidence.")
    gate_concurrency: int = Field(1, ge=1, description="Requests decoded at once while the gate times the "
                                  "drafters (1: each prompt alone, so prompts are independent pairs).")
    gate: Literal["apply", "skip"] = Field("apply", description="`skip` only logs metrics: no timing, no "
                                           "promotion.")
    artifact_path: str = Field("evaluation", description="Run artifact folder for the PNG and JSON report.")

    def local_paths(self) -> dict[str, tuple[str | None, PathKind]]:
        """The fields that may name a local path, with how each is read (draftsmith.local_paths.relative_local_path)."""
        return {"traffic_uri": (self.traffic_uri, "uri"), "tracking_uri": (self.tracking_uri, "tracking"),
                "registry_uri": (self.registry_uri, "tracking")}


def load_config(path: str | Path | None, overrides: dict | None = None) -> EvaluateConfig:
    """The config of a YAML file (None: the defaults) with `overrides` (None values ignored), whose dotted keys
    reach into the nested sections (`{"engine.num_speculative_tokens": 4}`)."""
    data = (yaml.safe_load(Path(path).read_text()) if path else {}) or {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        *sections, name = key.split(".")
        node = data
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return EvaluateConfig(**data)


HELDOUT_ENGINE_TAG = "heldout_engine"


def engine_tag(engine: EngineConfig) -> str:
    """The `heldout_engine` tag: the engine settings the held-out figures were measured with, as compact JSON with
    sorted keys (the serving config, before evaluation fits the context and drops the traffic top-k), so that
    whoever compares a served figure with them (the trigger's drift check) can verify like with like."""
    return json.dumps(engine.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def heldout_since_of(version: DrafterVersion) -> dt.datetime:
    """The start of the challenger's held-out window, as its distillation job recorded it (tag `heldout_since`)."""
    value = version.tags.get("heldout_since", "")
    if not value:
        raise ValueError(f"drafter v{version.version} records no held-out window (tag heldout_since): it was not "
                         "trained by the distillation job with a heldout_fraction > 0, so no traffic is known "
                         "to be "
                         "unseen by it; evaluate it on `sharegpt` or `jsonl:PATH` prompts instead")
    since = dt.datetime.fromisoformat(value)
    return since if since.tzinfo else since.replace(tzinfo=dt.timezone.utc)


def load_prompts(cfg: EvaluateConfig, target, challenger: DrafterVersion) -> list[list[int]]:
    """Held-out prompt token ids from the configured source."""
    if cfg.prompts == "traffic":
        if not cfg.traffic_uri:
            raise ValueError("prompts is `traffic` but traffic_uri is not set: set it, or use `sharegpt` / "
                             "`jsonl:PATH`")
        return heldout_prompts_from_traffic(cfg.traffic_uri, target, n=cfg.num_prompts,
                                            max_prompt_tokens=cfg.max_prompt_tokens,
                                            heldout_since=heldout_since_of(challenger))
    from draftsmith.datasets_io import load_prompt_source

    messages = load_prompt_source(cfg.prompts, cfg.num_prompts, split="heldout")
    return prompts_from_messages(target.tokenizer, messages, cfg.max_prompt_tokens)


def log_evaluation(registry: DrafterRegistry, version: str, metrics: dict[str, float],
                   files: list[Path], artifact_path: str) -> None:
    """Metrics and files on a version's run."""
    registry.log_metrics(version, metrics)
    run_id = registry.get_version(version).run_id
    for f in files:
        registry.client.log_artifact(run_id, str(f), artifact_path)


def gate_on_speed(cfg: EvaluateConfig, target, drafters: dict, names: dict[str, str],
                  champion: DrafterVersion | None, prompts: list[list[int]],
                  headline_temperature: float) -> tuple[GateDecision, PairedSpeed | None]:
    """Time challenger and champion per prompt at the serving configuration and apply draftsmith.gate's rule."""
    challenger_name, *rest = names.values()
    if champion is None:
        return GateDecision(True, f"no {cfg.champion_alias} yet: the challenger is the first"), None
    champion_name = rest[0]
    paired = measure_speed_paired(target, {n: drafters[n] for n in (challenger_name, champion_name)}, prompts,
                                  engine=cfg.engine, max_new_tokens=cfg.max_new_tokens,
                                  temperature=headline_temperature, concurrency=cfg.gate_concurrency)
    mine, theirs = paired.pooled[challenger_name], paired.pooled[champion_name]
    decision = decide(paired.tok_s[challenger_name], paired.tok_s[champion_name], confidence=cfg.confidence,
                      challenger_pooled_tok_s=mine.tok_s, champion_pooled_tok_s=theirs.tok_s,
                      challenger_token_acceptance=mine.token_acceptance,
                      champion_token_acceptance=theirs.token_acceptance, champion_version=champion.version)
    return decision, paired


def evaluate_and_gate(cfg: EvaluateConfig, *, report_out: dict | None = None) -> GateDecision:
    """Evaluate challenger vs champion, log to MLflow, apply the gate.

    `report_out`, when given, receives the EvalReport under "report" and the paired timing under "paired".
    """
    refuse_relative_paths("jobs.evaluate", cfg.local_paths())
    registry = DrafterRegistry(cfg.tracking_uri, cfg.registry_uri, model_name=cfg.model_name)
    challenger = registry.resolve(cfg.challenger)
    champion = registry.get_version_by_alias(cfg.champion_alias)  # read once: the gate compares against it
    if champion is not None and champion.version == challenger.version:
        champion = None  # re-evaluating the champion alone: nothing to compare against
    target = load_model(cfg.target, device=cfg.device)
    prompts = load_prompts(cfg, target, challenger)
    if not prompts:
        raise ValueError(f"prompt source {cfg.prompts!r} gave no prompts")
    names = {challenger.version: f"challenger v{challenger.version}"}
    if champion is not None:
        names[champion.version] = f"champion v{champion.version}"
    with tempfile.TemporaryDirectory(prefix="draftsmith-eval-") as tmp:
        tmp = Path(tmp)
        drafters = {}
        for version, name in names.items():
            local = registry.download(version, tmp / f"v{version}")
            drafters[name] = load_drafter(local, target, version=version)
        logger.info("evaluating %s on %d prompts (num_speculative_tokens %s, %d new tokens)", ", ".join(drafters),
                    len(prompts), cfg.engine.num_speculative_tokens, cfg.max_new_tokens)
        report = evaluate_drafters(target, drafters, prompts, engine=cfg.engine, max_new_tokens=cfg.max_new_tokens,
                                   temperatures=tuple(cfg.temperatures))
        logger.info("\n%s", report.table())
        if cfg.gate == "skip":
            decision, paired = GateDecision(False, "gate skipped (gate: skip)"), None
        else:
            decision, paired = gate_on_speed(cfg, target, drafters, names, champion, prompts,
                                             report.headline_temperature())
        png = plot_comparison(report, tmp / PLOT_NAME, names=list(drafters))
        report_json = tmp / REPORT_NAME
        report_json.write_text(json.dumps({**report.as_dict(), "prompts": cfg.prompts, "versions": names,
                                           "gate": summary(decision, None, paired)}, indent=2, default=str))
        if champion is not None:
            log_evaluation(registry, champion.version, report.flat_metrics(names[champion.version]), [], "")
        log_evaluation(registry, challenger.version, report.flat_metrics(names[challenger.version]),
                       [png, report_json], cfg.artifact_path)
        for version in names:  # what their heldout_* metrics were measured with
            registry.set_tags(version, **{HELDOUT_ENGINE_TAG: engine_tag(cfg.engine)})
    if report_out is not None:
        report_out.update(report=report, paired=paired)
    if cfg.gate == "skip":
        return decision
    decision = registry.apply_gate(challenger.version, decision, alias=cfg.champion_alias)
    logger.info("gate: %s", decision.reason)
    return decision


def summary(decision: GateDecision, report: EvalReport | None, paired: PairedSpeed | None = None) -> dict:
    out = decision.as_dict()
    if paired is not None:
        out["per_prompt_tok_s"] = paired.tok_s
        out["gate_concurrency"] = paired.concurrency
    if report is not None:
        out["report"] = report.as_dict()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file with EvaluateConfig fields")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--model-name")
    parser.add_argument("--target")
    parser.add_argument("--challenger", help="version number or alias")
    parser.add_argument("--prompts", help="traffic | sharegpt | jsonl:PATH")
    parser.add_argument("--traffic-uri")
    parser.add_argument("--num-prompts", type=int)
    parser.add_argument("--confidence", type=float)
    parser.add_argument("--gate", choices=["apply", "skip"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field (YAML value), e.g. --set traffic_uri=/abs/traffic "
                             "--set engine.num_speculative_tokens=4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    # the named options win over --set
    overrides.update({k: v for k, v in vars(args).items() if k not in ("config", "set") and v is not None})
    cfg = load_config(args.config, overrides)
    holder: dict = {}
    decision = evaluate_and_gate(cfg, report_out=holder)
    print(json.dumps(summary(decision, holder.get("report"), holder.get("paired")), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
