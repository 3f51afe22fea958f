"""Inference engines behind one protocol (protocol.py)."""

from __future__ import annotations

from .protocol import Engine

ENGINES = ("torch",)


def make_engine(kind: str, model_dir: str, **kwargs) -> Engine:
    """Build the engine named by `kind` for the Hugging Face checkpoint in `model_dir`."""
    if kind == "torch":
        from .torch_engine import TorchEngine

        return TorchEngine(model_dir, **kwargs)
    raise ValueError(f"unknown engine {kind!r}; available: {', '.join(ENGINES)}")
