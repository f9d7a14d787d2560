"""Distillation core: batching, the student forward, losses on engine traffic, the trimmed head, weighting."""

import math

import pytest
import torch

from draftsmith.distill import (
    DistillConfig,
    DistillStudent,
    collate,
    distill_loss,
    make_optimizer,
    student_logits,
    train_step,
)
from draftsmith.engine_config import EngineConfig
from draftsmith.models import derive_drafter, frequent_token_ids, tiny_model
from pipelines.backfill import backfill, generate_records
from draftsmith.distill_data import build_distill_dataset

PROMPTS = ["hello there", "what is a cat?", "count to five", "tell me a story", "abc abc abc", "why?"]


@pytest.fixture(scope="module")
def target():
    return tiny_model()


@pytest.fixture(scope="module")
def records(target):
    drafter = derive_drafter(target, "first1")
    torch.set_num_threads(1)
    return generate_records(target, drafter, PROMPTS, max_tokens=24,
                            engine=EngineConfig(num_speculative_tokens=4, topk_logprobs=8))


def test_engine_records_are_served_traffic(records, target):
    assert len(records) == len(PROMPTS)
    r = records[0]
    assert r.source == "served" and r.target_id == "tiny" and r.tokenizer_hash == target.tokenizer_hash
    assert len(r.target_topk_ids) == len(r.output_token_ids) == len(r.accept_mask)
    assert len(r.target_topk_ids[0]) == 8


def test_collate_shapes_and_masks(records):
    batch = collate(records[:3], max_seq_len=512)
    b, t = batch.mask.shape
    assert b == 3 and t == max(len(r.output_token_ids) for r in records[:3])
    assert batch.topk_ids.shape == batch.topk_logprobs.shape == (3, t, 8)
    for i, r in enumerate(records[:3]):
        n, p = len(r.output_token_ids), len(r.prompt_token_ids)
        assert batch.mask[i].sum() == n
        assert batch.pred_positions[i, 0] == p - 1 and batch.pred_positions[i, n - 1] == p + n - 2
        # teacher forcing: the token at position pred+1 is the output token being predicted
        assert batch.input_ids[i, p - 1 + 1: p + n - 1].tolist() == r.output_token_ids[:-1]
        assert batch.output_ids[i, :n].tolist() == r.output_token_ids
    # padded positions carry a valid uniform distribution, never NaN
    assert torch.isfinite(batch.topk_logprobs).all()
    assert torch.allclose(batch.topk_logprobs[~batch.mask].exp().sum(-1), torch.ones(1))


def test_collate_truncates_to_max_seq_len(records):
    batch = collate(records, max_seq_len=16)
    assert batch.input_ids.shape[1] <= 15
    assert (batch.pred_positions < batch.input_ids.shape[1]).all()
    assert batch.mask.sum(1).min() >= 1


def test_student_logits_match_hf_forward(target, records):
    drafter = derive_drafter(target, "first1")
    batch = collate(records[:2])
    logits = student_logits(drafter, batch)  # [B, T, V]
    full = drafter.model(input_ids=batch.input_ids).logits
    expected = full.gather(1, batch.pred_positions[..., None].expand(-1, -1, full.shape[-1]))
    assert torch.allclose(logits[batch.mask], expected[batch.mask], atol=1e-4)


def _train(student, batch, config, steps):
    torch.manual_seed(config.seed)
    opt = make_optimizer(student, config)
    return [train_step(student, opt, batch, config)["loss"] for _ in range(steps)]


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd", "tvd"])
def test_loss_decreases_on_engine_traffic(target, records, loss):
    student = DistillStudent(derive_drafter(target, "first1"))
    config = DistillConfig(loss=loss, lr=3e-3, batch_size=len(records))
    history = _train(student, collate(records), config, 12)
    assert history[-1] < 0.7 * history[0], history


def test_embeddings_frozen_layers_trained(target, records):
    student = DistillStudent(derive_drafter(target, "first1"))
    embed = student.model.get_input_embeddings().weight.detach().clone()
    layer = student.model.model.layers[0].mlp.down_proj.weight.detach().clone()
    _train(student, collate(records), DistillConfig(lr=1e-2), 2)
    assert torch.equal(embed, student.model.get_input_embeddings().weight)
    assert not torch.equal(layer, student.model.model.layers[0].mlp.down_proj.weight)


