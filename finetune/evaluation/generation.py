"""Moved to :mod:`dolly_langchain.evaluation.generation`; this old path re-exports it."""

from __future__ import annotations

from dolly_langchain.evaluation.generation import (
    SPLIT_RECORD_FILE,
    Answer,
    GenerationEvalError,
    ModelGenerations,
    find_run_dir,
    format_side_by_side,
    format_summary,
    generate_answers,
    heldout_records,
    record_split,
    rouge_l,
    sample_records,
    score_model,
    summarize,
)

__all__ = ["SPLIT_RECORD_FILE", "Answer", "GenerationEvalError", "ModelGenerations", "find_run_dir",
           "format_side_by_side", "format_summary", "generate_answers", "heldout_records", "record_split", "rouge_l",
           "sample_records", "score_model", "summarize"]
