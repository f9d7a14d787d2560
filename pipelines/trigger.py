"""The continuous loop's trigger: a long-running service that decides when to distill, submits the job to
Ray, and rolls a bad promotion back.

    draftsmith trigger --config infra/trigger.yaml              # the service: polls until SIGTERM / SIGINT
    python -m pipelines.trigger --config infra/trigger.yaml [--once] [--dry-run]

What it does, every `poll_seconds` (`DistillTrigger.poll`): re-reads all its signals (nothing is cached
between polls), then
1. asks Ray the status of the job its state file records, if that job's end was not seen yet;
2. checks the champion for an automatic rollback (`check_rollback`, the rule is `draftsmith.rollback`):
   a version promoted over another is on probation until it has served `rollback_min_requests`
   speculating requests; if its served token acceptance is then below the previous champion's by more
   than `rollback_margin`, the champion alias moves back (`DrafterRegistry.rollback`, which tags both
   versions with the reason and time) and the state file records it, so no version is rolled back twice.
   Replicas follow by themselves: their drafter watcher (serve/drafter_watcher.py) polls the alias.
3. decides whether to distill (`decide_from`, a pure policy over `Readings`) and submits
   `python -m jobs.distill ... && python -m jobs.evaluate ...` as ONE Ray job through the Jobs API
   (`JobSubmissionClient`), with the resources from config and the repo as `working_dir`, so the
   distillation runs on the cluster under Ray's accounting, never inside this process. Each command gets
   `--set` overrides (`job_overrides`): this trigger's `traffic_uri` and the job configs' relative local
   paths (`state_dir`, ...) made absolute, because the job's driver runs in its uploaded copy of the
   working dir, which has no `.state` (the jobs refuse relative local paths there).
The readers are injected (`Readers`), so tests fake traffic, registry, load and the Jobs API.

The signals. Records logged since the last training; drift: the champion's SERVED token acceptance
(accepted / compared draft tokens of the requests its version served in the last
`drift_window_minutes`, at what the speculation policy really drafted; requests it let draft nothing
are not counted as zero acceptance) against its EVALUATED token acceptance at the same settings (the
run metrics `heldout_token_acceptance_greedy` / `_sampled` jobs/evaluate logs, measured with the
serving EngineConfig; with `serving_engine` set, the champion's `heldout_engine` tag must agree with it,
or there is no drift reading), weighted by the served mix of settings (`draftsmith.rollback`); the
serving load (spare compute); the time since the last submission; whether this trigger's job still runs.

Never two jobs at once. The state file records a job BEFORE it is submitted (its submission id is chosen
here), so a crash between submitting and recording cannot lose it; while that job's status is not a
terminal one, nothing else is submitted. A status Ray cannot give now (dashboard down) counts as still
running; a job Ray does not know (a submission that never arrived, or a cluster restarted without its
job history) counts as ended without a result, and its records as not trained on. The end of a job, once
seen, is written to the state file, so a later restart does not need Ray to remember it. One service per
state file: `run` holds an exclusive lock on `<state_file>.lock` (a local lock: keep the state file on a
disk only this service writes).

Process, not a detached Ray actor. This is a plain process supervised like any other service (systemd
`Restart=always`, or a one-replica Kubernetes Deployment with the `Recreate` strategy beside the
RayCluster). A detached actor would run in a Ray worker on whichever node the scheduler picks (the
serving head included); with `num_cpus=0` it would not be accounted, yet still share that node's cores
with Serve, and with a CPU it would take one from serving or need its own placement rule. It would also
die with the cluster, which is exactly when the trigger must notice a lost job, and its restart, upgrade
and logs would be Ray's business instead of the supervisor's. As a process it needs from the cluster only
the Jobs API (HTTP), MLflow (HTTP), the traffic log (a URI) and, for the serving load, a driver
connection to the GCS that reserves nothing; it is scheduled outside Ray, so it can never take Serve's
CPUs; and all it remembers is its state file, so a supervisor may restart it at any time. SIGTERM or
SIGINT ends it cleanly: the current poll finishes, the state file is written, the exit code is 0.

What it does not do: train, evaluate or promote (the jobs do), swap drafters (the replicas do, following
the alias), or reserve serving's resources (the Serve config does; the job asks only for what
`entrypoint_num_cpus`/`entrypoint_resources` and the distill config's ScalingConfig say).

State (`state_file`, JSON): the last submission (`job_id`, `job_state` submitting/submitted,
`submitted_at`, `traffic_until`: the `since=` of the next record count, `previous_traffic_until`),
`job_result` once its end was seen, `rollbacks` and `probation` per version, and the service's last poll,
decision and stop time. Without a state file the latest registry version's `traffic_until` tag (set by
jobs.distill; ISO time) gives the start of the count.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import shlex
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from draftsmith.local_paths import absolute_local, relative_local_path
from draftsmith.rollback import (
    GREEDY,
    RollbackDecision,
    ServedCounts,
    decide_rollback,
    evaluated_figures,
    expected_token_acceptance,
    of_version,
)

logger = logging.getLogger(__name__)

UTC = dt.timezone.utc
REPO_ROOT = Path(__file__).resolve().parents[1]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
MISSING = "MISSING"  # Ray does not know the job (never submitted, or its history is gone)
UNKNOWN = "UNKNOWN"  # Ray could not be asked now: counts as still running
ENDED_WITHOUT_RESULT = ("FAILED", "STOPPED", MISSING)
SUBMIT_RETRY_S, SUBMIT_RETRY_PAUSE_S = 30.0, 2.0  # a fresh cluster's job agent takes a while to accept jobs


class TriggerConfig(BaseModel):
    """Policy, inputs, rollback and job submission settings of the trigger."""

    model_config = ConfigDict(extra="forbid")

    # -- where things are
    ray_address: str = Field("http://127.0.0.1:8265", description="Ray dashboard (Jobs API) address.")
    traffic_uri: str = Field(".state/traffic", description="Traffic log URI (local path, s3://, ...).")
    target_id: str | None = Field(None, description="Count only this target's records (None: all).")
    tracking_uri: str | None = Field(None, description="MLflow server; used for the champion's evaluated "
                                                        "token acceptance, the last traffic window and rollback "
                                                        "(None: none of them).")
    model_name: str = Field("draftsmith-drafter", description="Registered drafter model.")
    champion_alias: str = Field("champion", description="Alias of the drafter serving now (the replicas' "
                                "`models:/<name>@<alias>`): drift reads it, a rollback moves it.")
    state_file: str = Field(".state/trigger.json", description="The trigger's own small state file.")
    # -- policy
    min_new_records: int = Field(1000, ge=1, description="Distill once this many records arrived since the "
                                                          "last training.")
    drift_threshold: float | None = Field(
        0.05, description="Also distill when the champion's served token acceptance (accepted / compared draft "
                          "tokens of the requests it served, at what the policy really drafted) is below its "
                          "evaluated token acceptance at the same settings by at least this (None: off).")
    drift_window_minutes: float = Field(60.0, gt=0, description="Served traffic window for drift.")
    drift_min_records: int = Field(50, ge=1, description="Champion-served requests that speculated (compared at "
                                   "least one draft token) needed for a drift reading.")
    drift_min_new_records: int = Field(100, ge=0, description="New records needed to act on drift.")
    drift_greedy_only: bool = Field(True, description="Compare greedy served requests only against the greedy "
                                                      "evaluated figure (False: every setting evaluation "
                                                      "measures, each against its own figure).")
    serving_engine: dict[str, Any] | None = Field(
        None, description="Engine settings serving runs with (EngineConfig fields; list those that shape drafting, "
                          "e.g. infra/serve.yaml's num_speculative_tokens, auto_max_speculative_tokens, "
                          "max_batch_size, prompt_lookup_max, prompt_lookup_min). When set, drift compares the "
                          "champion's served figure with its evaluated one only if the `heldout_engine` tag "
                          "jobs/evaluate put on the champion has the same values for these fields; on a mismatch "
                          "there is no drift reading, and the reason is logged and kept in the state file "
                          "(`drift_engine`). A champion without the tag is compared as before and noted as "
                          "unverified. None: not checked.")
    max_serving_load: float | None = Field(
        1.0, description="Submit only while serving load (ongoing requests per SpecPair replica, "
                         "serve.load.serving_load) is below this (None: ignore load).")
    ray_cluster_address: str | None = Field(
        "auto", description="GCS address the load reader connects to (`auto` on a cluster node; None: never "
                            "connect, load unknown).")
    min_interval_minutes: float = Field(30.0, ge=0, description="Minimum time between two submissions.")
    poll_seconds: float = Field(300.0, gt=0, description="Period of the service's loop (`draftsmith trigger` "
                                                         "without --once).")
    # -- automatic rollback
    rollback_enabled: bool = Field(True, description="Check every poll whether the champion, if promoted over "
                                   "another version, must be rolled back (needs tracking_uri).")
    rollback_margin: float = Field(0.1, ge=0, le=1, description="Roll back when the new champion's served token "
                                   "acceptance is below the previous champion's, at the same settings, by more "
                                   "than this (absolute).")
    rollback_min_requests: int = Field(50, ge=1, description="Speculating requests the new champion must serve "
                                       "before the verdict (rolled back, or kept for good); also what the previous "
                                       "champion's served figure at a setting needs to be used instead of its "
                                       "evaluated one.")
    rollback_baseline_minutes: float = Field(24 * 60.0, gt=0, description="The previous champion's served "
                                             "traffic read for its figure: this long before the promotion.")
    # -- the job
    python: str = Field("python", description="Interpreter on the cluster that runs the entry points.")
    distill_config: str | None = Field("infra/distill.yaml", description="jobs.distill config (None: skip).")
    evaluate_config: str | None = Field("infra/evaluate.yaml", description="jobs.evaluate config (None: skip).")
    entrypoint_num_cpus: float = Field(1.0, ge=0, description="CPUs reserved for the job's driver.")
    entrypoint_num_gpus: float = Field(0.0, ge=0, description="GPUs reserved for the job's driver.")
    entrypoint_resources: dict[str, float] = Field(default_factory=dict, description="Custom resources "
                                                   "for the driver (e.g. {'draftsmith_spare': 1}: only a node "
                                                   "started with that resource runs it).")
    working_dir: str = Field(str(REPO_ROOT), description="Uploaded as the job's runtime_env working_dir.")
    excludes: list[str] = Field(default_factory=lambda: [".venv", ".state", ".git", "**/__pycache__",
                                                         "*.egg-info", ".pytest_cache", ".ci", "notes"],
                                description="Paths left out of the working_dir upload.")
    env_vars: dict[str, str] = Field(default_factory=dict, description="Environment of the job.")
    job_timeout_s: float = Field(4 * 3600.0, gt=0, description="wait() gives up after this long.")

    @field_validator("serving_engine")
    @classmethod
    def _engine_fields(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from draftsmith.engine_config import EngineConfig

            EngineConfig(**value)  # the engine's own names and rules
        return value


@dataclasses.dataclass(frozen=True)
class Readings:
    """Everything decide() looks at; produced by the readers, or built by hand in tests."""

    records_since_last: int
    last_training_until: dt.datetime | None
    last_submit_at: dt.datetime | None
    running_job: str | None
    served_token_acceptance: float | None  # the champion's, served (None: too few speculating requests)
    served_requests: int  # champion-served requests that speculated, at the compared settings
    champion_token_acceptance: float | None  # the champion's evaluated figure at the same settings and mix
    serving_load: float | None  # ongoing requests per SpecPair replica (serve.load), None when unknown
    job_status: str | None = None  # the recorded job's status (None: no job, or its end was seen before)
    drift_engine: str | None = None  # why the evaluated figure is not comparable, or that it is unverified


@dataclasses.dataclass(frozen=True)
class Decision:
    submit: bool
    reason: str
    readings: Readings | None = None


def decide_from(r: Readings, cfg: TriggerConfig, now: dt.datetime) -> Decision:
    """The policy, a pure function: hold-offs first (running job, interval, load), then the reasons to go."""
    if r.running_job:
        status = f", status {r.job_status}" if r.job_status else ""
        return Decision(False, f"job {r.running_job} is still running{status}", r)
    if r.last_submit_at is not None:
        wait = dt.timedelta(minutes=cfg.min_interval_minutes) - (now - r.last_submit_at)
        if wait > dt.timedelta(0):
            return Decision(False, f"last job submitted {r.last_submit_at:%H:%M:%S}; next allowed in "
                                   f"{wait.total_seconds():.0f} s", r)
    limit = cfg.max_serving_load
    if limit is not None and r.serving_load is not None and r.serving_load >= limit:
        return Decision(False, f"serving load {r.serving_load:.2f} >= {limit:.2f}: no spare compute", r)
    if r.records_since_last >= cfg.min_new_records:
        return Decision(True, f"{r.records_since_last} new records since the last training "
                              f"(>= {cfg.min_new_records})", r)
    drifted = (cfg.drift_threshold is not None and r.served_token_acceptance is not None
               and r.champion_token_acceptance is not None
               and r.served_token_acceptance <= r.champion_token_acceptance - cfg.drift_threshold)
    if drifted:
        figures = (f"served token acceptance {r.served_token_acceptance:.3f} over {r.served_requests} speculating "
                   f"requests vs the champion's evaluated {r.champion_token_acceptance:.3f} at the same settings")
        if r.records_since_last >= cfg.drift_min_new_records:
            return Decision(True, f"acceptance drift: {figures} (threshold {cfg.drift_threshold}); "
                                  f"{r.records_since_last} new records", r)
        return Decision(False, f"acceptance drifted ({figures}) but only {r.records_since_last} new records "
                               f"(< {cfg.drift_min_new_records})", r)
    if r.champion_token_acceptance is None and r.drift_engine:
        return Decision(False, f"{r.records_since_last} new records (< {cfg.min_new_records}); no drift reading: "
                               f"{r.drift_engine}", r)
    return Decision(False, f"{r.records_since_last} new records (< {cfg.min_new_records}), no drift", r)


def engine_mismatch(serving: dict[str, Any] | None, heldout_engine: str | None) -> tuple[bool, str | None]:
    """(comparable, note) for the champion's evaluated figure: whether the `heldout_engine` tag jobs/evaluate put on
    it (compact JSON of the EngineConfig it was measured with) agrees with `serving` (TriggerConfig.serving_engine)
    on every field `serving` names. No expectation: comparable, no note; no tag: comparable, noted unverified."""
    if not serving:
        return True, None
    if not heldout_engine:
        return True, "unverified: the champion has no heldout_engine tag (evaluated before it was recorded)"
    from draftsmith.engine_config import EngineConfig

    expected = EngineConfig(**serving).model_dump(mode="json")
    try:
        evaluated = json.loads(heldout_engine)
    except ValueError:
        return False, f"unreadable heldout_engine tag {heldout_engine[:200]!r}"
    differ = [f"{key} evaluated {evaluated.get(key)!r}, served {expected[key]!r}" for key in sorted(serving)
              if evaluated.get(key) != expected[key]]
    if differ:
        return False, "the champion was evaluated at other engine settings than serving uses: " + "; ".join(differ)
    return True, None


# The job configs' fields that may name a local path, besides traffic_uri (which is the trigger's own): how each is
# read (draftsmith.local_paths.relative_local_path) and its default when the YAML leaves it out. This module never imports
# jobs/ (the layering), so tests/unit/test_trigger.py checks these against DistillJobConfig and EvaluateConfig.
JOB_PATH_FIELDS: dict[str, dict[str, tuple[str, str | None]]] = {
    "distill": {"state_dir": ("dir", ".state"), "output_dir": ("dir", None), "tracking_uri": ("tracking", None),
                "registry_uri": ("tracking", None)},
    "evaluate": {"tracking_uri": ("tracking", "http://127.0.0.1:5000"), "registry_uri": ("tracking", None)},
}


# ---------------------------------------------------------------------------------------------- readers


def _parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


class TriggerState:
    """The small JSON state file, written whole and atomically (temporary file, then rename)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            logger.warning("ignoring unreadable trigger state %s: %s", self.path, e)
            return {}

    def write(self, **values) -> None:
        data = {**self.read(), **values}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str))
        tmp.replace(self.path)

    def update_entry(self, key: str, name: str, value: dict) -> None:
        """Set `state[key][name] = value` (a per-version record), keeping the other entries."""
        entries = dict(self.read().get(key) or {})
        entries[name] = value
        self.write(**{key: entries})


