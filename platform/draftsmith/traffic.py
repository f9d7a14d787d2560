"""The traffic log: one Parquet row per completed request, partitioned by hour.

What it does: defines the log's schema (`TRAFFIC_SCHEMA`) and its row type
(`TrafficRecord`); writes buffered records as Parquet files under
`<root>/date=YYYY-MM-DD/hour=HH/`, each written under a hidden temporary name
and renamed when complete, so a reader never sees half a file; fingerprints
tokenizers so records made with different vocabularies are never mixed.
Reading back with filters (skipping corrupt or truncated files) and deleting old
date partitions live in `traffic_reader.py`; their names are importable from here.
A record may carry the target's features (`TrafficRecord.features`, serve's
`traffic.log_features`): they are not a column but a side file beside the part,
written through `draftsmith.traffic_features` before the part itself and named in
the part's footer, so retention (which deletes whole date partitions) removes them
with their records.

What it does not do: no Ray (the Serve logger in `serve/` and the pipelines in
`pipelines/` wrap this), no deduplication or train/held-out split (see
`draftsmith.distill_data`), no schema migration beyond casting to `TRAFFIC_SCHEMA` (nullable
columns an older file lacks read as nulls).

`uri` is anything `pyarrow.fs.FileSystem.from_uri` accepts: a local path,
`file://`, `s3://`, `gs://`... or pass `filesystem=` explicitly.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import re
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from draftsmith.tokenization import tokenizer_fingerprint  # noqa: F401  (re-exported: records carry it)

logger = logging.getLogger(__name__)

UTC = dt.timezone.utc

TRAFFIC_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("target_id", pa.string(), nullable=False),
        pa.field("target_revision", pa.string(), nullable=False),
        pa.field("tokenizer_hash", pa.string(), nullable=False),
        pa.field("drafter_version", pa.string(), nullable=False),
        pa.field("temperature", pa.float32(), nullable=False),
        pa.field("top_p", pa.float32(), nullable=False),
        pa.field("top_k", pa.int32(), nullable=False),
        pa.field("max_tokens", pa.int32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=True),
        pa.field("num_speculative_tokens", pa.int32(), nullable=False),
        pa.field("prompt_token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("output_token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("target_topk_ids", pa.list_(pa.list_(pa.int32())), nullable=False),  # [n_out][k]
        pa.field("target_topk_logprobs", pa.list_(pa.list_(pa.float32())), nullable=False),  # [n_out][k]
        pa.field("accept_mask", pa.list_(pa.bool_()), nullable=False),  # [n_out]
        pa.field("drafted", pa.int32(), nullable=False),
        pa.field("accepted", pa.int32(), nullable=False),
        pa.field("compared", pa.int32(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("prompt_text", pa.string(), nullable=True),
        pa.field("output_text", pa.string(), nullable=True),
        pa.field("user", pa.string(), nullable=True),
        # What the engine really did for the request (the speculation policy may change it every step).
        # Nullable and last: files written before these columns existed read with nulls here.
        pa.field("verify_steps", pa.int32(), nullable=True),  # target verification steps (decode steps)
        pa.field("policy_off_steps", pa.int32(), nullable=True),  # of those, steps drafting nothing for it
        pa.field("proposer", pa.string(), nullable=True),  # who drafted: drafter | lookup | drafter+lookup | none
        pa.field("lookup_drafted", pa.int32(), nullable=True),  # of `drafted`, tokens prompt lookup proposed
        pa.field("lookup_accepted", pa.int32(), nullable=True),  # of `accepted`, tokens prompt lookup proposed
        pa.field("lookup_compared", pa.int32(), nullable=True),  # of `compared`, positions prompt lookup proposed
    ]
)

SOURCES = ("served", "backfill")
FINISH_REASONS = ("stop", "length", "abort")


@dataclass(frozen=True, kw_only=True)
class TrafficRecord:
    """One completed request, as logged. Field order and types follow `TRAFFIC_SCHEMA`.

    Per-position fields (`target_topk_ids`, `target_topk_logprobs`, `accept_mask`)
    have one entry per output token; `created_at` must be timezone-aware.
    `num_speculative_tokens` is the speculation length of the request; `drafted`,
    `verify_steps`, `policy_off_steps`, `proposer` and `lookup_*` say what was really
    done (None: not recorded, e.g. a backfilled record or an older log).

    `features` is not a column: the target's final-normed hidden state at every position
    of prompt + output but the last (a float16 numpy array [prompt + output - 1, hidden]),
    written to the part's side file (draftsmith.traffic_features) when present, never read
    back into a record; records compare equal without it.
    """

    request_id: str
    created_at: dt.datetime
    source: str = "served"
    target_id: str
    target_revision: str
    tokenizer_hash: str
    drafter_version: str = ""
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int
    seed: int | None = None
    num_speculative_tokens: int = 0
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    target_topk_ids: list[list[int]]  # [n_out][k]
    target_topk_logprobs: list[list[float]]  # [n_out][k]
    accept_mask: list[bool]  # [n_out]
    drafted: int = 0
    accepted: int = 0
    compared: int = 0
    finish_reason: str
    prompt_text: str | None = None
    output_text: str | None = None
    user: str | None = None
    verify_steps: int | None = None
    policy_off_steps: int | None = None
    proposer: str | None = None
    lookup_drafted: int | None = None
    lookup_accepted: int | None = None
    lookup_compared: int | None = None
    features: Any = field(default=None, compare=False, repr=False)  # [prompt + output - 1, hidden] float16

    def __post_init__(self) -> None:
        if self.created_at.tzinfo is None:
            raise ValueError(
                f"TrafficRecord {self.request_id}: created_at must be timezone-aware "
                "(use datetime.now(timezone.utc))"
            )
        if self.source not in SOURCES:
            raise ValueError(f"TrafficRecord {self.request_id}: source {self.source!r} not in {SOURCES}")
        n_out = len(self.output_token_ids)
        for name in ("target_topk_ids", "target_topk_logprobs", "accept_mask"):
            if len(getattr(self, name)) != n_out:
                raise ValueError(
                    f"TrafficRecord {self.request_id}: {name} has {len(getattr(self, name))} entries, "
                    f"expected one per output token ({n_out})"
                )
        if self.features is not None:
            shape = getattr(self.features, "shape", None)
            positions = len(self.prompt_token_ids) + n_out - 1
            if shape is None or len(shape) != 2 or shape[0] != positions:
                raise ValueError(
                    f"TrafficRecord {self.request_id}: features of shape {shape}, expected one row per "
                    f"position of prompt + output but the last ({positions})"
                )

    def to_row(self) -> dict:
        """A dict with one key per schema column (what `pa.Table.from_pylist` takes)."""
        return {name: getattr(self, name) for name in TRAFFIC_SCHEMA.names}

    @classmethod
    def from_row(cls, row: dict) -> TrafficRecord:
        """The inverse of `to_row`; extra keys (e.g. partition columns) are ignored."""
        return cls(**{f.name: row[f.name] for f in dataclasses.fields(cls) if f.name in row})


Redactor = Callable[[TrafficRecord], TrafficRecord]
"""A hook applied to each record before it is logged (e.g. `drop_text`)."""


def drop_text(record: TrafficRecord) -> TrafficRecord:
    """Redactor that keeps token ids but drops the request and response text. The features stay: they
    are a function of the token ids, which are kept."""
    return dataclasses.replace(record, prompt_text=None, output_text=None)


def drop_features(record: TrafficRecord) -> TrafficRecord:
    """The record without its features (the same object when it has none, or is not a TrafficRecord: a sender
    may hold other record-like objects)."""
    return record if getattr(record, "features", None) is None else dataclasses.replace(record, features=None)


# ---------------------------------------------------------------------------------------------
# filesystem helpers


def resolve_uri(
    uri: str | os.PathLike, filesystem: pafs.FileSystem | None = None
) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path) for a URI or local path; relative local paths are made absolute."""
    uri = os.fspath(uri)
    if filesystem is not None:
        return filesystem, uri.rstrip("/")
    if "://" not in uri:
        uri = os.path.abspath(uri)
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


