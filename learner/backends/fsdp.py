"""FSDP2 for the torch learner backend (`learner.sharding=fsdp2`): parameters, gradients and AdamW state
sharded over the data-parallel ranks with `torch.distributed.fsdp.fully_shard`.

Layout: every decoder layer (the model's `_no_split_modules` classes) is one FSDP group; the embedding, the
final norm and the head (tied or not) form the root group, on the `_ResponseLogprobs` module that runs the
whole forward. Each rank holds 1/world of every float32 parameter (dim-0 chunks, as torch.chunk cuts them),
of its gradient and of both Adam moments.

Precision: in bfloat16 the sharded float32 parameters are the master weights; FSDP all-gathers them cast to
bfloat16 for the forward and backward (MixedPrecisionPolicy(param_dtype=bfloat16)) and reduce-scatters the
gradients in float32 into the float32 shards, where micro-batches accumulate. The frozen reference is a
second sharded model in the compute dtype (no gradients, no optimizer state).

Weights out: `gathered_weights` all-gathers one parameter at a time, so rank 0 holds the full model only as
the consumer keeps it (one tensor for a bucket packer, the CPU for a save): never two full copies on a GPU.

Optimizer state in checkpoints is gathered to full tensors in the layout `torch.optim.AdamW.state_dict()`
has without sharding (parameter index -> {step, exp_avg, exp_avg_sq}), the layout the DDP path writes, so a
checkpoint resumes under either; loading memory-maps the file and every rank keeps only its own chunks.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

SHARDINGS = ("ddp", "fsdp2")


def data_parallel_mesh(device: torch.device) -> DeviceMesh:
    """A one-dimensional mesh over the default process group (the learner group has joined it)."""
    return DeviceMesh.from_group(dist.group.WORLD, device.type)


def shard(runner: torch.nn.Module, lm: torch.nn.Module, mesh: DeviceMesh, compute_dtype: torch.dtype) -> None:
    """fully_shard each decoder layer of `lm`, then `runner` (the module whose forward is the whole
    computation, holding `lm`) for the remaining parameters. Parameters keep their dtype; with a
    `compute_dtype` below it they are gathered cast to it, and gradients are reduced in float32."""
    params = {p.dtype for p in lm.parameters()}
    mp = MixedPrecisionPolicy()
    if params == {torch.float32} and compute_dtype != torch.float32:
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    layer_types = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise ValueError(f"learner.sharding=fsdp2: {type(lm).__name__} names no decoder layer classes "
                         "(_no_split_modules) to shard by")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    # The root too reshards after each forward (FSDP2 keeps it gathered by default): a forward-only pass
    # (the reference, log-probs) must leave every parameter sharded.
    fully_shard(runner, mesh=mesh, mp_policy=mp, reshard_after_forward=True)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def copy_shards(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """dst's parameters become src's (same model, sharded alike): each rank copies its own chunks."""
    for d, s in zip(dst.parameters(), src.parameters(), strict=True):
        local(d).copy_(local(s))


@torch.no_grad()
def gathered_weights(module: torch.nn.Module, rank: int, dtype: torch.dtype | None = None,
                     to_cpu: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every entry of the module's state dict, on rank 0 (the others yield nothing).
    Collective: every rank must iterate to the end. `dtype`: cast each shard before gathering it; `to_cpu`:
    move each gathered tensor off the device before the next is gathered. A tied weight is gathered once and
    yielded under each of its names (the same tensor)."""
    entries = list(module.state_dict(keep_vars=True).items())
    names_of: dict[int, int] = {}
    for _, t in entries:
        names_of[id(t)] = names_of.get(id(t), 0) + 1
    tied: dict[int, torch.Tensor | None] = {}  # gathered tensors with a name still to come
    for name, t in entries:
        if id(t) in tied:
            full = tied[id(t)]
        else:
            full = t.detach()
            if dtype is not None and full.is_floating_point():
                full = full.to(dtype)
            if isinstance(full, DTensor):
                full = full.full_tensor()
            if rank != 0:
                full = None
            elif to_cpu:
                full = full.to("cpu", copy=True)
            if names_of[id(t)] > 1:
                tied[id(t)] = full
        if rank == 0:
            yield name, full


@torch.no_grad()
def gather_optimizer_state(optimizer: torch.optim.Optimizer, rank: int) -> dict | None:
    """The optimizer's state dict with every sharded tensor gathered, on the CPU of rank 0 (None elsewhere).
    Collective. One tensor at a time is whole on the device."""
    sd = optimizer.state_dict()
    state = {}
    for index, entries in sd["state"].items():  # the same order on every rank
        state[index] = {}
        for key, value in entries.items():
            if isinstance(value, DTensor):
                value = value.full_tensor()
            if rank == 0:
                state[index][key] = value.to("cpu", copy=True) if isinstance(value, torch.Tensor) else value
    return {"state": state, "param_groups": sd["param_groups"]} if rank == 0 else None


@torch.no_grad()
def load_optimizer_state(optimizer: torch.optim.Optimizer, full: dict) -> None:
    """Load a state dict of full tensors (as gather_optimizer_state or an unsharded AdamW wrote it): each rank
    keeps its chunks of the tensors shaped like their parameter, without communication."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entries in full["state"].items():
        param = params[index]
        state[index] = {}
        for key, value in entries.items():
            if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == param.shape:
                value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                          src_data_rank=None)
            state[index][key] = value
    optimizer.load_state_dict({"state": state, "param_groups": full["param_groups"]})


def same_forward_count(count: int, device: torch.device) -> int:
    """The largest of every rank's forward count (collective; agreed before any forward runs): each FSDP
    forward all-gathers, so a rank with fewer micro-batches must run stand-ins until all have run as many."""
    t = torch.tensor([count], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
