"""Corrupt inputs (issue 7, fault 5) that the existing unit tests did not cover.

What it does: a serving pair (the replica's logic, no Ray) is pointed at drafter directories broken
in ways test_models.py / test_serve.py do not try (truncated safetensors, wrong tensor shapes, a
corrupt draftsmith_drafter.json, no tokenizer files and another tokenizer's fingerprint): each is
refused with its path in the reason and the previous drafter keeps generating. Traffic records from
another target revision mixed into a log file are left out of a read and reported with that file's
path. Already covered elsewhere: truncated/garbage Parquet files (test_traffic.py), wrong tokenizer
and missing or pickled weights (test_models.py, test_serve.py).

What it does not do: Serve or HTTP (tests/integration/test_serve.py refuses drafters on a running app).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil

import pytest

from draftsmith import models
from draftsmith.specdec import Request
from draftsmith.sampling import SamplingParams
from draftsmith.traffic import TRAFFIC_SCHEMA, TrafficRecord, TrafficScan, TrafficWriter, read_traffic, scan_traffic


@pytest.fixture(scope="module")
def drafters(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    target = models.tiny_model()
    good = models.save_drafter(models.derive_drafter(target, [0]), root / "good", target.tokenizer)

    def broken(name, edit):
        path = root / name
        shutil.copytree(good, path)
        edit(path)
        return path

    def truncate(path):
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])

    def wider_mlp(path):
        config = json.loads((path / "config.json").read_text())
        config["intermediate_size"] *= 2
        (path / "config.json").write_text(json.dumps(config))

    def other_tokenizer(path):
        for f in path.iterdir():
            if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
                f.unlink()
        meta = json.loads((path / "draftsmith_drafter.json").read_text())
        meta["tokenizer_hash"] = "0123456789abcdef"
        (path / "draftsmith_drafter.json").write_text(json.dumps(meta))

    return {
        "truncated-weights": (broken("truncated", truncate), "SafetensorError"),
        "wrong-shapes": (broken("shapes", wider_mlp), "ModelLoadError"),
        "corrupt-meta": (broken("meta", lambda p: (p / "draftsmith_drafter.json").write_text("{not json")),
                         "JSONDecodeError"),
        "other-tokenizer": (broken("notok", other_tokenizer), "IncompatibleTokenizerError"),
        "no-config": (broken("noconfig", lambda p: (p / "config.json").unlink()), "ModelLoadError"),
    }


@pytest.mark.parametrize("case", ["truncated-weights", "wrong-shapes", "corrupt-meta", "other-tokenizer",
                                  "no-config"])
def test_broken_drafter_is_refused_with_its_path_and_the_old_one_serves(drafters, case):
    from serve.spec_pair import SpecPairImpl

    path, kind = drafters[case]
    pair = SpecPairImpl({"target": "tiny", "drafter": "derived:first1", "traffic": {"enabled": False}}, start=False)
    assert pair.drafter_version == "derived-first1"
    pair.reconfigure({"drafter": str(path)})
    assert pair.check_drafter() == "derived-first1"
    (version, reason), = pair.refused.items()
    assert version.startswith(path.name) and kind in reason and str(path) in reason, reason
    assert pair.check_drafter() == "derived-first1" and len(pair.refused) == 1  # refused once, not reloaded
    # An explicit length: the still-loaded old drafter must really draft (auto could switch it off).
    (result,) = pair.loop.engine.generate([Request("r", [1, 2, 3], SamplingParams(max_tokens=6, temperature=0),
                                                   num_speculative_tokens=3)])
    assert len(result.output_token_ids) == 6 and result.drafter_version == "derived-first1"
    assert result.stats.drafted > 0


def _record(i: int, revision: str) -> TrafficRecord:
    return TrafficRecord(request_id=f"r{i}", created_at=dt.datetime(2025, 3, 4, 10, tzinfo=dt.timezone.utc),
                         target_id="tiny", target_revision=revision, tokenizer_hash="abc", temperature=0.0,
                         max_tokens=2, prompt_token_ids=[1], output_token_ids=[2, 3],
                         target_topk_ids=[[2], [3]], target_topk_logprobs=[[-0.1], [-0.2]],
                         accept_mask=[True, False], finish_reason="length")


def test_records_from_another_target_revision_are_left_out_and_reported(tmp_path, caplog):
    with TrafficWriter(tmp_path) as writer:
        for i in range(5):
            writer.add(_record(i, "r1" if i != 3 else "r0-old"))
    (path,) = [str(p) for p in tmp_path.rglob("part-*.parquet")]
    with caplog.at_level(logging.INFO, logger="draftsmith.traffic"):
        scan = scan_traffic(tmp_path, target_id="tiny", target_revision="r1")
    assert sorted(scan.table.column("request_id").to_pylist()) == ["r0", "r1", "r2", "r4"]
    assert scan.mismatched == [(path, 1)] and scan.skipped == []
    assert path in caplog.text and "target_revision=r1" in caplog.text
    it_scan = TrafficScan(table=TRAFFIC_SCHEMA.empty_table())
    assert len(list(read_traffic(tmp_path, target_revision="r1", scan=it_scan))) == 4
    assert it_scan.mismatched == [(path, 1)]
    assert scan_traffic(tmp_path).mismatched == []  # no target filter: nothing is "another target"
