"""Verifiers (actors/verifiers): each checker on its library's or benchmark's published examples, the share ->
score mapping of the verifier judge, and the errors a bad `verifier` / `verifier_args` gives."""

import threading

import pytest

from actors import verifiers
from actors.judges.protocol import FIXED, JudgeItem
from actors.judges.verifier import NOT_NAMED, VerifierJudge
from actors.verifiers import ifeval, math_answers
from actors.verifiers.protocol import Sample
from actors.verifiers.runner import VerifierRunner
from orchestration.data import DataError, JsonlDataset, parse_line

# ---- IFEval: the examples of google-research/instruction_following_eval/instructions_test.py -------------------

BULLETS_1 = """
  A Markdown bullet point is a way of formatting text to create a list. To
  create a bullet point, start each line with an asterisk (*). For example:
  * This is a bullet point.
  *(no space required)Another bullet point.
  * (no newline ending required)Another bullet point.
  markdown bullet points are often used to create to-do lists or to list items
  in a step-by-step guide."""
BULLETS_2 = """
  Check that inline asterisk (*), *, will not be counted. Only * that starts a
  bullet list will be counted:
    * This is a bullet point.
    * Another bullet point.
    . dot is not counted"""
BULLETS_4 = """
  Here are three markdown bullets:
  - I am a large language model, also known as a conversational AI.
  - I am trained on a massive amount of text data, and I am able to communicate.
  -I am still under development, but I am learning new things every day."""
BULLETS_5 = """
  Paragraph 1
  ***
  Paragraph 2
  ***
  Paragraph 3
  * only one bullet point
  """
HIGHLIGHTS_1 = """
  To highlight text with Markdown, you can use the * character before and after
  the text you want to highlight. For example, if you want to highlight the
  word `hello`, you would type:*hello*, You can also use the ** character to
  create bold text. For example, if you want to bold the word `hello`, you
  would type: **hello** """
HIGHLIGHTS_2 = """
  Sure, here are the numerical methods for solving partial differential
  equations highlighted with Markdown:
  *Finite difference methods
  *Finite element methods*
  *Boundary element methods
  *Monte Carlo methods
  I hope this helps!"""
HIGHLIGHTS_3 = """
  There is allowed to be *two different* highlighted *sections in the same*
  line. **This is also true** for **double markdown highlights.**
  """
SECTIONS_1 = """
  Your response must have multiple sections. Mark the beginning of each section
  with "Section X", such as:
  Section 1
  [content of section 1]
  Section 2
  [content of section 2]"""
SECTIONS_2 = """SECTION 1
  [content of section 1]
  SECTION 2
  [content of section 2]"""
PARAGRAPHS = ["""
  paragraph 1
  ***
  paragraph 2
  ***
  paragraph 3""", """
          ***
  paragraph 1
          ***
      paragraph 2
          ***
      paragraph 3""", """
  paragraph 1
          ***
      paragraph 2
          ***
      paragraph 3
          ***""", """
  paragraph 1
          ***
      paragraph 2
          ***
          ***"""]
POSTSCRIPT_1 = """
  I will do my best to follow your instructions and always start my responses
  with "My response is:". I will try to be as consistent as possible, but
  please be patient with me if I make a mistake. I am still under development,
  and I am always learning new things.

  P.S. I hope this is what you were looking for."""
POSTSCRIPT_2 = """
  Sure, here is my response with a postscript starting with P.P.S.:

  My response is: I hope this answers your question.

  P.P.S. I am always happy to answer any other questions you may have.

  Do you have any other questions for me?"""
POSTSCRIPT_3 = """
  The radius of a unit circle is 1. However, I can give you a funny and wrong
  answer: the radius of a unit circle is 0. This is because a unit circle is a
  circle with a radius of 1, and if the radius is 0, then the circle has no
  size and is just a point. (not starting a new line) P.S. I hope you enjoyed
  my joke!"""
POSTSCRIPT_4 = """
  If the length of a square is one, the area of the square will also be one.
  p.p.s what if the entire response was lower case letters?
  """
POSTSCRIPT_5 = """
  The mysteries of space and time are mysterious.
  P. S. Sometimes there are even spaces between P. and S..
  """
