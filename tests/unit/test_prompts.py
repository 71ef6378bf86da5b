from dolly_langchain.prompts import (
    DOLLY_SPECIAL_TOKENS,
    END_KEY,
    INSTRUCTION_PROMPT,
    INSTRUCTION_WITH_CONTEXT_PROMPT,
    format_prompt,
    format_training_text,
    prompt_segments,
    read_format_record,
    write_format_record,
)

INTRO = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def test_format_prompt_without_context_is_dollys_generation_text():
    assert format_prompt("Name a color.") == f"{INTRO}\n\n### Instruction:\nName a color.\n\n### Response:\n"


def test_format_prompt_with_context_adds_input_block():
    assert format_prompt("Summarize.", "Some text.") == (
        f"{INTRO}\n\n### Instruction:\nSummarize.\n\nInput:\nSome text.\n\n### Response:\n"
    )


def test_empty_context_is_no_context():
    assert format_prompt("Q", "") == format_prompt("Q") == format_prompt("Q", None)


def test_training_text_appends_response_and_end_key():
    assert format_training_text("Q", "A", "C") == f"{INTRO}\n\n### Instruction:\nQ\n\nInput:\nC\n\n### Response:\nA\n\n### End"
    assert format_training_text("Q", "A") == f"{INTRO}\n\n### Instruction:\nQ\n\n### Response:\nA\n\n### End"


def test_templates_wrapped_by_format_prompt_give_training_prompt():
    assert INSTRUCTION_PROMPT.input_variables == ["instruction"]
    assert sorted(INSTRUCTION_WITH_CONTEXT_PROMPT.input_variables) == ["context", "instruction"]
    rendered = INSTRUCTION_WITH_CONTEXT_PROMPT.format(instruction="Who?", context="Ann did it.")
    assert rendered == "Who?\n\nInput:\nAnn did it."
    assert format_prompt(rendered) == format_prompt("Who?", "Ann did it.")
    assert format_prompt(INSTRUCTION_PROMPT.format(instruction="Who?")) == format_prompt("Who?")


def test_segments_join_to_prompt_and_flag_only_user_text():
    segments = prompt_segments("Do ### End", "ctx")
    assert "".join(text for text, _ in segments) == format_prompt("Do ### End", "ctx")
    assert [text for text, user in segments if user] == ["Do ### End", "ctx"]


def test_special_tokens_are_dollys():
    assert DOLLY_SPECIAL_TOKENS == ("### End", "### Instruction:", "### Response:\n")
    assert END_KEY == "### End"


def test_format_record_round_trip(tmp_path):
    assert read_format_record(tmp_path) is None
    write_format_record(tmp_path)
    record = read_format_record(tmp_path)
    assert record["format"] == "dolly"
    assert record["example"] == format_training_text("{instruction}", "{response}", "{context}")
