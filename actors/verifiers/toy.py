"""The toy task's exact answer (orchestration/toy/task.py): a response passes when it is the sum itself.

The toy rows carry the sum as metadata `answer`; verifier_args {"answer": n} overrides it. The rule is the
task's own `is_correct` (the stripped response equals the number), restated here because actors/ does not
import orchestration/.
"""

from __future__ import annotations

from typing import Any, Mapping

from .protocol import ARGS_KEY, Sample, Verdict


def _answer(metadata: Mapping[str, Any]) -> Any:
    args = metadata.get(ARGS_KEY)
    if isinstance(args, Mapping) and "answer" in args:
        return args["answer"]
    return metadata.get("answer")


class ToyAnswer:
    name = "toy"
    needs_main_thread = False

    def check(self, metadata: Mapping[str, Any]) -> None:
        answer = _answer(metadata)
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise ValueError(f"verifier 'toy' needs the integer sum as metadata 'answer' (the toy rows carry it) or "
                             f"{ARGS_KEY}.answer, got {answer!r}")

    def verify(self, sample: Sample) -> Verdict:
        answer = _answer(sample.metadata)
        ok = sample.response.strip() == str(answer)
        return Verdict(float(ok), f"toy: {sample.response.strip()[:40]!r} {'==' if ok else '!='} {answer}")