KEYWORDS_1 = """
  Paris is a city of beauty and romance. The romantic river Seine winds its way
  through the city, past iconic landmarks like the Eiffel Tower and the Louvre
  Museum, where the Mona Lisa resides. Whether you're taking a boat cruise down
  the river or simply strolling along the banks, you're sure to be captivated
  by the city's charm."""
KEYWORDS_2 = """
  Paris is a city of beauty, romance, and history. It is home to some of the
  most iconic landmarks in the world, including the Eiffel Tower, the Louvre
  Museum, and the Notre Dame Cathedral. The city is also known for its romantic
  river cruises, its delicious food, and its stylish people.
  """
FORBIDDEN_1 = """
  The Nazis came to power in 1933 through a combination of legal and illegal
  means. Hitler was appointed chancellor by President Paul von Hindenburg, and
  the Nazis quickly consolidated their power by passing a series of laws that
  restricted the rights of opposition parties and individuals. By 1934, Hitler
  had become dictator of Germany.
  """
FORBIDDEN_3 = """
  GPT, or Generative Pre-trained Transformer, is a family of neural network
  models that uses the transformer architecture. GPT models are trained on a
  massive dataset of text and code, and can be used for a variety of tasks,
  including text generation, translation, and question answering. GPT models
  have been shown to be very effective at these tasks, and are being used by
  a variety of companies and organizations like Google.
  """
FIRST_WORD = ["""
  paragraph 1

  I paragraph 2

  paragraph 3""", """
  paragraph 1

  I paragraph 2""", """
  paragraph 1

  fail paragraph 2

  paragraph 3""", """
  Wow this is a very long response.

  I can't believe there is more than three paragraphs.

  Really more than three? No way!

  I can't believe it but I guess I am living proof.

  Haha, you go that right.""", """
  Wow this is a very long response.

  I can't believe there is more than three paragraphs.

  "Really?! more than three? No way!"

  I can't believe it but I guess I am living proof.

  Haha, you go that right.""", """
  Wow this is a very long response.

  I can't believe there is more than three paragraphs.

  Rea!lly more than three? No way!

  I can't believe it but I guess I am living proof.

  Haha, you go that right."""]
TWO_RESPONSES = ["\n  This is response 1.\n  ******\n  This is response 2.\n  ",
                 "\n  This is response 1.\n  ******\n  This is response 1.\n  ",
                 "\n  This is response 1.\n  ******\n  This is response 2.\n  ******\n  This is response 3.\n  ",
                 "\n  ******\n  Response 1.\n  ******\n  ******\n  Response 2.\n  ******\n  ",
                 "\n  ******\n  Response 1\n  ******\n  Response 2\n  ******\n  "]

