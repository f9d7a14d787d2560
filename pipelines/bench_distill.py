"""`draftsmith bench distill`: traffic -> distilled drafter -> held-out acceptance and speed, before vs after.

    draftsmith bench distill --n 1000 --layers first2+last1 --draft-vocab-size 8192 --steps 600
    draftsmith bench distill --in-process --n 200 --steps 100 --heldout jsonl:prompts.jsonl

Steps: (1) backfill (default: one teacher-forced pass per ShareGPT train conversation) or generate
(`--traffic generate`: the engine answers the first prompts) traffic into a fresh log; (2) derive the
drafter from the target (`--layers`, `--draft-vocab-size` from the traffic's most frequent output
tokens; `--feature-drafter` for one that reads the target's features); (3) evaluate it on held-out
prompts (`--heldout sharegpt|jsonl:PATH`, greedy, gamma 4) "before"; (4) distill it with the job's own
training loop (`draftsmith.distill.train`): in this process (`--in-process`, no Ray), or through the job's
entry point `python -m jobs.distill` on Ray Train (the default; required for `--workers > 1`); the
algorithm's flags (--loss, --lr, ...) are DistillConfig's fields; (5) evaluate "after" and the
target alone (autoregressive) in the same engine, and with `--prompt-lookup-max` the distilled drafter
again with prompt lookup beside it (the *_after_with_options fields); (6) measure the cost ratios c and v
at the evaluation's batch size (draftsmith.cost_profile). Every arm runs at the same torch threads
(`--torch-threads` applies to the whole run) and is warmed up alike. Progress goes to stderr; the LAST
stdout line is one JSON object (records, train_tokens, train_seconds, *_before / *_after,
autoregressive_tok_s, speedup_after, cost_ratio, verify_cost_ratio, the Leviathan predictions, warmup,
measures: which figures are end to end and which decode phase only, ...).

    draftsmith bench distill --in-process --feature-drafter --traffic generate --compare-logged-features

`--compare-logged-features` (with `--feature-drafter`, `--traffic generate` and `--in-process`) measures
what reading the target's features logged at serve time saves in training: the generated traffic is
logged with its features, as Serve logs them with `traffic.log_features` (the engine captures them, the
traffic writer puts them in side files: draftsmith.traffic_features); then the same derived drafter is
trained twice, same seed, steps, data and threads, each arm first warmed by one untimed step of a
throwaway copy: once reading the logged features (`DistillConfig.logged_features`, the job's default), once
recomputing them with the target's forward. Unless --steps or --epochs is given, each arm runs one epoch,
so every record is seen about once: train() keeps recomputed features per record (TargetFeatureCache),
and later epochs would cost the recomputed arm nothing more. The logged arm's drafter is the "after"
drafter; both are evaluated on the held-out prompts. The JSON adds train_seconds_{logged,recomputed}_features,
train_seconds_per_record_{logged,recomputed}, logged_features_speedup (recomputed / logged seconds per
record), each arm's feature rows logged / computed (TrainResult) and its held-out figures.

Not here: serving, the registry (no MLflow is needed), the trigger.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import yaml

from draftsmith.distill import DistillConfig, TrainCallback
from draftsmith.engine_config import EngineConfig

logger = logging.getLogger("draftsmith.bench_distill")

REPO_ROOT = Path(__file__).resolve().parents[1]
# DistillConfig fields offered as flags (--jsd-beta, ...): type, help and default come from the model.
ALGORITHM_FLAGS = ("loss", "jsd_beta", "wrong_weight", "lr", "steps", "epochs", "batch_size", "max_seq_len",
                   "feature_loss_weight")


def _add_algorithm_arguments(p: argparse.ArgumentParser) -> None:
    for name in ALGORITHM_FLAGS:
        field = DistillConfig.model_fields[name]
        kind = int if field.default is None else type(field.default)
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                       help=f"{field.description} (DistillConfig.{name}, default {field.default})")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from draftsmith.bench_decode import add_engine_option_arguments, engine_options, group_sizes_arg

    p = argparse.ArgumentParser(prog="draftsmith bench distill", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="smollm2-135m-instruct", help="target model spec")
    p.add_argument("--device", default="cpu")
    # traffic
    p.add_argument("--traffic", choices=["backfill", "generate"], default="backfill",
                   help="score conversations (fast) or generate answers with the engine (slow on CPU)")
    p.add_argument("--source", default="sharegpt", help="train conversations: sharegpt | jsonl:PATH")
    p.add_argument("--n", type=int, default=1000, help="train conversations (at most)")
    p.add_argument("--traffic-uri", help="reuse/extend this traffic log instead of a fresh temp one")
    p.add_argument("--reuse-traffic", action="store_true", help="skip step 1 if --traffic-uri has records")
    p.add_argument("--user-turns", type=int, default=1,
                   help="--traffic generate: answer each conversation's first N user turns (each with its history)")
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--max-output-tokens", type=int, default=256)
    p.add_argument("--topk", type=int, default=8, help="target top-k logged per position")
    p.add_argument("--backfill-batch-size", type=int, default=8)
    # drafter design
    p.add_argument("--layers", default=None, help="target layers kept (first2+last1, 0,1,29, ...; default "
                   "first2+last1, or last1 with --feature-drafter)")
    p.add_argument("--feature-drafter", action="store_true",
                   help="derive an EAGLE-style drafter that reads the target's features (draftsmith.models)")
    p.add_argument("--init-drafter", help="start from this drafter directory instead of deriving one "
                   "(--layers and --draft-vocab-size are then ignored)")
    p.add_argument("--layer-parallel", type=int, default=None, metavar="GROUP_SIZE",
                   help="layer-parallel-aware distillation: train the sequential and the grouped forward")
    p.add_argument("--layer-parallel-plan", type=group_sizes_arg, default=(), metavar="SIZES",
                   help="layer-parallel-aware distillation under these consecutive group sizes (e.g. 1,2,2,2,1, "
                   "as served with engine.layer_parallel_group_sizes); overrides --layer-parallel")
    p.add_argument("--draft-vocab-size", type=int, default=None, help="trimmed head size (None: full vocab)")
    _add_algorithm_arguments(p)
    p.add_argument("--max-train-minutes", type=float, default=None,
                   help="stop the in-process training after this long (a compute budget; the steps run are reported)")
    p.add_argument("--no-train-head", action="store_true", help="freeze the final norm and trimmed head")
    p.add_argument("--compare-logged-features", action="store_true",
                   help="log the generated traffic with the target's features, then train twice (reading the "
                   "logged features, recomputing them) and report the training time per record of each "
                   "(needs --feature-drafter, --traffic generate and --in-process)")
    # training backend
    p.add_argument("--in-process", action="store_true", help="train here, no Ray (quick runs)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (> 1 implies Ray)")
    p.add_argument("--strategy", choices=["ddp", "deepspeed"], default="ddp")
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--state-dir", help="Ray Train storage (default: a temp dir)")
    # evaluation
    p.add_argument("--heldout", default="sharegpt", help="held-out prompts: sharegpt | jsonl:PATH")
    p.add_argument("--heldout-n", type=int, default=32, help="held-out prompts")
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--eval-batch-size", type=int, default=8)
    add_engine_option_arguments(p)  # when set, a second "after" evaluation under them (*_after_with_options)
    p.add_argument("--eval-max-prompt-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-drafter", help="write the distilled drafter directory here")
    p.add_argument("--plot", help="write the before/after comparison PNG here")
    args = p.parse_args(argv)
    try:
        args.engine_options = engine_options(args)
    except ValueError as error:
        p.error(str(error))
    if args.max_train_minutes and not args.in_process:
        p.error("--max-train-minutes bounds the in-process loop: add --in-process (Ray Train runs --steps)")
    if args.user_turns < 1:
        p.error(f"--user-turns must be >= 1, got {args.user_turns}")
    if args.workers > 1 and args.in_process:
        p.error("--in-process trains in one process: drop it to use --workers > 1 (Ray Train)")
    if args.compare_logged_features:
        if not args.feature_drafter:
            p.error("--compare-logged-features compares the feature sources of a feature drafter: add "
                    "--feature-drafter")
        if args.traffic != "generate":
            p.error("--compare-logged-features needs traffic logged with features, which only the engine "
                    "produces: add --traffic generate")
        if not args.in_process:
            p.error("--compare-logged-features times the in-process training loop: add --in-process")
        if args.max_train_minutes:
            p.error("--compare-logged-features trains both arms for the same steps: drop --max-train-minutes")
    # the plan layer-parallel-aware training uses: explicit group sizes, a group size, or None
    args.layer_parallel_groups = list(args.layer_parallel_plan) or args.layer_parallel
    args.layers = args.layers or ("last1" if args.feature_drafter else "first2+last1")
    args.drafter_spec = f"{'feature' if args.feature_drafter else 'derived'}:{args.layers}"
    chosen = {name: getattr(args, name) for name in ALGORITHM_FLAGS if getattr(args, name) is not None}
    try:
        args.distill = DistillConfig(**chosen, train_head=not args.no_train_head, seed=args.seed,
                                     layer_parallel_groups=args.layer_parallel_groups)
    except ValueError as error:
        p.error(str(error))
    return args


def make_traffic(args, target, traffic_uri: str) -> tuple[int, bool]:
    """Backfill or generate the train traffic into `traffic_uri`: (records, whether they were reused)."""
    from draftsmith.traffic import scan_traffic
    from pipelines.backfill import backfill, generate_traffic, load_conversations

    if args.reuse_traffic:
        existing = scan_traffic(traffic_uri, target_id=target.model_id, columns=[]).table.num_rows
        if existing:
            logger.info("reusing %d records in %s", existing, traffic_uri)
            return existing, True
    chats = load_conversations(args.source, args.n, args.seed)
    if args.traffic == "backfill":
        return backfill(target, chats, traffic_uri, max_prompt_tokens=args.max_prompt_tokens,
                        max_output_tokens=args.max_output_tokens, topk=args.topk,
                        batch_size=args.backfill_batch_size), False
    from draftsmith.datasets_io import user_turn_prompts

    prompts = [p for c in chats for p in user_turn_prompts(c, args.user_turns)]
    engine = EngineConfig(topk_logprobs=args.topk, max_batch_size=args.backfill_batch_size, seed=args.seed)
    # with the features when they are compared: what Serve logs with traffic.log_features
    return generate_traffic(target, None, prompts, traffic_uri, engine=engine, max_tokens=args.max_output_tokens,
                            max_prompt_tokens=args.max_prompt_tokens,
                            capture_features=args.compare_logged_features), False


class _Progress(TrainCallback):
    """A progress bar, and a stop once the time budget is spent."""

    def __init__(self, bar, budget_minutes: float | None):
        self.bar, self.budget_minutes = bar, budget_minutes
        self.deadline = time.perf_counter() + 60 * budget_minutes if budget_minutes else None

    def before_step(self, step: int) -> bool:
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            logger.info("training budget of %.1f min spent after %d of %d steps", self.budget_minutes, step,
                        self.bar.total)
            return False
        return True

    def after_step(self, step: int, stats: dict) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{stats['loss']:.3f}", top1=f"{stats['top1_match']:.2f}")


def train_in_process(args, drafter, train_dataset, target, *, config: DistillConfig | None = None,
                     logged_features=None, desc: str = "distill") -> tuple[object, dict]:
    """The job's training loop (`draftsmith.distill.train`, the Ray Train worker's), in this process (at the
    torch threads `main` set for the whole run), under `config` (default: the flags'), reading
    `logged_features` (a draftsmith.traffic_features.LoggedFeatures) when given."""
    from tqdm.auto import tqdm

    from draftsmith.distill import DistillStudent, total_steps, train

    config = config or args.distill
    student = DistillStudent.for_config(drafter, config)
    with tqdm(total=total_steps(config, len(train_dataset)), desc=desc, unit="step", file=sys.stderr) as bar:
        result = train(student, train_dataset, config, target_model=target.model,
                       callbacks=[_Progress(bar, args.max_train_minutes)], logged_features=logged_features)
    student.eval()
    stats = result.last_stats
    info = {"steps": result.step, "train_tokens": int(result.tokens_per_worker), "final_loss": stats.get("loss"),
            "final_top1": stats.get("top1_match"), "final_top1_layer_parallel": stats.get("top1_match_layer_parallel"),
            "feature_rows_logged": result.feature_rows_logged,
            "feature_rows_computed": result.feature_rows_computed}
    return student.to_drafter("distilled"), info


# The arms of --compare-logged-features, in the order they run: the job's default (read the features the
# log holds) first, then the target recomputing them (DistillConfig.logged_features off).
FEATURE_ARMS = ("logged_features", "recomputed_features")
TRAIN_WARMUP_STEPS = 1
TRAIN_WARMUP = ("untimed, a throwaway copy of the same drafter first trains {steps} step(s) on the same first "
                "batch with the arm's own feature source ({source}) and its own optimizer and feature cache, "
                "at the same torch threads; the timed run then starts from the unchanged drafter, seed reset")


def compare_feature_sources(args, drafter, train_dataset, target, traffic_uri: str) -> dict[str, dict]:
    """Train `drafter` once per FEATURE_ARMS arm, alike but for where the target's features come from, and
    time each: {arm: {"drafter", "info", "seconds", "index_seconds", "logged_feature_records", ...}}.

    The logged arm's seconds include indexing the side files (LoggedFeatures.index reads their footers):
    that is part of what reading logged features costs. Everything else (the data, its order, the steps,
    the start drafter, the threads) is the same in both arms.
    """
    import torch

    from draftsmith.traffic_features import LoggedFeatures

    request_ids = list(train_dataset["request_id"])
    configs = {"logged_features": args.distill.model_copy(update={"logged_features": True}),
               "recomputed_features": args.distill.model_copy(update={"logged_features": False})}
    sources = {"logged_features": lambda: LoggedFeatures.index(traffic_uri, request_ids=request_ids),
               "recomputed_features": lambda: None}
    arms = {}
    for arm in FEATURE_ARMS:
        config, source = configs[arm], sources[arm]
        warm = config.model_copy(update={"steps": TRAIN_WARMUP_STEPS})
        torch.manual_seed(config.seed)
        train_in_process(args, drafter, train_dataset, target, config=warm, logged_features=source(),
                         desc=f"warm-up {arm}")
        torch.manual_seed(config.seed)
        t0 = time.perf_counter()
        logged = source()
        index_seconds = time.perf_counter() - t0
        if logged is not None and len(logged) < len(request_ids):  # e.g. a reused log written without features
            logger.warning("only %d of %d training records have logged features: the logged arm recomputes the "
                           "others, so it does not measure reading the log alone", len(logged), len(request_ids))
        trained, info = train_in_process(args, drafter, train_dataset, target, config=config,
                                         logged_features=logged, desc=arm)
        seconds = time.perf_counter() - t0
        arms[arm] = {"drafter": trained, "info": info, "seconds": seconds, "index_seconds": index_seconds,
                     "logged_feature_records": None if logged is None else len(logged),
                     "logged_feature_problems": None if logged is None else len(logged.problems),
                     "rows": info["steps"] * config.batch_size}
        logger.info("%s: %d steps in %.1f s (%d feature rows logged, %d computed)", arm, info["steps"], seconds,
                    info["feature_rows_logged"], info["feature_rows_computed"])
    return arms


def comparison_result(arms: dict[str, dict], after, records: int, batch_size: int, explicit_schedule: bool) -> dict:
    """The JSON fields of --compare-logged-features: each arm's training time (total and per record trained),
    the speedup, its feature rows by source, and its held-out figures from the `after` evaluation."""
    logged, recomputed = arms["logged_features"], arms["recomputed_features"]
    per_record = {arm: a["seconds"] / a["rows"] if a["rows"] else 0.0 for arm, a in arms.items()}
    steps = logged["info"]["steps"]
    out = {
        "train_seconds_logged_features": logged["seconds"],
        "train_seconds_recomputed_features": recomputed["seconds"],
        "train_seconds_per_record_logged": per_record["logged_features"],
        "train_seconds_per_record_recomputed": per_record["recomputed_features"],
        "logged_features_speedup": (per_record["recomputed_features"] / per_record["logged_features"]
                                    if per_record["logged_features"] else 0.0),
        "logged_features_index_seconds": logged["index_seconds"],
        "logged_feature_records": logged["logged_feature_records"],
        "logged_feature_problems": logged["logged_feature_problems"],
        "logged_features_comparison": {
            "order": list(FEATURE_ARMS), "steps": steps, "batch_size": batch_size,
            "records_trained_per_arm": logged["rows"], "train_records": records,
            "epochs": round(logged["rows"] / records, 3) if records else 0.0,
            "schedule": ("as given (--steps / --epochs)" if explicit_schedule else
                         "one epoch (default): every record is seen about once, since train() keeps "
                         "recomputed features per record (TargetFeatureCache) and later epochs would cost "
                         "the recomputed arm no target forward"),
            "per_record": "an arm's wall seconds (train(), the logged arm's side-file index included) / "
                          "records trained (steps x batch_size)",
        },
    }
    names = {"logged_features": "after", "recomputed_features": "after_recomputed_features"}
    for arm, a in arms.items():
        m = after.get(names[arm])
        out.update({
            f"feature_rows_logged_{arm}": a["info"]["feature_rows_logged"],
            f"feature_rows_computed_{arm}": a["info"]["feature_rows_computed"],
            f"final_loss_{arm}": a["info"]["final_loss"], f"final_top1_{arm}": a["info"]["final_top1"],
            f"token_acceptance_after_{arm}": m.token_acceptance,
            f"acceptance_rate_after_{arm}": m.acceptance_rate,
            f"mean_accepted_length_after_{arm}": m.mean_accepted_length,
            f"speculative_tok_s_after_{arm}": m.tok_s,
            f"speedup_after_{arm}": after.speedup(names[arm]),
        })
    return out


def comparison_table(result: dict) -> str:
    """The --compare-logged-features figures as a short table (stderr)."""
    c = result["logged_features_comparison"]
    lines = [f"training from logged vs recomputed target features ({c['steps']} steps, {c['records_trained_per_arm']}"
             f" records trained per arm, {c['epochs']} epoch(s) of {c['train_records']} records):",
             f"{'arm':<22}{'train s':>9}{'s/record':>10}{'rows logged':>13}{'rows computed':>15}"
             f"{'token acc':>11}{'tok/s':>8}"]
    per_record = {"logged_features": result["train_seconds_per_record_logged"],
                  "recomputed_features": result["train_seconds_per_record_recomputed"]}
    for arm in FEATURE_ARMS:
        lines.append(f"{arm:<22}{result[f'train_seconds_{arm}']:>9.1f}{per_record[arm]:>10.3f}"
                     f"{result[f'feature_rows_logged_{arm}']:>13d}{result[f'feature_rows_computed_{arm}']:>15d}"
                     f"{result[f'token_acceptance_after_{arm}']:>11.3f}"
                     f"{result[f'speculative_tok_s_after_{arm}']:>8.1f}")
    lines.append(f"speedup per record (recomputed / logged): {result['logged_features_speedup']:.2f}x")
    return "\n".join(lines)


def train_with_ray(args, traffic_uri: str, state_dir: str, target) -> tuple[object, dict]:
    """Distill through the job's entry point (`python -m jobs.distill`, Ray Train) with a config written here."""
    from draftsmith.models import load_drafter

    job = {"traffic_uri": traffic_uri, "heldout_fraction": 0.0, "target": args.target,
           "drafter": args.init_drafter or args.drafter_spec, "draft_vocab_size": args.draft_vocab_size,
           "train": args.distill.model_dump(mode="json"), "num_workers": args.workers, "strategy": args.strategy,
           "torch_threads": args.torch_threads, "state_dir": state_dir, "tracking_uri": None,
           "register_challenger": False}
    path = Path(state_dir) / "bench-distill-job.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    completed = subprocess.run([sys.executable, "-m", "jobs.distill", "--config", str(path)], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, text=True, check=True)
    m = json.loads([line for line in completed.stdout.splitlines() if line.startswith("{")][-1])
    drafter = load_drafter(m["drafter_dir"], target, version="distilled")
    tokens = m.get("train_tokens", m.get("train_output_tokens", 0))
    return drafter, {"steps": m.get("step"), "train_tokens": int(tokens), "final_loss": m.get("loss"),
                     "final_top1": m.get("top1_match"), "ray_metrics": m}


def _options_result(options: dict, report, autoregressive) -> dict:
    """The distilled drafter's figures under those engine options (empty when not measured)."""
    if report is None:
        return {}
    m = report.get("after+options")
    return {"engine_options": options, "token_acceptance_after_with_options": m.token_acceptance,
            "acceptance_rate_after_with_options": m.acceptance_rate,
            "mean_accepted_length_after_with_options": m.mean_accepted_length,
            "speculative_tok_s_after_with_options": m.tok_s,
            "speedup_after_with_options": m.tok_s / autoregressive.tok_s if autoregressive.tok_s else 0.0}


def measured_costs(target, drafter, *, rows: int, gamma: int, context: int) -> dict:
    """The cost ratios c (one drafter step / one target step) and v (verifying gamma + 1 tokens / one target
    step), measured as median forward times at `rows` rows (the evaluation's batch) and `context` cached
    positions, on the runners evaluation decodes with (draftsmith.cost_profile, the speculation policy's own
    measurement)."""
    from draftsmith.cost_profile import drafter_curve, target_curve
    from draftsmith.specdec import runner_for

    target_seconds = target_curve(runner_for(target.model), max_rows=rows, max_tokens=gamma + 1, context=context)
    drafter_seconds = drafter_curve(runner_for(None, drafter), max_rows=rows, context=context)
    step, verify, draft = target_seconds(rows), target_seconds(rows * (gamma + 1)), drafter_seconds(rows)
    return {"cost_batch_size": rows, "cost_context": context, "target_step_ms": 1e3 * step,
            "verify_ms": 1e3 * verify, "drafter_step_ms": 1e3 * draft, "cost_ratio": draft / step,
            "verify_cost_ratio": verify / step}


# How each arm is warmed up (draftsmith.evaluation warms every engine it builds alike) and what each figure
# measures: the `warmup` and `measures` objects of the JSON.
WARMUP = ("its own engine decodes the first held-out prompt once (up to 8 new tokens, greedy), untimed, "
          "before it is timed, at the same torch threads as every other arm")
MEASURES = {
    "tok_s": "end to end: output tokens / wall seconds of an arm decoding every held-out prompt in the engine "
             "at eval batch size (prefill included)",
    "speedup": "end to end: an arm's tok_s / autoregressive_tok_s (same prompts, engine, batch, threads)",
    "costs": "decode phase: median forward times at cost_batch_size rows and cost_context cached positions",
    "predicted_speedup": "decode phase only (Leviathan's model with the measured c and v): compare with the "
                         "end-to-end speedups knowing they also carry the prefill",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    import torch

    from draftsmith.bench_decode import leviathan
    from draftsmith.datasets_io import load_prompt_source
    from draftsmith.evaluation import evaluate_drafters, plot_comparison, prompts_from_messages
    from draftsmith.models import derive_from_spec, frequent_token_ids, load_drafter, load_model, save_drafter
    from draftsmith.distill_data import build_distill_dataset

    torch.manual_seed(args.seed)
    if args.torch_threads:  # every evaluation (before, after, autoregressive) and in-process training alike
        torch.set_num_threads(args.torch_threads)
    started = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="draftsmith-bench-distill-")
    traffic_uri = args.traffic_uri or str(Path(tmp.name) / "traffic")
    target = load_model(args.target, device=args.device)
    logger.info("target %s (%s), %d layers", target.model_id, target.revision,
                target.model.config.num_hidden_layers)

    t0 = time.perf_counter()
    records, reused = make_traffic(args, target, traffic_uri)
    traffic_seconds = time.perf_counter() - t0
    logger.info("%s: %d records in %.1f s", args.traffic, records, traffic_seconds)
    data = build_distill_dataset(traffic_uri, target_id=target.model_id, target_revision=target.revision,
                                 tokenizer_hash=target.tokenizer_hash, heldout_fraction=0.0)
    if len(data.train) == 0:
        raise SystemExit("no training records: check --source / --n")

    vocab = None
    if args.draft_vocab_size and not args.init_drafter:
        vocab = frequent_token_ids(data.train["output_token_ids"], args.draft_vocab_size,
                                   always=target.eos_token_ids)
    if args.init_drafter:
        drafter = load_drafter(args.init_drafter, target, version="init")
    else:
        drafter = derive_from_spec(target, args.drafter_spec, draft_vocab_ids=vocab)
    messages = load_prompt_source(args.heldout, args.heldout_n, split="heldout")
    prompts = prompts_from_messages(target.tokenizer, messages, args.eval_max_prompt_tokens)
    logger.info("held-out: %d prompts from %s (%d tokens)", len(prompts), args.heldout,
                sum(map(len, prompts)))
    engine = EngineConfig(num_speculative_tokens=args.gamma, max_batch_size=args.eval_batch_size, seed=args.seed)
    eval_kw = dict(engine=engine, max_new_tokens=args.max_new_tokens, temperatures=(0.0,))
    threads = {"before": torch.get_num_threads()}
    before = evaluate_drafters(target, {"before": drafter}, prompts, measure_autoregressive=False, **eval_kw)
    logger.info("before distillation:\n%s", before.table())

    t0 = time.perf_counter()
    use_ray = not args.in_process
    arms = None  # --compare-logged-features: each arm's trained drafter and figures
    if use_ray:
        state_dir = args.state_dir or str(Path(tmp.name) / "state")
        trained, train_info = train_with_ray(args, traffic_uri, state_dir, target)
    elif args.compare_logged_features:
        threads.update({f"train_{arm}": torch.get_num_threads() for arm in FEATURE_ARMS})
        arms = compare_feature_sources(args, drafter, data.train, target, traffic_uri)
        # the job's default (logged features) is "the" distilled drafter of the rest of the JSON
        trained, train_info = arms["logged_features"]["drafter"], arms["logged_features"]["info"]
    else:
        trained, train_info = train_in_process(args, drafter, data.train, target)
    train_seconds = time.perf_counter() - t0 if arms is None else arms["logged_features"]["seconds"]
    logger.info("distilled in %.1f s (%s)", train_seconds, "Ray Train" if use_ray else "in process")

    threads["after"] = torch.get_num_threads()
    after_arms = {"after": trained}
    if arms is not None:
        threads["after_recomputed_features"] = torch.get_num_threads()
        after_arms["after_recomputed_features"] = arms["recomputed_features"]["drafter"]
    after = evaluate_drafters(target, after_arms, prompts, **eval_kw)
    logger.info("after distillation:\n%s", after.table())
    options, with_options = args.engine_options, None
    if options:
        threads["after_with_options"] = torch.get_num_threads()
        with_options = evaluate_drafters(target, {"after+options": trained}, prompts, measure_autoregressive=False,
                                         **{**eval_kw, "engine": engine.model_copy(update=options)})
        logger.info("after distillation, with %s:\n%s", options, with_options.table())
    if args.save_drafter:
        save_drafter(trained, Path(args.save_drafter), target.tokenizer)
    if args.plot:
        after.drafters["before"] = before.drafters["before"]
        plot_comparison(after, args.plot, names=["before", "after"])
        del after.drafters["before"]

    b, a, ar = before.get("before"), after.get("after"), after.autoregressive[0.0]
    draft_params = sum(p.numel() for p in trained.model.model.layers.parameters())
    draft_params += 0 if trained.feature_fc is None else trained.feature_fc.numel()
    target_params = sum(p.numel() for p in target.model.model.layers.parameters())
    vocab_size = target.model.config.vocab_size
    head = trained.head_token_ids.numel() if trained.head_token_ids is not None else vocab_size
    # Parameters touched per token (decoder layers + head rows), kept for reference only: predictions use the
    # measured costs below.
    hidden = target.model.config.hidden_size
    cost_ratio_params = (draft_params + head * hidden) / (target_params + vocab_size * hidden)
    costs = measured_costs(target, trained, rows=min(args.eval_batch_size, len(prompts)), gamma=args.gamma,
                           context=int(statistics.median(map(len, prompts))) + args.max_new_tokens // 2)
    c, v = costs["cost_ratio"], costs["verify_cost_ratio"]
    result = {
        "target": target.model_id, "device": args.device, "traffic": args.traffic, "traffic_reused": reused,
        "user_turns": args.user_turns if args.traffic == "generate" and not reused else None, "records": records,
        "train_records": len(data.train), "train_tokens": train_info["train_tokens"],
        "traffic_seconds": round(traffic_seconds, 2), "train_seconds": round(train_seconds, 2),
        "train_backend": f"ray_train({args.workers}x{args.strategy})" if use_ray else "in_process",
        "steps": train_info["steps"], "final_loss": train_info["final_loss"],
        "final_top1": train_info.get("final_top1"), "final_top1_layer_parallel": train_info.get("final_top1_layer_parallel"),
        "layers": drafter.meta.get("layers"), "drafter_kind": trained.meta.get("kind"),
        "init_drafter": args.init_drafter,
        "layer_parallel_training": args.layer_parallel_groups,
        "draft_vocab_size": None if trained.head_token_ids is None else trained.head_token_ids.numel(),
        "loss": args.distill.loss,
        "lr": args.distill.lr, "gamma": args.gamma, "heldout": args.heldout, "heldout_prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "token_acceptance_before": b.token_acceptance, "token_acceptance_after": a.token_acceptance,
        "acceptance_rate_before": b.acceptance_rate, "acceptance_rate_after": a.acceptance_rate,
        "mean_accepted_length_before": b.mean_accepted_length,
        "mean_accepted_length_after": a.mean_accepted_length,
        "speculative_tok_s_before": b.tok_s, "speculative_tok_s_after": a.tok_s,
        "autoregressive_tok_s": ar.tok_s,
        "speedup_before": b.tok_s / ar.tok_s if ar.tok_s else 0.0, "speedup_after": after.speedup("after"),
        **_options_result(options, with_options, ar),
        "cost_ratio_params": cost_ratio_params, **costs,
        "predicted_speedup_leviathan": leviathan(a.token_acceptance, args.gamma, c)[1],
        "predicted_speedup_measured_v": leviathan(a.token_acceptance, args.gamma, c, v)[1],
        "torch_threads": threads, "eval_batch_size": args.eval_batch_size,
        "warmup": {arm: WARMUP for arm in ("before", "after", "autoregressive", *(["after_with_options"] if options
                                                                                  else []))},
        "measures": MEASURES,
        "compare_logged_features": args.compare_logged_features,
    }
    if arms is not None:
        result.update(comparison_result(arms, after, len(data.train), args.distill.batch_size,
                                        explicit_schedule=args.steps is not None or args.epochs is not None))
        result["warmup"].update({
            "after_recomputed_features": WARMUP,
            "train_logged_features": TRAIN_WARMUP.format(steps=TRAIN_WARMUP_STEPS,
                                                         source="reading the logged features"),
            "train_recomputed_features": TRAIN_WARMUP.format(steps=TRAIN_WARMUP_STEPS,
                                                             source="the target's forward")})
        logger.info("%s", comparison_table(result))
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    result = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    tmp.cleanup()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
