"""Benchmark: one DPO training step of the megatron learner backend (tokens/s, MFU).

Llama-3.2-1B shape with random weights (tied embeddings), bf16, on `--tp` GPUs of one host (one process per
GPU, NCCL; tensor parallel over all of them, so data parallel 1). A step is what `train_step` does: the
reference model forward-only over the step's micro-batches, then the policy forward and backward, the
gradient norm, clipping and the optimizer step. Timed with CUDA events after warm-up steps; the median of
the timed steps. Prints one table and the hardware.

FLOPs are counted explicitly (not read from a profiler). Per token, the matmul weights are
    N_matmul = layers * (hidden * (heads + 2 * kv_heads) * head_dim    # fused QKV
                         + heads * head_dim * hidden                    # attention output
                         + 3 * hidden * intermediate)                   # gate, up, down
               + hidden * vocab                                         # output layer (logits)
and a forward pass over T tokens costs 2 * N_matmul * T plus attention: per sequence of length L and per
layer, 2 * L * L * head_dim * heads for Q K^T and as much again for the weighted sum of V, counted over the
full L x L square (what megatron's local attention computes; causal kernels skip about half of it, which
this count does not credit). With F = 2 * N_matmul * T + attention:
    policy forward + backward = 3 * F        reference forward = F        step = 4 * F
TFLOP/s is per GPU (step FLOPs / step time / GPUs). MFU is against the H200's 989 TFLOP/s dense bf16 peak
and against the bf16 matmul ceiling measured here (an 8192^3 torch.matmul, median of repeats).

    python benchmarks/megatron_step.py --tp 1            # one GPU
    python benchmarks/megatron_step.py --tp 2            # two GPUs, tensor parallel
    python benchmarks/megatron_step.py --tiny --tp 2     # CPU, a tiny model: checks the script runs
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ceilings import matmul_ceiling  # noqa: E402
from benchmarks.shapes import LLAMA_1B  # noqa: E402

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
H200_BF16_DENSE_TFLOPS = 989.0


def matmul_flops(c: dict) -> int:
    """N_matmul: weights multiplied per token in a forward pass (see the module docstring)."""
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    per_layer = (c["hidden_size"] * (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * head_dim
                 + c["num_attention_heads"] * head_dim * c["hidden_size"]
                 + 3 * c["hidden_size"] * c["intermediate_size"])
    return c["num_hidden_layers"] * per_layer + c["hidden_size"] * c["vocab_size"]


def step_flops(c: dict, sequences: int, seq_len: int) -> float:
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    tokens = sequences * seq_len
    attention = sequences * c["num_hidden_layers"] * 4 * seq_len * seq_len * head_dim * c["num_attention_heads"]
    forward = 2 * matmul_flops(c) * tokens + attention
    return 4 * forward  # policy forward + backward (3x) and reference forward (1x)


def build_model_dir(root: Path, shape: dict, gpu: bool) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    with torch.device("cuda" if gpu else "cpu"):
        model = LlamaForCausalLM(LlamaConfig(**shape))
    model.to(torch.bfloat16 if gpu else torch.float32).save_pretrained(root / "model")
    return str(root / "model")


def batch(pairs: int, seq_len: int, vocab: int, seed: int):
    """`pairs` pairs whose chosen and rejected sequences are each `seq_len` tokens (half prompt)."""
    from learner.types import TrainSample

    g = torch.Generator().manual_seed(seed)
    half = seq_len // 2
    rand = lambda k: torch.randint(10, vocab, (k,), generator=g).tolist()  # noqa: E731
    return [TrainSample(rand(half), rand(seq_len - half), rand(seq_len - half)) for _ in range(pairs)]


def rank_main(rank: int, world: int, port: int, args, model_dir: str, result: str) -> None:
    import torch.distributed as dist

    from learner.backends.megatron.backend import MegatronBackend
    from learner.types import LossConfig, OptimConfig

    gpu = not args.tiny
    if gpu:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    shape = TINY if args.tiny else LLAMA_1B
    backend = MegatronBackend(model_dir, OptimConfig(lr=1e-6, micro_batch_size=args.micro_batch),
                              device=f"cuda:{rank}" if gpu else "cpu", dtype="bfloat16" if gpu else "float32",
                              rank=rank, world_size=world, tensor_parallel=args.tp)
    samples = batch(args.global_batch, args.seq_len, shape["vocab_size"], seed=1)
    times = []
    for i in range(args.warmup + args.steps):
        if gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            backend.train_step(samples, LossConfig(beta=0.1))
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            backend.train_step(samples, LossConfig(beta=0.1))
            seconds = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(seconds)
    if rank == 0:
        peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0
        torch.save({"times": times, "transformer_engine": backend.transformer_engine, "peak_gib": peak}, result)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size = GPUs used (one process each)")
    p.add_argument("--micro-batch", type=int, default=4, help="pairs per micro-batch (2x sequences)")
    p.add_argument("--global-batch", type=int, default=16, help="pairs per step")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (half prompt, half response)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="CPU (gloo) with a tiny model: a check that it runs")
    args = p.parse_args()
    if args.tiny and args.seq_len > TINY["max_position_embeddings"]:
        args.seq_len = 128
    gpu = not args.tiny
    if gpu and torch.cuda.device_count() < args.tp:
        raise SystemExit(f"--tp {args.tp} needs {args.tp} GPUs; this machine has {torch.cuda.device_count()}")
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # before any rank starts CUDA
    shape = TINY if args.tiny else LLAMA_1B
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="megatron-step-") as tmp:
        model_dir = build_model_dir(Path(tmp), shape, gpu)
        ceiling = matmul_ceiling("cuda", 8192) / 1e12 if gpu else None
        if gpu:
            torch.cuda.empty_cache()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        result = str(Path(tmp) / "result.pt")
        mp.start_processes(rank_main, args=(args.tp, port, args, model_dir, result), nprocs=args.tp,
                           start_method="spawn")
        out = torch.load(result)

    step_s = statistics.median(out["times"])
    sequences = 2 * args.global_batch
    tokens_per_s = sequences * args.seq_len / step_s  # policy tokens (chosen + rejected) per second
    tflops = step_flops(shape, sequences, args.seq_len) / step_s / args.tp / 1e12
    layers = "Transformer Engine" if out["transformer_engine"] else "local (torch) spec"
    print(f"megatron DPO step: {'tiny model (CPU)' if args.tiny else 'Llama-3.2-1B shape'}, "
          f"{args.global_batch} pairs per step, median of {args.steps} steps after {args.warmup} warm-up, "
          f"layers: {layers}")
    header = (f"{'backend':>9}  {'TP':>2}  {'micro batch':>11}  {'seq len':>7}  {'tokens/s':>9}  {'step ms':>8}  "
              f"{'TFLOP/s/GPU':>11}  {'MFU (989)':>9}  {'MFU (matmul)':>12}")
    print(header)
    print("-" * len(header))
    per_gpu = f"{tflops:.1f}" if gpu else "-"  # a CPU run only checks that the script works
    mfu_peak = f"{100 * tflops / H200_BF16_DENSE_TFLOPS:.1f}%" if gpu else "-"
    mfu_ceiling = f"{100 * tflops / ceiling:.1f}%" if ceiling else "-"
    print(f"{'megatron':>9}  {args.tp:>2}  {f'{args.micro_batch} pairs':>11}  {args.seq_len:>7}  "
          f"{tokens_per_s:>9,.0f}  {1e3 * step_s:>8.1f}  {per_gpu:>11}  {mfu_peak:>9}  {mfu_ceiling:>12}")
    device = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}" if gpu else "CPU"
    print(f"hardware: {device}; torch {torch.__version__} (CUDA {torch.version.cuda}); megatron-core "
          f"{version('megatron-core')}" + (f"; measured bf16 matmul ceiling {ceiling:.0f} TFLOP/s" if ceiling else "")
          + (f"; peak memory rank 0 {out['peak_gib']:.1f} GiB" if gpu else ""))


if __name__ == "__main__":
    main()
