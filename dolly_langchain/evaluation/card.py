"""The Dolly model card's zero-shot table: its tasks and metrics, its published rows, the table and the chart.

The card (``databricks/dolly-v2-12b`` on the Hugging Face hub, section "Benchmark Metrics", and the same table in the
``databrickslabs/dolly`` README) reports EleutherAI's lm-evaluation-harness, zero-shot, on seven tasks and their
geometric mean. Every value is an exact count over the full split (arc_easy 0.585859 = 1392/2376, openbookqa 0.348 =
174/500, hellaswag 0.591217 = 5937/10042), and the ``gmean`` column is the geometric mean of the seven values.

Which metric each column is: ``acc_norm`` (accuracy after normalising each choice's log-likelihood by its length in
characters) for openbookqa, arc_easy, arc_challenge, hellaswag and piqa; ``acc`` for winogrande and boolq, which have no
other. Checked against lm-eval 0.4's zero-shot results for EleutherAI/pythia-2.8b (published in the hub repository
``lomahony/eleuther-pythia2.8b-hh-dpo``, ``base-2.8b-eval-files/EleutherAI-pythia-2.8b-0shot/results.json``): card
value vs acc_norm vs acc, in items of the full split:

    openbookqa     174/500   vs acc_norm 179 / acc 120
    arc_easy      1392/2376  vs acc_norm 1395 / acc 1532
    arc_challenge  379/1172  vs acc_norm 388 / acc 346
    hellaswag     5937/10042 vs acc_norm 5951 / acc 4551
    piqa          1349/1838  vs acc_norm 1352 / acc 1359
    winogrande     747/1267  vs acc 757;  boolq 2087/3270 vs acc 2117

acc_norm is the closer one everywhere; for piqa both metrics are near (3 vs 10 items), so that column is the least
certain. Even the chosen metric differs from lm-eval 0.4's by 3 to 30 items (0.1 to 1 point): the card was made
with an older harness release (prompt and tokenisation details changed since), so a card row is a reference to
compare against, not a value this tool reproduces to the item.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dolly_langchain.errors import DollyValueError
from dolly_langchain.files import atomic_file

#: The card's columns, in its order.
CARD_TASKS = ("openbookqa", "arc_easy", "winogrande", "hellaswag", "arc_challenge", "piqa", "boolq")

#: The card's metric per task (see the module docstring for how this was checked).
CARD_METRICS = {
    "openbookqa": "acc_norm",
    "arc_easy": "acc_norm",
    "winogrande": "acc",
    "hellaswag": "acc_norm",
    "arc_challenge": "acc_norm",
    "piqa": "acc_norm",
    "boolq": "acc",
}

#: Documents in each task's full evaluation split (the split lm-eval scores: test for ARC/OpenBookQA, else validation).
FULL_SPLIT_SIZES = {
    "openbookqa": 500,
    "arc_easy": 2376,
    "winogrande": 1267,
    "hellaswag": 10042,
    "arc_challenge": 1172,
    "piqa": 1838,
    "boolq": 3270,
}

# The published rows, copied from the Dolly model card ("Benchmark Metrics", huggingface.co/databricks/dolly-v2-12b,
# also in the README of github.com/databrickslabs/dolly). The card first named dolly-v2-3b and dolly-v2-7b
# "dolly-v2-2-8b" and "dolly-v2-6-9b"; the current names are used here. Columns in CARD_TASKS order, then gmean.
CARD_ROWS: dict[str, tuple[float, ...]] = {
    "EleutherAI/pythia-2.8b": (0.348, 0.585859, 0.589582, 0.591217, 0.323379, 0.73395, 0.638226, 0.523431),
    "EleutherAI/pythia-6.9b": (0.368, 0.604798, 0.608524, 0.631548, 0.343857, 0.761153, 0.6263, 0.543567),
    "databricks/dolly-v2-3b": (0.384, 0.611532, 0.589582, 0.650767, 0.370307, 0.742655, 0.575535, 0.544886),
    "EleutherAI/pythia-12b": (0.364, 0.627104, 0.636148, 0.668094, 0.346416, 0.760065, 0.673394, 0.559676),
    "EleutherAI/gpt-j-6B": (0.382, 0.621633, 0.651144, 0.662617, 0.363481, 0.761153, 0.655963, 0.565936),
    "databricks/dolly-v2-12b": (0.408, 0.63931, 0.616417, 0.707927, 0.388225, 0.757889, 0.568196, 0.56781),
    "databricks/dolly-v2-7b": (0.392, 0.633838, 0.607735, 0.686517, 0.406997, 0.750816, 0.644037, 0.573487),
    "databricks/dolly-v1-6b": (0.41, 0.62963, 0.643252, 0.676758, 0.384812, 0.773667, 0.687768, 0.583431),
    "EleutherAI/gpt-neox-20b": (0.402, 0.683923, 0.656669, 0.7142, 0.408703, 0.784004, 0.695413, 0.602236),
}


@dataclass
class Score:
    """One task's card metric for one model: value, standard error and how many documents it counts."""

    value: float
    stderr: float | None
    n: int
    n_total: int

    @property
    def sampled(self) -> bool:
        return self.n < self.n_total


@dataclass
class Row:
    """One line of the table: a model's scores (``None`` where a task was not evaluated)."""

    model: str
    scores: dict[str, Score | None]
    published: bool = False
    sample: str | None = None
    """How the documents were chosen, e.g. "seeded sample: 500 per task, seed 0"; ``None`` for full splits."""

    def value(self, task: str) -> float | None:
        score = self.scores.get(task)
        return None if score is None else score.value


