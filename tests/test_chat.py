import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from orchestration.chat import PRESETS, ChatRenderer, EncodedSample
from orchestration.data import Conversation, Message, parse_line

MARKERS = ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CORPUS = [
    "Hello there, how are you?\n\nI am fine. What is 2 + 2?\nThe answer is 4.\n",
    "Be nice and brief.\n\n",  # a trailing "\n\n" teaches the merge that crosses the llama3 prompt boundary
]


def make_tokenizer(bos: str, *, add_bos: bool, extra_specials=()) -> PreTrainedTokenizerFast:
    """A small byte-level BPE with the presets' markers as special tokens; optionally prepends BOS itself."""
    specials = [bos, "</s>", *MARKERS, *extra_specials]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="</s>", name_or_path="toy-tok")


@pytest.fixture(scope="module")
def nemo_tok():
    return make_tokenizer("<s>", add_bos=True)


@pytest.fixture(scope="module")
def llama_tok():
    return make_tokenizer("<|begin_of_text|>", add_bos=True)


CONV_MESSAGES = (
    Message("system", "Be nice."),
    Message("user", "Hello there"),
    Message("assistant", "I am fine.", "quality:4,toxicity:0"),
    Message("user", "What is 2 + 2?"),
)
ANSWER = "The answer is 4."


def conversation(messages=CONV_MESSAGES, answer=ANSWER):
    msgs = tuple(messages) + ((Message("assistant", answer),) if answer is not None else ())
    return Conversation(messages=msgs, metadata={}, source="t.jsonl", line=1)


# --- presets -----------------------------------------------------------------------------------------------


def test_nemo_preset_exact_text(nemo_tok):
    r = ChatRenderer(nemo_tok, "nemo")
    assert r.prompt_text(CONV_MESSAGES) == (
        "<extra_id_0>System\nBe nice.\n"
        "<extra_id_1>User\nHello there\n"
        "<extra_id_1>Assistant\n<extra_id_2>quality:4,toxicity:0\nI am fine.\n"
        "<extra_id_1>User\nWhat is 2 + 2?\n"
        "<extra_id_1>Assistant\n"
    )
    full = r.render([*CONV_MESSAGES, Message("assistant", ANSWER)], add_generation_prompt=False)
    # Ends with the end-of-turn marker the reference appends after the last (unmasked) turn.
    assert full.endswith(
        "<extra_id_1>User\nWhat is 2 + 2?\n<extra_id_1>Assistant\nThe answer is 4.\n<extra_id_1>"
    )


def test_nemo_preset_always_emits_system(nemo_tok):
    r = ChatRenderer(nemo_tok, "nemo")
    text = r.prompt_text([{"role": "user", "content": "Hi"}])
    assert text == "<extra_id_0>System\n\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\n"


def test_llama3_preset_exact_text(llama_tok):
    r = ChatRenderer(llama_tok, "llama3")
    h = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"  # noqa: E731
    assert r.prompt_text(CONV_MESSAGES) == (
        "<|begin_of_text|>"
        f"{h('system')}Be nice.<|eot_id|>"
        f"{h('user')}Hello there<|eot_id|>"
        f"{h('assistant')}<extra_id_2>quality:4,toxicity:0\n\nI am fine.<|eot_id|>"  # label as the reference's
        f"{h('user')}What is 2 + 2?<|eot_id|>"                                    # VALUE_TO_TEXT renders it
        f"{h('assistant')}"
    )


# --- tokens ------------------------------------------------------------------------------------------------


def test_nemo_answer_ids_complete_the_full_render(nemo_tok):
    r = ChatRenderer(nemo_tok, "nemo")
    bos = nemo_tok.bos_token_id
    prompt, answer = r.prompt_ids(CONV_MESSAGES), r.answer_ids(CONV_MESSAGES, ANSWER)
    full_text = r.render([*CONV_MESSAGES, Message("assistant", ANSWER)], add_generation_prompt=False)
    assert prompt + answer == [bos] + nemo_tok.encode(full_text, add_special_tokens=False)
    assert prompt.count(bos) == 1 and prompt[0] == bos  # the tokenizer's BOS, once
    # the turn's "\n" and the end-of-turn marker, which the reference trains on
    assert nemo_tok.decode(answer) == "The answer is 4.\n<extra_id_1>"


