"""Judge backends behind one contract (protocol.py), found by `judge.backend` in this registry.

An entry names the Ray actor class that serves the backend (imported only when a run uses it), whether
the pool follows the policy (refit with the generators, held to "every judgement came from M_t"), whether it
hosts a local engine (and so takes an EngineSpec), and whether it can meta-judge (Meta-Rewarding). A new
backend is one module plus one entry here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class JudgeBackendEntry:
    actor: str  # "module:Class" of the Ray actor serving it
    follows_policy: bool
    local_engine: bool
    can_meta_judge: bool

    def actor_class(self) -> type:
        module, name = self.actor.split(":")
        return getattr(importlib.import_module(module), name)


JUDGE_BACKENDS: dict[str, JudgeBackendEntry] = {
    # M_t judges its own responses (Self-Rewarding): the judge pool is refit with the generators.
    "policy": JudgeBackendEntry("actors.judge:JudgeActor", follows_policy=True, local_engine=True,
                                can_meta_judge=True),
    # A fixed judge checkpoint (judge.model.path) in its own pool: never refit, FIXED in its judgements.
    "model": JudgeBackendEntry("actors.judge:JudgeActor", follows_policy=False, local_engine=True,
                               can_meta_judge=True),
    # A fixed judge served by Triton (actors/serve_judge.py), reached with tritonclient (judge.triton.*). It
    # serves generation, so it meta-judges with the same model.
    "triton": JudgeBackendEntry("actors.judges.triton:TritonJudgeActor", follows_policy=False,
                                local_engine=False, can_meta_judge=True),
    # Rule-based rewards (actors/verifiers), no model: each sample is scored by the verifier its metadata names.
    "verifier": JudgeBackendEntry("actors.judges.verifier:VerifierJudgeActor", follows_policy=False,
                                  local_engine=False, can_meta_judge=False),
}


def judge_backend(name: str) -> JudgeBackendEntry:
    try:
        return JUDGE_BACKENDS[name]
    except KeyError:
        raise ValueError(f"judge.backend={name!r} is not one of: {', '.join(JUDGE_BACKENDS)}") from None