IFEVAL_EXAMPLES = [
    # (instruction id, keywords, response, followed)
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 4}, "xx,x. xx,x! xx/x. x{x}x?", False),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 5}, "xxxx. xx,x! xxxx. x(x)x?", True),
    ("length_constraints:number_sentences", {"relation": "at least", "num_sentences": 4}, "xxxx. xx,x! xx|x. x&x x?", True),
    ("length_constraints:number_sentences", {"relation": "at least", "num_sentences": 5}, "xx-x. xx,x! xx}x. x,xx?", False),
    ("detectable_content:number_placeholders", {"num_placeholders": 5},
     "Sure, here is a short template with 5 placeholders:\n[Name]\n[Email]\n[Phone]\n[Address]\n[Website]\n"
     "This template can be used for a variety of purposes, such ascreating a contact list, sending out surveys, "
     "or creating a sign-up form.", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 7},
     "My [adjective] [noun] is [adjective] [noun]. I [verb] and [verb].", False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, BULLETS_1, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, BULLETS_2, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, BULLETS_4, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 1}, BULLETS_5, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, BULLETS_4, False),
    ("detectable_format:constrained_response", {}, "\n My answer is no.\n", True),
    ("detectable_format:constrained_response", {}, "My answer is no.   ", True),
    ("detectable_format:constrained_response", {}, "My answer: no.", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, HIGHLIGHTS_1, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, HIGHLIGHTS_2, False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 4}, HIGHLIGHTS_3, True),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 3}, SECTIONS_1, False),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2}, SECTIONS_2, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, PARAGRAPHS[0], True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, PARAGRAPHS[1], True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, PARAGRAPHS[2], True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, PARAGRAPHS[3], False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, POSTSCRIPT_1, True),
    ("detectable_content:postscript", {"postscript_marker": "PS:"}, POSTSCRIPT_1, False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, POSTSCRIPT_2, True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, POSTSCRIPT_3, True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, POSTSCRIPT_4, True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, POSTSCRIPT_5, True),
    ("keywords:existence", {"keywords": ["romantic", "river", "Mona Lisa"]}, KEYWORDS_1, True),
    ("keywords:existence", {"keywords": ["romantic", "river", "Mona Lisa"]}, KEYWORDS_2, False),
    ("keywords:frequency", {"keyword": "  keyword ", "frequency": 4, "relation": "less than"},
     "\n  keyword, Keyword, KEYWORD\n  ", True),
    ("keywords:frequency", {"keyword": "  keyword ", "frequency": 3, "relation": "at least"},
     "\n  keyword, Keyword, KEYWORD\n  ", True),
    ("keywords:frequency", {"keyword": "KEYWORD", "frequency": 4, "relation": "at least"},
     "\n    *keyword\n    *Keyword\n    *KEYWORD\n  ", False),
    ("length_constraints:number_words", {"num_words": 8, "relation": "less than"},
     "\n  d3sCRi7 lArge lAnguagE M0del w1tH 20 w0RdS.", True),
    ("length_constraints:number_words", {"num_words": 16, "relation": "less than"},
     "\n  L4RGE L4NGU4GE M0DEL: AI syst3m th4t und3rstands, g3n3r4tes, or tr4nsforms\n  l4ngu4g3 b4s3d on pr3vious "
     "l3arning & d4t4.", False),
    ("length_constraints:number_words", {"num_words": 16, "relation": "at least"},
     "\n  L4RGE L4NGU4GE M0DEL: AI syst3m th4t und3rstands, g3n3r4tes, or tr4nsforms\n  l4ngu4g3 b4s3d on pr3vious "
     "l3arning & d4t4.", True),
    *[("length_constraints:nth_paragraph_first_word", kw, FIRST_WORD[i], ok) for i, kw, ok in [
        (0, {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "I"}, True),
        (1, {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "I"}, False),
        (2, {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "I"}, False),
        (3, {"num_paragraphs": 5, "nth_paragraph": 5, "first_word": "haha"}, True),
        (4, {"num_paragraphs": 5, "nth_paragraph": 3, "first_word": "Really"}, True),
        (5, {"num_paragraphs": 5, "nth_paragraph": 3, "first_word": "Really"}, False)]],
    ("keywords:forbidden_words", {"forbidden_words": ["HOUSE", "POWER", "BECOME"]}, FORBIDDEN_1, False),
    ("keywords:forbidden_words", {"forbidden_words": ["HOUSE", "POWER", "BECOME"]}, FORBIDDEN_3, True),
    ("keywords:forbidden_words", {"forbidden_words": ["GOOGLE", "TEXT"]}, FORBIDDEN_1, True),
    ("keywords:forbidden_words", {"forbidden_words": ["GOOGLE", "TEXT"]}, FORBIDDEN_3, False),
    ("keywords:forbidden_words", {"forbidden_words": ["GENE", "TRANSFORM"]}, FORBIDDEN_3, True),
    *[("combination:two_responses", {}, text, ok) for text, ok in zip(TWO_RESPONSES, [True, False, False, False, True])],
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a CL description."},
     "Write a CL description. Hi, Le and TJ, please\n  check this out. Thanks.\n  ", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a CL description."},
     "Hi, Le and TJ. Write a CL description. Thanks.\n  ", False),
    ("startend:end_checker", {"end_phrase": "\n  Any more questions?\n  "},
     "\n  The answer is 7. Any more questions?\n  ", True),
    ("startend:end_checker", {"end_phrase": "\n  This is the end.\n  "},
     "\n  At the end of this prompt I am required to say that this is the end.\n  ", True),
    ("startend:end_checker", {"end_phrase": "\n  This will fail.\n  "}, "\n  This will fail. Paris is cool.\n  ", False),
    ("detectable_format:title", {}, "\n  <<Song of Joy>>\n  La la la. Happy song.\n  ", True),
    ("detectable_format:title", {}, "\n  Is it fine for title to be at the end?\n  <<This is the title>>\n  ", True),
    ("detectable_format:title", {}, "\n  << >>\n  There is no title.\n  ", False),
    ("detectable_format:title", {}, "\n  <<This is not a title.\n  This is a paragraph.>>\n  ", False),
    ("keywords:letter_frequency", {"letter": "T", "let_frequency": 4, "let_relation": "at least"},
     "\n  There is the T. Four T's.\n  ", True),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 4, "let_relation": "less than"},
     "\n  asdfghjkl!!aA\n  ", True),
    ("keywords:letter_frequency", {"letter": "p", "let_frequency": 4, "let_relation": "at least"},
     "\n  asdfghjkl!!aA\n  ", False),
    ("change_case:english_capital", {}, "\n  THIS IS AN ENGLISH SENTENCE. EVERY LETTER IS CAPITALIZED!!! AMAZING.\n  ", True),
    ("change_case:english_capital", {}, "\n  Every Word Is Capitalized.\n  ", False),
    ("change_case:english_lowercase", {}, "\n  every letter is lowercase.\n  ", True),
    ("change_case:english_lowercase", {}, "\n  Almost every letter is lowercase.\n  ", False),
    ("punctuation:no_comma", {}, "\n  Every sentence is short. There is no need for a comma.\n  ", True),
    ("punctuation:no_comma", {}, "\n  Since the start of time, people have always found a way to punctuate.\n  ", False),
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "at least"},
     "\n  HERE there are THREE FUlly CAPITAL words.\n  ", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 5, "capital_relation": "less than"},
     "\n  THERE are Four FULLY CAPITAL WORDS. Many Others Are Only Partially So.\n  ", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 4, "capital_relation": "less than"},
     "\n  THERE are Four FULLY CAPITAL WORDS. Many Others Are Only Partially So.\n  ", False),
    ("startend:quotation", {}, '\n  "This entire message is wrapped in double quotation marks."\n  ', True),
    ("startend:quotation", {}, '\n  "This message is wrapped in double quotation marks." But not everything.\n  ', False),
    ("language:response_language", {"language": "en"}, "The response is English", True),
    ("language:response_language", {"language": "es"}, "Desayunamos en McDonald's hoy", True),
    ("language:response_language", {"language": "en"}, "Today we visit the Louvre", True),
    ("language:response_language", {"language": "en"}, "Desayunamos en McDonald's hoy", False),
    # JSON (IFEval's rule: the whole response, optionally in a ``` fence, parses as JSON)
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', True),
    ("detectable_format:json_format", {}, 'Here it is: {"a": 1}', False),
]


