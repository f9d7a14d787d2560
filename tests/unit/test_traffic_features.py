"""Target features logged at serve time (serve's `traffic.log_features`, draftsmith.traffic_features): the
engine's capture, the side file beside each Parquet part, opt-out and retention, corrupt and missing side
files, and distillation reading the logged features instead of recomputing them."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from draftsmith.engine_config import EngineConfig
from draftsmith.models import derive_drafter, tiny_model
from draftsmith.sampling import SamplingParams
from draftsmith.specdec import Request, SpecEngine, runner_for
from draftsmith.traffic import TrafficWriter, apply_retention, scan_traffic
from draftsmith.traffic_features import FEATURES_SUFFIX, FOOTER_KEY, LoggedFeatures, bytes_per_position
from serve.logger import record_from_result

UTC = dt.timezone.utc
T0 = dt.datetime(2025, 6, 1, 9, 30, tzinfo=UTC)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [15, 16, 17, 18], [19, 20, 21, 22, 23, 24, 25, 26], [27, 28]]


@pytest.fixture(scope="module")
def target():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a busy machine
    yield tiny_model()
    torch.set_num_threads(threads)


# Lengths out of order: sequences finish in either slot, and a later one moves into the slot a finished one left.
MAX_TOKENS = [14, 6, 11, 5, 9, 13]


def _requests(temperature: float = 0.0) -> list[Request]:
    return [Request(f"req-{i}", prompt, SamplingParams(max_tokens=MAX_TOKENS[i], temperature=temperature, seed=i,
                                                       ignore_eos=True), num_speculative_tokens=3)
            for i, prompt in enumerate(PROMPTS)]


def _engine(target, drafter, *, capture: bool) -> SpecEngine:
    # Two slots for six requests: continuous admission, slots freed and refilled, a sequence moved between slots.
    return SpecEngine(runner_for(target.model), None if drafter is None else runner_for(None, drafter),
                      config=EngineConfig(num_speculative_tokens=3, max_batch_size=2, max_model_len=96),
                      capture_features=capture)


def _teacher_features(target, result) -> torch.Tensor:
    """The target's final-normed hidden states of prompt + output[:-1], teacher-forced (what training recomputes)."""
    ids = torch.tensor([result.prompt_token_ids + result.output_token_ids[:-1]])
    with torch.no_grad():
        return target.model.model(input_ids=ids, use_cache=False).last_hidden_state[0]


def _records(target, results, created_at=T0):
    return [record_from_result(r, target_id=target.model_id, target_revision=target.revision,
                               tokenizer_hash=target.tokenizer_hash, params=SamplingParams(max_tokens=32),
                               created_at=created_at) for r in results]


DRAFTERS = {
    "none": lambda t: None,  # autoregressive: one position verified per step
    "full-acceptance": lambda t: derive_drafter(t, [0, 1]),  # the target itself: chunks of gamma + 1 positions
    "partial": lambda t: derive_drafter(t, [0]),  # ragged acceptance across the batch
    "feature": lambda t: derive_drafter(t, [1], reads_target_features=True),
}


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("kind", list(DRAFTERS))
def test_engine_captures_the_target_features_of_every_position_without_changing_output(target, kind, temperature):
    """Detects: a capture that misses or misplaces the positions verified in chunks, reads a slot after another
    sequence moved into it, or changes the decoded tokens. Every result carries one float16 feature per position
    of prompt + output but the last, equal (within float16) to the teacher-forced forward training would run."""
    drafter = DRAFTERS[kind](target)
    plain = _engine(target, drafter, capture=False).generate(_requests(temperature))
    captured = _engine(target, drafter, capture=True).generate(_requests(temperature))
    assert [r.output_token_ids for r in captured] == [r.output_token_ids for r in plain]
    assert all(r.features is None for r in plain)
    if kind == "full-acceptance":
        assert sum(r.stats.accepted for r in captured) > 0.9 * sum(r.stats.drafted for r in captured) > 0
    for result in captured:
        positions = len(result.prompt_token_ids) + len(result.output_token_ids) - 1
        assert result.features.dtype == torch.float16 and result.features.device.type == "cpu"
        assert result.features.shape == (positions, target.model.config.hidden_size)
        torch.testing.assert_close(result.features.float(), _teacher_features(target, result), atol=4e-3, rtol=4e-3)


