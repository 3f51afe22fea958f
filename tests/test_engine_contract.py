"""The engine contract (actors/engines/protocol.py), held for every engine in the registry: tokens and
log-probs against transformers, stopping, seeded sampling, in-place weight loading and versions; and the
registry itself. An engine whose package does not import here (say trtllm on a CPU machine) is skipped."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig

from actors.engines import DEFAULT_MAX_CONTEXT, ENGINES, EngineSpec, context_length, engine_class, make_engine
from actors.engines.protocol import GenerationRequest
from engine_models import CONFIGS, COMMON, EOS, PROMPTS, greedy, hf_greedy, random_model, run, sampled, save_checkpoints
from refit_wire import bucket_layout, pack_entries, pack_tensors


# Tiny matmuls gain nothing from threads (conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


# trtllm runs where TensorRT-LLM imports (a GPU machine with `selfreward[trtllm]`): `-m trtllm` selects it.
KINDS = [pytest.param(k, marks=pytest.mark.trtllm) if k == "trtllm" else k for k in ENGINES]


@pytest.fixture(scope="module", params=KINDS)
def kind(request) -> str:
    """Each registered engine kind; skipped where its package is missing (but not where ours is broken)."""
    try:
        engine_class(request.param)
    except ImportError as e:
        if (e.name or "").split(".")[0] == "actors":
            raise
        pytest.skip(str(e))
    return request.param


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_checkpoints(tmp_path_factory)


def build(kind: str, path, **spec):
    return make_engine(EngineSpec(str(path), kind=kind, **spec))


@pytest.fixture(scope="module")
def llama(kind, checkpoints):
    path, model = checkpoints["llama"]
    return build(kind, path, max_batch_size=8), model


# ------------------------------------------------------------------------------------------ registry


def test_every_engine_has_every_member_of_the_protocol(kind):
    """Every method and attribute the protocol states, with the protocol's parameters first."""
    import inspect

    from actors.engines.protocol import Engine

    cls = engine_class(kind)
    for name, ours in vars(Engine).items():
        if name.startswith("_") or not callable(getattr(ours, "__func__", ours)):
            continue
        theirs = inspect.getattr_static(cls, name, None)
        assert theirs is not None, f"{cls.__name__} lacks {name}"
        wanted = list(inspect.signature(getattr(ours, "__func__", ours)).parameters)
        have = list(inspect.signature(getattr(theirs, "__func__", theirs)).parameters)
        assert have[: len(wanted)] == wanted, f"{cls.__name__}.{name}{tuple(have)} is not {tuple(wanted)}"


def test_an_unknown_kind_names_the_key_and_the_kinds():
    with pytest.raises(ValueError, match=r"engine\.kind='vllm'") as e:
        make_engine(EngineSpec("unused", kind="vllm"))
    assert all(k in str(e.value) for k in ENGINES)


def test_an_engine_whose_package_is_missing_fails_only_when_built(monkeypatch):
    monkeypatch.setitem(ENGINES, "absent", "no_such_engine_package.engine:Engine")
    with pytest.raises(ImportError, match=r"engine\.kind='absent'") as e:
        make_engine(EngineSpec("unused", kind="absent"))
    assert e.value.name == "no_such_engine_package"


def test_an_unknown_option_names_the_key_and_the_engine(kind, checkpoints):
    path, _ = checkpoints["llama"]
    with pytest.raises(ValueError, match=rf"engine\.options\.no_such_option .*'{kind}'"):
        build(kind, path, options={"no_such_option": 1})


def test_context_length(tmp_path, checkpoints):
    path, _ = checkpoints["llama"]
    assert context_length(str(path), 100) == 100
    assert context_length(str(path), None) == COMMON["max_position_embeddings"]  # below the cap
    LlamaConfig(max_position_embeddings=131072).save_pretrained(tmp_path)
    assert context_length(str(tmp_path), None) == DEFAULT_MAX_CONTEXT


