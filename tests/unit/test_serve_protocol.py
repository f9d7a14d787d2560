"""The pure parts of serve/: request validation, error bodies, SSE formatting, opt-out, config, records."""

import json

import pytest
import torch

from serve.config import ServeAppConfig, parse_app_args
from serve.logger import logging_opted_out, record_from_result
from serve.protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    ProtocolError,
    parse_request,
    parse_sse,
    sse,
    stream_chunk,
)


def _body(**fields) -> bytes:
    return json.dumps({"model": "draftsmith", **fields}).encode()


def test_valid_completion_request_defaults():
    req = parse_request(_body(prompt="hi"), CompletionRequest)
    assert req.max_tokens == 16 and req.temperature == 1.0 and req.n == 1 and req.stop_list() == []
    assert req.options.speculative and req.options.log and req.options.num_speculative_tokens is None


def test_extension_and_stop_forms():
    req = parse_request(_body(prompt=["one"], stop="\n", temperature=0, seed=3,
                              draftsmith={"num_speculative_tokens": 2, "speculative": False, "log": False}),
                        CompletionRequest)
    assert req.prompt == "one" and req.stop_list() == ["\n"] and req.temperature == 0.0
    assert req.options.num_speculative_tokens == 2 and not req.options.speculative and not req.options.log
    chat = parse_request(_body(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}]}],
                               max_completion_tokens=5, stop=["x", "y"]), ChatCompletionRequest)
    assert chat.messages[0].text() == "a" and chat.effective_max_tokens() == 5 and chat.stop_list() == ["x", "y"]


@pytest.mark.parametrize("body, status, fragment", [
    (b'{"model": "draftsmith", "prompt": ', 400, "not valid JSON"),
    (b"", 400, "empty"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"model": "draftsmith", "prompt": "\xff\xfe"}', 400, "UTF-8"),
    (b'{"model": "draftsmith", "prompt": "a\\ud800b"}', 400, "lone UTF-16 surrogate escape at prompt"),
    (b'{"model": "draftsmith", "prompt": [1, 2], "user": "\\udfff"}', 400, "surrogate escape at user"),
    (b'{"model": "draftsmith", "prompt": "x", "stop": ["ok", "\\ude00\\ud83d"]}', 400, "at stop[1]"),
    (_body(), 422, "prompt: required field is missing"),
    (b'{"prompt": "x"}', 422, "model: required field is missing"),
    (_body(prompt="x", max_tokens="ten"), 422, "max_tokens"),
    (_body(prompt="x", max_tokens="10"), 422, "max_tokens"),  # strict: no string -> int coercion
    (_body(prompt="x", max_tokens=0), 422, "greater than 0"),
    (_body(prompt="x", max_tokens=-3), 422, "max_tokens"),
    (_body(prompt="x", temperature=5), 422, "temperature"),
    (_body(prompt="x", n=2), 422, "only n=1"),
    (_body(prompt="x", stop=["a", ""]), 422, "stop"),
    (_body(prompt=["a", "b"]), 422, "one prompt"),
    (_body(prompt="x", draftsmith={"num_speculative_tokens": -1}), 422, "num_speculative_tokens"),
    (_body(prompt="x", draftsmith={"bogus": 1}), 422, "bogus"),
])
def test_bad_completion_requests(body, status, fragment):
    with pytest.raises(ProtocolError) as caught:
        parse_request(body, CompletionRequest)
    error = caught.value
    assert error.status == status
    assert fragment in error.message, error.message
    payload = error.body()["error"]
    assert set(payload) == {"message", "type", "param", "code"} and payload["type"] == "invalid_request_error"


def test_surrogate_pairs_are_characters_and_pass():
    emoji = parse_request(b'{"model": "draftsmith", "prompt": "smile \\ud83d\\ude00"}', CompletionRequest)
    assert emoji.prompt == "smile \U0001F600"
    with pytest.raises(ProtocolError) as caught:
        parse_request(b'{"model": "draftsmith", "messages": [{"role": "user", "content": "\\ud83d"}]}',
                      ChatCompletionRequest)
    assert caught.value.status == 400 and caught.value.param == "messages[0].content"