def test_side_file_round_trip_and_its_storage_cost(tmp_path, target):
    """Detects: a side file the scan reads as traffic, a part whose footer does not name its side file, features
    that do not come back bit for bit, or a storage cost other than 2 x hidden bytes per position (+ a header)."""
    results = _engine(target, DRAFTERS["full-acceptance"](target), capture=True).generate(_requests())
    records = _records(target, results)
    with TrafficWriter(tmp_path / "log") as writer:
        for record in records:
            writer.add(record)
    scan = scan_traffic(tmp_path / "log")
    assert scan.table.num_rows == len(records) and not scan.skipped and scan.files_read == 1
    assert sorted(scan.records(), key=lambda r: r.request_id) == sorted(records, key=lambda r: r.request_id)
    (part,) = [p for p in (tmp_path / "log").rglob("*.parquet")]
    (side,) = [p for p in (tmp_path / "log").rglob("*" + FEATURES_SUFFIX)]
    assert side.parent == part.parent and side.name == part.name.replace(".parquet", FEATURES_SUFFIX)
    assert FOOTER_KEY in pq.read_metadata(part).metadata
    positions = sum(len(r.prompt_token_ids) + len(r.output_token_ids) - 1 for r in records)
    payload = positions * bytes_per_position(target.model.config.hidden_size)
    assert writer.features_written == len(records) and writer.features_failed == 0
    assert writer.features_bytes == side.stat().st_size and payload < side.stat().st_size < payload + 8192
    logged = LoggedFeatures.index(tmp_path / "log")
    assert len(logged) == len(records) and not logged.problems
    for result in results:
        got = logged.lookup(result.request_id, result.features.shape[0])
        assert got.dtype == np.float16 and np.array_equal(got, result.features.numpy())
    assert logged.lookup("req-0", 3) is None and logged.problems  # another length is refused, with its path
    assert logged.lookup("never-logged", 5) is None
    only = LoggedFeatures.index(tmp_path / "log", request_ids={"req-1"})
    assert len(only) == 1 and "req-1" in only


def test_retention_removes_the_features_with_their_records(tmp_path, target):
    """Detects: a side file that outlives its part under retention."""
    results = _engine(target, None, capture=True).generate(_requests()[:2])
    old = T0 - dt.timedelta(days=40)
    with TrafficWriter(tmp_path) as writer:
        for record in _records(target, results[:1], created_at=old) + _records(target, results[1:], created_at=T0):
            writer.add(record)
    assert len(list(tmp_path.rglob("*" + FEATURES_SUFFIX))) == 2
    apply_retention(tmp_path, older_than_days=30, now=T0)
    (side,) = list(tmp_path.rglob("*" + FEATURES_SUFFIX))
    assert f"date={T0:%Y-%m-%d}" in str(side)
    logged = LoggedFeatures.index(tmp_path)
    assert "req-1" in logged and "req-0" not in logged and not logged.problems


def test_a_record_logged_without_features_has_none(tmp_path, target):
    """Detects: a part that claims a side file when none of its records carried features."""
    (result,) = _engine(target, None, capture=False).generate(_requests()[:1])
    with TrafficWriter(tmp_path) as writer:
        writer.add(_records(target, [result])[0])
    assert not list(tmp_path.rglob("*" + FEATURES_SUFFIX))
    assert FOOTER_KEY not in (pq.read_metadata(next(tmp_path.rglob("*.parquet"))).metadata or {})
    assert len(LoggedFeatures.index(tmp_path)) == 0


def test_features_of_the_wrong_shape_never_fail_the_request(target, caplog):
    """Detects: a bad capture turning into a failed request instead of a record without features."""
    (result,) = _engine(target, None, capture=True).generate(_requests()[:1])
    bad = dataclasses.replace(result, features=result.features[:-1])
    (record,) = _records(target, [bad])
    assert record.features is None and "without them" in caplog.text
    with pytest.raises(ValueError, match="features of shape"):
        dataclasses.replace(record, features=np.zeros((2, 4), np.float16))


