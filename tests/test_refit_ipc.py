"""The CUDA IPC refit's CPU-testable parts (the GPU run is tests/test_refit_ipc_gpu.py): the layout of live
weights over the storages they live in, the torch backend's weights staying put as it trains (what a live
export relies on), and the driver side: a live refit is one call per engine replica and none to the learner,
a staged one packs first, and a replica restarted later is restored from a peer, not from the learner."""

from __future__ import annotations

import pytest
import ray
import torch

from actors.engines.protocol import GenerationRequest, SamplingParams
from actors.engines.torch_engine import TorchEngine
from learner.backends import make_backend
from learner.ipc_source import storage_layout
from learner.types import LossConfig, OptimConfig, TrainSample
from actors.ipc_receiver import NotMapped
from orchestration.cluster import EnginePool, Pools
from orchestration.errors import ReplicaFailed
from orchestration.ipc_refit import IpcRefit
from refit_wire import entry_views


def test_views_of_one_flat_buffer_lay_out_as_one_entry_that_views_them_again():
    flat = torch.arange(40, dtype=torch.float32)
    named = [("a", flat[0:6].view(2, 3)), ("b", flat[8:20].view(3, 4)), ("c", flat[20:21])]
    layout, raws = storage_layout(named)
    assert len(layout) == 1 and layout[0]["offsets"] == [0, 32, 80] and layout[0]["nbytes"] == 160
    views = entry_views(layout[0], raws[0])
    for name, tensor in named:
        assert torch.equal(views[name], tensor) and views[name].data_ptr() == tensor.data_ptr()


def test_separate_tensors_lay_out_one_entry_each_and_a_strided_one_is_refused():
    a, b = torch.ones(3, dtype=torch.bfloat16), torch.zeros(2, 2)
    layout, raws = storage_layout([("a", a), ("b", b)])
    assert [e["names"] for e in layout] == [["a"], ["b"]] and [e["dtypes"] for e in layout] == [["bfloat16"],
                                                                                               ["float32"]]
    assert entry_views(layout[1], raws[1])["b"].data_ptr() == b.data_ptr()
    with pytest.raises(ValueError, match="weight 't' is not contiguous"):
        storage_layout([("t", torch.zeros(4, 4).t())])


def test_a_mixed_precision_torch_backend_exports_one_buffer_the_engine_accepts_and_trains_in_place(tiny_llama):
    backend = make_backend("torch", tiny_llama, OptimConfig(lr=1e-2, micro_batch_size=2), device="cpu",
                           dtype="bfloat16", rank=0, world_size=1, seed=0, reference_dir=None)
    assert backend.live_weights
    layout, raws = storage_layout(backend.named_weights())
    assert len(layout) == 1  # the model's one flat bf16 buffer
    engine = TorchEngine(tiny_llama, device="cpu", dtype="float32", max_batch_size=2, max_seq_len=64)
    engine.check_layout(layout)  # every engine parameter set once, with its shape
    pointers = {name: t.data_ptr() for name, t in backend.named_weights()}
    before = {name: t.clone() for name, t in entry_views(layout[0], raws[0]).items()}
    backend.train_step([TrainSample([1, 2, 3], [4, 5], [6, 7])] * 2, LossConfig(beta=0.5))
    assert {name: t.data_ptr() for name, t in backend.named_weights()} == pointers  # trained in place
    after = entry_views(layout[0], raws[0])  # ... so the exported views see the new weights
    assert any(not torch.equal(after[name], before[name]) for name in before)
    assert all(torch.equal(after[name], t) for name, t in backend.named_weights())


def test_an_engine_adopts_the_learners_flat_layout_so_a_refit_is_one_copy(tiny_llama):
    backend = make_backend("torch", tiny_llama, OptimConfig(lr=1e-2, micro_batch_size=2), device="cpu",
                           dtype="bfloat16", rank=0, world_size=1, seed=0, reference_dir=None)
    backend.train_step([TrainSample([1, 2, 3], [4, 5], [6, 7])] * 2, LossConfig(beta=0.5))  # unlike the checkpoint
    (entry,), (raw,) = storage_layout(backend.named_weights())
    engine = TorchEngine(tiny_llama, device="cpu", dtype="bfloat16", max_batch_size=2, max_seq_len=64)
    request = [GenerationRequest([1, 2, 3], SamplingParams(temperature=0.0, max_new_tokens=8))]
    served = engine.generate(request)[0].token_ids
    # a fused weight whose pieces are not back to back, or another dtype: no, and nothing changes
    gap = {**entry, "offsets": list(entry["offsets"]), "nbytes": entry["nbytes"] + 64}
    gap["offsets"][gap["names"].index("model.layers.0.self_attn.v_proj.weight")] += 64
    assert engine.adopt_layout(gap) is None
    assert engine.adopt_layout({**entry, "dtypes": ["float32"] * len(entry["names"]), "nbytes": 2 * entry["nbytes"]}) is None
    flat = engine.adopt_layout(entry)
    assert flat is not None and flat.numel() == entry["nbytes"]
    assert engine.generate(request)[0].token_ids == served  # its own weights, moved
    flat.copy_(raw)  # the refit's one copy
    learner = dict(backend.named_weights())
    assert all(torch.equal(t, learner[name]) for name, t in engine.named_parameters_hf().items())