@dataclasses.dataclass
class Readers:
    """Injectable readers; each returns one input, read anew every call. Defaults read the real systems."""

    count_records: Callable[[dt.datetime | None], int]
    # (since, until) -> served counters per (drafter_version, setting label): draftsmith.rollback.served_counts
    served_counts: Callable[[dt.datetime, dt.datetime | None], dict[tuple[str, str], ServedCounts]]
    serving_load: Callable[[], float | None]
    job_status: Callable[[str], str]  # a Ray JobStatus name, MISSING or UNKNOWN
    registry: Callable[[], Any | None]  # a DrafterRegistry (or a fake with its methods); None: no registry


def job_status_of(client, job_id: str) -> str:
    """The job's status name; MISSING when Ray does not know it, UNKNOWN when Ray cannot be asked."""
    try:
        return str(client.get_job_status(job_id)).rsplit(".", 1)[-1]
    except Exception as e:  # noqa: BLE001 - the Jobs API raises RuntimeError for 404s and transport errors alike
        if "does not exist" in str(e) or "404" in str(e):
            return MISSING
        logger.warning("status of job %s unreadable (%s: %s): counting it as still running", job_id,
                       type(e).__name__, e)
        return UNKNOWN


def default_readers(cfg: TriggerConfig, client_factory: Callable[[], object]) -> Readers:
    from draftsmith.rollback import SERVED_COUNT_COLUMNS
    from draftsmith.rollback import served_counts as count_served
    from draftsmith.traffic import scan_traffic

    # Only the columns each reading needs: a poll never reads the records' token ids and text.
    def count_records(since):
        return scan_traffic(cfg.traffic_uri, since=since, target_id=cfg.target_id, columns=[]).table.num_rows

    def served_counts(since, until):
        return count_served(scan_traffic(cfg.traffic_uri, since=since, until=until, target_id=cfg.target_id,
                                         columns=SERVED_COUNT_COLUMNS).table)

    registry_holder: list = []

    def registry():
        if not cfg.tracking_uri:
            return None
        if not registry_holder:  # one client; every call still reads the server anew
            from draftsmith.registry import DrafterRegistry

            registry_holder.append(DrafterRegistry(cfg.tracking_uri, model_name=cfg.model_name))
        return registry_holder[0]

    return Readers(count_records, served_counts, lambda: read_serving_load(cfg.ray_cluster_address),
                   lambda job_id: job_status_of(client_factory(), job_id), registry)


