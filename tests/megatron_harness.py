"""Run a function on several torch.distributed ranks (spawned processes) for the megatron backend tests.

megatron's parallel state is process-wide, so every layout gets fresh processes: `run_ranks(fn, world, ...)`
spawns `world` ranks that join one process group on 127.0.0.1 (gloo on CPU, NCCL with `gpu=True`, rank r
on cuda:r), calls `fn(rank, world, *args)` in each and returns every rank's return value (passed back
through files: tensors cannot cross a queue once their process has exited).
"""

from __future__ import annotations

import socket
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, gpu: bool, out: str, fn, args) -> None:
    torch.set_num_threads(1)
    if gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.save(fn(rank, world, *args), Path(out) / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, gpu: bool = False, timeout_s: float = 600) -> list:
    """fn(rank, world, *args) on `world` spawned ranks; their return values in rank order."""
    with tempfile.TemporaryDirectory(prefix="mcore-ranks-") as out:
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [ctx.Process(target=_rank_main, args=(r, world, port, gpu, out, fn, args)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
        errors = sorted(Path(out).glob("rank*.err"))
        if errors:
            raise RuntimeError("a rank failed:\n" + "\n".join(e.read_text() for e in errors))
        if alive or any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"ranks did not finish within {timeout_s}s (or died): "
                               f"exit codes {[p.exitcode for p in procs]}")
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]

