"""engine.kind=trtllm without TensorRT-LLM: our side of the bridge (actors/engines/trtllm_engine.py, trtllm_mapping.py). The
sampling and result mapping are held to the torch engine's behaviour on the same tokens, the score mapping to
transformers, the refit layout check to the torch engine's, the name mapping to a round trip through
TensorRT-LLM's fused and sharded layout; configuration, placement and refit ranks. What needs TensorRT-LLM
itself is the contract suite's `trtllm` parametrisation (tests/test_engine_contract.py, marker trtllm)."""

from __future__ import annotations

import importlib
import re
import importlib.util
from collections import namedtuple

import pytest
import torch

from actors.engines import ENGINES, EngineSpec, engine_class, make_engine
from actors.engines.trtllm_engine import TrtllmEngine
from actors.engines.trtllm_mapping import (
    INSTALL, ModelShape, check_layout_against, checkpoint_shapes, hf_from_engine, sampled_logprobs, sampling_kwargs,
    score_from_logits, to_result,
)
from engine_models import COMMON, EOS, PROMPTS, greedy, random_model, run, sampled, save_checkpoints
from orchestration.config import ConfigError, load_config
from orchestration.placement import requests
from orchestration.refit import member_ranks
from refit_wire import bucket_layout

pytestmark = pytest.mark.usefixtures("single_thread")
needs_no_trtllm = pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None,
                                     reason="TensorRT-LLM is installed here")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_checkpoints(tmp_path_factory)


@pytest.fixture(scope="module")
def torch_llama(checkpoints):
    path, _ = checkpoints["llama"]
    return make_engine(EngineSpec(str(path), max_batch_size=4))


# -------------------------------------------------------------------------------------- sampling


def test_greedy_and_sampled_kwargs():
    stop_ids = [EOS, 7]
    g = sampling_kwargs(greedy(20, stop_token_ids=(9, 7)), seed=3, prompt_len=5, max_seq_len=64, stop_ids=stop_ids)
    assert g == {"max_tokens": 20, "ignore_eos": True, "stop_token_ids": [EOS, 7, 9], "include_stop_str_in_output": True,
                 "seed": 3, "detokenize": False, "top_k": 1}
    s = sampling_kwargs(sampled(16, temperature=0.7, top_k=5, top_p=0.9, stop_strings=("END",), return_logprobs=True),
                        seed=11, prompt_len=5, max_seq_len=64, stop_ids=stop_ids)
    assert (s["temperature"], s["top_k"], s["top_p"], s["seed"]) == (0.7, 5, 0.9, 11)
    assert (s["stop"], s["detokenize"], s["logprobs"], s["logprobs_mode"]) == (["END"], True, 1, "raw")
    # Ours "no filter" (top_k 0, top_p 1) is theirs "unset".
    plain = sampling_kwargs(sampled(4), seed=0, prompt_len=5, max_seq_len=64, stop_ids=[])
    assert "top_k" not in plain and "top_p" not in plain and plain["temperature"] == 1.0 and "logprobs" not in plain


def test_max_tokens_stops_at_the_context():
    assert sampling_kwargs(greedy(50), 0, prompt_len=20, max_seq_len=24, stop_ids=[])["max_tokens"] == 4
    with pytest.raises(ValueError, match="no room"):
        sampling_kwargs(greedy(5), 0, prompt_len=24, max_seq_len=24, stop_ids=[])


def test_sampled_logprobs_from_either_form():
    Logprob = namedtuple("Logprob", "logprob rank")  # CompletionOutput.logprobs entries: {token_id: Logprob}
    assert sampled_logprobs([4, 5], [{4: Logprob(-0.5, 1), 9: Logprob(-1.0, 2)}, {5: Logprob(-2.0, 3)}]) == [-0.5, -2.0]
    assert sampled_logprobs([4, 5], [-0.25, -0.75]) == [-0.25, -0.75]
    assert sampled_logprobs([4], None) is None
    with pytest.raises(ValueError, match="sampled token 4"):
        sampled_logprobs([4], [{9: Logprob(-1.0, 1)}])
    with pytest.raises(ValueError, match="1 log-probs for 2 tokens"):
        sampled_logprobs([4, 5], [-0.1])


