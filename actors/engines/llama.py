"""A compact Llama-family decoder (llama, mistral, qwen2) in plain torch.

Pre-norm transformer: RMSNorm -> grouped-query attention with rotary embeddings -> RMSNorm -> SwiGLU MLP.
Internally q/k/v are fused into one `wqkv` projection and gate/up into one `w_gate_up` projection (one
matmul each instead of three/two, which matters for small-batch decode). Hugging Face names map onto
row ranges of those fused weights through `weight_map`, the single table used for loading, refit and
`hf_views` (HF name -> tensor view).

The same forward serves three uses, chosen by the `ForwardContext`:
* full (no cache): `score` and tests;
* prefill: right-padded prompts, writing K/V into their cache slots (on GPU: rope and the cache write fused
  into one kernel per layer, attention through SDPA's causal flash kernel);
* decode: one token per slot for slots [0, B), reading K/V back from the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from actors.engines import decode_attention, fused_ops
from actors.engines.kv_cache import KVCache, decode_mask

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "llama3")


# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Mapping[str, Any] | None  # None = default rope; else llama3 parameters
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, config: Any, max_seq_len: int) -> "ModelArgs":
        """Read a transformers config (LlamaConfig / MistralConfig / Qwen2Config), rejecting what we don't run."""
        model_type = config.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}; only 'silu' (SwiGLU) is implemented")
        window = _effective_sliding_window(config)
        if window is not None and window < max_seq_len:
            raise ValueError(
                f"sliding_window={window} is smaller than max_seq_len={max_seq_len}; sliding-window attention "
                f"is not implemented (lower max_seq_len to <= {window})"
            )
        theta, scaling = _rope_config(config)
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias (and no o_proj bias); Llama's `attention_bias` covers q/k/v/o.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
        )


def _effective_sliding_window(config: Any) -> int | None:
    window = getattr(config, "sliding_window", None)
    # Qwen2 keeps a sliding_window value around even when `use_sliding_window` is off.
    if not getattr(config, "use_sliding_window", True):
        return None
    return window


def _rope_config(config: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, llama3 parameters or None). transformers >= 5 has `rope_parameters`; 4.x has
    `rope_theta` + `rope_scaling` (whose type key was once called "type")."""
    params = getattr(config, "rope_parameters", None)
    if params:
        scaling = dict(params)
        theta = scaling.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    else:
        scaling = dict(getattr(config, "rope_scaling", None) or {})
        theta = getattr(config, "rope_theta", 10000.0)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1.0 is not supported")
    return float(theta), (scaling if rope_type == "llama3" else None)


# ------------------------------------------------------------------------------------------------- rope


def rope_inv_freq(head_dim: int, theta: float, scaling: Mapping[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32, computed exactly as transformers does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3.x: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_tables(args: ModelArgs, max_seq_len: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_seq_len, head_dim] in float32 (half-split layout, as in HF checkpoints)."""
    inv_freq = rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling)
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, 1, T, D] already in x's dtype."""
    return x * cos + _rotate_half(x) * sin


# ---------------------------------------------------------------------------------------------- context


