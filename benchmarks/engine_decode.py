"""Benchmark 1: generator engine decode throughput (DESIGN.md "Performance targets").

A model shape with random weights (benchmarks/shapes.py: llama-3.2-1b, the default, llama-3.1-8b,
smollm2-135m, qwen2.5-0.5b), bf16, 256 sequences, 128 prompt + 256 new tokens (greedy, no early stop), on
one GPU: the torch engine against transformers `generate` on the same model in the same run, and against
the memory roofline (weights + the KV cache read once per decode step, at the copy bandwidth measured
here). Prints the hardware and one table per shape.

    python benchmarks/engine_decode.py                 # on a GPU machine
    python benchmarks/engine_decode.py --shape all     # the four shapes, one table each
    python benchmarks/engine_decode.py --shape smollm2-135m qwen2.5-0.5b --skip-hf
    python benchmarks/engine_decode.py --skip-hf       # the engine only
    python benchmarks/engine_decode.py --sdpa          # also the engine with SDPA decode attention

Below the table: where the run's time goes. Prefill (a run with one new token), its wall and kernel time;
the decode steps' GPU kernel time by kind, from torch.profiler over a whole run less the prefill-only run,
against the wall time per step (the difference is time the GPU waits for the host); a second floor that
also counts arithmetic (prefill's matrix products, and each decode step's max(bytes / bandwidth, FLOPs /
matmul rate)) at the bf16 matmul rate measured here; and the decode-attention kernel alone at the run's
mean context for a few block configurations.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ceilings import matmul_ceiling  # noqa: E402
from benchmarks.shapes import SHAPES, hf_config, kv_bytes_per_token  # noqa: E402


def build_model_dir(root: Path, shape: str, dtype: torch.dtype) -> Path:
    """A random checkpoint of `shape` with a stand-in tokenizer and no end-of-sequence id."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    path = root / shape
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf_config(shape)).to(dtype)
    model.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(1000)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    tok.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def copy_bandwidth(nbytes: int = 2 << 30, repeats: int = 20) -> float:
    """Device-to-device copy rate (bytes read + written per second), median of `repeats`."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times[3:])


def roofline_tokens_per_s(shape: str, batch: int, prompt: int, new: int, weight_bytes: int, bandwidth: float,
                          bytes_per: int) -> float:
    """Each decode step reads every weight once and each sequence's KV cache so far once."""
    kv_per_token = kv_bytes_per_token(shape, bytes_per)
    seconds = sum((weight_bytes + batch * (prompt + t) * kv_per_token) / bandwidth for t in range(new))
    return batch * new / seconds


def compute_aware_floor(shape: str, batch: int, prompt: int, new: int, weight_bytes: int, bandwidth: float,
                        rate: float, bytes_per: int) -> tuple[float, float]:
    """(prefill seconds, whole-run seconds) when every kernel runs at the faster of its two ceilings: prefill
    at the matmul rate (matrix products of the prompt tokens, the head on each prompt's last position,
    causal attention), each decode step at max(its bytes / bandwidth, its FLOPs / matmul rate)."""
    c = SHAPES[shape]
    h, layers, heads = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
    head_dim, kv = h // heads, c["num_key_value_heads"]
    per_layer = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h + 3 * h * c["intermediate_size"]
    body, lm_head = layers * per_layer, c["vocab_size"] * h
    attention = lambda context: 4 * layers * heads * head_dim * context  # noqa: E731  QK^T and PV per token
    prefill = batch * (2 * body * prompt + 2 * lm_head + sum(attention(i + 1) for i in range(prompt))) / rate
    kv_per_token = kv_bytes_per_token(shape, bytes_per)
    decode = sum(max((weight_bytes + batch * (prompt + t) * kv_per_token) / bandwidth,
                     batch * (2 * (body + lm_head) + attention(prompt + t)) / rate) for t in range(new))
    return prefill, prefill + decode


_KINDS = (("matmul", ("nvjet", "gemm", "cutlass", "sm90_xmma", "splitk")), ("decode attention", ("_decode_attention",)),
          ("prefill attention", ("flash", "fmha", "attention", "sdpa")), ("norms", ("rmsnorm",)),
          ("swiglu", ("silu",)), ("rope + cache", ("rope",)))


