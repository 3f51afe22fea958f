"""Exact-match math answers, decided by Hugging Face's `math-verify` (extraction from free text, then a
symbolic and numeric comparison with SymPy), not by a parser of our own.

verifier_args: {"answer": the gold answer, a number or a LaTeX/plain expression ("\\frac{1}{2}", "0.5",
"x = 2", "(1, 2)")}. A response passes when math-verify finds an answer in it equal to the gold one; a
response with no answer it can extract fails. A gold answer it cannot parse leaves the sample undecided.

math-verify bounds its parse and compare with SIGALRM timeouts, which work only in a process's main thread
(elsewhere it refuses to run); verifiers/runner.py moves the work to one when it is called from another
thread (a Ray actor's call). Unbounded, one response such as "$2^{10^{100}}$" keeps SymPy busy for minutes.
"""

from __future__ import annotations

from typing import Any, Mapping

from .protocol import ARGS_KEY, Sample, Verdict

TIMEOUT_S = 5  # math-verify's own default, per parse and per comparison
_LATEX_MARKERS = ("$", "\\boxed", "\\(", "\\[")


class MathAnswer:
    name = "math"
    needs_main_thread = True  # math-verify's timeouts are signals

    def check(self, metadata: Mapping[str, Any]) -> None:
        args = metadata.get(ARGS_KEY)
        if not isinstance(args, Mapping) or "answer" not in args:
            raise ValueError(f"verifier 'math' needs {ARGS_KEY}: {{\"answer\": <the gold answer>}}, got "
                             f"{ARGS_KEY}={args!r}")
        answer = args["answer"]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
            raise ValueError(f"{ARGS_KEY}.answer={answer!r} must be a non-empty string or a number")

    def verify(self, sample: Sample) -> Verdict:
        from math_verify import parse, verify

        gold_text = str(sample.args["answer"]).strip()
        # Bare LaTeX ("\frac{1}{2}") is found only inside a math environment; plain numbers are found either way.
        wrapped = gold_text if any(m in gold_text for m in _LATEX_MARKERS) else f"${gold_text}$"
        gold = parse(wrapped, parsing_timeout=TIMEOUT_S)
        if not gold:
            return Verdict(None, f"math: the gold answer {gold_text!r} could not be parsed")
        found = parse(sample.response, parsing_timeout=TIMEOUT_S)
        if not found:
            return Verdict(0.0, f"math: no answer found (gold {gold_text})")
        ok = verify(gold, found, timeout_seconds=TIMEOUT_S)
        return Verdict(float(ok), f"math: {found[-1]} {'=' if ok else '!='} gold {gold_text}")
