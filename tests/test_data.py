import json
import pickle

import numpy as np
import pytest

from orchestration.data import MAX_METADATA_DEPTH, Conversation, DataError, JsonlDataset, Message, parse_line


def write_lines(path, lines, *, newline="\n", final_newline=True):
    text = newline.join(lines) + (newline if final_newline else "")
    path.write_bytes(text.encode("utf-8"))
    return str(path)


def nemo_line(**extra):
    obj = {
        "system": "Be brief.",
        "conversations": [
            {"from": "User", "value": "Hi"},
            {"from": "Assistant", "value": "Hello!", "label": "quality:4"},
            {"from": "human", "value": "2+2?"},
            {"from": "gpt", "value": "4"},
        ],
        "mask": "User",
    }
    obj.update(extra)
    return json.dumps(obj)


# --- parsing -----------------------------------------------------------------------------------------------


def test_nemo_shape_normalised_and_split():
    conv = parse_line(nemo_line(verifier_args={"kind": "math", "answers": [4, "four"]}), path="f.jsonl", line=7)
    assert conv.messages == (
        Message("system", "Be brief."),
        Message("user", "Hi"),
        Message("assistant", "Hello!"),  # no "type": the reference ignores labels
        Message("user", "2+2?"),
        Message("assistant", "4"),
    )
    assert conv.has_answer and conv.answer == "4"
    assert conv.prompt_messages == conv.messages[:-1]
    # system and mask are consumed; everything else is metadata, untouched.
    assert conv.metadata == {"verifier_args": {"kind": "math", "answers": [4, "four"]}}
    assert (conv.source, conv.line) == ("f.jsonl", 7)


def test_nemo_shape_empty_system_is_omitted_and_roles_case_insensitive():
    turns = [{"from": "HUMAN", "value": "q"}, {"from": "Bot", "value": "a"}]
    line = json.dumps({"system": "", "conversations": turns})
    conv = parse_line(line, path="p", line=1)
    assert conv.messages == (Message("user", "q"), Message("assistant", "a"))
    assert conv.metadata == {}


def test_chat_shape_with_metadata():
    line = json.dumps(
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "u2"},
            ],
            "id": 3,
            "tags": ["x", {"y": None}],
        }
    )
    conv = parse_line(line, path="p", line=1)
    assert [m.role for m in conv.messages] == ["system", "user", "assistant", "user"]
    # Final message is a user turn: prompt-only, the prompt is the whole conversation.
    assert not conv.has_answer and conv.answer is None
    assert conv.prompt_messages == conv.messages
    assert conv.metadata == {"id": 3, "tags": ["x", {"y": None}]}


def test_answer_is_only_the_final_assistant_turn():
    line = json.dumps(
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a1"},
                      {"role": "assistant", "content": "a2"}]}
    )
    conv = parse_line(line, path="p", line=1)
    assert conv.answer == "a2"
    assert [m.content for m in conv.prompt_messages] == ["u", "a1"]