@dataclass
class ForwardContext:
    """Positions, attention mask and cache wiring for one forward call."""

    positions: torch.Tensor  # [B, T] int64
    mask: torch.Tensor | None  # decode without the kernel: [B, 1, 1, K] bool, True = attend; None: causal
    cache: KVCache | None = None
    prefill_slots: torch.Tensor | None = None  # prefill: cache slot of each row, [B]
    kv_len: int = 0  # decode: attend over cache positions [0, kv_len)
    lengths: torch.Tensor | None = None  # decode with the Triton kernel: keys per slot (no mask needed)
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # fused rope + cache write: the cos/sin tables
    launch: decode_attention.Launch = decode_attention.Launch()  # decode with the Triton kernel: its launch settings
    token_slots: torch.Tensor | None = None  # fused prefill: the cache slot of each of the B * T tokens

    @classmethod
    def full(cls, lengths: torch.Tensor, seq_len: int) -> "ForwardContext":
        """Right-padded batch, no cache. Causal attention is exact for every real token: the keys before it
        are all real (padding comes after), so no mask is needed, and SDPA takes its flash kernels. Rows at
        padding positions compute values nothing reads."""
        positions = torch.arange(seq_len, device=lengths.device).expand(lengths.shape[0], seq_len)
        return cls(positions=positions, mask=None)

    @classmethod
    def prefill(cls, lengths: torch.Tensor, seq_len: int, slots: torch.Tensor, cache: KVCache,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> "ForwardContext":
        """`rope`: the cos/sin tables, to rotate q/k and write the cache in one fused kernel per layer. Padding
        positions are written too; decoding reads a slot only below its length and overwrites from there."""
        ctx = cls.full(lengths, seq_len)
        ctx.cache, ctx.prefill_slots, ctx.rope = cache, slots, rope
        if rope is not None:
            ctx.token_slots = slots.repeat_interleave(seq_len)
        return ctx

    @classmethod
    def decode(cls, positions: torch.Tensor, cache: KVCache, kv_len: int, kernel: bool = False,
               rope: tuple[torch.Tensor, torch.Tensor] | None = None, group: int = 1) -> "ForwardContext":
        """One token per slot for slots [0, B); positions [B]. `kernel`: attend with the Triton decode kernel
        (`group`: query heads per KV head); `rope`: the cos/sin tables, to rotate and cache q/k/v in one fused
        kernel."""
        if kernel:
            kv_heads = cache.k.shape[2]
            launch = decode_attention.launch_settings(positions.shape[0], kv_heads, group, positions.device)
            return cls(positions=positions[:, None], mask=None, cache=cache, kv_len=kv_len, lengths=positions + 1,
                       rope=rope, launch=launch)
        return cls(positions=positions[:, None], mask=decode_mask(positions, kv_len), cache=cache, kv_len=kv_len)

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k/v where the mode says, and return the keys/values to attend over."""
        if self.cache is None:
            return k, v
        if self.prefill_slots is not None:
            self.cache.write_prefill(layer, self.prefill_slots, k, v)
            return k, v  # prompts start at position 0: the new keys are all there is
        self.cache.write_decode(layer, self.positions[:, 0], k, v)
        return self.cache.read(layer, k.shape[0], self.kv_len)


# ---------------------------------------------------------------------------------------------- modules


def _linear(in_f: int, out_f: int, bias: bool, device: torch.device | str, dtype: torch.dtype) -> nn.Linear:
    # Weights are always loaded from a checkpoint, so skip the (slow, useless) random init.
    return torch.nn.utils.skip_init(nn.Linear, in_f, out_f, bias=bias, device=device, dtype=dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device: torch.device | str, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, scale in the model dtype: the same rounding as transformers.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, device: torch.device | str, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.split = (args.q_size, args.kv_size, args.kv_size)
        self.wqkv = _linear(args.hidden_size, sum(self.split), args.qkv_bias, device, dtype)
        self.wo = _linear(args.q_size, args.hidden_size, args.o_bias, device, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        b, t, _ = x.shape
        gqa = self.num_heads != self.num_kv_heads
        if ctx.rope is not None and ctx.prefill_slots is not None:  # GPU prefill: fused rope + cache write
            qkv = self.wqkv(x)
            q, k = fused_ops.rope_and_cache(qkv.view(b * t, -1), ctx.positions.reshape(-1), *ctx.rope,
                                            ctx.cache.k[self.layer], ctx.cache.v[self.layer], self.num_heads,
                                            self.num_kv_heads, slots=ctx.token_slots, keys=True)
            q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
            k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = qkv[..., self.split[0] + self.split[1]:].view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            return self.wo(out.transpose(1, 2).reshape(b, t, -1))
        if ctx.rope is not None:  # GPU decode: one kernel rotates q/k and caches k/v, one attends
            q = fused_ops.rope_and_cache(self.wqkv(x)[:, 0], ctx.positions[:, 0], *ctx.rope, ctx.cache.k[self.layer],
                                         ctx.cache.v[self.layer], self.num_heads, self.num_kv_heads)
            k, v = ctx.cache.read(self.layer, b, ctx.kv_len)
            out = decode_attention.decode_attention(q, k, v, ctx.lengths, **ctx.launch._asdict())
            return self.wo(out.reshape(b, t, -1))
        q, k, v = self.wqkv(x).split(self.split, dim=-1)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = ctx.keys_values(self.layer, k, v)
        if ctx.lengths is not None:
            out = decode_attention.decode_attention(q[:, :, 0], k, v, ctx.lengths, **ctx.launch._asdict())[:, :, None]
        else:  # no mask: causal (full and prefill); with one: decode without the kernel
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.mask is None,
                                                 enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, device: torch.device | str, dtype: torch.dtype) -> None:
        super().__init__()
        self.w_gate_up = _linear(args.hidden_size, 2 * args.intermediate_size, args.mlp_bias, device, dtype)
        self.w_down = _linear(args.intermediate_size, args.hidden_size, args.mlp_bias, device, dtype)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        if fused:
            return self.w_down(fused_ops.silu_mul(self.w_gate_up(x)))
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, device: torch.device | str, dtype: torch.dtype) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps, device, dtype)
        self.attn = Attention(args, layer, device, dtype)
        self.mlp_norm = RMSNorm(args.hidden_size, args.rms_norm_eps, device, dtype)
        self.mlp = MLP(args, device, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, ctx)
        return x + self.mlp(self.mlp_norm(x))

    def forward_fused(self, x: torch.Tensor, pending: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                      ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The same block with fused kernels. The MLP output is returned, not added: the next block's norm
        kernel adds it (`pending`), saving a pass over the activations. Returns (x, pending)."""
        x, h = fused_ops.add_rmsnorm(x, pending, self.attn_norm.weight, self.attn_norm.eps)
        x, h = fused_ops.add_rmsnorm(x, self.attn(h, cos, sin, ctx), self.mlp_norm.weight, self.mlp_norm.eps)
        return x, self.mlp(h, fused=True)


class Transformer(nn.Module):
    """Parameters are allocated uninitialised; fill them through `hf_views` before use."""

    def __init__(
        self,
        args: ModelArgs,
        *,
        max_seq_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.args, self.max_seq_len = args, max_seq_len
        self.embed_tokens = torch.nn.utils.skip_init(
            nn.Embedding, args.vocab_size, args.hidden_size, device=device, dtype=dtype
        )
        self.layers = nn.ModuleList(Block(args, i, device, dtype) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, device, dtype)
        self.lm_head = (
            None if args.tie_word_embeddings else _linear(args.hidden_size, args.vocab_size, False, device, dtype)
        )
        cos, sin = rope_tables(args, max_seq_len, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.requires_grad_(False)
        self.fused = False  # norms and SwiGLU through fused_ops' Triton kernels (the engine sets it on GPU)

    def new_cache(self, max_batch_size: int) -> KVCache:
        a, w = self.args, self.embed_tokens.weight
        return KVCache(
            a.num_layers, max_batch_size, a.num_kv_heads, self.max_seq_len, a.head_dim, dtype=w.dtype, device=w.device
        )

    def hidden_states(self, tokens: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """tokens [B, T] -> final-normed hidden states [B, T, hidden]."""
        x = self.embed_tokens(tokens)
        if ctx.rope is None:
            cos = self.rope_cos[ctx.positions].unsqueeze(1).to(x.dtype)
            sin = self.rope_sin[ctx.positions].unsqueeze(1).to(x.dtype)
        else:
            cos = sin = None  # the fused kernel reads the tables itself
        if self.fused:
            pending = None
            for block in self.layers:
                x, pending = block.forward_fused(x, pending, cos, sin, ctx)
            return fused_ops.add_rmsnorm(x, pending, self.norm.weight, self.norm.eps)[1]
        for block in self.layers:
            x = block(x, cos, sin, ctx)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in float32 (projection in the model dtype, like transformers)."""
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, head).float()

    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Right-padded prompts [B, T] into `slots`; returns logits [B, V] at each prompt's last token."""
        hidden = self.hidden_states(tokens, ForwardContext.prefill(lengths, tokens.shape[1], slots, cache,
                                                                   self._fused_rope()))
        last = hidden[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1]
        return self.logits(last)

    def _fused_rope(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cos/sin tables for the fused rope + cache-write kernel, where it runs: with the fused kernels, for
        power-of-two head sizes (Triton block shapes; others rotate in torch)."""
        pow2 = self.args.head_dim & (self.args.head_dim - 1) == 0
        return (self.rope_cos, self.rope_sin) if self.fused and pow2 else None

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, kv_len: int,
               kernel: bool = False) -> torch.Tensor:
        """One token per slot for slots [0, B): tokens/positions [B] -> logits [B, V] in the model dtype
        (argmax needs no float32 copy of [B, V]; samplers upcast). `kernel`: Triton decode attention."""
        rope = self._fused_rope() if kernel else None
        group = self.args.num_heads // self.args.num_kv_heads
        ctx = ForwardContext.decode(positions, cache, kv_len, kernel, rope, group)
        hidden = self.hidden_states(tokens[:, None], ctx)
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden[:, 0], head)


# ---------------------------------------------------------------------------------------- weight names


@dataclass(frozen=True)
class WeightMapEntry:
    hf_name: str
    internal_name: str
    rows: tuple[int, int] | None  # row range inside a fused internal tensor; None = the whole tensor


def weight_map(args: ModelArgs) -> list[WeightMapEntry]:
    """Every Hugging Face parameter name and where it lives internally (the one mapping, both ways)."""
    q, kv, inter = args.q_size, args.kv_size, args.intermediate_size
    per_layer: list[tuple[str, str, tuple[int, int] | None]] = [
        ("input_layernorm.weight", "attn_norm.weight", None),
        ("post_attention_layernorm.weight", "mlp_norm.weight", None),
        ("self_attn.o_proj.weight", "attn.wo.weight", None),
        ("mlp.down_proj.weight", "mlp.w_down.weight", None),
    ]
    for kind in ["weight"] + (["bias"] if args.qkv_bias else []):
        per_layer += [
            (f"self_attn.q_proj.{kind}", f"attn.wqkv.{kind}", (0, q)),
            (f"self_attn.k_proj.{kind}", f"attn.wqkv.{kind}", (q, q + kv)),
            (f"self_attn.v_proj.{kind}", f"attn.wqkv.{kind}", (q + kv, q + 2 * kv)),
        ]
    if args.o_bias:
        per_layer.append(("self_attn.o_proj.bias", "attn.wo.bias", None))
    for kind in ["weight"] + (["bias"] if args.mlp_bias else []):
        per_layer += [
            (f"mlp.gate_proj.{kind}", f"mlp.w_gate_up.{kind}", (0, inter)),
            (f"mlp.up_proj.{kind}", f"mlp.w_gate_up.{kind}", (inter, 2 * inter)),
        ]
        if kind == "bias":
            per_layer.append(("mlp.down_proj.bias", "mlp.w_down.bias", None))

    entries = [WeightMapEntry("model.embed_tokens.weight", "embed_tokens.weight", None)]
    for i in range(args.num_layers):
        entries += [WeightMapEntry(f"model.layers.{i}.{h}", f"layers.{i}.{n}", r) for h, n, r in per_layer]
    entries.append(WeightMapEntry("model.norm.weight", "norm.weight", None))
    if not args.tie_word_embeddings:
        entries.append(WeightMapEntry("lm_head.weight", "lm_head.weight", None))
    return entries


def hf_to_internal(args: ModelArgs) -> dict[str, WeightMapEntry]:
    return {e.hf_name: e for e in weight_map(args)}


def internal_to_hf(args: ModelArgs) -> dict[str, list[WeightMapEntry]]:
    out: dict[str, list[WeightMapEntry]] = {}
    for e in weight_map(args):
        out.setdefault(e.internal_name, []).append(e)
    return out


def hf_views(model: Transformer) -> dict[str, torch.Tensor]:
    """HF name -> view of the internal parameter (writing into the view writes the parameter)."""
    params = dict(model.named_parameters())
    views = {}
    for e in weight_map(model.args):
        p = params[e.internal_name]
        views[e.hf_name] = p if e.rows is None else p[e.rows[0] : e.rows[1]]
    return views
