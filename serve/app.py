"""The HTTP ingress (OpenAI API through FastAPI on Serve), the application builder and `draftsmith serve`.

What it does: `build_app(args)` (Serve's application-builder pattern, used by `serve run
serve.app:build_app ...` and `serve deploy infra/serve.yaml`) builds three deployments: the
`Ingress` below, the `SpecPair` replicas (spec_pair.py) and the `TrafficLogger` (logger.py). The
ingress tokenizes (the target's chat template for chat), validates (protocol.py), and calls the
SpecPair through a DeploymentHandle with a typed `GenerateRequest` (pair_protocol.py), streaming with
`handle.options(stream=True)`; a replica's error comes back with a code that `http_error` turns into the
HTTP status and OpenAI error body.

Routes: POST /v1/completions, POST /v1/chat/completions (`stream: true` gives server-sent events),
GET /v1/models, GET /health, GET /draftsmith/status (the answering replica's drafter, refusals,
counters), POST /draftsmith/flush (write pending traffic records now).

Limits: bodies over `max_request_body_bytes` get 413 before they are parsed; prompts over
`max_prompt_tokens` (or the context) and token ids outside the vocabulary get 400. A SpecPair replica
that dies or is unreachable mid-request gives 503 (`replica_unavailable`, retryable), or an error
event on a stream that had started; never a bare 500.

What it does not do: generation, batching (spec_pair.py, engine_loop.py), drafter swaps (drafter_watcher.py);
Parquet (logger.py).
"""

import argparse
import logging
import os
import sys
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from draftsmith.models import DERIVATION_PREFIXES
from serve.config import SERVING_LABEL_SELECTOR, ServeAppConfig, parse_app_args, speculation_arg
from serve.logger import TrafficLogger, logging_opted_out
from serve.protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    ProtocolError,
    chat_response,
    completion_response,
    error_body,
    parse_request,
    sse,
    stream_chunk,
)
from serve.pair_protocol import Chunk, GenerateRequest, http_error
from serve.spec_pair import SpecPair

logger = logging.getLogger(__name__)

APP_NAME = "draftsmith"
api = FastAPI(title="Draftsmith", description="OpenAI-compatible speculative-decoding endpoint.")


@api.exception_handler(ProtocolError)
async def _protocol_error(_: Request, error: ProtocolError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(error.detail), kind), status_code=error.status_code)


def load_tokenizer(spec: str):
    """The target's tokenizer without loading its weights."""
    from draftsmith import models
    from draftsmith.tokenization import build_tiny_tokenizer

    if spec == "tiny":
        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    path, _, _ = models.resolve_model_path(spec)
    return AutoTokenizer.from_pretrained(path)


def _upstream_error(error: BaseException, request_id: str | None = None) -> ProtocolError:
    """A failure of the call to the SpecPair (replica killed, restarting, overloaded) as a clear 503;
    logged when it ends a request (`request_id`)."""
    if request_id is not None:
        logger.warning("request %s failed in the SpecPair: %s: %s", request_id, type(error).__name__, error)
    return ProtocolError(503, f"The replica serving this request failed before it finished "
                              f"({type(error).__name__}); the request was not completed: retry it.",
                         type="server_error", code="replica_unavailable")


