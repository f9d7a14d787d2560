"""Target features logged at serve time: one Arrow IPC side file per traffic Parquet part, and their reader.

What it does: `write_side_file` writes the features of a part's records (`TrafficRecord.features`: the
target's final-normed hidden state, float16, at every position of prompt + output but the last, which is
exactly what a feature drafter's teacher-forced training reads) as `<part>.features.arrow` in the part's
folder, under a hidden temporary name renamed when complete, and returns the footer metadata the part
stores to name it. `LoggedFeatures` indexes the side files of a log (the parts in a time window, for a
set of request ids) and returns one record's features by request id, checking them against the checksum
written with them; a side file that a part names but that is missing, truncated or corrupt, and a record
whose features fail their check, is reported with its path (`problems`) and answers None, so the caller
recomputes those features instead of losing the record.

Format: an Arrow IPC file (what pyarrow writes to any of the log's filesystems, local or object store,
with random access to each record batch through the file's footer). One record batch per record, one
float16 column holding its [positions, hidden] values row-major; the schema's metadata holds the index
(request id, positions, hidden size, CRC-32 of the values, batch i = entry i), so indexing reads footers
only. Uncompressed: hidden states barely compress, and uncompressed buffers are read without decoding.
Storage: 2 x hidden size bytes per position, and a record has prompt + output - 1 positions.

What it does not do: decide what is logged (serve/: `traffic.log_features`, opt-out), write the Parquet
part (draftsmith.traffic), delete anything (retention deletes whole date partitions, side files
included: draftsmith.traffic_reader.apply_retention), or touch Ray or torch.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from draftsmith.traffic import TrafficRecord, resolve_uri
from draftsmith.traffic_reader import _list_files, _outside_window

logger = logging.getLogger("draftsmith.traffic")  # one logger for the whole log

FEATURES_SUFFIX = ".features.arrow"
FOOTER_KEY = b"draftsmith.features"  # in a part's Parquet footer: which side file holds its features
INDEX_KEY = b"draftsmith.features.index"  # in the side file's schema: one entry per record batch
FORMAT_VERSION = 1
_SCHEMA = pa.schema([pa.field("values", pa.float16(), nullable=False)])


def side_file_name(part_name: str) -> str:
    """`part-....parquet` -> `part-....features.arrow` (not `.parquet`, so traffic scans never read it)."""
    stem = part_name[: -len(".parquet")] if part_name.endswith(".parquet") else part_name
    return stem + FEATURES_SUFFIX


def bytes_per_position(hidden_size: int) -> int:
    """Storage of one logged position: one float16 per hidden unit."""
    return 2 * hidden_size


def _values(features) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(features, dtype=np.float16))


def write_side_file(fs: pafs.FileSystem, directory: str, part_name: str,
                    records: Sequence[TrafficRecord]) -> tuple[str, int, dict[bytes, bytes]]:
    """Write the features of `records` (each with `features`) beside part `part_name` in `directory`.

    Returns (its path, its size in bytes, the metadata the part's footer stores to name it). A request id
    seen twice keeps its first features. Raises on a storage error, leaving no file behind.
    """
    seen, arrays, index = set(), [], []
    for record in records:
        if record.features is None or record.request_id in seen:
            continue
        seen.add(record.request_id)
        values = _values(record.features)
        if values.ndim != 2:
            raise ValueError(f"features of {record.request_id}: expected [positions, hidden], got {values.shape}")
        arrays.append(values)
        index.append([record.request_id, int(values.shape[0]), int(values.shape[1]), zlib.crc32(values)])
    name = side_file_name(part_name)
    final, tmp = f"{directory}/{name}", f"{directory}/.{name}.tmp"
    schema = _SCHEMA.with_metadata({INDEX_KEY: json.dumps({"version": FORMAT_VERSION, "records": index})})
    try:
        with fs.open_output_stream(tmp) as out:
            with pa.ipc.new_file(out, schema) as writer:
                for values in arrays:
                    writer.write_batch(pa.record_batch([pa.array(values.reshape(-1))], schema=schema))
            size = out.tell()
        fs.move(tmp, final)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except (OSError, FileNotFoundError):
            pass
        raise
    footer = {FOOTER_KEY: json.dumps({"file": name, "records": len(index), "version": FORMAT_VERSION}).encode()}
    return final, size, footer


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: str
    batch: int
    positions: int
    hidden: int
    crc32: int


class LoggedFeatures:
    """request id -> the target features logged with that record, over the side files of one traffic log.

    Build it with `LoggedFeatures.index(uri, ...)`; `lookup(request_id, positions)` returns a float16 array
    [positions, hidden], or None when the record has none (not logged with features, or its side file or
    its features are unreadable: those are in `problems` as (path, reason), each reported once).
    """

    def __init__(self, fs: pafs.FileSystem, entries: dict[str, _Entry], problems: list[tuple[str, str]],
                 max_open_files: int = 8):
        self.fs = fs
        self._entries = entries
        self.problems = problems
        self._open: OrderedDict[str, pa.ipc.RecordBatchFileReader] = OrderedDict()
        self._max_open = max_open_files
        self.served = 0  # lookups answered with features

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._entries

    @classmethod
    def index(cls, uri: str | os.PathLike, *, request_ids: Iterable[str] | None = None,
              since: dt.datetime | None = None, until: dt.datetime | None = None,
              filesystem: pafs.FileSystem | None = None) -> "LoggedFeatures":
        """Index the side files of the parts under `uri` in [since, until) (hour partitions, as
        traffic_reader prunes them), keeping the records in `request_ids` (None: all). Reads footers only."""
        fs, root = resolve_uri(uri, filesystem)
        wanted = None if request_ids is None else set(request_ids)
        entries: dict[str, _Entry] = {}
        problems: list[tuple[str, str]] = []
        for path, rel in _list_files(fs, root):
            if _outside_window(rel, since, until):
                continue
            try:
                with fs.open_input_file(path) as f:
                    footer = (pq.read_metadata(f).metadata or {}).get(FOOTER_KEY)
            except Exception:  # noqa: BLE001  an unreadable part: the traffic scan reports it, its records are gone
                continue
            if footer is None:
                continue  # written without features
            side = f"{path.rsplit('/', 1)[0]}/{json.loads(footer)['file']}"
            try:
                with fs.open_input_file(side) as f:
                    table_index = _read_index(pa.ipc.open_file(f))
            except Exception as e:  # noqa: BLE001  missing, truncated, not Arrow, a foreign index
                _report(problems, side, f"{type(e).__name__}: {e}")
                continue
            for batch, (request_id, positions, hidden, crc) in enumerate(table_index):
                if wanted is None or request_id in wanted:
                    entries.setdefault(request_id, _Entry(side, batch, positions, hidden, crc))
        logger.info("logged features: %d records indexed under %s, %d unreadable side files", len(entries), root,
                    len(problems))
        return cls(fs, entries, problems)

    def lookup(self, request_id: str, positions: int) -> np.ndarray | None:
        """The record's features, float16 [positions, hidden], or None (see the class docstring). `positions`
        is what the record needs (prompt + output - 1): logged features of another length are refused."""
        entry = self._entries.get(request_id)
        if entry is None:
            return None
        try:
            if entry.positions != positions:
                raise ValueError(f"{entry.positions} positions logged, the record has {positions}")
            batch = self._reader(entry.path).get_batch(entry.batch)
            values = batch.column(0).to_numpy(zero_copy_only=False)
            if values.size != entry.positions * entry.hidden:
                raise ValueError(f"{values.size} values logged, the index says {entry.positions} x {entry.hidden}")
            if zlib.crc32(np.ascontiguousarray(values)) != entry.crc32:
                raise ValueError("checksum mismatch: the features were altered after they were written")
        except Exception as e:  # noqa: BLE001  a corrupt side file costs its features, never the record
            del self._entries[request_id]  # reported once; the caller recomputes
            _report(self.problems, entry.path, f"record {request_id}: {type(e).__name__}: {e}")
            return None
        self.served += 1
        return values.reshape(entry.positions, entry.hidden)

    def _reader(self, path: str) -> pa.ipc.RecordBatchFileReader:
        reader = self._open.get(path)
        if reader is None:
            reader = pa.ipc.open_file(self.fs.open_input_file(path))
            self._open[path] = reader
            while len(self._open) > self._max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(path)
        return reader


def _read_index(reader: pa.ipc.RecordBatchFileReader) -> list[tuple[str, int, int, int]]:
    raw = (reader.schema.metadata or {}).get(INDEX_KEY)
    if raw is None:
        raise ValueError("not a features side file: no index in its schema")
    index = json.loads(raw)
    if index.get("version") != FORMAT_VERSION:
        raise ValueError(f"side file format {index.get('version')!r}, this reader knows {FORMAT_VERSION}")
    records = [tuple(entry) for entry in index["records"]]
    if len(records) != reader.num_record_batches:
        raise ValueError(f"the index lists {len(records)} records, the file holds {reader.num_record_batches}")
    return records


def _report(problems: list[tuple[str, str]], path: str, reason: str) -> None:
    logger.warning("logged features unusable in %s (%s): training recomputes them", path, reason)
    problems.append((path, reason))
