"""Traffic log -> distillation dataset (Hugging Face `datasets`, Arrow), split by time.

What it does: selects the records of one target (id, revision, tokenizer fingerprint) in a time window
through `draftsmith.traffic.scan_traffic` (unreadable files are skipped and listed), drops records
with no output, deduplicates identical (prompt ids, output ids) pairs keeping the earliest, sorts by
time and holds out the most recent `heldout_fraction` (so evaluation is on traffic newer than anything
trained on), and returns both parts as `datasets.Dataset`s over the Arrow table with the columns
training needs, plus stats.

What it does not do: train or evaluate, tokenize text, or touch Ray (the job ships the train part
to its workers with `save_to_disk`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from draftsmith.traffic import scan_traffic

logger = logging.getLogger(__name__)

TRAIN_COLUMNS = (
    "request_id", "created_at", "source", "drafter_version", "temperature",
    "prompt_token_ids", "output_token_ids", "target_topk_ids", "target_topk_logprobs", "accept_mask",
)


@dataclass
class DistillData:
    train: "datasets.Dataset"  # noqa: F821
    heldout: "datasets.Dataset"  # noqa: F821
    stats: dict = field(default_factory=dict)


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
) -> DistillData:
    """The train / held-out datasets of one target's traffic in [since, until), and their stats.

    `sources` restricts to record sources ("served", "backfill"); None keeps both.
    """
    import datasets

    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
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
    n_heldout = math.ceil(n * heldout_fraction) if heldout_fraction > 0 and n > 1 else 0
    n_heldout = min(n_heldout, n - 1) if n > 1 else 0
    columns = table.select(list(TRAIN_COLUMNS))
    train_table, heldout_table = columns.slice(0, n - n_heldout), columns.slice(n - n_heldout)
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
        "heldout_since": heldout_table["created_at"][0].as_py().isoformat() if heldout_table.num_rows else None,
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
    }
    if empty_outputs:
        stats["empty_outputs"] = empty_outputs
    if scan.skipped:
        logger.warning("distill dataset: skipped %d unreadable traffic files", len(scan.skipped))
    logger.info("distill dataset: %d records (%d duplicates dropped): %d train, %d held-out, %d output tokens",
                n, duplicates, stats["train_records"], stats["heldout_records"], stats["output_tokens"])
    return DistillData(train=datasets.Dataset(train_table.combine_chunks()),
                       heldout=datasets.Dataset(heldout_table.combine_chunks()), stats=stats)


def _value_counts(column: pa.ChunkedArray) -> tuple[list, list]:
    if len(column) == 0:
        return [], []
    counts = pc.value_counts(column).flatten()
    return counts[0].to_pylist(), counts[1].to_pylist()
