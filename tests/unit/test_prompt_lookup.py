"""Prompt lookup proposes what followed the most recent earlier occurrence of the longest suffix n-gram."""

from draftsmith.prompt_lookup import lookup_proposal


def test_the_longest_suffix_ngram_wins_over_a_more_recent_shorter_one():
    #          0  1  2  3  4  5  6  7  8  9
    tokens = [1, 2, 3, 9, 9, 5, 3, 7, 2, 3]  # suffix "2 3": at 1-2 (then 9 9 5); "3" alone also at 6 (then 7)
    assert lookup_proposal(tokens, min_n=1, max_n=3, count=3) == [9, 9, 5]


def test_among_equally_long_matches_the_most_recent_wins_and_count_limits():
    tokens = [4, 5, 1, 4, 5, 2, 8, 4, 5]
    assert lookup_proposal(tokens, min_n=2, max_n=4, count=2) == [2, 8]
    assert lookup_proposal(tokens, min_n=2, max_n=4, count=10) == [2, 8, 4, 5]  # up to the end of the context


def test_no_proposal_below_min_n_or_without_an_earlier_occurrence():
    assert lookup_proposal([1, 2, 3, 4], min_n=1, max_n=3, count=4) == []
    assert lookup_proposal([7, 1, 2, 7], min_n=2, max_n=3, count=4) == []  # only "7" repeats
    assert lookup_proposal([7, 1, 2, 7], min_n=1, max_n=3, count=4) == [1, 2, 7]
    assert lookup_proposal([7], min_n=1, max_n=3, count=4) == []
    assert lookup_proposal([7, 7, 7], min_n=1, max_n=2, count=0) == []


def test_a_run_of_one_token_proposes_more_of_it():
    assert lookup_proposal([3, 8, 8, 8, 8], min_n=2, max_n=3, count=4) == [8]  # no occurrence has 4 after it
    assert lookup_proposal([3, 8, 8, 8, 8, 8, 8], min_n=2, max_n=2, count=3) == [8, 8, 8]  # not the latest: [8]
