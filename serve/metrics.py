"""The replica's Prometheus metrics (`ray.util.metrics`, exported by Ray with the `ray_` prefix).

What it does: defines, once per replica, every metric the SpecPair pieces record: requests, tokens,
acceptance (also per draft position and per draft length), the speculation policy's predicted and measured
speedup and acceptance estimates, latency (spec_pair.py), drafter swaps and refusals (drafter_watcher.py),
traffic records resent or undelivered (traffic_sender.py); `inc` records a counter so that a metrics failure
never breaks serving. `infra/grafana/` reads these names.

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
        # The speculation policy (docs/design.md): acceptance per draft position, the
        # draft lengths chosen, and the policy's own view of what it gains.
        self.position_tried = metrics.Counter("draftsmith_draft_position_tried", "Draft tokens verified at each draft "
                                              "position (1 = the first drafted token), drafter and lookup alike.",
                                              tag_keys=tags + ("position",))
        self.position_accepted = metrics.Counter("draftsmith_draft_position_accepted", "Draft tokens accepted at each "
                                                 "draft position.", tag_keys=tags + ("position",))
        self.draft_length_steps = metrics.Counter("draftsmith_draft_length_steps", "Decoding steps of a request by "
                                                  "the number of tokens drafted for it (0: none).",
                                                  tag_keys=tags + ("length",))
        self.policy_off_steps = metrics.Counter("draftsmith_policy_off_steps", "Steps in which the auto policy "
                                                "drafted nothing for a request.", tag_keys=tags)
        self.predicted_speedup = metrics.Gauge("draftsmith_policy_predicted_speedup", "The speculation policy's "
                                               "predicted tokens/s over autoregressive decoding.", tag_keys=tags)
        self.measured_speedup = metrics.Gauge("draftsmith_policy_measured_speedup", "Tokens/s over autoregressive "
                                              "decoding as the engine measures it from its own step timings.",
                                              tag_keys=tags)
        self.policy_alpha = metrics.Gauge("draftsmith_policy_acceptance_estimate", "The policy's live estimate of the "
                                          "conditional acceptance at each draft position, per proposer.",
                                          tag_keys=("model", "proposer", "position"))
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

    def record_speculation(self, stats, tags: dict) -> None:
        """A finished request's counts per draft position and per draft length (specdec.RequestStats)."""
        for k, (tried, accepted) in enumerate(zip(stats.position_tried, stats.position_accepted), start=1):
            self.inc(self.position_tried, tried, {**tags, "position": str(k)})
            self.inc(self.position_accepted, accepted, {**tags, "position": str(k)})
        for length, steps in stats.draft_length_counts.items():
            self.inc(self.draft_length_steps, steps, {**tags, "length": str(length)})
        self.inc(self.policy_off_steps, stats.policy_off_steps, tags)

    def record_policy(self, snapshot: dict | None, tags: dict) -> None:
        """The policy's snapshot (SpecEngine.policy_snapshot; None when speculation is not `auto`) as gauges."""
        if not snapshot:
            return
        self.predicted_speedup.set(float(snapshot["predicted_speedup"]), tags=tags)
        self.measured_speedup.set(float(snapshot["measured_speedup"]), tags=tags)
        for proposer, alphas in snapshot.get("alphas", {}).items():
            for k, alpha in enumerate(alphas, start=1):
                self.policy_alpha.set(float(alpha), tags={"model": tags["model"], "proposer": proposer,
                                                          "position": str(k)})
