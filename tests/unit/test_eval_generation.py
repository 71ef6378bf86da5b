"""dolly-eval --generation on tiny models: a model that learned the answers vs a random one, on the same records;
and the held-out split a dolly-finetune run records and dolly-eval reproduces."""

from __future__ import annotations

import json

import pytest

from dolly_langchain.evaluation.cli import main
from dolly_langchain.evaluation.generation import SPLIT_RECORD_FILE, heldout_records, rouge_l
from conftest import MEMORIZED
from finetune_helpers import cli_args, synthetic_records, write_jsonl

CATEGORIES = ("open_qa", "brainstorming", "summarization")


@pytest.fixture()
def dolly_file(tmp_path):
    records = [{"instruction": i, "context": c or "", "response": r, "category": cat}
               for (i, c, r), cat in zip(MEMORIZED, CATEGORIES)]
    return write_jsonl(tmp_path / "dolly.jsonl", records)


def test_rouge_l_comes_from_rouge_score():
    assert rouge_l("Paris is the capital of France.", "Paris is the capital of France.") == 1.0
    assert rouge_l("Paris is the capital of France.", "blue") == 0.0
    assert 0 < rouge_l("the cat sat on the mat", "the cat sat") < 1


def test_generation_compares_a_trained_and_a_random_model_on_the_same_records(
        tmp_path, dolly_file, memorized_neox_dir, tiny_neox_dir, capsys):
    out = tmp_path / "out"
    status = main([str(memorized_neox_dir), str(tiny_neox_dir), "--generation", "--dolly-data", str(dolly_file),
                   "--samples", "3", "--max-new-tokens", "24", "--batch-size", "2", "--output", str(out),
                   "--device", "cpu"])
    printed = capsys.readouterr().out
    assert status == 0
    results = json.loads((out / "results.json").read_text())
    assert "card" not in results  # --generation alone runs only the instruction-following evaluation
    generation = results["generation"]
    assert generation["sample"] == f"a seeded sample of 3 records of {dolly_file} (seed 0)"
    learned, random_model = generation["summaries"]
    assert learned["model"] == str(memorized_neox_dir)
    assert learned["overall"] == {"n": 3, "rouge_l": 1.0, "ended_share": 1.0,
                                  "mean_tokens": pytest.approx(learned["overall"]["mean_tokens"])}
    assert set(learned["per_category"]) == set(CATEGORIES)
    assert all(s["n"] == 1 and s["rouge_l"] == 1.0 for s in learned["per_category"].values())
    assert random_model["overall"]["rouge_l"] < 0.5
    assert random_model["overall"]["mean_tokens"] > learned["overall"]["mean_tokens"]
    answers = generation["answers"]
    assert {a["instruction"] for a in answers} == {i for i, _, _ in MEMORIZED}
    first = answers[0]
    assert first["answers"][str(memorized_neox_dir)]["text"] == first["response"]
    assert first["answers"][str(memorized_neox_dir)]["ended"] is True
    side_by_side = (out / "generation.md").read_text()
    assert f"instruction | human response | {memorized_neox_dir} | {tiny_neox_dir}" in side_by_side
    assert "ROUGE-L" in printed and "ended by itself" in printed


def test_generation_without_data_or_run_is_a_one_line_error(tiny_neox_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("DOLLY_15K_PATH", raising=False)
    assert main([str(tiny_neox_dir), "--generation", "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("dolly-eval: error: --generation needs --dolly-data")


def test_a_run_records_its_split_and_eval_after_scores_its_held_out_records(tmp_path, tiny_neox_dir):
    from transformers import AutoTokenizer

    from finetune.data import training_text
    from finetune.train import build_trainer, parse_args
    from finetune.train import main as finetune_main

    data = write_jsonl(tmp_path / "data.jsonl", synthetic_records(24, seed=3))
    run = tmp_path / "run"
    argv = cli_args(tiny_neox_dir, data, run, "--epochs", "1", "--per-device-train-batch-size", "4", "--test-size",
                    "4", "--eval-steps", "100", "--save-steps", "100")
    finetune_main([*argv, "--eval-after", "generation", "--eval-samples", "3"])

    split = json.loads((run / SPLIT_RECORD_FILE).read_text())
    assert split == {"training_dataset": str(data.resolve()), "max_records": None, "skip_bad_records": False,
                     "test_size": 4, "seed": 0, "max_length": 512, "n_heldout": 4}
    heldout = heldout_records(run)
    # exactly the rows the trainer evaluated on, in its order
    eval_ids = build_trainer(parse_args(argv)).eval_dataset["input_ids"]
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    assert [tokenizer(training_text(r))["input_ids"] for r in heldout] == eval_ids
    assert {r["category"] for r in heldout} == {"qa"}

    generation = json.loads((run / "eval" / "results.json").read_text())["generation"]
    assert generation["sample"].startswith(f"a seeded sample of 3 of the 4 records {run} held out")
    assert generation["summaries"][0]["overall"]["n"] == 3
    assert {a["instruction"] for a in generation["answers"]} <= {r["instruction"] for r in heldout}
