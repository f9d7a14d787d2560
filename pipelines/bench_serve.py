"""`draftsmith bench serve`: replay held-out prompts against the OpenAI endpoint with N concurrent clients.

What it does: loads prompts (`sharegpt` held-out split or `jsonl:PATH`), starts the Serve app locally
(or uses `--url`), and runs its arms, each over HTTP with streaming chat requests: at every concurrency
of `-c` (one number or a list, e.g. `-c 1,4,8`), the prompts with speculation (`--gamma`, `auto` by
default: the replica's speculation policy) and with speculation off (per-request
`draftsmith.speculative=false`); a 1-client speculative run when 1 is not among the concurrencies; then
the engine alone in this process, with the served engine settings, on the 1-client prompts one at a
time and on 2 x N prompts at once, so the gap between `output_tok_s_1_client` and `engine_tok_s` is the
serving overhead.

Every arm is measured alike: before its timed runs each one gets the same untimed warm-up (the first
prompts, `--warmup-per-client` requests per client at the arm's own concurrency and settings; the
in-process engine as well), all run at `--torch-threads`, on the same prompts, with one engine
configuration; the JSON's `warmup` describes each arm's. The two arms of a concurrency are timed in
`--rounds` rounds in ABBA order (on, off, off, on, ...), each round on every rounds-th prompt, so that a
machine whose speed drifts over minutes (other work on shared cores) slows both arms alike; each arm's
figures sum its rounds, and `round_speedups_by_concurrency` gives every round's ratio. `speedup_output_tok_s` is speculation against
speculation off at the largest concurrency (per concurrency in `speedup_by_concurrency`). A run with an
error in any arm, warm-ups included, reports no ratio (null) and exits non-zero. It reports throughput,
time to first token and latency percentiles, what speculation really did (acceptance, drafted tokens per
step, proposers, steps the policy switched off), the policy's snapshot, and how many traffic records the
runs produced. The last stdout line is one JSON object; progress bars go to stderr.

What it does not do: start a cluster for a remote `--url`, or judge the figures (docs/benchmarks.md does).
"""

import argparse
import asyncio
import collections
import json
import logging
import os
import statistics
import sys
import tempfile
import time

import httpx
from tqdm import tqdm

from draftsmith.engine_config import EngineConfig, add_config_arguments, config_options
from draftsmith.paired_rounds import round_schedule
from draftsmith.ports import free_port
from serve.config import speculation_arg

logger = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_APP_CONFIG = os.path.join(REPO_ROOT, "infra", "serve.yaml")
# Engine settings a flag may override; the rest come from the app config (what `serve deploy` would serve).
ENGINE_FLAGS = ("prompt_lookup_max", "prompt_lookup_min", "auto_max_speculative_tokens",
                "disable_speculation_at_batch", "prepack_weights")
# Settings the benchmark derives from its own sizes, never from the app config.
DERIVED_ENGINE_FIELDS = ("num_speculative_tokens", "max_batch_size", "max_model_len")


def concurrency_levels(text: str) -> list[int]:
    """`8` or `1,4,8`: the concurrencies to measure, each >= 1, in the order given (argparse `type=`)."""
    try:
        levels = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of clients or a list like 1,4,8") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: concurrencies must be >= 1")
    return list(dict.fromkeys(levels))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="draftsmith bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running endpoint (http://host:port); default: start one locally")
    p.add_argument("--target", default="tiny", help="target spec (also used to filter prompts and for engine_tok_s)")
    p.add_argument("--app-config", default=DEFAULT_APP_CONFIG,
                   help="Serve config whose first application's drafter and engine settings the benchmark serves "
                        "(default: infra/serve.yaml, the serving defaults); flags below override them")
    p.add_argument("--drafter", default=None, help="drafter source when starting the app (default: the app config's; none: no drafter)")
    p.add_argument("--prompts", default="sharegpt", help="sharegpt | jsonl:PATH")
    p.add_argument("-n", "--num-requests", type=int, default=48)
    p.add_argument("-c", "--concurrency", type=concurrency_levels, default=[8], metavar="N|N1,N2,...",
                   help="concurrent clients, or a list (1,4,8): every figure per concurrency")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--max-prompt-tokens", type=int, default=384, help="skip longer prompts")
    p.add_argument("--gamma", type=speculation_arg, default="auto", metavar="auto|N",
                   help="num_speculative_tokens of the speculative arms: auto (the speculation policy) or a number")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-batch-size", type=int, default=None, help="default: the largest concurrency")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads in the replica and in-process engine")
    p.add_argument("--warmup-per-client", type=int, default=1,
                   help="untimed requests per client before every arm (same for every arm)")
    p.add_argument("--model", default="draftsmith", help="model name sent in requests")
    p.add_argument("--api-key", default=None)
    p.add_argument("--single-client-requests", type=int, default=None,
                   help="requests for the 1-client run when 1 is not a concurrency (default: min(n, 16)); 0 skips it")
    p.add_argument("--no-baseline", action="store_true", help="skip the speculation-off runs")
    p.add_argument("--rounds", type=int, default=2,
                   help="timed rounds of the on/off pair per concurrency, ABBA order, each on every rounds-th prompt")
    p.add_argument("--no-engine", action="store_true", help="skip the in-process engine run")
    p.add_argument("--traffic-uri", default=None, help="traffic log when starting the app (default: a temp dir)")
    add_config_arguments(p, ENGINE_FLAGS)
    return p


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def ratio(numerator: float | None, denominator: float | None, *, valid: bool = True) -> float | None:
    """numerator / denominator rounded, or None when a run had errors (`valid` False) or a figure is missing."""
    if not valid or not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)