def test_the_engine_serves_its_spec(kind, checkpoints):
    path, _ = checkpoints["llama"]
    engine = build(kind, path, max_batch_size=3, weight_version=5)
    assert (engine.max_batch_size, engine.weight_version) == (3, 5)
    assert engine.max_seq_len == context_length(str(path), None)
    assert all(r.weight_version == 5 for r in run(engine, PROMPTS, greedy(3)))
    assert build(kind, path, max_seq_len=40).max_seq_len == 40


# ------------------------------------------------------------------------------- matches transformers


@pytest.mark.parametrize("family", list(CONFIGS))
def test_greedy_matches_transformers(kind, checkpoints, family):
    path, model = checkpoints[family]
    engine = build(kind, path, max_batch_size=8)
    results = run(engine, PROMPTS, greedy(20))
    for prompt, result in zip(PROMPTS, results):
        expected = hf_greedy(model, prompt, 20)
        assert result.token_ids == expected
        assert result.finish_reason == ("stop" if expected[-1] == EOS else "length")
    # A degenerate model (all prompts -> same repeated token) would make this test vacuous.
    assert len({tuple(r.token_ids) for r in results}) > 1


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_score_matches_transformers(kind, checkpoints, family):
    path, model = checkpoints[family]
    engine = build(kind, path, max_batch_size=4)
    prompt_lens = [2, 10, 1, 11]
    got = engine.score(PROMPTS, prompt_lens)
    for seq, p, lps in zip(PROMPTS, prompt_lens, got):
        with torch.no_grad():
            logp = model(torch.tensor([seq])).logits[0].log_softmax(-1)
        expected = [logp[t - 1, seq[t]].item() for t in range(p, len(seq))]
        assert len(lps) == len(seq) - p
        np.testing.assert_allclose(lps, expected, atol=1e-4)
        assert all(math.isfinite(x) for x in lps)


def test_logprobs_are_unscaled_model_logprobs(llama):
    engine, _ = llama
    r = run(engine, [PROMPTS[0]], sampled(8, temperature=1.3, return_logprobs=True), seeds=[5])[0]
    scored = engine.score([PROMPTS[0] + r.token_ids], [len(PROMPTS[0])])[0]
    np.testing.assert_allclose(r.logprobs, scored, atol=1e-4)


# ---------------------------------------------------------------------------------------- sampling


def test_sampling_is_batch_invariant_and_seeded(llama):
    engine, _ = llama
    target = GenerationRequest(PROMPTS[0], sampled(16, top_p=0.95), seed=1234)
    others = [
        GenerationRequest(PROMPTS[1], sampled(9, top_k=5), seed=7),
        GenerationRequest(PROMPTS[2], greedy(12), seed=0),
        GenerationRequest(PROMPTS[3], sampled(20, temperature=0.7), seed=99),
    ]
    alone = engine.generate([target])[0].token_ids
    first = engine.generate([target, *others])[0].token_ids
    last = engine.generate([*others[::-1], target])[-1].token_ids
    assert alone == first == last
    assert len(alone) == 16

    other_seed = engine.generate([GenerationRequest(PROMPTS[0], target.sampling, seed=1235)])[0].token_ids
    assert other_seed != alone
    assert alone != run(engine, [PROMPTS[0]], greedy(16))[0].token_ids  # it really sampled


def test_more_requests_than_slots(kind, checkpoints):
    path, _ = checkpoints["qwen2"]
    engine = build(kind, path, max_batch_size=2)
    prompts = [PROMPTS[i % 4][: 3 + i] for i in range(7)]
    params = [greedy(4 + 3 * i) for i in range(7)]
    together = run(engine, prompts, params)
    for prompt, param, result in zip(prompts, params, together):
        alone = run(engine, [prompt], param)[0]
        assert result.token_ids == alone.token_ids
        assert result.finish_reason == alone.finish_reason


def test_top_k_1_and_tiny_top_p_are_greedy(llama):
    engine, _ = llama
    reference = [r.token_ids for r in run(engine, PROMPTS, greedy(12))]
    seeds = [11, 22, 33, 44]
    for params in (sampled(12, top_k=1), sampled(12, top_p=1e-6), sampled(12, temperature=1.5, top_k=1)):
        assert [r.token_ids for r in run(engine, PROMPTS, params, seeds)] == reference