def kernel_ms(fn) -> dict[str, float]:
    """GPU kernel milliseconds by kind over one call of fn (torch.profiler, CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", None)
        us = evt.self_cuda_time_total if us is None else us
        if not us:
            continue
        name = evt.key.lower()
        kind = next((k for k, marks in _KINDS if any(m in name for m in marks)), "other")
        out[kind] = out.get(kind, 0.0) + us / 1e3
    return out


def phase_breakdown(engine, requests, new: int, seconds: float, repeats: int) -> list[str]:
    """Lines: prefill's time (a run of one new token), decode ms per step, and the decode steps' GPU kernel
    time by kind (a whole run's profile less the prefill-only run's)."""
    import dataclasses

    first = [dataclasses.replace(r, sampling=dataclasses.replace(r.sampling, max_new_tokens=1)) for r in requests]
    engine.generate(first)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.generate(first)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    prefill = statistics.median(times)
    whole, only_prefill = kernel_ms(lambda: engine.generate(requests)), kernel_ms(lambda: engine.generate(first))
    steps = new - 1
    decode = {k: (whole.get(k, 0.0) - only_prefill.get(k, 0.0)) / steps for k in whole}
    busy = sum(decode.values())
    wall = 1e3 * (seconds - prefill) / steps
    kinds = ", ".join(f"{k} {v:.3f}" for k, v in sorted(decode.items(), key=lambda kv: -kv[1]) if v > 0.0005)
    lines = [f"prefill (a run with 1 new token): {prefill * 1e3:.1f} ms = {prefill / seconds:.0%} of the run; "
             f"prefill GPU kernels {sum(only_prefill.values()):.1f} ms",
             f"decode: {wall:.3f} ms per step (wall, the run less its prefill, over {steps} steps); GPU kernels "
             f"{busy:.3f} ms per step ({kinds}); the GPU waits for the host {max(wall - busy, 0):.3f} ms per step"]
    return lines


def prompts(batch: int, length: int, vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (batch, length), generator=g).tolist()


def cuda_ms(fn, repeats: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of `fn` on the GPU (CUDA events)."""
    times = []
    for i in range(warmup + repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def step_breakdown(engine, batch: int, prompt: int, new: int, bandwidth: float, profile: bool) -> list[str]:
    """GPU time of one graph-replayed decode step at the run's widest window, and of the attention kernel
    alone over the run's mean context (its bytes over the copy bandwidth give its own roofline share)."""
    from actors.engines.decode_attention import decode_attention

    lines = []
    if engine._graphs is not None:
        ms = cuda_ms(lambda: engine._graphs.run(batch, prompt + new))
        lines.append(f"one decode step replayed alone (window {engine._graphs.shape(batch, prompt + new)[1]}): "
                     f"{ms:.3f} ms")
    if engine._kernel:
        a = engine.args
        mean = prompt + new // 2
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(batch, a.num_heads, a.head_dim, device="cuda", generator=g).to(torch.bfloat16)
        k, v = engine.cache.read(0, batch, engine.max_seq_len)
        k.normal_(generator=g), v.normal_(generator=g)  # never time on zeros
        lengths = torch.randint(prompt, prompt + new, (batch,), device="cuda", generator=g)
        nbytes = int(lengths.sum()) * a.num_kv_heads * a.head_dim * 2 * k.element_size()
        for block_n, warps, stages in [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 3), (32, 4, 2)]:
            ms = cuda_ms(lambda: decode_attention(q, k, v, lengths, block_n=block_n, num_warps=warps,
                                                  num_stages=stages))
            lines.append(f"decode attention, one layer, {batch} slots, mean context ~{mean}, block {block_n}, "
                         f"{warps} warps, {stages} stages: {ms * 1e3:.1f} us, {nbytes / ms / 1e6:.0f} GB/s "
                         f"({nbytes / (ms / 1e3) / bandwidth:.0%} of copy bandwidth)")
    if profile and engine._graphs is not None:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                engine._graphs.run(batch, prompt + new)
            torch.cuda.synchronize()
        lines.append("GPU kernels of 5 replayed decode steps (torch.profiler):")
        lines.append(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    return lines


def time_engine(model_dir: Path, ids: list[list[int]], new: int, dtype: str, repeats: int,
                decode_kernel: bool | None = None, bandwidth: float = 0.0, profile: bool = False
                ) -> tuple[float, list[list[int]], list[str]]:
    from actors.engines.protocol import GenerationRequest, SamplingParams
    from actors.engines.torch_engine import TorchEngine

    engine = TorchEngine(str(model_dir), device="cuda", dtype=dtype, max_batch_size=len(ids),
                         max_seq_len=len(ids[0]) + new + 8, decode_kernel=decode_kernel)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=new)
    requests = [GenerationRequest(p, sampling, seed=i) for i, p in enumerate(ids)]
    engine.generate(requests[:8])  # warm-up
    times, out = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = engine.generate(requests)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    assert all(len(r.token_ids) == new for r in out), "a sequence stopped early"
    notes = []
    if bandwidth:
        notes = phase_breakdown(engine, requests, new, statistics.median(times), repeats)
        notes += step_breakdown(engine, len(ids), len(ids[0]), new, bandwidth, profile)
    del engine
    torch.cuda.empty_cache()
    return statistics.median(times), [r.token_ids for r in out], notes


