"""`draftsmith bench serve`: replay held-out prompts against the OpenAI endpoint with N concurrent clients.

What it does: loads prompts (`sharegpt` held-out split or `jsonl:PATH`), starts the Serve app locally
(or uses `--url`), and runs, each over HTTP with streaming chat requests: N clients with speculation,
N clients with speculation off (per-request `draftsmith.speculative=false`), and 1 client with
speculation; then the engine alone in this process on the same prompts (one at a time), so the gap
between `output_tok_s_1_client` and `engine_tok_s` is the serving overhead. It reports throughput,
time to first token and latency percentiles, acceptance figures, and how many traffic records the
runs produced. The last stdout line is one JSON object; progress bars go to stderr.

What it does not do: start a cluster for a remote `--url`, or judge the figures (the README does).
"""

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time

import httpx
from tqdm import tqdm

from draftsmith.engine_config import EngineConfig
from draftsmith.ports import free_port

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="draftsmith bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running endpoint (http://host:port); default: start one locally")
    p.add_argument("--target", default="tiny", help="target spec (also used to filter prompts and for engine_tok_s)")
    p.add_argument("--drafter", default="derived:first1", help="drafter source when starting the app")
    p.add_argument("--prompts", default="sharegpt", help="sharegpt | jsonl:PATH")
    p.add_argument("-n", "--num-requests", type=int, default=48)
    p.add_argument("-c", "--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--max-prompt-tokens", type=int, default=384, help="skip longer prompts")
    p.add_argument("--gamma", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-batch-size", type=int, default=None, help="default: the concurrency")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads in the replica and in-process engine")
    p.add_argument("--model", default="draftsmith", help="model name sent in requests")
    p.add_argument("--api-key", default=None)
    p.add_argument("--single-client-requests", type=int, default=None,
                   help="requests for the 1-client run (default: min(n, 16)); 0 skips it")
    p.add_argument("--no-baseline", action="store_true", help="skip the speculation-off run")
    p.add_argument("--no-engine", action="store_true", help="skip the in-process engine run")
    p.add_argument("--traffic-uri", default=None, help="traffic log when starting the app (default: a temp dir)")
    return p


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def _one(client: httpx.AsyncClient, url: str, payload: dict, headers: dict) -> dict:
    start = time.perf_counter()
    first = None
    usage, stats = None, None
    async with client.stream("POST", url, json=payload, headers=headers) as response:
        if response.status_code != 200:
            body = await response.aread()
            raise RuntimeError(f"HTTP {response.status_code}: {body[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if first is None and event.get("choices") and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            usage = event.get("usage") or usage
            stats = event.get("draftsmith") or stats
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "latency": end - start,
            "tokens": usage["completion_tokens"] if usage else 0, "stats": stats or {}}


async def _run_load(base: str, prompts: list, concurrency: int, args, *, speculative: bool, label: str) -> dict:
    url = base.rstrip("/") + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    queue: asyncio.Queue = asyncio.Queue()
    for messages in prompts:
        queue.put_nowait(messages)
    results, errors = [], []
    bar = tqdm(total=len(prompts), desc=label, file=sys.stderr, leave=False)

    async def worker(client):
        while not queue.empty():
            messages = queue.get_nowait()
            payload = {"model": args.model, "messages": messages, "max_tokens": args.max_tokens,
                       "temperature": args.temperature, "seed": 0, "stream": True,
                       "stream_options": {"include_usage": True},
                       "draftsmith": {"num_speculative_tokens": args.gamma, "speculative": speculative}}
            try:
                results.append(await _one(client, url, payload, headers))
            except Exception as error:  # noqa: BLE001  counted, reported
                errors.append(repr(error))
            bar.update()

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    bar.close()
    drafted = sum(r["stats"].get("drafted", 0) for r in results)
    accepted = sum(r["stats"].get("accepted", 0) for r in results)
    compared = sum(r["stats"].get("compared", 0) for r in results)
    mal = [r["stats"]["mean_accepted_length"] for r in results if r["stats"].get("mean_accepted_length")]
    tokens = sum(r["tokens"] for r in results)
    if errors:
        logger.warning("%s: %d errors, first: %s", label, len(errors), errors[0])
    return {
        "requests": len(results), "errors": len(errors), "concurrency": concurrency,
        "seconds": round(elapsed, 3), "req_s": round(len(results) / elapsed, 3),
        "output_tokens": tokens, "output_tok_s": round(tokens / elapsed, 2),
        "ttft_p50_ms": round(1000 * _percentile([r["ttft"] for r in results], 50), 1),
        "ttft_p99_ms": round(1000 * _percentile([r["ttft"] for r in results], 99), 1),
        "latency_p50_ms": round(1000 * _percentile([r["latency"] for r in results], 50), 1),
        "latency_p99_ms": round(1000 * _percentile([r["latency"] for r in results], 99), 1),
        "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
        "token_acceptance": round(accepted / compared, 4) if compared else 0.0,
        "mean_accepted_length": round(statistics.mean(mal), 3) if mal else None,
    }


