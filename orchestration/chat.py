"""Rendering conversations to token ids with a Jinja chat template.

By default the model's own template (``tokenizer.chat_template``) is used. Two presets reproduce the prompt
formats of the reference implementation (NeMo-Aligner, through NeMo's ``_get_header_conversation_type_mask_role``
and ``_add_speaker_and_signal``) character for character, so its users' data renders identically:

- ``nemo`` (chat_prompt_tokens ``<extra_id_0>``/``<extra_id_1>``/``<extra_id_2>``, end_of_turn and end_of_name
  ``\n``): ``<extra_id_0>System\n{system}\n`` (always emitted), then ``<extra_id_1>User\n{content}\n`` /
  ``<extra_id_1>Assistant\n{content}\n`` per turn, with ``<extra_id_2>{label}\n`` after the name line of a
  labelled turn. A conversation that ends with an assistant turn ends with ``<extra_id_1>``: the reference
  appends the next turn's start after an unmasked last turn and trains on it, so it is the end-of-turn marker.
  Generation prompt ``<extra_id_1>Assistant\n``.
- ``llama3`` (system_turn_start ``<|begin_of_text|>``, turn_start empty, end_of_turn ``<|eot_id|>``,
  end_of_name ``\n\n``, system_token ``<|start_header_id|>system<|end_header_id|>``): ``<|begin_of_text|>``,
  then the system block (always emitted, empty or not), then
  ``<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>`` per turn, a label as
  ``<extra_id_2>{label}\n\n`` before the content; generation prompt
  ``<|start_header_id|>assistant<|end_header_id|>\n\n``.

Both presets render ``generation_label`` (the label of the answer turn being generated) after the generation
prompt: the reference's prompt (its context_ids) runs through the answer turn's label.
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
    "{%- if add_generation_prompt -%}{{- '<extra_id_1>Assistant\\n' -}}"
    "{%- if generation_label is defined and generation_label is not none -%}"
    "{{- '<extra_id_2>' + generation_label + '\\n' -}}"
    "{%- endif -%}"
    "{%- elif turns and turns[-1]['role'] == 'assistant' -%}{{- '<extra_id_1>' -}}"
    "{%- endif -%}"
)

LLAMA3_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' -}}"
    "{%- for m in turns -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if m['label'] is defined and m['label'] is not none -%}"
    "{{- '<extra_id_2>' + m['label'] + '\\n\\n' -}}"
    "{%- endif -%}"
    "{{- m['content'] + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- if generation_label is defined and generation_label is not none -%}"
    "{{- '<extra_id_2>' + generation_label + '\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

PRESETS: dict[str, str] = {"nemo": NEMO_TEMPLATE, "llama3": LLAMA3_TEMPLATE}
# Each preset's end-of-turn marker, a stop string of generation (the reference's sampling end_strings).
PRESET_STOP_STRINGS: dict[str, tuple[str, ...]] = {"nemo": ("<extra_id_1>",), "llama3": ("<|eot_id|>",)}


@dataclass(frozen=True)
class EncodedSample:
    prompt_ids: list[int]  # rendered prompt including the generation prompt
    # ground-truth answer turn through its end-of-turn marker (where generation stops); None if prompt-only
    answer_ids: list[int] | None
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
        # A model's own template gets none: the engine already stops on the checkpoint's EOS/end-of-turn ids.
        self.stop_strings: tuple[str, ...] = PRESET_STOP_STRINGS.get(template, ()) if template else ()
        self._end_markers = self._turn_end_markers()

    def _turn_end_markers(self) -> tuple[str, ...]:
        """Texts that can end an assistant turn: the stop strings and the tokenizer's special tokens."""
        specials = set(getattr(self.tokenizer, "all_special_tokens", None) or ())
        added = getattr(self.tokenizer, "added_tokens_decoder", None) or {}
        specials |= {t.content for t in added.values() if getattr(t, "special", False)}
        return tuple(m for m in (*self.stop_strings, *sorted(specials)) if m)

    # -- text ----------------------------------------------------------------------------------------------

    def render(
        self, messages: Sequence[MessageLike], *, add_generation_prompt: bool, generation_label: str | None = None
    ) -> str:
        """``generation_label``: the label of the turn to be generated, rendered by the presets after the
        generation prompt (other templates ignore it)."""
        dicts = [_as_message(m).as_dict() for m in messages]
        extra = {} if generation_label is None else {"generation_label": generation_label}
        return self.tokenizer.apply_chat_template(
            dicts, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
        )

    def prompt_text(self, messages: Sequence[MessageLike], label: str | None = None) -> str:
        return self.render(messages, add_generation_prompt=True, generation_label=label)

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

    def prompt_ids(self, messages: Sequence[MessageLike], label: str | None = None) -> list[int]:
        return self.encode_text(self.prompt_text(messages, label))

    def answer_ids(self, prompt_messages: Sequence[MessageLike], answer: str | MessageLike) -> list[int]:
        """Tokens of the answer turn through its end-of-turn marker, as the template renders it.

        ``answer`` is the answer text, or the answer message (its label then goes into the prompt, as
        ``prompt_ids(prompt_messages, label)``). The turn ends at the first end marker (a stop string or a
        special token) after the content: that is where generation stops, so a ChatML answer ends with
        ``<|im_end|>``, not with the newline the template writes between turns.

        Equal to tokens(full conversation) minus tokens(prompt) when the prompt tokens are a prefix of the
        full tokens, so prompt_ids + answer_ids is exactly what the model sees in training. Where the tokenizer
        merges across the boundary (e.g. "\\n\\n" + text), the text after the prompt is tokenised on its own,
        which is what generation after prompt_ids produces.
        """
        turn = Message("assistant", answer) if isinstance(answer, str) else _as_message(answer)
        prompt_text = self.prompt_text(prompt_messages, turn.label)
        full_text = self.render([*prompt_messages, Message("assistant", turn.content, turn.label)],
                                add_generation_prompt=False)
        if full_text.startswith(prompt_text):
            full_text = prompt_text + self._through_end_of_turn(full_text[len(prompt_text) :], turn.content)
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

    def _through_end_of_turn(self, answer_text: str, content: str) -> str:
        """``answer_text`` cut after the first end marker that follows the content; unchanged if none does
        (or the content cannot be found, e.g. a template that rewrites it)."""
        start = answer_text.find(content)
        if start < 0 and content.strip():
            content = content.strip()  # templates that trim the content (e.g. Llama 3's own)
            start = answer_text.find(content)
        if start < 0:
            return answer_text
        after = start + len(content)
        hits = [(i, -len(m)) for m in self._end_markers if (i := answer_text.find(m, after)) >= 0]
        if not hits:
            return answer_text
        at, neg_len = min(hits)  # earliest marker; the longest one where several start there
        return answer_text[: at - neg_len]

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
        answer_turn = conv.messages[-1] if conv.has_answer else None
        label = answer_turn.label if answer_turn is not None else None
        ids = self.prompt_ids(messages, label)
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            if on_long_prompt == "drop":
                return None
            fitted = self._truncate_left(messages, max_prompt_length, label)
            if fitted is None:
                return None
            messages, ids = fitted
        answer = None if answer_turn is None else self.answer_ids(messages, answer_turn)
        return EncodedSample(prompt_ids=ids, answer_ids=answer, prompt_messages=messages, conversation=conv)

    def _truncate_left(
        self, messages: tuple[Message, ...], max_len: int, label: str | None = None
    ) -> tuple[tuple[Message, ...], list[int]] | None:
        head = messages[:1] if messages[0].role == "system" else ()
        body = messages[len(head) :]
        # Starting at a user turn keeps user/assistant alternation, which many templates insist on.
        starts = [i for i, m in enumerate(body) if m.role == "user" and i > 0]
        for start in starts:
            candidate = head + body[start:]
            ids = self.prompt_ids(candidate, label)
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
