"""Traffic replay: send chat prompts to the OpenAI endpoint from N concurrent clients, over real HTTP.

What it does: `replay(base_url, prompts, ...)` runs `concurrency` asyncio clients (httpx) that take
prompts from one queue and POST `/v1/chat/completions` (greedy by default, with the `draftsmith`
request extension for gamma and the traffic-log opt-out), with a progress bar on stderr. Every
request becomes a `ReplayResult` in completion order: latency, output tokens, the answering drafter
version and its acceptance counters, or the error. Nothing is retried: a failed request is counted.

What it does not do: start servers, choose prompts, or aggregate figures (draftsmith.timeline does).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from typing import Sequence

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ReplayResult:
    """One request as the client saw it (`error` set when it failed)."""

    index: int  # position in the prompt list
    phase: str
    started: float  # time.time() at send
    finished: float  # time.time() at the end of the response
    completion_tokens: int = 0
    drafter_version: str | None = None
    drafted: int = 0
    accepted: int = 0
    compared: int = 0
    lookup_accepted: int = 0  # of accepted / compared, prompt lookup's proposals (the rest: the drafter's)
    lookup_compared: int = 0
    steps: int = 0  # target verification steps
    emitted_in_steps: int = 0  # tokens those steps emitted (mean accepted length = emitted_in_steps / steps)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_row(self) -> dict:
        return dataclasses.asdict(self)


async def _one(client, url: str, payload: dict, headers: dict, result: ReplayResult) -> None:
    try:
        response = await client.post(url, json=payload, headers=headers)
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {response.text[:300]}"
            return
        body = response.json()
        figures = body.get("draftsmith") or {}
        result.completion_tokens = int(body.get("usage", {}).get("completion_tokens", 0))
        result.drafter_version = figures.get("drafter_version")
        result.drafted = int(figures.get("drafted", 0))
        result.accepted = int(figures.get("accepted", 0))
        result.compared = int(figures.get("compared", 0))
        result.lookup_accepted = int(figures.get("lookup_accepted") or 0)
        result.lookup_compared = int(figures.get("lookup_compared") or 0)
        result.steps = int(figures.get("steps", 0))
        result.emitted_in_steps = int(figures.get("emitted_in_steps", 0))
    except Exception as error:  # noqa: BLE001  a failed request is a result, not a crash
        result.error = f"{type(error).__name__}: {error}"
    finally:
        result.finished = time.time()


async def _replay(base_url: str, prompts: Sequence[list[dict]], *, phase: str, concurrency: int, max_tokens: int,
                  num_speculative_tokens: int | None, log: bool, temperature: float, model: str,
                  api_key: str | None, timeout_s: float, progress: bool) -> list[ReplayResult]:
    import httpx
    from tqdm.auto import tqdm

    url = base_url.rstrip("/") + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    queue: asyncio.Queue = asyncio.Queue()
    for item in enumerate(prompts):
        queue.put_nowait(item)
    results: list[ReplayResult] = []
    extension: dict = {"log": log}
    if num_speculative_tokens is not None:
        extension["num_speculative_tokens"] = num_speculative_tokens
    bar = tqdm(total=len(prompts), desc=phase, unit="req", file=sys.stderr, disable=not progress)

    async def client_loop(client) -> None:
        while True:
            try:
                index, messages = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            payload = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                       "seed": index, "draftsmith": extension}
            result = ReplayResult(index=index, phase=phase, started=time.time(), finished=0.0)
            await _one(client, url, payload, headers, result)
            results.append(result)
            bar.update()
            if result.error:
                bar.set_postfix_str(f"errors={sum(not r.ok for r in results)}")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    bar.close()
    failed = [r for r in results if not r.ok]
    if failed:
        logger.warning("%s: %d of %d requests failed; first: %s", phase, len(failed), len(results), failed[0].error)
    return sorted(results, key=lambda r: r.finished)


def replay(base_url: str, prompts: Sequence[list[dict]], *, phase: str = "replay", concurrency: int = 8,
           max_tokens: int = 64, num_speculative_tokens: int | None = None, log: bool = True,
           temperature: float = 0.0, model: str = "draftsmith", api_key: str | None = None,
           timeout_s: float = 600.0, progress: bool = True) -> list[ReplayResult]:
    """Replay chat prompts (OpenAI message lists) with `concurrency` clients; results in completion order."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    return asyncio.run(_replay(base_url, prompts, phase=phase, concurrency=concurrency, max_tokens=max_tokens,
                               num_speculative_tokens=num_speculative_tokens, log=log, temperature=temperature,
                               model=model, api_key=api_key, timeout_s=timeout_s, progress=progress))
