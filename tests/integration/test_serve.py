"""The Serve application end to end on a local Ray cluster: OpenAI client, `auto` speculation and explicit
gammas (lossless), bad requests, load, logging, drafter hot swap and refusals. One app (tiny target, drafters
derived from it) per module, and a second one with `auto` speculation for its test."""

import json
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from draftsmith import models
from draftsmith.ports import free_port
from draftsmith.traffic import read_traffic

pytestmark = pytest.mark.integration

APP = "draftsmith-test"
PREFIX = "/ds"
MODEL = "draftsmith"


def _point(link: Path, target: Path) -> None:
    """Atomically re-point a symlink (what a deploy script does to change the drafter)."""
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex}")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _drafters(root: Path) -> dict[str, Path]:
    target = models.tiny_model()
    dirs = {}
    for name, layers in (("drafter-v1", [0]), ("drafter-v2", [1])):
        dirs[name] = models.save_drafter(models.derive_drafter(target, layers), root / name, target.tokenizer)
    broken = root / "broken-noweights"
    shutil.copytree(dirs["drafter-v1"], broken)
    (broken / "model.safetensors").unlink()
    dirs["broken"] = broken
    # Same weights, a tokenizer with one token renamed: must be refused.
    wrong = root / "wrong-tokenizer"
    shutil.copytree(dirs["drafter-v1"], wrong)
    spec = json.loads((wrong / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    victim = next(token for token, index in vocab.items() if index == 100)
    vocab["<|renamed|>"] = vocab.pop(victim)
    (wrong / "tokenizer.json").write_text(json.dumps(spec))
    dirs["wrong"] = wrong
    return dirs


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory):
    from ray import serve

    from serve.app import build_app

    root = tmp_path_factory.mktemp("serve")
    dirs = _drafters(root)
    current = root / "current"
    _point(current, dirs["drafter-v1"])
    traffic = root / "traffic"
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"target": "tiny", "drafter": str(current), "drafter_poll_interval_s": 0.5,
            "engine": {"max_model_len": 256, "max_batch_size": 8, "num_speculative_tokens": 3},
            "traffic": {"uri": str(traffic), "flush_every_seconds": 1.0, "send_interval_seconds": 0.2},
            "placement": {"num_cpus": 1, "torch_threads": 1}}
    serve.run(build_app(args), name=APP, route_prefix=PREFIX)
    base = f"http://127.0.0.1:{port}{PREFIX}"
    yield {"base": base, "dirs": dirs, "current": current, "traffic": traffic}
    serve.delete(APP)


def _post(base, path, payload=None, *, content=None, headers=None, timeout=60.0):
    return httpx.post(base + path, json=payload, content=content, headers=headers, timeout=timeout)


def _status(base):
    return httpx.get(base + "/draftsmith/status", timeout=30).json()


def _flush_and_read(app) -> dict:
    _post(app["base"], "/draftsmith/flush")
    return {r.request_id: r for r in read_traffic(app["traffic"])}


def test_openai_client(app):
    import openai

    client = openai.OpenAI(base_url=app["base"] + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    completion = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=12, temperature=0)
    assert completion.usage.completion_tokens == 12 and completion.choices[0].finish_reason == "length"
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12
    stats = completion.model_extra["draftsmith"]
    assert stats["drafter_version"].startswith("drafter-v1") and stats["drafted"] > 0
    assert 0 <= stats["acceptance_rate"] <= 1 and 1 <= stats["mean_accepted_length"] <= 4

    streamed = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=12, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                          extra_body={"draftsmith": {"num_speculative_tokens": 2}})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    figures = chat.model_extra["draftsmith"]
    assert figures["speculation"] == "fixed" and figures["num_speculative_tokens"] <= 2  # the longest draft verified
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True,
        extra_body={"draftsmith": {"num_speculative_tokens": 2}}) if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                           extra_body={"draftsmith": {"speculative": False}})
    assert plain.choices[0].message.content == chat.choices[0].message.content  # greedy is lossless
    assert plain.model_extra["draftsmith"]["drafted"] == 0

    # Sampling with a seed is reproducible; a stop string cuts the text.
    a, b = (client.completions.create(model=MODEL, prompt="x", max_tokens=10, temperature=0.9, seed=7)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text
    text = completion.choices[0].text
    stop = next((ch for ch in text[2:] if ch.isprintable() and ch.strip()), None)
    if stop:
        cut = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=12, temperature=0, stop=stop)
        assert cut.choices[0].text == text[: text.index(stop, 0)] and cut.choices[0].finish_reason == "stop"


