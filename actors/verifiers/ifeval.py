"""Instruction following in the style of IFEval (Zhou et al. 2023, arXiv 2311.07911): verifiable format and
length constraints, scored as the share of a sample's instructions the response follows.

verifier_args, the reference's shape: {"instruction_id_list": ["punctuation:no_comma", ...],
"instruction_kwargs": [{...} or null, ...]} (IFEval's own field name "kwargs" is accepted too). Instruction
ids and keyword names are IFEval's, so its data (and the reference's) drive this verifier unchanged; keys
whose value is null are dropped, as IFEval's evaluation does. Every keyword an instruction takes is
required: IFEval fills a missing one at random, which makes no sense for a reward.

Ours, not IFEval's code: the maintained implementations (lm-eval's `lm_eval.tasks.ifeval`, `if-verifiable`)
need the `datasets` library to import and NLTK's punkt model to count sentences, which NLTK downloads at
run time (lm-eval at import) from outside the package registries, so they cannot run offline. The checks
below follow IFEval's definitions and are tested on the examples of its published instructions_test.py.
Two differences: sentences are split by a rule (ends . ! ? followed by space, common abbreviations and
decimals kept whole) instead of punkt; keywords are matched literally (IFEval used them as regexes). Only
the strict variant is scored (the reference's choice); an empty response follows nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .protocol import ARGS_KEY, Sample, Verdict

RELATIONS = ("less than", "at least")
CONSTRAINED_ANSWERS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
_ABBREVIATION = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|Prof|Sr|Jr|St|vs|etc|e\.g|i\.e|Inc|Ltd|Co)\.", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")

# The kinds of keyword value: what each must be, for the error message and the check.
KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "count": ("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "position": ("an integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "text": ("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip())),
    "letter": ("one character", lambda v: isinstance(v, str) and len(v) == 1 and not v.isspace()),
    "relation": (" or ".join(repr(r) for r in RELATIONS), lambda v: v in RELATIONS),
    "words": ("a non-empty list of non-empty strings",
              lambda v: isinstance(v, list) and bool(v) and all(isinstance(w, str) and w.strip() for w in v)),
}


@dataclass(frozen=True)
class Instruction:
    params: dict[str, str]  # keyword -> kind (KINDS)
    follows: Callable[[str, dict[str, Any]], bool]  # (response, keywords) -> followed


def _compare(count: int, relation: str, target: int) -> bool:
    return count < target if relation == "less than" else count >= target


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def count_sentences(text: str) -> int:
    text = _ABBREVIATION.sub(lambda m: m.group(0).replace(".", "\0"), text)
    text = re.sub(r"(\d)\.(\d)", "\\1\0\\2", text)
    return sum(1 for part in _SENTENCE_END.split(text.strip()) if re.search(r"\w", part))


def _language(text: str) -> str | None:
    """langdetect's language code, or None when it cannot tell (IFEval then counts the check as followed)."""
    import langdetect

    langdetect.DetectorFactory.seed = 0  # langdetect samples; a fixed seed makes the verdict repeatable
    try:
        return langdetect.detect(text)
    except langdetect.LangDetectException:
        return None


def _paragraphs_by_divider(text: str, k: dict) -> bool:
    parts = re.split(r"\s?\*\*\*\s?", text)
    count = len(parts)
    for i, part in enumerate(parts):
        if not part.strip():
            if i in (0, len(parts) - 1):
                count -= 1  # a divider at the very start or end makes no paragraph
            else:
                return False  # two dividers in a row
    return count == k["num_paragraphs"]


def _nth_paragraph_first_word(text: str, k: dict) -> bool:
    parts = text.split("\n\n")
    count = sum(1 for p in parts if p.strip())
    if k["nth_paragraph"] > count:
        return False
    paragraph = parts[k["nth_paragraph"] - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].lstrip("'\"")
    first = ""
    for ch in word:
        if ch in ".,?!'\"":
            break
        first += ch.lower()
    return count == k["num_paragraphs"] and first == k["first_word"].strip().lower()


def _postscript(text: str, k: dict) -> bool:
    marker = k["postscript_marker"].strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, text.lower(), flags=re.MULTILINE))


def _bullets(text: str, k: dict) -> bool:
    stars = re.findall(r"^\s*\*[^*].*$", text, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)
    return len(stars) + len(dashes) == k["num_bullets"]


