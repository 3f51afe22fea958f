"""Hugging Face checkpoint directories: tensors read lazily by name, and written so transformers loads them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsReader:
    """Tensors of a checkpoint directory by Hugging Face name; each rank reads only what it holds."""

    def __init__(self, model_dir: str):
        root = Path(model_dir)
        if (root / INDEX).is_file():
            weight_map = json.loads((root / INDEX).read_text())["weight_map"]
            self._file_of = {name: root / file for name, file in weight_map.items()}
        elif (root / SINGLE).is_file():
            with safe_open(str(root / SINGLE), framework="pt") as f:
                self._file_of = {name: root / SINGLE for name in f.keys()}
        else:
            raise ValueError(f"{model_dir} holds no safetensors weights ({SINGLE} or {INDEX}); "
                             "the megatron backend reads Hugging Face safetensors checkpoints")
        self.model_dir = model_dir
        self._open: dict[Path, object] = {}

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KeyError(f"{self.model_dir} has no tensor {name!r}")
        path = self._file_of[name]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path].get_tensor(name)


def write(directory: Path, weights: dict[str, torch.Tensor], hf_config, generation_config=None,
          tokenizer=None) -> None:
    """config.json, safetensors shards (with an index when there are several), generation config, tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    dtypes = {t.dtype for t in weights.values()}
    config = hf_config.__class__.from_dict(hf_config.to_dict())
    config.dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    config.save_pretrained(directory)
    save_torch_state_dict(weights, directory, metadata={"format": "pt"})
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