BAD_LINES = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object (got array)"),
    ('"text"', "not a JSON object (got string)"),
    ('{"prompt": "hi"}', "no conversation"),
    ('{"messages": [], "conversations": []}', "both 'conversations' and 'messages'"),
    ('{"messages": "hi"}', "'messages' must be a list, got string"),
    ('{"conversations": {"from": "user"}}', "'conversations' must be a list, got object"),
    ('{"messages": []}', "empty conversation"),
    ('{"messages": [{"role": "system", "content": "s"}]}', "empty conversation"),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', "no user turn"),
    ('{"messages": ["hi"]}', "messages[0] must be an object, got string"),
    ('{"messages": [{"content": "hi"}]}', "messages[0] has no 'role' key"),
    ('{"messages": [{"role": "user"}]}', "messages[0] has no 'content' key"),
    ('{"messages": [{"role": "user", "content": 5}]}', "messages[0].content must be a string, got int"),
    ('{"messages": [{"role": "user", "content": null}]}', "messages[0].content must be a string, got null"),
    ('{"messages": [{"role": "tool", "content": "x"}]}', "unknown role 'tool' in messages[0].role"),
    ('{"messages": [{"role": 1, "content": "x"}]}', "messages[0].role must be a string, got int"),
    ('{"conversations": [{"from": "narrator", "value": "x"}]}', "unknown role 'narrator' in conversations[0].from"),
    ('{"conversations": [{"from": "user", "value": ["x"]}]}', "conversations[0].value must be a string, got array"),
    ('{"conversations": [{"from": "user", "value": "x", "label": 3}]}', "conversations[0].label must be a string"),
    ('{"system": 1, "conversations": [{"from": "user", "value": "x"}]}', "'system' must be a string, got int"),
    ('{"mask": [], "conversations": [{"from": "user", "value": "x"}]}', "'mask' must be a role name string"),
    (
        '{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}]}',
        "system message at position 1",
    ),
    (
        '{"system": "s", "conversations": [{"from": "system", "value": "s2"}, {"from": "user", "value": "x"}]}',
        "system message at position 1",
    ),
    ('{"conversations": [{"from": "user", "value": "x"}], "type": "CHAT"}', "unknown 'type' 'CHAT'"),
    ('{"conversations": [{"from": "user", "value": "x"}], "type": 1}', "'type' must be a string or null"),
    ('{"conversations": [{"from": "user", "value": "x"}], "type": "TEXT_TO_VALUE"}', "TEXT_TO_VALUE is not supp"),
    ('{"conversations": [{"from": "user", "value": "x"}], "system_token": "User"}', "'system_token' must name"),
    ('{"conversations": [{"from": "user", "value": "x"}], "system_token": 2}', "system_token must be a string"),
    (
        '{"conversations": [{"from": "<|start_header_id|>tool<|end_header_id|>", "value": "x"}]}',
        "unknown role '<|start_header_id|>tool<|end_header_id|>' in conversations[0].from",
    ),
    # Input that used to escape as a raw RecursionError / ValueError / later TypeError:
    pytest.param(
        '{"messages": [{"role": "user", "content": "x"}], "m": ' + "[" * 5000 + "]" * 5000 + "}",
        "JSON nests too deeply to parse", id="nesting-beyond-json",
    ),
    pytest.param(
        '{"messages": [{"role": "user", "content": "x"}], "m": ' + "[" * (MAX_METADATA_DEPTH + 1)
        + "]" * (MAX_METADATA_DEPTH + 1) + "}",
        f"metadata key 'm' nests deeper than {MAX_METADATA_DEPTH} levels", id="nesting-beyond-cap",
    ),
    pytest.param(
        '{"messages": [{"role": "user", "content": "x"}], "n": ' + "7" * 5000 + "}",
        "an integer has more than", id="huge-int",
    ),
    ('{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages[0].content holds a lone UTF-16 surrogate (U+D800 at character 1)"),
    ('{"conversations": [{"from": "user", "value": "\\udfff"}]}', "conversations[0].value holds a lone UTF-16"),
    ('{"system": "\\ud83d", "conversations": [{"from": "user", "value": "x"}]}', "system holds a lone UTF-16"),
    ('{"messages": [{"role": "user", "content": "x"}], "meta": {"a": ["ok", "\\ud800"]}}',
     "meta.a[1] holds a lone UTF-16 surrogate"),
    ('{"messages": [{"role": "user", "content": "x"}], "\\ud800": 1}', "key '\\ud800' holds a lone UTF-16"),
]


@pytest.mark.parametrize("text,reason", BAD_LINES)
def test_parse_line_bad(text, reason):
    with pytest.raises(DataError) as info:
        parse_line(text, path="data/x.jsonl", line=12)
    assert str(info.value).startswith("data/x.jsonl:12: ")
    assert reason in str(info.value)
    assert (info.value.path, info.value.line) == ("data/x.jsonl", 12)


