"""Moved to :mod:`dolly_langchain.evaluation.harness`; this old path re-exports it."""

from __future__ import annotations

from dolly_langchain.evaluation.harness import (
    CACHE_VERSION,
    TASK_DIRS,
    build_task,
    cache_root,
    cached_score,
    data_digest,
    evaluate_task,
    make_lm,
    model_fingerprint,
    sample_indices,
    sample_label,
    task_config,
    task_manager,
)

__all__ = ["CACHE_VERSION", "TASK_DIRS", "build_task", "cache_root", "cached_score", "data_digest", "evaluate_task",
           "make_lm", "model_fingerprint", "sample_indices", "sample_label", "task_config", "task_manager"]
