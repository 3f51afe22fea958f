"""What an algorithm needs besides the pools: tokenizer, chat rendering, datasets, sinks, toy oracle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from .chat import ChatRenderer, EncodedSample
from .data import Conversation, JsonlDataset
from .metrics import MetricsLogger


class Evaluator(Protocol):
    """Ground-truth checks only a synthetic world can offer (the toy world implements it)."""

    def task_accuracy(self, generate: Callable[[list], list]) -> float: ...

    def judge_accuracy(self, generate: Callable[[list], list]) -> float: ...

    def judge_truth(self, metadata: dict, response_text: str) -> float | None: ...


@dataclass
class RunContext:
    tokenizer: object
    renderer: ChatRenderer
    train: JsonlDataset
    val: JsonlDataset | None
    metrics: MetricsLogger
    max_prompt_length: int | None
    on_long_prompt: str
    normalise_prompt: bool = False
    evaluator: Evaluator | None = None
    log: Callable[[str], None] = print
    long_prompts: set = field(default_factory=set)  # (file, line) of prompts dropped as too long

    def encode(self, conv: Conversation) -> EncodedSample | None:
        """Tokens of the prompt (and answer); None, counted once per line, when the prompt is too long."""
        encoded = self.renderer.encode_conversation(conv, max_prompt_length=self.max_prompt_length,
                                                    on_long_prompt=self.on_long_prompt)
        if encoded is None:
            key = (conv.source, conv.line)
            if key not in self.long_prompts:
                self.long_prompts.add(key)
                self.log(f"[data] {conv.source}:{conv.line}: prompt longer than data.max_prompt_length="
                         f"{self.max_prompt_length} tokens, dropped ({len(self.long_prompts)} so far)")
        return encoded

    def user_text(self, prompt_messages) -> str:
        return ChatRenderer.user_text(prompt_messages, self.normalise_prompt)

    @staticmethod
    def last_user_text(prompt_messages) -> str:
        return next(m.content for m in reversed(prompt_messages) if m.role == "user")