@pytest.mark.parametrize("text,reason", BAD_LINES)
def test_dataset_error_mode_reports_file_and_line(tmp_path, text, reason):
    path = write_lines(tmp_path / "d.jsonl", [nemo_line(), "", text, nemo_line()])
    with pytest.raises(DataError) as info:
        JsonlDataset(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert reason in info.value.reason


def test_escaping_bad_lines_are_skipped_and_counted(tmp_path):
    """Deep nesting, a huge integer and a lone surrogate used to escape as raw exceptions (or reach the tokenizer);
    under on_bad_line=skip they are counted and skipped like any bad line."""
    bad = [
        '{"messages": [{"role": "user", "content": "q"}], "m": ' + "[" * 3000 + "]" * 3000 + "}",
        '{"messages": [{"role": "user", "content": "q"}], "n": ' + "1" * 5000 + "}",
        '{"messages": [{"role": "user", "content": "\\ud800"}]}',
    ]
    path = write_lines(tmp_path / "d.jsonl", [chat_line("q0", "a0"), *bad, chat_line("q4", "a4")])
    ds = JsonlDataset(path, on_bad_line="skip")
    assert [c.answer for c in ds] == ["a0", "a4"]
    assert [line for line, _ in ds.bad_lines] == [2, 3, 4]
    for i, line in enumerate(bad):
        one = write_lines(tmp_path / f"e{i}.jsonl", [chat_line("q0"), line])
        with pytest.raises(DataError) as info:
            JsonlDataset(one)
        assert str(info.value).startswith(f"{one}:2: ")


def test_valid_escapes_and_moderate_nesting_load(tmp_path):
    emoji = '{"messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}], "tag": "\\u00e9\\ud83d\\ude00"}'
    conv = parse_line(emoji, path="p", line=1)
    assert conv.messages[0].content == "smile \U0001F600" and conv.metadata["tag"] == "\u00e9\U0001F600"
    deep = json.loads("[" * MAX_METADATA_DEPTH + "]" * MAX_METADATA_DEPTH)
    path = write_lines(tmp_path / "d.jsonl", [chat_line("q", "a", m=deep, n=10**4000)])
    ds = JsonlDataset(path)
    assert ds[0].metadata == {"m": deep, "n": 10**4000}
    assert pickle.loads(pickle.dumps(ds[0])).metadata["m"] == deep  # what crossing to a Ray actor needs


def test_llama3_format_chat_sft_line():
    """NeMo-Aligner's sft_512_sample_llama3_format.jsonl: roles written as llama3 header tokens in "from" and
    "mask", a "system_token" key naming the system header, an empty system."""
    header = "<|start_header_id|>{}<|end_header_id|>".format
    line = json.dumps({
        "system": "",
        "mask": header("user"),
        "dataset": "340b-instruct",
        "conversations": [{"from": header("user"), "value": "q"}, {"from": header("assistant"), "value": "a"}],
        "system_token": header("system"),
    })
    conv = parse_line(line, path="p", line=1)
    assert conv.messages == (Message("user", "q"), Message("assistant", "a"))
    assert conv.metadata == {"dataset": "340b-instruct"}  # system_token is part of the shape, like mask
    with_system = json.loads(line) | {"system": "S"}
    assert parse_line(json.dumps(with_system), path="p", line=1).messages[0] == Message("system", "S")
    default_token = parse_line(json.dumps(json.loads(line) | {"system_token": "System"}), path="p", line=1)
    assert default_token.messages == conv.messages


def test_labels_kept_only_for_value_to_text():
    """NeMo's _add_speaker_and_signal renders labels for type VALUE_TO_TEXT only; with no type (or null) they
    are ignored."""
    turns = [{"from": "User", "value": "q"}, {"from": "Assistant", "value": "a", "label": "quality:4"}]
    for extra in ({}, {"type": None}):
        conv = parse_line(json.dumps({"conversations": turns, **extra}), path="p", line=1)
        assert conv.messages[-1] == Message("assistant", "a") and conv.metadata == {}
    conv = parse_line(json.dumps({"conversations": turns, "type": "VALUE_TO_TEXT"}), path="p", line=1)
    assert conv.messages[-1] == Message("assistant", "a", "quality:4") and conv.metadata == {}


def test_invalid_utf8_is_a_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(nemo_line().encode() + b"\n" + b'{"messages": "\xff"}\n')
    with pytest.raises(DataError, match=r":2: not valid UTF-8"):
        JsonlDataset(path)


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=str(missing)):
        JsonlDataset(missing)


# --- the dataset -------------------------------------------------------------------------------------------


