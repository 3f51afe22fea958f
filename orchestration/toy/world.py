"""The toy world: tokenizer, tiny Llama config, data files and the bootstrap run that makes M1.

Everything is built locally from a recipe and cached under `<cache_dir>/toy/<hash of the recipe>/`, so the
second run skips it. The directory is written under a temporary name and renamed when complete, so an
interrupted bootstrap never leaves a half-built cache behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..stopping import StopRequested
from . import task

# Bump when the code that builds the toy world changes what it produces.
TOY_WORLD_VERSION = 11
# The bootstrap and its evaluation always use this many CPU threads: torch splits reductions by thread
# count, so os.cpu_count() threads made M1 differ from one machine to the next in its last bits, and a
# different M1 after 600 steps.
TOY_THREADS = 2
# The libraries whose versions decide what the build produces (BPE training, weight initialisation,
# kernels); they are part of the recipe's hash, so a world built by other versions is never reused.
DECIDING_LIBRARIES = ("torch", "transformers", "tokenizers")
ANSWER_CHECK_EVERY = 10  # answer phase: greedy accuracy on the dev questions every this many steps
META_MAX_NEW_TOKENS = 128  # the meta-judge probes' answer length: its own judgement, two verdict checks, the winner
DEV_PROMPTS = 128  # held-out questions that decide when the answer phase stops (apart from val)
SPECIAL_TOKENS = ("<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class ToyRecipe:
    """Everything that decides what the toy world contains (its hash names the cache entry)."""

    seed: int = 1234
    max_operand: int = 49
    train_prompts: int = 512  # prompts for the Self-Rewarding iterations
    val_prompts: int = 512  # held out: val/loss, greedy task accuracy and the judge probes
    # The bootstrap has two phases. The judge phase trains on judge examples only, to convergence. The answer
    # phase adds the instruction examples (with judge replay) and stops as soon as greedy accuracy on
    # DEV_PROMPTS held-out questions reaches answer_target: M1 judges well but answers only part of the
    # questions, the gap Self-Rewarding feeds on. Trained to the end in one phase, M1 answered 19% to 90%
    # depending on the seed (whether the tiny model generalised addition), and a seed at either end had
    # nothing to gain; the stop puts every seed's M1 in the same band.
    bootstrap_answers: int = 600  # instruction examples (question -> answer)
    # judge-format examples (judge prompt -> judgement). 6000, not 3000: with 3000 the judge phase's 600 steps
    # were 13 epochs, and one CPU world's judge scored only 56% of its own answers right (M1: 82% of the
    # probes), so Self-Rewarding trained on wrong pairs and lost 10 points.
    bootstrap_judgements: int = 6000
    answer_target: float = 0.4  # the answer phase stops at this greedy dev accuracy
    answer_steps: int = 600  # the answer phase's most steps (it stops earlier on reaching answer_target)
    # Meta-judge examples (two judgements -> which is right), learned in the judge phase; Meta-Rewarding's
    # worlds only (they make the judge phase about twice as slow on CPU, and Self-Rewarding never meta-judges).
    meta_judgements: int = 0
    vocab_size: int = 400
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    bootstrap_steps: int = 600  # the judge phase's steps
    bootstrap_batch: int = 64
    bootstrap_lr: float = 3e-3
    device: str = "cpu"  # where the bootstrap trains and is evaluated (cuda builds a different, equally good M1)

    def digest(self) -> str:
        payload = json.dumps({"version": TOY_WORLD_VERSION, **dataclasses.asdict(self),
                              "libraries": library_versions()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in DECIDING_LIBRARIES}


@dataclass(frozen=True)
class ToyWorld:
    root: Path
    model_dir: Path  # M1, a Hugging Face checkpoint directory
    train_file: Path
    val_file: Path
    report: dict  # bootstrap report: answer accuracy, judge parse rate, judge accuracy, seconds


def judge_prompt(question: str, response: str) -> str:
    return task.JUDGE_TEMPLATE.format(prompt=question, response=response)


def prepare(recipe: ToyRecipe, cache_dir: str | os.PathLike, log=print, stop=None) -> ToyWorld:
    """Return the cached toy world for `recipe`, building it first if needed.

    `stop()` is asked at every bootstrap step; a reason (a string) ends the build with StopRequested and
    leaves nothing in the cache."""
    root = Path(cache_dir).expanduser() / "toy" / recipe.digest()
    if not (root / "report.json").exists():
        tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"[toy] building the toy world in {root} (cached for later runs)")
        try:
            _build(recipe, tmp, log, stop)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    report = json.loads((root / "report.json").read_text())
    return ToyWorld(root, root / "model", root / "train.jsonl", root / "val.jsonl", report)


# ---- building ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Data:
    answers: list[tuple[str, str]]  # instruction examples (question, answer)
    judgements: list[tuple[str, str]]  # judge examples (judge prompt, judgement)
    train: list[task.Problem]  # the Self-Rewarding prompts
    val: list[task.Problem]  # held out: the run's evaluation
    dev: list[task.Problem]  # held out apart from val: decides when the answer phase stops

    @property
    def sft_pairs(self) -> list[tuple[str, str]]:
        return self.answers + self.judgements


def _data(recipe: ToyRecipe) -> _Data:
    """Every example and question of the world, all from the recipe's seed."""
    rng = random.Random(recipe.seed)
    boot_answers = [task.sample_problem(rng, recipe.max_operand) for _ in range(recipe.bootstrap_answers)]
    boot_judged = []
    for _ in range(recipe.bootstrap_judgements):
        p = task.sample_problem(rng, recipe.max_operand)
        boot_judged.append((p, task.candidate_answers(rng, p.answer)))
    train = [task.sample_problem(rng, recipe.max_operand) for _ in range(recipe.train_prompts)]
    val = [task.sample_problem(rng, recipe.max_operand) for _ in range(recipe.val_prompts)]
    dev = [task.sample_problem(rng, recipe.max_operand) for _ in range(DEV_PROMPTS)]
    answers = [(p.question, str(p.answer)) for p in boot_answers]
    judgements = [(judge_prompt(p.question, r), task.judgement_text(p, r)) for p, r in boot_judged]
    return _Data(answers, judgements, train, val, dev)


