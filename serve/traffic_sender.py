"""At-least-once delivery of a replica's traffic records to the traffic logger (logger.py).

What it does: `TrafficSender` queues the records of finished requests and sends them to the logger in
batches from one asyncio task, and keeps these guarantees (the logger's half is in logger.py):
- hand-off: with `confirm_before_response` a response waits (`handed_off`, bounded by
  `handoff_timeout_s`) until the logger has received its record, one call shared by the requests
  finishing together, so a replica killed after answering has lost no record; a response that times
  out goes out with its record still queued (counted in `handoff_timeouts`);
- resend: records stay held after the logger received them until it reports them on storage
  (`durable_through` of the same logger instance); if an answer names another instance, the logger
  died first and the held records are sent again, ahead of the queue (`log_resent`);
- bounded calls: every logger call has a timeout (`logger_call_timeout_s`) and a failed send is
  retried with backoff; after `send_retries` failures a batch is given up, and beyond
  `max_unconfirmed_records` the oldest held records are released; both are counted
  (`draftsmith_traffic_records_undelivered`, `log_send_failures`, `log_released_unconfirmed`);
- the sender task runs in a context of its own, so its logger calls belong to no Serve request and are
  never cancelled with one; a sender that dies is restarted by the next request;
- `flush` sends what is queued, makes the logger write, and before it answers resends what a logger
  replaced since the last send held.
- features (`traffic.log_features`) travel with the first send only: once the logger has received a
  record, the copy held for a resend drops them, so what a replica holds stays the size of the records
  themselves; a record resent after a logger died is logged without features, and training recomputes
  those.

What it does not do: build or redact records (spec_pair.py), write Parquet (logger.py, draftsmith.traffic).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time

from draftsmith.traffic import drop_features
from serve.config import TrafficSettings
from serve.metrics import ReplicaMetrics

logger = logging.getLogger(__name__)


class TrafficSender:
    def __init__(self, traffic_logger, settings: TrafficSettings, metrics: ReplicaMetrics, model_name: str):
        self.handle = traffic_logger  # the TrafficLogger deployment handle (or a stand-in with .remote calls)
        self.settings = settings
        self.metrics = metrics
        self.model_name = model_name
        self.pending: list = []  # records not yet received by the logger, oldest first
        self._handoff: dict[str, asyncio.Future] = {}  # request id -> resolved once its record was received
        self._unconfirmed: list[tuple[str, int, list]] = []  # (logger instance, seq, records) not yet on storage
        self._resend: list = []  # records a dead logger held; the sender puts them back in front of the queue
        self.logger_instance: str | None = None
        self._send_attempts = 0
        self._last_confirm = 0.0
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self.counts = {"logged_sent": 0, "log_send_failures": 0, "log_resent": 0, "log_released_unconfirmed": 0,
                       "handoff_timeouts": 0}

    # ----- the replica's side ---------------------------------------------------------------------
    def ensure_started(self) -> None:
        """Start the sender task on the running loop if it is not running (called by every request)."""
        if self._task is None and self.connected:
            self._wake, self._lock = asyncio.Event(), asyncio.Lock()
            # A context of its own: created inside a request, the task would carry that request's Serve
            # context, and Serve cancels the logger calls made under a request id when that request ends
            # (an SSE stream's handle is cancelled once its last chunk is out), which killed the sender.
            self._task = asyncio.get_running_loop().create_task(self._send_forever(), context=contextvars.Context())
            self._task.add_done_callback(self._ended)

    @property
    def connected(self) -> bool:
        """Whether there is a logger to send to (none: traffic logging is off in this application)."""
        return self.handle is not None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def enqueue(self, record) -> None:
        """Queue one record; with confirm_before_response its response can then wait in `handed_off`."""
        self.pending.append(record)
        if self.settings.confirm_before_response:
            self._handoff[record.request_id] = asyncio.get_running_loop().create_future()
        if (self.settings.confirm_before_response or len(self.pending) >= self.settings.send_batch_size) \
                and self._wake is not None:
            self._wake.set()

    async def handed_off(self, request_id: str) -> None:
        """Wait (bounded) until the logger has received this request's record."""
        future = self._handoff.get(request_id)
        if future is None:
            return
        try:
            async with asyncio.timeout(self.settings.handoff_timeout_s):
                await asyncio.shield(future)
        except TimeoutError:  # the logger is restarting: answer anyway, the record stays queued
            self.counts["handoff_timeouts"] += 1
            self._handoff.pop(request_id, None)

    async def flush(self) -> dict:
        """Send what is queued, make the logger write its buffer, settle what is on storage (tests, shutdown)."""
        if not self.connected:
            return {}
        self.ensure_started()
        for _ in range(3):  # a replaced logger is found out by the flush: send it what the old one held
            await self.send_pending()
            stats = await self._call("flush")
            self._settle(stats["instance"], stats["durable_through"])
            if not self._resend:
                break
        return {**stats, "pending_records": len(self.pending), "unconfirmed_records": self.unconfirmed_count}

    def status(self) -> dict:
        return {"pending_records": len(self.pending), "logger_instance": self.logger_instance,
                "sender_running": self.running, "unconfirmed_records": self.unconfirmed_count, **self.counts}

    @property
    def unconfirmed_count(self) -> int:
        return sum(len(batch) for _, _, batch in self._unconfirmed)

    # ----- the sender task ------------------------------------------------------------------------
    def _ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("traffic sender stopped: %r; restarting it with the next request", task.exception())
        self._task = None  # the next request starts another

    async def _call(self, method: str, *args):
        """One call to the logger, bounded: a call that never answers must not stall the sender."""
        response = getattr(self.handle, method).remote(*args)
        try:
            async with asyncio.timeout(self.settings.logger_call_timeout_s):
                return await response
        except TimeoutError:
            response.cancel()
            raise TimeoutError(f"traffic logger {method} did not answer in "
                               f"{self.settings.logger_call_timeout_s} s") from None

    async def _send_forever(self) -> None:
        interval = self.settings.send_interval_seconds
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation that lands
            # as the wait completes, and the sender must stop when its loop shuts down.
            try:
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.send_pending()
                if time.monotonic() - self._last_confirm >= interval:
                    await self._confirm()
            except Exception:  # noqa: BLE001  the sender must survive anything
                logger.exception("traffic sender failed; retrying")

    async def send_pending(self) -> None:
        """Send every queued record, one batch at a time; on failure back off and leave them queued."""
        t = self.settings
        async with self._lock:
            while self.pending or self._resend:
                if self._resend:  # only here, under the lock, so the front of the queue never moves mid-send
                    self.pending[:0], self._resend = self._resend, []
                batch = self.pending[: t.send_batch_size]
                try:
                    ack = await self._call("log_batch", batch)
                except Exception as error:  # noqa: BLE001  logger dead or restarting
                    self._send_attempts += 1
                    if self._send_attempts <= t.send_retries:
                        logger.warning("traffic logger unreachable (%s: %s); %d records queued, attempt %d",
                                       type(error).__name__, error, len(self.pending), self._send_attempts)
                        await asyncio.sleep(min(2.0, 0.1 * 2 ** self._send_attempts))
                        return
                    del self.pending[: len(batch)]
                    self._send_attempts = 0
                    self._give_up(batch, "unreachable", error)
                    continue
                # Only the sender removes from the front; requests append at the end meanwhile.
                del self.pending[: len(batch)]
                self._send_attempts = 0
                self.counts["logged_sent"] += len(batch)
                self._resolve_handoffs(batch)
                self._unconfirmed.append((ack["instance"], int(ack["seq"]), [drop_features(r) for r in batch]))
                self._settle(ack["instance"], ack.get("durable_through"))

    def _settle(self, instance: str, durable_through: int | None) -> None:
        """Drop records the logger reports on storage; resend those a dead logger instance held."""
        if self.logger_instance is not None and instance != self.logger_instance:
            lost = [r for inst, _, batch in self._unconfirmed if inst != instance for r in batch]
            self._unconfirmed = [entry for entry in self._unconfirmed if entry[0] == instance]
            if lost:
                logger.warning("traffic logger %s was replaced by %s before writing %d records: resending them",
                               self.logger_instance, instance, len(lost))
                self.counts["log_resent"] += len(lost)
                self.metrics.inc(self.metrics.resent, len(lost), {"model": self.model_name})
                self._resend.extend(lost)
                if self._wake is not None:
                    self._wake.set()
        self.logger_instance = instance
        if durable_through is not None:
            self._unconfirmed = [e for e in self._unconfirmed if not (e[0] == instance and e[1] <= durable_through)]
        held = self.unconfirmed_count
        while held > self.settings.max_unconfirmed_records and self._unconfirmed:
            _, _, batch = self._unconfirmed.pop(0)
            held -= len(batch)
            self.counts["log_released_unconfirmed"] += len(batch)
            self.metrics.inc(self.metrics.undelivered, len(batch), {"model": self.model_name, "reason": "unconfirmed"})

    async def _confirm(self) -> None:
        self._last_confirm = time.monotonic()
        if not self._unconfirmed:
            return
        try:
            durable = await self._call("durable")
        except Exception as error:  # noqa: BLE001  the next send or check settles it
            logger.warning("cannot ask the traffic logger what is on storage: %s", error)
            return
        self._settle(durable["instance"], durable["durable_through"])

    def _resolve_handoffs(self, batch: list) -> None:
        """Release the responses waiting on these records."""
        for record in batch:
            future = self._handoff.pop(record.request_id, None)
            if future is not None and not future.done():
                future.set_result(True)

    def _give_up(self, batch: list, reason: str, error: BaseException) -> None:
        self.counts["log_send_failures"] += len(batch)
        self.metrics.inc(self.metrics.undelivered, len(batch), {"model": self.model_name, "reason": reason})
        self._resolve_handoffs(batch)
        logger.error("gave up sending %d traffic records to the logger: %s: %s", len(batch),
                     type(error).__name__, error)
