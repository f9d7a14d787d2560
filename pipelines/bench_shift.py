"""`draftsmith bench shift`: the continuous loop on a two-node cluster, following a shift from chat to code traffic.

    draftsmith bench shift --quick          # the CPU size (QUICK below)
    draftsmith bench shift --target tiny --set chat_requests=12 ...   # the integration test's size

What it does, in order:
1. starts a local Ray head that serves, a spare node (resource `draftsmith_spare`, no CPU) where every
   distillation job runs, and an MLflow server (pipelines/local_services.py);
2. registers an untrained drafter derived from the target (`feature:last1` with a trimmed head, like the
   demo) as v1 @champion and deploys the Serve app with prompt lookup, `num_speculative_tokens: auto` and
   `traffic.log_features: true`, so that distillation reads the target features logged while serving;
3. runs the continuous trigger (pipelines/trigger.py, `DistillTrigger.poll` every `poll_seconds` in a thread
   of this process) with `min_new_records` sized to the phases, a recency window of `window_records`
   (about twice `min_new_records`) with replay, automatic rollback on, and no serving-load hold-off (the
   jobs run on the spare node while traffic flows);
4. replays ShareGPT train prompts, logged: a chat phase (conversations with no code anywhere,
   `draftsmith.domains`), then a code phase (conversations whose first exchange is code). Before the first
   request, after every `probe_every` logged requests and at the end, it replays fixed held-out prompts of
   BOTH domains (ShareGPT's held-out split, not logged): these probes are the per-window acceptance and
   tokens/s of each domain. At the switch it lets the loop settle: it waits until no job is in flight (the
   one that learnt chat; one the trigger resubmitted after a failure too) and the champion it left is served,
   so the chat figure at the switch is that of a drafter trained on chat;
5. at the end: lets the trigger poll once more on the whole log, stops it, waits for its job in flight, and
   measures the final champion on both domains ("end"), then with speculation off ("off", the reference of
   the served speedup);
6. trains the OFFLINE drafter: one job on the spare node, on all the code traffic (`since` = the switch,
   `window.window_records: null`, nothing held out), with the same number of steps as each online job, from
   the champion at the switch (`offline_from: switch`; `initial` starts from v1). It is measured exactly like
   the online one: the champion alias points at it only for one replay of the code held-out prompts
   ("offline"), then goes back to the online champion;
7. reads the jobs' driver nodes from the Jobs API (`driver_node_id`) and compares them with the spare node's
   id, reads promotions and rollbacks from the registry's tags, counts the records the log holds against
   the logged requests sent, prints a table, writes a PNG, logs both and the figures to an MLflow run
   (experiment `draftsmith-bench-shift`), and prints the JSON summary as the last stdout line.

The JSON (`build_summary`): `windows` (per probe: requests served, code requests served, both domains' token
acceptance, the drafter's own token acceptance, tokens/s, versions, whether a job ran), `versions`,
`promotions` and `rollbacks` with times, `jobs` with their driver node and `on_spare_node`,
`all_jobs_on_spare_node`, `recovery_requests` (code requests served until the code held-out token acceptance
first reached `recovery_fraction` of the offline drafter's), `offline_token_acceptance`,
`online_token_acceptance` (code held-out at the end), `chat_retention` (chat held-out token acceptance at the
end over its level at the switch), `failed_requests`, `lost_records`, `serving_tok_s` during a job and
without one, and the served speedup over speculation off per domain at the end (`code_speedup_end`,
`chat_speedup_end`). Every acceptance figure comes twice: token acceptance with prompt lookup's proposals
(what the engine really verified) and the drafter's own (`drafter_token_acceptance`, prompt lookup's left
out: what distillation moves). Tokens/s are end to end over HTTP.

Sizes (`--quick`, QUICK). The phases are counted in logged requests; the rest follows from them:
- `min_new_records` sets the job cadence, `window_records` is twice it (a job sees the records new since the
  previous one plus as many older ones), and replay keeps a share of chat in every job;
- the chat phase is 1.5 x `min_new_records`: exactly one job is due during it (it learns chat), and the rest
  of the chat records are too few for a second, so after the switch the next job is due after
  `min_new_records / 2` code requests and the one after that trains mostly on code;
- on this 2-core CPU, a job's wall time under load is a few `probe_every` chunks of traffic, so the code phase
  (four probes of `probe_every`) leaves time for about two jobs to adapt to code and be measured;
- `distill_steps` is smaller than the demo's so that a job turns around within those chunks, and the offline
  drafter gets the same number of steps;
- `heldout_prompts` per domain at every probe is a fixed cost per window; QUICK keeps it to three waves of
  the clients.
The total, estimated from the demo's measured request and training rates (docs/benchmarks.md), fits the
45 minutes the issue allows; the measured duration of a run is in its JSON (`elapsed_s`).

What it does not do: decide anything itself (the trigger, the gate and the rollback rule do; `promotion:
always` is a testing aid for the random tiny target), tune sizes,
measure features-vs-recompute training time (pipelines/bench_distill.py), or run on a remote cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field

from draftsmith.domains import CHAT, CODE, is_code_conversation

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "draftsmith-bench-shift"
APP_NAME = "draftsmith"
DOMAINS = (CHAT, CODE)
FIGURES = ("token_acceptance", "drafter_token_acceptance", "acceptance_rate", "mean_accepted_length", "tok_s")


class ShiftConfig(BaseModel):
    """Sizes and knobs of `draftsmith bench shift`; `--quick` picks the values in QUICK."""

    model_config = ConfigDict(extra="forbid")

    state_dir: str = Field(".state/bench-shift", description="Everything the benchmark writes (wiped at start).")
    target: str = Field("smollm2-135m-instruct", description="Target model spec.")
    model_name: str = Field("draftsmith-drafter", description="Registered model of the drafters.")
    drafter: str = Field("feature:last1", description="The untrained initial drafter, derived from the target.")
    draft_vocab_size: int = Field(4096, ge=2, description="Trimmed head of the initial drafter (VocabTrim).")
    chat_requests: int = Field(300, ge=1, description="Logged chat train requests (the first phase).")
    code_requests: int = Field(1000, ge=1, description="Logged code train requests (the second phase).")
    probe_every: int = Field(100, ge=1, description="Logged requests between two probes of the held-out prompts.")
    heldout_prompts: int = Field(24, ge=1, description="Held-out prompts of EACH domain replayed at every probe "
                                 "(not logged).")
    settle_at_switch: bool = Field(True, description="At the switch, wait for the job in flight and the "
                                   "promotion it makes, so the chat figure before the switch is that of a drafter "
                                   "trained on chat.")
    max_prompt_tokens: int = Field(128, ge=8, description="Prompts longer than this (templated) are skipped.")
    max_tokens: int = Field(64, ge=1, description="max_tokens of every request.")
    concurrency: int = Field(8, ge=1, description="Concurrent HTTP clients (and engine batch slots).")
    gamma: int | Literal["auto"] = Field("auto", description="num_speculative_tokens served and evaluated.")
    engine: dict[str, Any] = Field(
        {"prompt_lookup_max": 3, "prompt_lookup_min": 1, "prepack_weights": True},
        description="Further engine settings (EngineConfig fields), as the demo's `engine`.")
    min_new_records: int = Field(200, ge=1, description="The trigger distils once this many records are new.")
    window_records: int | None = Field(400, ge=1, description="Recency window of each online job (records; about "
                                       "twice min_new_records); None: all traffic.")
    replay_fraction: float = Field(0.25, ge=0, le=1, description="Older records replayed per job, as a share of "
                                   "the window.")
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="Newest share of a job's window held out for the "
                                    "gate's evaluation.")
    distill_steps: int = Field(600, ge=1, description="Optimizer steps of every online job.")
    offline_steps: int | None = Field(None, ge=1, description="Steps of the offline drafter (None: distill_steps, "
                                      "the same budget as one online job).")
    offline_from: Literal["switch", "initial"] = Field("switch", description="Where the offline drafter starts: "
                                                       "the champion at the switch (as the online loop does) or "
                                                       "the untrained v1.")
    offline_attempts: int = Field(2, ge=1, description="Submissions of the offline job before giving up (a failed one "
                                  "is submitted again, as the trigger does with a failed online job).")
    distill_lr: float = Field(1e-3, gt=0, description="Distillation learning rate.")
    eval_prompts: int = Field(24, ge=1, description="Held-out traffic prompts of the gate's evaluation.")
    eval_temperatures: list[float] = Field([0.0], description="Temperatures the gate evaluates.")
    gate_confidence: float = Field(0.95, ge=0.5, lt=1, description="The gate's confidence (jobs/evaluate.py).")
    promotion: Literal["gate", "always"] = Field("gate", description="gate: the job's gate decides; always: the "
                                                 "job evaluates without gating and the benchmark promotes every "
                                                 "challenger it registers (a testing aid for the random `tiny` "
                                                 "target).")
    drift_threshold: float | None = Field(0.05, description="The trigger's drift threshold (None: off).")
    rollback_margin: float = Field(0.1, ge=0, le=1, description="The trigger's rollback margin.")
    rollback_min_requests: int = Field(50, ge=1, description="Speculating requests before the rollback verdict.")
    poll_seconds: float = Field(10.0, gt=0, description="The trigger's poll period.")
    recovery_fraction: float = Field(0.9, gt=0, le=1, description="recovery_requests: code requests until the "
                                     "online code acceptance reaches this share of the offline drafter's.")
    torch_threads: int = Field(2, ge=1, description="Torch threads of the serving replica.")
    train_torch_threads: int = Field(1, ge=1, description="Torch threads of the training worker (spare node).")
    num_cpus: int = Field(4, ge=1, description="Logical CPUs of the Ray head (replica and Serve's own actors).")
    spare_slots: int = Field(2, ge=2, description="draftsmith_spare units of the spare node (job driver + worker).")
    flush_every_records: int = Field(16, ge=1, description="The traffic writer flushes every N records...")
    flush_every_seconds: float = Field(5.0, gt=0, description="...or every T seconds.")
    serve_port: int = Field(8000, description="HTTP port of the endpoint (another free one if taken).")
    mlflow_port: int = Field(5000, description="MLflow port (another free one if taken).")
    dashboard_port: int = Field(8265, description="Ray dashboard port (another free one if taken).")
    job_timeout_s: float = Field(3600, gt=0, description="Give up on a job after this long.")
    swap_timeout_s: float = Field(300, gt=0, description="Give up waiting for a hot swap after this long.")
    leave_up: bool = Field(False, description="Leave Ray, Serve and MLflow running (stop: `draftsmith down "
                                              "--state-dir <state_dir>`).")

    def demo_config(self):
        """The demo's config with this benchmark's shared settings: the Serve app and the job configs are built
        by the demo's own functions (pipelines/demo.py), so both measure the same serving setup."""
        from pipelines.demo import DemoConfig

        shared = ("state_dir", "target", "model_name", "drafter", "draft_vocab_size", "max_prompt_tokens",
                  "max_tokens", "concurrency", "gamma", "engine", "distill_steps", "distill_lr", "eval_prompts",
                  "eval_temperatures", "heldout_fraction", "gate_confidence", "promotion", "torch_threads",
                  "num_cpus", "job_timeout_s", "swap_timeout_s")
        return DemoConfig(**{name: getattr(self, name) for name in shared})


