"""Served figures over time: per-request rows -> windows, phase summaries, a text table and a plot.

What it does: takes what clients measured per request (dicts with phase, started, finished,
completion_tokens, drafter_version, drafted, accepted, compared, steps, emitted_in_steps, error; see
pipelines/replay.py), in completion order, and pools them with the definitions of docs/design.md ("Vocabulary"):
token acceptance = accepted / compared, acceptance rate = accepted / drafted, mean accepted length =
emitted_in_steps / steps. Throughput is output tokens over wall time between completions, so
concurrent requests are not double-counted. `plot_timeline` draws token acceptance and tokens/s
against requests served, with drafter version changes marked.

What it does not do: send requests, talk to MLflow or Ray (pipelines/demo.py does).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from draftsmith.request_stats import drafter_token_acceptance
from draftsmith.specdec import AcceptanceRates


@dataclasses.dataclass
class Pooled(AcceptanceRates):
    """Counters pooled over some requests, with their throughput."""

    phase: str
    drafter_version: str
    requests: int = 0
    failed: int = 0
    tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    compared: int = 0
    lookup_accepted: int = 0
    lookup_compared: int = 0
    steps: int = 0
    emitted_in_steps: int = 0
    seconds: float = 0.0
    requests_served: int = 0  # cumulative successful requests at the end of this group

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def drafter_token_acceptance(self) -> float:
        return drafter_token_acceptance(self.accepted, self.compared, self.lookup_accepted, self.lookup_compared)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), **self.rates(), "drafter_token_acceptance": self.drafter_token_acceptance,
                "tok_s": self.tok_s}


def _add(group: Pooled, row: Mapping) -> None:
    group.requests += 1
    if row.get("error"):
        group.failed += 1
        return
    group.tokens += int(row.get("completion_tokens", 0))
    for key in ("drafted", "accepted", "compared", "lookup_accepted", "lookup_compared", "steps", "emitted_in_steps"):
        setattr(group, key, getattr(group, key) + int(row.get(key, 0)))


def _version(row: Mapping) -> str:
    return str(row.get("drafter_version") or "none")


def runs(rows: Sequence[Mapping]) -> list[tuple[int, int]]:
    """[start, stop) of every maximal stretch of consecutive rows of one phase. A phase measured in rounds
    (speculation on and off taking turns) has one stretch per round, and only those stretches' wall time is
    its own."""
    out: list[tuple[int, int]] = []
    for i, row in enumerate(rows):
        if out and rows[out[-1][0]]["phase"] == row["phase"]:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def windows(rows: Sequence[Mapping], size: int) -> list[Pooled]:
    """Consecutive groups of at most `size` requests that share a phase and a drafter version.

    A window's seconds run from the previous window's last completion (or the first send of its stretch of
    the phase, see `runs`) to its own last completion.
    """
    if size < 1:
        raise ValueError(f"window size must be >= 1, got {size}")
    out: list[Pooled] = []
    served = 0
    start = last_finished = 0.0
    stretch_start = {a: min(float(r["started"]) for r in rows[a:b]) for a, b in runs(rows)}
    for i, row in enumerate(rows):
        phase, version = str(row["phase"]), _version(row)
        current = out[-1] if out else None
        if current is None or current.phase != phase:
            start = stretch_start[i]
        elif current.drafter_version != version or current.requests >= size:
            start = last_finished
        else:
            start = None  # same window
        if start is not None:
            current = Pooled(phase, version)
            current_start = start
            out.append(current)
        _add(current, row)
        served += 0 if row.get("error") else 1
        last_finished = float(row["finished"])
        current.requests_served = served
        current.seconds = last_finished - current_start
    return out


def phase_summary(rows: Sequence[Mapping], phase: str) -> Pooled:
    """Every request of one phase pooled; seconds from the first send to the last completion of each of its
    stretches (`runs`: one per round when it was measured in rounds), summed."""
    mine = [r for r in rows if r["phase"] == phase]
    last = max((i for i, r in enumerate(rows) if r["phase"] == phase), default=-1)
    versions = sorted({_version(r) for r in mine if not r.get("error")})
    group = Pooled(phase, "+".join(versions) or "none")
    for row in mine:
        _add(group, row)
    group.requests_served = sum(1 for r in rows[: last + 1] if not r.get("error"))
    for a, b in runs(rows):
        if rows[a]["phase"] == phase:
            stretch = rows[a:b]
            group.seconds += max(float(r["finished"]) for r in stretch) - min(float(r["started"]) for r in stretch)
    return group


def format_table(groups: Iterable[Pooled]) -> str:
    """A fixed-width table: one line per group."""
    header = (f"{'phase':<14} {'served':>6} {'drafter':>8} {'requests':>8} {'failed':>6} {'token acc':>9} "
              f"{'drafter acc':>11} {'acc rate':>8} {'mean len':>8} {'tok/s':>7}")
    lines = [header, "-" * len(header)]
    for g in groups:
        lines.append(f"{g.phase:<14} {g.requests_served:>6} {g.drafter_version:>8} {g.requests:>8} {g.failed:>6} "
                     f"{g.token_acceptance:>9.3f} {g.drafter_token_acceptance:>11.3f} {g.acceptance_rate:>8.3f} "
                     f"{g.mean_accepted_length:>8.2f} {g.tok_s:>7.1f}")
    return "\n".join(lines)


def plot_timeline(groups: Sequence[Pooled], path: str | Path, *, title: str = "Draftsmith: served figures") -> Path:
    """PNG: token acceptance and tokens/s against requests served; version changes as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = [g.requests_served for g in groups]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    phases = sorted({g.phase for g in groups}, key=[g.phase for g in groups].index)
    markers = "osD^v"
    for i, phase in enumerate(phases):
        points = [(g.requests_served, g) for g in groups if g.phase == phase]
        xs = [p[0] for p in points]
        top.plot(xs, [p[1].token_acceptance for p in points], marker=markers[i % len(markers)], label=phase)
        bottom.plot(xs, [p[1].tok_s for p in points], marker=markers[i % len(markers)], label=phase)
    for previous, group in zip(groups, groups[1:]):
        if group.drafter_version != previous.drafter_version:
            for axis in (top, bottom):
                axis.axvline(previous.requests_served, color="grey", linestyle="--", linewidth=1)
            top.annotate(f"drafter v{group.drafter_version}", (previous.requests_served, 1.0),
                         xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right", fontsize=8)
    top.set_ylabel("token acceptance (alpha)")
    top.set_ylim(bottom=0)
    bottom.set_ylabel("output tokens/s")
    bottom.set_xlabel("requests served")
    bottom.set_ylim(bottom=0)
    top.legend(loc="upper left", fontsize=8)
    top.set_title(title)
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
    if x:
        bottom.set_xlim(0, max(x) * 1.02 + 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