def chat_line(user, answer=None, **meta):
    msgs = [{"role": "user", "content": user}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return json.dumps({"messages": msgs, **meta}, ensure_ascii=False)


def test_irregular_metadata_carried_exactly(tmp_path):
    metas = [
        {"verifier_args": {"type": "regex", "patterns": ["a+", {"n": [1, 2.5, None, True]}]}},
        {},
        {"id": "x", "nested": [[1, [2, [3]]], {"deep": {"deeper": {"deepest": []}}}]},
        {"verifier_args": None, "score": -1.5e-3, "flag": False},
    ]
    path = write_lines(tmp_path / "d.jsonl", [chat_line(f"q{i}", "a", **m) for i, m in enumerate(metas)])
    ds = JsonlDataset(path)
    assert [ds[i].metadata for i in range(len(ds))] == metas


def test_skip_mode_counts_and_keeps_indexes_consistent(tmp_path):
    lines = [
        chat_line("q0", "a0"),
        "not json",
        "",
        "   ",
        chat_line("q4"),
        "[]",
        chat_line("q6", "a6"),
    ]
    path = write_lines(tmp_path / "d.jsonl", lines)
    ds = JsonlDataset(path, on_bad_line="skip")
    assert len(ds) == 3
    assert ds.num_bad_lines == 2
    assert [line for line, _ in ds.bad_lines] == [2, 6]
    assert "not valid JSON" in ds.bad_lines[0][1] and "not a JSON object" in ds.bad_lines[1][1]
    assert [ds.line_of(i) for i in range(3)] == [1, 5, 7]
    assert [c.messages[0].content for c in ds] == ["q0", "q4", "q6"]
    assert [c.line for c in ds] == [1, 5, 7]
    assert ds[-1].answer == "a6"
    with pytest.raises(IndexError):
        ds[3]


def test_require_answer(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [chat_line("q0", "a0"), chat_line("q1")])
    with pytest.raises(DataError, match=r"d\.jsonl:2: no assistant answer \(required"):
        JsonlDataset(path, require_answer=True)
    ds = JsonlDataset(path, on_bad_line="skip", require_answer=True)
    assert len(ds) == 1 and ds.bad_lines[0][0] == 2
    assert len(JsonlDataset(path)) == 2  # prompt-only is fine when not required


def test_crlf_utf8_bom_and_no_final_newline(tmp_path):
    lines = [chat_line("héllo ✓", "日本語"), chat_line("second", "ok")]
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8"))  # BOM, CRLF, no final newline
    ds = JsonlDataset(path)
    assert len(ds) == 2
    assert ds[0].messages[0].content == "héllo ✓" and ds[0].answer == "日本語"
    assert ds[1].answer == "ok"


def test_reads_lazily_from_offsets(tmp_path):
    path = tmp_path / "d.jsonl"
    write_lines(path, [chat_line("q0", "aaa"), chat_line("q1", "bbb")])
    ds = JsonlDataset(path)
    assert isinstance(ds._offsets, np.ndarray) and ds._offsets.dtype == np.int64
    assert ds._offsets.tolist() == [0, len(chat_line("q0", "aaa")) + 1]
    # Same-length rewrite after indexing: the dataset reads the file, not a cached copy.
    write_lines(path, [chat_line("q0", "AAA"), chat_line("q1", "BBB")])
    assert ds[1].answer == "BBB" and ds[0].answer == "AAA"


def test_pickle_without_file_handle(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [chat_line(f"q{i}", f"a{i}") for i in range(5)])
    ds = JsonlDataset(path)
    assert ds[2].answer == "a2"  # opens the handle
    assert ds._fh is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._fh is None
    assert [c.answer for c in clone] == [f"a{i}" for i in range(5)]
    assert ds[4].answer == "a4"  # the original still works


def test_select_is_an_ordered_view(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [chat_line(f"q{i}", f"a{i}") for i in range(6)])
    ds = JsonlDataset(path)
    sub = ds.select([4, 1, 5])
    assert len(sub) == 3
    assert [c.answer for c in sub] == ["a4", "a1", "a5"]
    assert [sub.line_of(i) for i in range(3)] == [5, 2, 6]
    assert isinstance(sub._rows, np.ndarray)
    assert sub._offsets is ds._offsets  # shares the index; only the row array is new
    subsub = sub.select(np.array([2, 0]))
    assert [c.answer for c in subsub] == ["a5", "a4"]
    assert [c.answer for c in ds.select(slice(None, None, 2))] == ["a0", "a2", "a4"]
    assert len(ds) == 6  # the base is untouched
    assert [c.answer for c in pickle.loads(pickle.dumps(sub))] == ["a4", "a1", "a5"]
    with pytest.raises(IndexError):
        ds.select([0, 6])
    with pytest.raises(IndexError):
        sub[3]


def test_conversation_type():
    conv = parse_line(chat_line("q", "a"), path="p", line=1)
    assert isinstance(conv, Conversation)
    with pytest.raises(AttributeError):
        conv.line = 2  # frozen