def card_rows() -> list[Row]:
    """The card's published rows as :class:`Row` objects (full splits, no standard errors)."""
    rows = []
    for model, values in CARD_ROWS.items():
        scores = {task: Score(v, None, FULL_SPLIT_SIZES[task], FULL_SPLIT_SIZES[task]) for task, v in
                  zip(CARD_TASKS, values)}
        rows.append(Row(model=model, scores=scores, published=True))
    return rows


def gmean(values: Sequence[float]) -> float:
    """Geometric mean, as the card's ``gmean`` column (0 if any value is 0)."""
    if not values:
        raise DollyValueError("gmean of no values")
    if any(v <= 0 for v in values):
        return 0.0
    return math.exp(sum(math.log(v) for v in values) / len(values))


def row_gmean(row: Row, tasks: Sequence[str]) -> float | None:
    """The geometric mean of ``row`` over ``tasks``; ``None`` when the row lacks one of them."""
    values = [row.value(task) for task in tasks]
    if any(v is None for v in values):
        return None
    return gmean(values)  # type: ignore[arg-type]


def format_table(rows: Sequence[Row], tasks: Sequence[str] = CARD_TASKS) -> str:
    """The card's table: ``model | openbookqa | arc_easy | ... | boolq | gmean``, one line per row.

    Evaluated values carry ``±`` their standard error; a task that was not evaluated shows ``-``. ``gmean`` is over
    the seven card tasks, so it is ``-`` for a row that lacks one. When ``tasks`` are fewer than the card's seven, a
    last column ``gmean-N`` gives every row's geometric mean over those tasks, comparable across all rows. Lines
    under the table say which rows are seeded samples and which metric each column is.
    """
    subset = tuple(t for t in CARD_TASKS if t in tasks)
    partial = len(subset) < len(CARD_TASKS)
    header = ["model", *CARD_TASKS, "gmean"] + ([f"gmean-{len(subset)}"] if partial else [])
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for row in rows:
        label = row.model + (" (card)" if row.published else "") + (" [sample]" if row.sample else "")
        cells = [label]
        for task in CARD_TASKS:
            score = row.scores.get(task)
            cells.append("-" if score is None else _cell(score))
        full = row_gmean(row, CARD_TASKS)
        if row.published and full is not None:
            full = CARD_ROWS[row.model][-1]  # the published value, as printed on the card
        cells.append("-" if full is None else f"{full:.6f}")
        if partial:
            part = row_gmean(row, subset)
            cells.append("-" if part is None else f"{part:.6f}")
        lines.append(" | ".join(cells))
    lines.append("")
    metrics = ", ".join(f"{t} {CARD_METRICS[t]}" for t in CARD_TASKS)
    lines.append(f"Metrics (lm-evaluation-harness, zero-shot): {metrics}. Card rows: full splits, published values.")
    for row in rows:
        if row.sample:
            lines.append(f"[sample] {row.model}: {row.sample} (not the full split; ± is the standard error).")
    if partial:
        lines.append(f"gmean-{len(subset)}: geometric mean over {', '.join(subset)} (the tasks evaluated).")
    return "\n".join(lines)


def _cell(score: Score) -> str:
    if score.stderr is None:
        return f"{score.value:.6f}".rstrip("0").rstrip(".") if score.value != 0 else "0"
    return f"{score.value:.4f} ± {score.stderr:.4f}"


def rows_to_json(rows: Sequence[Row]) -> list[dict]:
    """Rows as JSON-ready dicts (``results.json``)."""
    out = []
    for row in rows:
        out.append({
            "model": row.model,
            "published": row.published,
            "sample": row.sample,
            "scores": {
                task: None if s is None else {"metric": CARD_METRICS[task], "value": s.value, "stderr": s.stderr,
                                              "n": s.n, "n_total": s.n_total}
                for task, s in row.scores.items()
            },
            "gmean": row_gmean(row, CARD_TASKS),
        })
    return out


def plot_chart(rows: Sequence[Row], path: Path, tasks: Sequence[str] = CARD_TASKS) -> Path:
    """A grouped bar chart (PNG) of every row over ``tasks``; evaluated rows get error bars (± 1 standard error).

    Written under a temporary name and renamed, so ``path`` is either the old file or the complete new one.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    tasks = [t for t in CARD_TASKS if t in tasks]
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(1.5 * len(tasks) + 5, 4.2))
    evaluated_colors, card_colors = plt.get_cmap("Dark2"), plt.get_cmap("Pastel1")
    n_evaluated = 0
    for k, row in enumerate(rows):
        xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(tasks))]
        values = [row.value(t) or 0.0 for t in tasks]
        if row.published:
            ax.bar(xs, values, width, label=f"{row.model} (card)", color=card_colors((k - n_evaluated) % 9))
            continue
        errors = [(row.scores[t].stderr or 0.0) if row.scores.get(t) else 0.0 for t in tasks]
        label = row.model + (f" ({row.sample})" if row.sample else "")
        ax.bar(xs, values, width, label=label, color=evaluated_colors(n_evaluated % 8), yerr=errors, capsize=2,
               edgecolor="black", linewidth=0.6)
        n_evaluated += 1
    ax.set_xticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_ylabel("accuracy (card metric)")
    ax.set_ylim(0, 1)
    ax.set_title("Dolly model card tasks, zero-shot (lm-evaluation-harness); error bars: ±1 s.e.", fontsize=9)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    try:
        with atomic_file(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=90, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)
