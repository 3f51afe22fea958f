"""Rendering conversations to token ids with a Jinja chat template.

By default the model's own template (``tokenizer.chat_template``) is used. Two presets reproduce the prompt
formats of the reference implementation (NeMo-Aligner) byte for byte, so its users' data renders identically:

- ``nemo``: ``<extra_id_0>System\\n{system}\\n`` (always emitted), then ``<extra_id_1>User\\n{content}\\n`` /
  ``<extra_id_1>Assistant\\n{content}\\n`` per turn, with ``<extra_id_2>{label}\\n`` after the name line of a
  labelled turn; generation prompt ``<extra_id_1>Assistant\\n``.
- ``llama3``: ``<|begin_of_text|>`` then ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``
  per message; generation prompt ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence, Union

from orchestration.data import Conversation, Message

OnLongPrompt = Literal["drop", "truncate_left"]
MessageLike = Union[Message, Mapping[str, str]]

NEMO_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- '<extra_id_0>System\\n' + system + '\\n' -}}"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'user' -%}{{- '<extra_id_1>User\\n' -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- '<extra_id_1>Assistant\\n' -}}"
    "{%- else -%}{{- raise_exception('nemo template: unexpected role ' + m['role']) -}}{%- endif -%}"
    "{%- if m['label'] is defined and m['label'] is not none -%}"
    "{{- '<extra_id_2>' + m['label'] + '\\n' -}}"
    "{%- endif -%}"
    "{{- m['content'] + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<extra_id_1>Assistant\\n' -}}{%- endif -%}"
)

LLAMA3_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for m in messages -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

PRESETS: dict[str, str] = {"nemo": NEMO_TEMPLATE, "llama3": LLAMA3_TEMPLATE}


@dataclass(frozen=True)
class EncodedSample:
    prompt_ids: list[int]  # rendered prompt including the generation prompt
    answer_ids: list[int] | None  # ground-truth answer turn incl. its end-of-turn marker; None if prompt-only
    prompt_messages: tuple[Message, ...]  # after left-truncation, if any
    conversation: Conversation


def _as_message(m: MessageLike) -> Message:
    if isinstance(m, Message):
        return m
    return Message(m["role"], m["content"], m.get("label"))


def _resolve_template(tokenizer, template: str | None) -> str:
    if template is None:
        own = getattr(tokenizer, "chat_template", None)
        if not own:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ValueError(
                f"tokenizer {name!r} has no chat_template; set the chat template to a preset "
                f"({', '.join(sorted(PRESETS))}) or to a Jinja template string"
            )
        if not isinstance(own, str):  # a dict of named templates: the model's default one is "default"
            if "default" not in own:
                raise ValueError(f"tokenizer has several chat templates {sorted(own)} and none named 'default'")
            own = own["default"]
        return own
    if template in PRESETS:
        return PRESETS[template]
    if "{{" in template or "{%" in template:
        return template
    # A bare word that is not a preset is almost certainly a typo, not a template that renders constant text.
    raise ValueError(
        f"unknown chat template preset {template!r}; presets: {sorted(PRESETS)}, or pass a Jinja string"
    )


class ChatRenderer:
    """Turns messages into prompt and answer token ids with one fixed chat template."""

    def __init__(self, tokenizer, template: str | None = None):
        self.tokenizer = tokenizer
        self.template = _resolve_template(tokenizer, template)
        self._start_ids = self._tokenizer_start_ids()

    # -- text ----------------------------------------------------------------------------------------------

    def render(self, messages: Sequence[MessageLike], *, add_generation_prompt: bool) -> str:
        dicts = [_as_message(m).as_dict() for m in messages]
        return self.tokenizer.apply_chat_template(
            dicts, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def prompt_text(self, messages: Sequence[MessageLike]) -> str:
        return self.render(messages, add_generation_prompt=True)

    # -- tokens --------------------------------------------------------------------------------------------

    def _tokenizer_start_ids(self) -> list[int]:
        """Ids the tokenizer puts before text with add_special_tokens=True (typically [BOS], maybe [])."""
        probe = "a"
        with_special = self.tokenizer.encode(probe, add_special_tokens=True)
        plain = self.tokenizer.encode(probe, add_special_tokens=False)
        for start in range(len(with_special) - len(plain) + 1):
            if with_special[start : start + len(plain)] == plain:
                return list(with_special[:start])
        return []

    def encode_text(self, rendered: str) -> list[int]:
        """Tokens of a rendered conversation with exactly one BOS.

        Templates that write the BOS text themselves (llama3) get no extra one; otherwise the tokenizer's own
        leading special tokens are prepended. Trailing ones (an EOS some tokenizers append) are never added:
        a prompt must end with the generation prompt.
        """
        ids = self.tokenizer.encode(rendered, add_special_tokens=False)
        bos = getattr(self.tokenizer, "bos_token", None)
        if bos and rendered.startswith(bos):
            return ids
        return self._start_ids + ids

    def prompt_ids(self, messages: Sequence[MessageLike]) -> list[int]:
        return self.encode_text(self.prompt_text(messages))

    def answer_ids(self, prompt_messages: Sequence[MessageLike], answer: str) -> list[int]:
        """Tokens of the answer turn, including its end-of-turn marker as the template renders it.

        Equal to tokens(full conversation) minus tokens(prompt) when the prompt tokens are a prefix of the
        full tokens, so prompt_ids + answer_ids is exactly what the model sees in training. Where the tokenizer
        merges across the boundary (e.g. "\\n\\n" + text), the text after the prompt is tokenised on its own,
        which is what generation after prompt_ids produces.
        """
        prompt_text = self.prompt_text(prompt_messages)
        full_text = self.render([*prompt_messages, Message("assistant", answer)], add_generation_prompt=False)
        prompt_ids, full_ids = self.encode_text(prompt_text), self.encode_text(full_text)
        if full_ids[: len(prompt_ids)] == prompt_ids:
            return full_ids[len(prompt_ids) :]
        if not full_text.startswith(prompt_text):
            raise ValueError(
                "chat template renders the prompt differently when an answer follows it, so the answer's tokens "
                f"cannot be separated; prompt ends {prompt_text[-60:]!r}, full text at that point "
                f"{full_text[len(prompt_text) - 60 : len(prompt_text)]!r}"
            )
        return self.tokenizer.encode(full_text[len(prompt_text) :], add_special_tokens=False)

    # -- conversations -------------------------------------------------------------------------------------

    def encode_conversation(
        self,
        conv: Conversation,
        *,
        max_prompt_length: int | None,
        on_long_prompt: OnLongPrompt = "drop",
    ) -> EncodedSample | None:
        """Prompt and answer ids of a conversation; None when the prompt is too long (the caller counts it).

        ``truncate_left`` drops the oldest turns (never the leading system message) so the prompt starts at a
        user turn, keeping at least the last user turn onward; None if even that does not fit.
        """
        if on_long_prompt not in ("drop", "truncate_left"):
            raise ValueError(f"on_long_prompt must be 'drop' or 'truncate_left', got {on_long_prompt!r}")
        messages = tuple(conv.prompt_messages)
        ids = self.prompt_ids(messages)
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            if on_long_prompt == "drop":
                return None
            fitted = self._truncate_left(messages, max_prompt_length)
            if fitted is None:
                return None
            messages, ids = fitted
        answer = None if conv.answer is None else self.answer_ids(messages, conv.answer)
        return EncodedSample(prompt_ids=ids, answer_ids=answer, prompt_messages=messages, conversation=conv)

    def _truncate_left(
        self, messages: tuple[Message, ...], max_len: int
    ) -> tuple[tuple[Message, ...], list[int]] | None:
        head = messages[:1] if messages[0].role == "system" else ()
        body = messages[len(head) :]
        # Starting at a user turn keeps user/assistant alternation, which many templates insist on.
        starts = [i for i, m in enumerate(body) if m.role == "user" and i > 0]
        for start in starts:
            candidate = head + body[start:]
            ids = self.prompt_ids(candidate)
            if len(ids) <= max_len:
                return candidate, ids
        return None

    # -- judge input ---------------------------------------------------------------------------------------

    @staticmethod
    def user_text(prompt_messages: Sequence[MessageLike], normalise: bool = False) -> str:
        """The prompt as the judge sees it: system message stripped.

        A single user turn is returned as its content, unless ``normalise``; several turns (or ``normalise``)
        become plain ``User: ...`` / ``Assistant: ...`` paragraphs joined by a blank line.
        """
        turns = [_as_message(m) for m in prompt_messages]
        turns = [m for m in turns if m.role != "system"]
        if len(turns) == 1 and turns[0].role == "user" and not normalise:
            return turns[0].content
        names = {"user": "User", "assistant": "Assistant"}
        return "\n\n".join(f"{names[m.role]}: {m.content}" for m in turns)
