"""Prompt lookup: draft by copying what followed an earlier occurrence of the sequence's last n-gram.

The model-free proposer of vLLM's "ngram" speculative method (prompt lookup decoding): when the last n
tokens of a sequence (prompt and output so far) occurred earlier in the same sequence, for the longest
such n between `min_n` and `max_n`, propose the tokens that followed the most recent occurrence. It
costs no forward pass, and a target that quotes its prompt or repeats itself (small models decoding
greedily do both often) accepts most of what it proposes; the engine verifies it like any draft, so
output stays lossless.

Pure Python over token lists. What it does not do: batching, verification (specdec.py), drafting beside
a drafter (proposers/lookup.py and proposers/chain.py), validating the n-gram range (EngineConfig).
"""

from __future__ import annotations

from collections.abc import Sequence


def lookup_proposal(tokens: Sequence[int], *, min_n: int, max_n: int, count: int) -> list[int]:
    """Up to `count` tokens that followed an earlier occurrence of the longest suffix n-gram of `tokens` with
    min_n <= n <= max_n: the most recent occurrence followed by `count` tokens, else the most recent one
    (inside a run of one repeated token the latest occurrence is followed by a single token);
    [] when no such n-gram occurs earlier (or count < 1)."""
    length = len(tokens)
    longest = min(max_n, length - 1)  # an earlier occurrence ends at length - 2 at the latest
    if count < 1 or longest < min_n:
        return []
    last = tokens[-1]
    best, best_end = (0, False), -1
    for end in range(length - 2, -1, -1):  # most recent first: ties keep the more recent
        if tokens[end] != last:
            continue
        n = 1
        while n < longest and n <= end and tokens[end - n] == tokens[length - 1 - n]:
            n += 1
        rank = (n, end + count < length)
        if rank > best:
            best, best_end = rank, end
            if rank == (longest, True):
                break
    if best[0] < min_n:
        return []
    return list(tokens[best_end + 1: best_end + 1 + count])
