"""``dolly rag index`` and ``dolly rag ask`` on the memorized tiny GPT-NeoX (its tokenizer cuts the chunks)."""

import json

import pytest

from conftest import MEMORIZED
from dolly_langchain.cli import main

FRANCE, COLOR, SUMMARY = MEMORIZED
QUESTION = "Where did the cat sit all day?"


@pytest.fixture(scope="module")
def expected_answer(memorized_neox_dir):
    """What the model answers for QUESTION with the cat passage as context (what the chain must produce)."""
    from dolly_langchain.llm import DollyLLM
    from dolly_langchain.prompts import INSTRUCTION_WITH_CONTEXT_PROMPT

    llm = DollyLLM.from_model_id(str(memorized_neox_dir), do_sample=False, max_new_tokens=40)
    return llm.invoke(INSTRUCTION_WITH_CONTEXT_PROMPT.format(instruction=QUESTION, context=SUMMARY[1]))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "cat.txt").write_text(SUMMARY[1] + "\n", encoding="utf-8")
    (folder / "notes.md").write_text("# Notes\n\nWater is wet and the sky is blue.\n", encoding="utf-8")
    return folder


@pytest.fixture
def index(capsys, docs, tmp_path, memorized_neox_dir):
    path = tmp_path / "docs.sqlite"
    code, _, _ = run(capsys, "rag", "index", docs, "--index", path, "--model", memorized_neox_dir)
    assert code == 0
    return path


def test_index_counts_and_reports_unreadable_files(capsys, docs, tmp_path, memorized_neox_dir):
    (docs / "broken.txt").write_bytes(b"\xff\xfe not utf-8")
    path = tmp_path / "docs.sqlite"
    missing = tmp_path / "missing.md"
    code, out, err = run(capsys, "rag", "index", docs, missing, "--index", path, "--model", memorized_neox_dir)
    assert code == 2  # the readable files are indexed all the same
    assert "2 added, 0 skipped (unchanged), 0 replaced, 2 failed" in out
    failures = [line for line in err.splitlines() if line.startswith("dolly: cannot index")]
    assert len(failures) == 2
    assert any("broken.txt" in line and "UTF-8" in line for line in failures)
    assert any(str(missing) in line for line in failures)

    (docs / "broken.txt").unlink()
    (docs / "notes.md").write_text("# Notes\n\nWater is wet.\n", encoding="utf-8")
    code, out, _ = run(capsys, "rag", "index", docs, "--index", path, "--model", memorized_neox_dir)
    assert code == 0
    assert "0 added, 1 skipped (unchanged), 1 replaced, 0 failed" in out
    assert "the index holds 2 sources" in out


def test_ask_prints_answer_then_numbered_sources(capsys, index, docs, memorized_neox_dir, expected_answer):
    code, out, _ = run(capsys, "rag", "ask", QUESTION, "--index", index, "--k", "1", "--model", memorized_neox_dir,
                       "--max-new-tokens", "40")
    assert code == 0
    answer, sources = out.split("\n\nSources:\n")
    assert answer == expected_answer
    assert sources.strip() == f"[1] {(docs / 'cat.txt').resolve()} (chunk 0): {SUMMARY[1]}"


def test_ask_stream_and_json(capsys, index, docs, memorized_neox_dir, expected_answer):
    args = ("rag", "ask", QUESTION, "--index", index, "--k", "1", "--model", memorized_neox_dir, "--max-new-tokens", 40)
    code, out, _ = run(capsys, *args, "--stream")
    assert code == 0 and out.startswith(expected_answer + "\n\nSources:\n[1] ")
    code, out, _ = run(capsys, *args, "--json")
    record = json.loads(out)
    assert code == 0 and record["answer"] == expected_answer and record["question"] == QUESTION
    assert [s["source"] for s in record["sources"]] == [str((docs / "cat.txt").resolve())]
    assert record["sources"][0]["text"] == SUMMARY[1] and record["sources"][0]["metadata"]["chunk_id"]


@pytest.mark.parametrize("make_index, question, expected", [
    (None, "What?", "no index at"),
    ("index", "   ", "the question is empty"),
    ("garbage", "What?", "rebuild"),
])
def test_ask_errors_are_one_line_with_exit_code_2(capsys, tmp_path, index, make_index, question, expected):
    path = {"index": index, None: tmp_path / "absent.sqlite"}.get(make_index)
    if make_index == "garbage":
        path = tmp_path / "garbage.sqlite"
        path.write_text("this is not an index\n" * 100)
    code, out, err = run(capsys, "rag", "ask", question, "--index", path)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and expected in err and err.startswith("dolly: error:")


def test_index_refuses_other_chunk_size(capsys, index, docs, memorized_neox_dir):
    code, _, err = run(capsys, "rag", "index", docs, "--index", index, "--model", memorized_neox_dir,
                       "--chunk-tokens", "64")
    assert code == 2 and "chunk_tokens" in err and err.count("\n") == 1