def test_llama3_no_double_bos_and_eot_in_answer(llama_tok):
    r = ChatRenderer(llama_tok, "llama3")
    bos = llama_tok.bos_token_id
    prompt, answer = r.prompt_ids(CONV_MESSAGES), r.answer_ids(CONV_MESSAGES, ANSWER)
    assert prompt[0] == bos and prompt.count(bos) == 1
    assert answer[-1] == llama_tok.convert_tokens_to_ids("<|eot_id|>")
    full_text = r.render([*CONV_MESSAGES, Message("assistant", ANSWER)], add_generation_prompt=False)
    assert llama_tok.decode(prompt + answer) == full_text


def test_answer_ids_fallback_when_tokens_merge_across_boundary(llama_tok):
    r = ChatRenderer(llama_tok, "llama3")
    # The prompt ends in "\n\n", which this vocabulary merges when nothing follows but not before "The":
    # the token-prefix rule fails, so the answer's text is tokenised on its own.
    prompt = r.prompt_ids(CONV_MESSAGES)
    full = r.encode_text(r.render([*CONV_MESSAGES, Message("assistant", ANSWER)], add_generation_prompt=False))
    assert full[: len(prompt)] != prompt
    assert r.answer_ids(CONV_MESSAGES, ANSWER) == llama_tok.encode(ANSWER + "<|eot_id|>", add_special_tokens=False)


# --- template selection ------------------------------------------------------------------------------------


def test_template_sources(nemo_tok):
    with pytest.raises(ValueError, match="toy-tok.*no chat_template"):
        ChatRenderer(nemo_tok)
    with pytest.raises(ValueError, match="unknown chat template preset 'nemo2'"):
        ChatRenderer(nemo_tok, "nemo2")
    literal = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    assert ChatRenderer(nemo_tok, literal).prompt_text([{"role": "user", "content": "x"}]) == "[user]x>"
    own = make_tokenizer("<s>", add_bos=False)
    own.chat_template = literal
    r = ChatRenderer(own)
    assert r.prompt_text(CONV_MESSAGES[1:2]) == "[user]Hello there>"
    assert r.prompt_ids(CONV_MESSAGES[1:2]) == own.encode("[user]Hello there>", add_special_tokens=False)
    assert set(PRESETS) == {"nemo", "llama3"}


# --- the reference's own data, character for character ----------------------------------------------------
#
# Expected strings below are derived from NeMo's gpt_sft_chat_dataset.py (the version with `system_token`,
# NeMo PR #9775, which NeMo-Aligner's llama3 test data relies on):
#   header = system_turn_start + source.get("system_token", "System") + end_of_name + system + end_of_turn
#            (_get_header_conversation_type_mask_role)
#   turn   = turn_start + from + end_of_name + [label_start + label + end_of_name if type == VALUE_TO_TEXT]
#            + value + end_of_turn; after the last turn, if it is not the mask role: + turn_start
#            (_add_speaker_and_signal)
#   prompt (context_ids) = everything through the answer turn's name line and label (preprocess/_mask_targets)
# with chat_prompt_tokens: nemo = NeMo's defaults (gpt_sft_dataset.py: <extra_id_0>, <extra_id_1>,
# <extra_id_2>, end_of_turn "\n", end_of_name "\n"); llama3 = NeMo-Aligner's tests/functional/spin.sh and
# gpt_self_rewarding_llama3.yaml (system_turn_start <|begin_of_text|>, turn_start "", label_start <extra_id_2>,
# end_of_turn <|eot_id|>, end_of_name "\n\n").


def reference_example_line():
    """NeMo's get_prompt_template_example source (the 'User'/'Assistant' version), as a JSONL line."""
    return json.dumps({
        "system": "{system message}",
        "conversations": [
            {"from": "User", "value": "{turn 1 user message}", "label": None},
            {"from": "Assistant", "value": "{turn 1 assistant message}", "label": "{turn 1 assistant label}"},
            {"from": "User", "value": "{turn 2 user message}", "label": None},
            {"from": "Assistant", "value": "{turn 2 assistant message}", "label": "{turn 2 assistant label}"},
        ],
        "mask": "User",
        "type": "VALUE_TO_TEXT",
    })


