"""The traffic logger on the Serve side: records built in the replica, written by one logger actor.

What it does: turns a finished `GenerationResult` into a `TrafficRecord` (`record_from_result`, pure; with
the target's features when the engine captured them, `traffic.log_features`, which the writer puts in a
side file beside the part),
decides per request whether it may be logged (`logging_opted_out`, pure), and runs `TrafficLogger`,
a Serve deployment (one Ray actor managed by Serve, so it lives and dies with the application) that
wraps `draftsmith.traffic.TrafficWriter`: replicas send it batches off the request path, it buffers
them and writes hour-partitioned Parquet files every N records or T seconds from a background task.

Delivery contract (what makes a killed logger lose nothing): `log_batch` acknowledges receipt with
`{"instance", "seq"}`: this logger incarnation's id and the sequence number its writer reached. The
records are durable once `durable()` reports the same instance with `durable_through >= seq`. A
replica keeps what it sent until then; if `durable()` or a later ack names another instance, the
logger died with those records in its buffer and the replica sends them again (traffic_sender.py). So a
logger kill loses nothing a replica still holds; what the replicas cannot deliver at all is counted
by them (`draftsmith_traffic_records_undelivered`).

What it does not do: Parquet layout, atomic renames and reading (draftsmith.traffic), redaction
policy beyond applying the configured hook (the replica applies `drop_text` before sending, so text
a deployment must not keep never leaves the replica).
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import uuid
from typing import Any, Mapping

from ray import serve

from draftsmith.traffic import TrafficRecord, TrafficWriter
from serve.config import SERVING_LABEL_SELECTOR

logger = logging.getLogger(__name__)

NO_LOG_HEADER = "x-draftsmith-no-log"
_TRUE = {"1", "true", "yes", "on"}


def logging_opted_out(headers: Mapping[str, str], log_field: bool | None) -> bool:
    """True if the request asked not to be logged: `draftsmith.log: false` or `X-Draftsmith-No-Log: 1`."""
    if log_field is False:
        return True
    value = next((v for k, v in headers.items() if k.lower() == NO_LOG_HEADER), None)
    return value is not None and value.strip().lower() in _TRUE


def longest_draft(stats) -> int:
    """The longest draft verified for a request (0: it never speculated), from its RequestStats."""
    return max((length for length, n in stats.draft_length_counts.items() if n), default=0)


def record_from_result(result, *, target_id: str, target_revision: str, tokenizer_hash: str,
                       params, prompt_text: str | None = None, user: str | None = None,
                       created_at: dt.datetime | None = None) -> TrafficRecord:
    """One TrafficRecord from a specdec.GenerationResult and the request's sampling params. Its
    num_speculative_tokens is the longest draft actually verified (drafter or lookup), never a configured
    gamma: a batch run autoregressively logs 0. The result's features (captured by the engine with
    `traffic.log_features`) ride along as float16 numpy; features of an unexpected shape are left out
    (logged as an error) rather than failing the request."""
    drafter_version = result.drafter_version if result.drafter_version not in (None, "none") else ""
    features = getattr(result, "features", None)
    if features is not None:
        positions = len(result.prompt_token_ids) + len(result.output_token_ids) - 1
        if len(features.shape) != 2 or features.shape[0] != positions:
            logger.error("request %s: the engine kept features of shape %s for %d positions; logging the record "
                         "without them", result.request_id, tuple(features.shape), positions)
            features = None
        else:
            features = features.numpy() if hasattr(features, "numpy") else features  # float16, on the CPU
    return TrafficRecord(
        request_id=result.request_id,
        created_at=created_at or dt.datetime.now(dt.timezone.utc),
        source="served",
        target_id=target_id,
        target_revision=target_revision,
        tokenizer_hash=tokenizer_hash,
        drafter_version=drafter_version,
        temperature=float(params.temperature),
        top_p=float(params.top_p),
        top_k=int(params.top_k),
        max_tokens=int(params.max_tokens),
        seed=params.seed,
        num_speculative_tokens=longest_draft(result.stats),
        prompt_token_ids=[int(t) for t in result.prompt_token_ids],
        output_token_ids=[int(t) for t in result.output_token_ids],
        target_topk_ids=result.topk_ids.tolist(),  # [n_out][k]
        target_topk_logprobs=result.topk_logprobs.float().tolist(),  # [n_out][k]
        accept_mask=[bool(x) for x in result.accept_mask.tolist()],  # [n_out]
        drafted=int(result.stats.drafted),
        accepted=int(result.stats.accepted),
        compared=int(result.stats.compared),
        verify_steps=int(result.stats.steps),
        policy_off_steps=int(result.stats.policy_off_steps),
        proposer=result.stats.proposer,
        lookup_drafted=int(result.stats.lookup_drafted),
        lookup_accepted=int(result.stats.lookup_accepted),
        lookup_compared=int(result.stats.lookup_compared),
        finish_reason=result.finish_reason,
        prompt_text=prompt_text,
        output_text=result.text,
        user=user,
        features=features,
    )


_SEEN_LIMIT = 200_000  # ~20 MB of ids; far more than a retry window holds


class TrafficLoggerImpl:
    """Buffers records from every replica and writes them with one TrafficWriter (Ray-free core)."""

    def __init__(self, uri: str, *, flush_every_records: int = 256, flush_every_seconds: float = 30.0):
        self.writer = TrafficWriter(uri, flush_every_records=flush_every_records,
                                    flush_every_seconds=flush_every_seconds)
        self.received = 0
        self.failed_flushes = 0
        self.instance = uuid.uuid4().hex  # a restarted logger is another instance: replicas resend to it
        # Request ids seen lately: a batch retried after a lost ack is not written twice.
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.duplicates_ignored = 0

    async def log_batch(self, records: list[TrafficRecord]) -> dict[str, Any]:
        """Buffer `records`; the ack says which sequence number must become durable (see `durable`)."""
        fresh = []
        for record in records:
            if record.request_id in self._seen:
                self.duplicates_ignored += 1
                continue
            self._seen[record.request_id] = None
            fresh.append(record)
        while len(self._seen) > _SEEN_LIMIT:
            self._seen.popitem(last=False)
        self.received += len(fresh)
        # Buffered before the first await: once an id is marked seen its record must be in the buffer,
        # or a call cancelled at that await (its caller gave up) would leave a record that no retry can
        # bring back, as the retry is ignored as a duplicate.
        self.writer.buffer(fresh)
        await self.maybe_flush()  # a flush writes Parquet: kept off the loop; a failed one keeps the records
        # Read after the adds: may include other batches' records, which only makes the wait conservative.
        return {"instance": self.instance, "seq": self.writer.records_added, "n": len(records),
                "durable_through": self.writer.durable_through}

    def durable(self) -> dict[str, Any]:
        """Every record acknowledged with `seq <= durable_through` by this `instance` is on storage."""
        return {"instance": self.instance, "durable_through": self.writer.durable_through}

    async def maybe_flush(self) -> None:
        try:
            await asyncio.to_thread(self.writer.maybe_flush)
        except Exception:  # noqa: BLE001
            self.failed_flushes += 1
            logger.exception("traffic flush to %s failed; records stay buffered", self.writer.root)

    async def flush(self) -> dict[str, Any]:
        await asyncio.to_thread(self.writer.flush)
        return self.stats()

    def stats(self) -> dict[str, Any]:
        w = self.writer
        return {"received": self.received, "written": w.records_written, "buffered": w.records_buffered,
                "files": w.files_written, "dropped": w.records_dropped, "failed_flushes": self.failed_flushes,
                "uri": w.root, "instance": self.instance, "durable_through": w.durable_through,
                "seconds_since_flush": w.seconds_since_flush, "duplicates_ignored": self.duplicates_ignored,
                "features_written": w.features_written, "features_bytes": w.features_bytes,
                "features_failed": w.features_failed}


# A short health-check period: a killed logger is noticed and replaced in seconds, not Serve's default 10 s. Never on
# a spare node (serve.config.SERVING_LABEL_SELECTOR): it asks for no CPU, so only the selector keeps it off one.
@serve.deployment(name="TrafficLogger", num_replicas=1, max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0, "label_selector": dict(SERVING_LABEL_SELECTOR)},
                  health_check_period_s=2.0)
class TrafficLogger(TrafficLoggerImpl):
    """The logger actor: `log_batch` (from replicas, off the request path), `durable()`, `flush()`, `stats()`."""

    def __init__(self, uri: str, flush_every_records: int = 256, flush_every_seconds: float = 30.0):
        super().__init__(uri, flush_every_records=flush_every_records, flush_every_seconds=flush_every_seconds)
        self._tick = min(1.0, flush_every_seconds / 2)
        self._task = asyncio.get_event_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._tick)
            await self.maybe_flush()  # the time-based flush, even when no new records arrive

    def __del__(self):
        self._task.cancel()
        try:
            self.writer.flush()
        except Exception:  # noqa: BLE001
            logger.exception("final traffic flush failed")
