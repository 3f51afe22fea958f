"""Run megatron-core on a machine without CUDA (CPU tests, CPU-only CI). Inactive when CUDA is available.

megatron-core 0.16.1 treats "the current CUDA device" as the home of every tensor it allocates itself. On the
code paths this backend uses, that assumption appears in the four ways below. (Two more CUDA-only pieces are
avoided rather than patched: the gradient clipping asserts CUDA gradients, so the backend clips itself.)
The distributed optimizer sorts parameters by `Tensor.type()` names and accepts only 'torch.cuda.*Tensor':
while the shim is active, `type()` of a CPU tensor reports the CUDA name of the same dtype.

1. `torch.cuda.current_device()` as a `device=` argument: the global memory buffer that holds the attention
   scores (`parallel_state.get_global_memory_buffer()`), the pipeline's receive buffers
   (`pipeline_parallel.p2p_communication`), the data-parallel gradient buffers
   (`distributed.param_and_grad_buffer`), the tensor-parallel gather buffers (`tensor_parallel.mappings`).
2. Literal `device="cuda"` / `.cuda()`: the default causal mask (`transformer.utils`), the schedules' token
   counter (`pipeline_parallel.schedules`), the gradient-norm tensors (`optimizer.clip_grads`), the tied
   output embedding on the last pipeline stage (`LanguageModule.setup_embeddings_and_output_layer`).
3. `torch.cuda.synchronize()` after pipeline point-to-point transfers.
4. The CUDA RNG tracker (`tensor_parallel.random.CudaRNGStatesTracker`) forked around attention dropout: it
   saves and restores `torch.cuda` generator states.

`cuda_on_cpu()` lets the CPU play the current CUDA device while megatron code runs: (1) and (3) by swapping
`torch.cuda.current_device` / `torch.cuda.synchronize` for CPU versions, (2) by a TorchFunctionMode that turns
CUDA `device=` arguments, `Tensor.to("cuda")` and `Tensor.cuda()` into the CPU, (4) by installing megatron's
tracker with its named streams kept on the CPU generator (same semantics: a separate stream per tensor-
parallel rank for dropout inside tensor-parallel regions). Everything is undone on exit except (4), which is
megatron's own process-wide tracker object. With CUDA available the context manager does nothing.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.tensor_parallel import random as mrandom
from torch.overrides import TorchFunctionMode


def _cpu_if_cuda(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaAllocationsOnCpu(TorchFunctionMode):
    """Redirects tensor creation and moves aimed at CUDA to the CPU (thread-local, while entered)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and args[0].device.type == "cpu":
            # the distributed optimizer sorts parameters by 'torch.cuda.<Type>Tensor' names
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs:
            kwargs = {**kwargs, "device": _cpu_if_cuda(kwargs["device"])}
        if func is torch.Tensor.to:
            args = tuple(_cpu_if_cuda(a) for a in args)
        return func(*args, **kwargs)


class _CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
    """megatron's named RNG streams, kept as CPU generator states."""

    def add(self, name, seed):
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        outer = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(outer)

    @contextlib.contextmanager
    def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise ValueError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _install_cpu_rng_tracker() -> None:
    if not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, _CpuRNGStatesTracker):
        mrandom._CUDA_RNG_STATE_TRACKER = _CpuRNGStatesTracker()
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


@contextlib.contextmanager
def cuda_on_cpu():
    """While entered (and only without CUDA), megatron-core's CUDA assumptions resolve to the CPU."""
    if torch.cuda.is_available():
        yield
        return
    _install_cpu_rng_tracker()
    saved = torch.cuda.current_device, torch.cuda.synchronize
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    try:
        with _CudaAllocationsOnCpu():
            yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize = saved
