"""The continuous loop's trigger: decide when to distill a new drafter and submit the job to Ray.

    python -m pipelines.trigger --config infra/trigger.yaml [--once]

What it does: reads a few signals — traffic records logged since the last training, the acceptance
the champion actually gets on recent served traffic versus its evaluated held-out acceptance
(drift), the serving load (spare compute), the time since the last submission and whether that job
still runs — and decides. `DistillTrigger.decide(now)` is a pure policy over those readings (the
readers are injected, so tests fake them); `maybe_submit()` submits
`python -m jobs.distill --config ... && python -m jobs.evaluate --config ...` as ONE Ray job through
the Jobs API (`JobSubmissionClient`), with the resources from config and the repo as `working_dir`,
so the distillation runs on the cluster under Ray's accounting, never inside this process.

What it does not do: train, evaluate or promote (the jobs do), or reserve serving's resources (the
Serve config does; the job asks only for what `entrypoint_num_cpus`/`entrypoint_resources` and the
distill config's ScalingConfig say).

State (`state_file`, JSON): the last submission's time, job id, and the traffic time it covered up to
(`traffic_until`), the `since=` of the next record count. Without a state file the latest registry
version's `traffic_until` tag (set by jobs.distill; ISO time) gives it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

UTC = dt.timezone.utc
REPO_ROOT = Path(__file__).resolve().parents[1]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class TriggerConfig(BaseModel):
    """Policy, inputs and job submission settings of the trigger."""

    model_config = ConfigDict(extra="forbid")

    # -- where things are
    ray_address: str = Field("http://127.0.0.1:8265", description="Ray dashboard (Jobs API) address.")
    traffic_uri: str = Field(".state/traffic", description="Traffic log URI (local path, s3://, ...).")
    target_id: str | None = Field(None, description="Count only this target's records (None: all).")
    tracking_uri: str | None = Field(None, description="MLflow server; used for the champion's held-out "
                                                        "acceptance and the last traffic window.")
    model_name: str = Field("draftsmith-drafter", description="Registered drafter model.")
    state_file: str = Field(".state/trigger.json", description="The trigger's own small state file.")
    # -- policy
    min_new_records: int = Field(1000, ge=1, description="Distill once this many records arrived since the "
                                                          "last training.")
    drift_threshold: float | None = Field(
        0.05, description="Also distill when served acceptance rate is below the champion's evaluated "
                          "held-out acceptance rate by at least this (None: off).")
    drift_window_minutes: float = Field(60.0, gt=0, description="Served traffic window for drift.")
    drift_min_records: int = Field(50, ge=1, description="Served records needed for a drift reading.")
    drift_min_new_records: int = Field(100, ge=0, description="New records needed to act on drift.")
    drift_greedy_only: bool = Field(True, description="Compare greedy served requests only (the held-out "
                                                      "headline metric is greedy).")
    max_serving_load: float | None = Field(
        1.0, description="Submit only while serving load (ongoing requests per SpecPair replica, "
                         "serve.load.serving_load) is below this (None: ignore load).")
    ray_cluster_address: str | None = Field(
        "auto", description="GCS address the load reader connects to (`auto` on a cluster node; None: never "
                            "connect, load unknown).")
    min_interval_minutes: float = Field(30.0, ge=0, description="Minimum time between two submissions.")
    poll_seconds: float = Field(300.0, gt=0, description="Loop period of `main` without --once.")
    # -- the job
    python: str = Field("python", description="Interpreter on the cluster that runs the entry points.")
    distill_config: str | None = Field("infra/distill.yaml", description="jobs.distill config (None: skip).")
    evaluate_config: str | None = Field("infra/evaluate.yaml", description="jobs.evaluate config (None: skip).")
    entrypoint_num_cpus: float = Field(1.0, ge=0, description="CPUs reserved for the job's driver.")
    entrypoint_num_gpus: float = Field(0.0, ge=0, description="GPUs reserved for the job's driver.")
    entrypoint_resources: dict[str, float] = Field(default_factory=dict, description="Custom resources "
                                                   "for the driver (e.g. {'distill_slot': 1}).")
    working_dir: str = Field(str(REPO_ROOT), description="Uploaded as the job's runtime_env working_dir.")
    excludes: list[str] = Field(default_factory=lambda: [".venv", ".state", ".git", "**/__pycache__",
                                                         "*.egg-info", ".pytest_cache", ".ci", "notes"],
                                description="Paths left out of the working_dir upload.")
    env_vars: dict[str, str] = Field(default_factory=dict, description="Environment of the job.")
    job_timeout_s: float = Field(4 * 3600.0, gt=0, description="wait() gives up after this long.")


@dataclasses.dataclass(frozen=True)
class Readings:
    """Everything decide() looks at; produced by the readers, or built by hand in tests."""

    records_since_last: int
    last_training_until: dt.datetime | None
    last_submit_at: dt.datetime | None
    running_job: str | None
    served_acceptance: float | None  # recent served acceptance rate (None: too few records)
    served_records: int
    champion_heldout: float | None  # the champion's evaluated held-out acceptance rate
    serving_load: float | None  # ongoing requests per SpecPair replica (serve.load), None when unknown


@dataclasses.dataclass(frozen=True)
class Decision:
    submit: bool
    reason: str
    readings: Readings | None = None


def decide_from(r: Readings, cfg: TriggerConfig, now: dt.datetime) -> Decision:
    """The policy, a pure function: hold-offs first (running job, interval, load), then the reasons to go."""
    if r.running_job:
        return Decision(False, f"job {r.running_job} is still running", r)
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
    drifted = (cfg.drift_threshold is not None and r.served_acceptance is not None
               and r.champion_heldout is not None
               and r.served_acceptance <= r.champion_heldout - cfg.drift_threshold)
    if drifted:
        if r.records_since_last >= cfg.drift_min_new_records:
            return Decision(True, f"acceptance drift: served {r.served_acceptance:.3f} over "
                                  f"{r.served_records} "
                                  f"records vs champion held-out {r.champion_heldout:.3f} "
                                  f"(threshold {cfg.drift_threshold}); {r.records_since_last} new records", r)
        return Decision(False, f"acceptance drifted ({r.served_acceptance:.3f} vs "
                               f"{r.champion_heldout:.3f}) but "
                               f"only {r.records_since_last} new records (< {cfg.drift_min_new_records})", r)
    return Decision(False, f"{r.records_since_last} new records (< {cfg.min_new_records}), no drift", r)


# ---------------------------------------------------------------------------------------------- readers


def _parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


class TriggerState:
    """The small JSON state file (last submission, its job id, the traffic time it covered)."""

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
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str))
        tmp.replace(self.path)


@dataclasses.dataclass
class Readers:
    """Injectable readers; each returns one input of the policy. Defaults read the real systems."""

    count_records: Callable[[dt.datetime | None], int]
    served_acceptance: Callable[[dt.datetime], tuple[float | None, int]]
    champion_heldout: Callable[[], float | None]
    serving_load: Callable[[], float | None]
    registry_traffic_until: Callable[[], dt.datetime | None]
    job_status: Callable[[str], str]


def default_readers(cfg: TriggerConfig, client_factory: Callable[[], object]) -> Readers:
    from draftsmith.traffic import scan_traffic

    def count_records(since):
        return scan_traffic(cfg.traffic_uri, since=since, target_id=cfg.target_id).table.num_rows

    def served_acceptance(since):
        import pyarrow.compute as pc

        table = scan_traffic(cfg.traffic_uri, since=since, target_id=cfg.target_id).table
        mask = pc.and_(pc.equal(table["source"], "served"), pc.greater(table["drafted"], 0))
        if cfg.drift_greedy_only:
            mask = pc.and_(mask, pc.equal(table["temperature"], 0.0))
        table = table.filter(mask)
        if table.num_rows < cfg.drift_min_records:
            return None, table.num_rows
        drafted = pc.sum(table["drafted"]).as_py()
        return pc.sum(table["accepted"]).as_py() / drafted, table.num_rows

    def registry():
        from draftsmith.registry import DrafterRegistry

        return DrafterRegistry(cfg.tracking_uri, model_name=cfg.model_name) if cfg.tracking_uri else None

    def champion_heldout():
        reg = registry()
        champion = reg and reg.get_version_by_alias("champion")
        return champion.metrics.get("heldout_acceptance_rate") if champion else None

    def registry_traffic_until():
        reg = registry()
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

    def job_status(job_id):
        return str(client_factory().get_job_status(job_id)).rsplit(".", 1)[-1]

    return Readers(count_records, served_acceptance, champion_heldout,
                   lambda: read_serving_load(cfg.ray_cluster_address), registry_traffic_until, job_status)


def read_serving_load(address: str | None = "auto") -> float | None:
    """Ongoing requests per SpecPair replica (serve.load.serving_load); None when it cannot be read."""
    try:
        import ray

        from serve.load import serving_load
    except ImportError:
        return None
    try:
        if not ray.is_initialized():
            if address is None:
                return None
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


class DistillTrigger:
    """Decides and submits. `client_factory` returns a `JobSubmissionClient` (swap it in tests)."""

    def __init__(self, config: TriggerConfig, *, readers: Readers | None = None,
                 client_factory: Callable[[], object] | None = None, state: TriggerState | None = None):
        self.config = config
        self._client = None
        self._client_factory = client_factory or self._default_client
        self.readers = readers or default_readers(config, self.client)
        self.state = state or TriggerState(config.state_file)

    def _default_client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.config.ray_address)

    def client(self):
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def read(self, now: dt.datetime) -> Readings:
        state = self.state.read()
        running = state.get("job_id")
        status = self.readers.job_status(running) if running else None
        # A failed job trained on nothing: its records still count as new.
        key = "previous_traffic_until" if status in ("FAILED", "STOPPED") else "traffic_until"
        until = _parse_time(state.get(key)) or self.readers.registry_traffic_until()
        if status in TERMINAL:
            running = None
        self._last_until = until
        served, served_n = (None, 0)
        if self.config.drift_threshold is not None:
            window = dt.timedelta(minutes=self.config.drift_window_minutes)
            served, served_n = self.readers.served_acceptance(now - window)
        return Readings(
            records_since_last=self.readers.count_records(until),
            last_training_until=until,
            last_submit_at=_parse_time(state.get("submitted_at")),
            running_job=running,
            served_acceptance=served,
            served_records=served_n,
            champion_heldout=None if self.config.drift_threshold is None else self.readers.champion_heldout(),
            serving_load=self.readers.serving_load() if self.config.max_serving_load is not None else None,
        )

    def decide(self, now: dt.datetime | None = None) -> Decision:
        now = now or dt.datetime.now(UTC)
        return decide_from(self.read(now), self.config, now)

    def entrypoint(self) -> str:
        steps = []
        if self.config.distill_config:
            steps.append(f"{self.config.python} -m jobs.distill --config {self.config.distill_config}")
        if self.config.evaluate_config:
            steps.append(f"{self.config.python} -m jobs.evaluate --config {self.config.evaluate_config}")
        if not steps:
            raise ValueError("both distill_config and evaluate_config are None: nothing to submit")
        return " && ".join(steps)

    def submit(self, now: dt.datetime | None = None, reason: str = "") -> str:
        """Submit the distill (+ evaluate) job now; returns its job id and records it in the state file."""
        now = now or dt.datetime.now(UTC)
        cfg = self.config
        runtime_env = {"working_dir": cfg.working_dir, "excludes": list(cfg.excludes)}
        if cfg.env_vars:
            runtime_env["env_vars"] = dict(cfg.env_vars)
        job_id = self.client().submit_job(
            entrypoint=self.entrypoint(),
            submission_id=f"draftsmith-distill-{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}",
            runtime_env=runtime_env,
            entrypoint_num_cpus=cfg.entrypoint_num_cpus,
            entrypoint_num_gpus=cfg.entrypoint_num_gpus,
            entrypoint_resources=dict(cfg.entrypoint_resources) or None,
            metadata={"draftsmith": "distill", "reason": reason[:200]},
        )
        previous = getattr(self, "_last_until", None) or _parse_time(self.state.read().get("traffic_until"))
        self.state.write(job_id=job_id, submitted_at=now.isoformat(), traffic_until=now.isoformat(),
                         previous_traffic_until=previous and previous.isoformat(), reason=reason)
        logger.info("submitted job %s: %s", job_id, reason)
        return job_id

    def maybe_submit(self, now: dt.datetime | None = None) -> str | None:
        """Decide, and submit when the policy says so; returns the job id or None."""
        now = now or dt.datetime.now(UTC)
        decision = self.decide(now)
        logger.info("trigger: %s (%s)", "submit" if decision.submit else "wait", decision.reason)
        return self.submit(now, decision.reason) if decision.submit else None

    def wait(self, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0,
             tail_chars: int = 4000) -> JobOutcome:
        """Poll until the job ends or the timeout; the outcome carries the logs' tail unless it succeeded."""
        start = time.monotonic()
        timeout_s = timeout_s or self.config.job_timeout_s
        status = "PENDING"
        while time.monotonic() - start < timeout_s:
            status = self.readers.job_status(job_id)
            if status in TERMINAL:
                break
            time.sleep(poll_s)
        seconds = time.monotonic() - start
        tail = ""
        if status != "SUCCEEDED":
            try:
                tail = self.client().get_job_logs(job_id)[-tail_chars:]
            except Exception as e:  # noqa: BLE001 - logs are best effort
                tail = f"<logs unavailable: {e}>"
            if status not in TERMINAL:
                status = f"TIMEOUT({status})"
        return JobOutcome(job_id, status, seconds, tail)


def load_config(path: str | Path | None) -> TriggerConfig:
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    return TriggerConfig(**(data or {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.trigger", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML with TriggerConfig fields")
    parser.add_argument("--once", action="store_true", help="one decision (and submission), then exit")
    parser.add_argument("--dry-run", action="store_true", help="print the decision, submit nothing")
    parser.add_argument("--wait", action="store_true", help="with --once: wait for a submitted job to end")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    trigger = DistillTrigger(load_config(args.config))
    while True:
        if args.dry_run:
            decision = trigger.decide()
            print(json.dumps({"submit": decision.submit, "reason": decision.reason}))
            return 0
        job_id = trigger.maybe_submit()
        if args.once:
            result = {"job_id": job_id}
            if job_id and args.wait:
                outcome = trigger.wait(job_id)
                result.update(status=outcome.status, seconds=round(outcome.seconds, 1))
                if outcome.logs_tail:
                    sys.stderr.write(outcome.logs_tail + "\n")
            print(json.dumps(result))
            return 0 if not job_id or not args.wait or result.get("status") == "SUCCEEDED" else 1
        time.sleep(trigger.config.poll_seconds)


if __name__ == "__main__":
    sys.exit(main())