# ---------------------------------------------------------------------------------------- stopping


def test_stop_token_length_and_stop_string(kind, llama, checkpoints, tmp_path):
    engine, _ = llama
    path, _ = checkpoints["llama"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    free = run(engine, [PROMPTS[1]], greedy(20))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 20
    tokens = free.token_ids

    stop_id = tokens[6]
    cut = tokens.index(stop_id) + 1
    r = run(engine, [PROMPTS[1]], greedy(20, stop_token_ids=(stop_id,)))[0]
    assert r.finish_reason == "stop" and r.token_ids == tokens[:cut] and r.token_ids[-1] == stop_id
    assert r.stop_text is None

    short = run(engine, [PROMPTS[1]], greedy(7))[0]
    assert short.finish_reason == "length" and short.token_ids == tokens[:7]

    stop = tokenizer.decode(tokens[8:10])  # spans two tokens
    text_cut = next(j for j in range(1, 21) if stop in tokenizer.decode(tokens[:j]))
    r = run(engine, [PROMPTS[1]], greedy(20, stop_strings=("never appears", stop)))[0]
    assert r.finish_reason == "stop" and r.stop_text == stop and r.token_ids == tokens[:text_cut]

    # The checkpoint's own EOS ids (here generation_config.json's) stop too, and the stop token is kept.
    eos_at = tokens[3]
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    generation_config = tmp_path / "generation_config.json"
    settings = json.loads(generation_config.read_text()) if generation_config.exists() else {}
    generation_config.write_text(json.dumps({**settings, "eos_token_id": [EOS, eos_at]}))
    r = run(build(kind, tmp_path, max_batch_size=2), [PROMPTS[1]], greedy(20))[0]
    assert r.finish_reason == "stop" and r.token_ids == tokens[: tokens.index(eos_at) + 1]


def test_length_limits(kind, checkpoints):
    path, _ = checkpoints["llama"]
    engine = build(kind, path, max_batch_size=2, max_seq_len=24)
    r = run(engine, [list(range(3, 23))], greedy(50))[0]  # 20 prompt tokens: room for 4 more
    assert r.finish_reason == "length" and len(r.token_ids) == 4
    with pytest.raises(ValueError, match="24 tokens exceeds the limit of 23"):
        run(engine, [list(range(24))], greedy(5))


# ------------------------------------------------------------------------------------------- weights


def test_load_weights_from_buckets(kind, checkpoints):
    path, _ = checkpoints["llama3_tied"]
    engine = build(kind, path, max_batch_size=4)
    other = random_model("llama3_tied", seed=123)
    named = dict(other.named_parameters())  # tied: lm_head is deduplicated away
    names = list(named)
    buckets = [pack_tensors({n: named[n] for n in names[i::3]}) for i in range(3)]
    for b in buckets:
        b.data.setflags(write=False)  # as read from Ray's object store

    before = run(engine, PROMPTS, greedy(10))
    extra = "model.layers.9.mlp.up_proj.weight"
    bad_cases = {
        "missing": ([pack_tensors({n: named[n] for n in names[1:]})], names[0]),
        "extra": (buckets + [pack_tensors({extra: named[names[1]]})], extra),
        "mis-shaped": ([pack_tensors({**named, names[2]: named[names[2]][:-1]})], names[2]),
        "duplicate": (buckets + [pack_tensors({names[4]: named[names[4]]})], names[4]),
    }
    for case, (bad, culprit) in bad_cases.items():
        with pytest.raises(ValueError, match=culprit.replace(".", r"\.")):
            engine.load_weights(bad, version=99)
    assert engine.weight_version == 0
    assert [r.token_ids for r in run(engine, PROMPTS, greedy(10))] == [r.token_ids for r in before]

    engine.load_weights(buckets, version=7)
    results = run(engine, PROMPTS, greedy(10))
    assert all(r.weight_version == 7 for r in results)
    assert [r.token_ids for r in results] == [hf_greedy(other, p, 10) for p in PROMPTS]
    assert [r.token_ids for r in results] != [r.token_ids for r in before]
    for name, value in engine.named_parameters_hf().items():
        torch.testing.assert_close(value, named[name], atol=0, rtol=0)


def test_engine_rejects_a_bad_layout_and_keeps_its_weights(kind, tiny_llama):
    engine = build(kind, tiny_llama, max_batch_size=2)
    before = {n: t.clone() for n, t in engine.named_parameters_hf().items()}
    layout = bucket_layout(engine.named_parameters_hf().items(), bucket_bytes=4096)
    engine.check_layout(layout)
    first = layout[0]
    unknown = "model.layers.7.mlp.up_proj.weight"
    bad = {
        f"unknown parameter '{unknown}'": [{**first, "names": [unknown, *first["names"][1:]]}, *layout[1:]],
        "missing parameters": layout[1:],
        "has shape": [{**first, "shapes": [(3, 3), *first["shapes"][1:]]}, *layout[1:]],
        "outside the": [{**first, "nbytes": first["nbytes"] - 64}, *layout[1:]],
        "not aligned": [{**first, "offsets": [2, *first["offsets"][1:]]}, *layout[1:]],
    }
    for message, layout_ in bad.items():
        with pytest.raises(ValueError, match=message):
            engine.check_layout(layout_)
    after = engine.named_parameters_hf()
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("wire_dtype", [None, "bfloat16"])
def test_flat_buckets_load_in_place_and_the_caller_sets_the_version(kind, checkpoints, wire_dtype):
    """The collective refit's path: check_layout, then one load_flat_bucket per received buffer (cast from
    the wire dtype); the version changes only when the caller says every bucket is in."""
    path, _ = checkpoints["llama3_tied"]
    engine = build(kind, path, max_batch_size=4)
    other = random_model("llama3_tied", seed=321)
    named = {n: t.detach() for n, t in other.named_parameters()}
    layout = bucket_layout(named.items(), bucket_bytes=16384, dtype=wire_dtype)
    assert len(layout) > 1
    engine.check_layout(layout)
    for entry in layout:
        data = torch.zeros(entry["nbytes"], dtype=torch.uint8)
        pack_entries(entry, named, data)
        engine.load_flat_bucket(entry, data)
    assert engine.weight_version == 0
    wire = torch.bfloat16 if wire_dtype else torch.float32
    for name, value in engine.named_parameters_hf().items():
        torch.testing.assert_close(value.cpu().float(), named[name].to(wire).float(), atol=0, rtol=0)
    engine.weight_version = 3
    results = run(engine, PROMPTS, greedy(4))
    assert all(r.weight_version == 3 for r in results)
    if wire_dtype is None:
        assert [r.token_ids for r in results] == [hf_greedy(other, p, 4) for p in PROMPTS]


# ----------------------------------------------------------------------------- parity with torch


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_tokens_and_a_refit_match_the_torch_engine(kind, checkpoints, family):
    """Every engine gives the torch engine's greedy tokens, before and after the same refit (a round trip
    of another model's weights through buckets), and exports those weights back under the same names."""
    if kind == "torch":
        pytest.skip("the reference itself")
    path, _ = checkpoints[family]
    ours, reference = build(kind, path, max_batch_size=4), build("torch", path, max_batch_size=4)
    assert [r.token_ids for r in run(ours, PROMPTS, greedy(16))] == [r.token_ids for r in run(reference, PROMPTS, greedy(16))]
    other = random_model(family, seed=77)
    named = {n: t.detach() for n, t in other.named_parameters()}
    for engine in (ours, reference):
        engine.load_weights([pack_tensors(named)], version=2)
    after = run(ours, PROMPTS, greedy(16))
    assert [r.token_ids for r in after] == [r.token_ids for r in run(reference, PROMPTS, greedy(16))]
    assert all(r.weight_version == 2 for r in after)
    exported = ours.named_parameters_hf()
    assert set(exported) == set(reference.named_parameters_hf())
    for name, value in exported.items():
        torch.testing.assert_close(value.cpu().float(), named[name].float(), atol=0, rtol=0)