BAD = [
    ("malformed JSON", "/v1/completions", b'{"model": "draftsmith", "prompt": ', 400, "not valid JSON"),
    ("invalid UTF-8", "/v1/completions", b'{"model": "draftsmith", "prompt": "\xff\xfe"}', 400, "UTF-8"),
    ("lone surrogate", "/v1/completions", b'{"model": "draftsmith", "prompt": "a\\ud800"}', 400, "surrogate"),
    ("lone surrogate in user", "/v1/completions",
     b'{"model": "draftsmith", "prompt": [1], "user": "\\udc00"}', 400, "surrogate"),
    ("missing prompt", "/v1/completions", {"model": MODEL}, 422, "prompt"),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, 422, "messages"),
    ("wrong type", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 422, "max_tokens"),
    ("wrong type temperature", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 422, "temperature"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "gpt-9"),
    ("max_tokens 0", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
    ("max_tokens beyond context", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 5000}, 400,
     "exceeds the context"),
    ("prompt longer than context", "/v1/completions", {"model": MODEL, "prompt": "y" * 400, "max_tokens": 4}, 400,
     "context"),
    ("n=2", "/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}, 422, "n=1"),
    ("stream beyond context", "/v1/completions",
     {"model": MODEL, "prompt": "x", "max_tokens": 5000, "stream": True}, 400, "exceeds the context"),
]


def test_auto_speculation_and_explicit_gammas_are_lossless(app):
    """An app with `engine.num_speculative_tokens: auto` (prompt lookup beside the drafter): greedy text is the
    same with the policy, with explicit gammas and with speculation off, streamed or not; each response says
    what was done; the replica's status carries the policy's snapshot."""
    from ray import serve

    from serve.app import build_app

    prefix = "/auto"
    serve.run(build_app({"target": "tiny", "drafter": "derived:first1", "traffic": {"enabled": False},
                         "engine": {"max_model_len": 256, "max_batch_size": 4, "num_speculative_tokens": "auto",
                                    "prompt_lookup_max": 3},
                         "placement": {"num_cpus": 0, "torch_threads": 1}}),
              name="draftsmith-auto", route_prefix=prefix)
    base = app["base"].removesuffix(PREFIX) + prefix
    try:
        prompts = ["Hello there", "one two three one two three one two", "x"]
        arms = {"auto": None, "gamma 1": {"num_speculative_tokens": 1}, "gamma 5": {"num_speculative_tokens": 5},
                "off": {"speculative": False}}

        def complete(prompt, options, stream=False):
            payload = {"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": stream}
            if options:
                payload["draftsmith"] = options
            response = _post(base, "/v1/completions", payload)
            assert response.status_code == 200, response.text
            if not stream:
                body = response.json()
                return body["choices"][0]["text"], body["draftsmith"]
            events = [json.loads(b[6:]) for b in response.text.split("\n\n") if b.startswith("data: {")]
            return "".join(e["choices"][0]["text"] for e in events if e["choices"]), events[-1]["draftsmith"]

        with ThreadPoolExecutor(4) as pool:  # concurrent: the policy plans batches of several rows
            answers = {(p, arm): pool.submit(complete, p, options, stream=arm == "auto" and p == "x")
                       for p in prompts for arm, options in arms.items()}
            answers = {key: future.result() for key, future in answers.items()}
        for prompt in prompts:
            texts = {arm: answers[prompt, arm][0] for arm in arms}
            assert len(set(texts.values())) == 1, (prompt, texts)
            figures = {arm: answers[prompt, arm][1] for arm in arms}
            assert figures["auto"]["speculation"] == "auto" and figures["auto"]["num_speculative_tokens"] <= 8
            assert figures["gamma 1"]["speculation"] == "fixed" and figures["gamma 1"]["num_speculative_tokens"] <= 1
            assert figures["gamma 5"]["num_speculative_tokens"] <= 5
            assert figures["off"]["speculation"] == "off" and figures["off"]["drafted"] == 0
            assert figures["off"]["proposer"] == "none"
        assert answers[prompts[1], "gamma 5"][1]["drafted"] > 0  # an explicit gamma is honoured
        status = httpx.get(base + "/draftsmith/status", timeout=30).json()
        assert status["num_speculative_tokens"] == "auto" and status["max_speculative_tokens"] == 8
        assert {"predicted_speedup", "measured_speedup", "alphas", "steps"} <= set(status["policy"])
        # a request asking for more than the limit is refused before it reaches the engine
        refused = _post(base, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4,
                                                  "draftsmith": {"num_speculative_tokens": 17}})
        assert refused.status_code == 422
    finally:
        serve.delete("draftsmith-auto")


