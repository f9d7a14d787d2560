"""What the ingress and a SpecPair replica exchange: typed requests, chunks and errors with a code.

What it does: `GenerateRequest` is one validated, tokenized request as the ingress hands it to a replica
(and `engine_request()` turns it into the engine's `Request`); a replica answers with `Chunk`s (text
deltas, the last one carrying `Finish`: finish reason, usage and the `draftsmith` figures, built by
`speculation_figures` from what the engine really did) or with a
chunk holding a `ReplicaError`, whose `ErrorCode` says what went wrong. The replica decides the code
where it catches the failure; the ingress maps codes to HTTP statuses and OpenAI error bodies
(`http_error`), and never reads an error's message to decide anything.

What it does not do: parse HTTP bodies or build OpenAI responses (protocol.py), generate (spec_pair.py).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from draftsmith.sampling import SamplingParams
from draftsmith.specdec import Request
from serve.logger import longest_draft
from serve.protocol import ProtocolError


class ErrorCode(str, enum.Enum):
    """Why a replica did not complete a request."""

    INVALID_REQUEST = "invalid_request"  # the engine refused the request (empty prompt, ids outside the vocabulary)
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # prompt + max_tokens + speculation exceed the context
    ENGINE_ERROR = "engine_error"  # a decoding step failed; the replica keeps serving others
    NO_RESULT = "no_result"  # the request ended without a final result


@dataclasses.dataclass(frozen=True)
class ReplicaError:
    code: ErrorCode
    message: str


# code -> (HTTP status, OpenAI error type, param, OpenAI error code)
_HTTP = {
    ErrorCode.INVALID_REQUEST: (400, "invalid_request_error", None, None),
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: (400, "invalid_request_error", "max_tokens", "context_length_exceeded"),
    ErrorCode.ENGINE_ERROR: (500, "server_error", None, None),
    ErrorCode.NO_RESULT: (500, "server_error", None, None),
}


def http_error(error: ReplicaError) -> ProtocolError:
    """The HTTP answer to a replica's error (its body is also the error event of a stream)."""
    status, kind, param, code = _HTTP[error.code]
    return ProtocolError(status, error.message, type=kind, param=param, code=code)


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """One request, validated and tokenized by the ingress."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    prompt_text: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    user: str | None = None
    num_speculative_tokens: int | None = None  # None: the replica's default
    speculative: bool = True  # False: autoregressive decoding for this request
    log: bool = True  # False: not written to the traffic log

    @property
    def requested_gamma(self) -> int | None:
        """The draft length this request asks the engine for: 0 when `speculative: false`, None for the default."""
        return self.num_speculative_tokens if self.speculative else 0

    def speculation(self, engine_gamma: int | str) -> str:
        """How this request's draft lengths are decided: "auto" (the engine's policy, every step), "fixed"
        (its own or the engine's number) or "off" (`speculative: false`, or a gamma of 0)."""
        gamma = engine_gamma if self.requested_gamma is None else self.requested_gamma
        return "auto" if gamma == "auto" else "fixed" if gamma else "off"

    def engine_request(self) -> Request:
        params = SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                                stop=tuple(self.stop), seed=self.seed)
        return Request(self.request_id, list(self.prompt_token_ids), params,
                       num_speculative_tokens=self.requested_gamma)


def speculation_figures(stats, drafter_version: str, speculation: str) -> dict[str, Any]:
    """The response's `draftsmith` object: what was really done for one request (`stats`, the engine's
    RequestStats), not what was configured. num_speculative_tokens is the longest draft verified; proposer
    says which proposers drafted ("drafter", "lookup", "drafter+lookup" or "none"); policy_off_steps counts
    the steps in which the `auto` policy drafted nothing for it."""
    counts = {length: n for length, n in sorted(stats.draft_length_counts.items()) if n}
    return {
        "drafter_version": drafter_version if drafter_version != "none" else None,
        "speculation": speculation, "proposer": stats.proposer,
        "num_speculative_tokens": longest_draft(stats),
        "mean_drafted_per_step": round(stats.mean_drafted_per_step, 4),
        "draft_length_counts": {str(length): n for length, n in counts.items()},
        "steps": stats.steps, "speculative_steps": stats.speculative_steps,
        "policy_off_steps": stats.policy_off_steps, "policy_switched_off": stats.policy_off_steps > 0,
        "drafted": stats.drafted, "accepted": stats.accepted, "compared": stats.compared,
        "lookup_drafted": stats.lookup_drafted, "lookup_accepted": stats.lookup_accepted,
        "lookup_compared": stats.lookup_compared, "drafter_token_acceptance": stats.drafter_token_acceptance,
        "emitted_in_steps": stats.emitted_in_steps,
        "position_tried": list(stats.position_tried), "position_accepted": list(stats.position_accepted),
        "acceptance_rate": stats.acceptance_rate, "token_acceptance": stats.token_acceptance,
        "mean_accepted_length": stats.mean_accepted_length,
    }


@dataclasses.dataclass(frozen=True)
class Finish:
    finish_reason: str
    usage: dict[str, int]
    draftsmith: dict[str, Any]  # the response's `draftsmith` object: drafter version and acceptance figures


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Text generated since the last chunk; the last chunk of a request has `finish` or `error`."""

    text: str = ""
    n_tokens: int = 0
    finish: Finish | None = None
    error: ReplicaError | None = None

    @property
    def final(self) -> bool:
        return self.finish is not None or self.error is not None
