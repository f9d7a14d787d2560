"""Ray job entry point: evaluate a challenger drafter against the champion on held-out prompts, then gate.

    ray job submit --working-dir . -- python -m jobs.evaluate --config infra/evaluate.yaml

What it does: loads the target, the challenger (a registry version or alias) and the champion
(`models:/<name>@champion`, when there is one) through `DrafterRegistry`, builds held-out prompts (the
most recent slice of the traffic log, ShareGPT's held-out split, or a JSONL file), measures both
drafters with the engine on the same prompts and gamma, greedy and sampled
(`draftsmith.evaluation`), logs the metrics to both versions' runs (so the gate compares like with
like) and a comparison PNG plus the JSON report to the challenger's run, and applies the gate
(`DrafterRegistry.promote_if_better`).

What it does not do: train (jobs/distill), decide when to run (pipelines/trigger), serve.
It needs no Ray API: a Ray job runs it as a process on the cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from draftsmith.evaluation import (
    EvalReport,
    evaluate_drafters,
    heldout_prompts_from_traffic,
    plot_comparison,
    prompts_from_messages,
)
from draftsmith.models import load_drafter, load_model
from draftsmith.registry import CHAMPION, DEFAULT_METRIC, DEFAULT_MODEL_NAME, DrafterRegistry, GateDecision

logger = logging.getLogger(__name__)

PLOT_NAME = "heldout_comparison.png"
REPORT_NAME = "heldout_report.json"


class EvaluateConfig(BaseModel):
    """What to evaluate, on which prompts, and the promotion gate."""

    model_config = ConfigDict(extra="forbid")

    tracking_uri: str = Field("http://127.0.0.1:5000", description="MLflow tracking server URL.")
    registry_uri: str | None = Field(None, description="MLflow registry URI (default: the tracking URI).")
    model_name: str = Field(DEFAULT_MODEL_NAME, description="Registered model of the drafter versions.")
    target: str = Field("smollm2-135m-instruct", description="Target model spec (preset, HF dir, .gguf).")
    device: str = Field("cpu", description="Torch device for target and drafters.")
    challenger: str = Field("challenger", description="Version number or alias of the drafter to evaluate.")
    champion_alias: str = Field(CHAMPION, description="Alias of the drafter serving now (compared against).")
    prompts: str = Field(
        "traffic", description="Held-out prompt source: `traffic` (most recent slice of the traffic log), "
                               "`sharegpt` (its held-out split) or `jsonl:PATH`.")
    traffic_uri: str | None = Field(None, description="Traffic log URI (needed when prompts is `traffic`).")
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="Most recent fraction of traffic held out (set "
                                    "it to the distillation job's, so the challenger never saw these prompts).")
    num_prompts: int = Field(32, ge=1, description="Held-out prompts to decode.")
    max_prompt_tokens: int = Field(256, ge=1, description="Prompts keep this many tokens (the end).")
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per prompt.")
    gamma: int = Field(4, ge=1, description="Draft tokens per step (num_speculative_tokens), same for both.")
    temperatures: list[float] = Field([0.0, 1.0], description="0 is greedy; others are seeded sampling.")
    seed: int = Field(0, description="Sampling seed (prompt i uses seed + i for every drafter).")
    batch_size: int = Field(8, ge=1, description="Engine batch size.")
    gate_metric: str = Field(DEFAULT_METRIC, description="Metric the gate compares (greedy unless suffixed).")
    margin: float = Field(0.0, description="Challenger must beat the champion by at least this much.")
    gate: Literal["apply", "skip"] = Field("apply", description="`skip` only logs metrics; no promotion.")
    artifact_path: str = Field("evaluation", description="Run artifact folder for the PNG and JSON report.")


def load_config(path: str | Path | None, overrides: dict | None = None) -> EvaluateConfig:
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    return EvaluateConfig(**{**(data or {}), **{k: v for k, v in (overrides or {}).items() if v is not None}})


def load_prompts(cfg: EvaluateConfig, target) -> list[list[int]]:
    """Held-out prompt token ids from the configured source."""
    if cfg.prompts == "traffic":
        if not cfg.traffic_uri:
            raise ValueError("prompts is `traffic` but traffic_uri is not set: set it, or use `sharegpt` / "
                             "`jsonl:PATH`")
        # the slice the distillation job held out with the same heldout_fraction
        return heldout_prompts_from_traffic(cfg.traffic_uri, target, n=cfg.num_prompts,
                                            max_prompt_tokens=cfg.max_prompt_tokens,
                                            heldout_fraction=cfg.heldout_fraction)
    from draftsmith.datasets_io import load_prompt_source

    messages = load_prompt_source(cfg.prompts, cfg.num_prompts, split="heldout")
    return prompts_from_messages(target.tokenizer, messages, cfg.max_prompt_tokens)


def log_evaluation(registry: DrafterRegistry, version: str, metrics: dict[str, float],
                   files: list[Path], artifact_path: str) -> None:
    """Metrics and files on a version's run. Local stand-in for a `DrafterRegistry.log_evaluation`."""
    registry.log_metrics(version, metrics)
    run_id = registry.get_version(version).run_id
    for f in files:
        registry.client.log_artifact(run_id, str(f), artifact_path)


