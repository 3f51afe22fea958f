"""Pair selection rules of SPEC section 3.5."""

from orchestration.pairs import Candidate, select_pair


def cand(mean, length=3, ended=True, variance=0.0, tokens=None):
    return Candidate(tuple(tokens if tokens is not None else range(length)), ended, mean, variance)


def test_worked_example_with_length_control():
    # means [5, 4.8, 3, 1], lengths [900, 300, 500, 200], rho 0.4 -> pair (1, 3)
    cands = [cand(5, 900), cand(4.8, 300), cand(3, 500), cand(1, 200)]
    sel = select_pair(cands, length_control=0.4)
    assert (sel.chosen, sel.rejected) == (1, 3)


def test_rho_zero_picks_extremes_and_breaks_ties_by_variance_then_index():
    cands = [cand(4, variance=0.5, tokens=[1]), cand(4, variance=0.1, tokens=[2]), cand(2, variance=0.3, tokens=[3]),
             cand(2, variance=0.3, tokens=[4]), cand(3, tokens=[5])]
    sel = select_pair(cands)
    assert (sel.chosen, sel.rejected) == (1, 2)


def test_unended_and_unscored_responses_are_not_candidates():
    cands = [cand(5, ended=False, tokens=[1]), cand(None, tokens=[2]), cand(3, tokens=[3]), cand(1, tokens=[4])]
    assert (select_pair(cands).chosen, select_pair(cands).rejected) == (2, 3)


def test_bad_samples():
    assert not select_pair([cand(5, tokens=[1]), cand(None, tokens=[2])]).is_pair  # fewer than two
    equal = select_pair([cand(3, tokens=[1]), cand(3, tokens=[2])])
    assert not equal.is_pair and "equal" in equal.reason
    same_tokens = select_pair([cand(5, tokens=[7, 8]), cand(1, tokens=[7, 8])])
    assert not same_tokens.is_pair and "identical" in same_tokens.reason
