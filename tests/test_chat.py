import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from orchestration.chat import PRESETS, ChatRenderer, EncodedSample
from orchestration.data import Conversation, Message

MARKERS = ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CORPUS = [
    "Hello there, how are you?\n\nI am fine. What is 2 + 2?\nThe answer is 4.\n",
    "Be nice and brief.\n\n",  # a trailing "\n\n" teaches the merge that crosses the llama3 prompt boundary
]


def make_tokenizer(bos: str, *, add_bos: bool) -> PreTrainedTokenizerFast:
    """A small byte-level BPE with the presets' markers as special tokens; optionally prepends BOS itself."""
    specials = [bos, "</s>", *MARKERS]
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
    assert full.endswith("<extra_id_1>User\nWhat is 2 + 2?\n<extra_id_1>Assistant\nThe answer is 4.\n")


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
        f"{h('assistant')}I am fine.<|eot_id|>"
        f"{h('user')}What is 2 + 2?<|eot_id|>"
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
    assert nemo_tok.decode(answer) == "The answer is 4.\n"  # includes the end-of-turn "\n"


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