def _prompts(args, tokenizer) -> list:
    from draftsmith.datasets_io import load_prompt_source

    candidates = load_prompt_source(args.prompts, args.num_requests * 8)
    kept = []
    for messages in candidates:
        if tokenizer is not None:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            if len(tokenizer.encode(text, add_special_tokens=False)) > args.max_prompt_tokens:
                continue
        kept.append(messages)
        if len(kept) == args.num_requests:
            break
    if not kept:
        raise SystemExit(f"no prompt from {args.prompts} fits --max-prompt-tokens {args.max_prompt_tokens}")
    return kept


def _engine_config(args, batch: int) -> EngineConfig:
    """The engine settings of both the served app and the in-process engine, so the two compare."""
    return EngineConfig(num_speculative_tokens=args.gamma, max_batch_size=batch,
                        max_model_len=args.max_prompt_tokens + args.max_tokens + 64)


def _engine_tok_s(args, prompts: list, batched_prompts: list) -> dict:
    """The engine alone, in this process: one request at a time (what one HTTP client gets at best), and
    `batched_prompts` all submitted at once with max_batch_size = concurrency (what N clients get at best)."""
    import torch

    from draftsmith import models
    from draftsmith.sampling import SamplingParams
    from draftsmith.specdec import Request, SpecEngine, runner_for
    from serve.drafter_source import make_source

    torch.set_num_threads(args.torch_threads)
    target = models.load_model(args.target)
    source = make_source(args.drafter)
    drafter = source.current().load(target) if source else None
    tok = target.tokenizer

    def engine(batch: int) -> SpecEngine:
        config = _engine_config(args, batch)
        prepack = config.prepack_weights
        return SpecEngine(runner_for(target.model, prepack=prepack),
                          drafter and runner_for(None, drafter, prepack=prepack), config=config, eos_token_ids=target.eos_token_ids,
                          decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
                          drafter_version=drafter.version if drafter else "none")

    def request(i: int, messages) -> Request:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=0)
        return Request(f"e{i}", tok.encode(text, add_special_tokens=False), params)

    single = engine(1)
    tokens, start = 0, time.perf_counter()
    for i, messages in enumerate(tqdm(prompts, desc="engine, 1 at a time", file=sys.stderr, leave=False)):
        tokens += len(single.generate([request(i, messages)])[0].output_token_ids)
    report = {"engine_tok_s": round(tokens / (time.perf_counter() - start), 2), "engine_requests": len(prompts)}
    if batched_prompts and args.concurrency > 1:
        logger.info("engine, %d prompts at once (batch %d)", len(batched_prompts), args.concurrency)
        start = time.perf_counter()
        results = engine(args.concurrency).generate([request(i, m) for i, m in enumerate(batched_prompts)])
        tokens = sum(len(r.output_token_ids) for r in results)
        report["engine_tok_s_batched"] = round(tokens / (time.perf_counter() - start), 2)
    return report


def _start_local(args) -> tuple[str, str]:
    import ray
    from ray import serve

    from serve.app import build_app

    traffic = args.traffic_uri or tempfile.mkdtemp(prefix="draftsmith-bench-traffic-")
    if not ray.is_initialized():
        # "local": a fresh cluster, never one `draftsmith demo` or a developer left running (as tests/conftest.py)
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({
        "model_name": args.model, "target": args.target, "drafter": args.drafter,
        "engine": _engine_config(args, args.max_batch_size or args.concurrency).model_dump(),
        "traffic": {"uri": traffic, "flush_every_seconds": 5.0},
        "placement": {"num_cpus": 1, "torch_threads": args.torch_threads},
        "max_ongoing_requests": max(64, 2 * args.concurrency),
    })
    logger.info("starting the app (target %s, drafter %s)", args.target, args.drafter)
    serve.run(app, name="draftsmith-bench", route_prefix="/")
    return f"http://127.0.0.1:{port}", traffic


