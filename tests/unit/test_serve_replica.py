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


class _BusyEngine:
    """An engine whose one step lasts until released, recording the drafters it is given."""

    def __init__(self):
        self.stepping, self.release, self.drafters = threading.Event(), threading.Event(), []

    def has_work(self):
        return not self.release.is_set()

    def step(self):
        self.stepping.set()
        assert self.release.wait(30)
        return []

    def set_drafter(self, runner, version):
        self.drafters.append(version)


def test_a_swap_that_timed_out_never_runs_later(monkeypatch):
    """A swap the watcher gave up on (SWAP_TIMEOUT_S) is recorded as refused; its command stayed queued and
    used to run once the engine was free, so the replica served a drafter it called refused."""
    from serve import drafter_watcher
    from serve.engine_loop import EngineLoop

    monkeypatch.setattr(drafter_watcher, "SWAP_TIMEOUT_S", 0.2)
    engine = _BusyEngine()
    loop = EngineLoop(engine)
    loop.start()
    try:
        assert engine.stepping.wait(10)
        ref = DrafterRef("v2", lambda target: "drafter-v2", "v2")
        watcher = drafter_watcher.DrafterWatcher(
            target=None, install=loop.set_drafter, runner_for=lambda d: d,
            source_factory=lambda spec, **_: type("Source", (), {"spec": spec, "current": lambda self: ref})(),
            source_options={}, metrics=ReplicaMetrics(), model_name="m", spec="v2", poll_interval_s=3600)
        assert watcher.check() == "none" and "TimeoutError" in watcher.refused["v2"]
        engine.release.set()
        loop.set_drafter(None, "later").result(timeout=10)  # commands run in order: the timed-out one has too
        assert engine.drafters == ["later"]
    finally:
        engine.release.set()
        loop.stop()


# ----- what a replica reports: the response's figures, the record, the metrics ---------------------------
def _serve_requests(engine: dict, requests: list[GenerateRequest], drafter: str | None = None):
    """Run `requests` one after the other through a replica without Ray; returns ({id: (text, Finish)},
    records the replica made, the replica)."""
    import asyncio
    from types import SimpleNamespace

    from serve.spec_pair import SpecPairImpl

    async def handed_off(_):
        return None

    pair = SpecPairImpl({"target": "tiny", "drafter": drafter, "placement": {"torch_threads": 1},
                         "engine": {"max_model_len": 128, "max_batch_size": 2, **engine}}, start=False)
    records = []
    pair.traffic = SimpleNamespace(connected=True, enqueue=records.append, ensure_started=lambda: None,
                                   handed_off=handed_off)
    pair.loop.start()

    async def run():
        finished = {}
        for request in requests:
            text = []
            async for chunk in pair._run(request):
                assert chunk.error is None, chunk.error
                text.append(chunk.text)
                if chunk.finish is not None:
                    finished[request.request_id] = ("".join(text), chunk.finish)
        return finished

    try:
        return asyncio.run(run()), records, pair
    finally:
        pair.loop.stop()


def test_a_batch_run_autoregressively_reports_and_logs_no_speculation():
    """The record logged the configured gamma (4) and the response said 4 for a request whose steps all ran
    autoregressively (here: speculation switched off at batch 1)."""
    finished, records, _ = _serve_requests(
        {"num_speculative_tokens": 4, "disable_speculation_at_batch": 1},
        [GenerateRequest("ar", [5, 6, 7], max_tokens=8, temperature=0.0)], drafter="derived:first1")
    figures = finished["ar"][1].draftsmith
    assert [r.num_speculative_tokens for r in records] == [0] and figures["num_speculative_tokens"] == 0
    assert figures["drafter_version"] == "derived-first1" and figures["speculation"] == "fixed"
    assert figures["proposer"] == "none" and figures["drafted"] == 0
    assert figures["mean_drafted_per_step"] == 0 and set(figures["draft_length_counts"]) == {"0"}


