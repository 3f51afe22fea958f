"""losses.token_logprobs (chunked logit[label] - logsumexp) against the plain float64 log-softmax."""

import pytest
import torch

from learner import losses


def naive(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 rows at a vocabulary of 50: several chunks and a short last one."""
    monkeypatch.setattr(losses, "_LOGPROB_CHUNK_ELEMENTS", 150)


@pytest.mark.parametrize("seed", [0, 1])
def test_values_and_gradients_match_float64_log_softmax(small_chunks, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(11, 50, generator=g)).requires_grad_(True)
    labels = torch.randint(0, 50, (11,), generator=g)
    weights = torch.randn(11, generator=g)
    out = losses.token_logprobs(logits, labels)
    assert out.dtype == torch.float32
    (out * weights).sum().backward()
    ref_logits = logits.detach().double().requires_grad_(True)
    ref = naive(ref_logits, labels)
    (ref * weights.double()).sum().backward()
    assert torch.allclose(out.double(), ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(logits.grad.double(), ref_logits.grad, rtol=1e-5, atol=1e-7)


def test_gradcheck_in_float64(small_chunks):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(7, 50, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (7,), generator=g)
    assert torch.autograd.gradcheck(lambda x: losses.token_logprobs(x, labels), (logits,))


def test_bf16_logits_reduce_in_float32_and_give_the_upcast_path_gradient(small_chunks):
    """bf16 logits: the log-prob equals the float32 log-softmax of the same (upcast) logits, and the bf16
    gradient is that path's float32 gradient rounded once, even for a near-certain label (1 - p cancels)."""
    g = torch.Generator().manual_seed(3)
    logits = (3 * torch.randn(9, 50, generator=g)).bfloat16()
    labels = torch.randint(0, 50, (9,), generator=g)
    logits[0, labels[0]] = 16.0  # p(label) = 1 - 1e-4: bf16 arithmetic would round 1 - p to 0 or 2^-8
    x = logits.clone().requires_grad_(True)
    out = losses.token_logprobs(x, labels)
    assert out.dtype == torch.float32
    out.sum().backward()
    ref_logits = logits.double().requires_grad_(True)
    ref = naive(ref_logits, labels)
    ref.sum().backward()
    assert torch.allclose(out.double(), ref, rtol=1e-6, atol=1e-6)
    assert x.grad.dtype == torch.bfloat16
    expected = ref_logits.grad.to(torch.bfloat16)
    assert torch.equal(x.grad, expected) or torch.allclose(x.grad.double(), expected.double(), rtol=2 ** -7, atol=0)
    assert torch.allclose(x.grad[0, labels[0]].double(), ref_logits.grad[0, labels[0]], rtol=2 ** -7)


def test_sequence_logprobs_masks_and_keeps_the_shape():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 13, generator=g)
    labels = torch.randint(0, 13, (2, 5), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.float32)
    out = losses.sequence_logprobs(logits, labels, mask)
    assert out.shape == (2, 5)
    assert torch.allclose(out.double(), naive(logits, labels) * mask.double(), atol=1e-6)
    assert (out[mask == 0] == 0).all()


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="logits \\[N, V\\] and labels \\[N\\]"):
        losses.token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))