def test_bad_requests_get_4xx_and_server_keeps_serving(app):
    for name, path, payload, status, fragment in BAD:
        if isinstance(payload, bytes):
            response = _post(app["base"], path, content=payload, headers={"content-type": "application/json"})
        else:
            response = _post(app["base"], path, payload)
        assert response.status_code == status, (name, response.status_code, response.text)
        error = response.json()["error"]
        assert fragment in error["message"], (name, error)
        assert {"message", "type", "param", "code"} <= set(error)
    assert _post(app["base"], "/v1/nope", {}).status_code == 404
    ok = _post(app["base"], "/v1/completions", {"model": MODEL, "prompt": "still here", "max_tokens": 5})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5
    assert httpx.get(app["base"] + "/health").json() == {"status": "ok"}


def _load(base, n_requests, concurrency, *, opt_out_every=0, on_progress=None):
    """Run requests from `concurrency` threads; returns [(response id, opted out, drafter version)], errors."""
    results, errors = [], []
    lock = threading.Lock()

    def one(i):
        opted = bool(opt_out_every) and i % opt_out_every == 0
        payload = {"model": MODEL, "prompt": f"request {i}: tell me", "max_tokens": 6 + i % 11,
                   "temperature": 0 if i % 2 else 0.8, "seed": i}
        headers = None
        if opted and i % (2 * opt_out_every) == 0:
            headers = {"X-Draftsmith-No-Log": "1"}
        elif opted:
            payload["draftsmith"] = {"log": False}
        if i % 3 == 0:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
        try:
            response = _post(base, "/v1/completions", payload, headers=headers)
            response.raise_for_status()
            if payload.get("stream"):
                events = [json.loads(line[6:]) for line in response.text.split("\n\n")
                          if line.startswith("data: {")]
                rid = events[0]["id"]
                version = next(e["draftsmith"] for e in events if e.get("draftsmith"))["drafter_version"]
                assert 1 <= events[-1]["usage"]["completion_tokens"] <= payload["max_tokens"]
            else:
                body = response.json()
                rid, version = body["id"], body["draftsmith"]["drafter_version"]
                assert 1 <= body["usage"]["completion_tokens"] <= payload["max_tokens"]
            with lock:
                results.append((rid.split("-", 1)[1], opted, version))
        except Exception as error:  # noqa: BLE001
            with lock:
                errors.append(repr(error))
        if on_progress:
            on_progress(i)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n_requests)))
    return results, errors


