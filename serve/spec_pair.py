"""The SpecPair deployment: one replica = one target + its drafter, continuously batched, hot-swappable.

What it does: a replica loads the target, resolves its drafter from a source (drafter_source.py) and
hands both to one `SpecEngine`, owned by one engine thread (`EngineLoop`) that calls `step()` while
it has work. Requests submit a `Request` and receive `StepOutput`s through an asyncio queue fed with
`loop.call_soon_threadsafe`; new requests join the running batch between steps (never one request
at a time behind a lock). A poller thread checks the source every N seconds (and on `reconfigure`),
loads a new version in the background and asks the engine thread to `set_drafter` between steps; a
drafter that fails to load or does not fit the target is refused, logged and counted, and the old
one keeps serving. Finished requests become TrafficRecords sent to the logger in batches by one
sender task; by default a response waits until its record's batch was received (so a replica killed
after answering has lost no record), and the replica keeps sent records until the logger reports them
on storage, resending them if the logger died first (logger.py's delivery contract). What it could not
deliver at all is counted (`draftsmith_traffic_records_undelivered`). Metrics go through
`ray.util.metrics`.

What it does not do: HTTP, tokenization or the OpenAI protocol (app.py, protocol.py), decoding math
(draftsmith.specdec), writing Parquet (logger.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import queue
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable

import torch
from ray import serve
from ray.util import metrics

from draftsmith import models
from draftsmith.layer_parallel import LayerParallelConfig, install, split_target
from draftsmith.sampling import SamplingParams
from draftsmith.specdec import EngineConfig, Request, SpecEngine, StepOutput, runner_for
from draftsmith.traffic import drop_text
from serve.config import ServeAppConfig, parse_app_args
from serve.drafter_source import DrafterSource, make_source
from serve.logger import record_from_result

logger = logging.getLogger(__name__)

Sink = Callable[[Any], None]  # receives StepOutputs, or an exception that ends the request


class EngineLoop:
    """Owns a SpecEngine on one thread; everything else talks to it through commands."""

    def __init__(self, engine: SpecEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._wake = threading.Event()
        self._stopped = False
        self.steps = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="spec-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def submit(self, request: Request, sink: Sink) -> None:
        self._commands.put(("add", request, sink))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def set_drafter(self, runner, version: str) -> concurrent.futures.Future:
        """Swap between steps; the future completes (or raises the engine's refusal) once it is done."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not self.thread.is_alive():  # before start(): nobody else touches the engine yet
            self._set_drafter(runner, version, future)
        else:
            self._commands.put(("drafter", runner, version, future))
            self._wake.set()
        return future

    def _set_drafter(self, runner, version, future) -> None:
        try:
            self.engine.set_drafter(runner, version)
        except Exception as error:  # noqa: BLE001  the engine keeps its old drafter
            future.set_exception(error)
        else:
            future.set_result(version)

    def _drain(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            kind = command[0]
            if kind == "add":
                _, request, sink = command
                try:
                    self.engine.add_request(request)
                except Exception as error:  # noqa: BLE001  a bad request fails alone
                    sink(error)
                else:
                    self._sinks[request.request_id] = sink
            elif kind == "abort":
                self.engine.abort(command[1])
                self._sinks.pop(command[1], None)
            elif kind == "drafter":
                self._set_drafter(*command[1:])

    def _run(self) -> None:
        while not self._stopped:
            if not self.engine.has_work():
                self._wake.wait(timeout=1.0)
            self._wake.clear()
            self._drain()
            if not self.engine.has_work():
                continue
            try:
                outputs: list[StepOutput] = self.engine.step()
            except Exception as error:  # noqa: BLE001  fail the batch, keep the replica serving
                logger.exception("engine step failed; failing %d requests", len(self._sinks))
                self.error = error
                for request_id, sink in list(self._sinks.items()):
                    self.engine.abort(request_id)
                    sink(error)
                self._sinks.clear()
                continue
            self.steps += 1
            for out in outputs:
                sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
                if sink is not None:
                    sink(out)


class _Metrics:
    def __init__(self):
        tags = ("model", "drafter_version")
        self.requests = metrics.Counter("draftsmith_requests", "Completed requests.", tag_keys=tags + ("finish_reason",))
        self.output_tokens = metrics.Counter("draftsmith_output_tokens", "Output tokens.", tag_keys=tags)
        self.drafted = metrics.Counter("draftsmith_drafted_tokens", "Draft tokens proposed.", tag_keys=tags)
        self.accepted = metrics.Counter("draftsmith_accepted_tokens", "Draft tokens accepted.", tag_keys=tags)
        self.ttft = metrics.Histogram("draftsmith_time_to_first_token_seconds", "Time to first token.",
                                      boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
                                      tag_keys=tags)
        self.tpot = metrics.Histogram("draftsmith_time_per_output_token_seconds", "Per-output-token latency.",
                                      boundaries=[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1],
                                      tag_keys=tags)
        self.swaps = metrics.Counter("draftsmith_drafter_swaps", "Drafter hot swaps.", tag_keys=tags)
        self.refused = metrics.Counter("draftsmith_drafters_refused", "Drafters refused.",
                                       tag_keys=("model", "drafter_version", "reason"))
        self.undelivered = metrics.Counter("draftsmith_traffic_records_undelivered", "Traffic records a replica "
                                           "gave up sending (logger unreachable) or released unconfirmed.",
                                           tag_keys=("model", "reason"))
        self.resent = metrics.Counter("draftsmith_traffic_records_resent", "Traffic records sent again because the "
                                      "logger died before writing them.", tag_keys=("model",))


class SpecPairImpl:
    """The replica's logic, usable without Ray (unit tests construct it directly)."""

    def __init__(self, config: dict | ServeAppConfig, traffic_logger=None, *,
                 source_factory: Callable[..., DrafterSource | None] = make_source, start: bool = True):
        self.cfg = parse_app_args(config)
        cfg = self.cfg
        if cfg.placement.torch_threads:
            torch.set_num_threads(cfg.placement.torch_threads)
        device = cfg.placement.device
        if device == "auto":
            device = "cuda" if cfg.placement.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.target = models.load_model(cfg.target, device=device, dtype=getattr(torch, cfg.dtype))
        self.tokenizer_hash = self.target.tokenizer_hash
        tokenizer = self.target.tokenizer
        e = cfg.engine
        target_runner = runner_for(self.target.model, prepack=e.prepack_weights)
        split_target(target_runner, e.layer_parallel_devices)  # a multi-device pair: split over the same devices
        engine = SpecEngine(
            target_runner, None,
            config=EngineConfig(num_speculative_tokens=e.num_speculative_tokens, max_batch_size=e.max_batch_size,
                                max_model_len=e.max_model_len, topk_logprobs=e.topk_logprobs, seed=e.seed,
                                prompt_lookup_max=e.prompt_lookup_max, prompt_lookup_min=e.prompt_lookup_min,
                                disable_speculation_at_batch=e.disable_speculation_at_batch),
            eos_token_ids=self.target.eos_token_ids,
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        )
        self.loop = EngineLoop(engine)
        self.metrics = _Metrics()
        self.traffic_logger = traffic_logger
        self._redact = (lambda r: r) if cfg.traffic.log_text else drop_text
        self._pending: list = []  # records not yet received by the logger, oldest first
        self._handoff: dict[str, asyncio.Future] = {}  # request id -> resolved once its record was received
        self._unconfirmed: list[tuple[str, int, list]] = []  # (logger instance, seq, records) not yet on storage
        self._resend: list = []  # records a dead logger held; the sender puts them back in front of the queue
        self._logger_instance: str | None = None
        self._send_attempts = 0
        self._last_confirm = 0.0
        self._sender: asyncio.Task | None = None
        self._send_wake: asyncio.Event | None = None
        self._send_lock: asyncio.Lock | None = None
        self.counts = {"requests": 0, "errors": 0, "logged_sent": 0, "log_send_failures": 0, "opted_out": 0,
                       "log_resent": 0, "log_released_unconfirmed": 0, "handoff_timeouts": 0}
        # drafter state
        self._source_factory = source_factory
        self._source_spec: str | None = None
        self._source: DrafterSource | None = None
        self.drafter_version = "none"
        self.refused: dict[str, str] = {}
        self.swaps = 0
        self._check_lock = threading.Lock()
        self._poll_interval = cfg.drafter_poll_interval_s
        self._poll_wake = threading.Event()
        self._set_source(cfg.drafter)
        self.check_drafter()
        self._poller = threading.Thread(target=self._poll_forever, name="drafter-poller", daemon=True)
        if start:
            self.loop.start()
            self._poller.start()

    # ----- drafter hot swap -----------------------------------------------------------------------
    def _drafter_runner(self, drafter):
        """The engine's runner for a drafter, with the pair's layer-parallel plan installed when configured."""
        e = self.cfg.engine
        runner = runner_for(None, drafter, prepack=e.prepack_weights)
        plan = LayerParallelConfig(e.layer_parallel_group_size, tuple(e.layer_parallel_devices),
                                   tuple(e.layer_parallel_group_sizes))
        if plan.enabled:
            install(runner, plan)  # a plan this drafter cannot draft under raises: the swap is refused
        return runner

    def _tags(self, version: str | None = None) -> dict[str, str]:
        return {"model": self.cfg.model_name, "drafter_version": version or self.drafter_version}

    def _set_source(self, spec: str | None) -> None:
        self._source_spec = spec
        self._source = self._source_factory(spec, tracking_uri=self.cfg.mlflow_tracking_uri,
                                            registry_uri=self.cfg.mlflow_registry_uri)

    def reconfigure(self, user_config: dict | None) -> None:
        """Serve calls this with `user_config` (drafter source, poll interval); it triggers a check."""
        user_config = user_config or {}
        self._poll_interval = float(user_config.get("drafter_poll_interval_s", self._poll_interval))
        if "drafter" in user_config and user_config["drafter"] != self._source_spec:
            with self._check_lock:
                self._set_source(user_config["drafter"])
        self._poll_wake.set()

    def _poll_forever(self) -> None:
        while True:
            self._poll_wake.wait(timeout=self._poll_interval)
            self._poll_wake.clear()
            try:
                self.check_drafter()
            except Exception:  # noqa: BLE001  the poller must survive anything
                logger.exception("drafter check failed")

    def check_drafter(self) -> str:
        """Resolve the source; load and swap in a new version. Returns the version serving afterwards."""
        with self._check_lock:
            source = self._source
            if source is None:
                if self.drafter_version != "none":
                    self.loop.set_drafter(None, "none").result(timeout=120)
                    self.drafter_version = "none"
                return self.drafter_version
            try:
                ref = source.current()
            except Exception as error:  # noqa: BLE001
                logger.warning("drafter source %s: %s; keeping %s", source.spec, error, self.drafter_version)
                return self.drafter_version
            if ref.version == self.drafter_version or ref.version in self.refused:
                return self.drafter_version
            started = time.perf_counter()
            try:
                drafter = ref.load(self.target)
                self.loop.set_drafter(self._drafter_runner(drafter), ref.version).result(timeout=120)
            except Exception as error:  # noqa: BLE001  refuse, keep the old drafter
                reason = f"{type(error).__name__}: {error}"
                if ref.location and ref.location not in reason:  # e.g. a truncated safetensors file
                    reason += f" (drafter at {ref.location})"
                self.refused[ref.version] = reason
                self.metrics.refused.inc(tags={**self._tags(ref.version), "reason": type(error).__name__})
                logger.error("refused drafter %s from %s (%s); still serving %s", ref.version, source.spec,
                             reason, self.drafter_version)
                return self.drafter_version
            previous, self.drafter_version = self.drafter_version, ref.version
            self.swaps += 1
            self.metrics.swaps.inc(tags=self._tags())
            logger.info("drafter %s -> %s (%.1f s to load)", previous, ref.version, time.perf_counter() - started)
            return self.drafter_version

    # ----- requests -------------------------------------------------------------------------------
    def _request(self, payload: dict) -> Request:
        e = self.cfg.engine
        gamma = payload.get("num_speculative_tokens")
        if payload.get("speculative") is False:
            gamma = 0
        if gamma is not None and gamma > e.max_num_speculative_tokens:
            raise ValueError(f"num_speculative_tokens must be <= {e.max_num_speculative_tokens}, got {gamma}.")
        params = SamplingParams(
            max_tokens=int(payload["max_tokens"]), temperature=float(payload.get("temperature", 1.0)),
            top_p=float(payload.get("top_p", 1.0)), stop=tuple(payload.get("stop") or ()),
            seed=payload.get("seed"))
        return Request(payload.get("request_id") or uuid.uuid4().hex, list(payload["prompt_token_ids"]),
                       params, num_speculative_tokens=gamma)

    async def _run(self, payload: dict) -> AsyncIterator[dict]:
        """Submit one request; yield coalesced chunks {text, n_tokens} and a final chunk with the figures."""
        self._ensure_sender()
        try:
            request = self._request(payload)
        except ValueError as error:
            yield {"error": {"message": str(error), "type": "invalid_request_error", "param": None, "code": None}}
            return
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        submitted = time.perf_counter()
        self.loop.submit(request, lambda item: loop.call_soon_threadsafe(inbox.put_nowait, item))
        first_token_at, finished = None, False
        try:
            while not finished:
                items = [await inbox.get()]
                while not inbox.empty():  # coalesce steps the consumer has not taken yet
                    items.append(inbox.get_nowait())
                chunk = {"text": "", "n_tokens": 0}
                for item in items:
                    if isinstance(item, BaseException):
                        finished = True
                        user_error = isinstance(item, ValueError)
                        self.counts["errors"] += not user_error
                        yield {"error": {"message": str(item) if user_error else f"engine error: {item}",
                                         "type": "invalid_request_error" if user_error else "server_error",
                                         "param": None, "code": None}}
                        return
                    chunk["text"] += item.text_delta
                    chunk["n_tokens"] += len(item.new_token_ids)
                    if first_token_at is None and item.new_token_ids:
                        first_token_at = time.perf_counter()
                    if item.finished:
                        finished = True
                        chunk.update(self._finish(payload, request, item, submitted, first_token_at))
                        await self._handed_off(request.request_id)
                if chunk["n_tokens"] or chunk["text"] or finished:
                    yield chunk
        finally:
            if not finished:  # the client went away: free the slot
                self.loop.abort(request.request_id)

    def _finish(self, payload: dict, request: Request, out: StepOutput, submitted: float,
                first_token_at: float | None) -> dict:
        result = out.result
        stats = result.stats
        version = result.drafter_version
        tags = self._tags(version)
        n_out = len(result.output_token_ids)
        now = time.perf_counter()
        self.counts["requests"] += 1
        try:  # metrics must never fail a request
            self.metrics.requests.inc(tags={**tags, "finish_reason": result.finish_reason})
            for counter, value in ((self.metrics.output_tokens, n_out), (self.metrics.drafted, stats.drafted),
                                   (self.metrics.accepted, stats.accepted)):
                if value > 0:  # ray's Counter.inc refuses 0
                    counter.inc(value, tags=tags)
            if first_token_at is not None:
                self.metrics.ttft.observe(first_token_at - submitted, tags=tags)
                if n_out > 1:
                    self.metrics.tpot.observe((now - first_token_at) / (n_out - 1), tags=tags)
        except Exception:  # noqa: BLE001
            logger.exception("recording metrics failed")
        gamma = request.num_speculative_tokens
        gamma = self.cfg.engine.num_speculative_tokens if gamma is None else gamma
        if self.traffic_logger is not None and self.cfg.traffic.enabled:
            if payload.get("log", True):
                record = record_from_result(
                    result, target_id=self.target.model_id, target_revision=self.target.revision,
                    tokenizer_hash=self.tokenizer_hash, params=request.params,
                    num_speculative_tokens=gamma, prompt_text=payload.get("prompt_text"), user=payload.get("user"))
                self._pending.append(self._redact(record))
                t = self.cfg.traffic
                if t.confirm_before_response:
                    self._handoff[record.request_id] = asyncio.get_running_loop().create_future()
                if (t.confirm_before_response or len(self._pending) >= t.send_batch_size) and self._send_wake:
                    self._send_wake.set()
            else:
                self.counts["opted_out"] += 1
        return {
            "finish_reason": result.finish_reason,
            "usage": {"prompt_tokens": len(result.prompt_token_ids), "completion_tokens": n_out,
                      "total_tokens": len(result.prompt_token_ids) + n_out},
            "draftsmith": {
                "drafter_version": version if version != "none" else None,
                "num_speculative_tokens": gamma if version != "none" else 0,
                "drafted": stats.drafted, "accepted": stats.accepted, "compared": stats.compared,
                "steps": stats.steps, "emitted_in_steps": stats.emitted_in_steps,
                "acceptance_rate": stats.acceptance_rate, "token_acceptance": stats.token_acceptance,
                "mean_accepted_length": stats.mean_accepted_length,
            },
        }

    # ----- traffic --------------------------------------------------------------------------------
    def _ensure_sender(self) -> None:
        if self._sender is None and self.traffic_logger is not None:
            self._send_wake, self._send_lock = asyncio.Event(), asyncio.Lock()
            # A context of its own: created inside a request, the task would carry that request's Serve
            # context, and Serve cancels the logger calls made under a request id when that request ends
            # (an SSE stream's handle is cancelled once its last chunk is out), which killed the sender.
            self._sender = asyncio.get_running_loop().create_task(self._send_forever(),
                                                                  context=contextvars.Context())
            self._sender.add_done_callback(self._sender_ended)

    def _sender_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("traffic sender stopped: %r; restarting it with the next request", task.exception())
        self._sender = None  # the next request starts another

    async def _call_logger(self, method: str, *args):
        """One call to the logger, bounded: a call that never answers must not stall the sender."""
        response = getattr(self.traffic_logger, method).remote(*args)
        try:
            async with asyncio.timeout(self.cfg.traffic.logger_call_timeout_s):
                return await response
        except TimeoutError:
            response.cancel()
            raise TimeoutError(f"traffic logger {method} did not answer in "
                               f"{self.cfg.traffic.logger_call_timeout_s} s") from None

    async def _handed_off(self, request_id: str) -> None:
        """Wait (bounded) until the logger has received this request's record."""
        future = self._handoff.get(request_id)
        if future is None:
            return
        try:
            async with asyncio.timeout(self.cfg.traffic.handoff_timeout_s):
                await asyncio.shield(future)
        except TimeoutError:  # the logger is restarting: answer anyway, the record stays queued
            self.counts["handoff_timeouts"] += 1
            self._handoff.pop(request_id, None)

    async def _send_forever(self) -> None:
        interval = self.cfg.traffic.send_interval_seconds
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation that lands
            # as the wait completes, and the sender must stop when its loop shuts down.
            try:
                async with asyncio.timeout(interval):
                    await self._send_wake.wait()
            except TimeoutError:
                pass
            self._send_wake.clear()
            try:
                await self._send_pending()
                if time.monotonic() - self._last_confirm >= interval:
                    await self._confirm()
            except Exception:  # noqa: BLE001  the sender must survive anything
                logger.exception("traffic sender failed; retrying")

    async def _send_pending(self) -> None:
        """Send every queued record, one batch at a time; on failure back off and leave them queued."""
        t = self.cfg.traffic
        async with self._send_lock:
            while self._pending or self._resend:
                if self._resend:  # only here, under the lock, so the front of the queue never moves mid-send
                    self._pending[:0], self._resend = self._resend, []
                batch = self._pending[: t.send_batch_size]
                try:
                    ack = await self._call_logger("log_batch", batch)
                except Exception as error:  # noqa: BLE001  logger dead or restarting
                    self._send_attempts += 1
                    if self._send_attempts <= t.send_retries:
                        logger.warning("traffic logger unreachable (%s: %s); %d records queued, attempt %d",
                                       type(error).__name__, error, len(self._pending), self._send_attempts)
                        await asyncio.sleep(min(2.0, 0.1 * 2 ** self._send_attempts))
                        return
                    del self._pending[: len(batch)]
                    self._send_attempts = 0
                    self._give_up(batch, "unreachable", error)
                    continue
                # Only the sender removes from the front; requests append at the end meanwhile.
                del self._pending[: len(batch)]
                self._send_attempts = 0
                self.counts["logged_sent"] += len(batch)
                self._resolve_handoffs(batch, True)
                self._unconfirmed.append((ack["instance"], int(ack["seq"]), batch))
                self._settle(ack["instance"], ack.get("durable_through"))

    def _settle(self, instance: str, durable_through: int | None) -> None:
        """Drop records the logger reports on storage; resend those a dead logger instance held."""
        if self._logger_instance is not None and instance != self._logger_instance:
            lost = [r for inst, _, batch in self._unconfirmed if inst != instance for r in batch]
            self._unconfirmed = [entry for entry in self._unconfirmed if entry[0] == instance]
            if lost:
                logger.warning("traffic logger %s was replaced by %s before writing %d records: resending them",
                               self._logger_instance, instance, len(lost))
                self.counts["log_resent"] += len(lost)
                self._inc(self.metrics.resent, len(lost), {"model": self.cfg.model_name})
                self._resend.extend(lost)
                if self._send_wake is not None:
                    self._send_wake.set()
        self._logger_instance = instance
        if durable_through is not None:
            self._unconfirmed = [e for e in self._unconfirmed if not (e[0] == instance and e[1] <= durable_through)]
        held = self._unconfirmed_count
        while held > self.cfg.traffic.max_unconfirmed_records and self._unconfirmed:
            _, _, batch = self._unconfirmed.pop(0)
            held -= len(batch)
            self.counts["log_released_unconfirmed"] += len(batch)
            self._inc(self.metrics.undelivered, len(batch), {"model": self.cfg.model_name, "reason": "unconfirmed"})

    async def _confirm(self) -> None:
        self._last_confirm = time.monotonic()
        if not self._unconfirmed:
            return
        try:
            durable = await self._call_logger("durable")
        except Exception as error:  # noqa: BLE001  the next send or check settles it
            logger.warning("cannot ask the traffic logger what is on storage: %s", error)
            return
        self._settle(durable["instance"], durable["durable_through"])

    def _resolve_handoffs(self, batch: list, received: bool) -> None:
        """Release the responses waiting on these records (`received`: the logger has them)."""
        for record in batch:
            future = self._handoff.pop(record.request_id, None)
            if future is not None and not future.done():
                future.set_result(received)

    @property
    def _unconfirmed_count(self) -> int:
        return sum(len(batch) for _, _, batch in self._unconfirmed)

    def _give_up(self, batch: list, reason: str, error: BaseException) -> None:
        self.counts["log_send_failures"] += len(batch)
        self._inc(self.metrics.undelivered, len(batch), {"model": self.cfg.model_name, "reason": reason})
        self._resolve_handoffs(batch, False)
        logger.error("gave up sending %d traffic records to the logger: %s: %s", len(batch),
                     type(error).__name__, error)

    @staticmethod
    def _inc(counter, value: int, tags: dict) -> None:
        try:  # metrics must never break delivery
            counter.inc(value, tags=tags)
        except Exception:  # noqa: BLE001
            logger.exception("recording a traffic metric failed")

    async def flush_traffic(self) -> dict:
        """Send what is queued, make the logger write its buffer, settle what is on storage (tests, shutdown)."""
        if self.traffic_logger is None:
            return {}
        self._ensure_sender()
        for _ in range(3):  # a replaced logger is found out by the flush: send it what the old one held
            await self._send_pending()
            stats = await self._call_logger("flush")
            self._settle(stats["instance"], stats["durable_through"])
            if not self._resend:
                break
        return {**stats, "pending_records": len(self._pending),
                "unconfirmed_records": self._unconfirmed_count}

    # ----- introspection --------------------------------------------------------------------------
    def info(self) -> dict:
        e = self.cfg.engine
        return {"model_name": self.cfg.model_name, "target_id": self.target.model_id,
                "target_revision": self.target.revision, "tokenizer_hash": self.tokenizer_hash,
                "max_model_len": self.loop.engine.max_len, "num_speculative_tokens": e.num_speculative_tokens,
                "max_num_speculative_tokens": e.max_num_speculative_tokens,
                "default_max_tokens": e.default_max_tokens, "drafter_version": self.drafter_version}

    def status(self) -> dict:
        engine = self.loop.engine
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001  outside Serve (unit tests)
            replica = None
        return {**self.info(), "replica": replica, "drafter_source": self._source_spec, "refused": dict(self.refused),
                "swaps": self.swaps, "engine_alive": self.loop.alive, "steps": self.loop.steps,
                "active": len(engine.active), "waiting": len(engine.waiting),
                "pending_records": len(self._pending), "logger_instance": self._logger_instance,
                "sender_running": self._sender is not None and not self._sender.done(),
                "unconfirmed_records": self._unconfirmed_count, **self.counts}

    def check_health(self) -> None:
        if not self.loop.alive:
            raise RuntimeError("the engine thread died")


@serve.deployment(name="SpecPair")
class SpecPair(SpecPairImpl):
    """One target + drafter per replica (options from ServeAppConfig.spec_pair_options())."""

    async def generate(self, payload: dict) -> dict:
        """Run one request to completion: {"text", "finish_reason", "usage", "draftsmith"} or {"error"}."""
        text = []
        async for chunk in self._run(payload):
            if "error" in chunk:
                return chunk
            text.append(chunk["text"])
            if "finish_reason" in chunk:
                return {**chunk, "text": "".join(text)}
        return {"error": {"message": "the request ended without a result", "type": "server_error",
                          "param": None, "code": None}}

    async def generate_stream(self, payload: dict) -> AsyncIterator[dict]:
        """Stream one request: chunks {"text", "n_tokens"}, the last with finish_reason/usage/draftsmith."""
        async for chunk in self._run(payload):
            yield chunk

    def __del__(self):
        self.loop.stop()