def _written(base: str, api_key: str | None) -> int | None:
    """Records the logger has written so far (after flushing), or None if the endpoint cannot say."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.post(base.rstrip("/") + "/draftsmith/flush", headers=headers, timeout=120)
        response.raise_for_status()
        return int(response.json().get("written"))
    except Exception as error:  # noqa: BLE001
        logger.warning("could not flush the traffic log: %s", error)
        return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from serve.app import load_tokenizer

    tokenizer = load_tokenizer(args.target) if args.target else None
    prompts = _prompts(args, tokenizer)
    started = args.url is None
    base, traffic = (_start_local(args) if started else (args.url, None))
    try:
        written_before = _written(base, args.api_key)
        # One short warm-up request so first-request costs do not land in the timed runs.
        asyncio.run(_run_load(base, prompts[:1], 1, args, speculative=True, label="warm-up"))
        spec = asyncio.run(_run_load(base, prompts, args.concurrency, args, speculative=True, label="speculative"))
        report = {**spec}
        n_runs = 1 + spec["requests"]
        if not args.no_baseline:
            base_run = asyncio.run(_run_load(base, prompts, args.concurrency, args, speculative=False,
                                             label="speculation off"))
            n_runs += base_run["requests"]
            report["baseline"] = base_run
            report["speedup_output_tok_s"] = round(spec["output_tok_s"] / base_run["output_tok_s"], 3) \
                if base_run["output_tok_s"] else None
        single_n = min(len(prompts), 16) if args.single_client_requests is None else args.single_client_requests
        if single_n and args.concurrency > 1:
            single = asyncio.run(_run_load(base, prompts[:single_n], 1, args, speculative=True, label="1 client"))
            n_runs += single["requests"]
            report["output_tok_s_1_client"] = single["output_tok_s"]
            report["ttft_p50_ms_1_client"] = single["ttft_p50_ms"]
            report["scaling_n_over_1"] = round(spec["output_tok_s"] / single["output_tok_s"], 3) \
                if single["output_tok_s"] else None
        written_after = _written(base, args.api_key)
        report["logged_records"] = (written_after - written_before) if None not in (written_before, written_after) else None
        report["expected_logged_records"] = n_runs
        if not args.no_engine and args.target:
            engine_prompts = prompts[:single_n or min(len(prompts), 16)]
            report.update(_engine_tok_s(args, engine_prompts, prompts[: 2 * args.concurrency]))
            if report.get("engine_tok_s_batched"):
                report["engine_scaling_n_over_1"] = round(report["engine_tok_s_batched"] / report["engine_tok_s"], 3)
            if report.get("output_tok_s_1_client"):
                report["http_efficiency_1_client"] = round(report["output_tok_s_1_client"] / report["engine_tok_s"], 3)
        report.update({"target": args.target, "drafter": args.drafter if started else None, "gamma": args.gamma,
                       "max_tokens": args.max_tokens, "temperature": args.temperature, "prompts": args.prompts,
                       "traffic_uri": traffic})
    finally:
        if started:
            from ray import serve

            serve.delete("draftsmith-bench")
    _print_table(report)
    print(json.dumps(report))
    return 0 if report["errors"] == 0 else 1


def _print_table(report: dict) -> None:
    rows = [("speculative", report)]
    if "baseline" in report:
        rows.append(("speculation off", report["baseline"]))
    print(f"{'run':<16} {'req':>5} {'err':>4} {'req/s':>7} {'tok/s':>8} {'ttft p50':>9} {'ttft p99':>9} "
          f"{'lat p50':>9} {'lat p99':>9} {'accept':>7}")
    for name, r in rows:
        print(f"{name:<16} {r['requests']:>5} {r['errors']:>4} {r['req_s']:>7.2f} {r['output_tok_s']:>8.1f} "
              f"{r['ttft_p50_ms']:>9.1f} {r['ttft_p99_ms']:>9.1f} {r['latency_p50_ms']:>9.1f} "
              f"{r['latency_p99_ms']:>9.1f} {r['acceptance_rate']:>7.3f}")
    for key in ("speedup_output_tok_s", "output_tok_s_1_client", "scaling_n_over_1", "engine_tok_s",
                "engine_tok_s_batched", "engine_scaling_n_over_1",
                "http_efficiency_1_client", "logged_records", "expected_logged_records"):
        if key in report:
            print(f"{key}: {report[key]}")


if __name__ == "__main__":
    sys.exit(main())