# No CPU (it only tokenizes and forwards), and never on a spare node: see serve.config.SERVING_LABEL_SELECTOR.
@serve.deployment(name="Ingress", max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0, "label_selector": dict(SERVING_LABEL_SELECTOR)})
@serve.ingress(api)
class Ingress:
    def __init__(self, pair: DeploymentHandle, config: dict):
        self.cfg: ServeAppConfig = parse_app_args(config)
        self.pair = pair
        self._token = self.cfg.bearer_token()
        self.tokenizer = load_tokenizer(self.cfg.target)
        self._info: dict | None = None

    async def _engine_info(self) -> dict:
        if self._info is None:
            self._info = await self.pair.info.remote()
        return self._info

    def _check_auth(self, request: Request) -> None:
        if self._token and request.headers.get("authorization") != f"Bearer {self._token}":
            raise ProtocolError(401, "Missing or wrong API key: send `Authorization: Bearer <token>`.",
                                type="authentication_error", code="invalid_api_key")

    def _check_model(self, model: str) -> None:
        if model != self.cfg.model_name:
            raise ProtocolError(404, f"The model {model!r} does not exist; this server serves "
                                     f"{self.cfg.model_name!r} (see GET /v1/models).",
                                type="invalid_request_error", param="model", code="model_not_found")

    # ----- routes ---------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._check_auth(request)
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "draftsmith", "root": self.cfg.target}]}

    @api.get("/draftsmith/status")
    async def status(self, request: Request) -> dict:
        self._check_auth(request)
        return await self.pair.status.remote()

    @api.post("/draftsmith/flush")
    async def flush(self, request: Request) -> dict:
        self._check_auth(request)
        return await self.pair.flush_traffic.remote()

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to exceed the limit (header or bytes read)."""
        limit = self.cfg.max_request_body_bytes
        too_large = ProtocolError(413, f"The request body exceeds {limit} bytes (max_request_body_bytes): send a "
                                       "shorter prompt.", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_token_ids(self, ids: list[int]) -> None:
        vocab = len(self.tokenizer)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ProtocolError(400, f"The prompt holds token id {bad}, outside this model's vocabulary "
                                     f"[0, {vocab}).", param="prompt", code="invalid_token_id")

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        self._check_auth(request)
        body = parse_request(await self._read_body(request), CompletionRequest)
        self._check_model(body.model)
        if isinstance(body.prompt, str):
            prompt_text, ids = body.prompt, self.tokenizer.encode(body.prompt)
        else:
            prompt_text, ids = None, list(body.prompt)
            self._check_token_ids(ids)
        return await self._generate("completion", request, body, ids, prompt_text, body.max_tokens)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._check_auth(request)
        body = parse_request(await self._read_body(request), ChatCompletionRequest)
        self._check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt_text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # noqa: BLE001  templates raise on role orders they do not support
            raise ProtocolError(400, f"The messages do not fit the model's chat template: {error}",
                                param="messages") from None
        ids = self.tokenizer.encode(prompt_text, add_special_tokens=False)
        return await self._generate("chat", request, body, ids, prompt_text, body.effective_max_tokens())

    # ----- generation -----------------------------------------------------------------------------
    async def _pair_request(self, request: Request, body, ids: list[int], prompt_text: str | None,
                            max_tokens: int | None) -> GenerateRequest:
        """The request the replica runs, after the checks that need the replica's limits."""
        try:
            info = await self._engine_info()
        except Exception as error:  # noqa: BLE001  no replica answered
            raise _upstream_error(error) from None
        context = info["max_model_len"]
        options = body.options
        limit = self.cfg.max_prompt_tokens
        if limit is not None and len(ids) > limit:
            raise ProtocolError(400, f"The prompt is {len(ids)} tokens long; this server accepts at most {limit} "
                                     "(max_prompt_tokens): shorten the prompt.",
                                param="messages" if body.__class__ is ChatCompletionRequest else "prompt",
                                code="prompt_too_long")
        if len(ids) >= context:
            raise ProtocolError(400, f"The prompt is {len(ids)} tokens long; this model's context is {context} "
                                     "tokens: shorten the prompt.", param="messages" if prompt_text else "prompt",
                                code="context_length_exceeded")
        if options.num_speculative_tokens is not None and \
                options.num_speculative_tokens > info["max_num_speculative_tokens"]:
            raise ProtocolError(422, f"draftsmith.num_speculative_tokens must be <= "
                                     f"{info['max_num_speculative_tokens']}.", param="draftsmith.num_speculative_tokens")
        if max_tokens is None:
            # Leave the context the engine may keep for drafts (the replica's gamma may be "auto": then the
            # most the policy drafts), or the request's own larger gamma.
            headroom = max(info["max_speculative_tokens"], options.num_speculative_tokens or 0)
            max_tokens = max(1, min(info["default_max_tokens"], context - len(ids) - headroom - 1))
        return GenerateRequest(
            request_id=uuid.uuid4().hex, prompt_token_ids=ids, prompt_text=prompt_text, max_tokens=max_tokens,
            temperature=body.temperature, top_p=body.top_p, stop=tuple(body.stop_list()), seed=body.seed,
            user=body.user, num_speculative_tokens=options.num_speculative_tokens, speculative=options.speculative,
            log=not logging_opted_out(request.headers, options.log))

    async def _generate(self, kind: str, request: Request, body, ids, prompt_text, max_tokens):
        pair_request = await self._pair_request(request, body, ids, prompt_text, max_tokens)
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        request_id, created, model = prefix + pair_request.request_id, int(time.time()), self.cfg.model_name
        if not body.stream:
            try:
                result: Chunk = await self.pair.generate.remote(pair_request)
            except Exception as error:  # noqa: BLE001  the replica died or could not be reached
                raise _upstream_error(error, request_id) from None
            if result.error is not None:
                raise http_error(result.error)
            build = chat_response if kind == "chat" else completion_response
            finish = result.finish
            return build(request_id, model, result.text, finish.finish_reason, finish.usage, finish.draftsmith,
                         created)
        stream = self.pair.options(stream=True).generate_stream.remote(pair_request)
        try:
            try:
                first = await stream.__anext__()
            except Exception as error:  # noqa: BLE001  the replica died or could not be reached
                raise _upstream_error(error, request_id) from None
            if first.error is not None:
                raise http_error(first.error)
        except BaseException:
            stream.cancel()
            raise
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(self._sse(kind, stream, first, request_id, model, created, include_usage),
                                 media_type="text/event-stream")

    async def _sse(self, kind: str, stream, first: Chunk, request_id: str, model: str, created: int,
                   include_usage: bool) -> AsyncIterator[str]:
        chunk, is_first = first, True
        try:
            while True:
                if chunk.error is not None:
                    yield sse(http_error(chunk.error).body())
                    break
                finish = chunk.finish
                if chunk.text or is_first or finish is not None:
                    extra = {"draftsmith": finish.draftsmith} if finish is not None else None
                    yield sse(stream_chunk(kind, request_id, model, created, chunk.text,
                                           finish and finish.finish_reason, first=is_first, extra=extra))
                    is_first = False
                if finish is not None:
                    if include_usage:
                        yield sse(stream_chunk(kind, request_id, model, created, None, extra={"usage": finish.usage}))
                    break
                try:
                    chunk = await stream.__anext__()
                except StopAsyncIteration:
                    yield sse(error_body("the stream ended without a result", "server_error",
                                         code="replica_unavailable"))
                    break
                except Exception as error:  # noqa: BLE001  the replica died mid-stream: say so in the stream
                    yield sse(_upstream_error(error, request_id).body())
                    break
            yield SSE_DONE
        finally:
            stream.cancel()  # no-op when finished; frees the engine slot when the client disconnected


