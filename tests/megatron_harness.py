"""Run a function on several torch.distributed ranks (spawned processes) for the megatron backend tests.

megatron's parallel state is process-wide, so every layout gets fresh processes: `run_ranks(fn, world, ...)`
spawns `world` ranks that join one process group on 127.0.0.1 (gloo on CPU, NCCL with `gpu=True`, rank r
on cuda:r), calls `fn(rank, world, *args)` in each and returns every rank's return value (passed back
through files: tensors cannot cross a queue once their process has exited).
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from refit_wire import host_store, join_store


def _rank_main(rank: int, world: int, port: int, gpu: bool, out: str, fn, args) -> None:
    torch.set_num_threads(1)
    if gpu:
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # megatron's setting, read when CUDA starts
        torch.cuda.set_device(rank)
    # The parent holds the store's port (no bind-then-reuse race); every rank joins it as a client.
    dist.init_process_group("nccl" if gpu else "gloo", store=join_store("127.0.0.1", port), rank=rank,
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
        store = host_store("127.0.0.1")
        port = store.port
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



# ---- the scenario both backends run (CPU parity tests and their GPU bf16 twins) ----------------------------


def pairs(n: int, seed: int, vocab: int, length: int = 1) -> list:
    """n preference pairs of random tokens; `length` scales the prompt and response lengths."""
    from learner.types import TrainSample

    g = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(1, vocab, (k * length,), generator=g).tolist()  # noqa: E731
    return [TrainSample(rand(3 + i % 3), rand(2 + i % 4), rand(1 + i % 5), 4.0, 1.0) for i in range(n)]


def scenario(backend, share, ckpt: str, rng_states, batches, loss) -> dict:
    """Log-probs, a DPO step, export, sft_nll, save, a second step, reference update, optimizer reset, an
    SFT step. share(batch): this rank's part of a global batch; rng_states(backend): every rank's RNG states."""
    from learner.types import LossConfig, TrainSample

    batch, batch2 = batches
    prompts, chosen = [s.prompt_ids for s in batch], [s.chosen_ids for s in batch]
    out = {"logprobs": backend.logprobs(prompts, chosen)}
    out["step1"] = backend.train_step(share(batch), loss)
    out["policy_after"] = backend.logprobs(prompts, chosen)
    out["reference_after"] = backend.logprobs(prompts, chosen, reference=True)
    out["weights"] = {name: t.detach().to("cpu", copy=True) for name, t in backend.named_weights()}
    out["sft_nll"] = backend.sft_nll(share(batch))
    backend.save(ckpt, rng_states(backend))
    out["step2"] = backend.train_step(share(batch2), loss)
    backend.update_reference()
    out["updated"] = (backend.logprobs(prompts, chosen), backend.logprobs(prompts, chosen, reference=True))
    backend.reset_optimizer()
    out["lr_after_reset"] = backend.train_step(share(batch), loss)["lr"]
    sft = [TrainSample(s.prompt_ids, s.chosen_ids) for s in batch2]  # supervised samples: no rejected, no reference
    out["sft_step"] = backend.train_step(share(sft), LossConfig(preference_loss_weight=0.0, sft_loss_weight=1.0))
    return out


def megatron_rank(rank, world, model_dir, ckpt, optim, loss, batches, tp, pp, gpu=False, dtype="float32"):
    """One rank of a megatron backend running `scenario`, then resuming from its checkpoint."""
    from learner.backends.megatron.backend import MegatronBackend

    def all_rng_states(backend):
        states = [None] * world
        dist.all_gather_object(states, backend.rng_state())
        return states

    kwargs = dict(rank=rank, world_size=world, tensor_parallel=tp, pipeline_parallel=pp, dtype=dtype,
                  device=f"cuda:{rank}" if gpu else "cpu")
    backend = MegatronBackend(model_dir, optim, **kwargs)
    dp_rank, dp_size = backend.data_parallel

    def share(batch):
        k = len(batch) // dp_size
        return batch[dp_rank * k : (dp_rank + 1) * k]

    out = scenario(backend, share, ckpt, all_rng_states, batches, loss)
    resumed = MegatronBackend(ckpt, optim, reference_dir=model_dir, **kwargs)
    resumed.load_training_state(ckpt)
    out["resumed_step2"] = resumed.train_step(share(batches[1]), loss)
    return out