# ---- the driver side, over stand-in actors -------------------------------------------------------------


@ray.remote(num_cpus=0)
class StandInEngine:
    """What IpcRefit calls on an engine replica, recording the calls."""

    def __init__(self, version: int = 0):
        self.version, self.calls, self.mapped, self.incarnation = version, [], "", "process-1"

    def refit_dtype(self) -> str:
        return "bfloat16"

    def check_ipc(self, export: dict) -> None:
        self.calls.append(("check_ipc", export["token"]))
        self.mapped = export["token"]

    def load_ipc(self, version: int, export: dict | str) -> tuple[str, int]:
        if isinstance(export, str):  # the token alone, as IpcReceiver.map takes it
            self.calls.append(("load_ipc", version, "token", export))
            if export != self.mapped:
                raise NotMapped(f"{export} is not mapped")
        else:
            self.calls.append(("load_ipc", version, "export", export["token"]))
            self.mapped = export["token"]
        self.version = version
        return self.incarnation, version

    def restart(self) -> None:
        """As a process Ray started anew: nothing mapped, another incarnation."""
        self.mapped, self.incarnation = "", "process-2"

    def export_weights(self, bucket_bytes: int):
        self.calls.append(("export_weights",))
        return self.version, []

    def load_weights(self, version: int, *refs) -> int:
        self.calls.append(("load_weights", version))
        self.version = version
        return version

    def weight_version(self) -> int:
        return self.version

    def recorded(self) -> list:
        return self.calls


@ray.remote(num_cpus=0)
class StandInLearner:
    def __init__(self, live: bool):
        self.live, self.exports = live, 0

    def ipc_export(self, dtype) -> dict:
        self.exports += 1
        token = "live" if self.live else "staged"  # a staged buffer is laid out once too
        return {"layout": [{"nbytes": 2_000_000}], "token": token, "live": self.live}

    def count(self) -> int:
        return self.exports


class StandInGroup:
    """The LearnerGroup calls IpcRefit makes."""

    def __init__(self, live: bool):
        self.rank0 = StandInLearner.remote(live)
        self.wait = ray.get

    def ipc_export(self, dtype):
        return [self.rank0.ipc_export.remote(dtype)]


@pytest.fixture
def stand_ins(ray_session):
    def make(live: bool):
        generators = EnginePool("generator", [StandInEngine.remote(), StandInEngine.remote()], 1, log=lambda _: None)
        return Pools(generators, EnginePool("judge", [StandInEngine.remote()], 1), StandInGroup(live))
    return make


def _calls(pools) -> list[list]:
    return ray.get([a.recorded.remote() for pool in pools.policy_pools for a in pool.actors])


def test_a_live_refit_is_one_call_per_engine_and_none_to_the_learner(stand_ins):
    pools = stand_ins(live=True)
    ipc = IpcRefit(pools)
    ipc.check()
    for version in (1, 2):
        ipc.refit(version)
    assert ray.get(pools.learner.rank0.count.remote()) == 1  # the set-up's export only
    assert _calls(pools) == [[("check_ipc", "live"), ("load_ipc", 1, "token", "live"),
                              ("load_ipc", 2, "token", "live")]] * 3
    assert pools.generators.version == pools.judges.version == 2


def test_a_staged_refit_has_the_learner_pack_first_each_time(stand_ins):
    pools = stand_ins(live=False)
    ipc = IpcRefit(pools)
    ipc.check()
    ipc.refit(1)
    ipc.refit(2)
    assert ray.get(pools.learner.rank0.count.remote()) == 3
    assert _calls(pools)[0] == [("check_ipc", "staged"), ("load_ipc", 1, "token", "staged"),
                                ("load_ipc", 2, "token", "staged")]


def test_a_replica_restarted_while_idle_is_sent_the_export_and_counted(stand_ins):
    pools = stand_ins(live=True)
    ipc = IpcRefit(pools)
    ipc.check()
    ipc.refit(1)
    ray.get(pools.generators.actors[1].restart.remote())
    ipc.refit(2)
    assert _calls(pools)[1][-2:] == [("load_ipc", 2, "token", "live"), ("load_ipc", 2, "export", "live")]
    assert pools.generators.restarts == [0, 1] and pools.generators.version == 2


def test_a_replica_restarted_after_a_live_refit_is_restored_from_a_peer_not_the_learner(stand_ins):
    pools = stand_ins(live=True)
    ipc = IpcRefit(pools)
    ipc.check()
    ipc.refit(1)  # the learner then trains on: its live weights are no longer version 1
    ipc.restore(pools.generators, 0)
    calls = _calls(pools)
    assert calls[0][-1] == ("load_weights", 1) and calls[1][-1] == ("export_weights",)


def test_with_no_peer_serving_its_version_a_restarted_replica_stops_the_run(ray_session):
    pools = Pools(EnginePool("generator", [StandInEngine.remote()], 1, log=lambda _: None), EnginePool("judge", [], 1),
                  StandInGroup(live=True))
    ipc = IpcRefit(pools)
    ipc.check()
    ipc.refit(1)
    with pytest.raises(ReplicaFailed, match="no healthy replica serves weight version 1 .*live cuda_ipc"):
        ipc.restore(pools.generators, 0)  # rather than copy the learner's weights, which may be newer
