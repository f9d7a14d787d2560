"""The soak run's CI version (issue 7, fault 6): 30 s of steady load with a drafter swap in the middle.

What it does: runs `pipelines.soak.run_soak` on the session's Ray cluster (tiny target, 4 clients)
and checks what the 10-minute run (`python -m pipelines.soak --minutes 10`) reports: no failed
request, the swap reached the clients, every completed request is logged exactly once, and no
process's resident memory grew past a bound after warm-up.

What it does not do: measure for the README (the long run does; see its section there).
"""

import pytest

pytestmark = pytest.mark.integration

# Generous: the session's other tests share the processes' allocators; a leak per request over 30 s of
# load (hundreds of requests) would still exceed it.
MAX_GROWTH_MB = 150


def test_short_soak_with_a_drafter_swap(ray_cluster, tmp_path):
    from pipelines.soak import run_soak

    report = run_soak(30, clients=4, max_tokens=16, work_dir=tmp_path)
    print({k: report[k] for k in ("requests", "errors", "req_s", "latency_p99_ms", "drafter_versions",
                                  "lost_records", "duplicate_records", "max_rss_growth_mb")})
    assert report["errors"] == 0, report["error_samples"]
    assert report["completed"] >= 40
    assert report["swapped"], report["drafter_versions"]
    where = {k: report[k] for k in ("lost_ids", "pair_counts", "logger_stats")}  # where a lost record went
    assert report["lost_records"] == 0 and report["duplicate_records"] == 0 and report["skipped_files"] == 0, where
    stats = report["logger_stats"]
    assert stats["received"] == stats["written"] and stats["dropped"] == stats["failed_flushes"] == 0, stats
    assert report["undelivered_records"] == 0
    assert report["latency_p99_ms"] is not None and report["latency_p99_ms"] < 60_000
    names = set(report["memory"])
    assert {"driver"} < names and any(n.startswith("SpecPair[") for n in names), names
    assert any(n.startswith("TrafficLogger[") for n in names) and any(n.startswith("Ingress[") for n in names)
    assert all(m["growth_mb"] is not None for m in report["memory"].values()), report["memory"]
    assert report["max_rss_growth_mb"] < MAX_GROWTH_MB, report["memory"]
