"""The one wrapper around MLflow: drafter versions, aliases, the promotion gate.

What it does: registers a drafter directory as a new version of one registered
model (default ``draftsmith-drafter``), moves the ``champion`` / ``challenger``
aliases (never the deprecated stages), records the promotion gate's decision
(``apply_gate``: the rule itself is ``draftsmith.gate``) and promotes on it,
rolls back, lists, resolves ``models:/`` URIs and downloads a version as a plain
HF directory. Every call goes through one explicit ``MlflowClient(tracking_uri,
registry_uri)``; the global ``mlflow.set_tracking_uri`` state is never touched.

What it does not do: evaluate drafters (jobs/ compute the metrics), load models,
or start a server (``draftsmith.mlflow_server``).

Storage choice. A version is a run whose artifacts hold the drafter directory
as-is under ``drafter/`` (config.json, model.safetensors, tokenizer files,
draftsmith_drafter.json, draft_head.safetensors, feature_fc.safetensors), registered with
``create_model_version(name, source="runs:/<run>/drafter", run_id=run)``. Not
``mlflow.transformers.log_model``: that needs the fluent (global) active-run
state and stores an MLflow-model layout (MLmodel + components) rather than the
directory AutoModelForCausalLM loads, and a trimmed drafter's draft head is not a
transformers component anyway. So there is no MLmodel file and no signature:
``mlflow.pyfunc.load_model`` does not apply, transformers does.
Downloads resolve the version's ``runs:/`` source ourselves and call
``client.download_artifacts``: in mlflow 3.17 ``mlflow.artifacts.download_artifacts(
"models:/...", registry_uri=...)`` ignores the registry_uri argument and looks the
model up in the global default registry (``sqlite:///mlflow.db`` in the cwd).

Metrics and tags. A version's RUN metrics (latest value per key) are logged at
registration and re-logged with ``log_metrics`` when a job re-evaluates it.
Version TAGS hold provenance (target_id, tokenizer_hash, traffic window,
``heldout_since``, loss, parent_version, ...) and the gate's record (``gate``,
``gate_reason``, the test, its p-value and interval, the sample size, both speeds
and acceptances: ``GateDecision.tags``). Every promotion adds ``previous_champion``
(the version it replaced) and ``promoted_at``; a rollback adds ``rolled_back_to``,
``rolled_back_at`` and ``rollback_reason`` to the version rolled back and
``restored_after``, ``restored_at`` and ``rollback_reason`` to the version restored.

Secrets. Params and tags whose key names a secret (token, password, api key...) are stored as
``[redacted]`` (``redact_secrets``): a job config that carries a credential never leaks it to MLflow.

Failures. Registration creates the run, logs, uploads, and creates the version
LAST (with its tags in the same call), then points ``challenger`` at it. On any
error it deletes what it created (best effort) and raises ``RegistryError``, so no
half-registered version remains. HTTP retries are MLflow's own, bounded by the
env vars MLFLOW_HTTP_REQUEST_MAX_RETRIES (default 7, ~4 min against a dead server),
MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR and MLFLOW_HTTP_REQUEST_TIMEOUT.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from draftsmith.gate import GateDecision

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
DEFAULT_MODEL_NAME = "draftsmith-drafter"
DEFAULT_METRIC = "heldout_acceptance_rate"
ARTIFACT_PATH = "drafter"


# Whole name parts only: `auth_token`, `MLFLOW_TRACKING_PASSWORD`, `hf_api_key`, not `max_tokens`.
_SECRET_KEY = re.compile(r"(^|[_\-.])(token|secret|password|passwd|api_?key|credentials?|authorization)($|[_\-.])",
                         re.IGNORECASE)
REDACTED = "[redacted]"


def redact_secrets(values: dict[str, Any]) -> dict[str, Any]:
    """Values whose key names a secret (token, password, api key...) replaced: they never reach MLflow."""
    return {k: (REDACTED if _SECRET_KEY.search(str(k)) and v not in (None, "") else v) for k, v in values.items()}


class RegistryError(RuntimeError):
    """A registry operation failed; the message says what and what to do."""


@dataclass(frozen=True)
class DrafterVersion:
    name: str
    version: str
    aliases: tuple[str, ...]
    tags: dict[str, str] = field(hash=False)
    metrics: dict[str, float] = field(hash=False)
    source: str
    run_id: str | None
    created_at: datetime

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _is_not_found(e: MlflowException) -> bool:
    # mlflow 3.17 reports a missing alias as INVALID_PARAMETER_VALUE ("... alias X not found"),
    # a missing registered model as RESOURCE_DOES_NOT_EXIST.
    return e.error_code == "RESOURCE_DOES_NOT_EXIST" or (
        e.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(e.message)
    )


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/<name>@<alias>`` -> (name, None, alias); ``models:/<name>/<version>`` -> (name, version, None)."""
    if not uri.startswith("models:/"):
        raise RegistryError(f"not a models URI: {uri!r} (expected models:/<name>@<alias> or models:/<name>/<version>)")
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias:
            return name, None, alias
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, version, None
    raise RegistryError(f"cannot parse {uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")


