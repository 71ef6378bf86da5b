"""Evaluation, a room of its own next to inference and training: ``dolly eval`` (alias ``dolly-eval``).

It scores any model (a hub id, a local directory, a ``dolly finetune`` run directory, or the embedded one) on the
Dolly model card's lm-eval table and on held-out dolly-15k instructions. Its parts, in the order they run:

- :mod:`dolly_langchain.evaluation.cli`: the command line (``dolly eval``/``dolly-eval`` flags, ``--help``).
- :mod:`dolly_langchain.evaluation.runner`: :func:`evaluate`, the one function the command line and
  ``dolly finetune --eval-after`` (:func:`after_training`) call; ``results.json``.
- :mod:`dolly_langchain.evaluation.taskdata`: the card's evaluation sets from their authors' original files,
  converted to the rows of the hub datasets lm-eval loads.
- :mod:`dolly_langchain.evaluation.harness`: lm-evaluation-harness with its official task definitions on those rows,
  seeded samples, the model fingerprint and the cache.
- :mod:`dolly_langchain.evaluation.card`: the card's tasks, metrics and published rows; the table, ``results.json``
  rows and the chart.
- :mod:`dolly_langchain.evaluation.generation`: instruction following on held-out dolly-15k through ``DollyLLM``
  (ROUGE-L, answers that ended by themselves, length, per category) and the held-out split record of a run.

Training code is reached only through :mod:`finetune.data`'s public functions (reading records, reproducing a run's
held-out split). The names below are imported on first use, so ``import dolly_langchain.evaluation`` is cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "EvalError",
    "GenerationEvalError",
    "MissingTaskFile",
    "TaskDataError",
    "after_training",
    "evaluate",
    "heldout_records",
]


def __getattr__(name: str) -> Any:
    if name in ("EvalError", "after_training", "evaluate"):
        from dolly_langchain.evaluation import runner as home
    elif name in ("GenerationEvalError", "heldout_records"):
        from dolly_langchain.evaluation import generation as home
    elif name in ("MissingTaskFile", "TaskDataError"):
        from dolly_langchain.evaluation import taskdata as home
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(home, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
