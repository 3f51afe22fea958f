"""The torch engine's GPU path (run on the GPU machine; skipped without CUDA): CUDA-graph decode steps give
the eager path's tokens, and bf16 generation on a Llama-3.2-1B-shaped model follows transformers."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from actors.engines.protocol import GenerationRequest, SamplingParams
from actors.engines.torch_engine import TorchEngine

pytestmark = pytest.mark.gpu


def save_model(path, config: LlamaConfig, dtype: torch.dtype) -> str:
    torch.manual_seed(0)
    with torch.device("cuda"):
        LlamaForCausalLM(config).to(dtype).save_pretrained(path)
    vocab = {f"t{i}": i for i in range(256)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0"))).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=None, bos_token_id=None, pad_token_id=None)
    return save_model(tmp_path_factory.mktemp("small"), config, torch.float32)


def requests(n: int, new: int, temperature: float) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 500, (int(torch.randint(4, 40, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    return [GenerationRequest(p, SamplingParams(temperature=temperature, max_new_tokens=new), seed=i)
            for i, p in enumerate(prompts)]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_cuda_graph_decode_gives_the_eager_tokens(small_model, temperature):
    reqs = requests(37, 300, temperature)  # more rows than a power of two; contexts past 256 (two kv buckets)
    eager = TorchEngine(small_model, device="cuda", dtype="float32", max_batch_size=64, max_seq_len=512,
                        cuda_graphs=False)
    graphed = TorchEngine(small_model, device="cuda", dtype="float32", max_batch_size=64, max_seq_len=512)
    a, b = eager.generate(reqs), graphed.generate(reqs)
    assert len(graphed._graphs._graphs) >= 2  # graphs were captured (and so replayed)
    same = sum(x.token_ids == y.token_ids for x, y in zip(a, b))
    assert same == len(reqs), f"{len(reqs) - same} of {len(reqs)} sequences differ"


def test_bf16_1b_generation_follows_transformers(tmp_path):
    """Each token the engine picks greedily is, under transformers' bf16 logits for the same prefix, within
    bf16 rounding of the best logit (random weights make near-ties common, so exact ids can differ), and the
    engine's log-prob of it matches transformers' within bf16 rounding."""
    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                         rope_theta=500000.0, tie_word_embeddings=True, eos_token_id=None, bos_token_id=None)
    path = save_model(tmp_path / "llama1b", config, torch.bfloat16)
    engine = TorchEngine(path, device="cuda", dtype="bfloat16", max_batch_size=16, max_seq_len=256)
    reqs = [GenerationRequest(r.prompt_ids, SamplingParams(temperature=0.0, max_new_tokens=24, return_logprobs=True),
                              seed=r.seed) for r in requests(8, 24, 0.0)]
    out = engine.generate(reqs)
    del engine
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    gaps = []
    with torch.no_grad():
        for r, o in zip(reqs, out):
            seq = torch.tensor([list(r.prompt_ids) + o.token_ids], device="cuda")
            logits = hf(seq).logits[0, len(r.prompt_ids) - 1 : -1].float()  # the logits each token was picked from
            picked = logits.gather(1, torch.tensor(o.token_ids, device="cuda")[:, None])[:, 0]
            best = logits.max(-1).values
            tolerance = 0.05 * logits.abs().max(-1).values  # bf16 logits carry ~3 significant digits
            assert (best - picked <= tolerance).all(), (best - picked).max().item()
            hf_logprobs = logits.log_softmax(-1).gather(1, torch.tensor(o.token_ids, device="cuda")[:, None])[:, 0]
            gaps.append((torch.tensor(o.logprobs, device="cuda") - hf_logprobs).abs())
    gaps = torch.cat(gaps)
    # log-probs near -ln(128256) = -11.8, where bf16 logits' rounding (and so the two paths') is ~0.03-0.06
    assert gaps.max() < 0.25 and gaps.mean() < 0.06, (gaps.max().item(), gaps.mean().item())