def test_load_logs_every_request_not_opted_out(app):
    start = time.perf_counter()
    results, errors = _load(app["base"], 200, 16, opt_out_every=5)
    elapsed = time.perf_counter() - start
    assert errors == [] and len(results) == 200
    records = _flush_and_read(app)
    kept = {rid for rid, opted, _ in results if not opted}
    dropped = {rid for rid, opted, _ in results if opted}
    assert len(dropped) == 40
    assert kept <= set(records) and not dropped & set(records)
    assert sum(rid in kept for rid in records) == len(kept) == 160
    sample = records[next(iter(kept))]
    n_out = len(sample.output_token_ids)
    assert len(sample.target_topk_ids) == n_out and len(sample.target_topk_ids[0]) == 8
    assert len(sample.accept_mask) == n_out and sample.tokenizer_hash and sample.target_id == "tiny"
    assert sample.prompt_text.startswith("request ") and sample.drafter_version.startswith("drafter-v1")
    status = _status(app["base"])
    assert status["engine_alive"] and status["log_send_failures"] == 0
    print(f"load: 200 requests, 16 clients, {elapsed:.1f} s, {200 / elapsed:.1f} req/s")


def _wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def test_drafter_swap_during_load_and_refusals(app):
    base, dirs, current = app["base"], app["dirs"], app["current"]
    assert _status(base)["drafter_version"].startswith("drafter-v1")
    swapped = threading.Event()

    def progress(i):
        if i == 25 and not swapped.is_set():
            swapped.set()
            _point(current, dirs["drafter-v2"])

    results, errors = _load(base, 100, 8, on_progress=progress)
    assert errors == [] and len(results) == 100
    status = _wait_for(lambda: (s := _status(base))["drafter_version"].startswith("drafter-v2") and s)
    assert status["swaps"] >= 2 and status["refused"] == {}
    versions = {v.split("-")[1] for _, _, v in results}
    records = _flush_and_read(app)
    logged_versions = {records[rid].drafter_version.split("-")[1] for rid, _, _ in results}
    assert {"v1", "v2"} <= logged_versions, (versions, logged_versions)

    # A drafter without weights, then one with a different tokenizer: both refused, v2 keeps serving.
    for key, reason in (("broken", "ModelLoadError"), ("wrong", "IncompatibleTokenizerError")):
        _point(current, dirs[key])
        status = _wait_for(lambda: (s := _status(base))["refused"] and
                           any(v.startswith(dirs[key].name) for v in s["refused"]) and s)
        refusal = next(r for v, r in status["refused"].items() if v.startswith(dirs[key].name))
        assert reason in refusal, refusal
        assert status["drafter_version"].startswith("drafter-v2")
        ok = _post(base, "/v1/completions", {"model": MODEL, "prompt": "after refusal", "max_tokens": 4})
        assert ok.status_code == 200 and ok.json()["draftsmith"]["drafter_version"].startswith("drafter-v2")
    assert "token id 100" in status["refused"][next(v for v in status["refused"] if v.startswith("wrong"))]


def test_registry_source_with_fake_resolver(tmp_path):
    """The models:/ source through an injected resolver (the real MLflow path is tested end to end elsewhere)."""
    from types import SimpleNamespace

    from serve.drafter_source import RegistrySource, make_source
    from serve.spec_pair import SpecPairImpl

    target = models.tiny_model()
    saved = {"1": models.save_drafter(models.derive_drafter(target, [0]), tmp_path / "d1", target.tokenizer),
             "2": models.save_drafter(models.derive_drafter(target, [1]), tmp_path / "d2", target.tokenizer)}

    class FakeRegistry:
        champion = "1"
        downloads = []

        def __init__(self, tracking_uri, registry_uri=None, model_name="x"):
            self.model_name = model_name

        def resolve(self, uri):
            assert uri == "models:/drafts@champion"
            return SimpleNamespace(name=self.model_name, version=FakeRegistry.champion)

        def download(self, version, dst_dir):
            FakeRegistry.downloads.append(str(version))
            shutil.copytree(saved[str(version)], dst_dir)
            return Path(dst_dir)

    def factory(spec, **kwargs):
        return make_source(spec, registry_factory=FakeRegistry, cache_dir=tmp_path / "cache", **kwargs)

    source = factory("models:/drafts@champion", tracking_uri="http://unused")
    assert isinstance(source, RegistrySource) and source.current().version == "1"
    pair = SpecPairImpl({"target": "tiny", "drafter": "models:/drafts@champion",
                         "mlflow_tracking_uri": "http://unused", "traffic": {"enabled": False}},
                        source_factory=factory, start=False)
    assert pair.drafter_version == "1"
    FakeRegistry.champion = "2"
    assert pair.check_drafter() == "2" and FakeRegistry.downloads == ["1", "2"]
    assert pair.check_drafter() == "2" and FakeRegistry.downloads == ["1", "2"]  # no reload when unchanged
    pair.reconfigure({"drafter": "derived:first1"})
    assert pair.check_drafter() == "derived-first1" and pair.swaps == 3
    pair.reconfigure({"drafter": None})
    assert pair.check_drafter() == "none"