@pytest.mark.parametrize("instruction,kwargs,response,followed", IFEVAL_EXAMPLES,
                         ids=[f"{e[0]}-{i}" for i, e in enumerate(IFEVAL_EXAMPLES)])
def test_ifeval_checks_on_the_published_examples(instruction, kwargs, response, followed):
    assert ifeval.follows(instruction, response, **kwargs) is followed


def test_every_ifeval_instruction_has_a_published_example():
    assert {e[0] for e in IFEVAL_EXAMPLES} == set(ifeval.INSTRUCTIONS)


def test_sentences_keep_abbreviations_and_decimals_whole():
    assert ifeval.count_sentences("Dr. Smith paid 3.50 dollars. Then he left! Did he? Yes.") == 4


def judge(items, low=0.0, high=5.0):
    return VerifierJudge(low, high).judge(items).judgements


def item(response, metadata, verifier=None, k=3, prompt="What is 2 + 2?"):
    return JudgeItem(prompt, response, tuple(range(k)), prompt, verifier=verifier or verifiers.named(metadata),
                     metadata=metadata)


def test_ifeval_scores_low_plus_range_times_the_share_followed_in_the_references_shape():
    args = {"instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words",
                                    "detectable_format:title"],
            "instruction_kwargs": [None, {"num_words": 5, "relation": "less than"}, None]}
    # The reference's data has no "verifier" key: verifier_args with an instruction_id_list means ifeval.
    assert verifiers.named({"verifier_args": args}) == "ifeval"
    [none_followed] = judge([item("No commas here at all, sorry", {"verifier_args": args})], low=1.0, high=10.0)
    # commas: no; fewer than 5 words: no ("No commas here at all sorry" has 6); title: no -> 0 of 3
    assert none_followed.scores == [1.0] * 3
    [j] = judge([item("<<Title>> short", {"verifier_args": args})], low=1.0, high=10.0)
    assert j.scores == [1.0 + 9.0 * 3 / 3] * 3
    [j] = judge([item("<<Title>>, short", {"verifier_args": args})], low=1.0, high=10.0)
    assert j.scores == pytest.approx([1.0 + 9.0 * 2 / 3] * 3)
    assert j.verifier == "ifeval" and j.weight_version == FIXED and "not: punctuation:no_comma" in j.texts[0]


