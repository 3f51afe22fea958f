"""DPO and SFT losses against an independent computation, and the backend's loss plumbing."""

import math

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
