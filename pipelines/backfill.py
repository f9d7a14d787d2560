"""Traffic without serving: backfill conversation logs, or generate traffic with the engine.

`backfill` turns existing chat logs (ShareGPT records, OpenAI-style message lists from chat JSONL)
into TrafficRecords with `source="backfill"` by scoring each assistant reply with the target in ONE
teacher-forced forward (batched, right-padded): prompt = the chat template of the messages before
the reply with the generation prompt, output = the reply's tokens plus the end-of-turn token, and per
output position the target's log_softmax top-k. Much cheaper than generating, and on a CPU the only
way to get thousands of records quickly. `generate_traffic` runs the real `SpecEngine` (target +
drafter) on prompts and logs served-style records (`source="served"`), as the Serve logger would.

What it does not do: deduplicate or split (draftsmith.distill_data), run on Ray, or serve.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from draftsmith.engine_config import EngineConfig
from draftsmith.models import Drafter, LoadedModel
from draftsmith.traffic import TrafficRecord, TrafficWriter, drop_text

logger = logging.getLogger(__name__)

UTC = dt.timezone.utc
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


@dataclass
class _Example:
    key: str
    prompt: list[int]
    output: list[int]
    finish_reason: str
    prompt_text: str | None
    output_text: str | None


def _messages(conversation) -> list[dict]:
    from draftsmith.datasets_io import to_chat_messages

    if isinstance(conversation, dict):
        return to_chat_messages(conversation)
    return [{"role": m["role"], "content": m["content"]} for m in conversation]


def _conversation_key(conversation, index: int) -> str:
    if isinstance(conversation, dict) and conversation.get("id"):
        return str(conversation["id"])
    digest = hashlib.sha256(repr(_messages(conversation)).encode()).hexdigest()[:16]
    return f"{index}-{digest}"


def assistant_turns(messages: list[dict], *, all_turns: bool = False) -> list[tuple[list[dict], str]]:
    """(context messages, assistant reply) for the first (or every) assistant turn that follows a user turn."""
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or not m["content"].strip():
            continue
        if not any(p["role"] == "user" and p["content"].strip() for p in messages[:i]):
            continue
        out.append((messages[:i], m["content"]))
        if not all_turns:
            break
    return out


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn in the chat template (ChatML <|im_end|>, ...), else EOS."""
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab:
            return vocab[token]
    return tokenizer.eos_token_id


def _examples(target: LoadedModel, conversations: Iterable, *, max_prompt_tokens: int, max_output_tokens: int,
              all_turns: bool, keep_text: bool) -> list[_Example]:
    tok = target.tokenizer
    eot = end_of_turn_id(tok)
    out = []
    for index, conversation in enumerate(conversations):
        key = _conversation_key(conversation, index)
        for turn, (context, reply) in enumerate(assistant_turns(_messages(conversation), all_turns=all_turns)):
            text = tok.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
            # Cut from the left: the end of the context and the assistant header decide the reply.
            prompt = list(tok(text, add_special_tokens=False)["input_ids"])[-max_prompt_tokens:]
            reply_ids = list(tok(reply, add_special_tokens=False)["input_ids"]) + [eot]
            finish = "stop" if len(reply_ids) <= max_output_tokens else "length"
            output = reply_ids[:max_output_tokens]
            if not prompt or not output:
                continue
            out.append(_Example(f"{key}:{turn}", prompt, output, finish,
                                text if keep_text else None, reply if keep_text else None))
    return out