def _highlights(text: str, k: dict) -> bool:
    single = [h for h in re.findall(r"\*[^\n*]*\*", text) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n*]*\*\*", text) if h[2:-2].strip()]
    return len(single) + len(double) >= k["num_highlights"]


def _sections(text: str, k: dict) -> bool:
    parts = re.split(r"\s?" + re.escape(k["section_spliter"].strip()) + r"\s?\d+\s?", text)
    return len(parts) - 1 >= k["num_sections"]


def _json(text: str, k: dict) -> bool:
    body = text.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        if body.startswith(fence):
            body = body[len(fence):]
            break
    body = body.removesuffix("```").strip()
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _title(text: str, k: dict) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", text))


def _two_responses(text: str, k: dict) -> bool:
    parts = text.split("******")
    kept = []
    for i, part in enumerate(parts):
        if part.strip():
            kept.append(part.strip())
        elif i not in (0, len(parts) - 1):
            return False
    return len(kept) == 2 and kept[0] != kept[1]


def _capital_words(text: str, k: dict) -> bool:
    capitals = [w for w in re.findall(r"\b\w+\b", text) if w.isupper()]
    return _compare(len(capitals), k["capital_relation"], k["capital_frequency"])


def _english_case(upper: bool) -> Callable[[str, dict], bool]:
    def follows(text: str, k: dict) -> bool:
        if not (text.isupper() if upper else text.islower()):
            return False
        language = _language(text)
        return language is None or language == "en"
    return follows


INSTRUCTIONS: dict[str, Instruction] = {
    "keywords:existence": Instruction(
        {"keywords": "words"},
        lambda t, k: all(re.search(re.escape(w.strip()), t, re.IGNORECASE) for w in k["keywords"])),
    "keywords:frequency": Instruction(
        {"keyword": "text", "frequency": "count", "relation": "relation"},
        lambda t, k: _compare(len(re.findall(re.escape(k["keyword"].strip()), t, re.IGNORECASE)), k["relation"],
                              k["frequency"])),
    "keywords:forbidden_words": Instruction(
        {"forbidden_words": "words"},
        lambda t, k: not any(re.search(r"\b" + re.escape(w.strip()) + r"\b", t, re.IGNORECASE)
                             for w in k["forbidden_words"])),
    "keywords:letter_frequency": Instruction(
        {"letter": "letter", "let_frequency": "count", "let_relation": "relation"},
        lambda t, k: _compare(t.lower().count(k["letter"].lower()), k["let_relation"], k["let_frequency"])),
    "language:response_language": Instruction(
        {"language": "text"}, lambda t, k: _language(t) in (None, k["language"].strip())),
    "length_constraints:number_sentences": Instruction(
        {"num_sentences": "count", "relation": "relation"},
        lambda t, k: _compare(count_sentences(t), k["relation"], k["num_sentences"])),
    "length_constraints:number_paragraphs": Instruction({"num_paragraphs": "count"}, _paragraphs_by_divider),
    "length_constraints:number_words": Instruction(
        {"num_words": "count", "relation": "relation"},
        lambda t, k: _compare(count_words(t), k["relation"], k["num_words"])),
    "length_constraints:nth_paragraph_first_word": Instruction(
        {"num_paragraphs": "count", "nth_paragraph": "position", "first_word": "text"}, _nth_paragraph_first_word),
    "detectable_content:number_placeholders": Instruction(
        {"num_placeholders": "count"}, lambda t, k: len(re.findall(r"\[.*?\]", t)) >= k["num_placeholders"]),
    "detectable_content:postscript": Instruction({"postscript_marker": "text"}, _postscript),
    "detectable_format:number_bullet_lists": Instruction({"num_bullets": "count"}, _bullets),
    "detectable_format:constrained_response": Instruction(
        {}, lambda t, k: any(answer in t.strip() for answer in CONSTRAINED_ANSWERS)),
    "detectable_format:number_highlighted_sections": Instruction({"num_highlights": "count"}, _highlights),
    "detectable_format:multiple_sections": Instruction(
        {"section_spliter": "text", "num_sections": "count"}, _sections),
    "detectable_format:json_format": Instruction({}, _json),
    "detectable_format:title": Instruction({}, _title),
    "combination:two_responses": Instruction({}, _two_responses),
    "combination:repeat_prompt": Instruction(
        {"prompt_to_repeat": "text"},
        lambda t, k: t.strip().lower().startswith(k["prompt_to_repeat"].strip().lower())),
    "startend:end_checker": Instruction(
        {"end_phrase": "text"},
        lambda t, k: t.strip().strip('"').lower().endswith(k["end_phrase"].strip().lower())),
    "startend:quotation": Instruction({}, lambda t, k: len(t.strip()) > 1 and t.strip()[0] == t.strip()[-1] == '"'),
    "change_case:capital_word_frequency": Instruction(
        {"capital_frequency": "count", "capital_relation": "relation"}, _capital_words),
    "change_case:english_capital": Instruction({}, _english_case(upper=True)),
    "change_case:english_lowercase": Instruction({}, _english_case(upper=False)),
    "punctuation:no_comma": Instruction({}, lambda t, k: "," not in t),
}


