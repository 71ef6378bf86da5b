"""``dolly batch`` in-process and ``generate_dataframe`` on pandas: the engine-neutral path, on tiny fp32 models.

The answers must equal ``DollyLLM.batch`` over the same rows (greedy), whatever order the rows come in; rows that
cannot be answered get an ``error`` instead of failing the job; the command writes Parquet atomically and its
errors name the flag or file to fix.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import MEMORIZED

from dolly_langchain.batch import generate_dataframe
from dolly_langchain.batch.frames import BATCH, PLAN_ERROR, TOKENS, BatchRowError, GenerateSpec, plan_batches
from dolly_langchain.cli import main
from dolly_langchain.errors import DollyValueError
from dolly_langchain.llm import DollyLLM
from dolly_langchain.prompts import INSTRUCTION_PROMPT, INSTRUCTION_WITH_CONTEXT_PROMPT

INSTRUCTIONS = [
    "What is the capital of France?", "Name a primary color.", "Summarize the text.", "Name a color.",
    "What is the answer to the question about the long river and the water?", "Write a word.",
    "Call the people who look at the water first.", "How many sides does the thing have?",
]


def _prompt(instruction, context):
    if isinstance(context, str) and context:  # pandas reads None in a text column as NaN
        return INSTRUCTION_WITH_CONTEXT_PROMPT.format(instruction=instruction, context=context)
    return INSTRUCTION_PROMPT.format(instruction=instruction)


@pytest.fixture
def records() -> pd.DataFrame:
    contexts = [None, "", "The cat sat on the mat all day.", None, "It was a long day by the water.", None, None, None]
    return pd.DataFrame({"id": [10 + i for i in range(len(INSTRUCTIONS))], "instruction": INSTRUCTIONS,
                         "context": contexts, "category": ["x"] * len(INSTRUCTIONS)})


def _options(model_dir):
    return {"model": str(model_dir), "engine": "transformers", "max_new_tokens": 12, "batch_size": 3}


def test_answers_equal_dollyllm_batch_of_the_same_rows(memorized_neox_dir, records):
    out = generate_dataframe(records, progress=False, **_options(memorized_neox_dir))

    llm = DollyLLM(model=str(memorized_neox_dir), engine="transformers", max_new_tokens=12, batch_size=3,
                   do_sample=False)
    expected = llm.batch([_prompt(i, c) for i, c in zip(records["instruction"], records["context"])])
    assert list(out["response"]) == expected
    assert list(out.columns) == [*records.columns, "response", "finish_reason", "prompt_tokens",
                                 "completion_tokens", "error"]
    assert list(out["id"]) == list(records["id"])  # the input's order
    assert out["error"].isna().all()
    assert set(out["finish_reason"]) <= {"stop", "length"}
    assert (out["prompt_tokens"] > 0).all() and (out["completion_tokens"] > 0).all()
    memorized = out.set_index("instruction").loc[MEMORIZED[0][0], "response"]
    assert memorized == MEMORIZED[0][2]


def test_answers_do_not_depend_on_row_order(memorized_neox_dir, records):
    first = generate_dataframe(records, progress=False, **_options(memorized_neox_dir))
    shuffled = generate_dataframe(records.sample(frac=1, random_state=3), progress=False,
                                  **_options(memorized_neox_dir))
    assert shuffled.set_index("id")["response"].sort_index().equals(first.set_index("id")["response"].sort_index())


def test_rows_that_cannot_be_answered_get_an_error_and_the_rest_go_on(memorized_neox_dir, records):
    records.loc[1, "instruction"] = None
    records.loc[3, "instruction"] = "   "
    records.loc[5, "instruction"] = "word " * 5000  # far over the tiny model's window
    out = generate_dataframe(records, progress=False, **_options(memorized_neox_dir))

    assert "missing instruction" in out.loc[1, "error"]
    assert "empty instruction" in out.loc[3, "error"]
    assert "window" in out.loc[5, "error"] or "context" in out.loc[5, "error"]
    bad = out.loc[[1, 3, 5]]
    assert bad["response"].isna().all() and (bad["completion_tokens"] == 0).all()
    good = out.drop(index=[1, 3, 5])
    assert good["error"].isna().all() and good["response"].notna().all()
    # The error rows took no batch slot: the others answer as DollyLLM.batch of the answerable rows alone.
    llm = DollyLLM(model=str(memorized_neox_dir), engine="transformers", max_new_tokens=12, batch_size=3,
                   do_sample=False)
    assert list(good["response"]) == llm.batch([_prompt(i, c) for i, c in zip(good["instruction"], good["context"])])


def test_fail_fast_raises_naming_the_row(memorized_neox_dir, records):
    records.loc[2, "instruction"] = ""
    with pytest.raises(BatchRowError, match=r"row id=12: empty instruction"):
        generate_dataframe(records, progress=False, fail_fast=True, **_options(memorized_neox_dir))


def test_plan_forms_batches_longest_first_and_keeps_error_rows_apart():
    spec = GenerateSpec(batch_size=2)
    measured = pd.DataFrame({"id": [5, 1, 3, 2, 4, 0], TOKENS: [7, 9, -1, 7, 3, -1], PLAN_ERROR: [None] * 6})
    plan = plan_batches(measured, spec).set_index("id")[BATCH].to_dict()
    # answerable by (-tokens, id): 1 (9), 2 (7), 5 (7), 4 (3) -> batches 0, 0, 1, 1; errors 0, 3 -> batch -1
    assert plan == {1: 0, 2: 0, 5: 1, 4: 1, 0: -1, 3: -1}


def test_input_checks_name_the_flag(records, memorized_neox_dir):
    with pytest.raises(DollyValueError, match="--instruction-column"):
        generate_dataframe(records, instruction_column="question", progress=False, **_options(memorized_neox_dir))
    with pytest.raises(DollyValueError, match="--context-column"):
        generate_dataframe(records, context_column="passage", progress=False, **_options(memorized_neox_dir))
    twice = pd.concat([records, records.iloc[:1]])
    with pytest.raises(DollyValueError, match="not unique"):
        generate_dataframe(twice, progress=False, **_options(memorized_neox_dir))
    with pytest.raises(DollyValueError, match="batch_size"):
        generate_dataframe(records, **{**_options(memorized_neox_dir), "batch_size": 0})
    with pytest.raises(DollyValueError, match="bogus"):
        generate_dataframe(records, bogus=1, **_options(memorized_neox_dir))


def test_rows_are_numbered_and_an_input_response_column_is_kept(memorized_neox_dir):
    pdf = pd.DataFrame({"instruction": ["Name a primary color.", "What is the capital of France?"],
                        "response": ["human answer 1", "human answer 2"]})
    out = generate_dataframe(pdf, progress=False, **_options(memorized_neox_dir))
    assert list(out["id"]) == [0, 1]
    assert list(out["input_response"]) == ["human answer 1", "human answer 2"]
    assert list(out["response"]) == [MEMORIZED[1][2], MEMORIZED[0][2]]


# -- the command -------------------------------------------------------------------------------------------------


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _cli(model_dir, *args):
    return main(["batch", *map(str, args), "--model", str(model_dir), "--engine", "transformers",
                 "--max-new-tokens", "12", "--batch-size", "2", "--no-stop-loops"])


def test_command_writes_parquet_with_answers_and_errors(memorized_neox_dir, tmp_path, capsys):
    source = _write_jsonl(tmp_path / "in.jsonl", [
        {"instruction": "What is the capital of France?", "context": ""},
        {"instruction": "", "context": "nothing"},
        {"instruction": "Summarize the text.", "context": "The cat sat on the mat all day."},
    ])
    out_path = tmp_path / "out" / "answers.parquet"
    assert _cli(memorized_neox_dir, source, out_path) == 0
    out = pd.read_parquet(out_path)
    assert list(out["id"]) == [0, 1, 2]
    assert out.loc[0, "response"] == MEMORIZED[0][2] and out.loc[2, "response"] == MEMORIZED[2][2]
    assert "empty instruction" in out.loc[1, "error"]
    assert "3 rows answered, 1 errors" in capsys.readouterr().err
    assert [p.name for p in out_path.parent.iterdir()] == ["answers.parquet"]  # no temporary file left


def test_command_reads_csv_and_parquet_directories(memorized_neox_dir, tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    pd.DataFrame({"key": ["a"], "question": ["Name a primary color."]}).to_parquet(parts / "part-0.parquet")
    pd.DataFrame({"key": ["b"], "question": ["What is the capital of France?"]}).to_parquet(parts / "part-1.parquet")
    (parts / "_SUCCESS").write_text("")
    assert _cli(memorized_neox_dir, parts, tmp_path / "a.parquet", "--instruction-column", "question",
                "--id-column", "key") == 0
    out = pd.read_parquet(tmp_path / "a.parquet")
    assert list(out["key"]) == ["a", "b"] and list(out["response"]) == [MEMORIZED[1][2], MEMORIZED[0][2]]

    csv = tmp_path / "in.csv"
    pd.DataFrame({"instruction": ["Name a primary color."]}).to_csv(csv, index=False)
    assert _cli(memorized_neox_dir, csv, tmp_path / "b.parquet") == 0
    assert pd.read_parquet(tmp_path / "b.parquet").loc[0, "response"] == MEMORIZED[1][2]


def test_command_errors_are_one_line_naming_what_to_fix(memorized_neox_dir, tmp_path, capsys, monkeypatch):
    assert _cli(memorized_neox_dir, tmp_path / "missing.jsonl", tmp_path / "o.parquet") == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n{not json\n', encoding="utf-8")
    assert _cli(memorized_neox_dir, bad, tmp_path / "o.parquet") == 2
    assert "bad.jsonl:2" in capsys.readouterr().err

    good = _write_jsonl(tmp_path / "good.jsonl", [{"question": "Name a primary color."}])
    assert _cli(memorized_neox_dir, good, tmp_path / "o.parquet") == 2
    assert "--instruction-column" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()

    source = _write_jsonl(tmp_path / "in.jsonl", [{"instruction": ""}])
    assert _cli(memorized_neox_dir, source, tmp_path / "o.parquet", "--fail-fast") == 2
    err = capsys.readouterr().err
    assert "empty instruction" in err and "--fail-fast" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.parquet").exists()

    import dolly_langchain.batch.spark as spark_module

    monkeypatch.setattr(spark_module, "java_available", lambda: False)
    assert _cli(memorized_neox_dir, source, tmp_path / "o.parquet", "--spark", "local[2]") == 2
    assert "openjdk-17-jre-headless" in capsys.readouterr().err


def test_a_failed_write_keeps_the_older_output(memorized_neox_dir, tmp_path, monkeypatch):
    source = _write_jsonl(tmp_path / "in.jsonl", [{"instruction": "Name a primary color."}])
    out_path = tmp_path / "answers.parquet"
    assert _cli(memorized_neox_dir, source, out_path) == 0
    before = out_path.read_bytes()

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", broken)
    with pytest.raises(OSError, match="disk full"):
        _cli(memorized_neox_dir, source, out_path)
    assert out_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.parquet", "in.jsonl"]