def warmup_description(requests: int, concurrency: int, where: str) -> dict:
    return {"requests": requests, "concurrency": concurrency, "prompts": f"the first {requests} of the timed prompts",
            "settings": "the arm's own (speculation, engine configuration, torch threads)", "timed": False,
            "where": where}


# ----- HTTP arms ---------------------------------------------------------------------------------------
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


def speculation_summary(stats: list[dict]) -> dict:
    """What speculation did over a run's responses (their `draftsmith` objects)."""
    total = collections.Counter()
    for s in stats:
        total.update({key: s.get(key, 0) for key in ("drafted", "accepted", "compared", "steps", "policy_off_steps")})
    mal = [s["mean_accepted_length"] for s in stats if s.get("mean_accepted_length")]
    return {
        "acceptance_rate": round(total["accepted"] / total["drafted"], 4) if total["drafted"] else 0.0,
        "token_acceptance": round(total["accepted"] / total["compared"], 4) if total["compared"] else 0.0,
        "mean_accepted_length": round(statistics.mean(mal), 3) if mal else None,
        "mean_drafted_per_step": round(total["drafted"] / total["steps"], 3) if total["steps"] else 0.0,
        "policy_off_step_share": round(total["policy_off_steps"] / total["steps"], 3) if total["steps"] else 0.0,
        "proposers": dict(collections.Counter(s.get("proposer", "unknown") for s in stats)),
    }


async def _requests(base: str, prompts: list, concurrency: int, args, *, speculative: bool,
                    label: str) -> tuple[list[dict], list[str], float]:
    """Send `prompts` with `concurrency` clients: (per-request results, errors, wall seconds)."""
    url = base.rstrip("/") + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    queue: asyncio.Queue = asyncio.Queue()
    for messages in prompts:
        queue.put_nowait(messages)
    results, errors = [], []
    bar = tqdm(total=len(prompts), desc=label, file=sys.stderr, leave=False)
    options = {"speculative": speculative}
    if args.gamma != "auto":  # auto: the replica's own setting
        options["num_speculative_tokens"] = args.gamma

    async def worker(client):
        while not queue.empty():
            messages = queue.get_nowait()
            payload = {"model": args.model, "messages": messages, "max_tokens": args.max_tokens,
                       "temperature": args.temperature, "seed": 0, "stream": True,
                       "stream_options": {"include_usage": True}, "draftsmith": options}
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
    if errors:
        logger.warning("%s: %d errors, first: %s", label, len(errors), errors[0])
    return results, errors, elapsed


def summarize(results: list[dict], errors: list[str], seconds: float, concurrency: int) -> dict:
    """One arm's figures from its requests' results over `seconds` of timed wall clock."""
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": len(results), "errors": len(errors), "concurrency": concurrency,
        "seconds": round(seconds, 3), "req_s": round(len(results) / seconds, 3),
        "output_tokens": tokens, "output_tok_s": round(tokens / seconds, 2),
        "ttft_p50_ms": round(1000 * _percentile([r["ttft"] for r in results], 50), 1),
        "ttft_p99_ms": round(1000 * _percentile([r["ttft"] for r in results], 99), 1),
        "latency_p50_ms": round(1000 * _percentile([r["latency"] for r in results], 50), 1),
        "latency_p99_ms": round(1000 * _percentile([r["latency"] for r in results], 99), 1),
        **speculation_summary([r["stats"] for r in results]),
    }


