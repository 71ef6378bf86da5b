"""dolly-eval end to end on a tiny random model: lm-eval runs the official tasks on local files, the table, the JSON,
the chart, the cache, and one-line errors."""

from __future__ import annotations

import json

import pytest

from dolly_langchain.evaluation import harness
from dolly_langchain.evaluation.cli import main
from eval_helpers import write_eval_dir


@pytest.fixture()
def eval_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "cache_root", lambda: tmp_path / "cache")
    return tmp_path / "cache"


def _run(capsys, *argv):
    status = main([*map(str, argv)])
    out, err = capsys.readouterr()
    return status, out, err


def test_card_table_json_and_chart_on_a_seeded_sample(tmp_path, tiny_neox_dir, eval_cache, capsys):
    data = write_eval_dir(tmp_path / "eval", tasks=("arc_easy", "winogrande", "boolq"))
    out_dir = tmp_path / "out"
    status, out, err = _run(capsys, tiny_neox_dir, "--tasks", "arc_easy,winogrande,boolq,hellaswag", "--samples", 3,
                            "--data-dir", data, "--output", out_dir, "--device", "cpu", "--batch-size", 4)
    assert status == 0
    missing = [line for line in err.splitlines() if "hellaswag" in line]
    assert len(missing) == 1 and "hellaswag/hellaswag_val.jsonl not found; get " in missing[0]
    assert "model | openbookqa | arc_easy | winogrande | hellaswag | arc_challenge | piqa | boolq | gmean | gmean-3" \
        in out
    assert f"{tiny_neox_dir} [sample] | - | " in out
    assert "seeded sample: 3 per task (seed 0)" in out
    results = json.loads((out_dir / "results.json").read_text())
    card = results["card"]
    assert card["tasks"] == ["arc_easy", "winogrande", "boolq"]
    assert set(card["errors"]) == {"hellaswag"}
    mine = card["rows"][0]
    assert mine["sample"] == "seeded sample: 3 per task (seed 0)"
    arc = mine["scores"]["arc_easy"]
    assert (arc["metric"], arc["n"], arc["n_total"]) == ("acc_norm", 3, 4)
    assert arc["value"] * 3 == pytest.approx(round(arc["value"] * 3)) and arc["stderr"] is not None
    assert (mine["scores"]["winogrande"]["n"], mine["scores"]["winogrande"]["metric"]) == (2, "acc")  # whole split
    assert [r["model"] for r in card["rows"][1:]][:2] == ["EleutherAI/pythia-2.8b", "EleutherAI/pythia-6.9b"]
    assert (out_dir / "card.png").read_bytes()[:4] == b"\x89PNG"
    fingerprints = list(eval_cache.iterdir())
    assert len(fingerprints) == 1
    assert sorted(p.name.rsplit("-", 1)[0] for p in fingerprints[0].glob("*.json")) == [
        "arc_easy-n3-seed0", "boolq-n3-seed0", "winogrande-n3-seed0"]
    assert list(fingerprints[0].glob("requests_rank0.db"))  # lm-eval's per-request cache, for resuming


def test_a_repeated_run_comes_from_the_cache_without_loading_the_model(tmp_path, tiny_neox_dir, eval_cache, capsys,
                                                                      monkeypatch):
    data = write_eval_dir(tmp_path / "eval", tasks=("piqa",))
    argv = [tiny_neox_dir, "--tasks", "piqa", "--data-dir", data, "--output", tmp_path / "out", "--device", "cpu"]
    assert _run(capsys, *argv)[0] == 0
    first = json.loads((tmp_path / "out/results.json").read_text())["card"]["rows"][0]

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although every task is cached")

    monkeypatch.setattr("dolly_langchain.evaluation.runner._load_lm", no_model)
    assert _run(capsys, *argv)[0] == 0
    assert json.loads((tmp_path / "out/results.json").read_text())["card"]["rows"][0] == first
    assert first["sample"] is None and first["scores"]["piqa"]["n"] == 2  # full split, labelled as such
    labels = data / "piqa/valid-labels.lst"
    labels.write_text("1\n1\n")  # edited data are scored afresh, not served from the cache
    with pytest.raises(AssertionError, match="the model was loaded"):
        main([*map(str, argv)])


def test_no_task_data_and_a_missing_model_are_one_line_errors(tmp_path, tiny_neox_dir, eval_cache, capsys):
    status, _, err = _run(capsys, tiny_neox_dir, "--tasks", "boolq", "--data-dir", tmp_path, "--output", tmp_path)
    assert status == 2
    assert err.strip().splitlines()[-1].startswith("dolly-eval: error: none of the tasks boolq has data")
    write_eval_dir(tmp_path, tasks=("boolq",))
    status, _, err = _run(capsys, tmp_path / "no-such-model", "--tasks", "boolq", "--data-dir", tmp_path)
    assert status == 2
    assert err.strip() == f"dolly-eval: error: model directory {tmp_path / 'no-such-model'} does not exist"


def test_unknown_task_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["--tasks", "arc_easy,mmlu"])
    assert "unknown task(s) ['mmlu']" in capsys.readouterr().err
