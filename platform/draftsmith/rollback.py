"""Served token acceptance, like with like, and the automatic rollback rule.

What it does: turns traffic-log rows into served speculation counters per drafter version and per
evaluation setting (`served_counts`), builds the figure a drafter should reach at the mix of settings
it really served (`expected_token_acceptance`, from served or evaluated per-setting figures), and
decides whether a newly promoted drafter must be rolled back (`decide_rollback`, pure).

Like with like. Served and evaluated figures are both TOKEN ACCEPTANCE (accepted / compared draft
tokens, docs/design.md's vocabulary), pooled over requests, counted at what the engine really drafted:
a traffic record's `drafted` / `accepted` / `compared` are what the speculation policy did for that
request (drafter and prompt lookup together, as evaluation counts them under the same EngineConfig).
A request the policy never let speculate (`compared` = 0: policy-off steps, or a batch served
autoregressively) says nothing about the drafter: it counts as a request but neither as an accepted
nor as a rejected token, never as zero acceptance. Records are grouped by the setting evaluation
measures at (`setting_label`: `greedy`, or a temperature label such as `sampled` for temperature 1
at top_p 1 and top_k 0, the same labels as `evaluation.temperature_label`, so the evaluated metric is
`heldout_token_acceptance_<label>`); records at any other sampling setting have no evaluated
counterpart and are left out. A reference figure is then the per-setting figures weighted by the
compared tokens the served drafter had at each setting, so a change in the greedy/sampled mix of
traffic does not read as a change of the drafter.

The rule (`decide_rollback`). A promotion is on probation until the new version has served
`min_requests` requests that speculated (at a setting with a reference). Then, once: if its served
token acceptance is below the reference by MORE than `margin` (absolute), roll back; otherwise it is
kept and the probation ends. The reference is the previous champion's own served token acceptance
at each setting before the promotion, where it served at least `min_requests` speculating requests
at that setting, else its evaluated figure at that setting. Before `min_requests`: wait.

What it does not do: read files or the registry (pipelines/trigger.py does, and moves the alias
through `DrafterRegistry.rollback`), or decide when to distill (the trigger's `decide_from`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import pyarrow as pa
import pyarrow.compute as pc

GREEDY = "greedy"
EVALUATED_METRIC = "heldout_token_acceptance_{label}"


def setting_label(temperature: float, top_p: float = 1.0, top_k: int = 0) -> str | None:
    """The evaluation setting a served request corresponds to, or None when evaluation has no such setting.

    Greedy ignores top_p/top_k; sampling matches evaluation only at top_p 1 and top_k 0 (evaluation samples
    from the full distribution). Labels follow `evaluation.temperature_label`."""
    if temperature == 0:
        return GREEDY
    if top_p != 1.0 or top_k != 0:
        return None
    return "sampled" if temperature == 1 else f"t{temperature:g}"


@dataclasses.dataclass(frozen=True)
class ServedCounts:
    """Pooled speculation counters of served requests (one version, one setting, or summed)."""

    requests: int = 0  # served requests, speculating or not
    speculated: int = 0  # of those, requests with at least one compared draft token
    drafted: int = 0
    accepted: int = 0
    compared: int = 0

    def __add__(self, other: ServedCounts) -> ServedCounts:
        return ServedCounts(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    @property
    def token_acceptance(self) -> float | None:
        """accepted / compared; None when nothing was compared (no speculation: no reading, not zero)."""
        return self.accepted / self.compared if self.compared else None


def total(counts: Mapping[str, ServedCounts]) -> ServedCounts:
    out = ServedCounts()
    for c in counts.values():
        out = out + c
    return out


# The traffic columns `served_counts` reads (a caller scanning the log reads only these).
SERVED_COUNT_COLUMNS = ["source", "drafter_version", "temperature", "top_p", "top_k", "drafted", "accepted", "compared"]


def served_counts(table: pa.Table) -> dict[tuple[str, str], ServedCounts]:
    """Served rows of a traffic table (TRAFFIC_SCHEMA) summed per (drafter_version, setting label).

    Backfilled rows and rows at a setting evaluation does not measure (`setting_label` None) are left out."""
    table = table.filter(pc.equal(table["source"], "served"))
    if table.num_rows == 0:
        return {}
    keys = ["drafter_version", "temperature", "top_p", "top_k"]
    slim = table.select([*keys, "drafted", "accepted", "compared"]).append_column(
        "speculated", pc.cast(pc.greater(table["compared"], 0), pa.int64()))
    grouped = slim.group_by(keys).aggregate([
        ("drafted", "sum"), ("accepted", "sum"), ("compared", "sum"), ("speculated", "sum"), ("drafted", "count"),
    ])
    out: dict[tuple[str, str], ServedCounts] = {}
    for row in grouped.to_pylist():
        label = setting_label(row["temperature"], row["top_p"], row["top_k"])
        if label is None:
            continue
        key = (row["drafter_version"], label)
        out[key] = out.get(key, ServedCounts()) + ServedCounts(
            requests=int(row["drafted_count"]), speculated=int(row["speculated_sum"]),
            drafted=int(row["drafted_sum"]), accepted=int(row["accepted_sum"]), compared=int(row["compared_sum"]))
    return out


def of_version(counts: Mapping[tuple[str, str], ServedCounts], version: str,
               settings: tuple[str, ...] | None = None) -> dict[str, ServedCounts]:
    """One version's counts by setting (only `settings` when given)."""
    return {s: c for (v, s), c in counts.items() if v == version and (settings is None or s in settings)}