def read_serving_load(address: str | None = "auto") -> float | None:
    """Ongoing requests per SpecPair replica (serve.load.serving_load); None when it cannot be read."""
    if address is None:
        return None
    try:
        import ray

        from serve.load import serving_load
    except ImportError:
        return None
    try:
        if not ray.is_initialized():
            ray.init(address=address, configure_logging=False, log_to_driver=False)
        value = serving_load()
    except Exception as e:  # noqa: BLE001 - an unreadable load must not stop the loop
        logger.warning("serving load unreadable: %s", e)
        return None
    return None if value is None else float(value)


# ---------------------------------------------------------------------------------------------- trigger


@dataclasses.dataclass(frozen=True)
class JobOutcome:
    job_id: str
    status: str
    seconds: float
    logs_tail: str = ""


@dataclasses.dataclass(frozen=True)
class PollOutcome:
    """One poll: the rollback verdict (None: nothing on probation), whether it rolled back, the decision, the job."""

    rollback: RollbackDecision | None
    rolled_back_to: str | None
    decision: Decision
    job_id: str | None

    def as_dict(self) -> dict:
        return {"rollback": self.rollback and self.rollback.as_dict(), "rolled_back_to": self.rolled_back_to,
                "submit": self.decision.submit, "reason": self.decision.reason, "job_id": self.job_id}