# The CPU size (see "Sizes" in the module docstring): 120 chat + 320 code logged requests, probes every 80 of
# 12 held-out prompts per domain, a job every 80 new records on a 160-record window, 150 steps per job.
QUICK: dict[str, Any] = {"chat_requests": 120, "code_requests": 320, "probe_every": 80, "heldout_prompts": 12,
                         "min_new_records": 80, "window_records": 160, "distill_steps": 150, "eval_prompts": 8,
                         "concurrency": 4, "rollback_min_requests": 40, "poll_seconds": 10.0}


# ----------------------------------------------------------------------------------------- pure parts


@dataclasses.dataclass(frozen=True)
class Segment:
    """One step of the schedule: serve `domain` train prompts [start, stop) (logged), probe both domains'
    held-out prompts, or settle the loop at the switch. `served` / `code_served`: logged requests sent before."""

    kind: Literal["serve", "probe", "settle"]
    domain: str | None
    start: int
    stop: int
    served: int
    code_served: int
    probe: int | None = None

    @property
    def after_switch(self) -> bool:
        return self.kind == "probe" and self.domain == CODE


def phase_schedule(chat_requests: int, code_requests: int, probe_every: int) -> list[Segment]:
    """The benchmark's order of work: a probe, then chunks of at most `probe_every` logged requests each followed
    by a probe; chunks never cross the switch; the last chat chunk is followed by the settle step, then the
    probe at the switch (its `domain` is CODE: it is the code phase's first point, at 0 code requests).
    A probe's `domain` is the traffic phase it belongs to (chat before the switch)."""
    if min(chat_requests, code_requests, probe_every) < 1:
        raise ValueError("chat_requests, code_requests and probe_every must be >= 1")
    out = [Segment("probe", CHAT, 0, 0, 0, 0, probe=0)]
    served = probes = 0
    for domain, total in ((CHAT, chat_requests), (CODE, code_requests)):
        for start in range(0, total, probe_every):
            stop = min(total, start + probe_every)
            out.append(Segment("serve", domain, start, stop, served, start if domain == CODE else 0))
            served += stop - start
            last_chat = domain == CHAT and stop == total
            if last_chat:
                out.append(Segment("settle", None, 0, 0, served, 0))
            probes += 1
            out.append(Segment("probe", CODE if last_chat else domain, 0, 0, served,
                               stop if domain == CODE else 0, probe=probes))
    return out


