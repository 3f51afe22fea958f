"""Learner memory per GPU: bytes per parameter and model-state peak for DDP, FSDP2 and megatron (TP x DP).

Computed from the learners' layouts in bf16 mixed precision with AdamW (nothing is measured here: no
multi-GPU machine was available; `source` says so in every row). Counted per GPU:
- ddp (learner/backends/torch_backend.py, _MasterWeights): bf16 weights 2 + float32 masters 4 + float32
  gradients 4 + Adam moments 8 + bf16 reference 2 = 20 bytes per parameter, nothing sharded.
- fsdp2 (learner/backends/fsdp.py): float32 masters, gradients and moments and the bf16 reference, all
  sharded over the N ranks: 18/N; plus what is gathered at once: the root group (embedding, final norm,
  head) in bf16 for the whole forward and backward, and one decoder layer's bf16 weights and gradients and
  float32 reduce-scatter input (FSDP2 prefetches one layer ahead: two layers' weights).
- megatron (learner/backends/megatron): bf16 weights 2/TP, float32 gradient buffer 4/TP
  (grad_reduce_in_fp32), float32 main weights and moments 12/(TP x DP) with the distributed optimizer
  (the default where DP > 1; 12/TP without it), bf16 reference 2/TP.
Activations are not included: they depend on micro-batch and sequence length, not on the layout (megatron's
TP divides most of them by TP; neither FSDP2 nor DDP changes them).

    python benchmarks/memory.py [--gpus 8]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def layer_params(self) -> int:
        head_dim = self.hidden // self.heads
        attention = self.hidden * head_dim * (self.heads + 2 * self.kv_heads) + self.heads * head_dim * self.hidden
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden  # two RMSNorms

    @property
    def root_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params


SHAPES = [
    Shape("Llama-3.2-1B", 2048, 16, 8192, 32, 8, 128256, tied=True),
    Shape("Llama-3.1-8B", 4096, 32, 14336, 32, 8, 128256, tied=False),
]


def rows(shape: Shape, gpus: int) -> list[tuple[str, float, float]]:
    """(layout, model-state bytes per parameter per GPU, peak model-state GiB per GPU)."""
    n = shape.params
    out = [("ddp", 20.0, 20.0 * n / GIB)]
    resident = 18.0 / gpus
    gathered = 2 * shape.root_params + 2 * (2 * shape.layer_params) + (2 + 4) * shape.layer_params
    out.append((f"fsdp2 x{gpus}", resident, (resident * n + gathered) / GIB))
    for tp in (2, 8):
        if gpus % tp:
            continue
        dp = gpus // tp
        optimizer = 12.0 / (tp * dp) if dp > 1 else 12.0 / tp
        per_param = (2 + 4 + 2) / tp + optimizer
        out.append((f"megatron TP{tp} x DP{dp}", per_param, per_param * n / GIB))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs of the learner (data x tensor parallel)")
    args = parser.parse_args()
    print(f"| model | params | layout ({args.gpus} GPUs) | bytes/param/GPU | peak model state GiB/GPU | source |")
    print("|---|---|---|---|---|---|")
    for shape in SHAPES:
        for layout, per_param, peak in rows(shape, args.gpus):
            print(f"| {shape.name} | {shape.params / 1e9:.2f}B | {layout} | {per_param:.2f} | {peak:.1f} | computed |")


if __name__ == "__main__":
    main()
