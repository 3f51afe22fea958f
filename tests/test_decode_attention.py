"""The Triton decode-attention kernel: compiled on a GPU, through Triton's interpreter on CPU (conftest sets
TRITON_INTERPRET there); skipped without Triton.

The kernel is the GPU engine's decode attention; here it is checked against a float64 reference on cache
views with real slot strides, and the engine using it is checked against the engine using SDPA.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from actors.engines import decode_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def interpreted():
    """The kernel module, where it can run: on the GPU, or on CPU under Triton's interpreter."""
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set (tests/conftest.py sets it before triton loads)")
    return decode_attention


def reference(q, k, v, lengths):
    """float64 softmax(q k^T / sqrt(d)) v per slot over its first lengths[b] keys, keys shared per group."""
    b, h, d = q.shape
    group = h // k.shape[1]
    out = torch.empty(b, h, d, dtype=torch.float64)
    for i in range(b):
        n = int(lengths[i])
        keys = k[i, :, :n].double().repeat_interleave(group, 0)  # [h, n, d]
        values = v[i, :, :n].double().repeat_interleave(group, 0)
        scores = torch.einsum("hd,hnd->hn", q[i].double(), keys) / d**0.5
        out[i] = torch.einsum("hn,hnd->hd", scores.softmax(-1), values)
    return out


@pytest.mark.parametrize("dtype,heads,kv_heads,head_dim", [
    (torch.float32, 8, 2, 64),   # grouped-query, Llama-like
    (torch.float32, 6, 6, 48),   # multi-head, head_dim not a power of two (padded lanes)
    (torch.float16, 32, 8, 64),  # Llama-3.2-1B's grouping, half precision
    # bfloat16 on the GPU only: Triton's interpreter mishandles bfloat16 matrix products.
    pytest.param(torch.bfloat16, 32, 8, 64, marks=pytest.mark.gpu),
])
def test_kernel_matches_float64_attention(interpreted, dtype, heads, kv_heads, head_dim, splits=1):
    g = torch.Generator().manual_seed(heads * head_dim)
    slots, window = 7, 320
    # A cache with more slots than the batch and a wider window than any length: the kernel reads views.
    cache_k = torch.randn(slots + 3, kv_heads, window + 64, head_dim, generator=g).to(dtype)
    cache_v = torch.randn(slots + 3, kv_heads, window + 64, head_dim, generator=g).to(dtype)
    # Poison what no slot may read: positions at and past each length.
    lengths = torch.tensor([1, 63, 64, 65, 200, 319, 320])
    for i, n in enumerate(lengths.tolist()):
        cache_k[i, :, n:] = float("nan")
        cache_v[i, :, n:] = float("nan")
    q = torch.randn(slots, heads, head_dim, generator=g).to(dtype)
    k, v = cache_k.to(DEVICE), cache_v.to(DEVICE)
    out = interpreted.decode_attention(q.to(DEVICE), k[:slots, :, :window], v[:slots, :, :window],
                                       lengths.to(DEVICE), splits=splits).cpu()
    want = reference(q, cache_k[:slots], cache_v[:slots], lengths)
    assert out.dtype == dtype and out.shape == q.shape
    assert not out.isnan().any()
    error = ((out.double() - want).norm() / want.norm()).item()
    tolerance = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert error < tolerance, error


def test_split_context_kernel_matches_float64_attention(interpreted):
    """Four programs per slot and KV head, merged: shares of the short contexts are empty (weight 0)."""
    test_kernel_matches_float64_attention(interpreted, torch.float32, 8, 2, 64, splits=4)


def test_kernel_rejects_bad_head_counts(interpreted):
    q = torch.randn(2, 6, 64, device=DEVICE)
    kv = torch.randn(2, 4, 256, 64, device=DEVICE)
    with pytest.raises(ValueError, match="not a multiple"):
        interpreted.decode_attention(q, kv, kv, torch.tensor([3, 4], device=DEVICE))
    with pytest.raises(ValueError, match="power of two"):
        interpreted.decode_attention(q[:, :4], kv, kv, torch.tensor([3, 4], device=DEVICE), splits=3)


