"""The traffic log: schema round trip, atomic files, flush policy, bad files, filters, retention."""

import asyncio
import datetime as dt
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import pytest

from draftsmith.traffic import (
    TRAFFIC_SCHEMA,
    TrafficRecord,
    TrafficScan,
    TrafficWriter,
    apply_retention,
    drop_text,
    read_traffic,
    read_traffic_table,
    scan_traffic,
    tokenizer_fingerprint,
)

UTC = dt.timezone.utc
T0 = dt.datetime(2025, 3, 4, 10, 15, tzinfo=UTC)


def make_record(i: int, created_at: dt.datetime = T0, **over) -> TrafficRecord:
    n_out = 1 + i % 3
    fields = dict(
        request_id=f"req-{i}",
        created_at=created_at,
        target_id="tiny-target",
        target_revision="r1",
        tokenizer_hash="abc",
        drafter_version="3",
        temperature=0.5,
        top_p=0.75,
        top_k=20,
        max_tokens=16,
        seed=i if i % 2 else None,
        num_speculative_tokens=4,
        prompt_token_ids=[1, 2, i],
        output_token_ids=list(range(n_out)),
        target_topk_ids=[[5, 6]] * n_out,
        target_topk_logprobs=[[-0.5, -1.25]] * n_out,
        accept_mask=[True] * n_out,
        drafted=4,
        accepted=n_out,
        compared=min(4, n_out + 1),
        finish_reason="length",
        prompt_text=f"prompt {i}",
        output_text="out",
    )
    fields.update(over)
    return TrafficRecord(**fields)