class DrafterRegistry:
    """Drafter versions of one registered model on one MLflow server."""

    def __init__(self, tracking_uri: str, registry_uri: str | None = None,
                 model_name: str = DEFAULT_MODEL_NAME, client: MlflowClient | None = None):
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri or tracking_uri
        self.model_name = model_name
        self.client = client or MlflowClient(tracking_uri=tracking_uri, registry_uri=self.registry_uri)

    # ------------------------------------------------------------ registration

    def register_drafter(
        self,
        drafter_dir: str | Path,
        *,
        experiment: str,
        run_name: str,
        tags: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        params: dict[str, Any] | None = None,
        parent_version: str | None = None,
    ) -> DrafterVersion:
        """Log ``drafter_dir`` as a run, create a version from it (tagged), alias it ``challenger``."""
        drafter_dir = Path(drafter_dir)
        if not (drafter_dir / "config.json").is_file():
            raise RegistryError(f"{drafter_dir} is not a drafter directory (no config.json); save the drafter first")
        tags = {k: str(v) for k, v in redact_secrets(tags or {}).items()}
        params = redact_secrets(params or {})
        if parent_version is not None:
            tags["parent_version"] = str(parent_version)
        run_id = version = None
        try:
            exp_id = self._experiment_id(experiment)
            run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
            now = int(time.time() * 1000)
            self.client.log_batch(
                run_id,
                metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
                params=[Param(k, str(v)) for k, v in (params or {}).items()],
                tags=[RunTag("draftsmith.drafter_dir", str(drafter_dir))],
            )
            self.client.log_artifacts(run_id, str(drafter_dir), ARTIFACT_PATH)
            self.client.set_terminated(run_id)
            self._ensure_registered_model()
            mv = self.client.create_model_version(
                self.model_name, source=f"runs:/{run_id}/{ARTIFACT_PATH}", run_id=run_id, tags=tags,
            )
            version = mv.version
            self.client.set_registered_model_alias(self.model_name, CHALLENGER, version)
        except Exception as e:  # noqa: BLE001 - any failure must roll back, then surface as RegistryError
            self._cleanup(run_id, version)
            raise RegistryError(
                f"registering {drafter_dir} in {self.model_name!r} at {self.tracking_uri} failed: "
                f"{type(e).__name__}: {e}. Nothing was registered; check that the MLflow server is up "
                "(draftsmith up / mlflow server) and retry."
            ) from e
        logger.info("registered %s version %s (run %s)", self.model_name, version, run_id)
        return self.get_version(version)

    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException as e:  # created concurrently
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise e
            return exp.experiment_id

    def _ensure_registered_model(self) -> None:
        try:
            self.client.create_registered_model(self.model_name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    def _cleanup(self, run_id: str | None, version: str | None) -> None:
        for what, fn in (
            (f"version {version}", lambda: version and self.client.delete_model_version(self.model_name, version)),
            (f"run {run_id}", lambda: run_id and self.client.delete_run(run_id)),
        ):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - best effort; the server may be down
                logger.warning("cleanup after failed registration: could not delete %s: %s", what, e)

    def log_metrics(self, version: str, metrics: dict[str, float]) -> None:
        """Record (re-)evaluated metrics for a version on its run (the gate reads the latest)."""
        run_id = self.get_version(version).run_id
        if run_id is None:
            raise RegistryError(f"version {version} has no run to log metrics to")
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])

    # ------------------------------------------------------------ lookups

    def _to_version(self, mv) -> DrafterVersion:
        metrics: dict[str, float] = {}
        if mv.run_id:
            try:
                metrics = dict(self.client.get_run(mv.run_id).data.metrics)
            except MlflowException as e:
                logger.warning("version %s: run %s unreadable: %s", mv.version, mv.run_id, e)
        return DrafterVersion(
            name=mv.name,
            version=str(mv.version),
            aliases=tuple(sorted(mv.aliases or ())),
            tags=dict(mv.tags or {}),
            metrics=metrics,
            source=mv.source,
            run_id=mv.run_id or None,
            created_at=datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=timezone.utc),
        )

    def get_version(self, version: str | int, name: str | None = None) -> DrafterVersion:
        name = name or self.model_name
        try:
            return self._to_version(self.client.get_model_version(name, str(version)))
        except MlflowException as e:
            raise RegistryError(f"no version {version} of {name!r}: {e.message}") from e

    def get_version_by_alias(self, alias: str, name: str | None = None) -> DrafterVersion | None:
        try:
            mv = self.client.get_model_version_by_alias(name or self.model_name, alias)
        except MlflowException as e:
            if _is_not_found(e):
                return None
            raise
        return self._to_version(mv)

    def list_versions(self) -> list[DrafterVersion]:
        mvs = self.client.search_model_versions(f"name = '{self.model_name}'")
        # search results may omit aliases; the registered model has the authoritative map.
        try:
            alias_map = self.client.get_registered_model(self.model_name).aliases
        except MlflowException:
            alias_map = {}
        out = []
        for mv in sorted(mvs, key=lambda m: int(m.version)):
            v = self._to_version(mv)
            aliases = tuple(sorted(a for a, ver in alias_map.items() if str(ver) == v.version))
            out.append(replace(v, aliases=aliases))
        return out

    def resolve(self, uri: str) -> DrafterVersion:
        """``models:/<name>@<alias>``, ``models:/<name>/<version>``, a bare version number or alias."""
        if uri.startswith("models:/"):
            name, version, alias = parse_models_uri(uri)
        elif uri.isdigit():
            name, version, alias = self.model_name, uri, None
        else:
            name, version, alias = self.model_name, None, uri
        if version is not None:
            return self.get_version(version, name)
        found = self.get_version_by_alias(alias, name)
        if found is None:
            raise RegistryError(f"{name!r} has no version with alias {alias!r}; see `draftsmith registry list`")
        return found

    def download(self, version_or_alias: str | int, dst_dir: str | Path) -> Path:
        """Download a version's drafter directory into ``dst_dir``; returns the directory to load."""
        v = self.resolve(str(version_or_alias))
        if not v.source.startswith("runs:/"):
            raise RegistryError(f"version {v.version} has source {v.source!r}; only runs:/ sources are supported")
        run_id, _, path = v.source[len("runs:/"):].partition("/")
        Path(dst_dir).mkdir(parents=True, exist_ok=True)
        try:
            local = self.client.download_artifacts(run_id, path or ARTIFACT_PATH, str(dst_dir))
        except MlflowException as e:
            raise RegistryError(f"downloading version {v.version} ({v.source}) failed: {e.message}") from e
        return Path(local)

    # ------------------------------------------------------------ aliases and the gate

    def set_alias(self, version: str | int, alias: str) -> None:
        self.client.set_registered_model_alias(self.model_name, alias, str(version))

    def _tag(self, version: str, **tags: str) -> None:
        for k, v in tags.items():
            self.client.set_model_version_tag(self.model_name, version, k, v)

    def set_tags(self, version: str | int, **tags: Any) -> None:
        """Set version tags (values as strings; secrets redacted like at registration)."""
        self._tag(str(version), **{k: str(v) for k, v in redact_secrets(tags).items()})

    def promote(self, version: str | int, *, reason: str = "forced", alias: str = CHAMPION,
                now: datetime | None = None) -> DrafterVersion:
        """Make ``version`` the champion (``alias``), remembering the previous one for ``rollback``.

        Every promotion tags the new version with the version it replaced (``previous_champion``) and the
        time (``promoted_at``, ISO UTC): the trigger's automatic rollback compares the new version's served
        traffic since that time against the version it replaced.
        """
        version = str(version)
        target = self.get_version(version)  # fails clearly on an unknown version
        current = self.get_version_by_alias(alias)
        if current is not None and current.version != version:
            self._tag(version, previous_champion=current.version)
        now = now or datetime.now(timezone.utc)
        self._tag(version, gate="promoted", gate_reason=reason, promoted_at=now.isoformat())
        self.set_alias(version, alias)
        if CHALLENGER in target.aliases:
            self.client.delete_registered_model_alias(self.model_name, CHALLENGER)
        logger.info("%s version %s is %s (was %s): %s", self.model_name, version, alias,
                    current.version if current else None, reason)
        return self.get_version(version)

    def apply_gate(self, challenger_version: str | int, decision: GateDecision, *,
                   alias: str = CHAMPION) -> GateDecision:
        """Record the gate's decision on the challenger's tags and promote it to ``alias`` if it passed.

        The decision compared against ``decision.champion_version`` (the alias read once, before
        evaluating); if the alias has moved since, the comparison no longer holds and the challenger is
        refused, never promoted over a champion it was not measured against.
        """
        version = str(challenger_version)
        current = self.get_version_by_alias(alias)
        current_version = current.version if current else None
        if current_version == version:
            decision = replace(decision, promoted=False,
                                           reason=f"version {version} is already {alias}")
        elif current_version != decision.champion_version:
            decision = replace(decision, promoted=False, reason=(
                f"refused: {alias} moved from v{decision.champion_version} to v{current_version} while the "
                f"challenger was evaluated; evaluate again against the new {alias}"))
        self._tag(version, **decision.tags())
        if decision.promoted:
            self.promote(version, reason=decision.reason, alias=alias)
        else:
            self._tag(version, gate="rejected", gate_reason=decision.reason)
            logger.info("gate refused %s version %s: %s", self.model_name, version, decision.reason)
        return decision

    def rollback(self, *, alias: str = CHAMPION, reason: str = "rolled back by hand",
                 expected_version: str | None = None, now: datetime | None = None) -> DrafterVersion:
        """Move ``alias`` back to the version its current one replaced (tag ``previous_champion``).

        ``expected_version``: roll back only if the alias still points there (the version a caller judged),
        else raise. The reason and time go on both versions: on the one rolled back ``gate=rolled_back``,
        ``rolled_back_to``, ``rolled_back_at``, ``rollback_reason``; on the one restored ``restored_after``
        (the version it replaces again), ``restored_at``, ``rollback_reason``. Returns the restored version.
        """
        current = self.get_version_by_alias(alias)
        if current is None:
            raise RegistryError(f"{self.model_name!r} has no {alias} to roll back")
        if expected_version is not None and current.version != str(expected_version):
            raise RegistryError(f"{alias} is v{current.version}, not v{expected_version}: it moved since the "
                                "rollback was decided; nothing rolled back")
        prev = current.tags.get("previous_champion")
        if not prev:
            raise RegistryError(f"{alias} v{current.version} has no previous champion to roll back to")
        self.get_version(prev)  # fails clearly if the previous version was deleted
        at = (now or datetime.now(timezone.utc)).isoformat()
        self.set_alias(prev, alias)
        self._tag(current.version, gate="rolled_back", gate_reason=f"rolled back to v{prev}: {reason}",
                  rolled_back_to=prev, rolled_back_at=at, rollback_reason=reason)
        self._tag(prev, restored_after=current.version, restored_at=at, rollback_reason=reason)
        logger.info("%s: %s rolled back from v%s to v%s: %s", self.model_name, alias, current.version, prev, reason)
        return self.get_version(prev)


