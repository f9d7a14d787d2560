"""The speculative decoding engine: batched, KV-cached, lossless, with continuous admission.

One `SpecEngine` owns a target runner, its slot KV cache and a proposer (proposers/: the way the step
drafts, chosen for the drafter runner by registration, behind prompt lookup when `prompt_lookup_max` is
set). Requests are admitted into free slots (prefilled by the target, which also emits the first token),
then every `step()` runs propose -> verify -> commit: the proposer drafts up to gamma tokens per sequence,
one target forward verifies all of them (sampling.py's rule), each sequence advances by its own accepted
length (ragged), and the proposer is told what stood. Rolling the target cache back is a length change.
`num_speculative_tokens=0` runs the same code as plain autoregressive decoding; with
`disable_speculation_at_batch` set, a step decoding at least that many sequences decodes them
autoregressively; with `auto`, the speculation policy (auto_speculation.py, policy.py) chooses every
step each row's draft length (0 included) and proposer (lookup or drafter). Every target forward also stores the target's final-normed hidden state per position
(`target_features`, a slot store beside the KV cache with the same lengths), which a feature-reading
drafter reads. Output text is detokenized incrementally (detokenize.py).

Invariants per sequence (tokens = prompt + output so far): the target cache holds every token but the
last (`target_len == len(tokens) - 1` between steps); the proposer's own cache holds an exact prefix whose
length it keeps per slot (proposers/drafter.py); sequences occupy the contiguous slots 0..n-1.

Not here: the ways of drafting (proposers/), choosing draft lengths (policy.py), per-request counters
(request_stats.py), sampling math (sampling.py), model loading (models.py), HTTP/Ray (serve/), benchmarks.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Iterable, Iterator, Sequence

import torch

from draftsmith.auto_speculation import AutoSpeculation, StepTimings
from draftsmith.detokenize import IncrementalDetokenizer
from draftsmith.engine_config import EngineConfig
from draftsmith.llama import CausalLMRunner, KVCache
from draftsmith.policy import LOOKUP, CostModel
from draftsmith.proposers import Draft, EngineView, Proposer, Rows, build_proposer
from draftsmith.request_stats import AcceptanceRates, RequestStats  # noqa: F401  (re-exported)
from draftsmith.sampling import SamplingParams, processed_probs, sample_from, verify_greedy, verify_sampled

logger = logging.getLogger(__name__)


class InvalidRequestError(ValueError):
    """A request no engine could run (empty prompt, token ids outside the vocabulary, negative gamma)."""


class ContextLengthError(ValueError):
    """A request whose prompt, max_tokens and speculation headroom do not fit the context."""


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = SamplingParams()
    num_speculative_tokens: int | None = None  # None: the engine's default gamma (or its policy's, with auto)


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
    # [prompt + output - 1, D] float16 on the CPU: the target's final-normed hidden state at each position
    # (what a feature drafter's training reads); only with SpecEngine(capture_features=True).
    features: torch.Tensor | None = None


@dataclasses.dataclass
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    result: GenerationResult | None = None


@dataclasses.dataclass(eq=False)  # identity: the step looks sequences up among hundreds of rows
class _Sequence:
    request: Request
    gamma: int
    generator: torch.Generator | None
    tokens: list[int]
    prompt_len: int
    detokenizer: IncrementalDetokenizer | None
    target_len: int = 0  # the target cache holds positions < target_len (== len(tokens) - 1 between steps)
    finish_reason: str | None = None
    text: str = ""
    cut_at_stop_string: bool = False
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
                 decode: Callable[[list[int]], str] | None = None, drafter_version: str = "none",
                 cost_model: CostModel | None = None, capture_features: bool = False):
        """`cost_model` (auto mode only): the pair's cost profile, instead of measuring it at start.
        `capture_features`: each result also carries a float16 copy of the target's stored features of its
        sequence (`GenerationResult.features`, for the traffic log); a read of what every forward stores
        anyway, so decoding is unchanged."""
        self.target = target
        self.config = config
        self.capture_features = capture_features
        self.eos_token_ids = frozenset(eos_token_ids)
        self.decode = decode
        self.max_len = min(config.max_model_len, getattr(target.config, "max_position_embeddings", config.max_model_len))
        self.target_cache: KVCache = target.new_cache(config.max_batch_size, self.max_len)
        # Valid, per slot, exactly where the target cache is (positions < target_len): one hidden state per
        # token is hidden / (2 * layers * kv width) of the KV cache, so it is kept for any drafter a swap may bring.
        self.target_features = torch.zeros(config.max_batch_size, self.max_len, target.embed.shape[1],
                                           dtype=target.dtype, device=target.device)
        self._view = EngineView(config.max_batch_size, self.max_len, target.vocab_size, target.device,
                                self.target_features)
        self.active: list[_Sequence] = []
        self.waiting: list[Request] = []
        self.auto: AutoSpeculation | None = None  # the speculation policy's driver, with auto, once it can draft
        self._cost_model = cost_model
        self.set_drafter(drafter, drafter_version)
        self._master = torch.Generator().manual_seed(config.seed)
        self._on_cuda = target.device.type == "cuda"

    # ----- requests -------------------------------------------------------------------------------
    def set_drafter(self, drafter: CausalLMRunner | None, version: str = "none") -> None:
        """Switch drafters between steps: a new proposer with an empty cache, which running sequences refill."""
        if drafter is not None and drafter.embed.shape[0] != self.target.embed.shape[0]:
            raise ValueError(f"drafter embeds {drafter.embed.shape[0]} tokens, target {self.target.embed.shape[0]}")
        hidden = self.target.embed.shape[1]
        if drafter is not None and drafter.feature_fc is not None and tuple(drafter.feature_fc.shape) != (hidden, 2 * hidden):
            raise ValueError(f"drafter reads features through a {tuple(drafter.feature_fc.shape)} map, the target's "
                             f"features need ({hidden}, {2 * hidden})")
        # All or nothing: build what can fail (the proposer's cache, the cost curve's measurement) first.
        version = version if drafter is not None else "none"
        proposer = build_proposer(drafter, self.config, self._view)
        auto = self.auto
        install = auto and auto.prepare_drafter(drafter, version)
        if auto is None and self.config.auto and proposer.speculates:
            auto = AutoSpeculation(self.config, self.target, drafter, version,
                                   lookup=bool(self.config.prompt_lookup_max), cost_model=self._cost_model)
        self.drafter, self.drafter_version, self.auto, self.proposer = drafter, version, auto, proposer
        install and install()

    def policy_snapshot(self) -> dict | None:
        """With auto: the policy's EMA of predicted and measured speedup over autoregressive decoding (measured:
        a step's emitted tokens per second over the cost model's autoregressive rate at that batch size), its
        conditional acceptance per draft position by proposer key, and the steps it planned. None otherwise."""
        if not self.config.auto:
            return None
        if self.auto is None:  # nothing that can draft is loaded: every step is autoregressive
            return {"predicted_speedup": 1.0, "measured_speedup": 1.0, "alphas": {}, "steps": 0}
        return self.auto.snapshot()

    def validate(self, request: Request) -> None:
        """Raise InvalidRequestError or ContextLengthError (ValueErrors) with a user-facing message if the
        request cannot run on this engine."""
        prompt_len = len(request.prompt_token_ids)
        if prompt_len == 0:
            raise InvalidRequestError("The prompt is empty: send at least one token.")
        if request.num_speculative_tokens is not None and request.num_speculative_tokens < 0:
            raise InvalidRequestError(f"num_speculative_tokens must be >= 0, got {request.num_speculative_tokens}")
        vocab = self.target.embed.shape[0]
        bad = [t for t in request.prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"Prompt token ids {bad[:5]} are outside the vocabulary of {vocab}.")
        gamma = self._gamma(request)
        needed = prompt_len + request.params.max_tokens + gamma + 1
        if needed > self.max_len:
            raise ContextLengthError(
                f"The prompt ({prompt_len} tokens) plus max_tokens ({request.params.max_tokens}) exceeds the "
                f"context of {self.max_len} tokens (with {gamma + 1} tokens of speculation headroom): shorten "
                f"the prompt or lower max_tokens to at most {max(0, self.max_len - prompt_len - gamma - 1)}."
            )

    def _gamma(self, request: Request) -> int:
        """The most tokens a request drafts per step (with auto: the policy's limit, unless it asked for a length)."""
        gamma = self.config.max_speculative_tokens if request.num_speculative_tokens is None else request.num_speculative_tokens
        return gamma if self.proposer.speculates else 0

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
        """Admit waiting requests into free slots, then run one propose/verify/commit step for every sequence."""
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
            detokenizer = self.decode and IncrementalDetokenizer(self.decode, skip_ids=self.eos_token_ids,
                                                                 stops=params.stop)
            seq = _Sequence(request, self._gamma(request), generator, list(request.prompt_token_ids),
                            prompt_len=len(request.prompt_token_ids), detokenizer=detokenizer)
            self.active.append(seq)
            admitted.append(seq)
        return admitted

    def _rows(self, seqs: list[_Sequence]) -> slice:
        start = self.active.index(seqs[0])
        return slice(start, start + len(seqs))

    def _batch(self, seqs: list[_Sequence]) -> Rows:
        """The proposers' view of a step's rows."""
        greedy = all(s.request.params.greedy for s in seqs)
        return Rows(self._rows(seqs), [s.tokens for s in seqs], None if greedy else self._sampling_tensors(seqs),
                    lambda count: self._uniforms(seqs, count))

    def _sync(self) -> None:
        self._on_cuda and torch.cuda.synchronize()

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

    def _caps(self, seqs: list[_Sequence]) -> list[int]:
        """Tokens each row may draft this step: its gamma, within max_tokens and the context."""
        return [max(0, min(s.gamma, s.request.params.max_tokens - len(s.output) - 1, self.max_len - len(s.tokens) - 1))
                for s in seqs]

    def _propose(self, seqs: list[_Sequence], rows: Rows):
        """The step's draft, and with auto the policy's plan and what the step needs to report it:
        (draft, plan, per-row switched-off flags, lookup seconds, the proposer's catch-up seconds)."""
        caps = self._caps(seqs)
        if self.auto is None:
            if 0 < self.config.disable_speculation_at_batch <= len(seqs):
                caps = [0] * len(seqs)  # a proposer catches up from the target's tokens when it next drafts
            draft = self.proposer.propose(rows, caps) if any(caps) else Draft.zeros(rows, 0, self._view)
            return draft, None, [False] * len(seqs), 0.0, 0.0
        start = time.perf_counter()
        matches = self.proposer.lookup_matches(rows, caps)  # looked up once, handed to the proposer below
        lookup_seconds = time.perf_counter() - start
        fixed = [s.request.num_speculative_tokens for s in seqs]
        plan = self.auto.plan(caps, matches, fixed, [s.target_len for s in seqs])
        gammas = list(plan.gammas)
        found = None if matches is None else [m[:g] if p == LOOKUP else []
                                              for m, g, p in zip(matches, gammas, plan.proposers)]
        draft = self.proposer.propose_planned(rows, gammas, found) if any(gammas) else Draft.zeros(rows, 0, self._view)
        catch_up = self.proposer.last_catch_up_seconds if any(gammas) else 0.0
        return draft, plan, self.auto.switched_off(plan, caps, matches, fixed), lookup_seconds, catch_up

    @torch.inference_mode()
    def _decode_step(self, seqs: list[_Sequence], emitted: dict[int, list[int]]) -> None:
        """propose -> verify -> commit. Rows are the contiguous slots 0..n-1 minus the ones admitted this step,
        which sit at the end."""
        start = time.perf_counter()
        rows = self._batch(seqs)
        draft, plan, off, lookup_seconds, catch_up_seconds = self._propose(seqs, rows)
        self._sync()
        drafted_at = time.perf_counter()
        verdict, topk = self._verify(seqs, rows, draft)
        accepted = verdict.accepted.tolist()
        tokens = verdict.tokens.tolist()
        self._sync()
        done = time.perf_counter()
        if any(draft.lengths):
            self.proposer.commit(rows, draft, accepted)
        kept_total = 0
        for i, s in enumerate(seqs):
            a, g = accepted[i], draft.lengths[i]
            s.stats.record_step(g, a, draft.sources[i], policy_off=off[i])
            s.stats.draft_seconds += drafted_at - start
            s.stats.verify_seconds += done - drafted_at
            s.target_len = len(s.tokens) + a
            kept = self._emit(s, tokens[i][: a + 1], topk and (topk[0][i, : a + 1], topk[1][i, : a + 1]),
                              accepted=a, emitted=emitted)
            s.stats.emitted_in_steps += kept
            kept_total += kept
        if plan is not None:
            # A catch-up is no draft forward: charged as one, it would keep the drafter off after long AR stretches.
            timings = StepTimings(lookup_seconds, drafted_at - start - lookup_seconds - catch_up_seconds,
                                  done - drafted_at, time.perf_counter() - start)
            self.auto.observe(plan, draft.sources, draft.lengths, accepted, draft.tokens.shape[1], kept_total, timings)

    def _verify(self, seqs: list[_Sequence], rows: Rows, draft: Draft):
        """One target forward over [last token, draft] per row, then the acceptance rule (sampling.py).
        Returns the Verification and the target's top-k log-probabilities (or None)."""
        device, gamma = self.target.device, draft.tokens.shape[1]
        base = torch.tensor([s.target_len for s in seqs], device=device)
        last = torch.tensor([s.tokens[-1] for s in seqs], device=device)
        verify_ids = torch.cat([last[:, None], draft.tokens], dim=1)  # [B, gamma + 1]
        # Shorter drafts pad past their row's length, maybe past the context: clamp (never read before rewritten).
        positions = (base[:, None] + torch.arange(gamma + 1, device=device)[None]).clamp(max=self.max_len - 1)
        logits, features = self.target.forward(verify_ids, positions, self.target_cache, rows.slots,
                                               return_features=True)  # [B, gamma + 1, V], [B, gamma + 1, D]
        slots = torch.arange(rows.slots.start, rows.slots.stop, device=device)
        self.target_features[slots[:, None], positions] = features
        lengths = torch.tensor(draft.lengths, device=device)
        if rows.sampling is None:
            verdict = verify_greedy(draft.tokens, logits, lengths)
        else:
            target_probs = processed_probs(logits, *rows.sampling)
            uniforms = self._uniforms(seqs, gamma + 1)
            draft_probs = draft.probs
            if draft_probs is None:
                draft_probs = torch.zeros(len(seqs), 0, target_probs.shape[-1], device=device)
            verdict = verify_sampled(draft.tokens, draft_probs, target_probs, lengths, uniforms[:, :gamma],
                                     uniforms[:, gamma])
        return verdict, self._topk(logits)

    def _emit(self, seq: _Sequence, new_tokens: list[int], topk, *, accepted: int,
              emitted: dict[int, list[int]]) -> int:
        """Append tokens until a stop condition; record logprobs and accept flags. Returns tokens kept."""
        params = seq.request.params
        kept = 0
        for j, token in enumerate(new_tokens):
            seq.tokens.append(token)
            kept += 1
            seq.accept_mask.append(j < accepted)
            stop_string = seq.detokenizer is not None and seq.detokenizer.add(token)
            if token in self.eos_token_ids and not params.ignore_eos:
                seq.finish_reason = "stop"
            elif token in params.stop_token_ids:
                seq.finish_reason = "stop"
            elif stop_string:  # before the length rule: a stop string completed by the last allowed token cuts too
                seq.finish_reason = "stop"
                seq.text, seq.cut_at_stop_string = seq.detokenizer.stopped, True  # the text ends before it
            elif len(seq.output) >= params.max_tokens:
                seq.finish_reason = "length"
            if seq.finish_reason:
                break
        if topk:
            seq.topk_ids.append(topk[0][:kept].reshape(kept, -1))
            seq.topk_logprobs.append(topk[1][:kept].reshape(kept, -1))
        emitted.setdefault(id(seq), []).extend(new_tokens[:kept])
        if seq.finish_reason:
            # Tokens beyond the stop were generated but are not part of the answer: drop them from the cache.
            seq.target_len = min(seq.target_len, len(seq.tokens) - 1)
        return kept

    def _output(self, seq: _Sequence, new_tokens: list[int]) -> StepOutput:
        delta = ""
        detokenizer = seq.detokenizer
        if detokenizer is not None:
            if seq.finish_reason is None:
                delta = detokenizer.stream_delta()
            else:
                if not seq.cut_at_stop_string:
                    seq.text = detokenizer.full_text()
                delta = detokenizer.final_delta(seq.text)
        result = self._result(seq) if seq.finish_reason else None
        return StepOutput(seq.request.request_id, new_tokens, delta, seq.finish_reason is not None, result)

    def _result(self, seq: _Sequence) -> GenerationResult:
        k = self.config.topk_logprobs
        n_out = len(seq.output)
        ids = torch.cat(seq.topk_ids) if seq.topk_ids else torch.zeros(n_out, k, dtype=torch.long)
        logprobs = torch.cat(seq.topk_logprobs) if seq.topk_logprobs else torch.zeros(n_out, k)
        features = None
        if self.capture_features:  # before _release_finished may move another sequence into this slot
            slot = self.active.index(seq)
            features = self.target_features[slot, : seq.target_len].to("cpu", torch.float16, copy=True)
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
            features=features,
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
                self.proposer.move_slot(last, index)
                self.active[index] = moved
            self.proposer.release_slot(last)
            self.active.pop()


def runner_for(model, drafter=None, *, prepack: bool = True) -> CausalLMRunner:
    """An inference runner over an HF model, or over a models.Drafter (with its trimmed head if it has one).

    On CPU its weights are prepacked (`CausalLMRunner.prepack`: oneDNN-packed copies its matrix products run
    on); `prepack=False` keeps the plain dense path."""
    if drafter is not None:
        runner = CausalLMRunner(drafter.model, head_token_ids=drafter.head_token_ids, head_weight=drafter.head_weight,
                                feature_fc=drafter.feature_fc)
    else:
        runner = CausalLMRunner(model)
    if prepack:
        runner.prepack()
    return runner
