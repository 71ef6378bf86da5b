"""Dolly's prompt format: the one source of truth for training and inference.

Dolly v1/v2 were trained on text of exactly this shape (``training/consts.py`` in databricks/dolly)::

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    Input:
    {context}

    ### Response:
    {response}

    ### End

The ``Input:`` block is present only when the record has context. At inference the model is given everything
up to and including ``### Response:\\n`` (:func:`format_prompt`) and is expected to stop at ``### End``.

``finetune`` builds its training text with :func:`format_training_text` and records the format next to every
checkpoint (:func:`write_format_record`), so :mod:`dolly_langchain.pipeline` can tell that a directory holds a
model trained on this format.
"""

from __future__ import annotations

import json
from pathlib import Path

INTRO_BLURB = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
INSTRUCTION_KEY = "### Instruction:"
INPUT_KEY = "Input:"
RESPONSE_KEY = "### Response:"
END_KEY = "### End"
RESPONSE_KEY_NL = f"{RESPONSE_KEY}\n"

#: Strings Dolly's training turns into special tokens (``Input:`` stays plain text, as in Dolly).
DOLLY_SPECIAL_TOKENS = (END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL)

#: Name of the prompt-format record ``finetune`` writes next to each checkpoint.
FORMAT_RECORD_FILE = "dolly_prompt_format.json"
FORMAT_NAME = "dolly"

# LangChain templates, INSTRUCTION_PROMPT and INSTRUCTION_WITH_CONTEXT_PROMPT, are built on first access (below), so
# importing this module does not import LangChain (half a second). Rendering one and passing the result through
# format_prompt() gives Dolly's training text, because format_prompt(f"{i}\n\nInput:\n{c}") == format_prompt(i, c);
# instruction_text() renders the same text without LangChain.
_TEMPLATES = {
    "INSTRUCTION_PROMPT": (["instruction"], "{instruction}"),
    "INSTRUCTION_WITH_CONTEXT_PROMPT": (["instruction", "context"], f"{{instruction}}\n\n{INPUT_KEY}\n{{context}}"),
}


def __getattr__(name: str):
    if name in _TEMPLATES:
        from langchain_core.prompts import PromptTemplate

        variables, template = _TEMPLATES[name]
        value = globals()[name] = PromptTemplate(input_variables=variables, template=template)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def instruction_text(instruction: str, context: str | None = None) -> str:
    """What INSTRUCTION_PROMPT (no ``context``) or INSTRUCTION_WITH_CONTEXT_PROMPT renders, without LangChain."""
    if context:
        return _TEMPLATES["INSTRUCTION_WITH_CONTEXT_PROMPT"][1].format(instruction=instruction, context=context)
    return instruction


def format_prompt(instruction: str, context: str | None = None) -> str:
    """Return the generation prompt Dolly was trained on, ending with ``### Response:\\n``.

    ``context`` adds the ``Input:`` block; ``None`` or an empty string leaves it out, as Dolly's training did
    for records without context.
    """
    text = f"{INTRO_BLURB}\n\n{INSTRUCTION_KEY}\n{instruction}"
    if context:
        text += f"\n\n{INPUT_KEY}\n{context}"
    return f"{text}\n\n{RESPONSE_KEY_NL}"


def format_training_text(instruction: str, response: str, context: str | None = None) -> str:
    """Return one full training example: :func:`format_prompt` + response + ``\\n\\n### End``."""
    return f"{format_prompt(instruction, context)}{response}\n\n{END_KEY}"


def prompt_segments(instruction: str, context: str | None = None) -> list[tuple[str, bool]]:
    """Split :func:`format_prompt`'s text into ``(text, is_user_text)`` pieces.

    Joining the texts gives exactly ``format_prompt(instruction, context)``. Tokenizers use the flag to encode
    user text with special tokens split, so a user who writes ``### End`` gets plain text, not a control token.
    """
    segments = [(f"{INTRO_BLURB}\n\n{INSTRUCTION_KEY}\n", False), (instruction, True)]
    if context:
        segments += [(f"\n\n{INPUT_KEY}\n", False), (context, True)]
    segments.append((f"\n\n{RESPONSE_KEY_NL}", False))
    return segments


def write_format_record(output_dir: str | Path) -> Path:
    """Record, next to a checkpoint, that its model was trained on Dolly's format."""
    path = Path(output_dir) / FORMAT_RECORD_FILE
    record = {
        "format": FORMAT_NAME,
        "intro_blurb": INTRO_BLURB,
        "instruction_key": INSTRUCTION_KEY,
        "input_key": INPUT_KEY,
        "response_key": RESPONSE_KEY,
        "end_key": END_KEY,
        "example": format_training_text("{instruction}", "{response}", "{context}"),
    }
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def read_format_record(model_dir: str | Path) -> dict | None:
    """Return the format record saved next to a checkpoint, or None if the directory has none."""
    path = Path(model_dir) / FORMAT_RECORD_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
