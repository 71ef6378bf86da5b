"""dolly-eval on the embedded SmolLM2-135M-Instruct and the real evaluation files ($DOLLY_EVAL_DIR, set by .ci/run).

A seeded 8 documents of two tasks keep this near half a minute on 2 CPU cores; benchmarks/eval_card.py runs the
six tasks at 500 documents each.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dolly_langchain.evaluation import harness
from dolly_langchain.evaluation.cli import main


@pytest.fixture()
def eval_dir() -> Path:
    path = os.environ.get("DOLLY_EVAL_DIR")
    if not path or not Path(path).is_dir():
        pytest.skip("evaluation data not available: set DOLLY_EVAL_DIR to a directory with the card's task files "
                    "(.ci/run points it at ../shared/eval)")
    return Path(path)


def test_embedded_model_card_table_on_a_seeded_sample(tmp_path, monkeypatch, capsys, eval_dir):
    monkeypatch.setattr(harness, "cache_root", lambda: tmp_path / "cache")
    out = tmp_path / "out"
    status = main(["--tasks", "winogrande,boolq", "--samples", "8", "--seed", "1", "--data-dir", str(eval_dir),
                   "--output", str(out), "--device", "cpu", "--batch-size", "8"])
    printed = capsys.readouterr().out
    assert status == 0
    assert "SmolLM2-135M-Instruct (embedded) [sample] | - | - | " in printed
    assert "seeded sample: 8 per task (seed 1)" in printed
    card = json.loads((out / "results.json").read_text())["card"]
    assert card["errors"] == {}
    embedded = card["rows"][0]
    for task, total in (("winogrande", 1267), ("boolq", 3270)):
        score = embedded["scores"][task]
        assert (score["metric"], score["n"], score["n_total"]) == ("acc", 8, total)
        assert 0 <= score["value"] <= 1 and score["stderr"] > 0
        assert score["value"] * 8 == pytest.approx(round(score["value"] * 8))  # a count of the 8 documents
    assert embedded["gmean"] is None  # two tasks are not the card's seven
    assert (out / "card.png").stat().st_size > 1000