# --------------------------------------------------------------------------------------- results


def test_results_match_the_torch_engine_on_the_same_tokens(torch_llama, checkpoints):
    """Given the tokens the model generates free-running, to_result cuts and labels them as the torch engine
    does itself for each stopping rule (stop token, stop string spanning two tokens, none, both)."""
    from transformers import AutoTokenizer

    engine = torch_llama
    tokenizer = AutoTokenizer.from_pretrained(checkpoints["llama"][0])
    free = run(engine, [PROMPTS[1]], greedy(20, return_logprobs=True))[0]
    assert free.finish_reason == "length"
    tokens, lps = free.token_ids, free.logprobs
    stop_string = tokenizer.decode(tokens[8:10])
    cases = [greedy(20, return_logprobs=True), greedy(20, stop_token_ids=(tokens[6],)),
             greedy(20, stop_strings=("never appears", stop_string)),
             greedy(20, stop_token_ids=(tokens[12],), stop_strings=(stop_string,)),
             greedy(20, stop_token_ids=(tokens[3],), stop_strings=(stop_string,))]
    for params in cases:
        want = run(engine, [PROMPTS[1]], params)[0]
        got = to_result(tokens, lps if params.return_logprobs else None, params, sorted(engine.stop_token_ids),
                        weight_version=4, decode=tokenizer.decode)
        assert (got.token_ids, got.finish_reason, got.stop_text) == (want.token_ids, want.finish_reason, want.stop_text)
        assert got.weight_version == 4
    assert {run(engine, [PROMPTS[1]], p)[0].finish_reason for p in cases} == {"stop", "length"}


def test_the_checkpoint_eos_stops_and_is_kept():
    r = to_result([5, 6, EOS, 8], [-1.0, -2.0, -3.0, -4.0], greedy(10, return_logprobs=True), [EOS], 0,
                  decode=lambda ids: " ".join(map(str, ids)))
    assert (r.token_ids, r.finish_reason, r.logprobs) == ([5, 6, EOS], "stop", [-1.0, -2.0, -3.0])


def test_scores_from_context_logits_match_transformers(checkpoints):
    path, model = checkpoints["llama"]
    seq = PROMPTS[1]
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0]
    logp = logits.log_softmax(-1)
    for p in (1, 4, len(seq)):
        got = score_from_logits(logits, seq, p)
        assert got == pytest.approx([logp[t - 1, seq[t]].item() for t in range(p, len(seq))], abs=1e-5)
    with pytest.raises(ValueError, match="3 context logits"):
        score_from_logits(logits[:3], seq, 2)


# ----------------------------------------------------------------------------------------- refit


def test_layout_check_agrees_with_the_torch_engine(checkpoints):
    """Same accepted layout and the same refusals (messages naming the parameter) as the torch engine, on a
    tied checkpoint (its lm_head is not a parameter to send)."""
    path, _ = checkpoints["llama3_tied"]
    torch_engine = make_engine(EngineSpec(str(path), max_batch_size=2))
    shapes = checkpoint_shapes(path)
    assert shapes == {n: tuple(t.shape) for n, t in torch_engine.named_parameters_hf().items()}
    assert "lm_head.weight" not in shapes
    layout = bucket_layout(torch_engine.named_parameters_hf().items(), bucket_bytes=4096)
    check_layout_against(layout, shapes)
    first = layout[0]
    bad = [
        [{**first, "names": ["model.layers.7.mlp.up_proj.weight", *first["names"][1:]]}, *layout[1:]],
        layout[1:],
        [{**first, "shapes": [(3, 3), *first["shapes"][1:]]}, *layout[1:]],
        [{**first, "nbytes": first["nbytes"] - 64}, *layout[1:]],
        [{**first, "offsets": [2, *first["offsets"][1:]]}, *layout[1:]],
        layout + [layout[0]],
    ]
    for case in bad:
        with pytest.raises(ValueError) as ours:
            check_layout_against(case, shapes)
        with pytest.raises(ValueError) as theirs:
            torch_engine.check_layout(case)
        assert str(ours.value) == str(theirs.value)