def test_bad_chat_requests_name_the_field():
    with pytest.raises(ProtocolError) as caught:
        parse_request(_body(messages=[]), ChatCompletionRequest)
    assert caught.value.param == "messages"
    with pytest.raises(ProtocolError) as caught:
        parse_request(_body(messages=[{"role": "wizard", "content": "x"}]), ChatCompletionRequest)
    assert "messages.0.role" in caught.value.message


def test_sse_roundtrip_and_chunks():
    chunk = stream_chunk("chat", "id1", "m", 7, "hé", first=True)
    assert chunk["choices"][0]["delta"] == {"role": "assistant", "content": "hé"}
    assert chunk["object"] == "chat.completion.chunk"
    event = sse(chunk)
    assert event.startswith("data: {") and event.endswith("\n\n") and "\n" not in event[:-2]
    usage = stream_chunk("completion", "id1", "m", 7, None, extra={"usage": {"total_tokens": 3}})
    assert usage["choices"] == [] and usage["usage"] == {"total_tokens": 3}
    assert parse_sse(event + sse(usage) + SSE_DONE) == [chunk, usage, "[DONE]"]


def test_opt_out():
    assert logging_opted_out({}, False)
    assert logging_opted_out({"X-Draftsmith-No-Log": "1"}, None)
    assert logging_opted_out({"x-draftsmith-no-log": "true"}, True)
    assert not logging_opted_out({"X-Draftsmith-No-Log": "0"}, True)
    assert not logging_opted_out({}, None)


def test_config_from_flat_strings_and_yaml(tmp_path):
    cfg = parse_app_args({"target": "tiny", "engine.max_batch_size": "4", "drafter": "none",
                          "autoscaling.enabled": "true"})
    assert cfg.engine.max_batch_size == 4 and cfg.drafter is None
    options = cfg.spec_pair_options()
    assert options["autoscaling_config"]["max_replicas"] == 2 and "num_replicas" not in options
    path = tmp_path / "serve.yaml"
    path.write_text("applications:\n- name: x\n  import_path: serve.app:build_app\n  args:\n"
                    "    target: tiny\n    placement: {bundles: [{CPU: 1}, {CPU: 1}], strategy: SPREAD}\n")
    cfg = parse_app_args({"config": str(path), "model_name": "m"})
    assert cfg.model_name == "m"
    assert cfg.spec_pair_options()["placement_group_bundles"] == [{"CPU": 1}, {"CPU": 1}]
    with pytest.raises(ValueError, match="mlflow_tracking_uri"):
        ServeAppConfig(drafter="models:/d@champion")
    with pytest.raises(ValueError, match="first placement bundle"):
        ServeAppConfig(placement={"num_cpus": 2, "bundles": [{"CPU": 1}]})
    # a two-GPU pair needs both GPUs in the replica actor
    two_gpus = {"engine": {"layer_parallel_devices": ["cuda:0", "cuda:1"]}}
    with pytest.raises(ValueError, match="names 2 GPUs but the replica actor has placement.num_gpus=1"):
        ServeAppConfig(**two_gpus, placement={"num_gpus": 1, "bundles": [{"CPU": 1, "GPU": 1}, {"GPU": 1}]})
    ServeAppConfig(**two_gpus, placement={"num_gpus": 2, "bundles": [{"CPU": 1, "GPU": 2}]})
    with pytest.raises(ValueError, match="layer_parallel_group_sizes"):
        ServeAppConfig(engine={"layer_parallel_group_sizes": [1, 0]})
    assert ServeAppConfig(engine={"prompt_lookup_max": 3}).engine.prompt_lookup_min == 2
    assert ServeAppConfig().engine.disable_speculation_at_batch == 0
    with pytest.raises(ValueError, match="disable_speculation_at_batch"):
        ServeAppConfig(engine={"disable_speculation_at_batch": -1})
    with pytest.raises(ValueError, match=r"engine\n.*prompt_lookup_min \(4\) must be <= prompt_lookup_max \(3\)"):
        ServeAppConfig(engine={"prompt_lookup_max": 3, "prompt_lookup_min": 4})


