"""The SpecPair deployment: one replica = one target + its drafter, continuously batched, hot-swappable.

What it does: a replica loads the target, builds one `SpecEngine` from the `engine:` settings and wires
three parts around it: the engine thread (engine_loop.py), the drafter watcher (drafter_watcher.py:
poll, load, refuse, swap) and the traffic sender (traffic_sender.py: at-least-once delivery of traffic
records to the logger). Its own work is the request path: a `GenerateRequest` (pair_protocol.py) is
submitted to the engine thread, whose outputs come back through an asyncio queue fed with
`loop.call_soon_threadsafe`; new requests join the running batch between steps. Steps the consumer has
not taken yet are coalesced into one `Chunk`; the last chunk carries the finish reason, usage and
what speculation really did for the request (`speculation_figures`: drafted per step, proposer, the longest
draft, the steps the policy switched off), or a `ReplicaError` with its code. A finished request is recorded
in the metrics (per draft position and draft length, and the policy's predicted and measured speedup) and
becomes a TrafficRecord for the sender (with `traffic.log_features`, carrying the target's features the
engine kept for it; a request that opts out of the log leaves neither); with `confirm_before_response` its
final chunk waits until the logger has received it.

What it does not do: HTTP, tokenization or the OpenAI protocol (app.py, protocol.py), decoding math
(draftsmith.specdec), writing Parquet (logger.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Callable

import torch
from ray import serve

from draftsmith import models
from draftsmith.layer_parallel import LayerParallelConfig, install, split_target
from draftsmith.specdec import Request, SpecEngine, StepOutput, runner_for
from draftsmith.traffic import drop_text
from serve.config import ServeAppConfig, parse_app_args
from serve.drafter_source import DrafterSource, make_source
from serve.drafter_watcher import DrafterWatcher
from serve.engine_loop import EngineLoop
from serve.logger import record_from_result
from serve.metrics import ReplicaMetrics
from serve.pair_protocol import Chunk, ErrorCode, Finish, GenerateRequest, ReplicaError, speculation_figures
from serve.traffic_sender import TrafficSender

logger = logging.getLogger(__name__)


class SpecPairImpl:
    """The replica's logic, usable without Ray (unit tests construct it directly)."""

    def __init__(self, config: dict | ServeAppConfig, traffic_logger=None, *,
                 source_factory: Callable[..., DrafterSource | None] = make_source, start: bool = True):
        self.cfg = cfg = parse_app_args(config)
        if cfg.placement.torch_threads:
            torch.set_num_threads(cfg.placement.torch_threads)
        device = cfg.placement.device
        if device == "auto":
            device = "cuda" if cfg.placement.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.target = models.load_model(cfg.target, device=device, dtype=getattr(torch, cfg.dtype))
        tokenizer = self.target.tokenizer
        target_runner = runner_for(self.target.model, prepack=cfg.engine.prepack_weights)
        split_target(target_runner, cfg.engine.layer_parallel_devices)  # a multi-device pair: the same devices
        self._logs_features = traffic_logger is not None and cfg.traffic.enabled and cfg.traffic.log_features
        self.loop = EngineLoop(SpecEngine(target_runner, None, config=cfg.engine,
                                          eos_token_ids=self.target.eos_token_ids,
                                          decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                                          capture_features=self.logs_features))
        self.metrics = ReplicaMetrics()
        self.traffic = TrafficSender(traffic_logger, cfg.traffic, self.metrics, cfg.model_name)
        self._redact = (lambda r: r) if cfg.traffic.log_text else drop_text
        self.counts = {"requests": 0, "errors": 0, "opted_out": 0}
        self.drafters = DrafterWatcher(
            target=self.target, install=self.loop.set_drafter, runner_for=self._drafter_runner,
            source_factory=source_factory, metrics=self.metrics, model_name=cfg.model_name, spec=cfg.drafter,
            source_options={"tracking_uri": cfg.mlflow_tracking_uri, "registry_uri": cfg.mlflow_registry_uri},
            poll_interval_s=cfg.drafter_poll_interval_s)
        self.drafters.check()
        if start:
            self.loop.start()
            self.drafters.start()

    @property
    def logs_features(self) -> bool:
        """Whether logged records carry the target's features (`traffic.log_features`, with a logger to send
        them to); the engine captures them only then."""
        return self._logs_features

    def _drafter_runner(self, drafter):
        """The engine's runner for a drafter, with the pair's layer-parallel plan installed when configured."""
        e = self.cfg.engine
        runner = runner_for(None, drafter, prepack=e.prepack_weights)
        plan = LayerParallelConfig(e.layer_parallel_group_size, e.layer_parallel_devices, e.layer_parallel_group_sizes)
        if plan.enabled:
            install(runner, plan)  # a plan this drafter cannot draft under raises: the swap is refused
        return runner

    # ----- the drafter (drafter_watcher.py) -------------------------------------------------------
    @property
    def drafter_version(self) -> str:
        return self.drafters.version

    @property
    def refused(self) -> dict[str, str]:
        return self.drafters.refused

    @property
    def swaps(self) -> int:
        return self.drafters.swaps

    def reconfigure(self, user_config: dict | None) -> None:
        """Serve calls this with `user_config` (drafter source, poll interval); returns at once."""
        self.drafters.reconfigure(user_config)

    def check_drafter(self) -> str:
        return self.drafters.check()

    # ----- requests -------------------------------------------------------------------------------
    async def _run(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """Submit one request; yield coalesced chunks, the last with `finish` or `error`."""
        self.traffic.ensure_started()
        engine_request = request.engine_request()
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        submitted = time.perf_counter()
        self.loop.submit(engine_request, lambda item: loop.call_soon_threadsafe(inbox.put_nowait, item))
        first_token_at, finished = None, False
        try:
            while not finished:
                items = [await inbox.get()]
                while not inbox.empty():  # coalesce steps the consumer has not taken yet
                    items.append(inbox.get_nowait())
                text, n_tokens, finish = "", 0, None
                for item in items:
                    if isinstance(item, ReplicaError):
                        finished = True
                        self.counts["errors"] += item.code is ErrorCode.ENGINE_ERROR
                        yield Chunk(error=item)
                        return
                    text += item.text_delta
                    n_tokens += len(item.new_token_ids)
                    if first_token_at is None and item.new_token_ids:
                        first_token_at = time.perf_counter()
                    if item.finished:
                        finished = True
                        finish = self._finish(request, engine_request, item, submitted, first_token_at)
                        await self.traffic.handed_off(request.request_id)
                if n_tokens or text or finished:
                    yield Chunk(text, n_tokens, finish)
        finally:
            if not finished:  # the client went away: free the slot
                self.loop.abort(request.request_id)

    def _finish(self, request: GenerateRequest, engine_request: Request, out: StepOutput, submitted: float,
                first_token_at: float | None) -> Finish:
        result = out.result
        n_out = len(result.output_token_ids)
        self.counts["requests"] += 1
        self._record_metrics(result, submitted, first_token_at)
        if self.traffic.connected and self.cfg.traffic.enabled:
            if request.log:
                self.traffic.enqueue(self._redact(record_from_result(
                    result, target_id=self.target.model_id, target_revision=self.target.revision,
                    tokenizer_hash=self.target.tokenizer_hash, params=engine_request.params,
                    prompt_text=request.prompt_text, user=request.user)))
            else:
                self.counts["opted_out"] += 1
        return Finish(
            finish_reason=result.finish_reason,
            usage={"prompt_tokens": len(result.prompt_token_ids), "completion_tokens": n_out,
                   "total_tokens": len(result.prompt_token_ids) + n_out},
            draftsmith=speculation_figures(result.stats, result.drafter_version,
                                           request.speculation(self.cfg.engine.num_speculative_tokens)),
        )

    def _record_metrics(self, result, submitted: float, first_token_at: float | None) -> None:
        m, stats = self.metrics, result.stats
        tags = {"model": self.cfg.model_name, "drafter_version": result.drafter_version}
        n_out = len(result.output_token_ids)
        try:  # metrics must never fail a request
            m.inc(m.requests, 1, {**tags, "finish_reason": result.finish_reason})
            for counter, value in ((m.output_tokens, n_out), (m.drafted, stats.drafted), (m.accepted, stats.accepted)):
                m.inc(counter, value, tags)
            m.record_speculation(stats, tags)
            m.record_policy(self.loop.policy, tags)
            if first_token_at is not None:
                m.ttft.observe(first_token_at - submitted, tags=tags)
                if n_out > 1:
                    m.tpot.observe((time.perf_counter() - first_token_at) / (n_out - 1), tags=tags)
        except Exception:  # noqa: BLE001
            logger.exception("recording metrics failed")

    async def flush_traffic(self) -> dict:
        """Send queued records and make the logger write them now (tests, shutdown)."""
        return await self.traffic.flush()

    # ----- introspection --------------------------------------------------------------------------
    def info(self) -> dict:
        e = self.cfg.engine
        return {"model_name": self.cfg.model_name, "target_id": self.target.model_id,
                "target_revision": self.target.revision, "tokenizer_hash": self.target.tokenizer_hash,
                "max_model_len": self.loop.engine.max_len, "num_speculative_tokens": e.num_speculative_tokens,
                "max_speculative_tokens": e.max_speculative_tokens,
                "max_num_speculative_tokens": e.max_num_speculative_tokens,
                "default_max_tokens": e.default_max_tokens, "drafter_version": self.drafter_version}

    def status(self) -> dict:
        engine = self.loop.engine
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001  outside Serve (unit tests)
            replica = None
        return {**self.info(), "replica": replica, "drafter_source": self.drafters.spec,
                "refused": dict(self.refused), "swaps": self.swaps, "engine_alive": self.loop.alive,
                "steps": self.loop.steps, "sink_failures": self.loop.sink_failures, "policy": self.loop.policy,
                "active": len(engine.active), "waiting": len(engine.waiting), **self.traffic.status(), **self.counts}

    def check_health(self) -> None:
        if not self.loop.alive:
            raise RuntimeError("the engine thread died")


@serve.deployment(name="SpecPair")
class SpecPair(SpecPairImpl):
    """One target + drafter per replica (options from ServeAppConfig.spec_pair_options())."""

    async def generate(self, request: GenerateRequest) -> Chunk:
        """Run one request to completion: one chunk with the whole text and `finish`, or with `error`."""
        text, n_tokens = [], 0
        async for chunk in self._run(request):
            if chunk.error is not None:
                return chunk
            text.append(chunk.text)
            n_tokens += chunk.n_tokens
            if chunk.finish is not None:
                return Chunk("".join(text), n_tokens, chunk.finish)
        return Chunk(error=ReplicaError(ErrorCode.NO_RESULT, "the request ended without a result"))

    async def generate_stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """Stream one request: chunks of text, the last with `finish` (or `error`)."""
        async for chunk in self._run(request):
            yield chunk

    def __del__(self):
        self.loop.stop()