def conversation_domain(conversation) -> str | None:
    """CODE when the conversation's first exchange (the prompt a replay sends and its reply) shows code, CHAT when
    no turn of it does, None otherwise (code only in later turns: the replayed prompt would not be code, and the
    conversation is not plain chat either, so neither phase uses it). `draftsmith.domains` decides what code is."""
    from draftsmith.datasets_io import to_chat_messages

    if is_code_conversation(to_chat_messages(conversation, max_turns=2)):
        return CODE
    return None if is_code_conversation(conversation) else CHAT


def figures_of(pooled) -> dict:
    """The figures of one pooled group (draftsmith.timeline.Pooled) for the JSON."""
    out = {"requests": pooled.requests, "failed": pooled.failed, "tokens": pooled.tokens,
           "versions": sorted(v for v in str(pooled.drafter_version).split("+") if v and v != "none")}
    out.update({key: round(float(getattr(pooled, key)), 4) for key in FIGURES})
    out["lookup_share"] = round(pooled.lookup_compared / pooled.compared, 4) if pooled.compared else 0.0
    out["seconds"] = round(pooled.seconds, 3)
    return out


def overlap_seconds(span: tuple[float, float], intervals: Iterable[tuple[float, float]]) -> float:
    """Seconds of `span` covered by `intervals` (which may overlap one another)."""
    start, end = span
    covered = [(max(start, a), min(end, b)) for a, b in intervals if min(end, b) > max(start, a)]
    return busy_seconds(covered)


def busy_seconds(spans: Iterable[tuple[float, float]]) -> float:
    """Length of the union of time spans."""
    total, current_start, current_end = 0.0, None, None
    for a, b in sorted(spans):
        if current_end is None or a > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = a, b
        else:
            current_end = max(current_end, b)
    if current_end is not None:
        total += current_end - current_start
    return total


def throughput_split(rows: Sequence[Mapping], intervals: Sequence[tuple[float, float]]) -> dict:
    """Serving tokens/s of the requests that ran during a job (their midpoint inside one of `intervals`) and of
    the others: output tokens over the union of their [started, finished] spans, so concurrent requests are not
    double-counted and idle gaps (no request in flight) are not counted."""
    groups: dict[bool, list[Mapping]] = {True: [], False: []}
    for row in rows:
        if row.get("error"):
            continue
        middle = (float(row["started"]) + float(row["finished"])) / 2
        groups[any(a <= middle <= b for a, b in intervals)].append(row)

    def tok_s(group):
        seconds = busy_seconds((float(r["started"]), float(r["finished"])) for r in group)
        return round(sum(int(r["completion_tokens"]) for r in group) / seconds, 3) if seconds > 0 else None

    during, without = tok_s(groups[True]), tok_s(groups[False])
    return {"during_job": during, "without_job": without,
            "ratio": round(during / without, 3) if during and without else None,
            "requests_during_job": len(groups[True]), "requests_without_job": len(groups[False])}


def recovery_requests(points: Sequence[tuple[int, float | None]], offline: float | None,
                      fraction: float) -> int | None:
    """Code requests served until the online code acceptance first reached `fraction` of the offline drafter's:
    `points` are (code requests served, acceptance) after the switch, in order. None: never, or no offline
    figure."""
    if offline is None:
        return None
    for served, value in points:
        if value is not None and value >= fraction * offline - 1e-9:  # rounding: 0.9 x 0.8 is 0.7200000000000001
            return served
    return None


def chat_retention(before: float | None, after: float | None) -> float | None:
    """Chat acceptance after adapting to code over its level at the switch (None when there is no level)."""
    if before is None or after is None or before <= 0:
        return None
    return round(after / before, 4)


def record_accounting(logged_ok: int, logged_failed: int, records: int) -> dict:
    """Records the log holds against the logged requests sent: `lost_records` are answered requests without a
    record; `extra_records` are records beyond every logged request sent (duplicates), failed ones included."""
    return {"logged_requests_sent": logged_ok + logged_failed, "logged_requests_answered": logged_ok,
            "records_logged": records, "lost_records": max(0, logged_ok - records),
            "extra_records": max(0, records - logged_ok - logged_failed)}


def job_records(infos: Sequence[Mapping], spare_node_ids: Sequence[str], offline_ids: Iterable[str],
                t0: float) -> list[dict]:
    """One entry per distillation job: id, online/offline, status, driver node, whether that is a spare node,
    start/end (seconds from t0, epoch ms from the Jobs API), the trigger's reason."""
    out, offline_ids = [], set(offline_ids)
    for info in sorted(infos, key=lambda i: i.get("start_time") or 0):
        start, end = info.get("start_time"), info.get("end_time")
        out.append({
            "job_id": info["submission_id"], "kind": "offline" if info["submission_id"] in offline_ids else "online",
            "status": str(info.get("status")).rsplit(".", 1)[-1], "driver_node_id": info.get("driver_node_id"),
            "on_spare_node": info.get("driver_node_id") in set(spare_node_ids),
            "start_s": None if start is None else round(start / 1000 - t0, 1),
            "end_s": None if end is None else round(end / 1000 - t0, 1),
            "seconds": None if start is None or end is None else round((end - start) / 1000, 1),
            "reason": (info.get("metadata") or {}).get("reason", ""),
        })
    return out


def version_records(versions: Sequence[Any], t0: float, first_served: Mapping[str, float],
                    offline_version: str | None) -> list[dict]:
    """Each registered version with its promotion and rollback tags, as seconds from t0 too, and when it first
    answered a request (`first_served_s`)."""

    def seconds(iso: str | None) -> float | None:
        if not iso:
            return None
        t = dt.datetime.fromisoformat(iso)
        t = t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
        return round(t.timestamp() - t0, 1)

    out = []
    for v in sorted(versions, key=lambda v: int(v.version)):
        tags = v.tags
        out.append({
            "version": v.version, "offline": v.version == offline_version,
            "parent_version": tags.get("parent_version", ""), "created_s": round(v.created_at.timestamp() - t0, 1),
            "gate": tags.get("gate", ""), "gate_reason": tags.get("gate_reason", "")[:300],
            "promoted_at": tags.get("promoted_at"), "promoted_s": seconds(tags.get("promoted_at")),
            "previous_champion": tags.get("previous_champion"),
            "rolled_back_at": tags.get("rolled_back_at"), "rolled_back_s": seconds(tags.get("rolled_back_at")),
            "rolled_back_to": tags.get("rolled_back_to"), "rollback_reason": tags.get("rollback_reason", "")[:300],
            "restored_at": tags.get("restored_at"), "window_records": tags.get("window_records"),
            "replay_records": tags.get("replay_records"), "traffic_since": tags.get("traffic_since"),
            "traffic_until": tags.get("traffic_until"),
            "first_served_s": None if v.version not in first_served else round(first_served[v.version] - t0, 1),
        })
    return out


def ended_jobs(before: Mapping, after: Mapping, status_seen: str | None) -> list[tuple[str, str]]:
    """The jobs one trigger poll saw end, from its state file before and after the poll: the job in flight before
    either carries a result now, or was replaced by a new submission in the same poll (the trigger noted its end,
    then submitted again: after a failed job its records count as new again). `status_seen`: the status the poll
    read (its Readings)."""
    job = before.get("job_id")
    if not job or before.get("job_result"):
        return []
    if after.get("job_id") == job:
        return [(job, str(after["job_result"]))] if after.get("job_result") else []
    return [(job, status_seen or "ENDED")]