def _engine_layout(hf: dict[str, torch.Tensor], shape: ModelShape, tp: int) -> list[dict[str, torch.Tensor]]:
    """How TensorRT-LLM's PyTorch Llama holds `hf` on each of `tp` ranks (the layout hf_from_engine reads):
    q/k/v and gate/up fused per rank, column-parallel on dim 0, row-parallel on dim 1, norms replicated,
    a kv head on several ranks when there are fewer kv heads than ranks."""
    def rows(t, rank, n):
        return t.chunk(n, dim=0)[rank]

    ranks = []
    for r in range(tp):
        out = {}
        for name, t in hf.items():
            if ".q_proj." in name:
                kv_r = r * shape.num_kv_heads // tp if shape.num_kv_heads < tp else r
                kv_n = min(shape.num_kv_heads, tp)
                k, v = hf[name.replace("q_proj", "k_proj")], hf[name.replace("q_proj", "v_proj")]
                out[name.replace("q_proj", "qkv_proj")] = torch.cat(
                    [rows(t, r, tp), rows(k, kv_r, kv_n), rows(v, kv_r, kv_n)])
            elif ".gate_proj." in name:
                out[name.replace("gate_proj", "gate_up_proj")] = torch.cat(
                    [rows(t, r, tp), rows(hf[name.replace("gate_proj", "up_proj")], r, tp)])
            elif ".k_proj." in name or ".v_proj." in name or ".up_proj." in name:
                continue
            elif name.endswith("norm.weight"):
                out[name] = t
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                out[name] = t.chunk(tp, dim=1)[r]
            else:
                out[name] = rows(t, r, tp)
        ranks.append(out)
    return ranks


@pytest.mark.parametrize("family,tp", [("llama", 1), ("llama", 2), ("llama", 4), ("qwen2", 2), ("llama3_tied", 2)])
def test_engine_parameters_map_back_to_hugging_face_names(family, tp):
    model = random_model(family, seed=5)
    hf = {n: t.detach() for n, t in model.named_parameters()}
    config = model.config.to_dict()
    shape = ModelShape.from_config(config)
    assert shape.num_kv_heads == COMMON["num_key_value_heads"]  # tp=4 replicates each kv head on two ranks
    got = hf_from_engine(_engine_layout(hf, shape, tp), shape)
    assert set(got) == set(hf) - ({"lm_head.weight"} if shape.tie_word_embeddings else set())
    for name, value in got.items():
        assert torch.equal(value, hf[name]), name


# ------------------------------------------------------------------------- registry and configuration


def test_the_engine_module_imports_without_tensorrt_llm():
    assert ENGINES["trtllm"] == "actors.engines.trtllm_engine:TrtllmEngine"
    importlib.import_module("actors.engines.trtllm_engine")  # everything TensorRT-LLM-specific is in the adapter


@needs_no_trtllm
def test_without_the_package_the_kind_fails_with_the_install_command():
    with pytest.raises(ImportError, match=r"engine\.kind='trtllm'.*selfreward\[trtllm\]") as e:
        engine_class("trtllm")
    assert e.value.name == "tensorrt_llm"
    with pytest.raises(ModuleNotFoundError) as e:
        importlib.import_module("actors.engines.trtllm_adapter")
    assert e.value.name == "tensorrt_llm"
    with pytest.raises(ConfigError, match=r"engine\.kind='trtllm' .*tensorrt_llm.*" + re.escape(INSTALL)):
        load_config(["engine.kind=trtllm", "cluster.generators.num_gpus=1", "cluster.judges.num_gpus=1"])


