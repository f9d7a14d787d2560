"""serve.load.serving_load: ongoing requests per SpecPair replica, from a faked Serve status and metrics."""

import io
import urllib.request
from types import SimpleNamespace

import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from serve.load import serving_load  # noqa: E402

METRICS = """\
# HELP ray_serve_replica_processing_queries The current number of queries being processed.
# TYPE ray_serve_replica_processing_queries gauge
ray_serve_replica_processing_queries{application="draftsmith",deployment="Ingress",replica="i1"} 3.0
ray_serve_replica_processing_queries{application="draftsmith",deployment="SpecPair",replica="p1"} 2.0
ray_serve_replica_processing_queries{application="draftsmith",deployment="SpecPair",replica="p2"} 1.0
ray_serve_replica_processing_queries{application="draftsmith",deployment="TrafficLogger",replica="l1"} 1.0
ray_serve_replica_processing_queries_other{deployment="SpecPair"} 9.0
"""


def _deployment(running):
    return SimpleNamespace(replica_states={"RUNNING": running})


@pytest.fixture
def fake_serve(monkeypatch):
    """Three requests in flight: each is processed by the ingress AND a SpecPair replica; the logger has one."""
    status = SimpleNamespace(applications={"draftsmith": SimpleNamespace(deployments={
        "Ingress": _deployment(1), "SpecPair": _deployment(2), "TrafficLogger": _deployment(1)})})
    monkeypatch.setattr(serve, "status", lambda: status)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "MetricsExportPort": 1, "NodeManagerAddress": "n"}])
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(METRICS.encode()))
    return status


def test_load_is_ongoing_requests_per_spec_pair_replica(fake_serve):
    # 3 requests on 2 SpecPair replicas. The old reading (jobs.distill.serving_load) summed every line starting
    # with the gauge's name, of every deployment (3 + 2 + 1 + 1 + 9), over every running replica (4): 4.0.
    assert serving_load() == pytest.approx(1.5)


def test_no_spec_pair_replica_or_no_serve_is_no_load(fake_serve, monkeypatch):
    fake_serve.applications["draftsmith"].deployments["SpecPair"] = _deployment(0)
    assert serving_load() == 0.0

    def not_started():
        raise RuntimeError("Serve is not running")

    monkeypatch.setattr(serve, "status", not_started)
    assert serving_load() == 0.0