def _hidden(rel_path: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel_path.split("/"))


_PARTITION = re.compile(r"date=(\d{4}-\d{2}-\d{2})/hour=(\d{2})/")


def _partition_hour(rel_path: str) -> dt.datetime | None:
    m = _PARTITION.match(rel_path)
    if m is None:
        return None
    return dt.datetime.strptime(f"{m[1]} {m[2]}", "%Y-%m-%d %H").replace(tzinfo=UTC)


def _partition_dir(created_at: dt.datetime) -> str:
    t = created_at.astimezone(UTC)
    return f"date={t:%Y-%m-%d}/hour={t:%H}"


# ---------------------------------------------------------------------------------------------
# writing

# UnicodeEncodeError: a str holding a lone surrogate (which JSON's \ud800 escape can produce) cannot be
# written as Arrow UTF-8; without it here one such record would fail every flush and stall the whole log.
_CONVERSION_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError, UnicodeEncodeError)


def _validated_table(rows: list[dict]) -> pa.Table:
    table = pa.Table.from_pylist(rows, schema=TRAFFIC_SCHEMA)
    table.validate(full=True)
    for name in TRAFFIC_SCHEMA.names:  # from_pylist does not enforce non-nullable fields
        if not TRAFFIC_SCHEMA.field(name).nullable and table[name].null_count:
            raise pa.ArrowInvalid(f"column {name!r} is required but is None")
    return table