def served_before(rows: Sequence[Mapping], t: float) -> int:
    """Logged train requests answered by time t (the x axis of the plot)."""
    return sum(1 for r in rows if str(r["phase"]).startswith("serve:") and not r.get("error")
               and float(r["finished"]) <= t)


def build_summary(*, cfg: ShiftConfig, windows: list[dict], arms: Mapping[str, dict], jobs: list[dict],
                  versions: list[dict], spare_node_ids: Sequence[str], accounting: Mapping, failed: int,
                  requests: int, serving_tok_s: Mapping, switch: Mapping, offline_version: str | None,
                  online_version: str | None, extra: Mapping | None = None) -> dict:
    """The JSON summary from the measured pieces (pure). `windows`: per-probe entries (see `probe_entry`);
    `arms`: figures of the end arms by name (end:chat, end:code, off:chat, off:code, offline:code)."""

    def figure(arm: str, key: str = "token_acceptance") -> float | None:
        return arms[arm][key] if arm in arms and arms[arm]["requests"] > arms[arm]["failed"] else None

    def speedup(domain: str) -> float | None:
        fast, slow = figure(f"end:{domain}", "tok_s"), figure(f"off:{domain}", "tok_s")
        return round(fast / slow, 3) if fast and slow else None

    switch_chat = next((w["chat"] for w in windows if w["after_switch"]), None)
    offline = figure("offline:code")
    offline_drafter = figure("offline:code", "drafter_token_acceptance")
    after = [w for w in windows if w["after_switch"]]
    end_point = [(cfg.code_requests, figure("end:code"))]
    end_point_drafter = [(cfg.code_requests, figure("end:code", "drafter_token_acceptance"))]
    online_jobs = [j for j in jobs if j["kind"] == "online"]
    promotions = [{"version": v["version"], "at": v["promoted_at"], "at_s": v["promoted_s"],
                   "previous_champion": v["previous_champion"], "reason": v["gate_reason"]}
                  for v in versions if v["promoted_at"]]
    rollbacks = [{"version": v["version"], "to": v["rolled_back_to"], "at": v["rolled_back_at"],
                  "at_s": v["rolled_back_s"], "reason": v["rollback_reason"]}
                 for v in versions if v["rolled_back_at"]]
    summary = {
        "target": cfg.target, "drafter": cfg.drafter, "num_speculative_tokens": cfg.gamma, "engine": cfg.engine,
        "concurrency": cfg.concurrency,
        "schedule": {"chat_requests": cfg.chat_requests, "code_requests": cfg.code_requests,
                     "probe_every": cfg.probe_every, "heldout_prompts_per_domain": cfg.heldout_prompts,
                     "min_new_records": cfg.min_new_records, "window_records": cfg.window_records,
                     "distill_steps": cfg.distill_steps},
        "requests": requests, "failed_requests": failed, **dict(accounting),
        "windows": windows, "end": dict(arms),
        "versions": versions, "promotions": promotions, "rollbacks": rollbacks,
        "jobs": jobs, "spare_node_ids": list(spare_node_ids),
        "all_jobs_on_spare_node": bool(jobs) and all(j["on_spare_node"] for j in jobs),
        "online_jobs": len(online_jobs),
        "failed_jobs": sum(1 for j in jobs if j.get("status") != "SUCCEEDED"),
        "online_jobs_after_switch": sum(1 for j in online_jobs if (j["start_s"] or 0) >= switch.get("at_s", 0)),
        "switch": dict(switch),
        "recovery_fraction": cfg.recovery_fraction,
        "recovery_requests": recovery_requests(
            [(w["code_requests_served"], w["code"]["token_acceptance"]) for w in after] + end_point, offline,
            cfg.recovery_fraction),
        "recovery_requests_drafter": recovery_requests(
            [(w["code_requests_served"], w["code"]["drafter_token_acceptance"]) for w in after] + end_point_drafter,
            offline_drafter, cfg.recovery_fraction),
        "offline_token_acceptance": offline, "offline_drafter_token_acceptance": offline_drafter,
        "offline_version": offline_version, "offline_steps": cfg.offline_steps or cfg.distill_steps,
        "offline_from": cfg.offline_from,
        "online_token_acceptance": figure("end:code"),
        "online_drafter_token_acceptance": figure("end:code", "drafter_token_acceptance"),
        "online_version": online_version,
        "online_over_offline": (round(figure("end:code") / offline, 4)
                                if offline and figure("end:code") is not None else None),
        "chat_token_acceptance_at_switch": switch_chat and switch_chat["token_acceptance"],
        "chat_token_acceptance_end": figure("end:chat"),
        "chat_retention": chat_retention(switch_chat and switch_chat["token_acceptance"], figure("end:chat")),
        "chat_retention_drafter": chat_retention(switch_chat and switch_chat["drafter_token_acceptance"],
                                                 figure("end:chat", "drafter_token_acceptance")),
        "serving_tok_s": dict(serving_tok_s),
        "code_tok_s_end": figure("end:code", "tok_s"), "code_tok_s_speculation_off": figure("off:code", "tok_s"),
        "code_speedup_end": speedup(CODE),
        "chat_tok_s_end": figure("end:chat", "tok_s"), "chat_tok_s_speculation_off": figure("off:chat", "tok_s"),
        "chat_speedup_end": speedup(CHAT),
        "tok_s_measure": "end to end over HTTP: output tokens / seconds from an arm's first send to its last "
                         "completion (prefill included)",
    }
    summary.update(extra or {})
    return summary


def probe_entry(rows: Sequence[Mapping], segment: Segment, probe_started: float, t0: float,
                job_intervals: Sequence[tuple[float, float]]) -> dict:
    """A window of the JSON: both domains' figures at one probe, where it stands in the schedule, and whether a
    job ran during most of it."""
    from draftsmith.timeline import phase_summary

    entry = {"probe": segment.probe, "at_s": round(probe_started - t0, 1), "requests_served": segment.served,
             "code_requests_served": segment.code_served, "after_switch": segment.after_switch}
    spans = []
    for domain in DOMAINS:
        phase = f"probe{segment.probe}:{domain}"
        mine = [r for r in rows if r["phase"] == phase]
        entry[domain] = figures_of(phase_summary(rows, phase))
        spans += [(float(r["started"]), float(r["finished"])) for r in mine]
    if spans:
        span = (min(a for a, _ in spans), max(b for _, b in spans))
        entry["during_job"] = overlap_seconds(span, job_intervals) >= 0.5 * (span[1] - span[0])
    else:
        entry["during_job"] = False
    return entry


