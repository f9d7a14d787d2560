"""The engine thread of a SpecPair replica: one `SpecEngine`, stepped by one thread, fed by commands.

What it does: `EngineLoop` owns a SpecEngine on a thread of its own that calls `step()` while the engine
has work. Other threads talk to it only through commands (submit a request with its sink, abort, swap
the drafter between steps); each request's outputs go to its sink, a callable that receives
`StepOutput`s and at most one `ReplicaError`. Failures stay as small as they can:
- a request the engine refuses (`SpecEngine.validate`'s ValueError) fails alone, with a code decided
  here (`rejection`);
- a step that raises fails the requests of that batch, and the loop serves the next ones;
- a sink that raises (its event loop closed, its consumer gone) fails only its own request: the
  request is aborted in the engine, counted in `sink_failures`, and the others keep being served.
`policy` holds the speculation policy's latest snapshot, taken on the engine thread when a request finishes.

What it does not do: asyncio, HTTP, metrics or traffic records (spec_pair.py), decoding (draftsmith.specdec).
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from typing import Any, Callable

from draftsmith.specdec import ContextLengthError, Request, SpecEngine, StepOutput
from serve.pair_protocol import ErrorCode, ReplicaError

logger = logging.getLogger(__name__)

Sink = Callable[[Any], None]  # receives StepOutputs, or one ReplicaError that ends the request


def rejection(error: ValueError) -> ReplicaError:
    """The engine's refusal as a code, by the error's type (specdec's typed refusals)."""
    code = ErrorCode.CONTEXT_LENGTH_EXCEEDED if isinstance(error, ContextLengthError) else ErrorCode.INVALID_REQUEST
    return ReplicaError(code, str(error))


class EngineLoop:
    """Owns a SpecEngine on one thread; everything else talks to it through commands."""

    def __init__(self, engine: SpecEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._wake = threading.Event()
        self._stopped = False
        self.steps = 0
        self.sink_failures = 0
        self.error: BaseException | None = None
        # The speculation policy's last snapshot (SpecEngine.policy_snapshot: None unless `auto`), taken on this
        # thread whenever a request finishes: other threads read this dict, never the engine's live state.
        self.policy: dict | None = None
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
        if not future.set_running_or_notify_cancel():  # the watcher gave up waiting: never swap after that
            return
        try:
            self.engine.set_drafter(runner, version)
        except Exception as error:  # noqa: BLE001  the engine keeps its old drafter
            future.set_exception(error)
        else:
            future.set_result(version)

    def _deliver(self, request_id: str, sink: Sink, item) -> None:
        """Hand one item to a sink; a sink that raises fails its own request only."""
        try:
            sink(item)
        except Exception:  # noqa: BLE001  e.g. RuntimeError('Event loop is closed') from call_soon_threadsafe
            logger.exception("the output sink of request %s failed; aborting that request", request_id)
            self.sink_failures += 1
            self._sinks.pop(request_id, None)
            self.engine.abort(request_id)

    def _snapshot_policy(self) -> None:
        try:
            self.policy = self.engine.policy_snapshot()
        except Exception:  # noqa: BLE001  a figure for the metrics must not stop the engine thread
            logger.exception("the speculation policy's snapshot failed")

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
                except ValueError as error:  # the engine refused it: it fails alone
                    self._deliver(request.request_id, sink, rejection(error))
                except Exception as error:  # noqa: BLE001
                    self._deliver(request.request_id, sink,
                                  ReplicaError(ErrorCode.ENGINE_ERROR, f"engine error: {error}"))
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
                failed = ReplicaError(ErrorCode.ENGINE_ERROR, f"engine error: {error}")
                for request_id, sink in list(self._sinks.items()):
                    self.engine.abort(request_id)
                    self._deliver(request_id, sink, failed)
                self._sinks.clear()
                continue
            self.steps += 1
            if any(out.finished for out in outputs):
                self._snapshot_policy()
            for out in outputs:
                sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
                if sink is not None:
                    self._deliver(out.request_id, sink, out)