def test_flat_strings_are_coerced_by_the_field_type():
    """`serve run ... auth_token=123456 model_name=1.0` used to YAML-parse every string, turning these into
    numbers that string fields refuse; only fields that are not strings are parsed now."""
    cfg = parse_app_args({"auth_token": "123456", "model_name": "1.0", "target": "tiny", "drafter": "none",
                          "engine.max_batch_size": "4", "engine.layer_parallel_group_sizes": "[1, 1]",
                          "autoscaling.enabled": "true", "mlflow_http_max_retries": "null",
                          "placement.bundles": "[{CPU: 1}]", "max_prompt_tokens": "64"})
    assert cfg.auth_token == "123456" and cfg.model_name == "1.0" and cfg.drafter is None
    assert cfg.engine.max_batch_size == 4 and cfg.engine.layer_parallel_group_sizes == (1, 1)
    assert cfg.autoscaling.enabled is True and cfg.mlflow_http_max_retries is None
    assert cfg.placement.bundles == [{"CPU": 1.0}] and cfg.max_prompt_tokens == 64
    with pytest.raises(ValueError, match="max_batch_size"):
        parse_app_args({"engine.max_batch_size": "four"})


def test_engine_section_is_the_engine_config():
    """One definition per setting: the `engine:` section is draftsmith's EngineConfig plus Serve's limits."""
    from draftsmith.engine_config import EngineConfig
    from serve.config import EngineSettings

    assert issubclass(EngineSettings, EngineConfig)
    assert set(EngineSettings.model_fields) - set(EngineConfig.model_fields) == {"max_num_speculative_tokens",
                                                                               "default_max_tokens"}
    for name, field in EngineConfig.model_fields.items():
        assert EngineSettings.model_fields[name].description == field.description, name
        assert EngineSettings.model_fields[name].metadata == field.metadata, name  # same rules


def _result(stats, drafter_version="v7"):
    from draftsmith.specdec import GenerationResult

    return GenerationResult(
        request_id="r1", prompt_token_ids=[1, 2], output_token_ids=[3, 4, 5], finish_reason="length",
        text="abc", topk_ids=torch.tensor([[3, 9], [4, 9], [5, 9]]), topk_logprobs=torch.zeros(3, 2),
        accept_mask=torch.tensor([False, True, False]), stats=stats, drafter_version=drafter_version)


def _record(result):
    from draftsmith.sampling import SamplingParams

    return record_from_result(result, target_id="tiny", target_revision="seed0", tokenizer_hash="h",
                              params=SamplingParams(max_tokens=3, seed=5), prompt_text="p", user="u")


def test_record_from_result():
    from draftsmith.specdec import RequestStats

    stats = RequestStats(drafted=4, accepted=1, compared=2, steps=2, draft_length_counts={3: 1, 1: 1})
    record = _record(_result(stats))
    assert record.drafter_version == "v7" and record.accept_mask == [False, True, False]
    assert record.target_topk_ids == [[3, 9], [4, 9], [5, 9]] and record.seed == 5 and record.user == "u"
    assert record.drafted == 4 and record.output_text == "abc"
    assert record.num_speculative_tokens == 3  # the longest draft verified, not a configured gamma
    plain = _record(_result(RequestStats(), drafter_version="none"))
    assert plain.drafter_version == "" and plain.num_speculative_tokens == 0


