"""Moved: ``dolly-eval`` is :mod:`dolly_langchain.evaluation` (``dolly eval``); this old path re-exports it.

``python -m finetune.evaluate ARGS`` still runs ``dolly-eval ARGS``.
"""

from __future__ import annotations

from dolly_langchain.evaluation.cli import build_parser, main, parse_args
from dolly_langchain.evaluation.runner import (
    DEFAULT_GENERATION_SAMPLES,
    DEFAULT_OUTPUT,
    EvalError,
    after_training,
    run,
    run_card,
    run_generation,
)

__all__ = [
    "DEFAULT_GENERATION_SAMPLES",
    "DEFAULT_OUTPUT",
    "EvalError",
    "after_training",
    "build_parser",
    "main",
    "parse_args",
    "run",
    "run_card",
    "run_generation",
]

if __name__ == "__main__":
    raise SystemExit(main())