def test_tensor_parallel_is_checked_against_the_pools():
    with pytest.raises(ConfigError, match=r"engine\.tensor_parallel=2 .*cluster\.generators\.num_gpus=1: set it to 2"):
        load_config(["engine.kind=trtllm", "engine.tensor_parallel=2", "cluster.generators.num_gpus=1"])
    with pytest.raises(ConfigError, match=r"cluster\.judges\.num_gpus=0: set it to 2"):
        load_config(["engine.kind=trtllm", "engine.tensor_parallel=2", "cluster.generators.num_gpus=2"])
    with pytest.raises(ConfigError, match=r"cluster\.generators\.num_gpus=0: set it to 1"):
        load_config(["engine.kind=trtllm"])  # its workers are GPU workers
    with pytest.raises(ConfigError, match=r"one CPU of its bundle, but cluster\.judges\.num_cpus=0\.5: set it to at least 1"):
        load_config(["engine.kind=trtllm", "cluster.generators.num_gpus=1", "cluster.judges.num_gpus=1",
                     "cluster.judges.num_cpus=0.5"])
    with pytest.raises(ConfigError, match=r"engine\.tensor_parallel=2: the torch engine runs a replica on one"):
        load_config(["engine.tensor_parallel=2", "cluster.generators.num_gpus=1"])
    with pytest.raises(ValueError, match="engine.tensor_parallel must be a positive integer"):
        EngineSpec("x", tensor_parallel=0)


def test_trtllm_options_are_checked(monkeypatch):
    monkeypatch.setattr(TrtllmEngine, "REQUIRES", (None, ""))  # only the option checks are under test here
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    with pytest.raises(ValueError, match=r"engine\.options\.max_prefill_tokens .*'trtllm'"):
        TrtllmEngine.check_spec(EngineSpec("", kind="trtllm", options={"max_prefill_tokens": 4}))
    with pytest.raises(ValueError, match=r"engine\.options\.cuda_graphs must be true or false"):
        TrtllmEngine.check_spec(EngineSpec("", kind="trtllm", options={"cuda_graphs": 1}))
    with pytest.raises(ValueError, match=r"engine\.kv_cache_memory_gb=2 .*engine\.gpu_memory_fraction"):
        TrtllmEngine.check_spec(EngineSpec("", kind="trtllm", kv_cache_memory_gb=2))
    TrtllmEngine.check_spec(EngineSpec("", kind="trtllm", options={"cuda_graphs": False}, tensor_parallel=2))


# ------------------------------------------------------------------------------- placement and refit


def test_each_replica_gets_one_bundle_per_rank():
    cluster = load_config(["cluster.generators.replicas=3", "cluster.generators.num_gpus=2",
                           "cluster.judges.num_gpus=2"]).cluster
    gen, judge = requests(cluster, judges=True, learner=False, engine_ranks={"cluster.generators": 2})
    assert (gen.count, gen.bundle) == (6, {"CPU": 1.0, "GPU": 1.0})
    assert (judge.count, judge.bundle["GPU"]) == (cluster.judges.replicas, 2.0)  # an engine in its host
    # Replica 1's workers go to its bundles 2 and 3, one GPU each.
    env = TrtllmEngine.bundle_env([2, 3])
    assert (env["TRTLLM_RAY_BUNDLE_INDICES"], env["TRTLLM_RAY_PER_WORKER_GPUS"]) == ("2,3", "1")


def test_the_refit_group_covers_every_engine_rank():
    assert member_ranks([1, 1, 1]) == ([1, 2, 3], 4)
    assert member_ranks([2, 2, 1]) == ([1, 3, 5], 6)  # two tp=2 generators, then a one-GPU judge


def test_the_kuberay_overlay_is_the_rayjob_on_the_trtllm_image():
    """deploy/kuberay/trtllm selects the Dockerfile.trtllm image and adds engine.kind=trtllm to rayjob.yaml's
    entrypoint, which it otherwise keeps (a drift guard: the overlay repeats the entrypoint)."""
    import yaml
    from pathlib import Path

    deploy = Path(__file__).resolve().parent.parent / "deploy"
    overlay = yaml.safe_load((deploy / "kuberay" / "trtllm" / "kustomization.yaml").read_text())
    job = yaml.safe_load((deploy / "kuberay" / "rayjob.yaml").read_text())
    assert overlay["resources"] == ["../rayjob.yaml"]
    tag = f"{overlay['images'][0]['name']}:{overlay['images'][0]['newTag']}"
    assert f"-t {tag} ." in (deploy / "docker" / "Dockerfile.trtllm").read_text()
    (patch,) = yaml.safe_load(overlay["patches"][0]["patch"])
    assert patch["path"] == "/spec/entrypoint"
    assert patch["value"] == job["spec"]["entrypoint"] + " engine.kind=trtllm"
