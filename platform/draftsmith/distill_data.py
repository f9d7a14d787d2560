"""Traffic log -> distillation dataset, THE held-out split, and the padded batches training reads.

What it does: selects the records of one target (id, revision, tokenizer fingerprint) in a time window
through `draftsmith.traffic.scan_traffic` (unreadable files are skipped and listed), drops records with
no output, deduplicates identical (prompt ids, output ids) pairs keeping the earliest, sorts by time and
splits with `split_at` (THE held-out rule, used by the distillation job, the evaluation job and the
benchmarks alike): records before a time `heldout_since` train, records at or after it are held out,
except those whose prompt was seen in training (the same prompt ids, or a later turn whose prompt
starts with a training prompt: its context holds that prompt and usually its answer). The job picks
`heldout_since` so that about `heldout_fraction` of the records are held out (`heldout_count`) and
records it on the challenger; evaluation passes that time back, so a challenger is measured on exactly
its own held-out window and never on a prompt it was trained on. Returns both parts as
`datasets.Dataset`s over the Arrow table with the columns training needs, plus stats. `heldout_prompts`
turns the held-out part into distinct prompts, newest first; `collate` turns records or dataset rows
into one right-padded `DistillBatch`.

Recency (`RecencyWindow`, `select_window`): traffic moves, so the job trains on a window of the most
recent training records (the last `window_records`, and/or those within `window_hours` of the newest)
plus a replayed share of older training records, drawn uniformly with a fixed seed, so that a domain
seen only before the window is not forgotten. The window is applied AFTER the split, to its training
side only: the held-out side and its exclusion rule (every record before `heldout_since` counts as
training, a superset of what the window keeps) do not change. With a window, the held-out fraction
is taken of the window's span rather than of the whole log (`recent_scope`), so that a growing log
never pushes the window away from the newest traffic. No window (None limits) is all traffic.

What it does not do: train or evaluate, tokenize text, or touch Ray (the job ships the train part to its
workers with `save_to_disk`). ShareGPT's fixed train / held-out split of a static corpus (by conversation
id) is `datasets_io.sharegpt_split`; this module splits logged traffic, by time.

Positions. The target's top-k logged at output position j is its distribution for output token j,
computed from the sequence up to (and excluding) that token, i.e. at index `prompt_len - 1 + j` of
prompt + output. Batches are right-padded, so causal attention never lets a real position see padding
and no attention mask is needed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from pydantic import BaseModel, ConfigDict, Field

from draftsmith.traffic import scan_traffic

logger = logging.getLogger(__name__)

TRAIN_COLUMNS = (
    "request_id", "created_at", "source", "drafter_version", "temperature",
    "prompt_token_ids", "output_token_ids", "target_topk_ids", "target_topk_logprobs", "accept_mask",
)


# ---------------------------------------------------------------------------------------------- dataset


@dataclasses.dataclass
class DistillData:
    train: "datasets.Dataset"  # noqa: F821
    heldout: "datasets.Dataset"  # noqa: F821
    stats: dict = dataclasses.field(default_factory=dict)


def heldout_count(records: int, heldout_fraction: float) -> int:
    """How many of `records` time-ordered records are held out: the most recent ceil(n * fraction), at
    least one record always left to train on, none when the fraction is 0 or there is one record."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if heldout_fraction == 0 or records <= 1:
        return 0
    return min(math.ceil(records * heldout_fraction), records - 1)


# Polynomial hashes of token-id prefixes (mod a Mersenne prime): a collision can only hold out fewer
# records, never let a training prompt through.
_HASH_MOD = (1 << 61) - 1
_HASH_BASE = 1_000_003


def _prefix_hashes(ids) -> list[tuple[int, int]]:
    """(length, hash) of every non-empty prefix of `ids`, the whole sequence last."""
    h, out = 0, []
    for n, token in enumerate(ids, 1):
        h = (h * _HASH_BASE + int(token) + 1) % _HASH_MOD
        out.append((n, h))
    return out


