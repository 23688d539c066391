"""Prompt templates shared by training, calibration and inference (spec nlsr.md §2.2, §6.1).

One Alpaca template is used everywhere (DESIGN.md §6, "templates"): the strings below are byte-for-byte the
``P_input`` / ``P_noinput`` prompts of the reference code.
"""

from __future__ import annotations

PROMPT_INPUT: str = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
"""Alpaca prompt with an input field (spec nlsr.md §2.2, ``P_input``)."""

PROMPT_NO_INPUT: str = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
"""Alpaca prompt without an input field (spec nlsr.md §2.2, ``P_noinput``)."""

RESPONSE_MARKER: str = "### Response:"
"""The marker after which a generated response starts (spec nlsr.md §2.5, §6.1)."""

STOP_MARKER: str = "!!!"
"""Generated text is cut at the first occurrence of this string (spec nlsr.md §2.5, §6.1)."""


def alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - the field is called "input"
    """Format an Alpaca prompt: ``P_input`` if ``input != ""`` else ``P_noinput`` (spec nlsr.md §2.2, §2.4).

    ``str.format`` does not re-parse substituted values, so braces inside the instruction or input are kept.
    """
    if input != "":
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def extract_response(text: str) -> str:
    """Extract the model's answer from a decoded generation (spec nlsr.md §6.1, §2.5).

    Takes the text after the first ``"### Response:"`` and before a second one (if any), strips it, cuts it at
    the first ``"!!!"`` and strips again. If the text has no marker (e.g. only the completion was decoded), the
    whole text is treated as the response and the same strip/cut rules apply.
    """
    if RESPONSE_MARKER in text:
        text = text.split(RESPONSE_MARKER, 2)[1]
    text = text.strip()
    return text.split(STOP_MARKER, 1)[0].strip()


def response_complete(text: str) -> bool:
    """Whether :func:`extract_response` of ``text`` is final: no continuation of ``text`` changes it.

    True iff the text holds a second ``"### Response:"`` (the segment is closed), or one marker followed by a
    ``"!!!"`` (the cut is inside the segment). Generation may stop there without changing the response.
    """
    markers = text.count(RESPONSE_MARKER)
    return markers >= 2 or (markers == 1 and STOP_MARKER in text.split(RESPONSE_MARKER, 1)[1])


def moderation_text(prompt: str, response: str) -> str:
    """The beaver-dam moderation input (spec nlsr.md §6.1): no space between ``ASSISTANT:`` and the response."""
    return f"BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}"