def evaluate_and_gate(cfg: EvaluateConfig, *, report_out: dict | None = None) -> GateDecision:
    """Evaluate challenger vs champion, log to MLflow, apply the gate.

    `report_out`, when given, receives the EvalReport under "report".
    """
    registry = DrafterRegistry(cfg.tracking_uri, cfg.registry_uri, model_name=cfg.model_name)
    challenger = registry.resolve(cfg.challenger)
    champion = registry.get_version_by_alias(cfg.champion_alias)
    if champion is not None and champion.version == challenger.version:
        champion = None  # re-evaluating the champion alone: nothing to compare against
    target = load_model(cfg.target, device=cfg.device)
    prompts = load_prompts(cfg, target)
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
        logger.info("evaluating %s on %d prompts (gamma %d, %d new tokens)", ", ".join(drafters),
                    len(prompts), cfg.gamma, cfg.max_new_tokens)
        report = evaluate_drafters(target, drafters, prompts, gamma=cfg.gamma,
                                   max_new_tokens=cfg.max_new_tokens, temperatures=tuple(cfg.temperatures),
                                   seed=cfg.seed, batch_size=cfg.batch_size)
        logger.info("\n%s", report.table())
        png = plot_comparison(report, tmp / PLOT_NAME, names=list(drafters))
        report_json = tmp / REPORT_NAME
        report_json.write_text(json.dumps({**report.as_dict(), "prompts": cfg.prompts,
                                           "versions": names}, indent=2))
        if champion is not None:
            log_evaluation(registry, champion.version, report.flat_metrics(names[champion.version]), [], "")
        log_evaluation(registry, challenger.version, report.flat_metrics(names[challenger.version]),
                       [png, report_json], cfg.artifact_path)
    if report_out is not None:
        report_out["report"] = report
    if cfg.gate == "skip":
        return GateDecision(False, report.flat_metrics(names[challenger.version]).get(cfg.gate_metric),
                            None, cfg.margin, "gate skipped (gate: skip)")
    decision = registry.promote_if_better(challenger.version, metric=cfg.gate_metric, margin=cfg.margin)
    logger.info("gate: %s", decision.reason)
    return decision


def summary(decision: GateDecision, report: EvalReport | None) -> dict:
    out = {"promoted": decision.promoted, "challenger_value": decision.challenger_value,
           "champion_value": decision.champion_value, "margin": decision.margin, "reason": decision.reason}
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
    parser.add_argument("--margin", type=float)
    parser.add_argument("--gate", choices=["apply", "skip"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    cfg = load_config(args.config, overrides)
    holder: dict = {}
    decision = evaluate_and_gate(cfg, report_out=holder)
    print(json.dumps(summary(decision, holder.get("report"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