def _run_load(base: str, prompts: list, concurrency: int, args, *, speculative: bool, label: str) -> dict:
    return summarize(*asyncio.run(_requests(base, prompts, concurrency, args, speculative=speculative, label=label)),
                     concurrency)


def warmup_size(args, concurrency: int, n_prompts: int) -> int:
    """Untimed requests before an arm at `concurrency` clients: the same rule for every arm."""
    return min(n_prompts, max(1, args.warmup_per_client * concurrency))


def _http_arm(base: str, prompts: list, concurrency: int, args, *, speculative: bool, label: str) -> tuple[dict, dict]:
    """One HTTP arm: its warm-up, then its timed run. Returns (timed run, warm-up run)."""
    warm = prompts[:warmup_size(args, concurrency, len(prompts))]
    warmup = _run_load(base, warm, concurrency, args, speculative=speculative, label=f"warm-up {label}")
    return _run_load(base, prompts, concurrency, args, speculative=speculative, label=label), warmup


def _paired_arms(base: str, prompts: list, concurrency: int, args) -> tuple[dict, dict, dict, dict, list]:
    """Speculation on and off at one concurrency: both warm-ups first, then `--rounds` timed rounds in ABBA
    order. Returns (on, off, warm-up on, warm-up off, per-round speedups)."""
    warm = prompts[:warmup_size(args, concurrency, len(prompts))]
    warmups = {arm: _run_load(base, warm, concurrency, args, speculative=arm, label=f"warm-up {_arm_name(arm, concurrency)}")
               for arm in (True, False)}
    parts: dict[bool, tuple[list, list, float]] = {True: ([], [], 0.0), False: ([], [], 0.0)}
    round_speedups = []
    for r, (indices, order) in enumerate(round_schedule(len(prompts), args.rounds)):
        rates = {}
        for arm in order:
            results, errors, seconds = asyncio.run(_requests(base, [prompts[i] for i in indices], concurrency, args,
                                                             speculative=arm,
                                                             label=f"{_arm_name(arm, concurrency)} round {r + 1}"))
            old = parts[arm]
            parts[arm] = (old[0] + results, old[1] + errors, old[2] + seconds)
            rates[arm] = sum(x["tokens"] for x in results) / seconds
        round_speedups.append(round(rates[True] / rates[False], 3) if rates[False] else None)
    on, off = (summarize(*parts[arm], concurrency) for arm in (True, False))
    return on, off, warmups[True], warmups[False], round_speedups


def _arm_name(speculative: bool, concurrency: int) -> str:
    return f"{'speculative' if speculative else 'speculation_off'}@{concurrency}"


# ----- the in-process engine ------------------------------------------------------------------------------
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


def app_config_args(path: str | None) -> dict:
    """The `args:` of the first application in a Serve config file ({} without one)."""
    if not path:
        return {}
    import yaml

    with open(path) as f:
        document = yaml.safe_load(f) or {}
    applications = document.get("applications") or [{}]
    return dict(applications[0].get("args") or {})


def engine_config(args) -> EngineConfig:
    """The engine settings of the served app and of the in-process engine alike, so the arms compare: the app
    config's engine section, then the flags the command line set, then the sizes this benchmark derives."""
    served = app_config_args(args.app_config).get("engine") or {}
    settings = {k: v for k, v in served.items() if k in EngineConfig.model_fields and k not in DERIVED_ENGINE_FIELDS}
    settings.update(config_options(args, ENGINE_FLAGS))
    return EngineConfig(**settings, num_speculative_tokens=args.gamma,
                        max_batch_size=args.max_batch_size or max(args.concurrency),
                        max_model_len=args.max_prompt_tokens + args.max_tokens + 64)


def resolve_drafter(args) -> None:
    """`--drafter` unset: the app config's drafter (the serving default); `none`: no drafter (prompt lookup
    alone, when the engine settings turn it on)."""
    if args.drafter is None:
        args.drafter = app_config_args(args.app_config).get("drafter")
    elif args.drafter == "none":
        args.drafter = None