def test_records_and_responses_say_what_was_done_not_the_configured_gamma():
    """A record used to log the configured gamma (4) for a request whose batch ran autoregressively, and a
    response said gamma 0 for a request that prompt lookup drafted for (no drafter loaded)."""
    from draftsmith.specdec import RequestStats
    from serve.pair_protocol import speculation_figures

    autoregressive = RequestStats(steps=5, emitted_in_steps=5, draft_length_counts={0: 5})
    assert _record(_result(autoregressive)).num_speculative_tokens == 0
    figures = speculation_figures(autoregressive, "v7", "fixed")
    assert figures["num_speculative_tokens"] == 0 and figures["proposer"] == "none"
    assert figures["mean_drafted_per_step"] == 0 and figures["draft_length_counts"] == {"0": 5}

    lookup = RequestStats(drafted=5, accepted=3, compared=5, steps=4, emitted_in_steps=7, lookup_drafted=5,
                          lookup_accepted=3, speculative_steps=2, policy_off_steps=2,
                          draft_length_counts={0: 2, 2: 1, 3: 1}, position_tried=[2, 2, 1],
                          position_accepted=[2, 1, 0])
    assert _record(_result(lookup, drafter_version="none")).num_speculative_tokens == 3
    figures = speculation_figures(lookup, "none", "auto")
    assert figures["drafter_version"] is None and figures["proposer"] == "lookup"
    assert figures["num_speculative_tokens"] == 3 and figures["mean_drafted_per_step"] == 1.25
    assert figures["speculation"] == "auto" and figures["policy_off_steps"] == 2 and figures["policy_switched_off"]
    assert figures["position_tried"] == [2, 2, 1] and figures["position_accepted"] == [2, 1, 0]
    assert figures["draft_length_counts"] == {"0": 2, "2": 1, "3": 1} and figures["speculative_steps"] == 2
    json.dumps(figures)  # the response body


def test_speculation_mode_of_a_request():
    from serve.pair_protocol import GenerateRequest

    request = GenerateRequest("r", [1], max_tokens=1)
    assert request.speculation("auto") == "auto" and request.speculation(4) == "fixed"
    assert request.speculation(0) == "off"
    assert GenerateRequest("r", [1], max_tokens=1, num_speculative_tokens=2).speculation("auto") == "fixed"
    assert GenerateRequest("r", [1], max_tokens=1, num_speculative_tokens=0).speculation("auto") == "off"
    assert GenerateRequest("r", [1], max_tokens=1, num_speculative_tokens=3, speculative=False).speculation(4) == "off"


def test_speculation_auto_in_every_config_form(tmp_path):
    from serve.app import _parser, args_from_cli

    assert ServeAppConfig().engine.num_speculative_tokens == "auto"  # serving decides by itself by default
    assert ServeAppConfig().engine.max_speculative_tokens == ServeAppConfig().engine.auto_max_speculative_tokens
    assert parse_app_args({"engine.num_speculative_tokens": "auto"}).engine.num_speculative_tokens == "auto"
    flat = parse_app_args({"engine.num_speculative_tokens": "3"}).engine
    assert flat.num_speculative_tokens == 3 and flat.max_speculative_tokens == 3
    cli = parse_app_args(args_from_cli(_parser().parse_args(["--num-speculative-tokens", "auto"])))
    assert cli.engine.num_speculative_tokens == "auto"
    assert parse_app_args(args_from_cli(_parser().parse_args(["--num-speculative-tokens", "5"]))).engine \
        .num_speculative_tokens == 5
    with pytest.raises(SystemExit):
        _parser().parse_args(["--num-speculative-tokens", "many"])
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        parse_app_args({"engine.num_speculative_tokens": "sometimes"})
    path = tmp_path / "serve.yaml"
    path.write_text("target: tiny\nengine: {num_speculative_tokens: auto, auto_max_speculative_tokens: 5}\n")
    engine = parse_app_args({"config": str(path)}).engine
    assert engine.num_speculative_tokens == "auto" and engine.max_speculative_tokens == 5


def test_engine_catch_up_near_the_cache_end():
    """Regression found by `bench serve`: admitting a long prompt next to a sequence deep into its output made
    the drafter catch-up write padding past the cache end (IndexError); fixed in specdec._catch_up_drafter."""
    from draftsmith import models
    from draftsmith.sampling import SamplingParams
    from draftsmith.specdec import EngineConfig, Request, SpecEngine, runner_for

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a busy 2-core machine: 1 thread is ~15x faster than 2
    try:
        _catch_up_case(models, SamplingParams, EngineConfig, Request, SpecEngine, runner_for)
    finally:
        torch.set_num_threads(threads)