@pytest.mark.parametrize("train_head", [True, False])
def test_student_leaves_the_given_drafter_untouched(target, records, train_head):
    """A served drafter handed to DistillStudent keeps its parameters' requires_grad flags and its weights."""
    ids = frequent_token_ids([r.output_token_ids for r in records], 64, always=target.eos_token_ids)
    for drafter in (derive_drafter(target, "first1"), derive_drafter(target, "first1", draft_vocab_ids=ids)):
        for p in drafter.model.parameters():
            p.requires_grad_(False)  # as an inference-only (served) drafter has them
        flags = {n: p.requires_grad for n, p in drafter.model.named_parameters()}
        weights = {n: p.detach().clone() for n, p in drafter.model.named_parameters()}
        target_flags = [p.requires_grad for p in target.model.parameters()]
        student = DistillStudent(drafter, train_head=train_head)
        _train(student, collate(records), DistillConfig(lr=1e-2), 1)
        assert {n: p.requires_grad for n, p in drafter.model.named_parameters()} == flags
        assert all(torch.equal(weights[n], p) for n, p in drafter.model.named_parameters())
        assert [p.requires_grad for p in target.model.parameters()] == target_flags
        trained = {n for n, p in student.named_parameters() if p.requires_grad}
        assert any(".layers." in n for n in trained) and not any("embed_tokens" in n for n in trained)
        assert (any(".norm." in n for n in trained)) == train_head


def test_bench_and_job_train_with_one_loop_and_data_order(target, records):
    """draftsmith.distill.train is the loop of both the Ray Train worker and the in-process benchmark: the
    data order is a function of (seed, step, rank, world), and two runs of the same config agree exactly."""
    import datasets

    from draftsmith.distill import TrainCallback, batch_indices, total_steps, train

    data = datasets.Dataset.from_list([{k: getattr(r, k) for k in ("prompt_token_ids", "output_token_ids",
                                        "target_topk_ids", "target_topk_logprobs", "accept_mask")} for r in records])
    config = DistillConfig(lr=3e-3, batch_size=2, epochs=2, seed=3)
    assert total_steps(config, len(data)) == 6 and total_steps(config, len(data), world=2) == 4
    epoch = sorted(i for step in range(3) for i in batch_indices(config, len(data), step))
    assert epoch == list(range(len(data)))  # one epoch sees every record once
    shards = [batch_indices(config, len(data), 0, rank=r, world=2) for r in (0, 1)]
    assert not set(shards[0]) & set(shards[1])

    class Seen(TrainCallback):
        def __init__(self):
            self.reports, self.losses = [], []

        def after_step(self, step, stats):
            self.losses.append(stats["loss"])

        def report(self, metrics, *, checkpoint):
            self.reports.append((metrics["step"], checkpoint))

    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        seen = Seen()
        result = train(DistillStudent(derive_drafter(target, "first1")), data, config, report_every=2,
                       checkpoint_every=4, callbacks=[seen])
        runs.append((seen, result))
    (a, ra), (b, rb) = runs
    assert a.losses == b.losses and ra.step == 6 and ra.tokens_per_worker == rb.tokens_per_worker > 0
    assert a.reports == [(2, False), (4, True), (6, True)]


def test_trimmed_head_trains_and_maps_ids(target, records):
    ids = frequent_token_ids([r.output_token_ids for r in records], 64, always=target.eos_token_ids)
    drafter = derive_drafter(target, "first1", draft_vocab_ids=ids)
    student = DistillStudent(drafter)
    batch = collate(records)
    assert student_logits(student, batch).shape[-1] == ids.numel()
    head_before = student.head.detach().clone()
    history = _train(student, batch, DistillConfig(lr=3e-3), 10)
    assert history[-1] < history[0]
    assert not torch.equal(head_before, student.head.detach())
    trained = student.to_drafter()
    assert trained.head_weight.shape == (ids.numel(), target.model.config.hidden_size)
    assert torch.equal(trained.head_token_ids, ids)


def test_wrong_position_weighting_changes_the_loss(target, records):
    student = DistillStudent(derive_drafter(target, "first1"))
    batch = collate(records)
    plain, stats = distill_loss(student, batch, DistillConfig())
    weighted, _ = distill_loss(student, batch, DistillConfig(wrong_weight=5.0))
    assert 0.0 <= stats["top1_match"] < 1.0  # some positions are wrong, some may be right
    assert not math.isclose(plain.item(), weighted.item(), rel_tol=1e-6)


def test_full_teacher_logits_path(target, records):
    student = DistillStudent(derive_drafter(target, "first1"))
    batch = collate(records)
    config = DistillConfig(full_teacher_logits=True, lr=3e-3)
    with pytest.raises(ValueError, match="target_model"):
        distill_loss(student, batch, config)
    opt = make_optimizer(student, config)
    history = [train_step(student, opt, batch, config, target_model=target.model)["loss"] for _ in range(8)]
    assert history[-1] < history[0]