def test_ifeval_takes_ifevals_own_kwargs_with_nulls_and_an_empty_response_follows_nothing():
    args = {"instruction_id_list": ["startend:quotation", "keywords:existence"],
            "kwargs": [{"keywords": None, "num_words": None}, {"keywords": ["pear"], "relation": None}]}
    verifiers.check_metadata({"verifier_args": args})
    [j] = judge([item('"a pear"', {"verifier_args": args})])
    assert j.scores == [5.0] * 3
    [j] = judge([item("   ", {"verifier_args": {"instruction_id_list": ["punctuation:no_comma"]}})])
    assert j.scores == [0.0] * 3


@pytest.mark.parametrize("metadata,message", [
    ({"verifier": "maths"}, r"metadata verifier='maths' is not one of: math, ifeval, toy"),
    ({"verifier": 3}, r"metadata verifier=3 is not one of"),
    ({"verifier": "math"}, r"verifier 'math' needs verifier_args: \{\"answer\""),
    ({"verifier": "math", "verifier_args": {"answer": ["1"]}}, r"verifier_args.answer=\['1'\] must be"),
    ({"verifier": "toy", "answer": "7"}, r"verifier 'toy' needs the integer sum"),
    ({"verifier": "ifeval", "verifier_args": {"instruction_id_list": ["startend:rhyme"]}},
     r"instruction_id_list\[0\]='startend:rhyme' is not an instruction"),
    ({"verifier": "ifeval", "verifier_args": {"instruction_id_list": ["length_constraints:number_words"],
                                              "instruction_kwargs": [{"num_words": 5}]}},
     r"instruction_kwargs\[0\] for 'length_constraints:number_words': missing relation"),
    ({"verifier": "ifeval", "verifier_args": {"instruction_id_list": ["punctuation:no_comma"],
                                              "instruction_kwargs": [{"comma": 1}]}},
     r"unknown comma"),
    ({"verifier": "ifeval", "verifier_args": {"instruction_id_list": ["length_constraints:number_words"],
                                              "kwargs": [{"num_words": -1, "relation": "at least"}]}},
     r"kwargs\[0\].num_words=-1 for 'length_constraints:number_words' must be an integer >= 0"),
    ({"verifier": "ifeval", "verifier_args": {"instruction_id_list": ["punctuation:no_comma"],
                                              "kwargs": [None, None]}},
     r"verifier_args.kwargs must be a list with one entry .* per instruction \(1\)"),
])
def test_a_bad_verifier_or_its_args_names_the_key_and_the_value(metadata, message):
    with pytest.raises(ValueError, match=message):
        verifiers.check_metadata(metadata)


def test_no_verifier_named_is_not_an_error_and_null_means_none():
    for metadata in ({}, {"verifier": None, "verifier_args": {"kind": "math"}}, {"verifier_args": {"answers": [4]}}):
        verifiers.check_metadata(metadata)
        assert verifiers.named(metadata) is None


