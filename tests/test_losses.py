"""DPO and SFT losses against an independent computation, and the backend's loss plumbing."""

import math

import pytest
import torch

from learner import losses


def test_dpo_matches_independent_formula():
    # Independent: -log(1 / (1 + exp(-beta * delta))) computed in plain Python.
    policy_c, policy_r = [-3.2, -10.0, -0.5], [-4.0, -2.0, -0.7]
    ref_c, ref_r = [-3.0, -9.0, -0.6], [-3.5, -2.5, -0.6]
    beta = 0.3
    expected = []
    for pc, pr, rc, rr in zip(policy_c, policy_r, ref_c, ref_r):
        delta = (pc - rc) - (pr - rr)
        expected.append(math.log(1 + math.exp(-beta * delta)))
    delta = (torch.tensor(policy_c) - torch.tensor(ref_c)) - (torch.tensor(policy_r) - torch.tensor(ref_r))
    got = losses.preference_loss("dpo", delta, beta)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)


def test_dpo_is_ln2_when_policy_equals_reference():
    delta = torch.zeros(5)
    assert torch.allclose(losses.dpo_loss(delta, beta=0.7), torch.full((5,), math.log(2.0)))


def test_sequence_logprobs_and_reduction_use_only_masked_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    labels = torch.randint(0, 7, (2, 4))
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float32)
    token = losses.sequence_logprobs(logits, labels, mask)
    logp = torch.log_softmax(logits, -1)
    manual0 = logp[0, 1, labels[0, 1]] + logp[0, 2, labels[0, 2]]
    assert torch.allclose(losses.reduce_sequence(token, mask, average=False)[0], manual0)
    assert torch.allclose(losses.reduce_sequence(token, mask, average=True)[0], manual0 / 2)


def test_unknown_preference_loss_is_an_error():
    try:
        losses.preference_loss("nope", torch.zeros(1), 0.1)
    except ValueError as e:
        assert "nope" in str(e)
    else:
        raise AssertionError("expected ValueError")


# ---- the whole family against plain-Python formulas (SPEC section 6) ------------------------------------

DELTAS = [0.0, 1.3, -2.1, 4.0]
GAPS = [2.0, 0.5, 3.0, 1.0]  # g_chosen - g_rejected
BETA, ETA = 0.2, 0.7


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _kl(p, q):
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


REFERENCE = {
    "dpo": lambda d, g: -math.log(_sig(BETA * d)),
    "ipo": lambda d, g: (d - 1 / (2 * BETA)) ** 2,
    "rpo_sq": lambda d, g: (BETA * d - ETA * g) ** 2,
    "rpo_bwd_kl": lambda d, g: _kl(_sig(ETA * g), _sig(BETA * d)),
    "rpo_fwd_kl": lambda d, g: _kl(_sig(BETA * d), _sig(ETA * g)),
    "scale": lambda d, g: abs(g) * -math.log(_sig(BETA * d)),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_loss_matches_independent_formula(name):
    got = losses.preference_loss(name, torch.tensor(DELTAS, dtype=torch.float64), BETA,
                                 torch.tensor(GAPS, dtype=torch.float64), gt_reward_scale=ETA)
    expected = [REFERENCE[name](d, g) for d, g in zip(DELTAS, GAPS)]
    assert got.tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name,at_reference", [
    ("dpo", lambda g: math.log(2)),
    ("ipo", lambda g: 1 / (4 * BETA**2)),
    ("rpo_sq", lambda g: (ETA * g) ** 2),
    ("rpo_bwd_kl", lambda g: _kl(_sig(ETA * g), 0.5)),
    ("rpo_fwd_kl", lambda g: _kl(0.5, _sig(ETA * g))),
    ("scale", lambda g: abs(g) * math.log(2)),
])
def test_every_loss_at_pi_equal_pi_ref_is_its_value_at_delta_zero(name, at_reference):
    gaps = torch.tensor(GAPS, dtype=torch.float64)
    got = losses.preference_loss(name, torch.zeros(4, dtype=torch.float64), BETA, gaps, gt_reward_scale=ETA)
    assert got.tolist() == pytest.approx([at_reference(g) for g in GAPS], rel=1e-9)


def test_kl_losses_are_stable_for_large_margins():
    big = torch.tensor([80.0, -80.0])
    for name in ("rpo_bwd_kl", "rpo_fwd_kl"):
        out = losses.preference_loss(name, big, 1.0, torch.tensor([1.0, 1.0]))
        assert torch.isfinite(out).all()


def test_score_aware_losses_need_scores():
    with pytest.raises(ValueError, match="judge scores"):
        losses.preference_loss("rpo_sq", torch.zeros(1), 0.1)
