"""Ray job entry point: force a promotion or roll back the champion (no evaluation, no gate).

    ray job submit -- python -m jobs.promote --version 7
    ray job submit -- python -m jobs.promote --rollback

A thin wrapper over `DrafterRegistry.promote` / `.rollback`; the gated path is jobs/evaluate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from draftsmith.registry import DEFAULT_MODEL_NAME, DrafterRegistry, RegistryError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.promote", description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--version", help="make this version the champion")
    what.add_argument("--rollback", action="store_true", help="move champion back to the previous champion")
    parser.add_argument("--tracking-uri",
                        default=os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"))
    parser.add_argument("--registry-uri", default=os.environ.get("MLFLOW_REGISTRY_URI"))
    parser.add_argument("--model-name", default=DEFAULT_MODEL_NAME)
    parser.add_argument("--reason", default="forced by jobs.promote")
    args = parser.parse_args(argv)
    registry = DrafterRegistry(args.tracking_uri, args.registry_uri, model_name=args.model_name)
    try:
        v = registry.rollback() if args.rollback else registry.promote(args.version, reason=args.reason)
    except RegistryError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    action = "rollback" if args.rollback else "promote"
    print(json.dumps({"champion": v.version, "model_name": v.name, "action": action}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