def test_a_side_file_that_cannot_be_written_costs_only_the_features(tmp_path, target, monkeypatch):
    """Detects: losing records (or failing the flush) because their features could not be written."""
    from draftsmith import traffic_features

    results = _engine(target, None, capture=True).generate(_requests()[:2])

    def full_disk(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(traffic_features, "write_side_file", full_disk)
    with TrafficWriter(tmp_path) as writer:
        for record in _records(target, results):
            writer.add(record)
    assert writer.records_written == 2 and writer.features_failed == 2 and writer.features_written == 0
    assert scan_traffic(tmp_path).table.num_rows == 2 and not list(tmp_path.rglob("*" + FEATURES_SUFFIX))
    assert not list(tmp_path.rglob(".*.tmp"))


def _log_and_index(tmp_path, target, results):
    with TrafficWriter(tmp_path) as writer:
        for record in _records(target, results):
            writer.add(record)
    (side,) = list(tmp_path.rglob("*" + FEATURES_SUFFIX))
    return side


def test_corrupt_truncated_and_missing_side_files_are_reported_with_their_path(tmp_path, target):
    """Detects: altered features served to training, or an unreadable / missing side file that goes unreported."""
    results = _engine(target, None, capture=True).generate(_requests()[:3])
    side = _log_and_index(tmp_path / "flipped", target, results)
    data = bytearray(side.read_bytes())
    # Flip bytes inside the second record's values (the file ends with its footer, so count from the start).
    first = results[0].features.numel() * 2
    at = data.index(results[1].features.numpy().tobytes()[:16])
    assert at > first
    data[at + 4: at + 8] = b"\x00\x7c\x00\x7c"  # two float16 infinities
    side.write_bytes(bytes(data))
    logged = LoggedFeatures.index(tmp_path / "flipped")
    assert len(logged) == 3 and not logged.problems  # the footer still reads: the damage shows per record
    n = [r.features.shape[0] for r in results]
    assert logged.lookup("req-1", n[1]) is None
    assert logged.problems and logged.problems[0][0] == str(side) and "checksum" in logged.problems[0][1]
    assert np.array_equal(logged.lookup("req-0", n[0]), results[0].features.numpy())
    assert logged.lookup("req-1", n[1]) is None and len(logged.problems) == 1  # reported once

    truncated = _log_and_index(tmp_path / "truncated", target, results)
    truncated.write_bytes(truncated.read_bytes()[:-40])
    logged = LoggedFeatures.index(tmp_path / "truncated")
    assert len(logged) == 0 and [p for p, _ in logged.problems] == [str(truncated)]

    missing = _log_and_index(tmp_path / "missing", target, results)
    os.remove(missing)
    logged = LoggedFeatures.index(tmp_path / "missing")
    assert len(logged) == 0 and [p for p, _ in logged.problems] == [str(missing)]
    assert "FileNotFound" in logged.problems[0][1] or "No such file" in logged.problems[0][1]


# ------------------------------------------------------------------------------------------- training


def _dataset(records):
    import datasets

    from draftsmith.distill_data import TRAIN_COLUMNS

    rows = [{k: getattr(r, k) for k in TRAIN_COLUMNS} for r in records]
    return datasets.Dataset.from_list(rows)


def _train(target, data, config, logged):
    from draftsmith.distill import DistillStudent, TrainCallback, train

    class Losses(TrainCallback):
        def __init__(self):
            self.stats = []

        def after_step(self, step, stats):
            self.stats.append(stats)

    torch.manual_seed(0)
    seen = Losses()
    student = DistillStudent(derive_drafter(target, [1], reads_target_features=True))
    result = train(student, data, config, target_model=target.model, callbacks=[seen], logged_features=logged)
    return seen.stats, result


def test_training_from_logged_features_matches_recomputing_them(tmp_path, target):
    """Detects: logged features misaligned with the training rows (an off-by-one position, the wrong record,
    a cut prompt), or the target's forward still running for records the log covers. The first step's loss
    and feature loss from the log equal those recomputed by the target, within float16 rounding; so do the
    following steps'."""
    from draftsmith.distill import DistillConfig

    results = _engine(target, DRAFTERS["partial"](target), capture=True).generate(_requests())
    records = _records(target, results)
    _log_and_index(tmp_path, target, results)
    logged = LoggedFeatures.index(tmp_path)
    data = _dataset(records)
    config = DistillConfig(batch_size=3, steps=4, lr=3e-3, feature_cache_gb=0)
    recomputed, plain = _train(target, data, config, None)
    from_log, used = _train(target, data, config, logged)
    assert plain.feature_rows_computed == 12 and plain.feature_rows_logged == 0
    assert used.feature_rows_computed == 0 and used.feature_rows_logged == 12
    for a, b in zip(recomputed, from_log):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3, abs=1e-4)
        assert a["feature_loss"] == pytest.approx(b["feature_loss"], rel=5e-3, abs=1e-5)
    off = _train(target, data, config.model_copy(update={"logged_features": False}), logged)[1]
    assert off.feature_rows_logged == 0 and off.feature_rows_computed == 12

    # A prompt cut by max_seq_len: the row starts inside the logged sequence and still matches it position for
    # position (the features there saw the whole prompt, as serving did, so only the loss's scale is compared).
    short = config.model_copy(update={"max_seq_len": 12, "steps": 2})
    cut = _train(target, data, short, logged)
    assert cut[1].feature_rows_logged == 6 and cut[1].feature_rows_computed == 0
    assert cut[0][0]["loss"] == pytest.approx(_train(target, data, short, None)[0][0]["loss"], rel=0.2)


