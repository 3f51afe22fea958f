"""Judge actor: an LLM judge (actors/judges/llm.py) on an engine this replica hosts.

With `judge.backend=policy` the engine holds M_t and is refit with the generators; a judge that does not
follow the policy (a fixed judge model) holds its own weights and records FIXED as its version.
"""

from __future__ import annotations

from typing import Sequence

from .engine_host import EngineHost
from .engines import EngineSpec
from .judges.llm import LLMJudge
from .judges.protocol import JudgeBatch, JudgeItem, JudgeSpec, MetaBatch, MetaItem


class JudgeActor(EngineHost):
    def __init__(self, engine: EngineSpec, judge: JudgeSpec):
        super().__init__(engine)  # EngineHost keeps the engine's spec as `self.spec`: refits read it
        from transformers import AutoTokenizer

        self.llm = LLMJudge(judge, AutoTokenizer.from_pretrained(engine.model_dir), self.engine.max_seq_len,
                            self._generate)

    @property
    def can_meta_judge(self) -> bool:
        return self.llm.can_meta_judge

    def vocab_digest(self) -> str:
        return self.llm.vocab_digest()

    def judge(self, items: Sequence[JudgeItem]) -> JudgeBatch:
        return self.llm.judge(items)

    def meta_judge(self, items: Sequence[MetaItem]) -> MetaBatch:
        return self.llm.meta_judge(items)
