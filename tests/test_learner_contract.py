"""The learner's contracts: the backend registry and protocol (every registered backend has every member,
with the protocol's parameters), the checkpoint files both backends write, and the group's bounded set-up."""

import inspect
import json
import multiprocessing as mp
import time

import pytest
import torch

from learner import checkpoint_files
from learner.backends import BACKENDS, LearnerBackend, backend_class, make_backend, megatron
from learner.types import OptimConfig

# Members the protocol declares: methods and properties, then the data attributes (annotations).
METHODS = sorted(n for n, v in vars(LearnerBackend).items()
                 if not n.startswith("_") and (inspect.isfunction(v) or isinstance(v, property)))
ATTRIBUTES = sorted(LearnerBackend.__annotations__)


def registered():
    return [pytest.param(name, marks=pytest.mark.skipif(name == "megatron" and not megatron.available(),
                                                        reason=f"needs megatron-core: {megatron.INSTALL_HINT}"))
            for name in BACKENDS]


@pytest.fixture(scope="module")
def model_dir(tiny_llama):
    return tiny_llama


def test_an_unknown_backend_names_the_key_and_the_choices():
    with pytest.raises(ValueError) as e:
        make_backend("jax", "/nowhere", OptimConfig())
    assert "learner.backend='jax'" in str(e.value) and "torch, megatron" in str(e.value)


def test_an_option_the_backend_does_not_take_names_the_key():
    with pytest.raises(ValueError) as e:
        make_backend("torch", "/nowhere", OptimConfig(), {"tensor_parallel": 2})
    assert "learner.tensor_parallel" in str(e.value) and "learner.backend='torch'" in str(e.value)


def test_the_protocol_states_the_contract():
    assert {"train_step", "sft_nll", "logprobs", "update_reference", "reset_optimizer", "named_weights",
            "export_buckets", "rng_state", "save", "load_training_state", "data_parallel"} <= set(METHODS)
    assert {"gathers_weights", "live_weights", "device"} <= set(ATTRIBUTES)


@pytest.mark.parametrize("name", registered())
def test_every_registered_backend_has_every_member_of_the_protocol(name):
    cls = backend_class(name)
    for member in METHODS:
        theirs = inspect.getattr_static(cls, member, None)
        assert theirs is not None, f"{cls.__name__} lacks {member}"
        ours = vars(LearnerBackend)[member]
        if isinstance(ours, property):
            assert isinstance(theirs, property), f"{cls.__name__}.{member} must be a property"
            continue
        wanted = list(inspect.signature(ours).parameters)
        have = list(inspect.signature(theirs).parameters)
        assert have[: len(wanted)] == wanted, f"{cls.__name__}.{member}{tuple(have)} is not {tuple(wanted)}"
    assert isinstance(cls.gathers_weights, bool) and isinstance(cls.live_weights, bool)
    params = inspect.signature(cls).parameters
    assert list(params)[:2] == ["model_dir", "optim"]
    assert {"device", "dtype", "rank", "world_size", "seed", "reference_dir"} <= set(params)


def test_capabilities_differ_where_the_backends_do():
    assert backend_class("torch").gathers_weights is False and backend_class("torch").live_weights is True
    if megatron.available():
        assert backend_class("megatron").gathers_weights is True
        assert backend_class("megatron").live_weights is False


def test_a_built_torch_backend_satisfies_the_protocol(model_dir):
    backend = make_backend("torch", model_dir, OptimConfig(), device="cpu", dtype="float32", rank=0, world_size=1,
                           seed=0, reference_dir=None)
    assert isinstance(backend, LearnerBackend)
    assert backend.data_parallel == (0, 1) and backend.device == torch.device("cpu")


def _build_megatron(model_dir: str, queue) -> None:
    """A one-rank megatron backend in a fresh process with no process group yet: it joins its own."""
    import torch.distributed as dist

    backend = make_backend("megatron", model_dir, OptimConfig(), {"tensor_parallel": 1}, device="cpu",
                           dtype="float32", rank=0, world_size=1, seed=0, reference_dir=None)
    queue.put((isinstance(backend, LearnerBackend), backend.data_parallel, dist.get_world_size()))


