"""The OpenAI wire protocol, as pure functions: request models, validation, errors, SSE, responses.

What it does: parses a raw request body (bytes) into a pydantic request model, turning every way a
body can be wrong (invalid UTF-8, malformed JSON, missing or wrongly typed fields, n != 1...) into a
`ProtocolError` that carries an HTTP status and an OpenAI-style error body
`{"error": {"message", "type", "param", "code"}}`; formats server-sent events; builds completion and
chat responses and stream chunks, including the `draftsmith` extension object.

The `draftsmith` request extension: `{"num_speculative_tokens": int >= 0, "speculative": bool,
"log": bool}` controls speculation and logging for one request (an explicit length is honoured also when
the replica's speculation is `auto`); the response's `draftsmith` object reports what was really done for
that request (pair_protocol.speculation_figures: drafter_version, how its lengths were decided, which
proposer drafted, the longest draft, drafted tokens per step, the steps the policy switched off, acceptance
overall and per draft position).

What it does not do: HTTP serving, tokenization, generation (app.py, spec_pair.py), the messages between
ingress and replica (pair_protocol.py).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SSE_DONE = "data: [DONE]\n\n"


class ProtocolError(Exception):
    """A request the server refuses; `body()` is what the client receives."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class DraftsmithOptions(BaseModel):
    """Per-request speculation and logging control (a Draftsmith extension of the OpenAI API)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    num_speculative_tokens: int | None = Field(None, ge=0, description="Draft tokens per step for this request.")
    speculative: bool = Field(True, description="false: plain autoregressive decoding for this request.")
    log: bool = Field(True, description="false: this request is not written to the traffic log.")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _CommonRequest(BaseModel):
    # strict: "10" is not an int; unknown OpenAI fields (logprobs, penalties...) are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    max_tokens: int | None = Field(None, gt=0, description="Output tokens at most (> 0).")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    # torch seeds and the traffic log's seed column are 64-bit.
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="Sampling seed (64-bit).")
    user: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    draftsmith: DraftsmithOptions | None = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return value

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def options(self) -> DraftsmithOptions:
        return self.draftsmith or DraftsmithOptions()


class CompletionRequest(_CommonRequest):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(16, gt=0, description="Output tokens at most (> 0); OpenAI's default is 16.")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("only one prompt per request is supported")
            return value[0]
        if isinstance(value, list) and not value:
            raise ValueError("the prompt is empty")
        return value


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, gt=0, description="Newer name of max_tokens.")

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def _describe(error: ValidationError) -> tuple[str, str | None]:
    parts, first_param = [], None
    for item in error.errors()[:3]:
        loc = ".".join(str(x) for x in item["loc"] if not (isinstance(x, str) and x in _UNION_TAGS))
        first_param = first_param or loc or None
        message = item["msg"]
        if item["type"] == "missing":
            message = "required field is missing"
        parts.append(f"{loc}: {message}" if loc else message)
    more = len(error.errors()) - 3
    return "Invalid request: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else ""), first_param


_UNION_TAGS = {"str", "int", "float", "bool", "list[int]", "list[str]", "list[TextPart]", "none",
               "DraftsmithOptions", "StreamOptions"}


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def _lone_surrogate_at(value, path: str = "") -> str | None:
    """The path of the first string (key or value) in parsed JSON that is not valid Unicode, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            where = _lone_surrogate_at(key, path) if isinstance(key, str) else None
            if where is None:
                where = _lone_surrogate_at(item, f"{path}.{key}" if path else str(key))
            if where is not None:
                return where
    elif isinstance(value, list):
        for i, item in enumerate(value):
            where = _lone_surrogate_at(item, f"{path}[{i}]")
            if where is not None:
                return where
    return None


def parse_request(body: bytes, model_cls: type[_CommonRequest]) -> _CommonRequest:
    """Raw body -> request model, or ProtocolError (400 encoding/JSON, 422 schema) saying what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ProtocolError(400, f"The request body is not valid UTF-8 (byte {error.start}): send JSON "
                                 "encoded as UTF-8.", code="invalid_encoding") from None
    if not text.strip():
        raise ProtocolError(400, "The request body is empty: send a JSON object.", code="invalid_json")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ProtocolError(400, f"The request body is not valid JSON ({error.msg} at line {error.lineno} "
                                 f"column {error.colno}).", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ProtocolError(400, f"The request body must be a JSON object, got {type(data).__name__}.",
                            code="invalid_json")
    # Strict UTF-8 decoding admits no surrogate, so only a \uD800-\uDFFF escape can bring one in: the walk
    # runs only for bodies that hold such an escape (emoji from ensure_ascii clients, as valid pairs).
    where = _lone_surrogate_at(data) if _SURROGATE_ESCAPE.search(text) else None
    if where is not None:
        # JSON lets "\ud800" through, but it is no character: the tokenizer and the traffic log's
        # Parquet writer both refuse it, so it is refused here, with where it is.
        raise ProtocolError(400, f"The request holds a lone UTF-16 surrogate escape at "
                                 f"{where or 'the top level'}: it is not a Unicode character (write characters "
                                 "outside the BMP as a surrogate pair, or as UTF-8).", param=where or None,
                            code="invalid_encoding")
    try:
        return model_cls.model_validate(data)
    except ValidationError as error:
        message, param = _describe(error)
        raise ProtocolError(422, message, param=param, code="invalid_value") from None


def sse(obj: dict) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


def parse_sse(stream_text: str) -> list[dict | str]:
    """The events of an SSE body (JSON objects, or the string "[DONE]"); the inverse of `sse`."""
    events: list[dict | str] = []
    for block in stream_text.split("\n\n"):
        block = block.strip()
        if not block.startswith("data: "):
            continue
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ----- responses ----------------------------------------------------------------------------------
def completion_response(request_id: str, model: str, text: str, finish_reason: str, usage: dict,
                        draftsmith: dict | None, created: int | None = None) -> dict:
    return {"id": request_id, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage, "draftsmith": draftsmith}


def chat_response(request_id: str, model: str, text: str, finish_reason: str, usage: dict,
                  draftsmith: dict | None, created: int | None = None) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage, "draftsmith": draftsmith}


def stream_chunk(kind: str, request_id: str, model: str, created: int, text: str | None,
                 finish_reason: str | None = None, *, first: bool = False, extra: dict | None = None) -> dict:
    """One streamed chunk: `kind` is "completion" or "chat"; text None gives an empty choices list."""
    if kind == "chat":
        obj = "chat.completion.chunk"
        choices = [] if text is None else [{
            "index": 0, "delta": ({"role": "assistant", "content": text} if first else {"content": text}),
            "logprobs": None, "finish_reason": finish_reason}]
    else:
        obj = "text_completion"
        choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None,
                                             "finish_reason": finish_reason}]
    chunk: dict[str, Any] = {"id": request_id, "object": obj, "created": created, "model": model, "choices": choices}
    if extra:
        chunk.update(extra)
    return chunk