def test_a_lookup_only_response_reports_the_lookup_drafts():
    """With no drafter and prompt lookup on, a response said num_speculative_tokens 0 although lookup drafted."""
    finished, records, _ = _serve_requests(
        {"num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1},
        [GenerateRequest("lookup", [20, 21, 22, 20, 21, 22, 20, 21], max_tokens=16, temperature=0.0)])
    figures = finished["lookup"][1].draftsmith
    assert 1 <= figures["num_speculative_tokens"] <= 4 and figures["drafted"] > 0
    assert records[0].num_speculative_tokens == figures["num_speculative_tokens"]
    assert figures["drafter_version"] is None and figures["proposer"] == "lookup"
    assert figures["lookup_drafted"] == figures["drafted"] and figures["mean_drafted_per_step"] > 0


def test_auto_and_explicit_gammas_are_lossless_and_reported():
    """engine.num_speculative_tokens: auto; a request's explicit gamma is honoured, speculative: false is off;
    greedy output is the same text in every case; the policy's snapshot is kept for the metrics."""
    prompt = [3, 17, 42, 9, 3, 17, 42, 9, 11]
    requests = [GenerateRequest("auto", prompt, max_tokens=20, temperature=0.0),
                GenerateRequest("two", prompt, max_tokens=20, temperature=0.0, num_speculative_tokens=2),
                GenerateRequest("off", prompt, max_tokens=20, temperature=0.0, speculative=False)]
    finished, records, pair = _serve_requests({"num_speculative_tokens": "auto", "prompt_lookup_max": 3},
                                              requests, drafter="derived:first1")
    texts = {rid: text for rid, (text, _) in finished.items()}
    assert texts["auto"] == texts["two"] == texts["off"]
    figures = {rid: finish.draftsmith for rid, (_, finish) in finished.items()}
    assert figures["auto"]["speculation"] == "auto"
    assert figures["auto"]["num_speculative_tokens"] <= pair.cfg.engine.auto_max_speculative_tokens
    assert figures["two"]["speculation"] == "fixed" and figures["two"]["num_speculative_tokens"] <= 2
    assert figures["off"]["speculation"] == "off" and figures["off"]["drafted"] == 0
    assert figures["off"]["proposer"] == "none" and figures["off"]["num_speculative_tokens"] == 0
    assert [r.output_token_ids for r in records][0] == records[2].output_token_ids
    snapshot = pair.loop.policy
    assert set(snapshot) >= {"predicted_speedup", "measured_speedup", "alphas", "steps"}
    assert pair.info()["num_speculative_tokens"] == "auto"
    assert pair.info()["max_speculative_tokens"] == pair.cfg.engine.auto_max_speculative_tokens


class _Recorder:
    def __init__(self):
        self.calls = []

    def inc(self, value, tags=None):
        self.calls.append((value, tags))

    set = inc


def test_metrics_per_position_length_and_policy():
    from draftsmith.request_stats import RequestStats

    m = ReplicaMetrics()
    for name in ("position_tried", "position_accepted", "draft_length_steps", "policy_off_steps",
                 "predicted_speedup", "measured_speedup", "policy_alpha"):
        setattr(m, name, _Recorder())
    tags = {"model": "m", "drafter_version": "v1"}
    stats = RequestStats(steps=4, policy_off_steps=1, position_tried=[3, 2], position_accepted=[2, 0],
                         draft_length_counts={0: 1, 2: 3})
    m.record_speculation(stats, tags)
    assert m.position_tried.calls == [(3, {**tags, "position": "1"}), (2, {**tags, "position": "2"})]
    assert m.position_accepted.calls == [(2, {**tags, "position": "1"})]  # Ray's counters refuse 0
    assert sorted(m.draft_length_steps.calls, key=str) == [(1, {**tags, "length": "0"}), (3, {**tags, "length": "2"})]
    assert m.policy_off_steps.calls == [(1, tags)]
    m.record_policy(None, tags)  # not auto: nothing
    assert m.predicted_speedup.calls == []
    m.record_policy({"predicted_speedup": 1.3, "measured_speedup": 1.1, "alphas": {"drafter:v1": [0.8, 0.5]},
                     "steps": 10}, tags)
    assert m.predicted_speedup.calls == [(1.3, tags)] and m.measured_speedup.calls == [(1.1, tags)]
    assert m.policy_alpha.calls == [(0.8, {"model": "m", "proposer": "drafter:v1", "position": "1"}),
                                    (0.5, {"model": "m", "proposer": "drafter:v1", "position": "2"})]


def test_serving_actors_ask_for_a_node_that_is_not_a_spare_node():
    """Detects: an Ingress, TrafficLogger or SpecPair replica (or a bundle of its placement group) without the
    selector that keeps it off the spare nodes distillation runs on (a zero-CPU actor fits a CPU-less spare node,
    and Serve then starts a proxy there), a selector Serve 2.60 refuses, or one that would not match the head."""
    from ray._raylet import node_labels_match_selector  # the matcher Serve's and Ray's schedulers use

    from serve.app import Ingress
    from serve.config import SERVING_LABEL_SELECTOR, ServeAppConfig
    from serve.logger import TrafficLogger
    from serve.spec_pair import SpecPair

    assert SERVING_LABEL_SELECTOR == {"draftsmith.io/pool": "!spare"}  # pipelines.local_services.SPARE_LABEL's key
    for deployment in (Ingress, TrafficLogger):
        assert deployment.ray_actor_options["label_selector"] == SERVING_LABEL_SELECTOR, deployment.name
        assert deployment.ray_actor_options["num_cpus"] == 0
    plain = ServeAppConfig(target="tiny").spec_pair_options()
    assert plain["ray_actor_options"]["label_selector"] == SERVING_LABEL_SELECTOR
    grouped = ServeAppConfig(target="tiny", placement={"bundles": [{"CPU": 1, "GPU": 1}, {"GPU": 1}],
                                                       "num_gpus": 1, "strategy": "STRICT_PACK"}).spec_pair_options()
    assert grouped["placement_group_bundle_label_selector"] == [SERVING_LABEL_SELECTOR] * 2
    assert "label_selector" not in grouped["ray_actor_options"]  # in a group, the bundles choose the node
    for options in (plain, grouped):  # Serve's own validation of the options (raises on what it does not accept)
        assert SpecPair.options(**options).ray_actor_options["num_cpus"] >= 0
    head, spare = {}, {"draftsmith.io/pool": "spare"}  # the head carries no pool label
    assert node_labels_match_selector(head, SERVING_LABEL_SELECTOR)
    assert node_labels_match_selector({"draftsmith.io/pool": "serve"}, SERVING_LABEL_SELECTOR)
    assert not node_labels_match_selector(spare, SERVING_LABEL_SELECTOR)
