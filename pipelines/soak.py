"""`python -m pipelines.soak --minutes 10`: steady concurrent load with a drafter swap in the middle.

What it does: starts the Serve application on a local Ray cluster of its own (or reuses the Ray this
process already joined, as the CI test does), with a tiny target by default and a drafter read from a
directory symlink; N HTTP clients send completions (a third streamed) without pause for the given
time; halfway through the symlink is re-pointed to a second drafter, which the replicas pick up
without a restart. It samples the resident memory (RSS, psutil) of this process and of every Serve
actor (replicas, controller, proxy) after a warm-up and at the end, then reads the traffic log back.
It reports requests, errors, latency percentiles, the drafter versions seen, records lost or logged
twice (with the replica's and the logger's counters, to tell where a lost one went), and each
process's memory growth: a readable table, then one JSON object as the last stdout line.

What it does not do: inject faults (tests/integration/test_faults_*.py), judge the figures beyond
the exit status (1 when a request failed or a completed request is missing from the log), or drive a
remote endpoint.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from tqdm import tqdm

from draftsmith.ports import free_port

logger = logging.getLogger(__name__)

APP, PREFIX, MODEL = "draftsmith-soak", "/soak", "draftsmith"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long the load runs")
    p.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    p.add_argument("--max-tokens", type=int, default=24, help="output tokens per request (at most)")
    p.add_argument("--target", default="tiny", help="target spec (drafters are derived from it)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads in the replica")
    p.add_argument("--work-dir", default=None, help="drafters and traffic log (default: a temp dir)")
    return p


def start_serve(port: int) -> int:
    """Start Serve's HTTP proxy on loopback; returns the port it really listens on.

    If Serve already runs in this cluster (another app started it), its proxy keeps its own port and
    `http_options` are ignored, so the port is read back rather than assumed.
    """
    from ray import serve
    from ray.serve.context import _get_global_client

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return _get_global_client().http_config.port


def stop_serve(app: str) -> None:
    """Delete `app`; shut Serve down when no application is left, so the next start gets its own port."""
    from ray import serve

    serve.delete(app)
    if not serve.status().applications:
        serve.shutdown()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _point(link: Path, target: Path) -> None:
    """Atomically re-point a symlink (how a deploy script changes a directory drafter)."""
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex}")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _processes() -> dict[str, int]:
    """name -> pid of this process and every live Serve actor of the soak app (plus controller, proxy)."""
    import ray
    from ray.util.state import list_actors

    found = {"driver": os.getpid()}
    # The cluster this process joined, explicitly: without an address the state API picks whichever
    # cluster `ray start` last registered on this machine, which may be someone else's.
    address = ray.get_runtime_context().gcs_address
    for actor in list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000):
        name = actor.class_name or ""
        if name.startswith(f"ServeReplica:{APP}:") or name in ("ServeController", "ProxyActor"):
            found[f"{name.removeprefix(f'ServeReplica:{APP}:')}[{actor.pid}]"] = actor.pid
    return found


def _rss_mb(pids: dict[str, int]) -> dict[str, float]:
    import psutil

    out = {}
    for name, pid in pids.items():
        try:
            out[name] = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:  # gone (replaced): reported as missing at the end
            pass
    return out


class _Load:
    """Clients that send requests back to back until stopped; latencies, ids and versions are kept."""

    def __init__(self, base: str, clients: int, max_tokens: int):
        self.base, self.clients, self.max_tokens = base, clients, max_tokens
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.ids: list[str] = []
        self.errors: list[str] = []
        self.versions: collections.Counter = collections.Counter()

    def _one(self, client: httpx.Client, i: int) -> None:
        stream = i % 3 == 0
        payload = {"model": MODEL, "prompt": f"soak request {i}: " + "tell me more " * (i % 7),
                   "max_tokens": 4 + i % max(1, self.max_tokens - 3), "temperature": 0 if i % 2 else 0.8,
                   "seed": i, "stream": stream}
        start = time.perf_counter()
        try:
            response = client.post(self.base + "/v1/completions", json=payload, timeout=300)
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
            if stream:
                events = [json.loads(b[6:]) for b in response.text.split("\n\n") if b.startswith("data: {")]
                if any("error" in e for e in events):
                    raise RuntimeError(f"stream error: {next(e for e in events if 'error' in e)}")
                rid, stats = events[0]["id"], next(e["draftsmith"] for e in events if e.get("draftsmith"))
            else:
                body = response.json()
                rid, stats = body["id"], body["draftsmith"]
        except Exception as error:  # noqa: BLE001  counted and reported
            with self.lock:
                self.errors.append(f"{type(error).__name__}: {error}"[:300])
            return
        with self.lock:
            self.latencies.append(time.perf_counter() - start)
            self.ids.append(rid.split("-", 1)[1])
            self.versions[stats["drafter_version"]] += 1

    def run_client(self, worker: int) -> None:
        with httpx.Client() as client:
            i = worker
            while not self.stop.is_set():
                self._one(client, i)
                i += self.clients


def run_soak(seconds: float, *, clients: int = 8, max_tokens: int = 24, target: str = "tiny",
             torch_threads: int = 1, work_dir: str | Path | None = None) -> dict:
    """Start the app, load it for `seconds` with a drafter swap at half time, and return the report."""
    import ray
    from ray import serve

    from draftsmith import models
    from draftsmith.traffic import TRAFFIC_SCHEMA, TrafficScan, read_traffic
    from serve.app import build_app

    work = Path(work_dir or tempfile.mkdtemp(prefix="draftsmith-soak-"))
    loaded = models.load_model(target)
    drafters = {name: models.save_drafter(models.derive_drafter(loaded, layers), work / name, loaded.tokenizer)
                for name, layers in (("drafter-a", "first1"), ("drafter-b", "last1"))}
    del loaded
    current = work / "current"
    _point(current, drafters["drafter-a"])
    traffic = work / "traffic"
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=True,
                 dashboard_host="127.0.0.1", log_to_driver=False, configure_logging=False)
    port = start_serve(free_port())
    args = {"target": target, "drafter": str(current), "drafter_poll_interval_s": 1.0,
            "engine": {"max_model_len": 256, "max_batch_size": clients, "num_speculative_tokens": 3},
            "traffic": {"uri": str(traffic), "flush_every_seconds": 5.0},
            "placement": {"num_cpus": 1, "torch_threads": torch_threads}}
    serve.run(build_app(args), name=APP, route_prefix=PREFIX)
    base = f"http://127.0.0.1:{port}{PREFIX}"
    load = _Load(base, clients, max_tokens)
    warmup = min(30.0, 0.15 * seconds)
    report: dict = {"seconds": seconds, "clients": clients, "target": target}
    try:
        pool = ThreadPoolExecutor(clients)
        futures = [pool.submit(load.run_client, w) for w in range(clients)]
        started = time.monotonic()
        swapped_at = None
        start_pids, start_rss = None, {}
        with tqdm(total=int(seconds), desc="soak", unit="s", file=sys.stderr) as bar:
            while (elapsed := time.monotonic() - started) < seconds:
                if start_pids is None and elapsed >= warmup:
                    start_pids = _processes()
                    start_rss = _rss_mb(start_pids)
                if swapped_at is None and elapsed >= seconds / 2:
                    _point(current, drafters["drafter-b"])
                    swapped_at = elapsed
                    logger.info("drafter symlink re-pointed to drafter-b at %.0f s", elapsed)
                time.sleep(0.5)
                bar.update(int(time.monotonic() - started) - bar.n)
        end_rss = _rss_mb(start_pids or {})
        load.stop.set()
        for future in futures:
            future.result(timeout=600)
        pool.shutdown()
        wall = time.monotonic() - started

        flushed = httpx.post(base + "/draftsmith/flush", timeout=120)
        flushed.raise_for_status()
        scan = TrafficScan(table=TRAFFIC_SCHEMA.empty_table())
        logged = collections.Counter(r.request_id for r in read_traffic(traffic, scan=scan))
        status = httpx.get(base + "/draftsmith/status", timeout=60).json()
    finally:
        stop_serve(APP)
    memory = {name: {"pid": start_pids[name], "rss_start_mb": round(start_rss[name], 1),
                     "rss_end_mb": round(end_rss[name], 1) if name in end_rss else None,
                     "growth_mb": round(end_rss[name] - start_rss[name], 1) if name in end_rss else None}
              for name in sorted(start_rss)}
    growths = [m["growth_mb"] for m in memory.values() if m["growth_mb"] is not None]
    versions = {v: n for v, n in load.versions.items()}
    report.update({
        "wall_seconds": round(wall, 1), "requests": len(load.ids) + len(load.errors), "completed": len(load.ids),
        "errors": len(load.errors), "error_samples": load.errors[:5], "req_s": round(len(load.ids) / wall, 2),
        "latency_p50_ms": round(1000 * _percentile(load.latencies, 50), 1) if load.latencies else None,
        "latency_p99_ms": round(1000 * _percentile(load.latencies, 99), 1) if load.latencies else None,
        "latency_max_ms": round(1000 * max(load.latencies), 1) if load.latencies else None,
        "swap_at_s": round(swapped_at, 1) if swapped_at is not None else None,
        "drafter_versions": versions,
        "swapped": any(v.startswith("drafter-b") for v in versions) and any(v.startswith("drafter-a") for v in versions),
        "logged_records": sum(logged.values()),
        "lost_records": sum(1 for rid in load.ids if logged[rid] == 0),
        "duplicate_records": sum(1 for rid in load.ids if logged[rid] > 1),
        "skipped_files": len(scan.skipped),
        "undelivered_records": status.get("log_send_failures", 0) + status.get("log_released_unconfirmed", 0),
        "lost_ids": sorted(rid for rid in load.ids if logged[rid] == 0)[:20],
        # What the replica and the logger counted, to tell where a lost record went.
        "pair_counts": {k: status.get(k) for k in ("requests", "errors", "logged_sent", "log_resent",
                                                    "handoff_timeouts", "opted_out", "pending_records",
                                                    "unconfirmed_records", "replica", "logger_instance")},
        "logger_stats": flushed.json(),
        "memory_warmup_s": round(warmup, 1), "memory": memory,
        "max_rss_growth_mb": max(growths) if growths else None,
        "traffic_uri": str(traffic),
    })
    return report


def _print_table(report: dict) -> None:
    print(f"soak: {report['wall_seconds']} s, {report['clients']} clients, {report['requests']} requests, "
          f"{report['errors']} errors, {report['req_s']} req/s, latency p50 {report['latency_p50_ms']} ms, "
          f"p99 {report['latency_p99_ms']} ms, max {report['latency_max_ms']} ms")
    print(f"drafter swap at {report['swap_at_s']} s; versions answered: {report['drafter_versions']}")
    print(f"traffic: {report['logged_records']} logged, {report['lost_records']} lost, "
          f"{report['duplicate_records']} logged twice, {report['skipped_files']} unreadable files")
    print(f"{'process':<40} {'pid':>8} {'rss start MB':>13} {'rss end MB':>11} {'growth MB':>10}")
    for name, m in report["memory"].items():
        print(f"{name:<40} {m['pid']:>8} {m['rss_start_mb']:>13} {str(m['rss_end_mb']):>11} {str(m['growth_mb']):>10}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    report = run_soak(args.minutes * 60, clients=args.clients, max_tokens=args.max_tokens, target=args.target,
                      torch_threads=args.torch_threads, work_dir=args.work_dir)
    _print_table(report)
    print(json.dumps(report))
    return 0 if report["errors"] == 0 and report["lost_records"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