def test_layer_parallel_aware_training_trains_both_forwards(target, records):
    batch = collate(records[:2])
    plain = student_logits(DistillStudent(derive_drafter(target, [0, 1])), batch)
    # one layer per group is the ordinary forward, once
    single = DistillStudent(derive_drafter(target, [0, 1]), layer_parallel_groups=1)
    assert torch.allclose(student_logits(single, batch)[batch.mask], plain[batch.mask], atol=1e-4)
    # groups of 2: the sequential rows, then the layer-parallel rows, in one forward
    grouped = DistillStudent(derive_drafter(target, [0, 1]), layer_parallel_groups=2)
    both = student_logits(grouped, batch)
    b = batch.input_ids.shape[0]
    assert both.shape[0] == 2 * b
    assert torch.allclose(both[:b][batch.mask], plain[batch.mask], atol=1e-4)
    assert not torch.allclose(both[b:][batch.mask], plain[batch.mask], atol=1e-3)
    loss, stats = distill_loss(grouped, batch, DistillConfig())
    assert stats["tokens"] == batch.num_tokens and 0.0 <= stats["top1_match_layer_parallel"] <= 1.0
    loss.backward()  # differentiable through the layer-parallel forward
    assert all(p.grad is not None for p in grouped.model.model.layers.parameters())
    # the serving plan's explicit group sizes: all ones is sequential, a group of two is aware
    assert not DistillStudent(derive_drafter(target, [0, 1]), layer_parallel_groups=[1, 1]).layer_parallel_aware
    assert DistillStudent(derive_drafter(target, [0, 1]), layer_parallel_groups=(2,)).layer_parallel_aware
    with pytest.raises(ValueError, match="covers 3 layers, the drafter has 2"):
        DistillStudent(derive_drafter(target, [0, 1]), layer_parallel_groups=(1, 2))
    with pytest.raises(ValueError, match="layer_parallel_groups"):
        DistillConfig(layer_parallel_groups=(1, 0))


def test_feature_drafter_trains_as_it_serves(target, records):
    """The feature-reading student's logits are the engine runner's for the same target features; training
    lowers both losses, trains the input map and raises the engine's acceptance on these prompts."""
    from draftsmith.distill import teacher_features
    from draftsmith.evaluation import evaluate_drafters
    from draftsmith.specdec import runner_for

    drafter = derive_drafter(target, [1], reads_target_features=True)
    student = DistillStudent(drafter)
    batch = collate(records[:3])
    features = teacher_features(target.model, batch)
    logits = student_logits(student, batch, features)  # [B, T, V]
    runner = runner_for(None, drafter)
    b, length = batch.input_ids.shape
    cache = runner.new_cache(b, length)
    positions = torch.arange(length - 1)[None].expand(b, -1)
    served = runner.forward(batch.input_ids[:, 1:], positions, cache, slice(0, b), features=features[:, :-1])
    expected = served.gather(1, (batch.pred_positions - 1).clamp(min=0)[..., None].expand(-1, -1, served.shape[-1]))
    assert torch.allclose(logits[batch.mask], expected[batch.mask], atol=1e-3)
    with pytest.raises(ValueError, match="target_model"):
        distill_loss(student, batch, DistillConfig())
    with pytest.raises(ValueError, match="layer-parallel"):
        DistillStudent(drafter, layer_parallel_groups=2)

    prompts = [r.prompt_token_ids for r in records]
    def acceptance(d):
        return evaluate_drafters(target, {"d": d}, prompts, engine=EngineConfig(num_speculative_tokens=3),
                                 max_new_tokens=24, temperatures=(0.0,),
                                 measure_autoregressive=False, warmup=False).get("d").token_acceptance
    before = acceptance(drafter)
    fc = student.feature_fc.detach().clone()
    config = DistillConfig(lr=3e-3)
    opt = make_optimizer(student, config)
    full = collate(records)
    history = [train_step(student, opt, full, config, target_model=target.model) for _ in range(25)]
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert history[-1]["feature_loss"] < history[0]["feature_loss"]
    assert not torch.equal(fc, student.feature_fc.detach())
    trained = student.to_drafter()
    after = acceptance(trained)
    assert trained.reads_target_features and after > before


def test_target_feature_cache_reuses_records_within_its_budget(target, records):
    from draftsmith.distill import TargetFeatureCache, teacher_features

    batch = collate(records[:3])
    fresh = teacher_features(target.model, batch)
    cache = TargetFeatureCache(target.model, max_bytes=2**30)
    first = cache.features(["a", "b", "c"], batch)
    again = cache.features(["a", "b", "c"], batch)
    assert cache.computed == 3  # the second call read the cache only
    lengths = (batch.pred_positions * batch.mask).amax(1) + 1
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(first[i, :n], fresh[i, :n])
        torch.testing.assert_close(again[i, :n], fresh[i, :n], atol=2e-3, rtol=2e-3)  # kept as float16
        assert not again[i, n:].any()  # padding stays zero
    reordered = cache.features(["c", "a"], collate([records[2], records[0]]))
    torch.testing.assert_close(reordered[1, : lengths[0]], fresh[0, : lengths[0]], atol=2e-3, rtol=2e-3)
    tiny_budget = TargetFeatureCache(target.model, max_bytes=1)
    tiny_budget.features(["a"], collate(records[:1]))
    tiny_budget.features(["a"], collate(records[:1]))
    assert tiny_budget.computed == 2 and tiny_budget.bytes == 0  # nothing fits: recomputed


