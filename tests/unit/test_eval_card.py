"""The card's published rows, its metric choice, the table format, the gmean and the chart."""

from __future__ import annotations

import math

import pytest

from dolly_langchain.evaluation.card import (
    CARD_METRICS, CARD_ROWS, CARD_TASKS, FULL_SPLIT_SIZES, Row, Score, card_rows, format_table, gmean, plot_chart,
    rows_to_json,
)


def test_every_published_value_is_an_exact_count_over_the_full_split():
    for model, values in CARD_ROWS.items():
        for task, value in zip(CARD_TASKS, values):
            count = value * FULL_SPLIT_SIZES[task]
            assert abs(count - round(count)) < 0.01, (model, task, count)


def test_published_gmean_is_the_geometric_mean_of_the_seven_tasks():
    for model, values in CARD_ROWS.items():
        assert gmean(values[:7]) == pytest.approx(values[7], abs=1e-6), model


def test_card_metrics_are_acc_norm_except_winogrande_and_boolq():
    assert CARD_METRICS == {"openbookqa": "acc_norm", "arc_easy": "acc_norm", "winogrande": "acc",
                            "hellaswag": "acc_norm", "arc_challenge": "acc_norm", "piqa": "acc_norm", "boolq": "acc"}
    assert len(CARD_ROWS) == 9


def test_gmean():
    assert gmean([0.25, 1.0]) == pytest.approx(0.5)
    assert gmean([0.5, 0.0]) == 0.0
    with pytest.raises(ValueError):
        gmean([])


def _row(values: dict[str, float], sample=True) -> Row:
    scores = {t: Score(v, 0.02, 50, FULL_SPLIT_SIZES[t]) for t, v in values.items()}
    return Row(model="my-model", scores=scores, sample="seeded sample: 50 per task (seed 0)" if sample else None)


def test_table_has_the_card_header_evaluated_rows_with_stderr_and_the_published_rows():
    row = _row({t: 0.5 for t in CARD_TASKS})
    lines = format_table([row, *card_rows()]).splitlines()
    assert lines[0] == "model | openbookqa | arc_easy | winogrande | hellaswag | arc_challenge | piqa | boolq | gmean"
    assert lines[1] == " | ".join(["---"] * 9)
    assert lines[2] == "my-model [sample] | " + " | ".join(["0.5000 ± 0.0200"] * 7) + " | 0.500000"
    assert lines[3] == ("EleutherAI/pythia-2.8b (card) | 0.348 | 0.585859 | 0.589582 | 0.591217 | 0.323379 | "
                        "0.73395 | 0.638226 | 0.523431")
    assert sum(" (card) |" in line for line in lines) == 9
    assert "[sample] my-model: seeded sample: 50 per task (seed 0)" in "\n".join(lines)


def test_a_partial_row_gets_a_gmean_over_the_evaluated_tasks_for_every_row():
    six = [t for t in CARD_TASKS if t != "hellaswag"]
    row = _row({t: 0.4 for t in six} | {"piqa": 0.9})
    table = format_table([row, *card_rows()], six)
    lines = table.splitlines()
    assert lines[0].endswith("| gmean | gmean-6")
    cells = lines[2].split(" | ")
    assert cells[4] == "-"  # hellaswag not evaluated
    assert cells[8] == "-"  # no 7-task gmean without hellaswag
    assert float(cells[9]) == pytest.approx(math.exp((5 * math.log(0.4) + math.log(0.9)) / 6), abs=1e-6)
    pythia = CARD_ROWS["EleutherAI/pythia-2.8b"]
    expected = gmean([v for t, v in zip(CARD_TASKS, pythia) if t != "hellaswag"])
    assert lines[3].split(" | ")[-1] == f"{expected:.6f}"
    assert "gmean-6: geometric mean over openbookqa, arc_easy, winogrande, arc_challenge, piqa, boolq" in table


def test_json_rows_and_chart(tmp_path):
    rows = [_row({"arc_easy": 0.41, "piqa": 0.6}), *card_rows()]
    data = rows_to_json(rows)
    assert data[0]["scores"]["arc_easy"] == {"metric": "acc_norm", "value": 0.41, "stderr": 0.02, "n": 50,
                                             "n_total": 2376}
    assert data[0]["gmean"] is None and data[1]["gmean"] == pytest.approx(0.523431, abs=1e-6)
    png = plot_chart(rows, tmp_path / "out" / "card.png", ["arc_easy", "piqa"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in png.parent.iterdir()] == ["card.png"]  # no temporary file left