def split_at(table: pa.Table, heldout_since: dt.datetime | None) -> tuple[pa.Table, pa.Table, int]:
    """THE held-out rule: (train, held out, excluded) of a table of traffic records.

    Train: the records created before `heldout_since`. Held out: those created at or after it, less every
    record whose prompt was seen in training: the same prompt ids (another answer to a training prompt),
    or a prompt that starts with a training prompt (a later turn of a training conversation). `excluded`
    counts those. `heldout_since=None` holds out nothing.
    """
    if heldout_since is None or table.num_rows == 0:
        return table, table.slice(0, 0), 0
    since = pa.scalar(heldout_since, type=table.schema.field("created_at").type)
    later = pc.greater_equal(table["created_at"], since)
    train, after = table.filter(pc.invert(later)), table.filter(later)
    seen = {_prefix_hashes(p)[-1] for p in train["prompt_token_ids"].to_pylist() if p}
    keep = [i for i, prompt in enumerate(after["prompt_token_ids"].to_pylist())
            if not any(key in seen for key in _prefix_hashes(prompt))]
    return train, after.take(pa.array(keep, type=pa.int64())), after.num_rows - len(keep)


def heldout_start(created_at: pa.ChunkedArray | Sequence[dt.datetime], heldout_fraction: float,
                  window: "RecencyWindow | None" = None) -> dt.datetime | None:
    """The `heldout_since` that holds out about `heldout_fraction` of time-sorted records: the time of the
    first of the last `heldout_count` records (records sharing that time are held out with it), moved to
    the next later time when that would leave nothing to train on; None when nothing is held out.

    With a limiting `window` the fraction is of the most recent `recent_scope` records, not of them all."""
    times = created_at.to_pylist() if hasattr(created_at, "to_pylist") else list(created_at)
    n_heldout = heldout_count(recent_scope(times, heldout_fraction, window), heldout_fraction)
    if n_heldout == 0:
        return None
    cut = times[len(times) - n_heldout]
    if cut > times[0]:
        return cut
    later = [t for t in times if t > cut]
    return later[0] if later else None


# ---------------------------------------------------------------------------------------------- recency


