"""The replica's Prometheus metrics (`ray.util.metrics`, exported by Ray with the `ray_` prefix).

What it does: defines, once per replica, every metric the SpecPair pieces record: requests, tokens,
acceptance, latency (spec_pair.py), drafter swaps and refusals (drafter_watcher.py), traffic records
resent or undelivered (traffic_sender.py); `inc` records a counter so that a metrics failure never
breaks serving. `infra/grafana/` reads these names.

What it does not do: decide what to record (the pieces do) or export anything itself (Ray does).
"""

from __future__ import annotations

import logging

from ray.util import metrics

logger = logging.getLogger(__name__)


class ReplicaMetrics:
    def __init__(self):
        tags = ("model", "drafter_version")
        self.requests = metrics.Counter("draftsmith_requests", "Completed requests.", tag_keys=tags + ("finish_reason",))
        self.output_tokens = metrics.Counter("draftsmith_output_tokens", "Output tokens.", tag_keys=tags)
        self.drafted = metrics.Counter("draftsmith_drafted_tokens", "Draft tokens proposed.", tag_keys=tags)
        self.accepted = metrics.Counter("draftsmith_accepted_tokens", "Draft tokens accepted.", tag_keys=tags)
        self.ttft = metrics.Histogram("draftsmith_time_to_first_token_seconds", "Time to first token.",
                                      boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
                                      tag_keys=tags)
        self.tpot = metrics.Histogram("draftsmith_time_per_output_token_seconds", "Per-output-token latency.",
                                      boundaries=[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1],
                                      tag_keys=tags)
        self.swaps = metrics.Counter("draftsmith_drafter_swaps", "Drafter hot swaps.", tag_keys=tags)
        self.refused = metrics.Counter("draftsmith_drafters_refused", "Drafters refused.",
                                       tag_keys=("model", "drafter_version", "reason"))
        self.undelivered = metrics.Counter("draftsmith_traffic_records_undelivered", "Traffic records a replica "
                                           "gave up sending (logger unreachable) or released unconfirmed.",
                                           tag_keys=("model", "reason"))
        self.resent = metrics.Counter("draftsmith_traffic_records_resent", "Traffic records sent again because the "
                                      "logger died before writing them.", tag_keys=("model",))

    @staticmethod
    def inc(counter, value: int | float = 1, tags: dict | None = None) -> None:
        """Add to a counter; never raises (metrics must not break serving). Ray's Counter.inc refuses 0."""
        if value <= 0:
            return
        try:
            counter.inc(value, tags=tags)
        except Exception:  # noqa: BLE001
            logger.exception("recording a metric failed")
