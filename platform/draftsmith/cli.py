"""The `draftsmith` command line.

Library commands (bench decode, drafter derive, registry) run here. Commands that need Ray (serve,
distill, bench serve, bench distill, demo) live in the Ray-facing packages and are looked up by module
path when called, so that this library never imports Ray.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

RAY_COMMANDS = {
    ("serve",): "serve.app:main",
    ("distill",): "jobs.distill:main",
    ("evaluate",): "jobs.evaluate:main",
    ("promote",): "jobs.promote:main",
    ("trigger",): "pipelines.trigger:main",
    ("backfill",): "pipelines.backfill:main",
    ("bench", "serve"): "pipelines.bench_serve:main",
    ("bench", "distill"): "pipelines.bench_distill:main",
    ("bench", "shift"): "pipelines.bench_shift:main",
    ("demo",): "pipelines.demo:main",
    ("down",): "pipelines.local_services:main",
    ("spare",): "pipelines.local_services:spare_main",
}


def _dispatch(target: str, argv: list[str]) -> int:
    module_name, function = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise SystemExit(f"{module_name} is not importable ({error}); run from the repository root or `make setup`.")
    return int(getattr(module, function)(argv) or 0)


def _derive(args: argparse.Namespace) -> int:
    from draftsmith.bench_decode import build_drafter
    from draftsmith.models import load_model, save_drafter

    target = load_model(args.target)
    drafter = build_drafter(target, f"{'feature' if args.feature else 'derived'}:{args.layers}", args.draft_vocab)
    path = save_drafter(drafter, args.out, tokenizer=target.tokenizer)
    kind = "feature drafter" if args.feature else "drafter"
    print(f"Saved a {drafter.num_layers}-layer {kind} derived from {target.model_id} to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for words, target in RAY_COMMANDS.items():
        if tuple(argv[: len(words)]) == words:
            return _dispatch(target, argv[len(words):])
    if argv[:2] == ["bench", "decode"]:
        from draftsmith import bench_decode

        return bench_decode.main(argv[2:])

    parser = argparse.ArgumentParser(prog="draftsmith", description="Speculative-decoding serving with online drafter distillation.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="the whole loop on the embedded defaults (--quick for this CPU; see "
                                     "pipelines/demo.py)")
    commands.add_parser("down", help="stop the Ray cluster and MLflow server that `demo` left running")
    commands.add_parser("spare", help="join a spare node (resource draftsmith_spare, no CPU) to the local head, "
                                      "where distillation jobs run")
    commands.add_parser("serve", help="run the Serve application locally (see serve/app.py)")
    commands.add_parser("distill", help="run a distillation job (see jobs/distill.py)")
    commands.add_parser("evaluate", help="evaluate a challenger against the champion and apply the gate")
    commands.add_parser("promote", help="force a promotion or roll back (see jobs/promote.py)")
    commands.add_parser("trigger", help="the continuous trigger service: distills when due, rolls back a bad "
                                        "promotion, runs until SIGTERM (--config infra/trigger.yaml; --once, "
                                        "--dry-run; see pipelines/trigger.py)")
    commands.add_parser("backfill", help="score conversation logs into traffic records (see pipelines/backfill.py)")
    bench = commands.add_parser("bench", help="benchmarks: decode | serve | distill | shift")
    bench.add_argument("which", choices=["decode", "serve", "distill", "shift"])
    drafter = commands.add_parser("drafter", help="drafter tools")
    drafter_commands = drafter.add_subparsers(dest="drafter_command", required=True)
    derive = drafter_commands.add_parser("derive", help="save a drafter derived from the target's layers")
    derive.add_argument("--target", default="smollm2-135m-instruct")
    derive.add_argument("--layers", default="first2+last1")
    derive.add_argument("--draft-vocab", type=int, default=0)
    derive.add_argument("--feature", action="store_true", help="an EAGLE-style drafter that reads the target's features")
    derive.add_argument("--out", required=True)
    derive.set_defaults(func=_derive)
    from draftsmith.registry import add_registry_cli

    add_registry_cli(commands)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