class RecencyWindow(BaseModel):
    """Which training records a distillation learns from: a recent window plus a replayed share of older ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_records: int | None = Field(
        2000, ge=1, description="train on at most this many of the most recent training records (before the "
                                "held-out time); unset: no count limit")
    window_hours: float | None = Field(
        None, gt=0, description="train only on records within this many hours of the newest training record; "
                                "unset: no age limit. With both limits set, a record must pass both")
    replay_fraction: float = Field(
        0.25, ge=0, le=1, description="add ceil(this x the window's record count) records drawn uniformly from "
                                      "the training records older than the window (replay), so domains seen "
                                      "only before the window are not forgotten; 0: the window alone")
    replay_seed: int = Field(0, description="seed of the replay draw: the same log and settings replay the "
                                            "same records")

    @property
    def limited(self) -> bool:
        """False when neither limit is set: the window is all traffic (and nothing is older to replay)."""
        return self.window_records is not None or self.window_hours is not None


@dataclasses.dataclass(frozen=True)
class WindowSelection:
    """The records `select_window` chose: positions into its input, in time order, and what they span."""

    indices: list[int]  # window and replay, ascending time (ties: input order)
    window_records: int
    replay_records: int
    pool_records: int  # the training side the selection was made from
    window_start: dt.datetime | None = None
    window_end: dt.datetime | None = None
    replay_start: dt.datetime | None = None
    replay_end: dt.datetime | None = None

    def stats(self) -> dict:
        """The selection as flat, JSON-ready stats (times in ISO format, None when empty)."""
        iso = lambda t: t.isoformat() if t is not None else None  # noqa: E731
        return {"window_pool_records": self.pool_records, "window_records": self.window_records,
                "replay_records": self.replay_records, "window_start": iso(self.window_start),
                "window_end": iso(self.window_end), "replay_start": iso(self.replay_start),
                "replay_end": iso(self.replay_end)}


def _window_size(times: Sequence[dt.datetime], window_records: int | None, window_hours: float | None) -> int:
    """How many of ascending `times` form the most recent window: the last `window_records`, of those within
    `window_hours` of the newest."""
    n = len(times)
    if window_hours is not None and n:
        cutoff = times[-1] - dt.timedelta(hours=window_hours)
        n = sum(1 for t in times if t >= cutoff)
    return n if window_records is None else min(n, window_records)


def recent_scope(times: Sequence[dt.datetime], heldout_fraction: float, window: RecencyWindow | None) -> int:
    """How many of the most recent of ascending `times` the held-out fraction is taken of: all of them without
    a limiting window; with one, about the window plus its held-out share (`window_records / (1 - fraction)`
    records, of those within `window_hours` of the newest), so the window ends where the held-out part starts
    however long the log grows, instead of lagging behind a held-out part of a tenth of all history."""
    n = len(times)
    if window is None or not window.limited or n == 0:
        return n
    records = None if window.window_records is None else math.ceil(window.window_records / (1.0 - heldout_fraction))
    return _window_size(times, records, window.window_hours)


def select_window(created_at: Sequence[dt.datetime], window: RecencyWindow | None) -> WindowSelection:
    """THE recency rule: which of the training side's records (times `created_at`, any order) to train on.

    The window is the most recent `window_records` (ties at the boundary broken by input order), of those
    within `window_hours` of the newest. Replay adds ceil(`replay_fraction` x window size) records, at most
    all of them, drawn uniformly without replacement (numpy, `replay_seed`) from the records older than the
    window only. `window=None` or no limit selects everything and replays nothing. Pure: no I/O.
    """
    n = len(created_at)
    order = sorted(range(n), key=lambda i: created_at[i])  # stable: ties keep input order
    times = [created_at[i] for i in order]
    if window is None or not window.limited:
        n_window, replay = n, []
    else:
        n_window = _window_size(times, window.window_records, window.window_hours)
        older = n - n_window
        # 1e-9: ceil(0.1 * 30) must be 3 even though 0.1 * 30 is 3.0000000000000004 in floating point
        k = min(older, math.ceil(window.replay_fraction * n_window - 1e-9)) if n_window else 0
        replay = sorted(np.random.default_rng(window.replay_seed).choice(older, size=k, replace=False).tolist())
    recent = list(range(n - n_window, n))
    return WindowSelection(
        indices=[order[j] for j in replay + recent], window_records=n_window, replay_records=len(replay),
        pool_records=n,
        window_start=times[recent[0]] if recent else None, window_end=times[recent[-1]] if recent else None,
        replay_start=times[replay[0]] if replay else None, replay_end=times[replay[-1]] if replay else None)


def apply_window(train: pa.Table, window: RecencyWindow | None) -> tuple[pa.Table, WindowSelection]:
    """The rows of a training table (with `created_at`) that `select_window` keeps, in time order."""
    selection = select_window(train["created_at"].to_pylist(), window)
    if selection.indices == list(range(train.num_rows)):
        return train, selection  # everything, already in time order (as build_distill_dataset sorts it)
    return train.take(pa.array(selection.indices, type=pa.int64())), selection


def _dedupe_keys(table: pa.Table) -> list[bytes]:
    keys = []
    for prompt, output in zip(table["prompt_token_ids"].to_numpy(zero_copy_only=False),
                              table["output_token_ids"].to_numpy(zero_copy_only=False)):
        digest = hashlib.blake2b(digest_size=16)
        digest.update(np.asarray(prompt, dtype=np.int32).tobytes())
        digest.update(b"|")
        digest.update(np.asarray(output, dtype=np.int32).tobytes())
        keys.append(digest.digest())
    return keys


def _token_count(table: pa.Table, column: str) -> int:
    if table.num_rows == 0:
        return 0
    return int(pc.sum(pc.list_value_length(table[column])).as_py() or 0)


def _value_counts(column: pa.ChunkedArray) -> tuple[list, list]:
    if len(column) == 0:
        return [], []
    counts = pc.value_counts(column).flatten()
    return counts[0].to_pylist(), counts[1].to_pylist()


def build_distill_dataset(
    traffic_uri: str,
    *,
    target_id: str,
    target_revision: str,
    tokenizer_hash: str,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    heldout_fraction: float = 0.1,
    sources: tuple[str, ...] | None = None,
    heldout_since: dt.datetime | None = None,
    window: RecencyWindow | None = None,
) -> DistillData:
    """The train / held-out datasets of one target's traffic in [since, until), and their stats.

    The split is `split_at(heldout_since)`; without `heldout_since` the time is chosen to hold out the
    most recent `heldout_fraction` (`heldout_start`, of the window's span when `window` limits it).
    `window` then narrows the training side to a recent window plus replay (`select_window`; its figures
    are in the stats); None trains on the whole training side. `sources` restricts to record sources
    ("served", "backfill"); None keeps both.
    """
    import datasets

    heldout_count(0, heldout_fraction)  # validates the fraction before any I/O
    scan = scan_traffic(traffic_uri, since=since, until=until, target_id=target_id,
                        target_revision=target_revision, tokenizer_hash=tokenizer_hash)
    table = scan.table
    scanned = table.num_rows
    if sources is not None and table.num_rows:
        table = table.filter(pc.is_in(table["source"], pa.array(list(sources))))
    table = table.filter(pc.greater(pc.list_value_length(table["output_token_ids"]), 0)) if table.num_rows else table
    empty_outputs = scanned - table.num_rows if sources is None else None
    # Earliest first (ties by request id) so that dedupe keeps the earliest and the split is by time.
    table = table.sort_by([("created_at", "ascending"), ("request_id", "ascending")])
    seen: set[bytes] = set()
    keep = []
    for i, key in enumerate(_dedupe_keys(table)):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    duplicates = table.num_rows - len(keep)
    table = table.take(pa.array(keep, type=pa.int64())) if duplicates else table
    n = table.num_rows
    if heldout_since is None:
        heldout_since = heldout_start(table["created_at"], heldout_fraction, window)
    train_table, heldout_table, excluded = split_at(table.select(list(TRAIN_COLUMNS)), heldout_since)
    # After the split: the held-out side and its exclusions never depend on the window.
    train_table, selection = apply_window(train_table, window)
    created = table["created_at"]
    stats = {
        "records_scanned": scanned,
        "records": n,
        "duplicates": duplicates,
        "train_records": train_table.num_rows,
        "heldout_records": heldout_table.num_rows,
        "prompt_tokens": _token_count(table, "prompt_token_ids"),
        "output_tokens": _token_count(table, "output_token_ids"),
        "train_prompt_tokens": _token_count(train_table, "prompt_token_ids"),
        "train_output_tokens": _token_count(train_table, "output_token_ids"),
        "heldout_output_tokens": _token_count(heldout_table, "output_token_ids"),
        "sources": {s: int(c) for s, c in zip(*_value_counts(table["source"]))},
        "files_read": scan.files_read,
        "skipped_files": [{"path": p, "reason": r} for p, r in scan.skipped],
        "first_record_at": created[0].as_py().isoformat() if n else None,
        "last_record_at": created[n - 1].as_py().isoformat() if n else None,
        "heldout_since": heldout_since.isoformat() if heldout_since is not None else None,
        "heldout_excluded": excluded,  # held-out window records whose prompt was seen in training
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
        **selection.stats(),
    }
    if empty_outputs:
        stats["empty_outputs"] = empty_outputs
    if scan.skipped:
        logger.warning("distill dataset: skipped %d unreadable traffic files", len(scan.skipped))
    logger.info("distill dataset: %d records (%d duplicates dropped): %d train, %d held-out (%d left out: prompt "
                "seen in training), %d output tokens", n, duplicates, stats["train_records"],
                stats["heldout_records"], excluded, stats["output_tokens"])
    if selection.window_records < selection.pool_records:
        logger.info("distill dataset: window of the %d most recent of %d training records (%s .. %s) + %d "
                    "replayed (%s .. %s)", selection.window_records, selection.pool_records,
                    stats["window_start"], stats["window_end"], selection.replay_records, stats["replay_start"],
                    stats["replay_end"])
    return DistillData(train=datasets.Dataset(train_table.combine_chunks()),
                       heldout=datasets.Dataset(heldout_table.combine_chunks()), stats=stats)


def heldout_prompts(heldout, *, n: int, max_prompt_tokens: int) -> list[list[int]]:
    """Up to `n` distinct prompts of a held-out dataset, newest first, each cut to its last tokens."""
    seen, out = set(), []
    for ids in reversed(heldout["prompt_token_ids"]):
        key = tuple(ids)
        if ids and key not in seen:
            seen.add(key)
            out.append(list(ids[-max_prompt_tokens:]))
        if len(out) >= n:
            break
    return out


def rows(dataset, indices: Sequence[int]) -> list[dict]:
    """Rows `indices` of a column-oriented dataset (`datasets.Dataset`) as one dict per record."""
    columns = dataset[list(indices)]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


# ---------------------------------------------------------------------------------------------- batches


@dataclasses.dataclass
class DistillBatch:
    """Padded tensors for B records with at most T output positions and teacher top-k of width k."""

    input_ids: torch.Tensor  # [B, L] prompt + output[:-1], right-padded with pad_id
    pred_positions: torch.Tensor  # [B, T] index into L of the logits that predict output token t
    output_ids: torch.Tensor  # [B, T] the output tokens (padding: 0)
    topk_ids: torch.Tensor  # [B, T, k] target top-k ids (padding: 0)
    topk_logprobs: torch.Tensor  # [B, T, k] target log-probs (padding: log(1/k))
    mask: torch.Tensor  # [B, T] bool, True = a real output position
    accept_mask: torch.Tensor  # [B, T] bool, the logged accept flags (informational)

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    @property
    def input_lengths(self) -> torch.Tensor:
        """[B] real (unpadded) length of each row of input_ids: its last predicting position + 1."""
        return (self.pred_positions * self.mask).amax(1) + 1

    def to(self, device: torch.device | str) -> "DistillBatch":
        return DistillBatch(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def _field(record: Any, name: str):
    return record[name] if isinstance(record, Mapping) else getattr(record, name)


def collate(records: Sequence[Any], *, max_seq_len: int = 512, pad_id: int = 0) -> DistillBatch:
    """Records (TrafficRecord or dataset rows with the traffic columns) -> one padded DistillBatch.

    Records with no output token or no prompt are skipped. A record longer than `max_seq_len` keeps
    at most half the budget for its prompt tail when the output needs the rest, then the output head.
    """
    kept = []
    for rec in records:
        prompt = list(_field(rec, "prompt_token_ids"))
        output = list(_field(rec, "output_token_ids"))
        if not prompt or not output:
            continue
        n_out = min(len(output), max_seq_len - min(len(prompt), max_seq_len // 2))
        n_prompt = min(len(prompt), max_seq_len - n_out)
        prompt = prompt[len(prompt) - n_prompt:]
        kept.append((prompt, output[:n_out], _field(rec, "target_topk_ids")[:n_out],
                     _field(rec, "target_topk_logprobs")[:n_out], list(_field(rec, "accept_mask"))[:n_out]))
    if not kept:
        raise ValueError("collate got no record with both prompt and output tokens")
    k = max(len(r[2][0]) for r in kept)
    if k == 0 or any(len(ids) != k for r in kept for ids in r[2]):
        raise ValueError("records disagree on the teacher top-k width (or it is 0): log with one topk_logprobs")
    b = len(kept)
    seq_len = max(len(p) + len(o) - 1 for p, o, *_ in kept)
    t = max(len(o) for _, o, *_ in kept)
    input_ids = torch.full((b, seq_len), pad_id, dtype=torch.long)
    pred_positions = torch.zeros(b, t, dtype=torch.long)
    output_ids = torch.zeros(b, t, dtype=torch.long)
    topk_ids = torch.zeros(b, t, k, dtype=torch.long)
    topk_logprobs = torch.full((b, t, k), -math.log(k), dtype=torch.float32)
    mask = torch.zeros(b, t, dtype=torch.bool)
    accept = torch.zeros(b, t, dtype=torch.bool)
    for i, (prompt, output, ids, logprobs, acc) in enumerate(kept):
        seq = prompt + output[:-1]
        n = len(output)
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        pred_positions[i, :n] = torch.arange(len(prompt) - 1, len(prompt) - 1 + n)
        output_ids[i, :n] = torch.tensor(output, dtype=torch.long)
        topk_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
        topk_logprobs[i, :n] = torch.tensor(logprobs, dtype=torch.float32)
        mask[i, :n] = True
        accept[i, : len(acc)] = torch.tensor(acc, dtype=torch.bool)
    return DistillBatch(input_ids, pred_positions, output_ids, topk_ids, topk_logprobs, mask, accept)
