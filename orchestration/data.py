"""The data layer: JSONL conversations, validated once and read lazily.

Two line shapes are accepted (SPEC section 2):

1. NeMo-Aligner chat-SFT: ``{"system": str, "conversations": [{"from": role, "value": text, "label": opt}],
   "mask": role, "type": opt, "system_token": opt}``. Those keys are consumed; every other top-level key is
   metadata. As in the reference (NeMo's ``_get_header_conversation_type_mask_role``/``_add_speaker_and_signal``),
   a turn's ``label`` is rendered only when ``type`` is ``VALUE_TO_TEXT``; without a type it is ignored.
   ``TEXT_TO_VALUE`` (training the model to write the label) is refused. ``system_token`` names the system
   role (the reference's llama3-format lines write ``<|start_header_id|>system<|end_header_id|>``).
2. Common chat: ``{"messages": [{"role": ..., "content": ...}], ...}``. ``messages`` is consumed; every other
   top-level key is metadata.

Both are normalised to a tuple of :class:`Message` with roles ``system``/``user``/``assistant``. Role names
are matched case-insensitively with the aliases in ``_ROLE_ALIASES``, bare or written as a llama3 header
(``<|start_header_id|>user<|end_header_id|>``, the reference's llama3 format); a system message may only
come first.

Text must be valid Unicode (a lone UTF-16 surrogate escape such as ``"\\ud800"`` is a bad line: it cannot be
tokenised or written back as UTF-8) and metadata may nest at most ``MAX_METADATA_DEPTH`` levels (deeper values
break pickling to Ray actors). A line whose metadata names a verifier (``"verifier"``, ``"verifier_args"``:
actors/verifiers) must name a known one with the arguments it needs.

Prompt/answer split: the answer is the FINAL message when that message is an assistant turn, and the prompt
is every message before it. When the final message is not an assistant turn the sample is prompt-only
(``answer is None``) and the prompt is the whole conversation. Every conversation must contain a user turn.
"""

from __future__ import annotations

import json
import os
import re
import sys
from array import array
from dataclasses import dataclass
from typing import IO, Any, Iterator, Literal, Sequence

import numpy as np

from actors import verifiers

OnBadLine = Literal["error", "skip"]

_ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "system": "system",
}
_UTF8_BOM = b"\xef\xbb\xbf"
# The reference's llama3 format writes roles as header tokens: "<|start_header_id|>user<|end_header_id|>".
_HEADER_ROLE = re.compile(r"<\|start_header_id\|>(.*)<\|end_header_id\|>", re.DOTALL)
# The chat-SFT "type" values of the reference (NeMo's TYPE_INSTRUCTION keys).
_LABEL_TYPES = ("VALUE_TO_TEXT", "TEXT_TO_VALUE")
# JSON text can only produce a surrogate code point through a \uD800-\uDFFF escape (raw bytes were decoded
# as strict UTF-8), so lines without one skip the full search for lone surrogates.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Far above real metadata, far below what pickle/deepcopy/json.dumps survive (about 500 on CPython 3.11).
MAX_METADATA_DEPTH = 100


class DataError(ValueError):
    """A bad input line (or file), formatted ``"{path}:{line}: {reason}"`` with a 1-based line number."""

    def __init__(self, path: str, line: int | None, reason: str):
        self.path = path
        self.line = line
        self.reason = reason
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str
    label: str | None = None  # per-turn label (SteerLM attributes; chat-SFT VALUE_TO_TEXT), rendered by the presets

    def as_dict(self) -> dict[str, str]:
        """The dict a Jinja chat template expects; ``label`` only when set."""
        d = {"role": self.role, "content": self.content}
        if self.label is not None:
            d["label"] = self.label
        return d


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    metadata: dict[str, Any]  # every top-level key the shape does not consume, values untouched
    source: str  # file path
    line: int  # 1-based line number in `source`

    @property
    def has_answer(self) -> bool:
        return self.messages[-1].role == "assistant"

    @property
    def prompt_messages(self) -> tuple[Message, ...]:
        return self.messages[:-1] if self.has_answer else self.messages

    @property
    def answer(self) -> str | None:
        return self.messages[-1].content if self.has_answer else None


class _BadLine(Exception):
    """Internal: a reason without a location; parse_line adds path and line."""


# ---------------------------------------------------------------------------------------------------------
# Parsing one line


