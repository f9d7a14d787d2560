"""Distillation divergences against hand-computed values on tiny examples."""

import math

import pytest
import torch

from draftsmith.losses import DIVERGENCES, distill_loss, mismatch_weights, per_position_divergence

# Teacher: V = 4, top-k = 2: ids (0, 2) with p = (0.5, 0.3), so the tail holds 0.2.
# Student: full distribution (0.4, 0.1, 0.25, 0.25) -> on the bins (id 0, id 2, rest) = (0.4, 0.25, 0.35).
T_IDS = torch.tensor([[0, 2]])
T_LOGP = torch.log(torch.tensor([[0.5, 0.3]]))
S_LOGITS = torch.log(torch.tensor([[0.4, 0.1, 0.25, 0.25]])) + 3.0  # logits, not normalized
# p = (.5, .3, .2), q = (.4, .25, .35), by hand:
EXPECTED = {
    # .5 ln(.5/.4) + .3 ln(.3/.25) + .2 ln(.2/.35)
    "fkl": 0.05434508510820674,
    # .4 ln(.4/.5) + .25 ln(.25/.3) + .35 ln(.35/.2)
    "rkl": 0.06102771605322535,
    # m = (.45, .275, .275); .5 KL(p||m) + .5 KL(q||m) = .5 (0.015092925 + 0.013465961)
    "jsd": 0.014279442687185673,
    # .5 (.1 + .05 + .15)
    "tvd": 0.15,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_divergence_matches_hand_value_with_tail(name):
    d = per_position_divergence(S_LOGITS, teacher_topk_ids=T_IDS, teacher_topk_logprobs=T_LOGP, divergence=name)
    assert d.shape == (1,)
    assert d.item() == pytest.approx(EXPECTED[name], abs=1e-6)


def test_jsd_beta_convention():
    # beta = 0.2: m = .2 p + .8 q = (.42, .26, .32); .2 KL(p||m) + .8 KL(q||m)
    d = per_position_divergence(
        S_LOGITS, teacher_topk_ids=T_IDS, teacher_topk_logprobs=T_LOGP, divergence="jsd", beta=0.2
    )
    assert d.item() == pytest.approx(0.008855653431326613, abs=1e-6)


def test_table_has_the_four_divergences():
    assert set(DIVERGENCES) == {"fkl", "rkl", "jsd", "tvd"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_zero_when_student_equals_teacher(name):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 11, generator=g)
    logp = torch.log_softmax(logits, -1)
    top = logp.topk(3, dim=-1)
    d = per_position_divergence(
        logits, teacher_topk_ids=top.indices, teacher_topk_logprobs=top.values, divergence=name
    )
    assert torch.allclose(d, torch.zeros(5), atol=1e-6)
    d_full = per_position_divergence(logits, teacher_logits=logits, divergence=name)
    assert torch.allclose(d_full, torch.zeros(5), atol=1e-6)


def test_trimmed_student_vocabulary():
    # Student emits only full ids (2, 3, 0) with probs (.5, .3, .2). Teacher top-2: ids (0, 1), p (.6, .3).
    # id 1 is not in the student vocabulary -> student bin mass 0; student tail = .5 + .3 = .8.
    # p = (.6, .3, .1), q = (.2, 0, .8)
    s_logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    s_ids = torch.tensor([2, 3, 0])
    kw = dict(teacher_topk_ids=torch.tensor([[0, 1]]), teacher_topk_logprobs=torch.log(torch.tensor([[0.6, 0.3]])),
              student_token_ids=s_ids)
    tvd = per_position_divergence(s_logits, divergence="tvd", **kw)
    assert tvd.item() == pytest.approx(0.5 * (0.4 + 0.3 + 0.7), abs=1e-6)
    rkl = per_position_divergence(s_logits, divergence="rkl", **kw)  # .2 ln(.2/.6) + 0 + .8 ln(.8/.1)
    assert rkl.item() == pytest.approx(0.2 * math.log(1 / 3) + 0.8 * math.log(8), abs=1e-6)
    fkl = per_position_divergence(s_logits, divergence="fkl", eps=1e-8, **kw)  # empty bin floored at eps
    assert fkl.item() == pytest.approx(0.6 * math.log(3) + 0.3 * math.log(0.3 / 1e-8) + 0.1 * math.log(0.125),
                                       rel=1e-5)


def test_full_teacher_with_trimmed_student_has_tail_bin():
    # Teacher over V_full = 4: (.1, .2, .3, .4); student vocab ids (3, 1) with probs (.5, .5).
    # Bins: id 3, id 1, rest -> p = (.4, .2, .4), q = (.5, .5, 0) -> TVD = .5 (.1 + .3 + .4) = .4
    t_logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    d = per_position_divergence(torch.zeros(1, 2), teacher_logits=t_logits, student_token_ids=torch.tensor([3, 1]),
                                divergence="tvd")
    assert d.item() == pytest.approx(0.4, abs=1e-6)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_full_teacher_logits_equals_topk_when_k_is_v(name):
    g = torch.Generator().manual_seed(1)
    t_logits, s_logits = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    top = torch.log_softmax(t_logits, -1).topk(9, dim=-1)
    a = per_position_divergence(s_logits, teacher_topk_ids=top.indices, teacher_topk_logprobs=top.values,
                                divergence=name)
    b = per_position_divergence(s_logits, teacher_logits=t_logits, divergence=name)
    assert torch.allclose(a, b, atol=1e-5)


def test_topk_is_lower_bound_of_full_divergence():
    g = torch.Generator().manual_seed(2)
    t_logits, s_logits = torch.randn(8, 20, generator=g), torch.randn(8, 20, generator=g)
    top = torch.log_softmax(t_logits, -1).topk(4, dim=-1)
    for name in DIVERGENCES:
        lo = per_position_divergence(s_logits, teacher_topk_ids=top.indices, teacher_topk_logprobs=top.values,
                                     divergence=name)
        full = per_position_divergence(s_logits, teacher_logits=t_logits, divergence=name)
        assert (lo <= full + 1e-6).all(), name


def test_weights_and_mask():
    # Two positions with known fkl: position 0 as above, position 1 identical (0).
    s = torch.cat([S_LOGITS, torch.log(torch.tensor([[0.5, 0.2, 0.3, 0.0 + 1e-30]]))])
    ids = torch.tensor([[0, 2], [0, 2]])
    logp = torch.log(torch.tensor([[0.5, 0.3], [0.5, 0.3]]))
    kw = dict(teacher_topk_ids=ids, teacher_topk_logprobs=logp)
    d = per_position_divergence(s, **kw)
    assert d[1].item() == pytest.approx(0.0, abs=1e-6)
    fkl = EXPECTED["fkl"]
    assert distill_loss(s, **kw).item() == pytest.approx(fkl / 2, abs=1e-6)
    assert distill_loss(s, weights=torch.tensor([3.0, 1.0]), **kw).item() == pytest.approx(3 * fkl / 4, abs=1e-6)
    assert distill_loss(s, mask=torch.tensor([True, False]), **kw).item() == pytest.approx(fkl, abs=1e-6)
    assert distill_loss(s, mask=torch.tensor([False, False]), **kw).item() == 0.0


def test_mismatch_weights():
    w = mismatch_weights(torch.tensor([1, 2, 3]), torch.tensor([1, 5, 3]), wrong_weight=4.0, right_weight=0.5)
    assert w.tolist() == [0.5, 4.0, 0.5]


def test_temperature_scales_student_logits():
    d_t = per_position_divergence(S_LOGITS * 2.0, teacher_topk_ids=T_IDS, teacher_topk_logprobs=T_LOGP,
                                  temperature=2.0)
    assert d_t.item() == pytest.approx(EXPECTED["fkl"], abs=1e-6)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_gradients_finite_even_with_empty_bins(name):
    g = torch.Generator().manual_seed(3)
    s_logits = torch.randn(4, 6, generator=g)
    s_logits[0, :] = torch.tensor([50.0, -50, -50, -50, -50, -50])  # student puts ~all mass on id 0
    s_logits.requires_grad_(True)
    # Teacher k = V (tail exactly 0), and an id the trimmed student lacks.
    top = torch.log_softmax(torch.randn(4, 6, generator=g), -1).topk(6, dim=-1)
    loss = distill_loss(s_logits, teacher_topk_ids=top.indices, teacher_topk_logprobs=top.values,
                        divergence=name, weights=torch.tensor([1.0, 2, 0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s_logits.grad).all()
    assert s_logits.grad.abs().sum() > 0
    s2 = torch.randn(4, 3, generator=g, requires_grad=True)
    loss2 = distill_loss(s2, teacher_topk_ids=top.indices[:, :2], teacher_topk_logprobs=top.values[:, :2],
                         student_token_ids=torch.tensor([5, 0, 2]), divergence=name)
    loss2.backward()
    assert torch.isfinite(loss2) and torch.isfinite(s2.grad).all()


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"student_logits must be \[N, V\]"):
        distill_loss(torch.zeros(2, 3, 4), teacher_logits=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="both be"):
        distill_loss(torch.zeros(2, 4), teacher_topk_ids=torch.zeros(2, 3, dtype=torch.long),
                     teacher_topk_logprobs=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="either"):
        distill_loss(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="outside the student vocabulary"):
        distill_loss(torch.zeros(1, 4), teacher_topk_ids=torch.tensor([[7]]), teacher_topk_logprobs=torch.zeros(1, 1))
    with pytest.raises(ValueError, match=r"mask must be \[N=1\]"):
        distill_loss(S_LOGITS, teacher_topk_ids=T_IDS, teacher_topk_logprobs=T_LOGP, mask=torch.ones(2))
    with pytest.raises(ValueError, match="unknown divergence"):
        distill_loss(S_LOGITS, teacher_topk_ids=T_IDS, teacher_topk_logprobs=T_LOGP, divergence="kl2")
