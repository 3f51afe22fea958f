"""Benchmark 4: the learner's DPO step, tokens/s and MFU (DESIGN.md "Performance targets": >= 40% MFU on one H200).

Llama-3.2-1B shape with random weights; our TorchBackend built as the learner worker builds it (one rank, no
process group); full `train_step` calls on DPO pairs of `--prompt` prompt + `--response` response tokens
(chosen and rejected), timed with CUDA events after warm-up, median over repeats. Prints the hardware, the
matmul ceiling measured in the same run, and one table.

    python benchmarks/learner_step.py            # on a GPU machine (about 1.5 minutes)
    python benchmarks/learner_step.py --tiny     # a tiny model on the CPU: checks that the script runs
    python benchmarks/learner_step.py --liger    # also against Liger Kernel (GPU; pip install liger-kernel)

--liger adds two comparisons with Liger Kernel (a maintained library of fused Triton kernels for training):
  head    the DPO loss from final hidden states: ours (lm_head matmul on the response positions, then
          learner.losses.token_logprobs: float32 log-softmax reduction without a float32 copy of the logits)
          against Liger's LigerFusedLinearDPOLoss (the head fused with log-softmax and the DPO loss, chunked
          by pair, gradients computed in its forward), forward + backward, policy and reference; time, peak
          memory, and each one's error against a float64 computation of the same loss and gradients.
  kernels the full train_step with `learner.kernels=liger` (Liger's RoPE, RMSNorm and SwiGLU kernels patched
          into the backend's policy and reference models), beside ours at the same micro-batch.

FLOPs per step are counted from the shapes, not measured (`step_flops`):
    per sequence of S = P + R tokens, forward:
        2 * N_body * S                       N_body: the decoder layers' matmul weights (q, k, v, o, gate, up, down)
      + 2 * N_head * R                       N_head = vocab * hidden: the (tied) lm_head matmul, on the R positions
                                             whose next token is a response token (the only ones the loss reads)
      + layers * 2 * d * S * (S + 1)         attention: QK^T and PV, 2 FLOPs per multiply-add, d = heads * head_dim,
                                             query i sees i + 1 keys under the causal mask: S (S + 1) / 2 pairs
    policy forward + backward = 3 x forward; reference forward = 1 x forward; 2 sequences (chosen, rejected) a pair.
The head is counted where it runs: the learner skips the prompt positions' logits. The usual 6 N T count (the
head on every token) is printed too; it is larger by 8 * N_head * P per sequence. Tokens per step count the
prompt and response tokens of chosen and rejected sequences.
MFU = model FLOPs / step time / 989 TFLOP/s (H200 SXM dense bf16 datasheet); "of matmul" divides by the rate
of an 8192^3 bf16 matmul on random data measured here instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ceilings import matmul_ceiling, timed  # noqa: E402

# Llama-3.2-1B's config.json (rope scaling included), random weights.
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                tie_word_embeddings=True, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                 "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                 "original_max_position_embeddings": 8192})
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True)
H200_BF16_DENSE = 989e12


def build_model_dir(root: Path, shape: dict, device: str) -> Path:
    """A random checkpoint of `shape` (bf16) with a stand-in tokenizer; no special token ids."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = root / "model"
    config = LlamaConfig(**shape, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(256)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0"))).save_pretrained(path)
    return path


def step_flops(c: dict, prompt: int, response: int, pairs: int) -> tuple[float, float]:
    """(FLOPs the DPO step does, the same with the head on every token as in 6 N T); see the module docstring."""
    h, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    d_q = c["num_attention_heads"] * c["head_dim"]
    d_kv = c["num_key_value_heads"] * c["head_dim"]
    n_body = layers * (h * d_q + 2 * h * d_kv + d_q * h + 3 * h * c["intermediate_size"])
    n_head = vocab * h
    s = prompt + response
    forward = 2 * n_body * s + 2 * n_head * response + layers * 2 * d_q * s * (s + 1)
    per_sequence = 3 * forward + forward  # policy forward + backward, reference forward
    sequences = 2 * pairs
    return sequences * per_sequence, sequences * (per_sequence + 8 * n_head * prompt)


def dpo_batches(count: int, pairs: int, prompt: int, response: int, vocab: int, seed: int = 1):
    """`count` different batches of `pairs` random pairs (fixed lengths: no padding)."""
    from learner.types import TrainSample

    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(10, vocab, (n,), generator=g).tolist()  # noqa: E731
    return [[TrainSample(draw(prompt), draw(response), draw(response)) for _ in range(pairs)] for _ in range(count)]


def hardware(device: str) -> str:
    import platform

    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if device != "cuda":
        cpu = platform.processor() or platform.machine()
        return f"hardware: CPU {cpu}, {torch.get_num_threads()} threads; {versions}"
    p = torch.cuda.get_device_properties(0)
    return (f"hardware: {torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.0f} GiB, "
            f"{p.multi_processor_count} SMs, compute capability {p.major}.{p.minor}; {versions}, "
            f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU, a couple of steps")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--response", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=32, help="pairs per optimizer step (bf16 rows)")
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8, 16], help="pairs per micro-batch")
    ap.add_argument("--fp32-pairs", type=int, default=8, help="pairs per step of the float32 row (0: no such row)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--liger", action="store_true", help="also compare with Liger Kernel (GPU only)")
    args = ap.parse_args()
    if args.tiny:
        args.prompt, args.response, args.pairs, args.micro_batches = 8, 16, 4, [2, 4]
        args.fp32_pairs, args.warmup, args.repeats = 4, 1, 2
    shape = TINY if args.tiny else LLAMA_1B
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on the GPU machine, or pass --tiny to check the script on the CPU")

    from transformers.utils import logging as hf_logging

    from learner.backends.torch_backend import TorchBackend
    from learner.types import LossConfig, OptimConfig

    hf_logging.disable_progress_bar()

    print(hardware(device), flush=True)
    ceiling = matmul_ceiling(device, 1024 if args.tiny else 8192)
    print(f"matmul ceiling: {ceiling / 1e12:.1f} TFLOP/s ({'float32 1024^3' if args.tiny else 'bf16 8192^3'}, median)",
          flush=True)
    runs = [("bfloat16", args.micro_batches, args.pairs)]
    if args.fp32_pairs:
        runs.append(("float32", [min(args.micro_batches[-1], args.fp32_pairs)], args.fp32_pairs))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(Path(tmp), shape, device)
        loss_cfg = LossConfig(preference_loss="dpo", beta=0.1)
        for dtype, micro_batches, pairs in runs:
            optim = OptimConfig(lr=1e-6, warmup_steps=0, max_grad_norm=1.0, micro_batch_size=micro_batches[0])
            # As LearnerWorker.setup builds it for one GPU (no process group).
            backend = TorchBackend(str(model_dir), optim, device=device, dtype=dtype, rank=0, world_size=1, seed=0,
                                   kernels="torch")
            batches = dpo_batches(args.warmup + args.repeats, pairs, args.prompt, args.response, shape["vocab_size"])
            flops, flops_6nt = step_flops(shape, args.prompt, args.response, pairs)
            tokens = 2 * pairs * (args.prompt + args.response)
            for mb in micro_batches:
                # One backend per precision; the micro-batch size is read by every train_step.
                backend.optim_cfg = dataclasses.replace(optim, micro_batch_size=mb)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                losses = [backend.train_step(b, loss_cfg)["loss"] for b in batches[: args.warmup]]
                times = []
                for b in batches[args.warmup :]:
                    times.append(timed(device, lambda: losses.append(backend.train_step(b, loss_cfg)["loss"])))
                if not all(map(lambda x: x == x and abs(x) < 1e3, losses)):
                    raise RuntimeError(f"{dtype} micro-batch {mb}: the DPO loss went non-finite: {losses}")
                peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
                rows.append((dtype, mb, pairs, tokens, times, flops, flops_6nt, peak))
                print(f"{dtype} micro-batch {mb}: step ms {[round(t * 1e3, 1) for t in times]}, "
                      f"losses {[round(x, 4) for x in losses]}", flush=True)
            backend = None
            gc.collect()  # the backend's modules hold reference cycles: free its GPU memory before the next one
            if device == "cuda":
                torch.cuda.empty_cache()
        if args.liger and device == "cuda":  # last: Liger's patch replaces transformers' Llama functions process-wide
            mb = args.micro_batches[-1]
            optim = OptimConfig(lr=1e-6, warmup_steps=0, max_grad_norm=1.0, micro_batch_size=mb)
            backend = TorchBackend(str(model_dir), optim, device=device, dtype="bfloat16", rank=0, world_size=1, seed=0,
                                   kernels="liger")
            batches = dpo_batches(args.warmup + args.repeats, args.pairs, args.prompt, args.response, shape["vocab_size"])
            flops, flops_6nt = step_flops(shape, args.prompt, args.response, args.pairs)
            torch.cuda.reset_peak_memory_stats()
            losses = [backend.train_step(b, loss_cfg)["loss"] for b in batches[: args.warmup]]
            times = [timed(device, lambda: losses.append(backend.train_step(b, loss_cfg)["loss"]))
                     for b in batches[args.warmup :]]
            print(f"bfloat16 + Liger kernels, micro-batch {mb}: step ms {[round(t * 1e3, 1) for t in times]}, "
                  f"losses {[round(x, 4) for x in losses]}", flush=True)
            rows.append(("bf16+liger", mb, args.pairs, 2 * args.pairs * (args.prompt + args.response), times, flops,
                         flops_6nt, torch.cuda.max_memory_allocated() / 2**30))
            backend = None
            gc.collect()
            torch.cuda.empty_cache()

    print(f"\nDPO step, {args.prompt} prompt + {args.response} response tokens per sequence, chosen + rejected; "
          f"matmul ceiling {ceiling / 1e12:.1f} TFLOP/s; MFU against {H200_BF16_DENSE / 1e12:.0f} TFLOP/s")
    head = (f"| {'precision':<9} | {'micro':>5} | {'pairs':>5} | {'tokens/step':>11} | {'step ms':>8} | "
            f"{'spread':>6} | {'tokens/s':>9} | {'TFLOP/s':>7} | {'MFU':>6} | {'MFU 6NT':>7} | {'of matmul':>9} | {'peak GiB':>8} |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for dtype, mb, pairs, tokens, times, flops, flops_6nt, peak in rows:
        t = statistics.median(times)
        spread = (max(times) - min(times)) / t
        rate = flops / t
        mfu = f"{rate / H200_BF16_DENSE:6.1%}" if device == "cuda" else f"{'-':>6}"
        mfu_6nt = f"{flops_6nt / t / H200_BF16_DENSE:7.1%}" if device == "cuda" else f"{'-':>7}"
        peak_gib = "-" if peak is None else f"{peak:.1f}"
        print(f"| {dtype:<9} | {mb:>5} | {pairs:>5} | {tokens:>11,} | {t * 1e3:8.1f} | {spread:6.1%} | "
              f"{tokens / t:9,.0f} | {rate / 1e12:7.1f} | {mfu} | {mfu_6nt} | {rate / ceiling:9.1%} | {peak_gib:>8} |")
    if args.liger:
        head_comparison(shape, args.micro_batches[-1], args.response, args.warmup, args.repeats, device)


def head_comparison(shape: dict, pairs: int, response: int, warmup: int, repeats: int, device: str,
                    beta: float = 0.1) -> None:
    """The DPO loss from final hidden states, ours against Liger's fused linear DPO loss (module docstring):
    median ms of forward + backward, peak memory above the inputs, and the error of the loss and of the
    gradients (hidden states, head weight) against float64. On the CPU (--tiny) it checks the code only: Liger's
    chunked losses are plain torch there, and peak memory is not measured."""
    import torch.nn.functional as F
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    from learner.losses import dpo_loss, token_logprobs

    hidden, vocab, n = shape["hidden_size"], shape["vocab_size"], 2 * pairs
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n, response, hidden, device=device, generator=g).bfloat16().requires_grad_()
    w = (0.02 * torch.randn(vocab, hidden, device=device, generator=g)).bfloat16().requires_grad_()
    h_ref = (h.detach().float() + 0.1 * torch.randn(h.shape, device=device, generator=g)).bfloat16()
    w_ref = (w.detach().float() + 0.002 * torch.randn(w.shape, device=device, generator=g)).bfloat16()
    labels = torch.randint(0, vocab, (n, response), device=device, generator=g)

    def logps(hs, weight):  # [n] summed response log-probs, as the backend's head path computes them
        logits = F.linear(hs.reshape(-1, hidden), weight)
        return token_logprobs(logits, labels.reshape(-1)).view(n, response).sum(-1)

    def ours(hs=h, weight=w, ref_h=h_ref, ref_w=w_ref):
        with torch.no_grad():
            ref = logps(ref_h, ref_w)
        pol = logps(hs, weight)
        delta = (pol[:pairs] - ref[:pairs]) - (pol[pairs:] - ref[pairs:])
        return dpo_loss(delta, beta).mean()

    liger_fn = LigerFusedLinearDPOLoss(beta=beta, compute_nll_loss=False, average_log_prob=False, chunk_size=1)

    def liger():
        return liger_fn(w, h, labels, ref_input=h_ref, ref_weight=w_ref)[0]

    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    exact = ours(h64, w64, h_ref.double(), w_ref.double())
    exact.backward()
    reference = (exact.item(), h64.grad.float(), w64.grad.float())
    del h64, w64
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b).norm() / b.norm())

    print(f"\nDPO loss from final hidden states: {pairs} pairs x {response} response tokens, hidden {hidden}, "
          f"vocab {vocab}, bf16 inputs; forward + backward (policy), reference forward; errors against float64")
    print("| implementation | ms | peak GiB above inputs | loss error | grad hidden error | grad head error |")
    print("|---|---|---|---|---|---|")
    for name, fn in (("ours (token_logprobs)", ours), ("Liger LigerFusedLinearDPOLoss", liger)):
        h.grad = w.grad = None
        loss = fn()
        loss.backward()
        errors = (abs(loss.item() - reference[0]) / abs(reference[0]), rel(h.grad, reference[1]), rel(w.grad, reference[2]))

        def step():
            h.grad = w.grad = None
            fn().backward()

        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        times = sorted(timed(device, step) for _ in range(repeats))
        peak = f"{(torch.cuda.max_memory_allocated() - base) / 2**30:.2f}" if cuda else "-"
        print(f"| {name} | {statistics.median(times) * 1e3:.1f} | {peak} | {errors[0]:.1e} | {errors[1]:.1e} | "
              f"{errors[2]:.1e} |", flush=True)


if __name__ == "__main__":
    main()
