"""Test-session setup: Ray stays on loopback with no usage stats; one toy-world cache per session."""

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Without a GPU, Triton kernels (the engine's decode attention) run in Triton's interpreter. Read when
    # triton is first imported, so it is set here, before any test imports it.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory):
    """A toy-world cache shared by the end-to-end tests (the bootstrap runs once per session)."""
    return tmp_path_factory.mktemp("toy_cache")


# A small toy world for tests (with some meta-judge examples): trains in a few minutes on 2 cores.
TOY_TEST_OVERRIDES = ["model.toy.train_prompts=96", "model.toy.val_prompts=32", "model.toy.bootstrap_steps=250",
                      "model.toy.meta_judgements=400"]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for every test that needs one (start-up costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
