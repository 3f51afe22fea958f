"""The `megatron` learner backend: megatron-core GPTModel with tensor, pipeline and data parallelism.

Optional: `pip install 'selfreward[megatron]'` (pins megatron-core). Importing this package does not import
megatron-core; `backend.MegatronBackend` does.
"""

from __future__ import annotations

import importlib.util

INSTALL_HINT = "pip install 'selfreward[megatron]'"


def available() -> bool:
    """Whether megatron-core is installed (checked without importing it)."""
    try:
        return importlib.util.find_spec("megatron.core") is not None
    except ModuleNotFoundError:
        return False