def test_a_corrupt_side_file_falls_back_to_recomputing_its_records(tmp_path, target):
    """Detects: a record lost to training (or training failing) because its logged features are unreadable.
    Training sees every record: those of the damaged side file through the target's forward."""
    from draftsmith.distill import DistillConfig

    results = _engine(target, None, capture=True).generate(_requests())
    records = _records(target, results)
    with TrafficWriter(tmp_path) as writer:  # two parts: the first three records, then the rest
        for record in records[:3]:
            writer.add(record)
        writer.flush()
        for record in records[3:]:
            writer.add(record)
    sides = sorted(tmp_path.rglob("*" + FEATURES_SUFFIX))
    assert len(sides) == 2
    damaged = next(s for s in sides if b"req-0" in s.read_bytes())
    damaged.write_bytes(damaged.read_bytes()[:100])
    logged = LoggedFeatures.index(tmp_path)
    assert len(logged) == 3 and [p for p, _ in logged.problems] == [str(damaged)]
    config = DistillConfig(batch_size=6, steps=2, feature_cache_gb=0)
    stats, result = _train(target, _dataset(records), config, logged)
    assert result.feature_rows_logged == 6 and result.feature_rows_computed == 6  # 3 + 3 per step
    assert all(s["tokens"] == sum(len(r.output_token_ids) for r in records) for s in stats)


# ------------------------------------------------------------------------------------------- serving


class _LoggerHandle:
    """A stand-in for the TrafficLogger deployment handle: `.remote` calls on a real TrafficLoggerImpl."""

    def __init__(self, impl):
        self.impl = impl

    def __getattr__(self, method):
        impl = self.impl

        class _Method:
            @staticmethod
            def remote(*args):
                result = getattr(impl, method)(*args)

                class _Call:
                    def __await__(self):
                        if asyncio.iscoroutine(result):
                            return result.__await__()
                        return _value(result).__await__()

                    def cancel(self):
                        pass

                return _Call()

        return _Method()


async def _value(value):
    return value