def instructions_of(args: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(instruction id, its keywords) for each instruction of verifier_args; ValueError naming what is wrong."""
    if not isinstance(args, Mapping):
        raise ValueError(f"verifier 'ifeval' needs {ARGS_KEY} as an object with instruction_id_list, got {args!r}")
    ids = args.get("instruction_id_list")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{ARGS_KEY}.instruction_id_list must be a non-empty list of instruction ids, got {ids!r}")
    if "instruction_kwargs" in args and "kwargs" in args:
        raise ValueError(f"{ARGS_KEY} has both instruction_kwargs and kwargs: give one")
    key = "kwargs" if "kwargs" in args else "instruction_kwargs"
    all_kwargs = args.get(key)
    if all_kwargs is None:
        all_kwargs = [None] * len(ids)
    if not isinstance(all_kwargs, list) or len(all_kwargs) != len(ids):
        raise ValueError(f"{ARGS_KEY}.{key} must be a list with one entry (an object or null) per instruction "
                         f"({len(ids)}), got {all_kwargs!r}")
    out = []
    for n, (iid, kwargs) in enumerate(zip(ids, all_kwargs)):
        instruction = INSTRUCTIONS.get(iid)
        if instruction is None:
            raise ValueError(f"{ARGS_KEY}.instruction_id_list[{n}]={iid!r} is not an instruction this verifier "
                             f"checks: {', '.join(INSTRUCTIONS)}")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise ValueError(f"{ARGS_KEY}.{key}[{n}] must be an object or null, got {kwargs!r}")
        given = {k: v for k, v in (kwargs or {}).items() if v is not None}
        wanted = ", ".join(f"{p} ({KINDS[kind][0]})" for p, kind in instruction.params.items()) or "no keywords"
        unknown = sorted(set(given) - set(instruction.params))
        missing = [p for p in instruction.params if p not in given]
        if unknown or missing:
            raise ValueError(f"{ARGS_KEY}.{key}[{n}] for {iid!r}: "
                             + (f"unknown {', '.join(unknown)}; " if unknown else "")
                             + (f"missing {', '.join(missing)}; " if missing else "") + f"it takes {wanted}")
        for p, kind in instruction.params.items():
            if not KINDS[kind][1](given[p]):
                raise ValueError(f"{ARGS_KEY}.{key}[{n}].{p}={given[p]!r} for {iid!r} must be {KINDS[kind][0]}")
        out.append((iid, given))
    return out


def follows(instruction_id: str, response: str, **kwargs: Any) -> bool:
    """Whether `response` follows one instruction (strict), with its keywords as IFEval names them."""
    [(iid, given)] = instructions_of({"instruction_id_list": [instruction_id], "kwargs": [kwargs]})
    return bool(response.strip()) and INSTRUCTIONS[iid].follows(response, given)


class IFEval:
    name = "ifeval"
    needs_main_thread = False

    def check(self, metadata: Mapping[str, Any]) -> None:
        instructions_of(metadata.get(ARGS_KEY))

    def verify(self, sample: Sample) -> Verdict:
        checks = instructions_of(sample.args)
        text = sample.response
        results = [bool(text.strip()) and INSTRUCTIONS[iid].follows(text, kwargs) for iid, kwargs in checks]
        missed = [iid for (iid, _), ok in zip(checks, results) if not ok]
        note = f"ifeval: {sum(results)}/{len(results)} followed" + (f" (not: {', '.join(missed)})" if missed else "")
        return Verdict(sum(results) / len(results), note)
