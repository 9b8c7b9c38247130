"""The answer format: Gemma's chat template as published, the rewrite of training responses, the format check."""

from __future__ import annotations

import json

import pytest

import chat_format
import config

# chat_template of gemma-2-2b-it's tokenizer_config.json, as published (JSON text): the reference that the prompt
# is rendered against, by transformers' own chat-template machinery rather than by our code.
PUBLISHED_GEMMA2_CHAT_TEMPLATE = json.loads(
    r'''"{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}'''
    r'''{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}'''
    r'''{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}'''
    r'''{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}'''
    r'''{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}'''
    r'''{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"'''
)


# ----------------------------------------------------------------------------- rewrite

@pytest.mark.parametrize("response, expected", [
    ("<think>\nR\n</think>\n\nA", "<reasoning>R</reasoning>\n<answer>A</answer>"),
    ("  \n<think> step 1\r\nstep 2 </think>  x  =  1\r\n",
     "<reasoning>step 1\r\nstep 2</reasoning>\n<answer>x  =  1</answer>"),
    ("<think>a < b</think>\n\n```\ncode\n```", "<reasoning>a < b</reasoning>\n<answer>```\ncode\n```</answer>"),
    ("\u200b<THINK>R</Think>A", "<reasoning>R</reasoning>\n<answer>A</answer>"),  # tags in any case
])
def test_rewrite_keeps_inner_text_byte_for_byte(response: str, expected: str) -> None:
    assert chat_format.rewrite_response(response) == expected


@pytest.mark.parametrize("response, reason", [
    ("just an answer", "no_think"),
    ("<think>never closed, answer", "unclosed_think"),
    ("<think>a</think>b<think>c</think>d", "multiple_think"),
    ("<think>a</think>b<think>c", "multiple_think"),
    ("Sure! <think>a</think>b", "text_before_think"),
    ("</think><think>a</think>b", "text_before_think"),
    ("<think>a</think>  \n ", "empty_answer"),
    ("<think> \n </think>b", "empty_reasoning"),
    ("<think>a<think>b</think>c", "nested_tags"),
    *[(f"<think>a {tag} b</think>answer", "nested_tags") for tag in ("<reasoning>", "</reasoning>", "<answer>",
                                                                      "</answer>")],
    *[(f"<think>a</think>answer {tag} b", "nested_tags") for tag in ("</think>", "<reasoning>", "</reasoning>",
                                                                      "<answer>", "</answer>")],
    # Tags count whatever their case, and text of only invisible characters is empty.
    ("Sure! <THINK>a</THINK>b", "text_before_think"),
    ("<Think>a</think>b<THINK>c</THINK>d", "multiple_think"),
    ("<think>a</think>answer </ANSWER>", "nested_tags"),
    ("<think>a <Reasoning> b</think>answer", "nested_tags"),
    ("<think>a</think> \u200b\u200b \ufeff\u2060", "empty_answer"),
    ("<think>\u200c\u00ad</think>b", "empty_reasoning"),
])
def test_rewrite_drops_with_named_reason(response: str, reason: str) -> None:
    assert chat_format.rewrite_with_reason(response) == (None, reason)
    assert chat_format.rewrite_response(response) is None


# ----------------------------------------------------------------------------- prompt

def test_prompt_is_the_published_gemma_template_as_transformers_renders_it() -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.GemmaTokenizer(vocab_file=str(config.TINY_TOKENIZER_PATH))
    question = "  Why is the sky blue?\nExplain briefly."  # Gemma's template would strip trailing whitespace
    messages = [{"role": "user", "content": f"{chat_format.INSTRUCTION}\n\n{question}"}]
    rendered = tokenizer.apply_chat_template(messages, chat_template=PUBLISHED_GEMMA2_CHAT_TEMPLATE, tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == tokenizer.bos_token + chat_format.build_prompt(question)
    assert chat_format.build_prompt(question) == (
        f"<start_of_turn>user\n{chat_format.INSTRUCTION}\n\n  Why is the sky blue?\nExplain briefly.<end_of_turn>\n"
        "<start_of_turn>model\n")
    assert "<reasoning>" in chat_format.INSTRUCTION and "<answer>" in chat_format.INSTRUCTION
    # the template export writes into tokenizer_config.json is the published one
    assert chat_format.GEMMA_CHAT_TEMPLATE == PUBLISHED_GEMMA2_CHAT_TEMPLATE


# ----------------------------------------------------------------------------- the format check

GOOD = "<reasoning>Two and two make four.</reasoning>\n<answer>4</answer>"


def test_well_formed_output_parses_into_stripped_sections():
    check = chat_format.check_format(f"  \n{GOOD}\n<end_of_turn>")
    assert check == (True, None, "Two and two make four.", "4")


@pytest.mark.parametrize("text, reason", [
    ("<answer>4</answer>", "missing_reasoning"),
    ("<reasoning>think</reasoning>", "missing_answer"),
    ("<reasoning>think", "unclosed_reasoning"),
    ("<reasoning>think</reasoning><answer>4", "unclosed_answer"),
    ("think</reasoning><answer>4</answer>", "unopened_reasoning"),
    ("<reasoning>think</reasoning>4</answer>", "unopened_answer"),
    ("<reasoning> \n</reasoning><answer>4</answer>", "empty_reasoning"),
    ("<reasoning>think</reasoning><answer> </answer>", "empty_answer"),
    ("Sure! " + GOOD, "text_outside_tags"),
    ("<reasoning>think</reasoning> so <answer>4</answer>", "text_outside_tags"),
    (GOOD + " Hope this helps.", "text_outside_tags"),
    ("<reasoning>think <answer>4</answer></reasoning>", "nested_tags"),
    ("<answer>a <reasoning>think</reasoning></answer>", "nested_tags"),
    ("<reasoning>a<answer>b</reasoning>c</answer>", "nested_tags"),
    ("<reasoning>a</reasoning><reasoning>b</reasoning><answer>4</answer>", "duplicate_tags"),
    (GOOD + "<answer>5</answer>", "duplicate_tags"),
    ("<answer>4</answer><reasoning>think</reasoning>", "wrong_order"),
    ("</reasoning>think<reasoning><answer>4</answer>", "wrong_order"),
])
def test_malformed_output_names_its_problem(text, reason):
    check = chat_format.check_format(text)
    assert (check.ok, check.reason) == (False, reason)


def test_truncated_output_fails_as_truncated_but_keeps_what_parsed():
    check = chat_format.check_format(GOOD, truncated=True)
    assert (check.ok, check.reason, check.answer) == (False, "truncated", "4")
    assert chat_format.check_format("<reasoning>and then", truncated=True).reason == "truncated"


def test_tokens_after_answer_counts_what_generation_ran_on_with() -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(config.TINY_TOKENIZER_PATH))
    answer = sp.encode(GOOD)
    tail = sp.encode("<end_of_turn>\n<start_of_turn>user\nmore")
    assert chat_format.tokens_after_answer(answer, sp.decode) == 0
    assert chat_format.tokens_after_answer(answer + tail, sp.decode) == len(tail)
    assert chat_format.tokens_after_answer(answer[:-1] + tail, sp.decode) is None  # </answer> never completed
    assert chat_format.tokens_after_answer([], sp.decode) is None