def _engine_tok_s(args, prompts: list, batched_prompts: list, batch: int) -> tuple[dict, dict]:
    """The engine alone, in this process, with the served settings: `prompts` one request at a time (what one
    HTTP client gets at best), and `batched_prompts` all submitted at once (what `batch` clients get at best),
    each after the warm-up its HTTP counterpart gets. Returns (figures, warm-up descriptions)."""
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
    config = engine_config(args)
    engine = SpecEngine(runner_for(target.model, prepack=config.prepack_weights),
                        drafter and runner_for(None, drafter, prepack=config.prepack_weights), config=config,
                        eos_token_ids=target.eos_token_ids, decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
                        drafter_version=drafter.version if drafter else "none")

    def request(i: int, messages) -> Request:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=0)
        return Request(f"e{i}", tok.encode(text, add_special_tokens=False), params)

    def timed(batches: list[list]) -> float:
        tokens, start = 0, time.perf_counter()
        for group in tqdm(batches, desc="engine", file=sys.stderr, leave=False):
            tokens += sum(len(r.output_token_ids) for r in engine.generate([request(i, m) for i, m in enumerate(group)]))
        return round(tokens / (time.perf_counter() - start), 2)

    warm_single = warmup_size(args, 1, len(prompts))
    timed([[m] for m in prompts[:warm_single]])  # warm-up, as the 1-client HTTP arm's
    report = {"engine_tok_s": timed([[m] for m in prompts]), "engine_requests": len(prompts)}
    warmup = {"engine": warmup_description(warm_single, 1, "in process")}
    if batched_prompts and batch > 1:
        warm_batched = warmup_size(args, batch, len(batched_prompts))
        timed([batched_prompts[:warm_batched]])
        report["engine_tok_s_batched"] = timed([batched_prompts])
        warmup["engine_batched"] = warmup_description(warm_batched, batch, "in process")
    return report, warmup


# ----- the app --------------------------------------------------------------------------------------------
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
        "engine": engine_config(args).model_dump(),
        "traffic": {"uri": traffic, "flush_every_seconds": 5.0},
        "placement": {"num_cpus": 1, "torch_threads": args.torch_threads},
        "max_ongoing_requests": max(64, 2 * max(args.concurrency)),
    })
    logger.info("starting the app (target %s, drafter %s)", args.target, args.drafter)
    serve.run(app, name="draftsmith-bench", route_prefix="/")
    return f"http://127.0.0.1:{port}", traffic


def _post(base: str, path: str, api_key: str | None, method: str = "POST") -> dict | None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.request(method, base.rstrip("/") + path, headers=headers, timeout=120)
        response.raise_for_status()
        return response.json()
    except Exception as error:  # noqa: BLE001
        logger.warning("%s %s failed: %s", method, path, error)
        return None


def _written(base: str, api_key: str | None) -> int | None:
    """Records the logger has written so far (after flushing), or None if the endpoint cannot say."""
    flushed = _post(base, "/draftsmith/flush", api_key)
    return int(flushed["written"]) if flushed and flushed.get("written") is not None else None