def visible_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_schema_field_order_matches_record():
    """Every field of a record is a column, in order, except `features`: those go to a side file
    (draftsmith.traffic_features), never into the Parquet part."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(TrafficRecord)]
    assert names[:-1] == TRAFFIC_SCHEMA.names and names[-1] == "features"
    assert "features" not in make_record(0).to_row()
    assert TRAFFIC_SCHEMA.field("seed").nullable and not TRAFFIC_SCHEMA.field("request_id").nullable


def test_round_trip_across_two_hours(tmp_path):
    later = T0 + dt.timedelta(hours=1)
    records = [make_record(i) for i in range(3)] + [make_record(i, later) for i in range(3, 5)]
    with TrafficWriter(tmp_path) as w:
        for r in records:
            w.add(r)
    assert w.records_written == 5 and w.files_written == 2 and w.records_buffered == 0
    dirs = sorted({os.path.dirname(p) for p in visible_files(tmp_path)})
    assert dirs == ["date=2025-03-04/hour=10", "date=2025-03-04/hour=11"]
    for name in visible_files(tmp_path):
        base = os.path.basename(name)
        assert base.startswith("part-") and base.endswith(".parquet")
    got = sorted(read_traffic(tmp_path), key=lambda r: r.request_id)
    assert got == sorted(records, key=lambda r: r.request_id)
    assert got[0].created_at.tzinfo is not None and got[1].seed == 1 and got[0].seed is None


def test_record_validation():
    with pytest.raises(ValueError, match="timezone-aware"):
        make_record(0, dt.datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="accept_mask"):
        make_record(0, accept_mask=[])


def test_no_temp_file_remains_and_leftover_tmp_is_ignored(tmp_path):
    w = TrafficWriter(tmp_path)
    w.add(make_record(0))
    assert w.flush() == 1
    files = visible_files(tmp_path)
    assert len(files) == 1 and not any(os.path.basename(f).startswith(".") for f in files)
    part_dir = tmp_path / os.path.dirname(files[0])
    # A crashed writer leaves a hidden temp file: readers must not see it.
    (part_dir / ".part-crashed.parquet.tmp").write_bytes(b"half a file")
    (part_dir / "_SUCCESS").write_bytes(b"")
    scan = scan_traffic(tmp_path)
    assert scan.table.num_rows == 1 and scan.files_read == 1 and scan.skipped == []


def test_flush_every_n_records(tmp_path):
    w = TrafficWriter(tmp_path, flush_every_records=3, clock=FakeClock())
    assert w.add(make_record(0)) == 0 and w.add(make_record(1)) == 0
    assert w.records_buffered == 2 and w.files_written == 0
    assert w.add(make_record(2)) == 3
    assert w.records_buffered == 0 and w.records_written == 3 and w.files_written == 1


def test_flush_every_t_seconds_with_injected_clock(tmp_path):
    clock = FakeClock()
    w = TrafficWriter(tmp_path, flush_every_records=1000, flush_every_seconds=30.0, clock=clock)
    w.add(make_record(0))
    clock.t += 29.0
    assert w.maybe_flush() == 0 and w.records_buffered == 1
    clock.t += 1.0
    assert w.maybe_flush() == 1 and w.records_written == 1
    clock.t += 100.0
    assert w.maybe_flush() == 0 and w.files_written == 1  # nothing buffered, no empty file


def test_close_flushes_and_rejects_more(tmp_path):
    w = TrafficWriter(tmp_path)
    w.add(make_record(0))
    w.close()
    assert w.records_written == 1
    with pytest.raises(RuntimeError, match="closed"):
        w.add(make_record(1))


def test_record_that_does_not_fit_schema_is_dropped_not_blocking(tmp_path, caplog):
    w = TrafficWriter(tmp_path)
    w.add(make_record(0))
    w.add(make_record(1, target_id=None))  # required column
    w.add(make_record(2, user="\ud800"))  # a lone surrogate (JSON "\\ud800") is no UTF-8 string
    w.add(make_record(3))
    with caplog.at_level(logging.ERROR):
        assert w.flush() == 2
    assert w.records_dropped == 2 and "req-1" in caplog.text and "req-2" in caplog.text
    assert w.records_buffered == 0
    assert read_traffic_table(tmp_path).column("request_id").to_pylist() == ["req-0", "req-3"]


def test_corrupt_and_truncated_files_are_skipped_and_reported(tmp_path, caplog):
    with TrafficWriter(tmp_path) as w:
        for i in range(4):
            w.add(make_record(i))
        w.flush()
        w.add(make_record(9, T0 + dt.timedelta(hours=1)))
    good = sorted(visible_files(tmp_path))
    part = tmp_path / "date=2025-03-04" / "hour=10"
    (part / "part-garbage.parquet").write_bytes(os.urandom(2000))
    valid = (tmp_path / good[0]).read_bytes()
    (part / "part-truncated.parquet").write_bytes(valid[: len(valid) // 2])

    with caplog.at_level(logging.WARNING):
        scan = scan_traffic(tmp_path)
    assert isinstance(scan, TrafficScan)
    assert scan.files_read == 2 and scan.table.num_rows == 5
    skipped = sorted(os.path.basename(p) for p, _ in scan.skipped)
    assert skipped == ["part-garbage.parquet", "part-truncated.parquet"]
    assert all(reason for _, reason in scan.skipped)
    assert "part-garbage.parquet" in caplog.text and "part-truncated.parquet" in caplog.text
    # The iterator survives them too and reports through a scan object.
    it_scan = TrafficScan(table=TRAFFIC_SCHEMA.empty_table())
    assert len(list(read_traffic(tmp_path, scan=it_scan))) == 5 and len(it_scan.skipped) == 2


def test_filters(tmp_path):
    with TrafficWriter(tmp_path) as w:
        w.add(make_record(0))
        w.add(make_record(1, T0 + dt.timedelta(hours=1)))
        w.add(make_record(2, T0 + dt.timedelta(hours=2), target_revision="r2"))
        w.add(make_record(3, T0 + dt.timedelta(hours=2), tokenizer_hash="other", target_id="big"))

    def ids(**kw):
        return sorted(read_traffic_table(tmp_path, **kw).column("request_id").to_pylist())

    assert ids() == ["req-0", "req-1", "req-2", "req-3"]
    assert ids(since=T0 + dt.timedelta(minutes=30)) == ["req-1", "req-2", "req-3"]
    assert ids(until=T0 + dt.timedelta(hours=1)) == ["req-0"]  # until is exclusive
    # since/until in another timezone mean the same instants
    cet = dt.timezone(dt.timedelta(hours=1))
    assert ids(since=(T0 + dt.timedelta(hours=1)).astimezone(cet)) == ["req-1", "req-2", "req-3"]
    assert ids(target_revision="r2") == ["req-2"]
    assert ids(target_id="big") == ["req-3"]
    assert ids(tokenizer_hash="abc", target_revision="r1") == ["req-0", "req-1"]
    with pytest.raises(ValueError, match="timezone-aware"):
        ids(since=dt.datetime(2025, 1, 1))
    assert read_traffic_table(tmp_path / "missing").num_rows == 0


def test_retention(tmp_path):
    days = [T0 - dt.timedelta(days=d) for d in (0, 6, 7, 8, 30)]
    with TrafficWriter(tmp_path) as w:
        for i, t in enumerate(days):
            w.add(make_record(i, t))
    (tmp_path / "notes").mkdir()
    now = T0.replace(hour=12)
    deleted = apply_retention(tmp_path, older_than_days=7, now=now)
    # A partition goes only when its whole day ended more than 7 days before `now`.
    assert [os.path.basename(p) for p in deleted] == ["date=2025-02-02", "date=2025-02-24"]
    remaining = sorted(p.name for p in tmp_path.iterdir())
    assert remaining == ["date=2025-02-25", "date=2025-02-26", "date=2025-03-04", "notes"]
    assert read_traffic_table(tmp_path).num_rows == 3


def test_drop_text():
    r = drop_text(make_record(0))
    assert r.prompt_text is None and r.output_text is None and r.output_token_ids == [0]


def test_parquet_files_carry_the_schema(tmp_path):
    with TrafficWriter(tmp_path) as w:
        w.add(make_record(0))
    (path,) = visible_files(tmp_path)
    assert pq.read_schema(tmp_path / path).remove_metadata() == TRAFFIC_SCHEMA


def _tiny_tokenizer(extra_token: str | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    if extra_token:
        vocab[extra_token] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_tokenizer_fingerprint_is_stable_and_sensitive():
    a, b = _tiny_tokenizer(), _tiny_tokenizer()
    fp = tokenizer_fingerprint(a)
    assert len(fp) == 16 and all(c in "0123456789abcdef" for c in fp)
    assert fp == tokenizer_fingerprint(b) == tokenizer_fingerprint(a)
    assert tokenizer_fingerprint(_tiny_tokenizer("extra")) != fp
    c = _tiny_tokenizer()
    c.eos_token = "<unk>"  # same vocabulary, different special tokens
    assert tokenizer_fingerprint(c) != fp
    assert len(tokenizer_fingerprint(a.backend_tokenizer if hasattr(a, "backend_tokenizer") else a)) == 16


def test_file_is_written_under_hidden_temp_name_then_moved(tmp_path):
    import fsspec
    import pyarrow.fs as pafs

    class Recording(pafs.FSSpecHandler):
        def __init__(self, fs):
            super().__init__(fs)
            self.opened, self.moves = [], []

        def open_output_stream(self, path, metadata):
            self.opened.append(path)
            return super().open_output_stream(path, metadata)

        def move(self, src, dest):
            self.moves.append((src, dest))
            return super().move(src, dest)

    handler = Recording(fsspec.filesystem("file"))
    with TrafficWriter(str(tmp_path), filesystem=pafs.PyFileSystem(handler)) as w:
        w.add(make_record(0))
    ((src, dest),) = handler.moves
    assert handler.opened == [src]
    assert os.path.dirname(src) == os.path.dirname(dest)
    assert os.path.basename(src) == "." + os.path.basename(dest) + ".tmp"
    assert [os.path.basename(p) for p in visible_files(tmp_path)] == [os.path.basename(dest)]


def test_a_failed_flush_keeps_its_records_in_order_and_adds_go_on_while_a_file_is_written(tmp_path, monkeypatch):
    w = TrafficWriter(tmp_path)
    w.add(make_record(0))
    w.add(make_record(1, created_at=T0 + dt.timedelta(hours=1)))  # a second partition, a second file
    real_write = w._write_file
    writing, release = threading.Event(), threading.Event()

    def write_then_fail_the_second(part, records):
        if part.endswith("hour=11"):
            raise OSError("disk full")
        writing.set()
        assert release.wait(10)
        return real_write(part, records)

    monkeypatch.setattr(w, "_write_file", write_then_fail_the_second)
    failures = []

    def flush_and_keep_the_error():
        try:
            w.flush()
        except OSError as error:
            failures.append(error)

    flushing = threading.Thread(target=flush_and_keep_the_error)
    flushing.start()
    assert writing.wait(10)
    adding = threading.Thread(target=w.buffer, args=([make_record(2)],))
    adding.start()
    adding.join(5)
    assert not adding.is_alive()  # buffering does not wait for the file being written
    assert w.records_buffered == 3  # the two being written count as unwritten until they are
    release.set()
    flushing.join(10)
    assert [str(e) for e in failures] == ["disk full"]
    assert w.records_written == 1 and w.durable_through == 0  # req-1 failed: nothing is durable yet
    assert w.records_buffered == 2 and w.records_added == 3
    monkeypatch.setattr(w, "_write_file", real_write)
    assert w.flush() == 2 and w.durable_through == 3
    assert sorted(read_traffic_table(tmp_path).column("request_id").to_pylist()) == ["req-0", "req-1", "req-2"]


def test_a_cancelled_log_batch_keeps_its_records(tmp_path):
    """The logger marks a request id seen and buffers its record before its first await: a call
    cancelled there (Serve cancels it when the caller's request ends) must not lose the record to the
    retry, which is ignored as a duplicate."""
    from serve.logger import TrafficLoggerImpl

    async def scenario() -> TrafficLoggerImpl:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(1))
        gate = threading.Event()
        busy = loop.run_in_executor(None, gate.wait)  # the only worker thread is taken: to_thread queues
        logger = TrafficLoggerImpl(str(tmp_path), flush_every_records=1)
        call = asyncio.create_task(logger.log_batch([make_record(0)]))
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        gate.set()
        await busy
        retry = await logger.log_batch([make_record(0)])  # the replica resends the unacknowledged batch
        assert retry["n"] == 1 and logger.duplicates_ignored == 1
        await logger.flush()
        return logger

    logger = asyncio.run(scenario())
    assert logger.received == 1 and logger.writer.records_written == 1
    assert read_traffic_table(tmp_path).column("request_id").to_pylist() == ["req-0"]


def test_a_file_written_before_the_new_columns_still_reads(tmp_path):
    """Traffic logs predate the columns saying what the engine really did: their files read, the new
    fields as None, and new records round-trip them."""
    import dataclasses as _dc

    import pyarrow as _pa
    import pyarrow.parquet as _pq

    from draftsmith.traffic import TRAFFIC_SCHEMA, TrafficRecord, TrafficWriter, scan_traffic

    new = ("verify_steps", "policy_off_steps", "proposer", "lookup_drafted", "lookup_accepted", "lookup_compared")
    now = dt.datetime(2026, 3, 1, 12, tzinfo=dt.timezone.utc)
    base = dict(created_at=now, target_id="t", target_revision="r", tokenizer_hash="h", temperature=0.0,
                max_tokens=2, prompt_token_ids=[1], output_token_ids=[2], target_topk_ids=[[2]],
                target_topk_logprobs=[[-0.5]], accept_mask=[False], finish_reason="stop")
    old_schema = _pa.schema([f for f in TRAFFIC_SCHEMA if f.name not in new])
    old_row = {k: v for k, v in TrafficRecord(request_id="old", **base).to_row().items() if k not in new}
    folder = tmp_path / "log" / "date=2026-03-01" / "hour=12"
    folder.mkdir(parents=True)
    _pq.write_table(_pa.Table.from_pylist([old_row], schema=old_schema), folder / "part-old.parquet")
    fresh = TrafficRecord(request_id="new", verify_steps=5, policy_off_steps=2, proposer="drafter+lookup",
                          lookup_drafted=3, lookup_accepted=1, lookup_compared=2, **base)
    with TrafficWriter(tmp_path / "log") as writer:
        writer.add(fresh)
    scan = scan_traffic(tmp_path / "log")
    assert not scan.skipped and scan.files_read == 2
    records = {r.request_id: r for r in scan.records()}
    assert all(getattr(records["old"], name) is None for name in new)
    assert records["new"] == fresh and _dc.asdict(records["new"])["proposer"] == "drafter+lookup"


def test_a_read_of_some_columns_returns_them_filtered_alike(tmp_path):
    """What it detects: a column-limited read (the trigger's polls) that returns other rows than a full read
    under the same filters, loses the filter columns, or fails on a file that predates a column it asks for."""
    import pyarrow as _pa

    with TrafficWriter(tmp_path) as w:
        w.add(make_record(0))
        w.add(make_record(1, T0 + dt.timedelta(hours=1)))
        w.add(make_record(2, T0 + dt.timedelta(hours=2), target_id="big"))
    old_schema = _pa.schema([f for f in TRAFFIC_SCHEMA if f.name != "lookup_compared"])
    old = {k: v for k, v in make_record(3, T0).to_row().items() if k != "lookup_compared"}
    folder = tmp_path / "date=2025-03-04" / "hour=10"
    pq.write_table(_pa.Table.from_pylist([old], schema=old_schema), folder / "part-old.parquet")
    since = T0 + dt.timedelta(minutes=1)
    for kw in ({}, {"target_id": "tiny-target"}, {"since": since}):
        full = scan_traffic(tmp_path, **kw).table
        some = scan_traffic(tmp_path, columns=["drafted", "lookup_compared"], **kw)
        assert not some.skipped
        assert some.table.num_rows == full.num_rows
        assert set(some.table.column_names) >= {"drafted", "lookup_compared", "created_at"}
        assert "prompt_token_ids" not in some.table.column_names
        assert sorted(some.table["drafted"].to_pylist()) == sorted(full["drafted"].to_pylist())
    counted = scan_traffic(tmp_path, target_id="tiny-target", columns=[])
    assert counted.table.num_rows == 3 and set(counted.table.column_names) == {"created_at", "target_id"}
    with pytest.raises(ValueError, match="not traffic columns"):
        scan_traffic(tmp_path, columns=["no_such_column"])