# ---------------------------------------------------------------- CLI


def add_registry_cli(subparsers) -> argparse.ArgumentParser:
    """Add ``registry list|promote VERSION|rollback`` to an argparse subparsers object."""
    p = subparsers.add_parser("registry", help="list, promote and roll back drafter versions in MLflow")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"),
                   help="MLflow tracking server (default: $MLFLOW_TRACKING_URI or http://127.0.0.1:5000)")
    p.add_argument("--registry-uri", default=os.environ.get("MLFLOW_REGISTRY_URI"),
                   help="model registry URI (default: the tracking URI)")
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="registered model name")
    sub = p.add_subparsers(dest="registry_command", required=True)
    sub.add_parser("list", help="versions, aliases, acceptance metrics").set_defaults(registry_action=_cli_list)
    promote = sub.add_parser("promote", help="make VERSION the champion (no gate)")
    promote.add_argument("version")
    promote.set_defaults(registry_action=_cli_promote)
    sub.add_parser("rollback", help="move champion back to the previous champion").set_defaults(
        registry_action=_cli_rollback)
    p.set_defaults(func=run_registry_cli)
    return p


def format_versions(versions: list[DrafterVersion]) -> str:
    rows = [("version", "aliases", "acceptance_rate", "token_acceptance", "gate", "created")]
    for v in versions:
        acc = v.metrics.get(DEFAULT_METRIC)
        tok = v.metrics.get("heldout_token_acceptance")
        rows.append((v.version, ",".join(v.aliases) or "-", "-" if acc is None else f"{acc:.4f}",
                     "-" if tok is None else f"{tok:.4f}", v.tags.get("gate", "-"),
                     v.created_at.strftime("%Y-%m-%d %H:%M:%S")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _cli_list(reg: DrafterRegistry, args) -> str:
    return format_versions(reg.list_versions())


def _cli_promote(reg: DrafterRegistry, args) -> str:
    v = reg.promote(args.version)
    return f"{v.name} version {v.version} is now champion"


def _cli_rollback(reg: DrafterRegistry, args) -> str:
    v = reg.rollback()
    return f"{v.name} champion rolled back to version {v.version}"


def run_registry_cli(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    reg = DrafterRegistry(args.tracking_uri, args.registry_uri, model_name=args.model_name)
    try:
        out.write(args.registry_action(reg, args) + "\n")
    except (RegistryError, MlflowException) as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    return 0