@pytest.mark.skipif(not megatron.available(), reason=f"needs megatron-core: {megatron.INSTALL_HINT}")
def test_a_built_one_rank_megatron_backend_satisfies_the_protocol(model_dir):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_build_megatron, args=(model_dir, queue))
    proc.start()
    try:
        assert queue.get(timeout=300) == (True, (0, 1), 1)
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()


# ---- checkpoint files ---------------------------------------------------------------------------------------


def test_publish_replaces_the_directory_at_once(tmp_path):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with checkpoint_files.publish(final) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir()) and tmp != final
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").exists()  # untouched until the block ends
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]


def test_a_write_that_raises_leaves_no_partial_directory(tmp_path):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with checkpoint_files.publish(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise OSError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    with pytest.raises(RuntimeError):  # a first checkpoint that fails leaves nothing at all
        with checkpoint_files.publish(tmp_path / "first"):
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_rng_states_round_trip_and_refuse_another_world_size(tmp_path):
    torch.manual_seed(1)
    states = [{"torch": torch.get_rng_state()}, {"torch": torch.manual_seed(2).get_state()}]
    checkpoint_files.write_rng_states(tmp_path, states)
    assert (tmp_path / "rng.pt").is_file()
    mine = checkpoint_files.read_rng_state(tmp_path, rank=1, world_size=2)
    expected = torch.rand(3)  # drawn right after manual_seed(2)
    torch.manual_seed(99)
    checkpoint_files.set_rng_state(mine)
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(ValueError) as e:
        checkpoint_files.read_rng_state(tmp_path, rank=0, world_size=4)
    assert (f"{tmp_path} holds RNG states of 2 learner ranks, this group has 4: resume with the same "
            "cluster.learner.workers") in str(e.value)


def test_optimizer_and_learner_state_files_keep_their_names_and_keys(tmp_path):
    checkpoint_files.write_optimizer(tmp_path, {"optimizer": {"state": {}}, "step": 3})
    checkpoint_files.write_learner_state(tmp_path, step=3, world_size=2)
    assert checkpoint_files.read_optimizer(tmp_path) == {"optimizer": {"state": {}}, "step": 3}
    assert (tmp_path / "learner_state.json").read_text() == json.dumps({"step": 3, "world_size": 2})
    assert (checkpoint_files.OPTIMIZER_FILE, checkpoint_files.RNG_FILE) == ("optimizer.pt", "rng.pt")


# ---- the group's set-up ---------------------------------------------------------------------------------------


def test_a_worker_that_never_starts_fails_the_setup_naming_it(ray_session, model_dir):
    from learner.group import LearnerGroup, LearnerSpec

    spec = LearnerSpec(model_dir=model_dir, optim=OptimConfig(), workers=2, num_cpus=10_000)  # cannot be placed
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        LearnerGroup(spec, setup_timeout_s=2)
    assert time.monotonic() - t0 < 60
    assert "learner worker(s) 0 did not finish the rendezvous within 2s" in str(e.value)


def test_the_group_awaits_through_the_given_wait(ray_session, model_dir):
    import ray

    from learner.group import LearnerGroup, LearnerSpec

    waited = []

    def wait(refs):
        waited.append(refs)
        return ray.get(refs)

    group = LearnerGroup(LearnerSpec(model_dir=model_dir, optim=OptimConfig(), num_cpus=0.5), wait=wait)
    try:
        assert not waited  # construction waits on its own, bounded
        group.reset_optimizer()
        assert len(waited) == 1 and group.data_parallel == 1
    finally:
        group.shutdown()


def test_a_worker_whose_setup_fails_raises_its_error_at_once(ray_session, model_dir):
    from learner.group import LearnerGroup, LearnerSpec

    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"learner\.backend='jax' is not one of: torch, megatron"):
        LearnerGroup(LearnerSpec(model_dir=model_dir, optim=OptimConfig(), backend="jax", num_cpus=0.5))
    assert time.monotonic() - t0 < 60  # not after setup_timeout_s
