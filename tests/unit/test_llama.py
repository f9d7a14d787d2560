"""CPU weight prepacking: the same values as the dense path for any row count, and never a stale copy."""

import pytest
import torch
import torch.nn.functional as F

from draftsmith.layer_parallel import split_target
from draftsmith.llama import CausalLMRunner, PrepackedLinear, can_prepack
from draftsmith.models import derive_drafter, tiny_model
from draftsmith.specdec import runner_for

pytestmark = pytest.mark.skipif(not can_prepack(torch.float32, "cpu"),
                                reason="this torch build cannot prepack CPU weights")


@pytest.mark.parametrize("shape", [(1, 32), (5, 32), (2, 3, 32)])
def test_prepacked_linear_matches_dense_for_any_row_count(shape):
    weight, bias = torch.randn(48, 32), torch.randn(48)
    linear = PrepackedLinear([weight], batch_hint=4)
    assert linear.packed_copy(weight) is not None
    x = torch.randn(shape)
    torch.testing.assert_close(linear(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        frozen = torch.randn(48, 32)  # an inference tensor has no version counter
        torch.testing.assert_close(PrepackedLinear([frozen], 4)(x, frozen), F.linear(x, frozen), rtol=1e-5, atol=1e-5)


def test_prepacked_linear_never_uses_a_stale_copy():
    weight, x = torch.randn(16, 8), torch.randn(3, 8)
    linear = PrepackedLinear([weight], batch_hint=4)
    assert linear.packed_copy(weight) is not None
    with torch.no_grad():
        weight.mul_(2)  # trained in place after packing
    assert linear.packed_copy(weight) is None
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight))
    weight.data = torch.randn(16, 8)  # replaced (as a move to another device does)
    assert linear.packed_copy(weight) is None
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight))
    other = torch.randn(16, 8)  # never packed
    assert linear.packed_copy(other) is None
    torch.testing.assert_close(linear(x, other), F.linear(x, other))


def _forward(runner, ids, features=None):
    positions = torch.arange(ids.shape[1])[None].expand_as(ids)
    with torch.inference_mode():
        return runner.forward(ids, positions, runner.new_cache(ids.shape[0], 16), slice(0, ids.shape[0]),
                              features=features, return_features=True)


def test_prepacked_runner_matches_the_dense_runner():
    target = tiny_model()
    feature_drafter = derive_drafter(target, [1], reads_target_features=True)
    trimmed = derive_drafter(target, [0], draft_vocab_ids=torch.arange(0, 259, 2))
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    features = torch.randn(2, 5, target.model.config.hidden_size)
    for model, drafter, feats, packed_weights in [
        (target.model, None, None, 1 + 7 * target.model.config.num_hidden_layers),
        (None, feature_drafter, features, 1 + 1 + 7),  # head, feature map, one layer
        (None, trimmed, None, 1 + 7),
    ]:
        dense, packed = runner_for(model, drafter, prepack=False), runner_for(model, drafter)
        assert dense.linear is F.linear
        assert isinstance(packed.linear, PrepackedLinear) and len(packed.linear) == packed_weights
        weights = [packed.head] + [w for lw in packed.layers for w in (lw.q, lw.k, lw.v, lw.o, lw.gate, lw.up, lw.down)]
        assert all(packed.linear.packed_copy(w) is not None for w in weights)  # the forward below runs packed
        (dense_logits, dense_features), (logits, feats_out) = _forward(dense, ids, feats), _forward(packed, ids, feats)
        torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(feats_out, dense_features, rtol=1e-4, atol=1e-4)


def test_prepack_is_refused_where_it_cannot_pack():
    runner = CausalLMRunner(tiny_model().model.half())
    assert runner.prepack() is False and runner.linear is F.linear


def test_split_target_drops_the_packed_copies():
    runner = runner_for(tiny_model().model)
    assert isinstance(runner.linear, PrepackedLinear)
    split_target(runner, ["cpu", "cpu"])
    assert runner.linear is F.linear