def test_a_replica_logs_features_only_for_logged_requests(tmp_path):
    """Detects: features written for a request that opted out of the log, features missing for one that did
    not, or features switched on by default. Runs the replica's request path (engine thread, sender, logger)."""
    from serve.logger import TrafficLoggerImpl
    from serve.pair_protocol import GenerateRequest
    from serve.spec_pair import SpecPairImpl

    torch.set_num_threads(1)
    off = SpecPairImpl({"target": "tiny", "drafter": None}, _LoggerHandle(None), start=False)
    assert not off.logs_features and not off.loop.engine.capture_features  # off by default
    impl = TrafficLoggerImpl(str(tmp_path), flush_every_records=100)
    pair = SpecPairImpl({"target": "tiny", "drafter": "feature:last1",
                         "engine": {"max_model_len": 128, "max_batch_size": 2, "num_speculative_tokens": 2},
                         "traffic": {"log_features": True, "uri": str(tmp_path)}}, _LoggerHandle(impl))
    try:
        async def run():
            async def one(request):
                return [chunk async for chunk in pair._run(request)][-1]

            asks = [GenerateRequest("kept", [3, 4, 5], max_tokens=6, temperature=0.0),
                    GenerateRequest("opted-out", [6, 7], max_tokens=5, temperature=0.0, log=False),
                    GenerateRequest("sampled", [8, 9, 10, 11], max_tokens=7, temperature=0.9, seed=1)]
            finals = await asyncio.gather(*(one(a) for a in asks))
            assert all(f.finish is not None for f in finals)
            await pair.flush_traffic()
            return pair.traffic.status()

        status = asyncio.run(run())
    finally:
        pair.loop.stop()
    assert pair.loop.engine.capture_features
    assert status["unconfirmed_records"] == 0 and pair.counts["opted_out"] == 1
    assert sorted(scan_traffic(tmp_path).table["request_id"].to_pylist()) == ["kept", "sampled"]
    logged = LoggedFeatures.index(tmp_path)
    assert len(logged) == 2 and "opted-out" not in logged and not logged.problems
    rows = {r["request_id"]: r for r in scan_traffic(tmp_path).table.to_pylist()}
    for request_id, row in rows.items():
        positions = len(row["prompt_token_ids"]) + len(row["output_token_ids"]) - 1
        features = logged.lookup(request_id, positions)
        assert features.shape == (positions, 64) and np.isfinite(features).all()
    assert impl.stats()["features_written"] == 2


def test_the_sender_holds_records_for_a_resend_without_their_features():
    """Detects: a replica keeping every logged request's features until the logger confirms storage."""
    from serve.config import TrafficSettings
    from serve.metrics import ReplicaMetrics
    from serve.traffic_sender import TrafficSender

    from draftsmith.traffic import TrafficRecord

    record = TrafficRecord(request_id="a", created_at=T0, target_id="t", target_revision="r", tokenizer_hash="h",
                           temperature=0.0, max_tokens=2, prompt_token_ids=[1, 2], output_token_ids=[3],
                           target_topk_ids=[[3]], target_topk_logprobs=[[-0.1]], accept_mask=[False],
                           finish_reason="length", features=np.ones((2, 4), np.float16))
    sent = []

    class Handle:
        class log_batch:
            @staticmethod
            def remote(batch):
                sent.append(batch)
                return _value({"instance": "x", "seq": 1, "durable_through": 0})

    sender = TrafficSender(Handle(), TrafficSettings(confirm_before_response=False), ReplicaMetrics(), "m")

    async def run():
        sender.ensure_started()
        sender.enqueue(record)
        await sender.send_pending()
        sender._task.cancel()

    asyncio.run(run())
    assert sent[0][0].features is not None  # the logger received them
    (_, _, held), = sender._unconfirmed
    assert held[0].features is None and held[0] == record  # the copy kept for a resend is the record, lighter


def test_the_job_worker_indexes_the_features_of_its_train_split(tmp_path, target):
    """Detects: the distillation worker missing the side files of its train split (time span, request ids), or
    indexing held-out records. Runs on the job's own dataset (draftsmith.distill_data.build_distill_dataset)."""
    from draftsmith.distill_data import build_distill_dataset
    from jobs.distill_worker import logged_features

    results = _engine(target, None, capture=True).generate(_requests())
    with TrafficWriter(tmp_path) as writer:
        for i, record in enumerate(_records(target, results)):
            writer.add(dataclasses.replace(record, created_at=T0 + dt.timedelta(hours=i)))  # one part per hour
    data = build_distill_dataset(str(tmp_path), target_id=target.model_id, target_revision=target.revision,
                                 tokenizer_hash=target.tokenizer_hash, heldout_fraction=0.34)
    logged = logged_features(str(tmp_path), data.train)
    assert len(data.train) == 3 and len(logged) == 3 and not logged.problems
    assert all(rid in logged for rid in data.train["request_id"])
    assert not any(rid in logged for rid in data.heldout["request_id"])