def _catch_up_case(models, SamplingParams, EngineConfig, Request, SpecEngine, runner_for):
    target = models.tiny_model()
    drafter = models.derive_drafter(target, [0])
    config = EngineConfig(max_batch_size=2, max_model_len=128, num_speculative_tokens=3)
    engine = SpecEngine(runner_for(target.model), runner_for(None, drafter), config=config, eos_token_ids=())
    first = Request("a", list(range(3, 23)), SamplingParams(max_tokens=90, ignore_eos=True))
    second = Request("b", list(range(3, 100)), SamplingParams(max_tokens=20, ignore_eos=True))
    engine.add_request(first)
    for _ in range(12):
        engine.step()
    engine.add_request(second)
    outputs = {}
    while engine.has_work():
        outputs.update({o.request_id: o.result.output_token_ids for o in engine.step() if o.finished})
    plain = SpecEngine(runner_for(target.model), None, config=config, eos_token_ids=())
    expected = plain.generate([Request("a", first.prompt_token_ids, first.params),
                               Request("b", second.prompt_token_ids, second.params)])
    assert outputs == {"a": expected[0].output_token_ids, "b": expected[1].output_token_ids}


def test_bearer_auth_is_optional(monkeypatch):
    from types import SimpleNamespace

    from serve.app import Ingress
    from serve.config import ServeAppConfig

    check = Ingress.func_or_class._check_auth
    request = SimpleNamespace(headers={"authorization": "Bearer secret"})
    check(SimpleNamespace(_token=ServeAppConfig(target="tiny").bearer_token()), SimpleNamespace(headers={}))  # off
    check(SimpleNamespace(_token="secret"), request)
    monkeypatch.setenv("DRAFTSMITH_TEST_TOKEN", "secret")
    from_env = ServeAppConfig(target="tiny", auth_token_env="DRAFTSMITH_TEST_TOKEN").bearer_token()
    check(SimpleNamespace(_token=from_env), request)  # the token can come from a Secret's env var
    monkeypatch.delenv("DRAFTSMITH_TEST_TOKEN")
    with pytest.raises(ValueError, match="DRAFTSMITH_TEST_TOKEN"):
        ServeAppConfig(target="tiny", auth_token_env="DRAFTSMITH_TEST_TOKEN").bearer_token()
    with pytest.raises(ProtocolError) as caught:
        check(SimpleNamespace(_token="other"), request)
    assert caught.value.status == 401 and caught.value.type == "authentication_error"


def test_ingress_default_max_tokens_with_auto_speculation():
    """The ingress computed the default max_tokens as context - prompt - info["num_speculative_tokens"] - 1,
    which fails when the replica's gamma is "auto": it keeps the policy's headroom instead (or a request's
    own larger gamma)."""
    import asyncio
    from types import SimpleNamespace

    from serve.app import Ingress

    info = {"max_model_len": 64, "num_speculative_tokens": "auto", "max_speculative_tokens": 8,
            "max_num_speculative_tokens": 16, "default_max_tokens": 256}

    async def engine_info():
        return info

    ingress = SimpleNamespace(_engine_info=engine_info, cfg=ServeAppConfig(target="tiny", drafter=None))
    request = SimpleNamespace(headers={})

    def pair_request(**draftsmith):
        body = parse_request(_body(messages=[{"role": "user", "content": "x"}], draftsmith=draftsmith),
                             ChatCompletionRequest)
        return asyncio.run(Ingress.func_or_class._pair_request(ingress, request, body, [1] * 10, "p", None))

    assert pair_request().max_tokens == 64 - 10 - 8 - 1
    assert pair_request(num_speculative_tokens=12).max_tokens == 64 - 10 - 12 - 1
    assert pair_request(speculative=False).num_speculative_tokens is None
    with pytest.raises(ProtocolError) as caught:
        pair_request(num_speculative_tokens=17)
    assert caught.value.status == 422
