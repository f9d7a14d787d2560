"""The speculative decoding engine: batched, KV-cached, lossless, with continuous admission.

One `SpecEngine` owns a target runner, an optional drafter runner and their slot KV caches. Requests
are admitted into free slots (prefilled by the target, which also emits the first token), then every
`step()` drafts up to gamma tokens per sequence, verifies all of them in one target forward, accepts
per sequence (ragged: each sequence advances by its own accepted length) and rolls both caches back
by resetting lengths. `num_speculative_tokens=0` runs the same code as plain autoregressive decoding.
With `prompt_lookup_max` set, a row whose context repeats its last n-gram verifies the tokens that
followed the earlier occurrence instead of the drafter's (prompt_lookup.py); the drafter runs only for
the rows without one, and without a drafter such rows decode one token. With
`disable_speculation_at_batch` set, a step decoding at least that many sequences decodes them
autoregressively.
Every target forward also stores the target's final-normed hidden state per position (`target_features`,
a slot store beside the KV cache with the same lengths): an EAGLE-style drafter (`feature_fc`) drafts
from them instead of from tokens alone.

Invariants per sequence (tokens = prompt + output so far):
- the target cache holds every token but the last (`target_len == len(tokens) - 1`);
- the drafter cache holds a prefix (`drafter_len <= len(tokens) - 1`); the tokens it lacks are fed
  at the start of the next draft (after a fully accepted step the last draft token is missing, after
  admission or a drafter swap the whole sequence is);
- a feature-reading drafter's position p reads (target feature at p, token p + 1), so it can be exact
  only up to position len(tokens) - 2, whose output drafts the first token; its later positions read
  its own drafted features and are recomputed from the target's after verification.

Not here: sampling math (sampling.py), model loading (models.py), HTTP/Ray (serve/), timing of whole
benchmarks (bench_decode.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Iterable, Iterator, Sequence

import torch

from draftsmith.llama import CausalLMRunner, KVCache
from draftsmith.prompt_lookup import check_lookup_range, lookup_proposal
from draftsmith.sampling import (
    SamplingParams,
    processed_probs,
    sample_from,
    verify_greedy,
    verify_sampled,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = SamplingParams()
    num_speculative_tokens: int | None = None  # None: the engine's default gamma


class AcceptanceRates:
    """The derived rates of DESIGN.md's vocabulary, over counters named drafted, accepted, compared,
    steps and emitted_in_steps (per request here; pooled over requests in evaluation.py)."""

    drafted: int
    accepted: int
    compared: int
    steps: int
    emitted_in_steps: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def token_acceptance(self) -> float:
        return self.accepted / self.compared if self.compared else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.emitted_in_steps / self.steps if self.steps else 0.0

    def rates(self) -> dict[str, float]:
        """The three derived rates by name (for reports and JSON)."""
        return {"acceptance_rate": self.acceptance_rate, "token_acceptance": self.token_acceptance,
                "mean_accepted_length": self.mean_accepted_length}


@dataclasses.dataclass
class RequestStats(AcceptanceRates):
    """Per-request speculation counters."""

    drafted: int = 0
    accepted: int = 0
    compared: int = 0
    steps: int = 0  # target verification steps (the prefill's first token is not one)
    emitted_in_steps: int = 0
    lookup_drafted: int = 0  # of `drafted`, the tokens prompt lookup proposed
    lookup_accepted: int = 0  # of `accepted`, the tokens prompt lookup proposed
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    prefill_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), **self.rates()}


@dataclasses.dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    finish_reason: str
    text: str | None
    topk_ids: torch.Tensor  # [n_out, k]
    topk_logprobs: torch.Tensor  # [n_out, k]
    accept_mask: torch.Tensor  # [n_out] bool: the token was an accepted draft token
    stats: RequestStats
    drafter_version: str


@dataclasses.dataclass
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    result: GenerationResult | None = None


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    num_speculative_tokens: int = 4
    max_batch_size: int = 8
    max_model_len: int = 2048
    topk_logprobs: int = 8  # target top-k per output position, for the traffic log (0 = off)
    seed: int = 0
    # > 0: a row whose last n tokens (prompt_lookup_min <= n <= prompt_lookup_max) occurred earlier in it drafts
    # what followed them instead of asking the drafter (prompt_lookup.py; vLLM's "ngram" method, here also
    # beside a drafter and without one).
    prompt_lookup_max: int = 0
    prompt_lookup_min: int = 2
    # > 0: a step that decodes at least this many sequences decodes them autoregressively (vLLM's
    # speculative_disable_by_batch_size): verifying gamma + 1 tokens of every row of a large batch is
    # compute-bound.
    disable_speculation_at_batch: int = 0

    def __post_init__(self):
        check_lookup_range(self.prompt_lookup_min, self.prompt_lookup_max)
        if self.disable_speculation_at_batch < 0:
            raise ValueError("disable_speculation_at_batch must be >= 0 (0 = never), "
                             f"got {self.disable_speculation_at_batch}")


@dataclasses.dataclass
class _Sequence:
    request: Request
    gamma: int
    generator: torch.Generator | None
    tokens: list[int]
    prompt_len: int
    target_len: int = 0
    drafter_len: int = 0
    finish_reason: str | None = None
    text: str = ""
    sent_text_len: int = 0
    stats: RequestStats = dataclasses.field(default_factory=RequestStats)
    topk_ids: list[torch.Tensor] = dataclasses.field(default_factory=list)
    topk_logprobs: list[torch.Tensor] = dataclasses.field(default_factory=list)
    accept_mask: list[bool] = dataclasses.field(default_factory=list)

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len:]


class SpecEngine:
    """Batched speculative decoding over slot caches. Single-threaded: call from one thread."""

    def __init__(self, target: CausalLMRunner, drafter: CausalLMRunner | None = None, *,
                 config: EngineConfig = EngineConfig(), eos_token_ids: Sequence[int] = (),
                 decode: Callable[[list[int]], str] | None = None, drafter_version: str = "none"):
        self.target = target
        self.config = config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.decode = decode
        self.max_len = min(config.max_model_len, getattr(target.config, "max_position_embeddings", config.max_model_len))
        self.target_cache: KVCache = target.new_cache(config.max_batch_size, self.max_len)
        # Valid, per slot, exactly where the target cache is (positions < target_len): one hidden state per
        # token is hidden / (2 * layers * kv width) of the KV cache (1/20 for SmolLM2-135M), so it is kept
        # for any drafter a swap may bring.
        self.target_features = torch.zeros(config.max_batch_size, self.max_len, target.embed.shape[1],
                                           dtype=target.dtype, device=target.device)
        self.drafter: CausalLMRunner | None = None
        self.drafter_cache: KVCache | None = None
        self.drafter_version = "none"
        if drafter is not None:
            self.set_drafter(drafter, drafter_version)
        self.active: list[_Sequence] = []
        self.waiting: list[Request] = []
        self._master = torch.Generator().manual_seed(config.seed)
        self._on_cuda = target.device.type == "cuda"

    # ----- requests -------------------------------------------------------------------------------
    def set_drafter(self, drafter: CausalLMRunner | None, version: str = "none") -> None:
        """Switch drafters between steps; running sequences re-feed their tokens to the new drafter."""
        if drafter is not None and drafter.embed.shape[0] != self.target.embed.shape[0]:
            raise ValueError(f"drafter embeds {drafter.embed.shape[0]} tokens, target {self.target.embed.shape[0]}")
        hidden = self.target.embed.shape[1]
        if drafter is not None and drafter.feature_fc is not None and tuple(drafter.feature_fc.shape) != (hidden, 2 * hidden):
            raise ValueError(f"drafter reads features through a {tuple(drafter.feature_fc.shape)} map, the target's "
                             f"features need ({hidden}, {2 * hidden})")
        self.drafter = drafter
        self.drafter_version = version if drafter is not None else "none"
        self.drafter_cache = drafter.new_cache(self.config.max_batch_size, self.max_len) if drafter else None
        for seq in getattr(self, "active", []):
            seq.drafter_len = 0

    def validate(self, request: Request) -> None:
        """Raise ValueError with a user-facing message if the request cannot run on this engine."""
        prompt_len = len(request.prompt_token_ids)
        if prompt_len == 0:
            raise ValueError("The prompt is empty: send at least one token.")
        gamma = self._gamma(request)
        needed = prompt_len + request.params.max_tokens + gamma + 1
        if needed > self.max_len:
            raise ValueError(
                f"The prompt ({prompt_len} tokens) plus max_tokens ({request.params.max_tokens}) exceeds the "
                f"context of {self.max_len} tokens (with {gamma + 1} tokens of speculation headroom): shorten "
                f"the prompt or lower max_tokens to at most {max(0, self.max_len - prompt_len - gamma - 1)}."
            )
        vocab = self.target.embed.shape[0]
        bad = [t for t in request.prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"Prompt token ids {bad[:5]} are outside the vocabulary of {vocab}.")

    def _gamma(self, request: Request) -> int:
        gamma = self.config.num_speculative_tokens if request.num_speculative_tokens is None else request.num_speculative_tokens
        if gamma < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {gamma}")
        return gamma if self.drafter is not None or self.config.prompt_lookup_max else 0

    def add_request(self, request: Request) -> None:
        self.validate(request)
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.active or self.waiting)

    def abort(self, request_id: str) -> None:
        self.waiting = [r for r in self.waiting if r.request_id != request_id]
        for seq in self.active:
            if seq.request.request_id == request_id:
                seq.finish_reason = "abort"
        self._release_finished()

    # ----- the loop -------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Admit waiting requests into free slots, then run one draft/verify step for every sequence."""
        outputs: list[StepOutput] = []
        emitted: dict[int, list[int]] = {}
        admitted = self._admit()
        if admitted:
            self._prefill(admitted, emitted)
        decoding = [seq for seq in self.active if seq not in admitted and seq.finish_reason is None]
        if decoding:
            self._decode_step(decoding, emitted)
        for seq in list(self.active):
            new = emitted.get(id(seq))
            if new is None and seq.finish_reason is None:
                continue
            outputs.append(self._output(seq, new or []))
        self._release_finished()
        return outputs

    def generate(self, requests: Iterable[Request]) -> list[GenerationResult]:
        """Run requests to completion (admitting as slots free up); results in request order."""
        requests = list(requests)
        for request in requests:
            self.add_request(request)
        results: dict[str, GenerationResult] = {}
        while self.has_work():
            for out in self.step():
                if out.finished:
                    results[out.request_id] = out.result
        return [results[r.request_id] for r in requests]

    def stream(self, request: Request) -> Iterator[StepOutput]:
        """Stream one request's outputs (others in the engine keep advancing)."""
        self.add_request(request)
        while True:
            for out in self.step():
                if out.request_id == request.request_id:
                    yield out
                    if out.finished:
                        return

    # ----- internals ------------------------------------------------------------------------------
    def _admit(self) -> list[_Sequence]:
        admitted = []
        while self.waiting and len(self.active) < self.config.max_batch_size:
            request = self.waiting.pop(0)
            params = request.params
            generator = None
            if not params.greedy:
                seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._master))
                generator = torch.Generator().manual_seed(seed)
            seq = _Sequence(request, self._gamma(request), generator, list(request.prompt_token_ids),
                            prompt_len=len(request.prompt_token_ids))
            self.active.append(seq)
            admitted.append(seq)
        return admitted

    def _rows(self, seqs: list[_Sequence]) -> slice:
        start = self.active.index(seqs[0])
        return slice(start, start + len(seqs))

    def _sync(self) -> None:
        if self._on_cuda:
            torch.cuda.synchronize()

    def _sampling_tensors(self, seqs: list[_Sequence]):
        params = [s.request.params for s in seqs]
        device = self.target.device
        return (torch.tensor([p.temperature for p in params], device=device),
                torch.tensor([p.top_k for p in params], device=device),
                torch.tensor([p.top_p for p in params], device=device))

    def _uniforms(self, seqs: list[_Sequence], count: int) -> torch.Tensor:
        draws = [s.generator and torch.rand(count, generator=s.generator) for s in seqs]
        draws = [d if d is not None else torch.zeros(count) for d in draws]
        return torch.stack(draws).to(self.target.device)  # [B, count]

    @torch.inference_mode()
    def _prefill(self, seqs: list[_Sequence], emitted: dict[int, list[int]]) -> None:
        start = time.perf_counter()
        rows = self._rows(seqs)
        lengths = [s.prompt_len for s in seqs]
        width = max(lengths)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : lengths[i]] = torch.tensor(s.tokens)
        ids = ids.to(self.target.device)
        positions = torch.arange(width, device=self.target.device)[None].expand(len(seqs), width)
        last = torch.tensor(lengths, device=self.target.device) - 1
        logits, features = self.target.forward(ids, positions, self.target_cache, rows, logits_at=last,
                                               return_features=True)  # [B, 1, V], [B, width, D]
        self.target_features[rows, :width] = features  # padding past a row's length is never read before rewritten
        tokens = self._sample_target(seqs, logits)
        topk = self._topk(logits)
        self._sync()
        elapsed = time.perf_counter() - start
        for i, s in enumerate(seqs):
            s.target_len = s.prompt_len
            s.stats.prefill_seconds += elapsed
            self._emit(s, [int(tokens[i])], topk and (topk[0][i], topk[1][i]), accepted=0, emitted=emitted)

    def _sample_target(self, seqs: list[_Sequence], logits: torch.Tensor) -> torch.Tensor:
        """One token per row from logits [B, 1, V], with each row's sampling parameters."""
        if all(s.request.params.greedy for s in seqs):
            return logits[:, 0].argmax(-1)
        probs = processed_probs(logits, *self._sampling_tensors(seqs))
        return sample_from(probs[:, 0], self._uniforms(seqs, 1)[:, 0])

    def _topk(self, logits: torch.Tensor):
        k = self.config.topk_logprobs
        if not k:
            return None
        values, ids = logits.float().log_softmax(-1).topk(k, dim=-1)
        return ids.cpu(), values.cpu()

    @torch.inference_mode()
    def _decode_step(self, seqs: list[_Sequence], emitted: dict[int, list[int]]) -> None:
        # Rows are the contiguous slots 0..n-1 minus the ones admitted this step, which sit at the end.
        rows = self._rows(seqs)
        start = time.perf_counter()
        if 0 < self.config.disable_speculation_at_batch <= len(seqs):
            gammas_list = [0] * len(seqs)  # the drafter catches up from the target's tokens when it next drafts
        else:
            gammas_list = [self._step_gamma(s) for s in seqs]
        lookups = [[] for _ in seqs]
        if self.config.prompt_lookup_max and any(gammas_list):
            lookups = [lookup_proposal(s.tokens, min_n=self.config.prompt_lookup_min, count=g,
                                       max_n=self.config.prompt_lookup_max) for s, g in zip(seqs, gammas_list)]
        # A row verifies its lookup when it has one; otherwise the drafter's tokens, or none without a drafter.
        gammas_list = [len(found) if found or self.drafter is None else g for found, g in zip(lookups, gammas_list)]
        gamma = max(gammas_list)
        device = self.target.device
        greedy = all(s.request.params.greedy for s in seqs)
        sampling = None if greedy else self._sampling_tensors(seqs)
        draft_tokens = torch.zeros(len(seqs), gamma, dtype=torch.long, device=device)
        draft_probs = None
        if gamma > 0:
            draft_tokens, draft_probs = self._propose(seqs, rows, gamma, lookups, sampling)
        self._sync()
        drafted_at = time.perf_counter()
        base = torch.tensor([s.target_len for s in seqs], device=device)
        last = torch.tensor([s.tokens[-1] for s in seqs], device=device)
        verify_ids = torch.cat([last[:, None], draft_tokens], dim=1)  # [B, gamma + 1]
        positions = base[:, None] + torch.arange(gamma + 1, device=device)[None]
        logits, features = self.target.forward(verify_ids, positions, self.target_cache, rows,
                                               return_features=True)  # [B, gamma + 1, V], [B, gamma + 1, D]
        slots = torch.arange(rows.start, rows.stop, device=device)
        self.target_features[slots[:, None], positions] = features
        gammas = torch.tensor(gammas_list, device=device)
        if greedy:
            verdict = verify_greedy(draft_tokens, logits, gammas)
        else:
            target_probs = processed_probs(logits, *sampling)
            uniforms = self._uniforms(seqs, gamma + 1)
            if draft_probs is None:
                draft_probs = torch.zeros(len(seqs), 0, target_probs.shape[-1], device=device)
            verdict = verify_sampled(draft_tokens, draft_probs, target_probs, gammas, uniforms[:, :gamma], uniforms[:, gamma])
        topk = self._topk(logits)
        accepted = verdict.accepted.tolist()
        tokens = verdict.tokens.tolist()
        self._sync()
        done = time.perf_counter()
        for i, s in enumerate(seqs):
            a, g = accepted[i], gammas_list[i]
            s.stats.steps += 1
            s.stats.drafted += g
            s.stats.accepted += a
            s.stats.compared += min(a + 1, g)
            if lookups[i]:
                s.stats.lookup_drafted += g
                s.stats.lookup_accepted += a
            s.stats.draft_seconds += drafted_at - start
            s.stats.verify_seconds += done - drafted_at
            old_total = len(s.tokens)
            s.target_len = old_total + a
            s.drafter_len = min(s.drafter_len, old_total + min(a, gamma - 1)) if gamma else s.drafter_len
            kept = self._emit(s, tokens[i][: a + 1], topk and (topk[0][i, : a + 1], topk[1][i, : a + 1]),
                              accepted=a, emitted=emitted)
            s.stats.emitted_in_steps += kept

    def _step_gamma(self, seq: _Sequence) -> int:
        remaining = seq.request.params.max_tokens - len(seq.output)
        return max(0, min(seq.gamma, remaining - 1, self.max_len - len(seq.tokens) - 1))

    def _propose(self, seqs: list[_Sequence], rows: slice, gamma: int, lookups: list[list[int]], sampling):
        """Draft tokens [B, gamma] (and, when sampling, probs [B, gamma, V]): each row's prompt-lookup tokens where
        it has them, the drafter's elsewhere. The drafter runs only if some row lacks a lookup."""
        if self.drafter is not None and not all(lookups):
            tokens, probs = self._draft(seqs, rows, gamma, sampling)
        else:
            tokens = torch.zeros(len(seqs), gamma, dtype=torch.long, device=self.target.device)
            probs = None if sampling is None else torch.zeros(len(seqs), gamma, self.target.vocab_size,
                                                              device=self.target.device)
        reads_features = self.drafter is not None and self.drafter.feature_fc is not None
        for i, found in enumerate(lookups):
            if not found:
                continue
            proposal = torch.tensor(found, device=tokens.device)
            tokens[i, : len(found)] = proposal
            if probs is not None:  # a deterministic proposal: q is one-hot, which speculative sampling verifies exactly
                probs[i] = 0
                probs[i, torch.arange(len(found), device=tokens.device), proposal] = 1
            # The drafter cached its own drafts past the real tokens; the verified ones will be the lookup's.
            seqs[i].drafter_len = min(seqs[i].drafter_len, len(seqs[i].tokens) - reads_features)
        return tokens, probs

    def _draft(self, seqs: list[_Sequence], rows: slice, gamma: int, sampling):
        """Draft `gamma` tokens per row; returns tokens [B, gamma] and (when sampling) their probs [B, gamma, V].

        A feature-reading drafter's position p reads (target feature at p, token p + 1): the first forward
        feeds its exact positions up to len(tokens) - 2, whose output drafts the first token; each later
        draft reads the feature the drafter itself drafted, and those positions are rewritten from the
        target's verified features at the next step (drafter_len stops before them).
        """
        drafter, cache, device = self.drafter, self.drafter_cache, self.target.device
        reads_features = drafter.feature_fc is not None
        # A layer-parallel drafter's cache is exact only up to drafter_len: the first forward recomputes every
        # later token sequentially (KV calibration, see layer_parallel.py), the other draft forwards are fuzzy.
        calibrate = getattr(drafter.layer_executor, "approximate", False)
        shortest = min(len(s.tokens) for s in seqs)
        if reads_features:  # after a fully accepted step a row lacks gamma + 1 positions
            max_lag = min(gamma + 1, shortest - 2)
        else:
            max_lag = min(gamma, shortest - 1) if calibrate else 1
        self._catch_up_drafter(seqs, rows, max_lag=max_lag)
        # Every row now lacks at most max_lag (+ 1) positions; feed a window of the last `width` for every row
        # (re-feeding an already cached position rewrites its KV entry with the same values, which keeps the batch
        # rectangular; the window starts at position >= 0 in every row).
        width = max(1, max(len(s.tokens) - reads_features - s.drafter_len for s in seqs))
        ids = torch.tensor([s.tokens[-width:] for s in seqs], device=device)
        ends = torch.tensor([len(s.tokens) - reads_features for s in seqs], device=device)  # first drafted position
        positions = ends[:, None] - width + torch.arange(width, device=device)[None]
        feature = None
        if reads_features:
            feature = self._target_features_at(rows, positions)
        logits = drafter.forward(ids, positions, cache, rows, logits_at=torch.full((len(seqs),), width - 1, device=device),
                                 exact=calibrate, features=feature, return_features=reads_features)
        if reads_features:
            logits, feature = logits[0], logits[1][:, -1:]
        tokens, probs = [], []
        uniforms = None if sampling is None else self._uniforms(seqs, gamma)
        for i in range(gamma):
            token, prob = self._draft_token(logits, sampling, None if uniforms is None else uniforms[:, i])
            tokens.append(token)
            probs.append(prob)
            if i < gamma - 1:
                logits = drafter.forward(token[:, None], (ends + i)[:, None], cache, rows, features=feature,
                                         return_features=reads_features)
                if reads_features:
                    logits, feature = logits
        for s in seqs:  # drafted positions a feature-reading or calibrated drafter rewrites are not cached
            if reads_features:
                s.drafter_len = len(s.tokens) - 1
            else:
                s.drafter_len = len(s.tokens) if calibrate else len(s.tokens) + gamma - 1
        draft_probs = None if sampling is None else torch.stack(probs, dim=1)
        return torch.stack(tokens, dim=1), draft_probs

    def _target_features_at(self, rows: slice, positions: torch.Tensor) -> torch.Tensor:
        """The stored target features [B, S, D] of slots `rows` at positions [B, S]."""
        slots = torch.arange(rows.start, rows.stop, device=positions.device)
        return self.target_features[slots[:, None], positions]

    def _draft_token(self, logits: torch.Tensor, sampling, uniforms):
        """logits [B, 1, V_draft] -> full-vocabulary token ids [B] and, when sampling, probs [B, V]."""
        head_ids = self.drafter.head_token_ids
        if sampling is None:
            choice = logits[:, 0].argmax(-1)
            return (choice if head_ids is None else head_ids[choice]), None
        if head_ids is not None:  # a trimmed head proposes nothing outside its vocabulary
            full = logits.new_full((logits.shape[0], 1, self.target.vocab_size), float("-inf"))
            logits = full.index_copy_(2, head_ids, logits)
        probs = processed_probs(logits, *sampling)[:, 0]
        return sample_from(probs, uniforms), probs

    def _catch_up_drafter(self, seqs: list[_Sequence], rows: slice, max_lag: int = 1) -> None:
        """Feed rows that lack more than max_lag + 1 tokens (admitted, swapped, or after plain AR steps).

        A token drafter's position p reads token p; a feature-reading drafter's reads token p + 1 and the
        target's feature at p. Either way every row ends with drafter_len = len(tokens) - 1.
        """
        lag = [len(s.tokens) - 1 - s.drafter_len for s in seqs]
        if max(lag) <= max_lag:
            return
        device = self.target.device
        width = max(lag)
        reads_features = self.drafter.feature_fc is not None
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            if lag[i] > 0:
                first = s.drafter_len + reads_features
                ids[i, : lag[i]] = torch.tensor(s.tokens[first: first + lag[i]])
        starts = torch.tensor([s.drafter_len for s in seqs], device=device)
        positions = starts[:, None] + torch.arange(width, device=device)[None]
        # Rows with a shorter lag write padding past their length: never read before being overwritten.
        # Clamp so that padding never indexes past the cache (real positions stay <= max_len - 2).
        positions = positions.clamp(max=self.max_len - 1)
        features = None
        if reads_features:
            features = self._target_features_at(rows, positions)
        self.drafter.hidden_states(ids.to(device), positions, self.drafter_cache, rows, exact=True, features=features)
        for s in seqs:
            s.drafter_len = len(s.tokens) - 1

    def _emit(self, seq: _Sequence, new_tokens: list[int], topk, *, accepted: int,
              emitted: dict[int, list[int]]) -> int:
        """Append tokens until a stop condition; record logprobs and accept flags. Returns tokens kept."""
        params = seq.request.params
        kept = 0
        for j, token in enumerate(new_tokens):
            seq.tokens.append(token)
            kept += 1
            seq.accept_mask.append(j < accepted)
            if token in self.eos_token_ids and not params.ignore_eos:
                seq.finish_reason = "stop"
            elif token in params.stop_token_ids:
                seq.finish_reason = "stop"
            elif len(seq.output) >= params.max_tokens:
                seq.finish_reason = "length"
            if seq.finish_reason or (params.stop and self._hit_stop_string(seq)):
                seq.finish_reason = seq.finish_reason or "stop"
                break
        if topk:
            seq.topk_ids.append(topk[0][:kept].reshape(kept, -1))
            seq.topk_logprobs.append(topk[1][:kept].reshape(kept, -1))
        emitted.setdefault(id(seq), []).extend(new_tokens[:kept])
        if seq.finish_reason:
            # Tokens beyond the stop were generated but are not part of the answer: drop them from the cache.
            seq.target_len = min(seq.target_len, len(seq.tokens) - 1)
        return kept

    def _hit_stop_string(self, seq: _Sequence) -> bool:
        text = self._decode_output(seq)
        for stop in seq.request.params.stop:
            cut = text.find(stop)
            if cut >= 0:
                seq.text = text[:cut]
                return True
        return False

    def _decode_output(self, seq: _Sequence) -> str:
        ids = [t for t in seq.output if t not in self.eos_token_ids]
        return self.decode(ids) if self.decode else ""

    def _output(self, seq: _Sequence, new_tokens: list[int]) -> StepOutput:
        delta = ""
        if self.decode is not None:
            if not (seq.finish_reason == "stop" and seq.request.params.stop and seq.text):
                seq.text = self._decode_output(seq)
            visible = seq.text
            if seq.finish_reason is None:
                visible = _hold_back(visible, seq.request.params.stop)
            delta = visible[seq.sent_text_len:]
            seq.sent_text_len = max(seq.sent_text_len, len(visible))
        result = self._result(seq) if seq.finish_reason else None
        return StepOutput(seq.request.request_id, new_tokens, delta, seq.finish_reason is not None, result)

    def _result(self, seq: _Sequence) -> GenerationResult:
        k = self.config.topk_logprobs
        n_out = len(seq.output)
        ids = torch.cat(seq.topk_ids) if seq.topk_ids else torch.zeros(n_out, k, dtype=torch.long)
        logprobs = torch.cat(seq.topk_logprobs) if seq.topk_logprobs else torch.zeros(n_out, k)
        return GenerationResult(
            request_id=seq.request.request_id,
            prompt_token_ids=list(seq.request.prompt_token_ids),
            output_token_ids=list(seq.output),
            finish_reason=seq.finish_reason,
            text=seq.text if self.decode else None,
            topk_ids=ids,
            topk_logprobs=logprobs,
            accept_mask=torch.tensor(seq.accept_mask, dtype=torch.bool),
            stats=seq.stats,
            drafter_version=self.drafter_version,
        )

    def _release_finished(self) -> None:
        """Free finished slots, moving the last active sequence into each hole (slots stay contiguous)."""
        index = 0
        while index < len(self.active):
            if self.active[index].finish_reason is None:
                index += 1
                continue
            last = len(self.active) - 1
            if index != last:
                moved = self.active[last]
                self.target_cache.copy_slot(last, index, moved.target_len)
                self.target_features[index, : moved.target_len] = self.target_features[last, : moved.target_len]
                if self.drafter_cache is not None:
                    self.drafter_cache.copy_slot(last, index, moved.drafter_len)
                self.active[index] = moved
            self.active.pop()


def _hold_back(text: str, stops: Sequence[str]) -> str:
    """Text safe to stream: without a trailing partial UTF-8 char or a prefix of a stop string."""
    text = text.rstrip("\ufffd")
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:length]):
                return text[: len(text) - length]
    return text


def runner_for(model, drafter=None, *, prepack: bool = True) -> CausalLMRunner:
    """An inference runner over an HF model, or over a models.Drafter (with its trimmed head if it has one).

    On CPU its weights are prepacked (`CausalLMRunner.prepack`): multi-token verification then costs about
    one single-token step. `prepack=False` keeps the plain dense path."""
    if drafter is not None:
        runner = CausalLMRunner(drafter.model, head_token_ids=drafter.head_token_ids, head_weight=drafter.head_weight,
                                feature_fc=drafter.feature_fc)
    else:
        runner = CausalLMRunner(model)
    if prepack:
        runner.prepack()
    return runner