# ----- the report -----------------------------------------------------------------------------------------
def combine(levels: list[int], runs: dict[str, dict], warmups: dict[str, dict], warmup_runs: dict[str, dict],
            engine: dict | None, engine_error: str | None = None) -> dict:
    """The report from every arm's figures. `runs` is keyed `speculative@N`, `speculation_off@N` and
    `1_client`; the top level holds the largest concurrency's speculative figures. Any error in any arm
    (warm-ups and the in-process engine included) makes every ratio null."""
    errors = {name: run["errors"] for name, run in runs.items()}
    errors.update({f"warm-up {name}": run["errors"] for name, run in warmup_runs.items()})
    if engine_error is not None:
        errors["engine"] = 1
    valid = not any(errors.values())
    top = max(levels)
    by_concurrency = {}
    for c in levels:
        spec, off = runs[f"speculative@{c}"], runs.get(f"speculation_off@{c}")
        entry = {"speculative": spec}
        if off is not None:
            entry["speculation_off"] = off
            entry["speedup_output_tok_s"] = ratio(spec["output_tok_s"], off["output_tok_s"], valid=valid)
        by_concurrency[str(c)] = entry
    report = {**runs[f"speculative@{top}"], "concurrency_levels": levels, "by_concurrency": by_concurrency}
    if f"speculation_off@{top}" in runs:
        report["baseline"] = runs[f"speculation_off@{top}"]
        report["speedup_output_tok_s"] = by_concurrency[str(top)]["speedup_output_tok_s"]
        report["speedup_by_concurrency"] = {c: e["speedup_output_tok_s"] for c, e in by_concurrency.items()}
    single = runs.get("1_client") or runs.get("speculative@1")
    if single is not None:
        report["output_tok_s_1_client"] = single["output_tok_s"]
        report["ttft_p50_ms_1_client"] = single["ttft_p50_ms"]
        if top > 1:
            report["scaling_n_over_1"] = ratio(report["output_tok_s"], single["output_tok_s"], valid=valid)
    if engine:
        report.update(engine)
        if engine.get("engine_tok_s_batched"):
            report["engine_scaling_n_over_1"] = ratio(engine["engine_tok_s_batched"], engine["engine_tok_s"],
                                                      valid=valid)
        if single is not None:
            report["http_efficiency_1_client"] = ratio(single["output_tok_s"], engine["engine_tok_s"], valid=valid)
    if engine_error is not None:
        report["engine_error"] = engine_error
    report.update({"errors": sum(errors.values()), "arm_errors": errors, "warmup": warmups})
    return report


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    resolve_drafter(args)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from serve.app import load_tokenizer

    tokenizer = load_tokenizer(args.target) if args.target else None
    prompts = _prompts(args, tokenizer)
    levels = args.concurrency
    started = args.url is None
    base, traffic = (_start_local(args) if started else (args.url, None))
    warmups = {}
    engine, engine_error = None, None
    try:
        written_before = _written(base, args.api_key)
        runs, warmup_runs, round_speedups = {}, {}, {}
        for c in levels:
            if args.no_baseline:
                runs[_arm_name(True, c)], warmup_runs[_arm_name(True, c)] = _http_arm(
                    base, prompts, c, args, speculative=True, label=_arm_name(True, c))
            else:
                (runs[_arm_name(True, c)], runs[_arm_name(False, c)], warmup_runs[_arm_name(True, c)],
                 warmup_runs[_arm_name(False, c)], round_speedups[str(c)]) = _paired_arms(base, prompts, c, args)
        single_n = min(len(prompts), 16) if args.single_client_requests is None else args.single_client_requests
        single_prompts = prompts if 1 in levels else prompts[:single_n]  # the 1-client figure's, and the engine's
        if single_n and 1 not in levels:
            runs["1_client"], warmup_runs["1_client"] = _http_arm(base, single_prompts, 1, args, speculative=True,
                                                                  label="1_client")
        for name, run in warmup_runs.items():
            warmups[name] = warmup_description(run["requests"] + run["errors"], run["concurrency"], "HTTP")
        written_after = _written(base, args.api_key)
        status = _post(base, "/draftsmith/status", args.api_key, method="GET") or {}
        if not args.no_engine and args.target and single_prompts:
            try:
                engine, engine_warmups = _engine_tok_s(args, single_prompts, prompts[: 2 * max(levels)], max(levels))
                warmups.update(engine_warmups)
            except Exception as error:  # noqa: BLE001  an arm that failed: reported, and no ratio
                logger.exception("the in-process engine arm failed")
                engine_error = repr(error)
        report = combine(levels, runs, warmups, warmup_runs, engine, engine_error)
        if round_speedups:
            report["rounds"] = args.rounds
            report["round_speedups_by_concurrency"] = round_speedups
        logged = sum(r["requests"] for r in (*runs.values(), *warmup_runs.values()))
        report["logged_records"] = (written_after - written_before) if None not in (written_before, written_after) else None
        report["expected_logged_records"] = logged
        report.update({"target": args.target, "drafter": args.drafter if started else None, "gamma": args.gamma,
                       "engine": engine_config(args).model_dump(mode="json") if started else None,
                       "served_num_speculative_tokens": status.get("num_speculative_tokens"),
                       "policy": status.get("policy"), "torch_threads": args.torch_threads,
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
    print(f"{'run':<24} {'req':>5} {'err':>4} {'req/s':>7} {'tok/s':>8} {'ttft p50':>9} {'ttft p99':>9} "
          f"{'lat p50':>9} {'lat p99':>9} {'accept':>7} {'draft/step':>10}")
    for c, entry in report["by_concurrency"].items():
        for arm, r in entry.items():
            if not isinstance(r, dict):
                continue
            print(f"{arm + ' @' + c:<24} {r['requests']:>5} {r['errors']:>4} {r['req_s']:>7.2f} "
                  f"{r['output_tok_s']:>8.1f} {r['ttft_p50_ms']:>9.1f} {r['ttft_p99_ms']:>9.1f} "
                  f"{r['latency_p50_ms']:>9.1f} {r['latency_p99_ms']:>9.1f} {r['acceptance_rate']:>7.3f} "
                  f"{r['mean_drafted_per_step']:>10.2f}")
    for key in ("speedup_output_tok_s", "speedup_by_concurrency", "output_tok_s_1_client", "scaling_n_over_1",
                "engine_tok_s", "engine_tok_s_batched", "engine_scaling_n_over_1", "http_efficiency_1_client",
                "errors", "logged_records", "expected_logged_records"):
        if key in report:
            print(f"{key}: {report[key]}")


if __name__ == "__main__":
    sys.exit(main())
