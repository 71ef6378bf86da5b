"""Moved to :mod:`dolly_langchain.evaluation.taskdata`; this old path re-exports it."""

from __future__ import annotations

from dolly_langchain.evaluation.taskdata import (
    CONVERTERS,
    EVAL_SPLITS,
    HELLASWAG_FIELDS,
    SOURCES,
    TASK_FILES,
    MissingTaskFile,
    TaskDataError,
    arc,
    boolq,
    hellaswag,
    load_docs,
    openbookqa,
    piqa,
    task_paths,
    winogrande,
)

__all__ = ["CONVERTERS", "EVAL_SPLITS", "HELLASWAG_FIELDS", "SOURCES", "TASK_FILES", "MissingTaskFile",
           "TaskDataError", "arc", "boolq", "hellaswag", "load_docs", "openbookqa", "piqa", "task_paths", "winogrande"]