def test_layer_parallel_drafting_is_configurable_per_pair():
    """engine.layer_parallel_group_size installs the EasySpec executor on every drafter the pair loads."""
    from draftsmith.layer_parallel import LayerParallelExecutor
    from serve.spec_pair import SpecPairImpl

    pair = SpecPairImpl({"target": "tiny", "drafter": "derived:0,1", "traffic": {"enabled": False},
                         "engine": {"layer_parallel_group_size": 2}}, start=False)
    executor = pair.loop.engine.drafter.layer_executor
    assert isinstance(executor, LayerParallelExecutor) and executor.approximate
    plain = SpecPairImpl({"target": "tiny", "drafter": "derived:0,1", "traffic": {"enabled": False}}, start=False)
    assert plain.loop.engine.drafter.layer_executor is None
    explicit = SpecPairImpl({"target": "tiny", "drafter": "derived:0,1", "traffic": {"enabled": False},
                             "engine": {"layer_parallel_group_sizes": [2]}}, start=False)
    assert explicit.loop.engine.drafter.layer_executor.plan.sizes == (2,)
    # a plan that does not fit the drafter refuses that drafter (the pair serves without one), with the reason
    misfit = SpecPairImpl({"target": "tiny", "drafter": "derived:0,1", "traffic": {"enabled": False},
                           "engine": {"layer_parallel_group_sizes": [1, 2]}}, start=False)
    assert misfit.drafter_version == "none" and misfit.loop.engine.drafter is None
    assert any("covers 3 layers, the drafter has 2" in reason for reason in misfit.refused.values())
    # a drafter that reads the target's features serves sequentially, never under a plan
    feature = SpecPairImpl({"target": "tiny", "drafter": "feature:last1", "traffic": {"enabled": False}}, start=False)
    assert feature.drafter_version == "feature-last1" and feature.loop.engine.drafter.feature_fc is not None
    planned = SpecPairImpl({"target": "tiny", "drafter": "feature:last1", "traffic": {"enabled": False},
                            "engine": {"layer_parallel_group_size": 2}}, start=False)
    assert planned.loop.engine.drafter is None
    assert any("drafts sequentially" in reason for reason in planned.refused.values())


def test_prompt_lookup_is_configurable_per_pair():
    """engine.prompt_lookup_max reaches the pair's engine, which then speculates before any drafter is loaded."""
    from draftsmith.sampling import SamplingParams
    from draftsmith.specdec import Request
    from serve.spec_pair import SpecPairImpl

    pair = SpecPairImpl({"target": "tiny", "drafter": None, "traffic": {"enabled": False},
                         "engine": {"prompt_lookup_max": 3, "prompt_lookup_min": 1,
                                    "disable_speculation_at_batch": 4}}, start=False)
    engine = pair.loop.engine
    assert engine.drafter is None and (engine.config.prompt_lookup_min, engine.config.prompt_lookup_max) == (1, 3)
    assert engine.config.disable_speculation_at_batch == 4
    result = engine.generate([Request("r", [20, 21, 22, 20, 21, 22, 20, 21], SamplingParams(max_tokens=16))])[0]
    assert result.stats.lookup_drafted > 0 and result.stats.drafted == result.stats.lookup_drafted


def _fake_traffic_logger(answer):
    """A stand-in for the TrafficLogger handle: `.log_batch/.durable/.flush.remote(*args)` return an
    already-resolved future holding `answer(method name, args)`."""
    import asyncio
    from types import SimpleNamespace

    def remote(name, *args):
        future = asyncio.get_running_loop().create_future()
        future.set_result(answer(name, args))
        return future

    return SimpleNamespace(**{name: SimpleNamespace(remote=lambda *args, name=name: remote(name, *args))
                              for name in ("log_batch", "durable", "flush")})


