"""Rule-based rewards (verifiers), found by name in this registry.

A sample names its verifier in its metadata (SPEC section 2 carries every extra top-level key through):
`"verifier": "math" | "ifeval" | "toy"`, with what it checks against in `"verifier_args"`. A sample whose
`verifier_args` has the reference's IFEval shape (an `instruction_id_list`) and no `verifier` key is an
`ifeval` sample, so the reference's data works unchanged; `"verifier": null` says "no verifier". A sample
that names none is scored by the LLM judge. A new verifier is one module (protocol.py) plus one entry here.
"""

from __future__ import annotations

from typing import Any, Mapping

from .ifeval import IFEval
from .math_answers import MathAnswer
from .protocol import ARGS_KEY, VERIFIER_KEY, Sample, Verdict, Verifier, to_score
from .toy import ToyAnswer

VERIFIERS: dict[str, Verifier] = {v.name: v for v in (MathAnswer(), IFEval(), ToyAnswer())}
# What a verifier judge records for a sample it has no verifier for: the source its (missing) scores are
# counted under. Not a verifier name.
NO_VERIFIER = "none"

__all__ = ["ARGS_KEY", "NO_VERIFIER", "VERIFIERS", "VERIFIER_KEY", "Sample", "Verdict", "Verifier", "check_metadata",
           "named", "to_score", "verifier"]


def verifier(name: str) -> Verifier:
    try:
        return VERIFIERS[name]
    except KeyError:
        raise ValueError(f"verifier {name!r} is not one of: {', '.join(VERIFIERS)}") from None


def named(metadata: Mapping[str, Any]) -> str | None:
    """The verifier a sample's metadata names, or None (the LLM judge scores it)."""
    if VERIFIER_KEY in metadata:
        return metadata[VERIFIER_KEY]
    args = metadata.get(ARGS_KEY)
    return "ifeval" if isinstance(args, Mapping) and "instruction_id_list" in args else None


def check_metadata(metadata: Mapping[str, Any]) -> None:
    """ValueError naming the key and value when the verifier a sample names does not exist or cannot run on
    its metadata; nothing for a sample that names none."""
    name = named(metadata)
    if name is None:
        return
    if not isinstance(name, str) or name not in VERIFIERS:
        raise ValueError(f"metadata {VERIFIER_KEY}={name!r} is not one of: {', '.join(VERIFIERS)} (or null for none)")
    VERIFIERS[name].check(metadata)