def format_shift_table(windows: Sequence[Mapping], arms: Mapping[str, Mapping]) -> str:
    """A fixed-width table: one line per probe, then one per end arm."""
    header = (f"{'window':<12} {'served':>6} {'code':>5} {'job':>3} {'versions':>9} | {'chat acc':>8} "
              f"{'drafter':>7} {'tok/s':>6} | {'code acc':>8} {'drafter':>7} {'tok/s':>6}")
    lines = [header, "-" * len(header)]
    for w in windows:
        versions = "+".join(sorted(set(w["chat"]["versions"]) | set(w["code"]["versions"]))) or "-"
        lines.append(f"{'probe ' + str(w['probe']):<12} {w['requests_served']:>6} {w['code_requests_served']:>5} "
                     f"{'yes' if w['during_job'] else 'no':>3} {versions:>9} | "
                     f"{w['chat']['token_acceptance']:>8.3f} {w['chat']['drafter_token_acceptance']:>7.3f} "
                     f"{w['chat']['tok_s']:>6.1f} | {w['code']['token_acceptance']:>8.3f} "
                     f"{w['code']['drafter_token_acceptance']:>7.3f} {w['code']['tok_s']:>6.1f}")
    lines.append("")
    lines.append(f"{'arm':<14} {'versions':>9} {'requests':>8} {'failed':>6} {'token acc':>9} {'drafter':>7} "
                 f"{'lookup':>6} {'tok/s':>7}")
    for name, a in arms.items():
        lines.append(f"{name:<14} {'+'.join(a['versions']) or '-':>9} {a['requests']:>8} {a['failed']:>6} "
                     f"{a['token_acceptance']:>9.3f} {a['drafter_token_acceptance']:>7.3f} {a['lookup_share']:>6.2f} "
                     f"{a['tok_s']:>7.1f}")
    return "\n".join(lines)


def plot_shift(summary: Mapping, path: str | Path, *, x_of_time, title: str) -> Path:
    """PNG: per-domain token acceptance (solid: with prompt lookup's proposals; dashed: the drafter's own) and
    tokens/s against logged requests served, the end arms as stars; the switch, promotions (green) and rollbacks
    (red) as vertical lines;
    online jobs shaded; the offline drafter's code acceptance and `recovery_fraction` of it as horizontal lines.
    `x_of_time(seconds from t0)` maps a time to logged requests served."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    windows = summary["windows"]
    xs = [w["requests_served"] for w in windows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    colors = {CHAT: "tab:blue", CODE: "tab:orange"}
    for domain in DOMAINS:
        top.plot(xs, [w[domain]["token_acceptance"] for w in windows], marker="o", color=colors[domain],
                 label=f"{domain} held-out: token acceptance")
        top.plot(xs, [w[domain]["drafter_token_acceptance"] for w in windows], marker=".", linestyle="--",
                 color=colors[domain], label=f"{domain} held-out: the drafter's own")
        bottom.plot(xs, [w[domain]["tok_s"] for w in windows], marker="o", color=colors[domain],
                    label=f"{domain} held-out")
    end = summary.get("end") or {}
    for domain in DOMAINS:  # the final champion, after the last job: the figures the summary calls online
        arm = end.get(f"end:{domain}")
        if arm and xs:
            top.plot([xs[-1]], [arm["token_acceptance"]], marker="*", markersize=12, color=colors[domain],
                     linestyle="none", label=f"{domain}: end (final champion)")
            bottom.plot([xs[-1]], [arm["tok_s"]], marker="*", markersize=12, color=colors[domain], linestyle="none")
    offline = summary.get("offline_token_acceptance")
    if offline is not None:
        top.axhline(offline, color="black", linestyle=":", linewidth=1, label="offline drafter (code)")
        top.axhline(summary["recovery_fraction"] * offline, color="grey", linestyle=":", linewidth=1,
                    label=f"{summary['recovery_fraction']:g} x offline")
    switch_x = summary["schedule"]["chat_requests"]
    for axis in (top, bottom):
        axis.axvline(switch_x, color="black", linewidth=1.5)
        for job in summary["jobs"]:
            if job["kind"] == "online" and job["start_s"] is not None and job["end_s"] is not None:
                axis.axvspan(x_of_time(job["start_s"]), x_of_time(job["end_s"]), color="grey", alpha=0.12)
        for p in summary["promotions"]:
            if p["at_s"] is not None and p["at_s"] >= 0:
                axis.axvline(x_of_time(p["at_s"]), color="green", linestyle="--", linewidth=1)
        for r in summary["rollbacks"]:
            if r["at_s"] is not None:
                axis.axvline(x_of_time(r["at_s"]), color="red", linestyle="--", linewidth=1)
    top.annotate("switch to code", (switch_x, 1.0), xycoords=("data", "axes fraction"), rotation=90, va="top",
                 ha="right", fontsize=8)
    for p in summary["promotions"]:
        if p["at_s"] is not None and p["at_s"] >= 0:
            top.annotate(f"v{p['version']}", (x_of_time(p["at_s"]), 0.02), xycoords=("data", "axes fraction"),
                         rotation=90, va="bottom", ha="right", fontsize=8, color="green")
    top.set_ylabel("token acceptance")
    top.set_ylim(bottom=0)
    bottom.set_ylabel("output tokens/s (HTTP)")
    bottom.set_xlabel("logged requests served (grey: a distillation job running on the spare node)")
    bottom.set_ylim(bottom=0)
    top.legend(loc="upper left", fontsize=7)
    bottom.legend(loc="upper left", fontsize=7)
    top.set_title(title)
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------- Ray-facing parts


def _say(message: str) -> None:
    print(f"[bench shift] {message}", file=sys.stderr, flush=True)


def select_prompts(tokenizer, split: str, wanted: Mapping[str, int], max_prompt_tokens: int) -> dict[str, list]:
    """The first ShareGPT first prompts of `split` per domain (`conversation_domain`), as many as `wanted` says,
    whose templated length fits `max_prompt_tokens`."""
    from draftsmith.datasets_io import first_prompt_messages, sharegpt_split

    out: dict[str, list] = {domain: [] for domain in wanted}
    for conversation in sharegpt_split(split, None, seed=0):
        if all(len(out[d]) >= n for d, n in wanted.items()):
            break
        messages = first_prompt_messages(conversation)
        if not messages or not messages[-1]["content"].strip():
            continue
        domain = conversation_domain(conversation)
        if domain not in out or len(out[domain]) >= wanted[domain]:
            continue
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= max_prompt_tokens:
            out[domain].append(messages)
    for domain, n in wanted.items():
        if len(out[domain]) < n:
            raise ValueError(f"only {len(out[domain])} {split} {domain} prompts fit in {max_prompt_tokens} tokens "
                             f"(asked for {n})")
    return out


class TriggerLoop:
    """The continuous trigger in a thread of this process: `DistillTrigger.poll()` every `poll_seconds` (what
    `DistillTrigger.run` does, plus a record of every poll and, with promotion `always`, the promotion of each
    challenger a finished job registered). `poll_now` asks for a poll and waits for it."""

    def __init__(self, trigger, registry, *, poll_seconds: float, promote_always: bool):
        self.trigger, self.registry = trigger, registry
        self.poll_seconds, self.promote_always = poll_seconds, promote_always
        self.polls: list[dict] = []
        self.handled: dict[str, str] = {}  # job id -> its end status, once handled
        self._stop, self._wake = threading.Event(), threading.Event()
        self._cond = threading.Condition()
        self._started = self._completed = 0
        self._thread = threading.Thread(target=self._run, name="draftsmith-trigger", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                self._started += 1
                index = self._started
            try:
                before = self.trigger.state.read()
                outcome = self.trigger.poll()
                self.polls.append({"at": time.time(), **outcome.as_dict()})
                if outcome.job_id:
                    _say(f"the trigger submitted distillation job {outcome.job_id}: {outcome.decision.reason}")
                if outcome.rolled_back_to:
                    _say(f"the trigger ROLLED BACK the champion to v{outcome.rolled_back_to}: "
                         f"{outcome.rollback.reason}")
                readings = getattr(outcome.decision, "readings", None)
                seen = getattr(readings, "job_status", None)
                for job, status in ended_jobs(before, self.trigger.state.read(), seen):
                    if job not in self.handled:
                        self.job_ended(job, status)
            except Exception as e:  # noqa: BLE001 - like DistillTrigger.run: the next poll tries again
                logger.exception("trigger poll failed: %s", e)
                self.polls.append({"at": time.time(), "error": f"{type(e).__name__}: {e}"[:500]})
            with self._cond:
                self._completed = index
                self._cond.notify_all()
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def job_ended(self, job_id: str, status: str) -> None:
        """Note a job's end; with promotion `always`, promote the challenger it registered."""
        self.handled[job_id] = status
        _say(f"distillation job {job_id} ended: {status}")
        if not self.promote_always or status != "SUCCEEDED":
            return
        newest = max(self.registry.list_versions(), key=lambda v: int(v.version))
        champion = self.registry.get_version_by_alias("champion")
        if champion is None or newest.version != champion.version:
            self.registry.promote(newest.version, reason="promotion: always (bench shift promotes every challenger)")
            _say(f"promoted v{newest.version} (promotion: always)")

    def poll_now(self, timeout_s: float = 300.0) -> None:
        """Ask for a poll and wait until a poll that started after this call has ended."""
        with self._cond:
            wanted = self._started + 1
        self._wake.set()
        with self._cond:
            if not self._cond.wait_for(lambda: self._completed >= wanted or not self._thread.is_alive(), timeout_s):
                raise TimeoutError(f"the trigger did not poll within {timeout_s:.0f} s")

    def job_in_flight(self) -> str | None:
        state = self.trigger.state.read()
        job = state.get("job_id")
        return job if job and not state.get("job_result") else None

    def settle(self, timeout_s: float, pause_s: float = 2.0) -> list[str]:
        """Poll now (the trigger sees every record so far and may submit), then poll every `pause_s` until no job is
        in flight, every end handled (a failed job the trigger resubmits is waited for too). Returns the jobs
        waited for."""
        self.poll_now()
        deadline = time.monotonic() + timeout_s
        waited: list[str] = []
        while (job := self.job_in_flight()) is not None:
            if job not in waited:
                waited.append(job)
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job} did not end within {timeout_s:.0f} s")
            time.sleep(min(self.poll_seconds, pause_s))
            self.poll_now()
        return waited

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=300)