def test_nemo_preset_matches_reference_prompt_template_example(nemo_tok):
    """_get_header_conversation_type_mask_role + _add_speaker_and_signal on get_prompt_template_example's
    source with NeMo's default chat_prompt_tokens; the prompt/answer split is preprocess()'s context_ids /
    answer_ids (VALUE_TO_TEXT masks the answer turn's name line and label)."""
    r = ChatRenderer(nemo_tok, "nemo")
    conv = parse_line(reference_example_line(), path="x", line=1)
    expected_full = (
        "<extra_id_0>System\n{system message}\n"
        "<extra_id_1>User\n{turn 1 user message}\n"
        "<extra_id_1>Assistant\n<extra_id_2>{turn 1 assistant label}\n{turn 1 assistant message}\n"
        "<extra_id_1>User\n{turn 2 user message}\n"
        "<extra_id_1>Assistant\n<extra_id_2>{turn 2 assistant label}\n{turn 2 assistant message}\n"
        "<extra_id_1>"
    )
    assert r.render(conv.messages, add_generation_prompt=False) == expected_full
    context = expected_full[: expected_full.index("{turn 2 assistant message}")]
    assert r.prompt_text(conv.prompt_messages, conv.messages[-1].label) == context
    s = r.encode_conversation(conv, max_prompt_length=None)
    assert nemo_tok.decode(s.prompt_ids, skip_special_tokens=False) == "<s>" + context
    assert nemo_tok.decode(s.answer_ids) == "{turn 2 assistant message}\n<extra_id_1>"
    assert s.prompt_ids + s.answer_ids == [nemo_tok.bos_token_id] + nemo_tok.encode(expected_full,
                                                                                   add_special_tokens=False)


def test_nemo_answer_trains_on_the_end_of_turn_marker(nemo_tok):
    """_add_speaker_and_signal: `if sentence_from not in mask_role and i == len(source) - 1: conversation +=
    TURN_TOKEN`, and _mask_targets leaves it unmasked: the SFT/SPIN target ends "\n<extra_id_1>"."""
    r = ChatRenderer(nemo_tok, "nemo")
    s = r.encode_conversation(conversation(CONV_MESSAGES, ANSWER), max_prompt_length=None)
    eot = nemo_tok.convert_tokens_to_ids("<extra_id_1>")
    assert s.answer_ids[-1] == eot
    assert nemo_tok.decode(s.answer_ids[-2:]) == "\n<extra_id_1>"
    # A prompt-only render and a render that continues with a generation prompt get no extra marker.
    assert r.render(CONV_MESSAGES, add_generation_prompt=False).endswith("What is 2 + 2?\n")
    assert r.prompt_text(CONV_MESSAGES).endswith("What is 2 + 2?\n<extra_id_1>Assistant\n")


def test_stop_strings_are_the_presets_end_of_turn_markers(nemo_tok, llama_tok):
    """The reference's sampling end_strings: ["<|endoftext|>", "<extra_id_1>"] (gpt_spin.yaml,
    gpt_self_rewarding.yaml) and ["<|endoftext|>", "<|eot_id|>"] (spin.sh, gpt_self_rewarding_llama3.yaml);
    <|endoftext|> is the EOS, which the engine stops on already."""
    nemo, llama3 = ChatRenderer(nemo_tok, "nemo"), ChatRenderer(llama_tok, "llama3")
    assert nemo.stop_strings == ("<extra_id_1>",)
    assert llama3.stop_strings == ("<|eot_id|>",)
    # A generation stopped on the stop string ends exactly like the ground-truth answer.
    for r, tok in ((nemo, nemo_tok), (llama3, llama_tok)):
        answer = r.answer_ids(CONV_MESSAGES, ANSWER)
        assert tok.decode(answer).endswith(r.stop_strings[0])
        assert r.stop_strings[0] not in tok.decode(answer[:-1])
    own = make_tokenizer("<s>", add_bos=False)
    own.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert ChatRenderer(own).stop_strings == ()
    assert ChatRenderer(nemo_tok, own.chat_template).stop_strings == ()