def parse_line(text: str, *, path: str, line: int) -> Conversation:
    """Parse and validate one JSONL line; raises DataError naming ``path:line`` and the reason."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, line, f"not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(path, line, "JSON nests too deeply to parse") from None
    except ValueError as e:  # Python's int string-conversion limit (JSONDecodeError is caught above)
        if "integer string conversion" in str(e):
            reason = f"an integer has more than {sys.get_int_max_str_digits()} digits (Python's conversion limit)"
        else:
            reason = f"not valid JSON ({e})"
        raise DataError(path, line, reason) from None
    try:
        messages, metadata = _normalise(obj)
        if _SURROGATE_ESCAPE.search(text):
            _check_no_lone_surrogate(obj)
        _check_metadata_depth(metadata)
        _check_verifier(metadata)
    except _BadLine as e:
        raise DataError(path, line, str(e)) from None
    return Conversation(messages=messages, metadata=metadata, source=path, line=line)


def _check_verifier(metadata: dict[str, Any]) -> None:
    """A line that names a verifier (actors/verifiers) must name one that exists and give it what it checks
    against: found when the file is opened, not when the sample is first scored."""
    try:
        verifiers.check_metadata(metadata)
    except ValueError as e:
        raise _BadLine(str(e)) from None


def _normalise(obj: Any) -> tuple[tuple[Message, ...], dict[str, Any]]:
    if not isinstance(obj, dict):
        raise _BadLine(f"not a JSON object (got {_type_name(obj)})")
    has_conv, has_msgs = "conversations" in obj, "messages" in obj
    if has_conv and has_msgs:
        raise _BadLine("has both 'conversations' and 'messages'; use one shape per line")
    if has_conv:
        messages = _from_nemo_shape(obj)
        consumed = {"conversations", "system", "mask", "type", "system_token"}
    elif has_msgs:
        messages = _from_chat_shape(obj)
        consumed = {"messages"}
    else:
        raise _BadLine("no conversation: expected a 'conversations' (NeMo chat-SFT) or 'messages' (chat) key")
    _check_conversation(messages)
    metadata = {k: v for k, v in obj.items() if k not in consumed}
    return tuple(messages), metadata


def _from_nemo_shape(obj: dict) -> list[Message]:
    system = obj.get("system", "")
    if not isinstance(system, str):
        raise _BadLine(f"'system' must be a string, got {_type_name(system)}")
    mask = obj.get("mask")
    if mask is not None and not isinstance(mask, str):
        raise _BadLine(f"'mask' must be a role name string, got {_type_name(mask)}")
    system_token = obj.get("system_token")
    if system_token is not None and _role(system_token, "system_token") != "system":
        raise _BadLine(f"'system_token' must name the system role, got {system_token!r}")
    label_type = obj.get("type")
    if label_type is not None:
        if not isinstance(label_type, str):
            raise _BadLine(f"'type' must be a string or null, got {_type_name(label_type)}")
        if label_type not in _LABEL_TYPES:
            raise _BadLine(f"unknown 'type' {label_type!r} (expected one of {list(_LABEL_TYPES)} or null)")
        if label_type == "TEXT_TO_VALUE":
            raise _BadLine(
                "'type' TEXT_TO_VALUE is not supported: it trains the model to write each turn's label, while "
                "these algorithms train on the answer (use VALUE_TO_TEXT or no type)"
            )
    turns = _require_list(obj["conversations"], "conversations")
    # An empty system is left out here; the nemo and llama3 presets still render its (empty) block, as the
    # reference always does, while a model's own template keeps its no-system behaviour.
    messages = [Message("system", system)] if system else []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        _require_dict(turn, where)
        role = _role(_require_key(turn, "from", where), f"{where}.from")
        content = _require_str(_require_key(turn, "value", where), f"{where}.value")
        label = turn.get("label")
        if label is not None and not isinstance(label, str):
            raise _BadLine(f"{where}.label must be a string or null, got {_type_name(label)}")
        # The reference renders labels only for VALUE_TO_TEXT; without a type it ignores them.
        messages.append(Message(role, content, label if label_type == "VALUE_TO_TEXT" else None))
    return messages


def _from_chat_shape(obj: dict) -> list[Message]:
    # Per-message keys other than role/content (e.g. "name") are not part of the contract and are not kept.
    messages = []
    for i, msg in enumerate(_require_list(obj["messages"], "messages")):
        where = f"messages[{i}]"
        _require_dict(msg, where)
        role = _role(_require_key(msg, "role", where), f"{where}.role")
        content = _require_str(_require_key(msg, "content", where), f"{where}.content")
        messages.append(Message(role, content))
    return messages


def _check_conversation(messages: list[Message]) -> None:
    if not messages or all(m.role == "system" for m in messages):
        raise _BadLine("empty conversation: no user or assistant turns")
    for i, m in enumerate(messages[1:], start=1):
        # Chat templates only place a system message at the start; a later one would be silently mis-rendered.
        if m.role == "system":
            raise _BadLine(f"system message at position {i}; only the first message may be a system message")
    if not any(m.role == "user" for m in messages):
        raise _BadLine("no user turn")


def _role(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _BadLine(f"{where} must be a string, got {_type_name(value)}")
    name = value.strip()
    header = _HEADER_ROLE.fullmatch(name)
    if header:
        name = header.group(1).strip()
    role = _ROLE_ALIASES.get(name.lower())
    if role is None:
        raise _BadLine(
            f"unknown role {value!r} in {where} (expected one of {sorted(_ROLE_ALIASES)}, bare or as "
            "'<|start_header_id|>role<|end_header_id|>')"
        )
    return role


def _check_no_lone_surrogate(obj: Any) -> None:
    """Raise _BadLine naming the first string (key or value, in document order) holding a lone surrogate."""
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:  # iterative: the nesting depth is not bounded yet
        value, where = stack.pop()
        if isinstance(value, str):
            found = _SURROGATE.search(value)
            if found:
                raise _BadLine(
                    f"{where or 'the line'} holds a lone UTF-16 surrogate (U+{ord(found.group()):04X} at character "
                    f"{found.start()}), which is not valid Unicode text"
                )
        elif isinstance(value, dict):
            children = []
            for key, child in value.items():
                path = f"{where}.{key}" if where else key
                children.append((key, f"key {path!r}"))
                children.append((child, path))
            stack.extend(reversed(children))
        elif isinstance(value, list):
            stack.extend(reversed([(child, f"{where}[{i}]") for i, child in enumerate(value)]))


def _check_metadata_depth(metadata: dict[str, Any]) -> None:
    for key, top in metadata.items():
        stack = [(top, 1)]
        while stack:
            value, depth = stack.pop()
            children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
            if children is None:
                continue
            if depth > MAX_METADATA_DEPTH:
                raise _BadLine(f"metadata key {key!r} nests deeper than {MAX_METADATA_DEPTH} levels")
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _require_list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise _BadLine(f"'{where}' must be a list, got {_type_name(value)}")
    return value


def _require_dict(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise _BadLine(f"{where} must be an object, got {_type_name(value)}")


def _require_key(d: dict, key: str, where: str) -> Any:
    if key not in d:
        raise _BadLine(f"{where} has no '{key}' key")
    return d[key]


def _require_str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _BadLine(f"{where} must be a string, got {_type_name(value)}")
    return value


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


# ---------------------------------------------------------------------------------------------------------
# The lazy dataset


def _decode(raw: bytes, line: int) -> str:
    """Bytes of one line -> text without its line ending; raises _BadLine on invalid UTF-8."""
    if line == 1 and raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM) :]
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise _BadLine(f"not valid UTF-8 (byte {e.start})") from None


class JsonlDataset:
    """A JSONL file of conversations, indexed by byte offset and parsed on access.

    Construction streams the file once, parsing every non-blank line to validate it (the parsed objects are
    discarded), and keeps only two int64 arrays: the byte offset and the line number of each good line.
    Blank lines are ignored. A bad line raises DataError (``on_bad_line="error"``) or is recorded in
    ``bad_lines`` and left out of the index (``"skip"``). ``require_answer=True`` makes a prompt-only line bad.

    ``select`` returns a view sharing the base arrays plus an index array. Instances pickle without their open
    file handle (they are shipped to Ray actors) and reopen the file on first access.
    """

    def __init__(self, path: str | os.PathLike, *, on_bad_line: OnBadLine = "error", require_answer: bool = False):
        if on_bad_line not in ("error", "skip"):
            raise ValueError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
        self.path = os.fspath(path)
        self.on_bad_line = on_bad_line
        self.require_answer = require_answer
        self.bad_lines: list[tuple[int, str]] = []
        self._offsets, self._line_numbers = self._build_index()
        self._rows: np.ndarray | None = None  # None = all indexed lines; else positions into the base arrays
        self._fh: IO[bytes] | None = None

    # -- indexing ------------------------------------------------------------------------------------------

    def _build_index(self) -> tuple[np.ndarray, np.ndarray]:
        offsets, line_numbers = array("q"), array("q")  # compact while growing; no per-line Python objects kept
        try:
            fh = open(self.path, "rb")
        except OSError as e:
            raise DataError(self.path, None, f"cannot open data file ({e.strerror})") from None
        with fh:
            offset = 0
            for line_no, raw in enumerate(fh, start=1):
                if self._validate(raw, line_no):
                    offsets.append(offset)
                    line_numbers.append(line_no)
                offset += len(raw)
        # frombuffer wraps the arrays' memory without a second copy.
        return np.frombuffer(offsets, dtype=np.int64), np.frombuffer(line_numbers, dtype=np.int64)

    def _validate(self, raw: bytes, line_no: int) -> bool:
        """True if the line is a good conversation; False if blank or skipped; raises in error mode."""
        reason = self._problem(raw, line_no)
        if reason is None:
            return True
        if reason == "":
            return False  # blank line: not data, not an error
        if self.on_bad_line == "error":
            raise DataError(self.path, line_no, reason)
        self.bad_lines.append((line_no, reason))
        return False

    def _problem(self, raw: bytes, line_no: int) -> str | None:
        """None for a good line, "" for a blank one, else the reason it is bad."""
        try:
            text = _decode(raw, line_no)
            if not text.strip():
                return ""
            conv = parse_line(text, path=self.path, line=line_no)
        except DataError as e:
            return e.reason
        except _BadLine as e:
            return str(e)
        if self.require_answer and not conv.has_answer:
            return (
                "no assistant answer (required by this run: SPIN, first_iteration_sft and validation need the "
                "last message to be the ground-truth assistant turn)"
            )
        return None

    @property
    def num_bad_lines(self) -> int:
        return len(self.bad_lines)

    # -- access --------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._offsets) if self._rows is None else len(self._rows)

    def _base_row(self, i: int) -> int:
        n = len(self)
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"dataset index must be an integer, got {type(i).__name__}")
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for dataset of {n} conversations ({self.path})")
        i = int(i) % n
        return i if self._rows is None else int(self._rows[i])

    def __getitem__(self, i: int) -> Conversation:
        row = self._base_row(i)
        line_no = int(self._line_numbers[row])
        fh = self._handle()
        fh.seek(int(self._offsets[row]))
        try:
            text = _decode(fh.readline(), line_no)
        except _BadLine as e:  # only if the file changed after indexing
            raise DataError(self.path, line_no, str(e)) from None
        return parse_line(text, path=self.path, line=line_no)

    def __iter__(self) -> Iterator[Conversation]:
        for i in range(len(self)):
            yield self[i]

    def line_of(self, i: int) -> int:
        """1-based line number in the file of conversation i."""
        return int(self._line_numbers[self._base_row(i)])

    def select(self, indices: Sequence[int] | np.ndarray | slice | range) -> JsonlDataset:
        """A view of conversations ``indices`` (in that order); shares the offset index, copies no data."""
        n = len(self)
        if isinstance(indices, slice):
            idx = np.arange(n, dtype=np.int64)[indices]
        else:
            idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = int(idx[(idx < 0) | (idx >= n)][0])
            raise IndexError(f"select: index {bad} out of range for dataset of {n} conversations ({self.path})")
        view = object.__new__(JsonlDataset)
        view.__dict__.update(self.__dict__)
        view._rows = idx if self._rows is None else self._rows[idx]
        view._fh = None  # each view owns its handle, so closing one never breaks another
        return view

    # -- file handle and pickling --------------------------------------------------------------------------

    def _handle(self) -> IO[bytes]:
        if self._fh is None or self._fh.closed:
            try:
                self._fh = open(self.path, "rb")
            except OSError as e:
                raise DataError(self.path, None, f"cannot open data file ({e.strerror})") from None
        return self._fh

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fh"] = None  # an open file cannot cross processes; the receiver reopens lazily
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __del__(self) -> None:
        fh = getattr(self, "_fh", None)
        if fh is not None:
            fh.close()

    def __repr__(self) -> str:
        return f"JsonlDataset({self.path!r}, len={len(self)}, bad_lines={self.num_bad_lines})"