def test_engine_with_kernel_generates_the_sdpa_tokens(interpreted, tmp_path):
    """Greedy and sampled generation through the kernel give the tokens of the SDPA path (float32)."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from actors.engines.protocol import GenerationRequest, SamplingParams
    from actors.engines.torch_engine import TorchEngine

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=None, bos_token_id=None, pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    vocab = {f"t{i}": i for i in range(128)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0"))).save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(1)
    reqs = [GenerationRequest(torch.randint(3, 120, (int(n),), generator=g).tolist(),
                              SamplingParams(temperature=t, max_new_tokens=40), seed=i)
            for i, (n, t) in enumerate(zip([3, 17, 9, 30, 5], [0.0, 0.0, 0.9, 0.9, 0.0]))]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engines = [TorchEngine(str(tmp_path), device=DEVICE, max_batch_size=4, max_seq_len=512, decode_kernel=kernel,
                               cuda_graphs=False) for kernel in (False, True)]
        sdpa, kernel = (engine.generate(reqs) for engine in engines)
    finally:
        torch.set_num_threads(previous)
    assert [r.token_ids for r in kernel] == [r.token_ids for r in sdpa]


# ------------------------------------------------------------------------------- fused norm and SwiGLU


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_fused_norm_and_swiglu_match_the_eager_modules(interpreted, dtype):
    from actors.engines import fused_ops
    from actors.engines.llama import RMSNorm

    g = torch.Generator().manual_seed(7)
    hidden, inter = 96, 160  # not powers of two: masked lanes
    norm = RMSNorm(hidden, 1e-5, DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_((1 + 0.3 * torch.randn(hidden, generator=g)).to(dtype))
    x = torch.randn(3, 5, hidden, generator=g).to(dtype).to(DEVICE)
    r = torch.randn(3, 5, hidden, generator=g).to(dtype).to(DEVICE)
    total, normed = fused_ops.add_rmsnorm(x, r, norm.weight, norm.eps)
    assert torch.equal(total, x + r)
    want = norm(x + r)
    # Same rounding points as eager; float32 sums in another order may move a value by one unit of rounding.
    ulp = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert ((normed.float() - want.float()).abs() <= ulp * want.float().abs().clamp(min=1)).all()
    same, normed_only = fused_ops.add_rmsnorm(x, None, norm.weight, norm.eps)
    assert same is x or torch.equal(same, x)
    assert ((normed_only.float() - norm(x).float()).abs() <= ulp * norm(x).float().abs().clamp(min=1)).all()

    gate_up = torch.randn(4, 2, 2 * inter, generator=g).to(dtype).to(DEVICE)
    gate, up = gate_up.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    got = fused_ops.silu_mul(gate_up)
    assert got.shape == want.shape
    assert ((got.float() - want.float()).abs() <= ulp * want.float().abs().clamp(min=1)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_fused_rope_and_cache_write_match_the_eager_path(interpreted, dtype):
    from actors.engines import fused_ops
    from actors.engines.kv_cache import KVCache
    from actors.engines.llama import apply_rope

    g = torch.Generator().manual_seed(11)
    heads, kv_heads, dim, slots, seq = 8, 2, 32, 5, 64
    positions = torch.tensor([0, 7, 31, 63, 12])
    angles = torch.rand(seq, dim // 2, generator=g) * 6.0
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    qkv = torch.randn(slots, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    ours = KVCache(1, slots + 2, kv_heads, seq, dim, dtype=dtype, device=DEVICE)
    theirs = KVCache(1, slots + 2, kv_heads, seq, dim, dtype=dtype, device="cpu")
    q = fused_ops.rope_and_cache(qkv.to(DEVICE), positions.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE),
                                 ours.k[0], ours.v[0], heads, kv_heads).cpu()
    # The eager path: split, rotate with cos/sin in the model dtype, write one position per slot.
    q_ref, k_ref, v_ref = qkv.view(slots, 1, -1).split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    c, s = cos[positions][:, None, None].to(dtype), sin[positions][:, None, None].to(dtype)
    q_ref = apply_rope(q_ref.view(slots, 1, heads, dim).transpose(1, 2), c, s)[:, :, 0]
    k_ref = apply_rope(k_ref.view(slots, 1, kv_heads, dim).transpose(1, 2), c, s)
    theirs.write_decode(0, positions, k_ref, v_ref.view(slots, 1, kv_heads, dim).transpose(1, 2))
    # The same rounding points as eager; a GPU may contract a product and a sum into one fused multiply-add
    # (float32), so allow one unit of rounding. Values are copied exactly.
    ulp = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(q, q_ref, rtol=ulp, atol=ulp)
    torch.testing.assert_close(ours.k.cpu(), theirs.k, rtol=ulp, atol=ulp)
    assert torch.equal(ours.v.cpu(), theirs.v)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_fused_rope_and_cache_write_of_a_prefill_match_the_eager_path(interpreted, dtype):
    """A prefill's every prompt token: rotated queries and keys returned, keys and values in their slots'
    positions [0, T) of the cache, as the eager rope and KVCache.write_prefill put them."""
    from actors.engines import fused_ops
    from actors.engines.kv_cache import KVCache
    from actors.engines.llama import apply_rope

    g = torch.Generator().manual_seed(12)
    heads, kv_heads, dim, seq, t = 6, 2, 16, 32, 5
    slots = torch.tensor([3, 0, 4])
    b = len(slots)
    angles = torch.rand(seq, dim // 2, generator=g) * 6.0
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    qkv = torch.randn(b, t, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    positions = torch.arange(t).expand(b, t)
    ours = KVCache(1, 6, kv_heads, seq, dim, dtype=dtype, device=DEVICE)
    theirs = KVCache(1, 6, kv_heads, seq, dim, dtype=dtype, device="cpu")
    q, k = fused_ops.rope_and_cache(qkv.view(b * t, -1).to(DEVICE), positions.reshape(-1).to(DEVICE), cos.to(DEVICE),
                                    sin.to(DEVICE), ours.k[0], ours.v[0], heads, kv_heads,
                                    slots=slots.repeat_interleave(t).to(DEVICE), keys=True)
    q_ref, k_ref, v_ref = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    c, s = cos[positions][:, None].to(dtype), sin[positions][:, None].to(dtype)
    q_ref = apply_rope(q_ref.view(b, t, heads, dim).transpose(1, 2), c, s)
    k_ref = apply_rope(k_ref.view(b, t, kv_heads, dim).transpose(1, 2), c, s)
    theirs.write_prefill(0, slots, k_ref, v_ref.view(b, t, kv_heads, dim).transpose(1, 2))
    ulp = {torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(q.cpu().view(b, t, heads, dim).transpose(1, 2), q_ref, rtol=ulp, atol=ulp)
    torch.testing.assert_close(k.cpu().view(b, t, kv_heads, dim).transpose(1, 2), k_ref, rtol=ulp, atol=ulp)
    torch.testing.assert_close(ours.k.cpu(), theirs.k, rtol=ulp, atol=ulp)
    assert torch.equal(ours.v.cpu(), theirs.v)
