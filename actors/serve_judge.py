"""Serve a judge model behind Triton (PyTriton), for `judge.backend=triton` (actors/judges/triton.py).

    python -m actors.serve_judge model.path=/ckpt [host=127.0.0.1] [port=8000] [grpc_port=8001]
        [metrics_port=8002] [model_name=judge] [max_batch_size=64] [device=cuda] [model.dtype=bfloat16]

The project's torch engine (actors/engines/torch_engine.py) runs inside: Triton's HTTP and gRPC endpoints
take a batch of engine requests (prompt token ids, sampling parameters, seed) and return the engine's
results (token ids, finish reason, stop string), as actors/judges/triton_wire.py lays them out. A model
`<model_name>_info` tells clients the context length, the vocabulary size and the tokenizer files.
Every endpoint binds `host`: loopback by default. Serve on a private network only (docs/judges.md): there is
no authentication. SIGINT or SIGTERM stops the server.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .engines import EngineSpec, make_engine
from .judges import triton_wire as wire

USAGE = ("usage: python -m actors.serve_judge model.path=<checkpoint dir> [host=127.0.0.1] [port=8000] "
         "[grpc_port=8001] [metrics_port=8002] [model_name=judge] [max_batch_size=64] [device=cpu|cuda] "
         "[model.dtype=float32] [model.max_seq_len=N] [threads=1] [kv_cache_memory_gb=N]")


@dataclass
class ServedModel:
    path: Optional[str] = None  # a Hugging Face checkpoint directory
    dtype: str = "float32"
    max_seq_len: Optional[int] = None  # the engine's context; None = the model's, capped at 4096


@dataclass
class ServeConfig:
    model: ServedModel = field(default_factory=ServedModel)
    host: str = "127.0.0.1"  # every endpoint (HTTP, gRPC, metrics) binds this address
    port: int = 8000  # HTTP
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_name: str = "judge"
    max_batch_size: int = 64  # rows per Triton request, and engine slots (sequences decoded at once)
    device: Optional[str] = None  # cpu | cuda; None = cuda when available
    threads: int = 1  # torch threads on CPU
    kv_cache_memory_gb: Optional[float] = None  # the engine's KV-cache budget; None = the device's default
    gpu_memory_fraction: float = 0.9  # the KV-cache budget on CUDA when kv_cache_memory_gb is null
    exit_timeout_s: int = 5  # how long stopping waits for in-flight requests


def parse_args(argv: list[str]) -> ServeConfig:
    """key=value arguments into a ServeConfig; ValueError naming the key for anything wrong."""
    for arg in argv:
        if "=" not in arg:
            raise ValueError(f"{arg!r} is not key=value\n{USAGE}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ServeConfig), OmegaConf.from_dotlist(argv))
        cfg: ServeConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ValueError(f"{key + ': ' if key else ''}{str(e).strip().splitlines()[0]}\n{USAGE}") from None
    if cfg.model.path is None or not (Path(cfg.model.path).expanduser() / "config.json").is_file():
        raise ValueError(f"model.path={cfg.model.path!r} is not a Hugging Face checkpoint directory (no config.json)"
                         f"\n{USAGE}")
    for key in ("port", "grpc_port", "metrics_port"):
        if not 0 < getattr(cfg, key) < 65536:
            raise ValueError(f"{key}={getattr(cfg, key)} is not a TCP port")
    if len({cfg.port, cfg.grpc_port, cfg.metrics_port}) < 3:
        raise ValueError(f"port, grpc_port and metrics_port must differ, got {cfg.port}, {cfg.grpc_port}, "
                         f"{cfg.metrics_port}")
    if cfg.max_batch_size < 1 or cfg.threads < 1:
        raise ValueError("max_batch_size and threads must be >= 1")
    if cfg.device not in (None, "cpu", "cuda"):
        raise ValueError(f"device={cfg.device!r} is not cpu or cuda")
    if cfg.model_name.endswith(wire.INFO_SUFFIX):
        raise ValueError(f"model_name={cfg.model_name!r} must not end with {wire.INFO_SUFFIX!r} (the info model's)")
    return cfg


def tokenizer_files(model_dir: Path) -> dict[str, str]:
    return {name: (model_dir / name).read_text() for name in wire.TOKENIZER_FILES if (model_dir / name).is_file()}


def with_libpython() -> None:
    """Triton's Python backend stub links against libpython: it must find this interpreter's. Re-execute
    once with its directory on LD_LIBRARY_PATH (same process id, so whoever started us can still stop us)."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    paths = os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)
    if libdir and libdir not in paths:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *filter(None, paths)])
        os.execv(sys.executable, [sys.executable, "-m", "actors.serve_judge", *sys.argv[1:]])


def serve(cfg: ServeConfig, log=print) -> None:
    import numpy as np
    import torch
    from pytriton.decorators import batch
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    model_dir = Path(cfg.model.path).expanduser().resolve()
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(cfg.threads)
    engine = make_engine(EngineSpec(str(model_dir), device=device, dtype=cfg.model.dtype,
                                    max_batch_size=cfg.max_batch_size, max_seq_len=cfg.model.max_seq_len,
                                    torch_threads=cfg.threads, kv_cache_memory_gb=cfg.kv_cache_memory_gb,
                                    gpu_memory_fraction=cfg.gpu_memory_fraction))
    info = wire.info_json(max_seq_len=engine.max_seq_len, vocab_size=engine.args.vocab_size,
                          max_batch_size=cfg.max_batch_size, model=model_dir.name,
                          tokenizer_files=tokenizer_files(model_dir))

    @batch
    def generate(**inputs):
        return wire.encode_results(engine.generate(wire.decode_requests(inputs)))

    def describe(requests):
        return [{"info": np.array([info.encode()], dtype=np.object_)} for _ in requests]

    config = TritonConfig(http_address=cfg.host, http_port=cfg.port, grpc_address=cfg.host, grpc_port=cfg.grpc_port,
                          metrics_address=cfg.host, metrics_port=cfg.metrics_port, exit_timeout_secs=cfg.exit_timeout_s)
    spec = lambda rows: [Tensor(name=n, dtype=d, shape=s) for n, d, _, s in rows]  # noqa: E731
    with Triton(config=config) as triton:
        triton.bind(cfg.model_name, generate, inputs=spec(wire.INPUTS), outputs=spec(wire.OUTPUTS),
                    config=ModelConfig(max_batch_size=cfg.max_batch_size), strict=True)
        triton.bind(cfg.model_name + wire.INFO_SUFFIX, describe,
                    inputs=[Tensor(name="request", dtype=np.bytes_, shape=(1,))],
                    outputs=[Tensor(name="info", dtype=np.bytes_, shape=(1,))], config=ModelConfig(batching=False))
        log(f"[serve_judge] {model_dir} on {device} ({engine.max_seq_len} context, {engine.max_batch_size} slots) "
            f"as model {cfg.model_name!r}: http {cfg.host}:{cfg.port}, grpc {cfg.host}:{cfg.grpc_port}, "
            f"metrics {cfg.host}:{cfg.metrics_port}", flush=True)
        triton.serve()


def _stop(signum, frame):
    raise KeyboardInterrupt  # Triton.serve stops the server on it


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("pytriton") is None:
        print("error: the judge server needs PyTriton: pip install 'selfreward[serve]' (nvidia-pytriton, Linux)",
              file=sys.stderr)
        return 2
    with_libpython()
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, _stop)
    serve(cfg, log=lambda *a, **k: print(*a, **{"flush": True, **k}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
