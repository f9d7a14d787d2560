"""The pure verification functions: exact distribution on fixed p, q (many rows in one vectorized call)."""

import pytest
import torch

from draftsmith.sampling import processed_probs, sample_from, verify_greedy, verify_sampled


def test_verify_sampled_first_token_follows_p():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    vocab, gamma, n = 6, 3, 40000
    p = torch.softmax(torch.randn(gamma + 1, vocab, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(gamma, vocab, generator=g) * 2, -1)
    drafts = torch.multinomial(q, n, replacement=True, generator=g).T  # [n, gamma]
    out = verify_sampled(drafts, q.expand(n, -1, -1), p.expand(n, -1, -1), torch.full((n,), gamma),
                         torch.rand(n, gamma, generator=g), torch.rand(n, generator=g))
    first = out.tokens[:, 0]
    counts = torch.bincount(first, minlength=vocab).double()
    expected = p[0].double() * n
    _, p_value = scipy_stats.chisquare(counts.numpy(), (expected * counts.sum() / expected.sum()).numpy())
    assert p_value > 1e-3
    # Acceptance of the first draft happens with probability sum_x min(p, q).
    expected_accept = torch.minimum(p[0], q[0]).sum().item()
    assert abs((out.accepted > 0).float().mean().item() - expected_accept) < 0.015


def test_verify_sampled_bonus_token_when_all_accepted():
    p = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    q = torch.tensor([[[0.0, 1.0, 0.0]]])
    out = verify_sampled(torch.tensor([[1]]), q, p, torch.tensor([1]), torch.tensor([[0.5]]), torch.tensor([0.3]))
    assert out.accepted.tolist() == [1] and out.tokens.tolist() == [[1, 2]]


def test_verify_greedy_ragged_gammas():
    logits = torch.full((2, 4, 5), -1.0)
    for pos, tok in enumerate([1, 2, 3, 4]):
        logits[:, pos, tok] = 1.0
    drafts = torch.tensor([[1, 2, 0], [1, 2, 3]])
    out = verify_greedy(drafts, logits, torch.tensor([3, 2]))
    assert out.accepted.tolist() == [2, 2]
    assert out.tokens[0, :3].tolist() == [1, 2, 3]  # recovered: the target's argmax at the rejection
    assert out.tokens[1, :3].tolist() == [1, 2, 3]  # bonus at the row's own gamma


def test_processed_probs_top_k_top_p_and_greedy():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]])).expand(3, 1, 4)
    probs = processed_probs(logits, torch.tensor([1.0, 1.0, 0.0]), torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.7, 1.0]))
    torch.testing.assert_close(probs[0, 0], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    torch.testing.assert_close(probs[1, 0], torch.tensor([0.625, 0.375, 0.0, 0.0]))  # 0.5 < 0.7 keeps the 2nd
    assert probs[2, 0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_sample_from_inverse_cdf():
    probs = torch.tensor([[0.2, 0.0, 0.8]])
    assert sample_from(probs, torch.tensor([0.1])).item() == 0
    assert sample_from(probs, torch.tensor([0.5])).item() == 2