LLAMA3_LINE = json.dumps({  # the shape of NeMo-Aligner's tests/functional/test_data/sft_512_sample_llama3_format.jsonl
    "system": "",
    "mask": "<|start_header_id|>user<|end_header_id|>",
    "dataset": "toy",
    "conversations": [
        {"from": "<|start_header_id|>user<|end_header_id|>", "value": "Hello there"},
        {"from": "<|start_header_id|>assistant<|end_header_id|>", "value": "I am fine."},
        {"from": "<|start_header_id|>user<|end_header_id|>", "value": "What is 2 + 2?"},
        {"from": "<|start_header_id|>assistant<|end_header_id|>", "value": "The answer is 4."},
    ],
    "system_token": "<|start_header_id|>system<|end_header_id|>",
})


def test_llama3_preset_renders_reference_llama3_line(llama_tok):
    """_get_header_conversation_type_mask_role (header with system_token and an empty system) +
    _add_speaker_and_signal (turn_start "", from = header tokens, end_of_name "\n\n", end_of_turn <|eot_id|>;
    the trailing turn_start is empty) with spin.sh's llama3 chat_prompt_tokens."""
    r = ChatRenderer(llama_tok, "llama3")
    conv = parse_line(LLAMA3_LINE, path="x", line=1)
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nI am fine.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nThe answer is 4.<|eot_id|>"
    )
    assert r.render(conv.messages, add_generation_prompt=False) == expected
    assert r.prompt_text(conv.prompt_messages) == expected[: expected.index("The answer is 4.")]
    s = r.encode_conversation(conv, max_prompt_length=None)
    assert llama_tok.decode(s.prompt_ids + s.answer_ids) == expected


