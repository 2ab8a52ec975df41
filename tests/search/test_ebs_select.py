"""EBS selection (search/ebs_select.py): argmax, then the greedy fit to the exact cost target."""
import math

import pytest

from slimtorch.search.ebs_select import fit_choice


def _lp(*ps):
    return [math.log(p) for p in ps]


def test_fit_down_lowers_the_least_confident_layer_first():
    costs = [[2, 4, 8], [2, 4, 8]]
    # layer 0 is sure of 8 bits; layer 1 hesitates between 4 and 8
    logp = [_lp(0.01, 0.01, 0.98), _lp(0.05, 0.45, 0.5)]
    start = [2, 2]
    assert fit_choice(costs, logp, 12, start, "down") == [2, 1]
    assert fit_choice(costs, logp, 12, start, "none") == [2, 2]     # the bare argmax, over the target
    got = fit_choice(costs, logp, 6, start, "down")
    assert sum(c[k] for c, k in zip(costs, got)) <= 6


def test_fit_both_spends_the_remaining_budget_and_never_exceeds_it():
    costs = [[2, 4, 8], [3, 6, 12], [1, 2, 4]]
    logp = [_lp(0.6, 0.3, 0.1), _lp(0.5, 0.4, 0.1), _lp(0.2, 0.7, 0.1)]
    start = [0, 0, 1]
    for limit in range(7, 25):
        down = fit_choice(costs, logp, limit, start, "down")
        both = fit_choice(costs, logp, limit, start, "both")
        cd = sum(c[k] for c, k in zip(costs, down))
        cb = sum(c[k] for c, k in zip(costs, both))
        assert cd <= limit and cb <= limit and cb >= cd
        # nothing else fits: every single upward move from the result exceeds the limit
        for i, c in enumerate(costs):
            for k in range(len(c)):
                if c[k] > c[both[i]]:
                    assert cb + c[k] - c[both[i]] > limit
    assert fit_choice(costs, logp, 7, start, "down") == start       # already within the target


@pytest.mark.parametrize("limit", [6, 9, 13])
def test_fit_is_feasible_from_any_start(limit):
    costs = [[2, 4, 8], [2, 4, 8], [1, 2, 4]]
    logp = [_lp(0.1, 0.1, 0.8)] * 3
    got = fit_choice(costs, logp, limit, [2, 2, 2], "both")
    assert sum(c[k] for c, k in zip(costs, got)) <= limit
