"""Moved to :mod:`dolly_langchain.evaluation.card`; this old path re-exports it (and ``write_json_atomically``,
now :func:`dolly_langchain.files.write_json_atomically`)."""

from __future__ import annotations

from dolly_langchain.evaluation.card import (
    CARD_METRICS,
    CARD_ROWS,
    CARD_TASKS,
    FULL_SPLIT_SIZES,
    Row,
    Score,
    card_rows,
    format_table,
    gmean,
    plot_chart,
    row_gmean,
    rows_to_json,
)
from dolly_langchain.files import write_json_atomically

__all__ = ["CARD_METRICS", "CARD_ROWS", "CARD_TASKS", "FULL_SPLIT_SIZES", "Row", "Score", "card_rows",
           "format_table", "gmean", "plot_chart", "row_gmean", "rows_to_json", "write_json_atomically"]
