"""The answer format: Gemma's chat template, the instruction, the `<reasoning>/<answer>` rewrite and its check.

Everything that says what a prompt and a completion look like, in one place and with no heavy import, so that
data preparation, the model's generation, evaluation, export and the notebook share it:

- the instruction and Gemma's own chat template (``build_prompt``; Gemma has no system role, so the
  instruction goes in the user turn), and ``END_OF_TURN``, the piece every completion ends with,
- the rewrite of a glaiveai ``<think>R</think> A`` response into ``<reasoning>R</reasoning>\\n<answer>A</answer>``
  (or the named reason it cannot be rewritten),
- ``check_format``: whether a generated completion has that form, else its first problem.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from typing import NamedTuple

import jinja2.sandbox

# Gemma has no system role, so this goes in the user turn before the question.
INSTRUCTION = ("Think step by step inside <reasoning></reasoning>, "
               "then give your final answer inside <answer></answer>.")

# chat_template of gemma-2-2b-it's tokenizer_config.json, verbatim.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

END_OF_TURN = "<end_of_turn>"

# Tags are matched whatever their case: to a reader <THINK> is a think tag.
THINK_OPEN_RE, THINK_CLOSE_RE = re.compile("<think>", re.IGNORECASE), re.compile("</think>", re.IGNORECASE)
FORBIDDEN_TAG_RE = re.compile(r"</?(?:think|reasoning|answer)>", re.IGNORECASE)
# Literal chat-template markers in a row's text would become real turn tokens: such rows are dropped.
TEMPLATE_MARKER_RE = re.compile(r"<(?:start_of_turn|end_of_turn|bos|eos|pad)>")


# ----------------------------------------------------------------------------- the prompt

def _raise_template_error(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


_JINJA = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
_JINJA.globals["raise_exception"] = _raise_template_error
_CHAT_TEMPLATE = _JINJA.from_string(GEMMA_CHAT_TEMPLATE)


# Stands for the question while the chat template is rendered around it: no template or instruction text has it.
_QUESTION_SLOT = "\x00question\x00"


def prompt_template() -> str:
    """The prompt as a ``str.format`` template with one ``{question}`` slot: the user turn (instruction, blank
    line, question) and the model-turn opener, as Gemma's chat template renders them around the slot, with every
    other brace escaped. The leading ``<bos>`` is left out: the tokenizer adds BOS as an id, never as text."""
    messages = [{"role": "user", "content": f"{INSTRUCTION}\n\n{_QUESTION_SLOT}"}]
    rendered = _CHAT_TEMPLATE.render(messages=messages, bos_token="", add_generation_prompt=True)
    return rendered.replace("{", "{{").replace("}", "}}").replace(_QUESTION_SLOT, "{question}")


# The notebook's PROMPT_TEMPLATE, which the hackathon's judges fill with their questions: training renders every
# row with it too, so a judged prompt is the very text the model was trained on.
PROMPT_TEMPLATE = prompt_template()


def build_prompt(prompt: str) -> str:
    """The prompt text of one question: ``PROMPT_TEMPLATE.format(question=prompt)``, the question as it is (its
    braces and whitespace kept: the judges' ``.format`` keeps them too)."""
    return PROMPT_TEMPLATE.format(question=prompt)


# ----------------------------------------------------------------------------- the rewrite (of training responses)

def is_blank(text: str) -> bool:
    """Nothing a reader sees: whitespace and invisible format characters (zero-width spaces, BOM, soft hyphen)."""
    return all(ch.isspace() or unicodedata.category(ch) == "Cf" for ch in text.strip())


def rewrite_with_reason(response: str) -> tuple[str | None, str]:
    """The rewritten completion and "", or None and the named reason the row is dropped for."""
    think_open = THINK_OPEN_RE.search(response)
    if not think_open:
        return None, "no_think"
    if not is_blank(response[:think_open.start()]):
        return None, "text_before_think"
    think_close = THINK_CLOSE_RE.search(response, think_open.end())
    if not think_close:
        return None, "unclosed_think"
    reasoning, answer = response[think_open.end():think_close.start()], response[think_close.end():]
    if THINK_OPEN_RE.search(answer):
        return None, "multiple_think"
    if FORBIDDEN_TAG_RE.search(reasoning) or FORBIDDEN_TAG_RE.search(answer):
        return None, "nested_tags"
    reasoning, answer = reasoning.strip(), answer.strip()
    if is_blank(reasoning):
        return None, "empty_reasoning"
    if is_blank(answer):
        return None, "empty_answer"
    return f"<reasoning>{reasoning}</reasoning>\n<answer>{answer}</answer>", ""


def rewrite_response(response: str) -> str | None:
    """``<reasoning>R</reasoning>\\n<answer>A</answer>`` from one ``<think>R</think>A`` response, else None."""
    return rewrite_with_reason(response)[0]


# ----------------------------------------------------------------------------- the format check (of generated outputs)

TAG_RE = re.compile(r"</?(?:reasoning|answer)>")


class FormatCheck(NamedTuple):
    """Whether a completion is well-formed; if not, the first problem found. Sections are stripped."""

    ok: bool
    reason: str | None
    reasoning: str | None
    answer: str | None


ANSWER_END = "</answer>"


def tokens_after_answer(tokens: list[int], decode: Callable[[list[int]], str]) -> int | None:
    """Generated tokens after the one that completes the first ``</answer>``, None if the output never closes it:
    how far generation ran on once the answer was over (0 where it stopped at ``<end_of_turn>``, which the
    output leaves out). Binary search over prefixes: about log2(len(tokens)) decodes."""
    if ANSWER_END not in decode(tokens):
        return None
    shortest, longest = 1, len(tokens)  # the shortest prefix whose text holds </answer>
    while shortest < longest:
        middle = (shortest + longest) // 2
        if ANSWER_END in decode(tokens[:middle]):
            longest = middle
        else:
            shortest = middle + 1
    return len(tokens) - shortest


def check_format(text: str, truncated: bool = False) -> FormatCheck:
    """Checks for exactly one non-empty ``<reasoning>`` section, then one non-empty ``<answer>``, and nothing else.

    ``truncated`` says generation hit the token limit before ``<end_of_turn>``: such an output
    fails as ``truncated`` whatever it holds, because the model never chose to stop. A trailing
    ``<end_of_turn>`` is ignored. Failure reasons, checked in this order: per section
    ``missing_*``, ``duplicate_tags``, ``unopened_*`` (closing tag only), ``unclosed_*``;
    then ``wrong_order`` (a closing tag before its opening tag, or the answer before the
    reasoning), ``nested_tags`` (overlapping sections), ``text_outside_tags``, ``empty_*``.
    """
    text = text.strip().removesuffix(END_OF_TURN)
    tags: dict[str, list[re.Match]] = {}
    for match in TAG_RE.finditer(text):
        tags.setdefault(match.group(), []).append(match)
    reasoning, answer = _section(text, tags, "reasoning"), _section(text, tags, "answer")
    reason = "truncated" if truncated else _first_problem(text, tags, reasoning, answer)
    return FormatCheck(reason is None, reason, reasoning, answer)


def _section(text: str, tags: dict[str, list[re.Match]], name: str) -> str | None:
    """The stripped text between the single opening and closing tag of ``name``, if they are in order."""
    opens, closes = tags.get(f"<{name}>", []), tags.get(f"</{name}>", [])
    if len(opens) != 1 or len(closes) != 1 or closes[0].start() < opens[0].end():
        return None
    return text[opens[0].end():closes[0].start()].strip()


def _first_problem(text: str, tags: dict[str, list[re.Match]], reasoning: str | None, answer: str | None
                   ) -> str | None:
    """The first failure reason of check_format's list, or None for a well-formed completion."""
    for name in ("reasoning", "answer"):
        opens, closes = tags.get(f"<{name}>", []), tags.get(f"</{name}>", [])
        if not opens and not closes:
            return f"missing_{name}"
        if len(opens) > 1 or len(closes) > 1:
            return "duplicate_tags"
        if not opens:
            return f"unopened_{name}"
        if not closes:
            return f"unclosed_{name}"
    r_open, r_close, a_open, a_close = (tags[t][0] for t in ("<reasoning>", "</reasoning>", "<answer>", "</answer>"))
    if r_close.start() < r_open.start() or a_close.start() < a_open.start() or a_close.start() < r_open.start():
        return "wrong_order"
    if a_open.start() < r_close.start():
        return "nested_tags"
    if (text[:r_open.start()] + text[r_close.end():a_open.start()] + text[a_close.end():]).strip():
        return "text_outside_tags"
    if not reasoning:
        return "empty_reasoning"
    if not answer:
        return "empty_answer"
    return None