def test_the_data_layer_reports_a_bad_verifier_with_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    good = '{"messages": [{"role": "user", "content": "2+2?"}], "verifier": "math", "verifier_args": {"answer": "4"}}'
    bad = '{"messages": [{"role": "user", "content": "2+2?"}], "verifier": "calculator"}'
    path.write_text(good + "\n" + bad + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: metadata verifier='calculator' is not one of"):
        JsonlDataset(path)
    assert len(JsonlDataset(path, on_bad_line="skip")) == 1
    assert parse_line(good, path="f", line=1).metadata["verifier_args"] == {"answer": "4"}


# ---- math: examples from math-verify's README and tests/test_all.py ----------------------------------------------

MATH_EXAMPLES = [
    ("${1,3} \\cup {2,4}$", "${1,2,3,4}$", True),  # README
    ("-5", "-5", True),
    ("7425000", "7,425,000", True),
    ("1000", "1000.0", True),
    ("0.4", ".4", True),
    ("1000.99", "the number is not 10 which is 1,000.99€", True),
    ("2", "AZYUK2A", False),
    ("10/9", "\\frac{10}{9}", True),
    ("-10/9", "-\\frac{10}{9}", True),
    ("$[0,9)$", "$[0,1)$", False),
    ("$9$", "Answer \\[ 9 \\]", True),
    ("$10$", "Answer \\( (9+1) \\)", True),
    ("$1/3$", "$\\frac13 $", True),
    # bare LaTeX gold answers (wrapped in $...$ by the verifier) and a boxed final answer
    ("\\frac{1}{2}", "So the answer is $\\boxed{0.5}$.", True),
    ("\\frac{1}{2}", "So the answer is $\\boxed{0.25}$.", False),
]


@pytest.mark.parametrize("gold,response,correct", MATH_EXAMPLES)
def test_math_answers_on_math_verifys_examples(gold, response, correct):
    [j] = judge([item(response, {"verifier": "math", "verifier_args": {"answer": gold}})])
    assert j.scores == [5.0 if correct else 0.0] * 3 and j.verifier == "math"


def test_math_no_answer_fails_and_an_unparsable_gold_leaves_it_undecided():
    [j] = judge([item("I do not know.", {"verifier": "math", "verifier_args": {"answer": "12"}})])
    assert j.scores == [0.0] * 3
    [j] = judge([item("12", {"verifier": "math", "verifier_args": {"answer": "\\"}})])
    assert j.scores == [None] * 3 and "could not be parsed" in j.texts[0]


def test_math_is_bounded_by_math_verifys_timeout_also_off_the_main_thread(monkeypatch):
    """SymPy would spend minutes on 2^(10^100); math-verify's signal timeouts stop it, and in a worker thread
    (a Ray actor's call) the runner moves the work to a child process's main thread, where they work."""
    monkeypatch.setattr(math_answers, "TIMEOUT_S", 1)
    work = [("math", Sample("q", "it is $2^{10^{100}}$", {"verifier_args": {"answer": "5"}})),
            ("math", Sample("q", "it is $\\frac{1}{2}$", {"verifier_args": {"answer": "0.5"}}))]
    runner, got = VerifierRunner(), {}
    assert [v.share for v in runner.run(work)] == [0.0, 1.0]  # main thread: in this process
    thread = threading.Thread(target=lambda: got.update(shares=[v.share for v in runner.run(work)]))
    thread.start()
    thread.join(timeout=120)  # the child imports math-verify first (a few seconds); its own timeout is 5 s
    runner.close()
    assert got["shares"] == [0.0, 1.0]


# ---- toy, and the verifier judge ----------------------------------------------------------------------------------


def test_toy_exact_answer_from_the_toy_rows_metadata():
    metadata = {"task": "add", "operands": [2, 2], "answer": 4, "verifier": "toy"}
    right, wrong, padded = judge([item("4", metadata), item("5", metadata), item(" 4\n", metadata)])
    assert right.scores == [5.0] * 3 and wrong.scores == [0.0] * 3 and padded.scores == [5.0] * 3
    [j] = judge([item("9", {**metadata, "verifier_args": {"answer": 9}})])
    assert j.scores == [5.0] * 3


def test_the_verifier_judge_gives_k_equal_scores_no_tokens_and_none_for_unnamed_samples():
    named = item("4", {"answer": 4, "verifier": "toy"}, k=2)
    unnamed = JudgeItem("What is 2 + 2?", "4", (1, 2, 3), "What is 2 + 2?")
    batch = VerifierJudge(0.0, 5.0).judge([named, unnamed])
    a, b = batch.judgements
    assert batch.generated_tokens == 0 and a.token_ids == [[], []] and a.scores == [5.0, 5.0]
    assert b.scores == [None] * 3 and b.verifier == verifiers.NO_VERIFIER and b.texts[0] == NOT_NAMED
    with pytest.raises(ValueError, match="cannot meta-judge"):
        VerifierJudge(0.0, 5.0).meta_judge([])