class TrafficWriter:
    """Buffers `TrafficRecord`s and writes them as hour-partitioned Parquet files.

    A flush writes one file per (date, hour) partition present in the buffer, named
    `part-<UTC timestamp>-<uuid>.parquet`; each is written as `.part-....parquet.tmp`
    in the same directory and renamed when complete. `add` flushes by itself once
    `flush_every_records` are buffered or `flush_every_seconds` have passed since the
    last flush (measured with `clock`, injectable for tests). Thread-safe.

    Records that carry `features` get them written to the part's side file
    (`<part>.features.arrow`, draftsmith.traffic_features), renamed into place before the
    part, whose footer then names it. A side file that cannot be written costs the
    features only: it is logged and counted (`features_failed`), and the part is written
    without it, so no record is ever lost for its features.
    """

    def __init__(
        self,
        uri: str | os.PathLike,
        *,
        flush_every_records: int = 256,
        flush_every_seconds: float = 30.0,
        filesystem: pafs.FileSystem | None = None,
        clock: Callable[[], float] = time.monotonic,
        compression: str = "zstd",
    ) -> None:
        if flush_every_records < 1 or flush_every_seconds <= 0:
            raise ValueError("flush_every_records must be >= 1 and flush_every_seconds > 0")
        self.fs, self.root = resolve_uri(uri, filesystem)
        self.flush_every_records = flush_every_records
        self.flush_every_seconds = flush_every_seconds
        self.compression = compression
        self._clock = clock
        self._last_flush = clock()
        self._buffer: list[TrafficRecord] = []
        self._being_written = 0  # records a flush has taken from the buffer and not finished writing
        self._lock = threading.Lock()  # guards the buffer and counters
        self._flush_lock = threading.Lock()  # one flush at a time (durable_through relies on it)
        self._closed = False
        self.records_written = 0
        self.files_written = 0
        self.records_dropped = 0
        self.features_written = 0  # records whose features went to a side file
        self.features_bytes = 0  # bytes of those side files
        self.features_failed = 0  # records whose features could not be written (the records were)
        # Durability bookkeeping for callers that acknowledge records only once they are on storage
        # (the Serve logger): every record added gets the next sequence number, and after a flush that
        # wrote all it took every record numbered <= `durable_through` is written (or dropped as not
        # fitting the schema, which no retry would fix).
        self.records_added = 0
        self.durable_through = 0

    @property
    def records_buffered(self) -> int:
        """Records added and not yet written (those a flush is writing right now included)."""
        return len(self._buffer) + self._being_written

    @property
    def seconds_since_flush(self) -> float:
        return self._clock() - self._last_flush

    def add(self, record: TrafficRecord) -> int:
        """Buffer one record; returns the number of records flushed as a result (usually 0)."""
        self.buffer([record])
        return self.maybe_flush()

    def buffer(self, records: list[TrafficRecord]) -> None:
        """Buffer `records` without writing anything (cheap, never fails on storage); a later
        `maybe_flush` or `flush` writes them. All are buffered even if that flush then fails."""
        if self._closed:
            raise RuntimeError(f"TrafficWriter for {self.root} is closed")
        with self._lock:
            self._buffer.extend(records)
            self.records_added += len(records)

    def maybe_flush(self) -> int:
        """Flush if the record count or the time since the last flush reached its threshold."""
        n = len(self._buffer)
        due = n >= self.flush_every_records or (
            n > 0 and self._clock() - self._last_flush >= self.flush_every_seconds
        )
        return self.flush() if due else 0

    def flush(self) -> int:
        """Write every buffered record now; returns how many were written.

        If a write fails, the records of the partitions not yet written stay
        buffered and the error propagates.
        """
        with self._flush_lock:
            with self._lock:  # held only to take the buffer: adds go on while the files are written
                taken, self._buffer = self._buffer, []
                added = self.records_added
                self._being_written = len(taken)
            groups: dict[str, list[TrafficRecord]] = defaultdict(list)
            for rec in taken:
                groups[_partition_dir(rec.created_at)].append(rec)
            written = 0
            try:
                for part, records in sorted(groups.items()):
                    written += self._write_file(part, records)
                    del groups[part]
            finally:
                unwritten = [r for recs in groups.values() for r in recs]
                with self._lock:
                    self._buffer[:0] = unwritten  # older than anything added meanwhile
                    self._being_written = 0
                    self.records_written += written
                    self._last_flush = self._clock()
                # Flushes are serialized: every record numbered <= `added` was in `taken` or written before.
                if not unwritten:
                    self.durable_through = added
            return written

    def _to_table(self, records: list[TrafficRecord]) -> pa.Table:
        """Records as a table; a record that does not fit the schema is dropped with an error
        (one bad record must not block the log)."""
        try:
            return _validated_table([r.to_row() for r in records])
        except _CONVERSION_ERRORS:
            pass
        good = []
        for r in records:
            try:
                _validated_table([r.to_row()])
                good.append(r.to_row())
            except _CONVERSION_ERRORS as e:
                self.records_dropped += 1
                logger.error("dropping traffic record %s: does not fit TRAFFIC_SCHEMA (%s)", r.request_id, e)
        return _validated_table(good)

    def _write_file(self, part: str, records: list[TrafficRecord]) -> int:
        table = self._to_table(records)
        if table.num_rows == 0:
            return 0
        directory = f"{self.root}/{part}"
        stamp = dt.datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"part-{stamp}-{uuid.uuid4().hex}.parquet"
        tmp, final = f"{directory}/.{name}.tmp", f"{directory}/{name}"
        self.fs.create_dir(directory, recursive=True)
        side = self._write_features(directory, name, table, records)
        if side is not None:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **side[1]})
        try:
            with self.fs.open_output_stream(tmp) as out:
                pq.write_table(table, out, compression=self.compression)
            self.fs.move(tmp, final)
        except BaseException:
            for path in (tmp, *(side[:1] if side else ())):  # a side file without its part is removed with it
                try:
                    self.fs.delete_file(path)
                except (OSError, FileNotFoundError):
                    pass
            raise
        self.files_written += 1
        logger.debug("wrote %d traffic records to %s", table.num_rows, final)
        return table.num_rows

    def _write_features(self, directory: str, name: str, table: pa.Table,
                        records: list[TrafficRecord]) -> tuple[str, dict[bytes, bytes]] | None:
        """Write the side file of the records in `table` that carry features; (its path, the part footer's
        metadata naming it), or None when there is none or it failed (the part is written without it)."""
        from draftsmith import traffic_features

        kept = set(table["request_id"].to_pylist())
        with_features = [r for r in records if r.features is not None and r.request_id in kept]
        if not with_features:
            return None
        try:
            path, size, metadata = traffic_features.write_side_file(self.fs, directory, name, with_features)
        except Exception as e:  # noqa: BLE001  the features are an optimization; the records must be written
            self.features_failed += len(with_features)
            logger.error("could not write the features of %d traffic records beside %s/%s (%s: %s); the records "
                         "are written without them and training recomputes them", len(with_features), directory,
                         name, type(e).__name__, e)
            return None
        self.features_written += len(with_features)
        self.features_bytes += size
        return path, metadata

    def close(self) -> None:
        """Flush what is buffered; later `add` calls raise."""
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> TrafficWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# reading and retention live in traffic_reader.py; their names stay importable from here

_READER_NAMES = ("TrafficScan", "scan_traffic", "read_traffic", "read_traffic_table", "apply_retention")


def __getattr__(name: str):
    # Imported on first use: traffic_reader imports this module, so a top-level import would be circular.
    if name in _READER_NAMES:
        from draftsmith import traffic_reader

        return getattr(traffic_reader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
