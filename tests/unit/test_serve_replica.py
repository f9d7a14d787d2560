"""The SpecPair replica's parts without Ray or Serve: the engine thread (serve/engine_loop.py), the drafter
watcher (serve/drafter_watcher.py) and the error codes between replica and ingress (serve/pair_protocol.py)."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest
import torch

from draftsmith import models
from draftsmith.sampling import SamplingParams
from draftsmith.specdec import EngineConfig, Request, SpecEngine, runner_for
from serve.drafter_source import DrafterRef
from serve.metrics import ReplicaMetrics
from serve.pair_protocol import Chunk, ErrorCode, GenerateRequest, ReplicaError, http_error


@pytest.fixture(scope="module")
def engine_factory():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a busy machine
    target = models.tiny_model()
    yield lambda: SpecEngine(runner_for(target.model), None, eos_token_ids=(),
                             config=EngineConfig(max_batch_size=4, max_model_len=64))
    torch.set_num_threads(threads)


class _Collect:
    """A sink that keeps what it receives and says when its request ended."""

    def __init__(self):
        self.items, self.done = [], threading.Event()

    def __call__(self, item):
        self.items.append(item)
        if isinstance(item, ReplicaError) or item.finished:
            self.done.set()


def test_a_failing_sink_fails_only_its_own_request(engine_factory):
    """A sink that raises (its event loop closed) used to kill the engine thread, and with it every request
    on the replica: now its request is aborted and counted, and the others finish."""
    from serve.engine_loop import EngineLoop

    loop = EngineLoop(engine_factory())
    calls = []

    def closed_loop(item):
        calls.append(item)
        raise RuntimeError("Event loop is closed")

    healthy = _Collect()
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    loop.submit(Request("broken", [1, 2, 3], params), closed_loop)
    loop.submit(Request("healthy", [4, 5, 6], params), healthy)
    loop.start()
    try:
        assert healthy.done.wait(60), "the other request never finished: the engine thread died"
        assert loop.alive and loop.sink_failures == 1 and len(calls) == 1
        assert len(healthy.items[-1].result.output_token_ids) == 12
        assert not loop.engine.has_work()  # the failed request was aborted, its slot freed
        after = _Collect()
        loop.submit(Request("after", [7, 8], params), after)
        assert after.done.wait(60) and after.items[-1].finished
    finally:
        loop.stop()


def test_engine_refusals_carry_a_code(engine_factory):
    from serve.engine_loop import EngineLoop

    loop = EngineLoop(engine_factory())
    loop.start()
    try:
        too_long, empty = _Collect(), _Collect()
        loop.submit(Request("long", [1, 2, 3], SamplingParams(max_tokens=500)), too_long)
        loop.submit(Request("empty", [], SamplingParams(max_tokens=4)), empty)
        assert too_long.done.wait(30) and empty.done.wait(30)
    finally:
        loop.stop()
    (long_error,), (empty_error,) = too_long.items, empty.items
    assert long_error.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED and "exceeds the context" in long_error.message
    assert empty_error.code is ErrorCode.INVALID_REQUEST


def test_error_codes_map_to_the_http_answers():
    context = http_error(ReplicaError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, "too long"))
    assert (context.status, context.param, context.code) == (400, "max_tokens", "context_length_exceeded")
    invalid = http_error(ReplicaError(ErrorCode.INVALID_REQUEST, "The prompt is empty"))
    assert invalid.body() == {"error": {"message": "The prompt is empty", "type": "invalid_request_error",
                                        "param": None, "code": None}}
    for code in (ErrorCode.ENGINE_ERROR, ErrorCode.NO_RESULT):
        failed = http_error(ReplicaError(code, "boom"))
        assert failed.status == 500 and failed.body()["error"]["type"] == "server_error"
    assert set(ErrorCode) == {ErrorCode.INVALID_REQUEST, ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                              ErrorCode.ENGINE_ERROR, ErrorCode.NO_RESULT}  # every code has an answer above
    assert Chunk(error=ReplicaError(ErrorCode.NO_RESULT, "x")).final and not Chunk("a", 1).final


def test_generate_request_to_the_engine():
    request = GenerateRequest("r", [1, 2], max_tokens=5, temperature=0.5, stop=("x",), num_speculative_tokens=3)
    engine_request = request.engine_request()
    assert engine_request.num_speculative_tokens == 3 and engine_request.params.stop == ("x",)
    assert engine_request.params.max_tokens == 5 and engine_request.params.temperature == 0.5
    off = GenerateRequest("r", [1], max_tokens=1, num_speculative_tokens=3, speculative=False)
    assert off.engine_request().num_speculative_tokens == 0


class _SlowSource:
    """A drafter source whose loads block until released, counting what they load."""

    def __init__(self, spec, loads, release):
        self.spec, self.loads, self.release = spec, loads, release

    def current(self) -> DrafterRef:
        def load(target):
            self.loads.append(self.spec)
            assert self.release.wait(30)
            return f"drafter-{self.spec}"

        return DrafterRef(self.spec, load, self.spec)


def _watcher(spec: str):
    from serve.drafter_watcher import DrafterWatcher

    loads, release, installed = [], threading.Event(), []

    def install(runner, version):
        installed.append(version)
        future = concurrent.futures.Future()
        future.set_result(version)
        return future

    watcher = DrafterWatcher(target=None, install=install, runner_for=lambda d: d,
                             source_factory=lambda spec, **_: spec and _SlowSource(spec, loads, release),
                             source_options={}, metrics=ReplicaMetrics(), model_name="m", spec=spec,
                             poll_interval_s=3600)
    return watcher, loads, release, installed


def _in_thread(fn, *args):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("value", fn(*args)), daemon=True)
    thread.start()
    return thread, box


def _wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_reconfigure_returns_while_a_drafter_loads():
    """Serve's reconfigure used to wait for the lock a check holds through download and load."""
    watcher, loads, release, installed = _watcher("v1")
    first, box = _in_thread(watcher.check)
    _wait_until(lambda: loads == ["v1"])
    started = time.monotonic()
    reconfigure, _ = _in_thread(watcher.reconfigure, {"drafter": "v2"})
    reconfigure.join(2.0)
    assert not reconfigure.is_alive(), "reconfigure blocked behind the load in progress"
    assert time.monotonic() - started < 2.0 and watcher.spec == "v2"
    release.set()
    first.join(30)
    # the load from the replaced source is not swapped in; the check goes on to the new source
    assert box["value"] == "v2" and installed == ["v2"] and loads == ["v1", "v2"]


def test_a_second_check_during_a_load_does_not_load_again():
    watcher, loads, release, installed = _watcher("v1")
    first, first_box = _in_thread(watcher.check)
    _wait_until(lambda: loads == ["v1"])
    second, second_box = _in_thread(watcher.check)
    time.sleep(0.2)
    release.set()
    first.join(30)
    second.join(30)
    assert first_box["value"] == second_box["value"] == "v1"
    assert loads == ["v1"] and installed == ["v1"] and watcher.swaps == 1
