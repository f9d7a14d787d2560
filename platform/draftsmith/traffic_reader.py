"""The traffic log's reading side: scan, iterate and expire the Parquet files that traffic.py writes.

What it does: reads every complete file under a log root into one table (`scan_traffic`) or record by
record (`read_traffic`), pruning hour partitions outside the time window, keeping the rows of one target
/ revision / tokenizer, and skipping (and reporting, in `TrafficScan.skipped`) corrupt, truncated or
foreign files instead of failing; deletes old date partitions (`apply_retention`), the features' side
files of their parts with them. Reading those side files is draftsmith.traffic_features.

What it does not do: write (traffic.TrafficWriter), deduplicate or split (draftsmith.distill_data), or
touch Ray. Its names are also importable from `draftsmith.traffic`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from draftsmith.traffic import TRAFFIC_SCHEMA, UTC, TrafficRecord, _hidden, _partition_hour, resolve_uri

logger = logging.getLogger("draftsmith.traffic")  # one logger for the whole log, reading and writing


@dataclass
class TrafficScan:
    """What a read found: the matching rows, how many files were read, and which were skipped."""

    table: pa.Table
    files_read: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    # (path, rows) of records left out because they belong to another target, revision or tokenizer
    mismatched: list[tuple[str, int]] = field(default_factory=list)

    def records(self) -> Iterator[TrafficRecord]:
        for row in self.table.to_pylist():
            yield TrafficRecord.from_row(row)


def _check_aware(name: str, t: dt.datetime | None) -> None:
    if t is not None and t.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware (e.g. datetime(..., tzinfo=timezone.utc))")


def _outside_window(rel_path: str, since: dt.datetime | None, until: dt.datetime | None) -> bool:
    """Partition pruning: a file in hour H only holds records from [H, H+1h)."""
    hour = _partition_hour(rel_path)
    return hour is not None and (
        (since is not None and hour + dt.timedelta(hours=1) <= since) or (until is not None and hour >= until)
    )


def _list_files(fs: pafs.FileSystem, root: str) -> list[tuple[str, str]]:
    """(path, path relative to root) of every visible .parquet file under root, sorted."""
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    out = []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root):].lstrip("/")
        if rel.endswith(".parquet") and not _hidden(rel):
            out.append((info.path, rel))
    return sorted(out)


def _filter(table: pa.Table, since, until, equals: dict[str, str | None]) -> pa.Table:
    ts = TRAFFIC_SCHEMA.field("created_at").type
    conds = []
    if since is not None:
        conds.append(pc.greater_equal(table["created_at"], pa.scalar(since, type=ts)))
    if until is not None:
        conds.append(pc.less(table["created_at"], pa.scalar(until, type=ts)))
    for col, value in equals.items():
        if value is not None:
            conds.append(pc.equal(table[col], value))
    if not conds:
        return table
    mask = conds[0]
    for c in conds[1:]:
        mask = pc.and_(mask, c)
    return table.filter(mask)


def _conform(table: pa.Table, schema: pa.Schema = TRAFFIC_SCHEMA) -> pa.Table:
    """A file's table in `schema` (TRAFFIC_SCHEMA or a selection of its fields): nullable columns written
    before they existed are added as nulls (a missing required column still fails the cast, and the file is
    skipped as foreign)."""
    for f in schema:
        if f.nullable and f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(table.num_rows, type=f.type))
    return table.select(schema.names).cast(schema)


def _read_schema(columns, equals: dict[str, str | None]) -> pa.Schema:
    """TRAFFIC_SCHEMA, or its fields a read needs: the asked columns and the ones its filters read."""
    if columns is None:
        return TRAFFIC_SCHEMA
    unknown = sorted(set(columns) - set(TRAFFIC_SCHEMA.names))
    if unknown:
        raise ValueError(f"not traffic columns: {unknown}")
    needed = {*columns, "created_at", *(k for k, v in equals.items() if v is not None)}
    return pa.schema([f for f in TRAFFIC_SCHEMA if f.name in needed])


def _iter_tables(uri, filesystem, since, until, equals, scan: TrafficScan, columns=None) -> Iterator[pa.Table]:
    _check_aware("since", since)
    _check_aware("until", until)
    schema = _read_schema(columns, equals)
    fs, root = resolve_uri(uri, filesystem)
    for path, rel in _list_files(fs, root):
        if _outside_window(rel, since, until):
            continue
        try:
            with fs.open_input_file(path) as f:
                names = set(pq.read_schema(f).names) if columns is not None else None
                # A column a file predates is not read (it is added as nulls by _conform).
                table = pq.read_table(f, columns=None if names is None else [n for n in schema.names if n in names])
            table = _conform(table, schema)
        except Exception as e:  # one bad file must never stop a read
            reason = f"{type(e).__name__}: {e}"
            logger.warning(
                "skipping unreadable traffic file %s (%s); it is corrupt, truncated or has the wrong "
                "schema: move it out of the log or delete it", path, reason,
            )
            scan.skipped.append((path, reason))
            continue
        scan.files_read += 1
        in_window = _filter(table, since, until, {})
        kept = _filter(in_window, None, None, equals)
        if kept.num_rows < in_window.num_rows:
            n = in_window.num_rows - kept.num_rows
            scan.mismatched.append((path, n))
            wanted = ", ".join(f"{k}={v}" for k, v in equals.items() if v is not None)
            logger.info("left out %d traffic records in %s: not for %s", n, path, wanted)
        yield kept


def scan_traffic(
    uri: str | os.PathLike,
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    target_id: str | None = None,
    target_revision: str | None = None,
    tokenizer_hash: str | None = None,
    filesystem: pafs.FileSystem | None = None,
    columns: list[str] | None = None,
) -> TrafficScan:
    """Read every complete file under `uri` into one table, reporting skipped files.

    `since` is inclusive, `until` exclusive (both timezone-aware); the other
    filters keep rows whose column equals the value. Files whose name (or a
    parent folder's) starts with `.` or `_` are ignored; unreadable files are
    skipped with a warning and listed in `.skipped`. A missing root reads as empty.
    `columns`: read only these (and the ones the filters need) instead of whole records: a poll that
    counts records or sums speculation counters never reads the token ids and text (the bulk of a file);
    `.records()` then needs every column.
    """
    equals = {"target_id": target_id, "target_revision": target_revision, "tokenizer_hash": tokenizer_hash}
    scan = TrafficScan(table=_read_schema(columns, equals).empty_table())
    tables = list(_iter_tables(uri, filesystem, since, until, equals, scan, columns))
    if tables:
        scan.table = pa.concat_tables(tables)
    return scan


def read_traffic_table(uri: str | os.PathLike, **filters) -> pa.Table:
    """`scan_traffic(uri, **filters).table` (use `scan_traffic` to see skipped files)."""
    return scan_traffic(uri, **filters).table


def read_traffic(
    uri: str | os.PathLike,
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    target_id: str | None = None,
    target_revision: str | None = None,
    tokenizer_hash: str | None = None,
    filesystem: pafs.FileSystem | None = None,
    scan: TrafficScan | None = None,
) -> Iterator[TrafficRecord]:
    """Iterate matching records file by file (same filters as `scan_traffic`).

    Pass a `TrafficScan` as `scan` to collect `files_read` and `skipped`; its
    `table` is left empty.
    """
    scan = scan if scan is not None else TrafficScan(table=TRAFFIC_SCHEMA.empty_table())
    equals = {"target_id": target_id, "target_revision": target_revision, "tokenizer_hash": tokenizer_hash}
    for table in _iter_tables(uri, filesystem, since, until, equals, scan):
        for row in table.to_pylist():
            yield TrafficRecord.from_row(row)


# ---------------------------------------------------------------------------------------------
# retention


def apply_retention(
    uri: str | os.PathLike,
    *,
    older_than_days: float,
    now: dt.datetime | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> list[str]:
    """Delete every `date=` partition whose whole day ended more than `older_than_days` ago.

    Returns the deleted directory paths. Folders that are not `date=YYYY-MM-DD` are left alone. The
    features' side files (draftsmith.traffic_features) live in their part's folder and go with it.
    """
    now = now or dt.datetime.now(UTC)
    _check_aware("now", now)
    cutoff = now - dt.timedelta(days=older_than_days)
    fs, root = resolve_uri(uri, filesystem)
    deleted = []
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        name = info.base_name
        if info.type != pafs.FileType.Directory or not name.startswith("date="):
            continue
        try:
            day = dt.datetime.strptime(name[len("date="):], "%Y-%m-%d").replace(tzinfo=UTC)
        except ValueError:
            logger.debug("retention: ignoring %s (not date=YYYY-MM-DD)", info.path)
            continue
        if day + dt.timedelta(days=1) <= cutoff:
            fs.delete_dir(info.path)
            deleted.append(info.path)
    if deleted:
        logger.info("retention: deleted %d date partitions under %s", len(deleted), root)
    return sorted(deleted)