class TriggerBusy(RuntimeError):
    """Another trigger service holds this state file."""


class DistillTrigger:
    """Decides, submits and rolls back. `client_factory` returns a `JobSubmissionClient` (swap it in tests)."""

    def __init__(self, config: TriggerConfig, *, readers: Readers | None = None,
                 client_factory: Callable[[], object] | None = None, state: TriggerState | None = None):
        self.config = config
        self._client = None
        self._client_factory = client_factory or self._default_client
        self.readers = readers or default_readers(config, self.client)
        self.state = state or TriggerState(config.state_file)
        self._last_until: dt.datetime | None = None
        self._drift_engine: str | None = None

    def _default_client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.config.ray_address)

    def client(self):
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    # ------------------------------------------------------------------------------- readings

    def _registry(self):
        try:
            return self.readers.registry()
        except Exception as e:  # noqa: BLE001 - no registry this poll; the record count still decides
            logger.warning("registry unavailable: %s", e)
            return None

    def registry_traffic_until(self) -> dt.datetime | None:
        """The newest version's `traffic_until` tag (set by jobs.distill), plus 1 us; None when unknown."""
        reg = self._registry()
        if reg is None:
            return None
        try:
            versions = reg.list_versions()
        except Exception as e:  # noqa: BLE001 - no registered model yet, or the server is down
            logger.info("registry not readable (%s): counting all traffic", e)
            return None
        tags = versions[-1].tags if versions else {}
        # jobs.distill tags `traffic_until`; older versions may carry `traffic_window` = "<start>/<end>".
        until = _parse_time(tags.get("traffic_until") or tags.get("traffic_window", "").rsplit("/", 1)[-1])
        # The tag is the last trained record's time; `since` is inclusive.
        return until + dt.timedelta(microseconds=1) if until else None

    def drift_reading(self, now: dt.datetime) -> tuple[float | None, int, float | None]:
        """(champion's served token acceptance, speculating requests, its evaluated figure at the same settings)."""
        cfg = self.config
        reg = self._registry()
        try:
            champion = reg and reg.get_version_by_alias(cfg.champion_alias)
        except Exception as e:  # noqa: BLE001 - no drift reading this poll
            logger.warning("champion unreadable for drift: %s", e)
            champion = None
        if not champion:
            return None, 0, None
        comparable, self._drift_engine = engine_mismatch(cfg.serving_engine, champion.tags.get("heldout_engine"))
        if not comparable:
            logger.warning("drift: %s", self._drift_engine)
            return None, 0, None
        settings = (GREEDY,) if cfg.drift_greedy_only else None
        served = of_version(self.readers.served_counts(now - dt.timedelta(minutes=cfg.drift_window_minutes), None),
                            champion.version, settings)
        cmp = expected_token_acceptance(served, reference_evaluated=evaluated_figures(champion.metrics))
        n = cmp.served.speculated
        if n < cfg.drift_min_records:
            return None, n, cmp.reference
        return cmp.token_acceptance, n, cmp.reference

    def read(self, now: dt.datetime) -> Readings:
        state = self.state.read()
        job = state.get("job_id")
        result = state.get("job_result")
        status = None
        if job and not result:
            status = self.readers.job_status(job)
            if status in TERMINAL or status == MISSING:
                result = status
        running = job if job and not result else None
        # A job that ended without a result trained on nothing: its records still count as new, unless the
        # registry shows a newer trained window (a job Ray forgot after it registered its drafter).
        if result in ENDED_WITHOUT_RESULT:
            known = [t for t in (_parse_time(state.get("previous_traffic_until")), self.registry_traffic_until()) if t]
            until = max(known) if known else None
        else:
            until = _parse_time(state.get("traffic_until")) or self.registry_traffic_until()
        self._last_until = until
        served, served_n, reference = (None, 0, None)
        self._drift_engine = None
        if self.config.drift_threshold is not None:
            served, served_n, reference = self.drift_reading(now)
        return Readings(
            records_since_last=self.readers.count_records(until),
            last_training_until=until,
            last_submit_at=_parse_time(state.get("submitted_at")),
            running_job=running,
            served_token_acceptance=served,
            served_requests=served_n,
            champion_token_acceptance=reference,
            serving_load=self.readers.serving_load() if self.config.max_serving_load is not None else None,
            job_status=status,
            drift_engine=self._drift_engine,
        )

    def decide(self, now: dt.datetime | None = None) -> Decision:
        now = now or dt.datetime.now(UTC)
        return decide_from(self.read(now), self.config, now)

    # ------------------------------------------------------------------------------- rollback

    def check_rollback(self, now: dt.datetime | None = None) -> tuple[RollbackDecision | None, Any, Any]:
        """The rollback verdict on the champion if it is on probation: (decision, registry, champion), or
        (None, ...) when there is nothing to judge. Reads only; `poll` acts on it."""
        cfg = self.config
        reg = self._registry() if cfg.rollback_enabled else None
        champion = reg and reg.get_version_by_alias(cfg.champion_alias)
        if not champion:
            return None, reg, None
        tags = champion.tags
        previous = tags.get("previous_champion")
        if not previous:
            return None, reg, champion  # the first champion: nothing to go back to
        state = self.state.read()
        if champion.version in (state.get("rollbacks") or {}) or tags.get("rolled_back_at"):
            return None, reg, champion  # rolled back once, promoted again by hand: never rolled back twice
        promoted_at = _parse_time(tags.get("promoted_at")) or champion.created_at
        restored_at = _parse_time(tags.get("restored_at"))
        if restored_at is not None and restored_at >= promoted_at:
            return None, reg, champion  # champion again through a rollback: not a new promotion
        passed = (state.get("probation") or {}).get(champion.version) or {}
        if passed.get("promoted_at") == promoted_at.isoformat():
            return None, reg, champion  # probation passed for this promotion
        baseline_since = promoted_at - dt.timedelta(minutes=cfg.rollback_baseline_minutes)
        new = of_version(self.readers.served_counts(promoted_at, None), champion.version)
        before = of_version(self.readers.served_counts(baseline_since, promoted_at), previous)
        comparison = expected_token_acceptance(new, reference_served=before,
                                               reference_evaluated=evaluated_figures(reg.get_version(previous).metrics),
                                               min_reference_requests=cfg.rollback_min_requests)
        decision = decide_rollback(champion.version, previous, comparison, margin=cfg.rollback_margin,
                                   min_requests=cfg.rollback_min_requests)
        return decision, reg, champion

    def _act_on_rollback(self, decision: RollbackDecision, reg, champion, now: dt.datetime) -> str | None:
        promoted_at = _parse_time(champion.tags.get("promoted_at")) or champion.created_at
        record = {**decision.as_dict(), "promoted_at": promoted_at.isoformat(), "at": now.isoformat()}
        if decision.verdict == "keep":
            self.state.update_entry("probation", champion.version, record)
            try:
                reg.set_tags(champion.version, probation="passed", probation_reason=decision.reason[:500])
            except Exception as e:  # noqa: BLE001 - the state file already holds the verdict
                logger.warning("could not tag v%s's probation: %s", champion.version, e)
            logger.info("rollback check: %s", decision.reason)
            return None
        if not decision.rollback:
            logger.info("rollback check: %s", decision.reason)
            return None
        restored = reg.rollback(alias=self.config.champion_alias, reason=decision.reason,
                                expected_version=champion.version, now=now)
        self.state.update_entry("rollbacks", champion.version, {**record, "restored": restored.version})
        logger.warning("ROLLED BACK %s from v%s to v%s: %s", self.config.champion_alias, champion.version,
                       restored.version, decision.reason)
        return restored.version

    # ------------------------------------------------------------------------------- submission

    def entrypoint(self) -> str:
        """`python -m jobs.distill --config ... && python -m jobs.evaluate --config ...`, each with `--set` overrides
        for the paths it must see as absolute (`job_overrides`)."""
        steps = []
        for job, path in (("distill", self.config.distill_config), ("evaluate", self.config.evaluate_config)):
            if path:
                sets = "".join(f" --set {shlex.quote(item)}" for item in self.job_overrides(job, path))
                steps.append(f"{self.config.python} -m jobs.{job} --config {path}{sets}")
        if not steps:
            raise ValueError("both distill_config and evaluate_config are None: nothing to submit")
        return " && ".join(steps)

    def job_overrides(self, job: str, config_path: str) -> list[str]:
        """`key=value` overrides for one job (`distill` or `evaluate`) of its config at `config_path`.

        A Ray Job's driver runs in its uploaded copy of `working_dir`, which leaves out `.state`, so a relative
        local path there names a temporary copy (the jobs refuse one). Hence: `traffic_uri` is always this
        trigger's own, the log whose records it counted, made absolute when local; and each relative local path
        of the job's config (JOB_PATH_FIELDS: state_dir, output_dir, a file/sqlite tracking or registry URI,
        defaults included) is made absolute against this process's working directory, where it would have
        pointed had the job run here. The config is read relative to `working_dir`, as the job reads it; when it
        cannot be read here (a remote working_dir), only `traffic_uri` is set."""
        items = [f"traffic_uri={absolute_local(self.config.traffic_uri, 'uri')}"]
        path = Path(config_path)
        if not path.is_absolute() and "://" not in self.config.working_dir:
            path = Path(self.config.working_dir) / path
        try:
            data = yaml.safe_load(path.read_text()) or {}
            if not isinstance(data, dict):
                raise yaml.YAMLError(f"its top level is a {type(data).__name__}, not a mapping")
        except (OSError, yaml.YAMLError) as e:
            logger.warning("cannot read the %s config %s here (%s): passing only traffic_uri", job, path, e)
            return items
        for name, (kind, default) in JOB_PATH_FIELDS[job].items():
            value = data.get(name, default)
            if isinstance(value, str) and relative_local_path(value, kind):
                items.append(f"{name}={absolute_local(value, kind)}")
        return items

    def submit(self, now: dt.datetime | None = None, reason: str = "") -> str:
        """Submit the distill (+ evaluate) job now; returns its job id. The state file records the job before
        the Jobs API is called (the submission id is chosen here), so a crash in between cannot lose it."""
        now = now or dt.datetime.now(UTC)
        cfg = self.config
        runtime_env = {"working_dir": cfg.working_dir, "excludes": list(cfg.excludes)}
        if cfg.env_vars:
            runtime_env["env_vars"] = dict(cfg.env_vars)
        submission_id = f"draftsmith-distill-{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        previous = self._last_until or _parse_time(self.state.read().get("traffic_until"))
        self.state.write(job_id=submission_id, job_state="submitting", job_result=None,
                         submitted_at=now.isoformat(), traffic_until=now.isoformat(),
                         previous_traffic_until=previous and previous.isoformat(), reason=reason)
        job_id = self._submit_job(
            entrypoint=self.entrypoint(),
            submission_id=submission_id,
            runtime_env=runtime_env,
            entrypoint_num_cpus=cfg.entrypoint_num_cpus,
            entrypoint_num_gpus=cfg.entrypoint_num_gpus,
            entrypoint_resources=dict(cfg.entrypoint_resources) or None,
            metadata={"draftsmith": "distill", "reason": reason[:200]},
        )
        self.state.write(job_id=job_id, job_state="submitted")
        logger.info("submitted job %s: %s", job_id, reason)
        return job_id

    def _submit_job(self, **kw) -> str:
        """`submit_job`, retried while the Jobs API answers "try again later" (a cluster whose job agent is not up
        yet). The submission id is fixed, so a retry after a lost answer finds the job already there."""
        deadline = time.monotonic() + SUBMIT_RETRY_S
        while True:
            try:
                return self.client().submit_job(**kw)
            except RuntimeError as e:
                if "already exists" in str(e):
                    return kw["submission_id"]
                if "try again later" not in str(e) or time.monotonic() > deadline:
                    raise
                logger.info("Jobs API not ready (%s); retrying", e)
                time.sleep(SUBMIT_RETRY_PAUSE_S)

    def maybe_submit(self, now: dt.datetime | None = None) -> str | None:
        """Decide, and submit when the policy says so; returns the job id or None."""
        now = now or dt.datetime.now(UTC)
        decision = self.decide(now)
        logger.info("trigger: %s (%s)", "submit" if decision.submit else "wait", decision.reason)
        return self.submit(now, decision.reason) if decision.submit else None

    # ------------------------------------------------------------------------------- the service

    def poll(self, now: dt.datetime | None = None) -> PollOutcome:
        """One iteration of the service: check rollback, read every signal, note a job's end, decide, submit."""
        now = now or dt.datetime.now(UTC)
        rollback, restored = None, None
        try:
            rollback, reg, champion = self.check_rollback(now)
            if rollback is not None:
                restored = self._act_on_rollback(rollback, reg, champion, now)
        except Exception as e:  # noqa: BLE001 - a failed check must not stop the distillation decision
            logger.exception("rollback check failed: %s", e)
        readings = self.read(now)  # after the rollback: drift is read on the champion serving from now on
        if readings.job_status in TERMINAL or readings.job_status == MISSING:
            # Remembered, so that neither a later poll nor a restart needs Ray to still know the job.
            self.state.write(job_result=readings.job_status, job_ended_seen_at=now.isoformat())
            logger.info("job %s ended: %s", self.state.read().get("job_id"), readings.job_status)
        decision = decide_from(readings, self.config, now)
        logger.info("trigger: %s (%s)", "submit" if decision.submit else "wait", decision.reason)
        job_id = self.submit(now, decision.reason) if decision.submit else None
        self.state.write(last_poll_at=now.isoformat(), last_decision=decision.reason,
                         last_rollback_check=rollback and rollback.reason, drift_engine=readings.drift_engine)
        return PollOutcome(rollback, restored, decision, job_id)

    def _lock(self):
        import fcntl

        path = self.state.path.with_name(self.state.path.name + ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            handle.close()
            raise TriggerBusy(f"another trigger service holds {path}: one service per state file") from e
        return handle

    def run(self, stop: threading.Event | None = None, *, clock: Callable[[], dt.datetime] | None = None,
            max_polls: int | None = None) -> int:
        """Poll every `poll_seconds` until `stop` is set (SIGTERM/SIGINT in `main`) or `max_polls`; returns the
        number of polls. A failing poll is logged and retried at the next one; the service never dies of it."""
        stop = stop or threading.Event()
        clock = clock or (lambda: dt.datetime.now(UTC))
        lock = self._lock()
        polls = 0
        try:
            self.state.write(service_started_at=clock().isoformat(), service_pid=os.getpid(), stopped_at=None)
            logger.info("trigger service started (poll every %g s, state %s)", self.config.poll_seconds,
                        self.state.path)
            while not stop.is_set():
                try:
                    self.poll(clock())
                except Exception as e:  # noqa: BLE001 - Ray or MLflow down: try again next poll
                    logger.exception("poll failed: %s", e)
                    self.state.write(last_error=f"{clock().isoformat()} {type(e).__name__}: {e}"[:1000])
                polls += 1
                if max_polls is not None and polls >= max_polls:
                    break
                stop.wait(self.config.poll_seconds)
        finally:
            self.state.write(stopped_at=clock().isoformat(), polls=polls)
            lock.close()
            logger.info("trigger service stopped after %d polls", polls)
        return polls

    def wait(self, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0,
             tail_chars: int = 4000) -> JobOutcome:
        """Poll until the job ends or the timeout; the outcome carries the logs' tail unless it succeeded."""
        start = time.monotonic()
        timeout_s = timeout_s or self.config.job_timeout_s
        status = "PENDING"
        while time.monotonic() - start < timeout_s:
            status = self.readers.job_status(job_id)
            if status in TERMINAL or status == MISSING:
                break
            time.sleep(poll_s)
        seconds = time.monotonic() - start
        tail = ""
        if status != "SUCCEEDED":
            try:
                tail = self.client().get_job_logs(job_id)[-tail_chars:]
            except Exception as e:  # noqa: BLE001 - logs are best effort
                tail = f"<logs unavailable: {e}>"
            if status not in TERMINAL and status != MISSING:
                status = f"TIMEOUT({status})"
        return JobOutcome(job_id, status, seconds, tail)


def load_config(path: str | Path | None) -> TriggerConfig:
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    return TriggerConfig(**(data or {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="draftsmith trigger", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML with TriggerConfig fields")
    parser.add_argument("--once", action="store_true", help="one poll (rollback check, decision, submission), "
                                                            "then exit")
    parser.add_argument("--dry-run", action="store_true", help="print the rollback verdict and the decision, act "
                                                               "on neither")
    parser.add_argument("--wait", action="store_true", help="with --once: wait for a submitted job to end")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    trigger = DistillTrigger(load_config(args.config))
    if args.dry_run:
        rollback, _, _ = trigger.check_rollback()
        decision = trigger.decide()
        print(json.dumps({"rollback": rollback and rollback.as_dict(), "submit": decision.submit,
                          "reason": decision.reason}, default=str))
        return 0
    if args.once:
        outcome = trigger.poll()
        result = outcome.as_dict()
        if outcome.job_id and args.wait:
            job = trigger.wait(outcome.job_id)
            result.update(status=job.status, seconds=round(job.seconds, 1))
            if job.logs_tail:
                sys.stderr.write(job.logs_tail + "\n")
        print(json.dumps(result, default=str))
        return 0 if not outcome.job_id or not args.wait or result.get("status") == "SUCCEEDED" else 1
    stop = threading.Event()

    def _stop(signum, frame):  # the poll in progress finishes; run() then writes the state and returns
        logger.info("signal %s: stopping after the current poll", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        trigger.run(stop)
    except TriggerBusy as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