def test_config_is_validated():
    with pytest.raises(ValueError, match="loss"):
        DistillConfig(loss="mse")
    with pytest.raises(ValueError, match="frozen"):
        DistillConfig().lr = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="jsd_beta"):
        DistillConfig(jsd_beta=1.0)


def test_dataset_dedupes_and_splits_by_time(tmp_path, target, records):
    from draftsmith.traffic import TrafficWriter

    uri = str(tmp_path / "traffic")
    with TrafficWriter(uri) as writer:
        for r in records + records[:2]:  # two duplicates
            writer.add(r)
    (tmp_path / "traffic" / "date=2020-01-01" / "hour=00").mkdir(parents=True)
    (tmp_path / "traffic" / "date=2020-01-01" / "hour=00" / "bad.parquet").write_bytes(b"not parquet")
    data = build_distill_dataset(uri, target_id="tiny", target_revision=target.revision,
                                 tokenizer_hash=target.tokenizer_hash, heldout_fraction=0.34)
    s = data.stats
    assert s["records_scanned"] == len(records) + 2 and s["duplicates"] == 2 and s["records"] == len(records)
    assert s["heldout_records"] == math.ceil(len(records) * 0.34) and len(data.train) + len(data.heldout) == len(records)
    assert len(s["skipped_files"]) == 1 and s["skipped_files"][0]["path"].endswith("bad.parquet")
    assert s["output_tokens"] == sum(len(r.output_token_ids) for r in records)
    assert max(data.train["created_at"]) <= min(data.heldout["created_at"])
    assert collate(list(data.train)).mask.shape[0] == len(data.train)
    other = build_distill_dataset(uri, target_id="tiny", target_revision=target.revision, tokenizer_hash="nope")
    assert other.stats["records"] == 0


def test_backfill_scores_conversations(tmp_path, target):
    from draftsmith.traffic import scan_traffic

    conversations = [
        {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello!"},
                                      {"from": "human", "value": "more"}, {"from": "gpt", "value": "sure thing"}]},
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "no reply"}],
    ]
    uri = str(tmp_path / "bf")
    n = backfill(target, conversations, uri, max_output_tokens=6, topk=4, batch_size=2, all_turns=True,
                 progress=False)
    assert n == 3
    rows = scan_traffic(uri).table.to_pylist()
    assert {r["source"] for r in rows} == {"backfill"}
    by_len = sorted(rows, key=lambda r: len(r["output_token_ids"]))
    assert by_len[0]["output_token_ids"] == target.tokenizer("4")["input_ids"] + [target.tokenizer.eos_token_id]
    assert by_len[-1]["finish_reason"] == "length" and len(by_len[-1]["output_token_ids"]) == 6
    r = by_len[0]
    assert not any(r["accept_mask"]) and r["drafter_version"] == ""
    # one teacher-forced forward gives the same top-k as the model on the exact sequence
    seq = torch.tensor([r["prompt_token_ids"] + r["output_token_ids"][:-1]])
    logp = target.model(input_ids=seq).logits[0, len(r["prompt_token_ids"]) - 1:].log_softmax(-1)
    assert torch.equal(logp.topk(4).indices, torch.tensor(r["target_topk_ids"]))


def test_target_feature_cache_takes_logged_rows_and_computes_only_the_others(target, records):
    """Detects: the target's forward running for rows whose features were logged at serve time, or a logged
    row's features landing in another row. (Logged rows come from draftsmith.traffic_features; here stand-ins.)"""
    from draftsmith.distill import TargetFeatureCache, teacher_features

    batch = collate(records[:3])
    fresh = teacher_features(target.model, batch)
    lengths = batch.input_lengths.tolist()
    marker = torch.full((lengths[1], fresh.shape[-1]), 7.0, dtype=torch.float16)
    cache = TargetFeatureCache(target.model, max_bytes=0)
    out = cache.features(["a", "b", "c"], batch, logged=[None, marker, None])
    assert cache.computed == 2 and cache.logged == 1
    assert torch.equal(out[1, : lengths[1]], marker.float()) and not out[1, lengths[1]:].any()
    for i in (0, 2):
        torch.testing.assert_close(out[i, : lengths[i]], fresh[i, : lengths[i]])