def test_llama3_empty_system_keeps_its_block(llama_tok):
    """The reference's header is always rendered, an empty system included (and DPOModelDataset.
    _convert_messages gives messages without a system message system "")."""
    r = ChatRenderer(llama_tok, "llama3")
    conv = parse_line(json.dumps({"system": "", "conversations": [{"from": "User", "value": "Hi"}]}), path="x", line=1)
    block = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n<|eot_id|>"
    assert r.prompt_text(conv.prompt_messages) == (
        block + "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert r.prompt_text([{"role": "user", "content": "Hi"}]).startswith(block)


def test_labels_render_only_with_value_to_text(nemo_tok, llama_tok):
    """_add_speaker_and_signal: gtype None renders no label; VALUE_TO_TEXT renders label_start + label +
    end_of_name after the name line (response_value_formater; a null label renders nothing)."""
    turns = [{"from": "User", "value": "Hi", "label": None},
             {"from": "Assistant", "value": "Hello", "label": "quality:4"},
             {"from": "User", "value": "Bye"},
             {"from": "Assistant", "value": "Ciao", "label": "quality:2"}]
    untyped = parse_line(json.dumps({"system": "", "conversations": turns}), path="x", line=1)
    typed = parse_line(json.dumps({"system": "", "conversations": turns, "type": "VALUE_TO_TEXT"}), path="x", line=1)
    nemo = ChatRenderer(nemo_tok, "nemo")
    assert nemo.render(untyped.messages, add_generation_prompt=False) == (
        "<extra_id_0>System\n\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\nHello\n"
        "<extra_id_1>User\nBye\n<extra_id_1>Assistant\nCiao\n<extra_id_1>"
    )
    assert nemo.render(typed.messages, add_generation_prompt=False) == (
        "<extra_id_0>System\n\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\n<extra_id_2>quality:4\nHello\n"
        "<extra_id_1>User\nBye\n<extra_id_1>Assistant\n<extra_id_2>quality:2\nCiao\n<extra_id_1>"
    )
    s = nemo.encode_conversation(typed, max_prompt_length=None)
    assert nemo_tok.decode(s.prompt_ids).endswith("<extra_id_1>Assistant\n<extra_id_2>quality:2\n")
    assert nemo_tok.decode(s.answer_ids) == "Ciao\n<extra_id_1>"
    llama3 = ChatRenderer(llama_tok, "llama3")
    assert llama3.render(typed.messages[:2], add_generation_prompt=False).endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n<extra_id_2>quality:4\n\nHello<|eot_id|>"
    )
    assert "<extra_id_2>" not in llama3.render(untyped.messages, add_generation_prompt=False)


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chatml_answer_ends_at_im_end_like_a_generation():
    """A ChatML template writes "<|im_end|>\n" after every turn; generation stops at (and keeps) <|im_end|>,
    so the ground-truth answer must end there too, or every SPIN chosen response has one token more."""
    tok = make_tokenizer("<s>", add_bos=False, extra_specials=("<|im_start|>", "<|im_end|>"))
    tok.chat_template = CHATML
    r = ChatRenderer(tok)
    answer = r.answer_ids(CONV_MESSAGES, ANSWER)
    assert answer == tok.encode(ANSWER + "<|im_end|>", add_special_tokens=False)
    assert answer[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    full = tok.encode(r.render([*CONV_MESSAGES, Message("assistant", ANSWER)], add_generation_prompt=False),
                      add_special_tokens=False)
    assert r.prompt_ids(CONV_MESSAGES) + answer == full[:-1]  # all but the newline between turns
    s = r.encode_conversation(conversation(CONV_MESSAGES, ANSWER), max_prompt_length=None)
    assert s.answer_ids == answer


# --- encode_conversation -----------------------------------------------------------------------------------


LONG = (
    Message("system", "Be nice."),
    Message("user", "Hello there, how are you?"),
    Message("assistant", "I am fine."),
    Message("user", "What is 2 + 2?"),
    Message("assistant", "The answer is 4."),
    Message("user", "Hello"),
)


def test_encode_conversation_fits(nemo_tok):
    r = ChatRenderer(nemo_tok, "nemo")
    conv = conversation(LONG, "Hi")
    s = r.encode_conversation(conv, max_prompt_length=None, on_long_prompt="drop")
    assert isinstance(s, EncodedSample)
    assert s.prompt_ids == r.prompt_ids(LONG) and s.prompt_messages == LONG
    assert s.answer_ids == r.answer_ids(LONG, "Hi") and s.conversation is conv
    prompt_only = r.encode_conversation(conversation(LONG, None), max_prompt_length=None, on_long_prompt="drop")
    assert prompt_only.answer_ids is None and prompt_only.prompt_messages == LONG


def test_long_prompt_drop(nemo_tok):
    r = ChatRenderer(nemo_tok, "nemo")
    n = len(r.prompt_ids(LONG))
    assert r.encode_conversation(conversation(LONG), max_prompt_length=n - 1, on_long_prompt="drop") is None
    assert r.encode_conversation(conversation(LONG), max_prompt_length=n, on_long_prompt="drop") is not None


def test_long_prompt_truncate_left(nemo_tok):
    r = ChatRenderer(nemo_tok, "nemo")
    system, last_two_turns, last_user = LONG[:1], LONG[3:], LONG[5:]
    n_two = len(r.prompt_ids(system + last_two_turns))
    n_last = len(r.prompt_ids(system + last_user))
    assert n_last < n_two < len(r.prompt_ids(LONG))

    s = r.encode_conversation(conversation(LONG), max_prompt_length=n_two, on_long_prompt="truncate_left")
    assert s.prompt_messages == system + last_two_turns  # oldest user/assistant pair dropped, system kept
    assert s.prompt_ids == r.prompt_ids(system + last_two_turns) and len(s.prompt_ids) <= n_two
    assert s.answer_ids == r.answer_ids(system + last_two_turns, ANSWER)

    s = r.encode_conversation(conversation(LONG), max_prompt_length=n_two - 1, on_long_prompt="truncate_left")
    assert s.prompt_messages == system + last_user

    too_short = r.encode_conversation(conversation(LONG), max_prompt_length=n_last - 1, on_long_prompt="truncate_left")
    assert too_short is None


# --- judge text --------------------------------------------------------------------------------------------


def test_user_text():
    single = (Message("system", "S"), Message("user", "What is 2 + 2?"))
    assert ChatRenderer.user_text(single, normalise=False) == "What is 2 + 2?"
    assert ChatRenderer.user_text(single, normalise=True) == "User: What is 2 + 2?"
    multi = (Message("system", "S"), Message("user", "Hi"), Message("assistant", "Hello"), Message("user", "Bye"))
    assert ChatRenderer.user_text(multi, normalise=False) == "User: Hi\n\nAssistant: Hello\n\nUser: Bye"
