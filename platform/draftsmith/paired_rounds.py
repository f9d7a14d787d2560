"""Two arms of a comparison timed in alternating rounds (ABBA), so that both see the same machine.

On shared cores the speed of the machine drifts over minutes (other work, the host's own load): two arms timed
one after the other can differ by more than what they compare. Timed in rounds that alternate their order
(A B, B A, A B, ...), each round on an interleaved share of the prompts, a drift hits both arms alike. Used by
`draftsmith bench serve` (speculation on and off at each concurrency) and `draftsmith demo` (each speculative
phase against speculation off).

What it does not do: send requests or time anything (the callers do), or judge a ratio.
"""

from __future__ import annotations


def round_schedule(n_prompts: int, rounds: int) -> list[tuple[list[int], tuple[bool, bool]]]:
    """Per round: its prompt indices (every `rounds`-th prompt, so each round draws from the whole list) and
    the order of the two arms as (first arm is A?, ...): (True, False) then (False, True), alternating."""
    rounds = max(1, min(rounds, n_prompts))
    return [(list(range(r, n_prompts, rounds)), (True, False) if r % 2 == 0 else (False, True))
            for r in range(rounds)]