# ----- building and running -----------------------------------------------------------------------
def build_app(args: dict) -> serve.Application:
    """Serve application builder: `args` are ServeAppConfig fields (or `config: path.yaml` + overrides)."""
    cfg = parse_app_args(args)
    if "://" not in cfg.traffic.uri:  # replicas may run elsewhere: pin the path as the builder sees it
        cfg.traffic.uri = os.path.abspath(cfg.traffic.uri)
    if cfg.drafter and not cfg.drafter.startswith((*DERIVATION_PREFIXES, "models:/")) and "://" not in cfg.drafter:
        cfg.drafter = os.path.abspath(os.path.expanduser(cfg.drafter))
    config = cfg.model_dump()
    traffic_logger = None
    if cfg.traffic.enabled:
        t = cfg.traffic
        traffic_logger = TrafficLogger.bind(t.uri, t.flush_every_records, t.flush_every_seconds)
    pair = SpecPair.options(**cfg.spec_pair_options()).bind(config, traffic_logger)
    return Ingress.options(num_replicas=cfg.ingress_replicas).bind(pair, config)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="draftsmith serve", description="Serve the OpenAI API with speculative "
                                "decoding on a local Ray cluster (blocks until Ctrl-C).")
    p.add_argument("--config", help="YAML: ServeAppConfig fields or a Serve config (infra/serve.yaml)")
    p.add_argument("--target", help="target spec (tiny, smollm2-135m-instruct, HF dir, .gguf)")
    p.add_argument("--drafter", help="drafter source: dir, derived:<layers>, models:/<name>@champion, none")
    p.add_argument("--mlflow-tracking-uri")
    p.add_argument("--traffic-uri", help="traffic log root (path or URI)")
    p.add_argument("--num-speculative-tokens", type=speculation_arg, metavar="auto|N",
                   help="tokens drafted per step, or auto: the speculation policy decides every step")
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config field, dotted (engine.max_model_len=1024); repeatable")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None, help="Ray address (default: connect or start a local cluster)")
    return p


def args_from_cli(ns: argparse.Namespace) -> dict:
    args: dict = {}
    if ns.config:
        args["config"] = ns.config
    for key, value in [("target", ns.target), ("drafter", ns.drafter), ("mlflow_tracking_uri", ns.mlflow_tracking_uri),
                       ("traffic.uri", ns.traffic_uri), ("engine.num_speculative_tokens", ns.num_speculative_tokens),
                       ("engine.max_batch_size", ns.max_batch_size)]:
        if value is not None:
            args[key] = value
    for item in ns.set:
        key, _, value = item.partition("=")
        args[key] = value
    return args


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    import ray

    app = build_app(args_from_cli(ns))  # validate the config before starting anything
    if not ray.is_initialized():
        ray.init(address=ns.address, configure_logging=False)
    serve.start(http_options={"host": ns.host, "port": ns.port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    print(f"Draftsmith serving on http://{ns.host}:{ns.port}/v1 (Ctrl-C to stop)", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(APP_NAME)
    return 0