def _build(recipe: ToyRecipe, root: Path, log, stop=None) -> None:
    """M0 -> M1 in two phases: judge and meta-judge examples, then answers (with replay) until answer_target."""
    root.mkdir(parents=True)
    data = _data(recipe)
    _write_jsonl(root / "train.jsonl", data.train)
    _write_jsonl(root / "val.jsonl", data.val)
    rng = random.Random(recipe.seed + 11)
    metas = [_meta_example(rng, recipe.max_operand) for _ in range(recipe.meta_judgements)]
    tokenizer = build_tokenizer([q + "\n" + a for q, a in data.sft_pairs + metas], recipe.vocab_size)
    model_dir = root / "model"
    save_initial_model(tokenizer, recipe, model_dir)
    t0 = time.time()
    _bootstrap_sft(model_dir, tokenizer, data.judgements + metas, recipe, "[toy] bootstrap M0 -> M1, judge phase",
                   recipe.bootstrap_steps, recipe.bootstrap_batch, recipe.bootstrap_lr, stop=stop)
    # The answer examples, with as many judge examples and half as many meta-judge ones replayed.
    mix = data.answers + rng.sample(data.judgements, min(len(data.judgements), len(data.answers)))
    mix += rng.sample(metas, min(len(metas), len(data.answers) // 2))
    dev_prompts = [_prompt_ids(tokenizer, p.question) for p in data.dev]

    def reached_target(module) -> float | None:
        accuracy = _greedy_accuracy(module, tokenizer, dev_prompts, data.dev)
        return accuracy if accuracy >= recipe.answer_target else None

    steps, dev_accuracy = _bootstrap_sft(model_dir, tokenizer, mix, recipe, "[toy] bootstrap M0 -> M1, answer phase",
                                         recipe.answer_steps, recipe.bootstrap_batch, recipe.bootstrap_lr / 3,
                                         until=reached_target, stop=stop)
    if dev_accuracy is None:
        log(f"[toy] WARNING: the answer phase ran all {steps} steps without reaching {recipe.answer_target:.0%} "
            "greedy accuracy on the dev questions; M1 answers fewer questions than the recipe intends")
    report = evaluate_m1(model_dir, data.val, recipe.seed, log, meta=bool(metas), device=recipe.device,
                         max_operand=recipe.max_operand)
    report["answer_phase_steps"] = steps
    report["dev_answer_accuracy"] = None if dev_accuracy is None else round(dev_accuracy, 3)
    report["bootstrap_seconds"] = round(time.time() - t0, 1)
    (root / "recipe.json").write_text(json.dumps({**dataclasses.asdict(recipe), "libraries": library_versions(),
                                                  "version": TOY_WORLD_VERSION}, indent=2))
    (root / "report.json").write_text(json.dumps(report, indent=2))


def meta_judge_prompt(question: str, response: str, judgement_a: str, judgement_b: str) -> str:
    return task.META_JUDGE_TEMPLATE.format(prompt=question, response=response, judgement_a=judgement_a,
                                           judgement_b=judgement_b)


def _meta_example(rng: random.Random, max_operand: int) -> tuple[str, str]:
    """(meta-judge prompt, answer): a right judgement and one with a slip (task.flawed_judgement) of one
    answer, in random order. The slip always changes the score: the run only ever meta-judges judgements whose
    scores differ (SPEC 4: a judge pair needs two different scores), and a slip that leaves every verdict as it
    was has no right answer for a meta-judge that compares verdicts."""
    p = task.sample_problem(rng, max_operand)
    response = task.candidate_answers(rng, p.answer)
    right = task.without_score(task.judgement_text(p, response))
    for _ in range(20):
        wrong = task.without_score(task.flawed_judgement(rng, p, response))
        if task.verdicts(wrong).count("y") != task.verdicts(right).count("y"):
            break
    else:  # a flipped verdict always changes the score
        wrong = task.without_score(task.flawed_judgement(rng, p, response, "verdict"))
    winner = rng.choice("AB")
    a, b = (right, wrong) if winner == "A" else (wrong, right)
    return meta_judge_prompt(p.question, response, a, b), task.meta_judgement_text(p, response, winner, a, b)


def _write_jsonl(path: Path, problems: list[task.Problem]) -> None:
    with open(path, "w") as f:
        for p in problems:
            row = {"messages": [{"role": "user", "content": p.question},
                                {"role": "assistant", "content": str(p.answer)}], **p.metadata()}
            f.write(json.dumps(row) + "\n")


def build_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE trained on the toy corpus, digits always split, with the toy chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_initial_model(tokenizer, recipe: ToyRecipe, model_dir: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=3 * recipe.hidden_size,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads,
        max_position_embeddings=384, rope_theta=10000.0, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)


def _bootstrap_sft(model_dir: Path, tokenizer, pairs: list[tuple[str, str]], recipe: ToyRecipe, desc: str,
                   steps: int, batch_size: int, lr: float, until=None, stop=None) -> tuple[int, float | None]:
    """Supervised training of the checkpoint in `model_dir` in this process, saved back there.

    `until(module)` is asked every ANSWER_CHECK_EVERY steps; a non-None answer stops training early. Returns
    (steps trained, the last non-None answer or None).
    """
    import torch
    from tqdm import tqdm

    from learner.backends.torch_backend import TorchBackend
    from learner.types import LossConfig, OptimConfig, TrainSample

    samples = []
    for question, answer in pairs:
        prompt_ids = _prompt_ids(tokenizer, question)
        answer_ids = tokenizer.encode(answer + "<|end|>", add_special_tokens=False)
        samples.append(TrainSample(prompt_ids, answer_ids))
    warmup = min(50, steps // 10)
    optim = OptimConfig(lr=lr, min_lr=lr / 10, warmup_steps=warmup, schedule="cosine", decay_steps=steps - warmup,
                        weight_decay=0.0, micro_batch_size=batch_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(TOY_THREADS)
    backend = TorchBackend(str(model_dir), optim, seed=recipe.seed, device=recipe.device)
    loss_cfg = LossConfig(sft_average_log_probs=True)
    rng = random.Random(recipe.seed + 1)
    order: list[int] = []
    bar = tqdm(range(steps), desc=desc, unit="step", mininterval=1.0)
    done, stopped = 0, None
    try:
        for _ in bar:
            reason = stop() if stop is not None else None
            if reason:
                raise StopRequested(f"{reason} during the toy bootstrap")
            if len(order) < batch_size:
                order += rng.sample(range(len(samples)), len(samples))
            batch = [samples[order.pop()] for _ in range(batch_size)]
            metrics = backend.train_step(batch, loss_cfg)
            done += 1
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            if until is not None and done % ANSWER_CHECK_EVERY == 0:
                stopped = until(backend.module)
                if stopped is not None:
                    break
        backend.module.save_pretrained(model_dir, safe_serialization=True)
    finally:
        bar.close()
        torch.set_num_threads(threads)
    return done, stopped


def _greedy_accuracy(module, tokenizer, prompts: list[list[int]], problems: list[task.Problem]) -> float:
    """Greedy answer accuracy of a model being trained (left-padded batch, 8 new tokens, as evaluate_m1), on the
    module in memory: evaluate_m1's engine would need the checkpoint written to disk at every check."""
    import torch

    device = next(module.parameters()).device
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    was_training = module.training
    module.eval()
    with torch.no_grad():
        out = module.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    module.train(was_training)
    answers = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return sum(task.is_correct(a, p.answer) for a, p in zip(answers, problems)) / len(problems)


def evaluate_m1(model_dir: Path, val: list[task.Problem], seed: int, log, meta: bool = False,
                device: str = "cpu", max_operand: int = 49) -> dict:
    """Greedy answer accuracy and judge parse rate / accuracy of the bootstrapped model on held-out data."""
    import torch
    from transformers import AutoTokenizer

    from actors.engines.protocol import GenerationRequest, SamplingParams
    from actors.engines.torch_engine import TorchEngine
    from actors.judges.parsing import parse_score

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(TOY_THREADS)
    engine = TorchEngine(str(model_dir), max_batch_size=128, device=device)

    def ask(texts: list[str], max_new: int) -> list[str]:
        greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new)
        reqs = [GenerationRequest(_prompt_ids(tokenizer, t), greedy) for t in texts]
        return [tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in engine.generate(reqs)]

    answers = ask([p.question for p in val], 8)
    accuracy = sum(task.is_correct(a, p.answer) for a, p in zip(answers, val)) / len(val)
    rng = random.Random(seed + 7)
    candidates = [task.candidate_answers(rng, p.answer) for p in val]
    judgements = ask([judge_prompt(p.question, c) for p, c in zip(val, candidates)], 96)
    scores = [parse_score(j) for j in judgements]
    parsed = [(s, task.rubric_score(c, p.answer)) for s, c, p in zip(scores, candidates, val) if s is not None]
    report = {
        "answer_accuracy": round(accuracy, 3),
        "judge_parse_rate": round(len(parsed) / len(val), 3),
        "judge_accuracy": round(sum(s == t for s, t in parsed) / max(1, len(parsed)), 3),
    }
    if meta:
        from actors.judges.parsing import parse_verdict

        probes = [_meta_example(rng, max_operand) for _ in range(len(val))]
        answers = ask([q for q, _ in probes], META_MAX_NEW_TOKENS)
        right = [parse_verdict(text) is not None and want.endswith(parse_verdict(text))
                 for text, (_, want) in zip(answers, probes)]
        # Where it goes wrong: grading the answer itself (its five checks), or comparing the judgements with it.
        graded = [task.verdicts(text) == task.verdicts(want) for text, (_, want) in zip(answers, probes)]
        report["meta_judge_accuracy"] = round(sum(right) / len(probes), 3)
        report["meta_judge_grading_accuracy"] = round(sum(graded) / len(probes), 3)
        report["meta_judge_accuracy_when_graded_right"] = round(
            sum(r for r, g in zip(right, graded) if g) / max(1, sum(graded)), 3)
    torch.set_num_threads(threads)
    log(f"[toy] M1: greedy answer accuracy {report['answer_accuracy']:.1%}, judge parse rate "
        f"{report['judge_parse_rate']:.1%}, judge exact-score accuracy {report['judge_accuracy']:.1%}"
        + (f", meta-judge accuracy {report['meta_judge_accuracy']:.1%}" if meta else ""))
    return report


def _prompt_ids(tokenizer, text: str) -> list[int]:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
    return tokenizer.encode(prompt, add_special_tokens=False)
