"""Serving load: ongoing requests per SpecPair replica, read from Serve's state (the spare-compute signal).

Definition. `serving_load() = (requests the running SpecPair replicas are processing) / (running SpecPair
replicas)`. Only the SpecPair deployment counts: every request also passes through the ingress, and the
traffic logger handles a record per request, so counting their replicas or their in-flight work would
count one request two or three times and divide by replicas that decode nothing. 0.0 when Serve is not
running or has no running SpecPair replica. The trigger's `max_serving_load` and the distillation job's
`only_when_serving_load_below` compare against this number.

Where the figures come from: the replica counts from `serve.status()`; the in-flight requests from the
`ray_serve_replica_processing_queries` gauge (one per replica, labelled with its deployment) that each
node's metrics agent exports for Prometheus and refreshes every few seconds.

What it does not do: decide anything (pipelines/trigger.py and jobs/distill.py do), or start Ray (the
caller connects first). It imports nothing of jobs/ or pipelines/.
"""

from __future__ import annotations

import logging
import re
import urllib.request
from typing import Iterable

logger = logging.getLogger(__name__)

SPEC_PAIR_DEPLOYMENT = "SpecPair"  # the deployment name of serve/spec_pair.py's SpecPair
ONGOING_METRIC = "ray_serve_replica_processing_queries"
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def running_replicas(status, deployment: str = SPEC_PAIR_DEPLOYMENT) -> int:
    """RUNNING replicas of `deployment` over every application of a `serve.status()`."""
    return sum(int(d.replica_states.get("RUNNING", 0)) for app in status.applications.values()
               for name, d in app.deployments.items() if name == deployment)


def ongoing_requests(metrics_texts: Iterable[str], deployment: str = SPEC_PAIR_DEPLOYMENT) -> float:
    """Sum of the processing-queries gauges of `deployment`'s replicas in Prometheus text expositions."""
    total = 0.0
    for text in metrics_texts:
        for line in text.splitlines():
            match = _SAMPLE.match(line)
            if not match or match["name"] != ONGOING_METRIC:
                continue
            labels = dict(_LABEL.findall(match["labels"] or ""))
            if labels.get("deployment") == deployment:
                total += float(match["value"])
    return total


def _metrics_texts(timeout_s: float) -> list[str]:
    import ray

    texts = []
    for node in ray.nodes():
        if not node.get("Alive") or not node.get("MetricsExportPort"):
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                texts.append(response.read().decode("utf-8", errors="replace"))
        except OSError as error:
            logger.warning("serving_load: metrics endpoint %s unreadable (%s)", url, error)
    return texts


def serving_load(*, timeout_s: float = 2.0, deployment: str = SPEC_PAIR_DEPLOYMENT) -> float:
    """Ongoing requests per running SpecPair replica (see the module docstring). Needs a connected Ray."""
    from ray import serve

    try:
        status = serve.status()
    except Exception:  # noqa: BLE001 - Serve not started on this cluster
        return 0.0
    replicas = running_replicas(status, deployment)
    if replicas == 0:
        return 0.0
    return ongoing_requests(_metrics_texts(timeout_s), deployment) / replicas