def evaluated_figures(metrics: Mapping[str, float]) -> dict[str, float]:
    """A version's evaluated token acceptance per setting, from its run metrics
    (`heldout_token_acceptance_<label>`, logged by jobs/evaluate through `EvalReport.flat_metrics`)."""
    prefix, _ = EVALUATED_METRIC.split("{label}")
    return {k[len(prefix):]: float(v) for k, v in metrics.items() if k.startswith(prefix) and k != prefix}


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A served figure against the reference at the same settings, over the settings both have."""

    served: ServedCounts  # summed over the compared settings
    reference: float | None  # None: no setting has both a served reading and a reference
    sources: dict[str, str]  # setting -> where its reference came from

    @property
    def token_acceptance(self) -> float | None:
        return self.served.token_acceptance

    def describe_reference(self) -> str:
        return ", ".join(f"{s}: {src}" for s, src in sorted(self.sources.items())) or "none"


def expected_token_acceptance(served: Mapping[str, ServedCounts], *,
                              reference_served: Mapping[str, ServedCounts] | None = None,
                              reference_evaluated: Mapping[str, float] | None = None,
                              min_reference_requests: int = 1) -> Comparison:
    """Compare `served` (by setting) with a reference drafter at the same settings and the same mix.

    Per setting, the reference is `reference_served`'s token acceptance when it served at least
    `min_reference_requests` speculating requests there, else `reference_evaluated`'s figure; settings with
    neither (or where `served` compared nothing) are left out on both sides. The reference figure is weighted
    by the compared tokens `served` had at each setting."""
    reference_served = reference_served or {}
    reference_evaluated = reference_evaluated or {}
    kept, weighted, sources = ServedCounts(), 0.0, {}
    for setting, counts in served.items():
        if not counts.compared:
            continue
        ref = reference_served.get(setting)
        if ref is not None and ref.speculated >= min_reference_requests and ref.token_acceptance is not None:
            value, source = ref.token_acceptance, f"served {ref.token_acceptance:.3f} over {ref.speculated} requests"
        elif setting in reference_evaluated:
            value = reference_evaluated[setting]
            source = f"evaluated {value:.3f}"
        else:
            continue
        kept = kept + counts
        weighted += counts.compared * value
        sources[setting] = source
    return Comparison(kept, weighted / kept.compared if kept.compared else None, sources)


@dataclasses.dataclass(frozen=True)
class RollbackDecision:
    """`verdict`: `rollback`, `keep` (probation passed) or `wait` (not enough requests yet)."""

    verdict: str
    reason: str
    version: str
    previous: str
    token_acceptance: float | None = None
    reference: float | None = None
    requests: int = 0

    @property
    def rollback(self) -> bool:
        return self.verdict == "rollback"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def decide_rollback(version: str, previous: str, comparison: Comparison, *, margin: float,
                    min_requests: int) -> RollbackDecision:
    """The rule of the module docstring, over a `Comparison` of the new version with the previous champion."""
    n = comparison.served.speculated
    mine, ref = comparison.token_acceptance, comparison.reference
    common = dict(version=version, previous=previous, token_acceptance=mine, reference=ref, requests=n)
    if ref is None or mine is None:
        return RollbackDecision("wait", f"v{version}: no served token acceptance at a setting v{previous} has a "
                                        f"figure for yet ({n} speculating requests)", **common)
    if n < min_requests:
        return RollbackDecision("wait", f"v{version}: {n} speculating requests since its promotion "
                                        f"(< {min_requests}); token acceptance so far {mine:.3f} vs "
                                        f"v{previous}'s {ref:.3f}", **common)
    figures = (f"served token acceptance {mine:.3f} over {n} speculating requests since its promotion vs "
               f"v{previous}'s {ref:.3f} at the same settings ({comparison.describe_reference()})")
    if ref - mine > margin + 1e-9:  # "more than the margin": float noise at exactly the margin is not more
        return RollbackDecision("rollback", f"v{version}: {figures}: below by {ref - mine:.3f} > margin "
                                            f"{margin:g}; back to v{previous}", **common)
    return RollbackDecision("keep", f"v{version}: {figures}: within margin {margin:g}; probation passed",
                            **common)