def time_hf(model_dir: Path, ids: list[list[int]], new: int, dtype: torch.dtype, repeats: int) -> tuple[float, list[list[int]]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).cuda().eval()
    x = torch.tensor(ids, device="cuda")
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                  attention_mask=torch.ones_like(x))
    with torch.no_grad():
        model.generate(x[:8], **{**kwargs, "attention_mask": torch.ones_like(x[:8])})
        times, out = [], None
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(x, **kwargs)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    tokens = out[:, x.shape[1]:].tolist()
    del model
    torch.cuda.empty_cache()
    return statistics.median(times), tokens


def one_shape(shape: str, args, bandwidth: float) -> None:
    dtype = torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(Path(tmp), shape, dtype)
        weight_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        ids = prompts(args.batch, args.prompt, SHAPES[shape]["vocab_size"])
        roof = roofline_tokens_per_s(shape, args.batch, args.prompt, args.new, weight_bytes, bandwidth, 2)
        floor_prefill, floor_run = compute_aware_floor(shape, args.batch, args.prompt, args.new, weight_bytes,
                                                       bandwidth, args.matmul_rate, 2)
        rows, agreement = [], []
        t_engine, tok_engine, notes = time_engine(model_dir, ids, args.new, "bfloat16", args.repeats,
                                                  bandwidth=bandwidth, profile=args.profile)
        rows.append(("torch engine", t_engine))
        if args.sdpa:
            t_sdpa, tok_sdpa, _ = time_engine(model_dir, ids, args.new, "bfloat16", args.repeats, decode_kernel=False)
            rows.append(("torch engine, SDPA decode", t_sdpa))
            same = sum(a[:16] == b[:16] for a, b in zip(tok_engine, tok_sdpa)) / len(ids)
            agreement.append(f"greedy agreement, Triton vs SDPA decode attention (first 16 tokens): {same:.1%} "
                             "of sequences")
        if not args.skip_hf:
            t_hf, tok_hf = time_hf(model_dir, ids, args.new, dtype, args.repeats)
            rows.append(("transformers generate", t_hf))
            # bf16 greedy paths diverge once two logits tie within rounding; compare the first 16 tokens
            same = sum(a[:16] == b[:16] for a, b in zip(tok_engine, tok_hf)) / len(ids)
            agreement.append(f"greedy agreement with transformers (first 16 tokens): {same:.1%} of sequences")
    tokens = args.batch * args.new
    print(f"\n## {shape}: weights {weight_bytes / 1e9:.2f} GB; roofline {roof:,.0f} tokens/s ({args.batch} seqs, "
          f"{args.prompt} prompt + {args.new} new, bf16, copy bandwidth {bandwidth / 1e12:.2f} TB/s)")
    for line in agreement:
        print(line)
    print(f"compute-aware floor: {floor_run:.3f} s per run ({tokens / floor_run:,.0f} tokens/s, "
          f"{tokens / floor_run / roof:.0%} of the memory roofline), of which prefill {floor_prefill * 1e3:.1f} ms; "
          f"bf16 matmul rate {args.matmul_rate / 1e12:.0f} TFLOP/s")
    print(f"| {'implementation':<26} | {'seconds':>8} | {'tokens/s':>10} | {'steps/s':>8} | {'of roofline':>11} | "
          f"{'of compute-aware floor':>22} |")
    print(f"|{'-' * 28}|{'-' * 10}|{'-' * 12}|{'-' * 10}|{'-' * 13}|{'-' * 24}|")
    for name, seconds in rows:
        print(f"| {name:<26} | {seconds:8.2f} | {tokens / seconds:10,.0f} | {args.new / seconds:8.1f} | "
              f"{tokens / seconds / roof:10.1%} | {floor_run / seconds:21.1%} |")
    print(f"floor per decode step at the mean context: {1e3 * args.new * args.batch / roof / args.new:.3f} ms; "
          f"measured {1e3 * t_engine / args.new:.3f} ms per step (prefill included)")
    for line in notes:
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="+", default=["llama-3.2-1b"], choices=[*SHAPES, "all"],
                    help="model shapes (benchmarks/shapes.py), or all")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--sdpa", action="store_true", help="also time the engine with SDPA decode attention")
    ap.add_argument("--profile", action="store_true", help="list the GPU kernels of a decode step")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    print(f"hardware: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs; "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    bandwidth = copy_bandwidth()
    args.matmul_rate = matmul_ceiling("cuda", 8192)
    for shape in (list(SHAPES) if "all" in args.shape else args.shape):
        one_shape(shape, args, bandwidth)


if __name__ == "__main__":
    main()