def _sender(handle, **traffic):
    """The replica's traffic sender alone (serve/traffic_sender.py), with a stand-in logger handle."""
    from serve.config import TrafficSettings
    from serve.metrics import ReplicaMetrics
    from serve.traffic_sender import TrafficSender

    return TrafficSender(handle, TrafficSettings(**traffic), ReplicaMetrics(), "draftsmith")


def test_traffic_sender_calls_the_logger_outside_the_request_that_started_it():
    """Serve cancels the handle calls made under a request id when that request ends (an SSE stream's
    handle is cancelled after its last chunk): the sender, started by some request, must not call the
    logger under that request's id, or a record in flight is cancelled with it."""
    import asyncio
    from types import SimpleNamespace

    from ray.serve.context import _get_serve_request_context, _set_request_context

    calls = []

    def answer(name, args):
        calls.append((name, _get_serve_request_context().request_id))
        return {"instance": "logger-1", "seq": 1, "durable_through": 1}

    sender = _sender(_fake_traffic_logger(answer), send_interval_seconds=0.05)

    async def a_request_that_starts_the_sender():
        _set_request_context(request_id="the-first-request")
        sender.ensure_started()
        sender.enqueue(SimpleNamespace(request_id="r1"))
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not sender.pending:
                break
        return await sender.flush()

    flushed = asyncio.run(a_request_that_starts_the_sender())
    assert flushed["pending_records"] == 0 and flushed["instance"] == "logger-1"
    sent = [request_id for name, request_id in calls if name == "log_batch"]
    assert sent == [""], calls  # sent once, by the sender, under no request id
    assert ("flush", "the-first-request") in calls  # the flush belongs to the request that asked for it


def test_flush_resends_what_a_replaced_logger_held_before_it_returns():
    """A logger replaced since the last send is found out by the flush call itself: the records the
    old instance had not written go to the new one, and are flushed, before the flush returns."""
    import asyncio
    from types import SimpleNamespace

    state = {"instance": "old-logger", "received": []}

    def answer(name, args):
        if name == "log_batch":
            state["received"] += [(state["instance"], r.request_id) for r in args[0]]
        durable = 0 if state["instance"] == "old-logger" else len(state["received"])  # the old one never wrote
        return {"instance": state["instance"], "seq": len(state["received"]), "durable_through": durable}

    sender = _sender(_fake_traffic_logger(answer), send_interval_seconds=60)

    async def scenario():
        sender.ensure_started()
        sender.enqueue(SimpleNamespace(request_id="r1"))
        await sender.send_pending()
        state["instance"] = "new-logger"  # killed and replaced by Serve: r1 was in its buffer only
        flushed = await sender.flush()
        return flushed, list(state["received"])  # what the loggers had when the flush returned

    flushed, received = asyncio.run(scenario())
    assert received == [("old-logger", "r1"), ("new-logger", "r1")]
    assert flushed["instance"] == "new-logger" and flushed["unconfirmed_records"] == 0
    assert flushed["pending_records"] == 0 and sender.counts["log_resent"] == 1


def test_weight_prepacking_is_configurable_per_pair():
    """engine.prepack_weights (default on, CPU) reaches the target's and the drafter's runners."""
    import torch
    import torch.nn.functional as F

    from draftsmith.llama import PrepackedLinear, can_prepack
    from serve.spec_pair import SpecPairImpl

    packs = can_prepack(torch.float32, "cpu")
    for setting, expected in ((True, packs), (False, False)):
        pair = SpecPairImpl({"target": "tiny", "drafter": "derived:0,1", "traffic": {"enabled": False},
                             "engine": {"prepack_weights": setting}}, start=False)
        engine = pair.loop.engine
        for runner in (engine.target, engine.drafter):
            assert isinstance(runner.linear, PrepackedLinear) is expected
            assert (runner.linear is F.linear) is not expected
