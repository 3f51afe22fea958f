"""Benchmark 2: weight refit from a learner GPU to an engine GPU (DESIGN.md "Performance targets").

Llama-3.2-1B shape with random weights, bf16 (2.47 GB sent: the tied lm_head is the embedding and is not),
learner rank 0 on one GPU and one engine replica on the other, as Ray actors. Medians over repeats after
warm-up of:
  copy       one device-to-device copy GPU0 -> GPU1 of the same bytes inside one process (`.to("cuda:1")`):
             the reference bandwidth;
  broadcast  NCCL broadcasts of the refit's buckets between two Ray actors, from and into preallocated
             buffers (no packing, no Ray calls in the timed part);
  refit      `orchestration.refit.refit` end to end: learner weights -> the engine serving the new version
             (Ray calls, the group check, packing, broadcast, unpacking, synchronisation).
Before timing, one trained step is refit and the engine's weights are checked against the learner's.
Prints one table and the hardware. Target: refit >= 70% of the copy bandwidth.

--one-gpu: the one-GPU layout instead: learner (mixed precision, as runs train) and engine on halves of GPU 0;
the reference is one copy of the same bytes within GPU 0 (`.clone()`), and the rows are `refit` end to end
over cuda_ipc live (the engine copies straight from the learner's bf16 weights: one copy, one Ray call),
its parts (a no-op Ray call to the engine; the copy timed inside the engine's process), cuda_ipc staged (the
megatron/fsdp2 path: the learner packs into its buffer first, two calls and two copies) and the object store
(through host memory). Target: cuda_ipc >= 50% of the copy for the 1B shape.

    python benchmarks/refit.py                 # two GPUs (about a minute)
    python benchmarks/refit.py --one-gpu       # one GPU: cuda_ipc against the object store
    python benchmarks/refit.py --cpu           # a tiny model over gloo on CPU: checks the script end to end
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
import torch  # noqa: E402

REPO = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, REPO)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))  # Ray workers too

from benchmarks.shapes import LLAMA_1B  # noqa: E402

TINY = dict(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)


@ray.remote(max_calls=1)  # a fresh process: its CUDA memory goes back when it returns
def prepare(root: str, shape: dict, cpu: bool, repeats: int, one_gpu: bool = False) -> dict:
    """Save the random checkpoint (with a stand-in tokenizer); measure the copy for its byte count."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(**shape, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    with torch.device("cpu" if cpu else "cuda:0"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(root)
    vocab = {f"t{i}": i for i in range(1000)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0"))).save_pretrained(root)
    sent = [(n, tuple(t.shape)) for n, t in model.state_dict().items() if n != "lm_head.weight"]
    nbytes = sum(torch.Size(s).numel() * 2 for _, s in sent)
    pack_s = _pack_alone(model) if one_gpu else []
    del model
    src = torch.empty(nbytes, dtype=torch.uint8, device="cpu" if cpu else "cuda:0")
    times = []
    for _ in range(3 + repeats):
        _sync(cpu)
        t0 = time.perf_counter()
        dst = src.clone() if cpu or one_gpu else src.to("cuda:1")
        _sync(cpu)
        times.append(time.perf_counter() - t0)
        del dst
    return {"sent": sent, "nbytes": nbytes, "copy_s": times[3:], "pack_s": pack_s, "hardware": _hardware(cpu, one_gpu)}


def _pack_alone(model, repeats: int = 10) -> list[float]:
    """Seconds of the cuda_ipc pack without Ray: learner/ipc_source.py's export of every sent weight into its
    shared buffer, called in this process (the engine's copy out is the same work)."""
    from learner.ipc_source import IpcSource

    source, device = IpcSource(), torch.device("cuda:0")
    named = [(n, t) for n, t in model.state_dict().items() if n != "lm_head.weight"]
    times = []
    for _ in range(3 + repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        source.export(named, "bfloat16", device, live=False)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[3:]


def _sync(cpu: bool) -> None:
    if not cpu:
        for d in range(torch.cuda.device_count()):
            torch.cuda.synchronize(d)


def _hardware(cpu: bool, one_gpu: bool = False) -> str:
    if cpu:
        return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (gloo); "
                f"torch {torch.__version__}, ray {ray.__version__}")
    props = [torch.cuda.get_device_properties(d) for d in range(torch.cuda.device_count())]
    if one_gpu:
        return (f"1x {props[0].name}, {props[0].total_memory / 2**30:.0f} GiB; torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}, ray {ray.__version__}")
    peer = torch.cuda.can_device_access_peer(0, 1)
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
    return (f"{len(props)}x {props[0].name}, {props[0].total_memory / 2**30:.0f} GiB each, peer access "
            f"{'yes' if peer else 'no'}; torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {nccl}, "
            f"ray {ray.__version__}; NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE', 'unset')}")


class BroadcastBench:
    """One rank of a bare broadcast loop over the refit group set-up (refit_wire)."""

    def __init__(self, device: str):
        self.device = device

    def address(self) -> tuple[str, int]:
        from refit_wire import host_store

        host = ray.util.get_node_ip_address()
        self.store = host_store(host)
        return host, self.store.port

    def join(self, host: str, port: int, rank: int, backend: str) -> None:
        from refit_wire import join_store, open_group

        if rank:
            self.store = join_store(host, port)
        self.group = open_group(self.store, 1, rank, 2, backend)

    def run(self, sizes: list[int], repeats: int) -> list[float]:
        buffers = [torch.zeros(n, dtype=torch.uint8, device=self.device) for n in sizes]
        probe = torch.zeros(1, device=self.device)
        times = []
        for _ in range(3 + repeats):
            self.group.broadcast(probe, root=0).wait()  # both ranks start together
            self._sync()
            t0 = time.perf_counter()
            for work in [self.group.broadcast(b, root=0) for b in buffers]:
                work.wait()
            self._sync()
            times.append(time.perf_counter() - t0)
        return times[3:]

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.current_stream().synchronize()


def broadcast_alone(sizes: list[int], backend: str, device: str, repeats: int) -> list[float]:
    """Per repeat, the slower rank's time to broadcast every bucket."""
    actor = ray.remote(BroadcastBench).options(num_cpus=1, num_gpus=0 if device == "cpu" else 1)
    source, receiver = actor.remote(device), actor.remote(device)
    host, port = ray.get(source.address.remote())
    ray.get([source.join.remote(host, port, 0, backend), receiver.join.remote(host, port, 1, backend)])
    times = ray.get([source.run.remote(sizes, repeats), receiver.run.remote(sizes, repeats)])
    for a in (source, receiver):
        ray.kill(a)
    return [max(pair) for pair in zip(*times)]


def end_to_end(model_dir: str, bucket_sizes: list[int], backend: str, cpu: bool, repeats: int, log) -> dict:
    """Median seconds of `refit` per bucket size, after checking one refit of trained weights."""
    from actors.engines import EngineSpec
    from actors.generator import GeneratorActor
    from learner.group import LearnerGroup, LearnerSpec
    from learner.types import LossConfig, OptimConfig, TrainSample
    from orchestration.cluster import EnginePool, Pools, engine_actor
    from orchestration.refit import refit, use_collective

    gpus = 0 if cpu else 1
    learner = LearnerGroup(LearnerSpec(model_dir=model_dir, optim=OptimConfig(lr=1e-3, micro_batch_size=1),
                                       workers=1, num_cpus=1, num_gpus=gpus, dtype="bfloat16"))
    spec = EngineSpec(model_dir=model_dir, device="cpu" if cpu else "cuda", dtype="bfloat16", max_batch_size=8,
                      max_seq_len=256)
    engine = engine_actor(GeneratorActor, num_cpus=1, num_gpus=gpus).remote(spec)
    ray.get(engine.weight_version.remote())  # loaded, as start_pools waits for it
    pools = Pools(EnginePool("generator", [engine], 0, log=log), EnginePool("judge", [], 0), learner)
    t0 = time.perf_counter()
    use_collective(pools, backend, bucket_sizes[0])
    out = {"build_s": time.perf_counter() - t0}

    ray.get(learner.train_step_async([TrainSample([1, 2, 3], [4, 5], [6, 7])], LossConfig()))
    before = ray.get(engine.weight_digest.remote())
    refit(pools, 1, bucket_sizes[0])
    after, trained = ray.get(engine.weight_digest.remote()), learner.weight_digest()
    if after != trained or after == before:
        raise SystemExit("refit check failed: the engine's weights are not the learner's trained ones")
    version = 1
    for size in bucket_sizes:
        times = []
        for _ in range(2 + repeats):  # the first refit at a new bucket size lays the buckets out again
            version += 1
            t0 = time.perf_counter()
            refit(pools, version, size)
            times.append(time.perf_counter() - t0)
        out[size] = times[2:]
    if ray.get(engine.weight_version.remote()) != version:
        raise SystemExit(f"the engine does not report version {version} after the last refit")
    pools.shutdown()
    return out


def one_gpu_refits(model_dir: str, repeats: int, log) -> dict:
    """Median seconds of `refit` over the object store, cuda_ipc live and cuda_ipc staged, learner and engine
    on one GPU, each after checking one refit of trained weights; and the live refit's parts."""
    from actors.engines import EngineSpec
    from actors.generator import GeneratorActor
    from learner.group import LearnerGroup, LearnerSpec
    from learner.types import LossConfig, OptimConfig, TrainSample
    from orchestration.cluster import EnginePool, Pools, engine_actor
    from orchestration.ipc_refit import use_cuda_ipc
    from orchestration.refit import refit

    learner = LearnerGroup(LearnerSpec(model_dir=model_dir, optim=OptimConfig(lr=1e-3, micro_batch_size=1),
                                       workers=1, num_cpus=1, num_gpus=0.5, dtype="bfloat16"))
    spec = EngineSpec(model_dir=model_dir, device="cuda", dtype="bfloat16", max_batch_size=8, max_seq_len=256,
                      kv_cache_memory_gb=1.0)
    engine = engine_actor(GeneratorActor, num_cpus=1, num_gpus=0.5).remote(spec)
    ray.get(engine.weight_version.remote())
    pools = Pools(EnginePool("generator", [engine], 0, log=log), EnginePool("judge", [], 0), learner)
    out, version = {}, 0
    log("pools up")
    for transport in ("object_store", "cuda_ipc live", "cuda_ipc staged"):
        log(f"{transport}: timing")
        if transport == "cuda_ipc staged":  # what a backend with gathered weights does (megatron, fsdp2)
            ray.get(learner.workers[0].__ray_call__.remote(_export_staged))
        t0 = time.perf_counter()
        if transport != "object_store":
            use_cuda_ipc(pools)
        out[f"{transport} set-up"] = time.perf_counter() - t0
        ray.get(learner.train_step_async([TrainSample([1, 2, 3], [4, 5], [6, 7])], LossConfig()))
        before = ray.get(engine.weight_digest.remote())
        version += 1
        refit(pools, version)
        after, trained = ray.get(engine.weight_digest.remote()), learner.weight_digest()
        if after != trained or after == before:
            raise SystemExit(f"{transport} refit check failed: the engine's weights are not the learner's trained ones")
        times = []
        for _ in range(2 + repeats):
            version += 1
            t0 = time.perf_counter()
            refit(pools, version)
            times.append(time.perf_counter() - t0)
        out[transport] = times[2:]
        if transport == "cuda_ipc live":
            out.update(_live_parts(engine, repeats))
    pools.shutdown()
    return out


def _export_staged(worker) -> None:
    """Run inside learner rank 0 (Ray's __ray_call__): export through the staging buffer from now on."""
    worker.backend.live_weights = False


def _copy_inside(host) -> float:
    """Run inside the engine's process: seconds of the CUDA IPC copy alone (wait on the learner's event, the
    multi-tensor copy, the synchronisation)."""
    t0 = time.perf_counter()
    host.ipc.copy()
    return time.perf_counter() - t0


def _live_parts(engine, repeats: int) -> dict:
    """The live refit's two parts: a Ray call that does nothing, and the copy timed inside the engine."""
    noop, copy = [], []
    for _ in range(3 + repeats):
        t0 = time.perf_counter()
        ray.get(engine.weight_version.remote())
        noop.append(time.perf_counter() - t0)
        copy.append(ray.get(engine.__ray_call__.remote(_copy_inside)))
    return {"ray no-op call": noop[3:], "copy inside engine": copy[3:]}


def main_one_gpu(repeats: int) -> None:
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    if ray.cluster_resources().get("GPU", 0) < 1:
        raise SystemExit("--one-gpu needs a GPU")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(Path(tmp) / "model")
        prep = ray.get(prepare.options(num_gpus=1).remote(model_dir, LLAMA_1B, False, repeats, True))
        print(f"hardware: {prep['hardware']}")
        e2e = one_gpu_refits(model_dir, repeats, log=lambda line: print(line, file=sys.stderr, flush=True))
    nbytes, copy_s = prep["nbytes"], statistics.median(prep["copy_s"])
    median = lambda key: statistics.median(e2e[key])  # noqa: E731
    rows = [("copy within GPU0 (clone)", copy_s), ("refit, cuda_ipc live", median("cuda_ipc live")),
            ("  Ray call doing nothing", median("ray no-op call")),
            ("  copy inside the engine", median("copy inside engine")),
            ("refit, cuda_ipc staged", median("cuda_ipc staged")),
            ("  its pack alone, no Ray", statistics.median(prep["pack_s"])),
            ("refit, object store", median("object_store"))]
    print(f"model: Llama-3.2-1B shape, bf16, {nbytes / 1e9:.3f} GB sent; learner (mixed precision) and engine on "
          f"one GPU; medians of {repeats} after warm-up; cuda_ipc set-up (first use, not in the table): live "
          f"{e2e['cuda_ipc live set-up']:.2f} s, staged {e2e['cuda_ipc staged set-up']:.2f} s")
    print(f"| {'measurement':<26} | {'ms':>9} | {'GB/s':>7} | {'of copy':>7} |")
    print(f"|{'-' * 28}|{'-' * 11}|{'-' * 9}|{'-' * 9}|")
    for name, seconds in rows:
        print(f"| {name:<26} | {seconds * 1e3:>9.2f} | {nbytes / seconds / 1e9:>7.1f} | {copy_s / seconds:>7.1%} |")
    print(f"target: cuda_ipc refit >= 50% of the copy; here {copy_s / median('cuda_ipc live'):.1%} (live), "
          f"{copy_s / median('cuda_ipc staged'):.1%} (staged)")
    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="a tiny model over gloo on CPU (checks the script)")
    ap.add_argument("--bucket-mb", type=float, nargs="+", help="bucket sizes (default: 64 256 1024; --cpu: 0.25 1 4)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 10; --cpu 3)")
    ap.add_argument("--one-gpu", action="store_true", help="learner and engine on one GPU: cuda_ipc vs object store")
    args = ap.parse_args()
    cpu = args.cpu
    repeats = args.repeats or (3 if cpu else 10)
    if args.one_gpu:
        return main_one_gpu(repeats)
    bucket_mb = args.bucket_mb or ([0.25, 1, 4] if cpu else [64, 256, 1024])
    sizes = [int(mb * 2**20) for mb in bucket_mb]
    backend, device = ("gloo", "cpu") if cpu else ("nccl", "cuda")
    ray.init(num_cpus=4, num_gpus=0 if cpu else 2, include_dashboard=False, log_to_driver=False)
    if not cpu and ray.cluster_resources().get("GPU", 0) < 2:
        raise SystemExit("needs two GPUs (or --cpu)")
    from refit_wire import bucket_layout

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(Path(tmp) / "model")
        prep = ray.get(prepare.options(num_gpus=0 if cpu else 2).remote(model_dir, TINY if cpu else LLAMA_1B, cpu, repeats))
        print(f"hardware: {prep['hardware']}")
        meta = [(n, torch.empty(s, dtype=torch.bfloat16, device="meta")) for n, s in prep["sent"]]
        layouts = {size: bucket_layout(meta, size) for size in sizes}
        bcast = {size: broadcast_alone([b["nbytes"] for b in layouts[size]], backend, device, repeats) for size in sizes}
        e2e = end_to_end(model_dir, sizes, backend, cpu, repeats, log=lambda _: None)

    nbytes, copy_s = prep["nbytes"], statistics.median(prep["copy_s"])
    copy_rate = nbytes / copy_s
    rows = [("copy GPU0 -> GPU1 (.to)" if not cpu else "copy (CPU clone)", "-", "-", copy_s)]
    for size in sizes:
        rows.append((f"{backend} broadcast alone", f"{size / 2**20:g}", len(layouts[size]), statistics.median(bcast[size])))
    for size in sizes:
        rows.append(("end-to-end refit", f"{size / 2**20:g}", len(layouts[size]), statistics.median(e2e[size])))
    print(f"model: Llama-3.2-1B shape, bf16, {nbytes / 1e9:.3f} GB sent" if not cpu else
          f"model: tiny Llama, bf16, {nbytes / 1e6:.2f} MB sent")
    print(f"medians of {repeats} after warm-up; GB = 1e9 bytes; group set-up (first use, not in the table): "
          f"{e2e['build_s']:.2f} s")
    print(f"| {'measurement':<24} | {'bucket MB':>9} | {'buckets':>7} | {'ms':>8} | {'GB/s':>7} | {'of copy':>7} |")
    print(f"|{'-' * 26}|{'-' * 11}|{'-' * 9}|{'-' * 10}|{'-' * 9}|{'-' * 9}|")
    for name, mb, count, seconds in rows:
        rate = nbytes / seconds
        print(f"| {name:<24} | {mb:>9} | {count!s:>7} | {seconds * 1e3:>8.2f} | {rate / 1e9:>7.1f} | "
              f"{rate / copy_rate:>7.1%} |")
    best = min(statistics.median(e2e[size]) for size in sizes)
    print(f"target: end-to-end refit >= 70% of the copy bandwidth; best here {nbytes / best / copy_rate:.1%}")
    ray.shutdown()


if __name__ == "__main__":
    main()