def _get_json(url: str, *, timeout: float = 10.0, method: str = "GET") -> dict:
    import httpx

    response = httpx.request(method, url, timeout=timeout)
    response.raise_for_status()
    return response.json()


def write_shift_job_configs(cfg: ShiftConfig, state: Path, mlflow_url: str) -> tuple[Path, Path]:
    """The online jobs' configs: the demo's (`write_job_configs`, same algorithm and gate at the serving engine
    settings) with the recency window, the spare node's resource for the Ray Train worker, and a run name per job."""
    from pipelines.demo import write_job_configs
    from pipelines.local_services import SPARE_RESOURCE

    distill_path, evaluate_path = write_job_configs(cfg.demo_config(), state, mlflow_url)
    distill = yaml.safe_load(distill_path.read_text())
    distill.pop("run_name", None)  # each job its own run (and Ray Train experiment): distill-<UTC time>
    distill.update(window={"window_records": cfg.window_records, "replay_fraction": cfg.replay_fraction},
                   resources_per_worker={SPARE_RESOURCE: 1}, torch_threads=cfg.train_torch_threads)
    distill_path.write_text(yaml.safe_dump(distill, sort_keys=False))
    return distill_path, evaluate_path


def write_offline_config(cfg: ShiftConfig, state: Path, distill_path: Path, *, since: dt.datetime,
                         start_version: str) -> Path:
    """The offline drafter's job: the online job's config on all the code traffic (`since` the switch, no window,
    nothing held out), from `start_version`, with the offline step budget."""
    data = yaml.safe_load(distill_path.read_text())
    steps = cfg.offline_steps or cfg.distill_steps
    data.update(since=since.isoformat(), window={"window_records": None, "replay_fraction": 0.0},
                heldout_fraction=0.0, drafter=f"models:/{cfg.model_name}/{start_version}",
                run_name="bench-shift-offline", checkpoint_every=max(1, steps // 3))
    data["train"] = {**data.get("train", {}), "steps": steps}
    path = state / "offline.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _trigger_config(cfg: ShiftConfig, services, state: Path, *, state_file: str, distill: Path,
                    evaluate: Path | None):
    from pipelines.local_services import SPARE_RESOURCE
    from pipelines.trigger import TriggerConfig

    return TriggerConfig(
        ray_address=services.dashboard_url, traffic_uri=str(state / "traffic"), tracking_uri=services.mlflow_url,
        model_name=cfg.model_name, state_file=str(state / state_file), min_new_records=cfg.min_new_records,
        drift_threshold=cfg.drift_threshold, drift_min_records=cfg.rollback_min_requests,
        drift_min_new_records=max(1, cfg.min_new_records // 2),
        max_serving_load=None,  # the jobs run on the spare node: traffic never holds them off
        ray_cluster_address=None, min_interval_minutes=0, poll_seconds=cfg.poll_seconds,
        rollback_margin=cfg.rollback_margin, rollback_min_requests=cfg.rollback_min_requests,
        distill_config=str(distill), evaluate_config=str(evaluate) if evaluate else None,
        entrypoint_num_cpus=0, entrypoint_resources={SPARE_RESOURCE: 1}, working_dir=str(REPO_ROOT),
        python=sys.executable, job_timeout_s=cfg.job_timeout_s)


def _pooled(rows: Sequence[Mapping], phase: str) -> dict:
    from draftsmith.timeline import phase_summary

    return figures_of(phase_summary(rows, phase))


def _log_bytes(root: Path) -> dict:
    """Bytes of the traffic log's Parquet parts and of their feature side files (traffic.log_features)."""
    sizes = {"parquet": 0, "features": 0}
    for path in root.rglob("*"):
        if path.is_file() and path.name.endswith(".features.arrow"):
            sizes["features"] += path.stat().st_size
        elif path.is_file() and path.suffix == ".parquet":
            sizes["parquet"] += path.stat().st_size
    return sizes


def log_shift_run(mlflow_url: str, cfg: ShiftConfig, summary: Mapping, files: Sequence[Path]) -> str:
    """One run in the `draftsmith-bench-shift` experiment: params, per-window figures (step = logged requests
    served), the summary's numbers, the files."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=mlflow_url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    run = client.create_run(experiment_id, run_name=f"bench-shift-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}")
    now = int(time.time() * 1000)
    metrics = [Metric(f"{domain}_{key}", float(w[domain][key]), now, int(w["requests_served"]))
               for w in summary["windows"] for domain in DOMAINS for key in FIGURES]
    flat = {**summary, **{f"serving_tok_s_{k}": v for k, v in summary["serving_tok_s"].items()}}
    metrics += [Metric(k, float(v), now, 0) for k, v in flat.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)]
    params = [Param(k, str(v)[:500]) for k, v in cfg.model_dump().items()]
    for start in range(0, len(metrics), 900):
        client.log_batch(run.info.run_id, metrics=metrics[start:start + 900], params=params if start == 0 else [])
    for path in files:
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def run_bench(cfg: ShiftConfig) -> dict:
    """Run the benchmark (see the module docstring); returns the summary that `main` prints as JSON."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # `ray start` turns token authentication on (local_services)
    import ray
    from draftsmith.models import load_model
    from draftsmith.ports import pick_port
    from draftsmith.registry import DrafterRegistry
    from draftsmith.traffic import scan_traffic
    from ray import serve
    from ray.job_submission import JobSubmissionClient

    from pipelines.demo import register_initial_drafter, serve_args, wait_for_drafter
    from pipelines.local_services import start_services, stop_services
    from pipelines.replay import replay
    from pipelines.trigger import DistillTrigger
    from serve.app import build_app

    t0, started = time.time(), time.monotonic()
    state = Path(cfg.state_dir).expanduser().resolve()
    for line in stop_services(state):
        _say(f"stopped the previous run's {line}")
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    demo_cfg = cfg.demo_config()

    _say(f"loading the target {cfg.target}")
    target = load_model(cfg.target)
    heldout = select_prompts(target.tokenizer, "heldout", {CHAT: cfg.heldout_prompts, CODE: cfg.heldout_prompts},
                             cfg.max_prompt_tokens)
    train = select_prompts(target.tokenizer, "train", {CHAT: cfg.chat_requests, CODE: cfg.code_requests},
                           cfg.max_prompt_tokens)
    (state / "prompts.json").write_text(json.dumps({"heldout": heldout, "train": train}))

    _say(f"starting a Ray head, a spare node ({cfg.spare_slots} x draftsmith_spare, no CPU) and MLflow on 127.0.0.1")
    services = start_services(state, num_cpus=cfg.num_cpus, mlflow_port=cfg.mlflow_port,
                              dashboard_port=cfg.dashboard_port, spare_slots=cfg.spare_slots)
    spare_ids = [node.node_id for node in services.spare_nodes]
    ray.init(address=services.ray_address, configure_logging=False, log_to_driver=False)
    registry = DrafterRegistry(services.mlflow_url, model_name=cfg.model_name)
    initial = register_initial_drafter(target, registry, demo_cfg, state)
    _say(f"registered the untrained drafter {cfg.drafter} as v{initial.version} @champion")

    port = pick_port(cfg.serve_port)
    base = f"http://127.0.0.1:{port}"
    app = serve_args(demo_cfg, state, services.mlflow_url)
    app["traffic"] = {**app["traffic"], "log_features": True, "flush_every_records": cfg.flush_every_records,
                      "flush_every_seconds": cfg.flush_every_seconds}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app), name=APP_NAME, route_prefix="/")
    wait_for_drafter(base, initial.version, cfg.swap_timeout_s)
    _say(f"serving at {base}/v1 (num_speculative_tokens {cfg.gamma}, prompt lookup, features logged)")

    distill_yaml, evaluate_yaml = write_shift_job_configs(cfg, state, services.mlflow_url)
    trigger = DistillTrigger(_trigger_config(cfg, services, state, state_file="trigger.json", distill=distill_yaml,
                                             evaluate=evaluate_yaml))
    loop = TriggerLoop(trigger, registry, poll_seconds=cfg.poll_seconds, promote_always=cfg.promotion == "always")
    loop.start()

    rows: list[dict] = []
    windows_at: list[tuple[Segment, float]] = []
    common = {"concurrency": cfg.concurrency, "max_tokens": cfg.max_tokens}

    def send(prompts, phase: str, *, log: bool, gamma: int | None = None) -> None:
        rows.extend(r.as_row() for r in replay(base, prompts, phase=phase, log=log, num_speculative_tokens=gamma,
                                               **common))

    switch: dict = {}
    try:
        for segment in phase_schedule(cfg.chat_requests, cfg.code_requests, cfg.probe_every):
            if segment.kind == "serve":
                if segment.domain == CODE and segment.start == 0:
                    switch["at_s"] = round(time.time() - t0, 1)
                    switch["since"] = dt.datetime.now(dt.timezone.utc)
                send(train[segment.domain][segment.start:segment.stop], f"serve:{segment.domain}", log=True)
            elif segment.kind == "settle":
                _get_json(f"{base}/draftsmith/flush", method="POST", timeout=60)
                waited = time.monotonic()
                if cfg.settle_at_switch:
                    jobs = loop.settle(cfg.job_timeout_s)
                    _say(f"switch: the loop settled (waited for {', '.join(jobs) or 'no job'})")
                champion = registry.get_version_by_alias("champion")
                wait_for_drafter(base, champion.version, cfg.swap_timeout_s)
                switch.update(champion_version=champion.version, waited_s=round(time.monotonic() - waited, 1))
                _say(f"switch to code: champion v{champion.version}")
            else:
                windows_at.append((segment, time.time()))
                for domain in DOMAINS:
                    send(heldout[domain], f"probe{segment.probe}:{domain}", log=False)
                _say(f"probe {segment.probe} after {segment.served} logged requests ({segment.code_served} code)")

        # The end: the trigger sees the whole log once more, then stops; its job in flight is waited for.
        _get_json(f"{base}/draftsmith/flush", method="POST", timeout=60)
        loop.poll_now()
        loop.stop()
        last_job = loop.job_in_flight()
        if last_job and last_job not in loop.handled:
            _say(f"waiting for the last job {last_job}")
            outcome = trigger.wait(last_job, timeout_s=cfg.job_timeout_s, poll_s=2.0)
            loop.job_ended(last_job, outcome.status)
    except BaseException:
        loop.stop()
        raise
    champion = registry.get_version_by_alias("champion")
    wait_for_drafter(base, champion.version, cfg.swap_timeout_s)
    for domain in DOMAINS:
        send(heldout[domain], f"end:{domain}", log=False)
    for domain in DOMAINS:
        send(heldout[domain], f"off:{domain}", log=False, gamma=0)
    _say(f"end: champion v{champion.version}; training the offline drafter")

    before = {v.version for v in registry.list_versions()}
    start_version = switch.get("champion_version", initial.version) if cfg.offline_from == "switch" \
        else initial.version
    offline_yaml = write_offline_config(cfg, state, distill_yaml, since=switch["since"], start_version=start_version)
    offline_trigger = DistillTrigger(_trigger_config(cfg, services, state, state_file="offline-trigger.json",
                                                     distill=offline_yaml, evaluate=None))
    offline_jobs: list[str] = []
    for attempt in range(cfg.offline_attempts):
        offline_jobs.append(offline_trigger.submit(reason="bench shift: the offline drafter, all code traffic"))
        outcome = offline_trigger.wait(offline_jobs[-1], timeout_s=cfg.job_timeout_s, poll_s=2.0)
        if outcome.status == "SUCCEEDED":
            break
        _say(f"the offline job {offline_jobs[-1]} ended {outcome.status} (attempt {attempt + 1} of "
             f"{cfg.offline_attempts}):\n{outcome.logs_tail[-2000:]}")
    else:
        raise RuntimeError(f"the offline job failed {cfg.offline_attempts} times: {offline_jobs}")
    offline_version = max((v for v in registry.list_versions() if v.version not in before),
                          key=lambda v: int(v.version)).version
    registry.set_tags(offline_version, bench_shift="offline comparison drafter: served only to measure it")
    # Measured like the online drafter: served, same prompts and clients. The alias goes back afterwards.
    registry.set_alias(offline_version, "champion")
    wait_for_drafter(base, offline_version, cfg.swap_timeout_s)
    send(heldout[CODE], f"offline:{CODE}", log=False)
    registry.set_alias(champion.version, "champion")

    flushed = _get_json(f"{base}/draftsmith/flush", method="POST", timeout=60)
    records = scan_traffic(str(state / "traffic")).table.num_rows
    logged = [r for r in rows if r["phase"].startswith("serve:")]
    accounting = record_accounting(sum(not r["error"] for r in logged), sum(bool(r["error"]) for r in logged),
                                   records)
    client = JobSubmissionClient(services.dashboard_url)
    infos = [{"submission_id": j.submission_id, "status": str(j.status), "driver_node_id": j.driver_node_id,
              "start_time": j.start_time, "end_time": j.end_time, "metadata": j.metadata or {}}
             for j in client.list_jobs() if (j.submission_id or "").startswith("draftsmith-distill-")]
    jobs = job_records(infos, spare_ids, offline_jobs, t0)
    intervals = [(t0 + j["start_s"], t0 + j["end_s"]) for j in jobs
                 if j["kind"] == "online" and j["start_s"] is not None and j["end_s"] is not None]
    windows = [probe_entry(rows, segment, at, t0, intervals) for segment, at in windows_at]
    first_served: dict[str, float] = {}
    for r in sorted(rows, key=lambda r: r["finished"]):
        if r["drafter_version"] and not r["error"]:
            first_served.setdefault(str(r["drafter_version"]), float(r["finished"]))
    versions = version_records(registry.list_versions(), t0, first_served, offline_version)
    arm_names = [f"end:{CHAT}", f"end:{CODE}", f"off:{CHAT}", f"off:{CODE}", f"offline:{CODE}"]
    arms = {name: _pooled(rows, name) for name in arm_names}
    traffic_rows = [r for r in rows if r["phase"].startswith(("serve:", "probe"))]
    switch_out = {k: v for k, v in switch.items() if k != "since"}
    summary = build_summary(
        cfg=cfg, windows=windows, arms=arms, jobs=jobs, versions=versions, spare_node_ids=spare_ids,
        accounting=accounting, failed=sum(bool(r["error"]) for r in rows), requests=len(rows),
        serving_tok_s=throughput_split(traffic_rows, intervals), switch=switch_out,
        offline_version=offline_version, online_version=champion.version,
        extra={"traffic_log_bytes": _log_bytes(state / "traffic"), "flushed": flushed.get("written"),
               "trigger_polls": len(loop.polls), "trigger_poll_errors": sum("error" in p for p in loop.polls),
               "mlflow_url": services.mlflow_url, "ray_dashboard_url": services.dashboard_url,
               "endpoint": f"{base}/v1"})

    (state / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (state / "trigger_polls.jsonl").write_text("".join(json.dumps(p, default=str) + "\n" for p in loop.polls))
    table = format_shift_table(windows, arms)
    (state / "shift.txt").write_text(table + "\n")
    logged_ok = [r for r in rows if r["phase"].startswith("serve:")]
    plot = plot_shift(summary, state / "shift.png", x_of_time=lambda s: served_before(logged_ok, t0 + s),
                      title=f"Draftsmith bench shift: {cfg.target}, chat -> code, {cfg.concurrency} clients")
    summary["plot"] = str(plot)
    summary["elapsed_s"] = round(time.monotonic() - started, 1)
    (state / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    summary["mlflow_run_id"] = log_shift_run(services.mlflow_url, cfg, summary, [
        plot, state / "shift.txt", state / "summary.json", state / "requests.jsonl", state / "trigger_polls.jsonl"])
    print(table)
    ray.shutdown()
    if not cfg.leave_up:
        stop_services(state)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="draftsmith bench shift", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CPU size (QUICK)")
    parser.add_argument("--target", help="target model spec (tiny: the tests' random model)")
    parser.add_argument("--state-dir", help="where everything is written (wiped at start)")
    parser.add_argument("--leave-up", action="store_true", help="leave Ray, Serve and MLflow running")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any ShiftConfig field (YAML value), e.g. --set code_requests=480")
    args = parser.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    for item in args.set:
        key, _, value = item.partition("=")
        values[key.strip()] = yaml.safe_load(value)
    for key in ("target", "state_dir"):
        if getattr(args, key):
            values[key] = getattr(args, key)
    if args.leave_up:
        values["leave_up"] = True
    cfg = ShiftConfig(**values)
    try:
        summary = run_bench(cfg)
    except BaseException:
        if not cfg.leave_up:
            from pipelines.local_services import stop_services

            stop_services(Path(cfg.state_dir).expanduser().resolve())
        raise
    print(f"\nCode held-out token acceptance at the end: online {summary['online_token_acceptance']} vs offline "
          f"{summary['offline_token_acceptance']} (recovery after {summary['recovery_requests']} code requests); "
          f"chat retention {summary['chat_retention']}; served speedup over speculation off: code "
          f"{summary['code_speedup_end']}x, chat {summary['chat_speedup_end']}x; {summary['online_jobs']} online "
          f"jobs, all on the spare node: {summary['all_jobs_on_spare_node']}; {summary['failed_requests']} failed "
          f"requests, {summary['lost_records']} lost records.")
    print(json.dumps(summary, default=str))
    ok = summary["failed_requests"] == 0 and summary["lost_records"] == 0 and summary["all_jobs_on_spare_node"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