@torch.inference_mode()
def _score(model, examples: list[_Example], topk: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Teacher-forced top-k log-probs [n_out, k] at every output position, one padded forward per batch."""
    device = next(model.parameters()).device
    lengths = [len(e.prompt) + len(e.output) - 1 for e in examples]
    ids = torch.zeros(len(examples), max(lengths), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : lengths[i]] = torch.tensor(e.prompt + e.output[:-1])
    # Right padding under causal attention: real positions never see the padding, so no mask is needed.
    hidden = model.model(input_ids=ids.to(device), use_cache=False).last_hidden_state  # [B, L, H]
    head = model.get_output_embeddings()
    out = []
    for i, e in enumerate(examples):
        start = len(e.prompt) - 1
        logits = head(hidden[i, start: start + len(e.output)]).float()  # [n_out, V]
        values, idx = logits.log_softmax(-1).topk(topk, dim=-1)
        out.append((idx.cpu(), values.cpu()))
    return out


def backfill(target: LoadedModel, conversations: Iterable, traffic_uri: str, *, max_prompt_tokens: int = 384,
             max_output_tokens: int = 256, topk: int = 8, batch_size: int = 8, all_turns: bool = False,
             keep_text: bool = False, progress: bool = True) -> int:
    """Score conversations with the target and log them as `source="backfill"` records; returns the count.

    `conversations`: ShareGPT records ({"id", "conversations"}) or OpenAI message lists. Each yields
    one record (its first assistant reply), or one per assistant turn with `all_turns=True`.
    """
    from tqdm.auto import tqdm

    if max_prompt_tokens < 1 or max_output_tokens < 1 or topk < 1 or batch_size < 1:
        raise ValueError("max_prompt_tokens, max_output_tokens, topk and batch_size must be >= 1")
    examples = _examples(target, conversations, max_prompt_tokens=max_prompt_tokens,
                         max_output_tokens=max_output_tokens, all_turns=all_turns, keep_text=keep_text)
    # Similar lengths in a batch waste less compute on padding.
    examples.sort(key=lambda e: len(e.prompt) + len(e.output))
    written = 0
    with TrafficWriter(traffic_uri, flush_every_records=512) as writer, \
            tqdm(total=len(examples), desc="backfill", unit="conv", disable=not progress) as bar:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start: start + batch_size]
            for e, (ids, logprobs) in zip(chunk, _score(target.model, chunk, topk)):
                writer.add(TrafficRecord(
                    request_id=f"backfill-{hashlib.sha256(e.key.encode()).hexdigest()[:24]}",
                    created_at=dt.datetime.now(UTC), source="backfill", target_id=target.model_id,
                    target_revision=target.revision, tokenizer_hash=target.tokenizer_hash, drafter_version="",
                    temperature=1.0, max_tokens=max_output_tokens, prompt_token_ids=e.prompt,
                    output_token_ids=e.output, target_topk_ids=ids.tolist(), target_topk_logprobs=logprobs.tolist(),
                    accept_mask=[False] * len(e.output), finish_reason=e.finish_reason,
                    prompt_text=e.prompt_text, output_text=e.output_text,
                ))
                written += 1
            bar.update(len(chunk))
    logger.info("backfilled %d records into %s", written, traffic_uri)
    return written


# ------------------------------------------------------------------------------ traffic from the engine


def _prompt_ids(target: LoadedModel, prompt, max_prompt_tokens: int) -> list[int]:
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if prompt and isinstance(prompt[0], dict):
        text = target.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        prompt = target.tokenizer(text, add_special_tokens=False)["input_ids"]
    return [int(t) for t in prompt][-max_prompt_tokens:]


def generate_records(target: LoadedModel, drafter: Drafter | None, prompts: Sequence, *,
                     engine: EngineConfig = EngineConfig(), max_tokens: int = 64, temperature: float = 0.0,
                     max_prompt_tokens: int = 384, drafter_version: str | None = None,
                     keep_text: bool = False, capture_features: bool = False) -> list[TrafficRecord]:
    """Run the engine on prompts (strings, message lists or token ids) and return served-style records.

    `engine` is the engine configuration (gamma or `auto`, batch size, top-k logged, seed, prompt lookup),
    as Serve's `engine:` section; only the context length grows when the prompts need it. Records are made
    by Serve's own `record_from_result`, so they say what the engine really did, as served records do.
    `capture_features`: the records carry the target's features, as Serve logs them with
    `traffic.log_features` (the writer puts them in side files, draftsmith.traffic_features).
    """
    from draftsmith.sampling import SamplingParams
    from draftsmith.specdec import Request, SpecEngine, runner_for
    from serve.logger import record_from_result

    ids = [_prompt_ids(target, p, max_prompt_tokens) for p in prompts]
    ids = [p for p in ids if p]
    if not ids:
        return []
    version = drafter_version if drafter_version is not None else (drafter.version if drafter else "")
    gamma = engine.num_speculative_tokens
    headroom = gamma if isinstance(gamma, int) else getattr(engine, "auto_max_speculative_tokens", 32)
    config = engine.model_copy(update={"max_model_len": max(engine.max_model_len,
                                                            max(len(p) for p in ids) + max_tokens + headroom + 1)})
    tok = target.tokenizer
    spec = SpecEngine(runner_for(target.model, prepack=config.prepack_weights),
                      None if drafter is None else runner_for(None, drafter, prepack=config.prepack_weights),
                      config=config, eos_token_ids=target.eos_token_ids, drafter_version=version or "none",
                      decode=lambda t: tok.decode(t, skip_special_tokens=True),
                      capture_features=capture_features)
    requests = [Request(f"gen-{config.seed}-{i}", p,
                        SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                       seed=None if temperature == 0 else config.seed + i))
                for i, p in enumerate(ids)]
    records = []
    for request, result in zip(requests, spec.generate(requests)):
        record = record_from_result(result, target_id=target.model_id, target_revision=target.revision,
                                    tokenizer_hash=target.tokenizer_hash, params=request.params,
                                    prompt_text=tok.decode(result.prompt_token_ids) if keep_text else None)
        records.append(record if keep_text else drop_text(record))
    return records


def generate_traffic(target: LoadedModel, drafter: Drafter | None, prompts: Sequence, traffic_uri: str,
                     **kwargs) -> int:
    """`generate_records` written to a traffic log; returns the number of records."""
    records = generate_records(target, drafter, prompts, **kwargs)
    with TrafficWriter(traffic_uri, flush_every_records=max(1, len(records))) as writer:
        for record in records:
            writer.add(record)
    return len(records)


# ------------------------------------------------------------------------------ CLI


def load_conversations(source: str, n: int | None, seed: int) -> list:
    """Up to `n` train conversations from `sharegpt` (its train split, in `seed` order) or `jsonl:PATH`."""
    from draftsmith.datasets_io import read_chat_jsonl, sharegpt_split

    if source == "sharegpt":
        return sharegpt_split("train", n, seed)
    if source.startswith("jsonl:"):
        convs = list(read_chat_jsonl(source[len("jsonl:"):]))
        return convs[:n] if n is not None else convs
    raise ValueError(f"unknown conversation source {source!r}: use 'sharegpt' or 'jsonl:PATH'")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.backfill",
                                     description="Score conversation logs with the target into the traffic log.")
    parser.add_argument("--source", default="sharegpt", help="`sharegpt` (train split) or `jsonl:PATH`")
    parser.add_argument("--n", type=int, default=None, help="at most this many conversations")
    parser.add_argument("--seed", type=int, default=0, help="ShareGPT sample order")
    parser.add_argument("--target", default="smollm2-135m-instruct", help="target model spec")
    parser.add_argument("--traffic-uri", default=".state/traffic", help="traffic log root (path or URI)")
    parser.add_argument("--max-prompt-tokens", type=int, default=384)
    parser.add_argument("--max-output-tokens", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--all-turns", action="store_true", help="one record per assistant turn")
    parser.add_argument("--keep-text", action="store_true", help="also log prompt and reply text")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from draftsmith.models import load_model

    target = load_model(args.target)
    n = backfill(target, load_conversations(args.source, args.n, args.seed), args.traffic_uri,
                 max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=args.max_output_tokens, topk=args.topk,
                 batch_size=args.batch_size, all_turns=args.all_turns, keep_text=args.keep_text)
    print(json.dumps({"records": n, "traffic_uri": args.traffic_uri}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
