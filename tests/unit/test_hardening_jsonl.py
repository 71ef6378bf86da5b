"""Hardening (issue 16, item 7): a JSONL line nested 100,000 deep, or holding bytes that are not UTF-8, is one bad
record named by file and line in every reader (the shared ``files.iter_jsonl``), never a ``RecursionError`` or
``UnicodeDecodeError`` that ends the run:

- ``dolly rag index`` reports the file as failed (with its line) and goes on to the files after it;
- ``dolly-finetune`` skips it with ``--skip-bad-records`` and otherwise stops with one line naming file and line;
- ``dolly-eval --dolly-data`` stops with one line naming file and line (it offers no skipping).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from finetune_helpers import synthetic_records
from rag_helpers import CARS

from dolly_langchain.cli import main as dolly_main
from dolly_langchain.files import BadLine, iter_jsonl

DEEP = b"[" * 100_000  # json.loads raises RecursionError on this, not JSONDecodeError
NOT_UTF8 = b'{"instruction": "caf\xe9 \xff", "context": "", "response": "ok"}'

BAD_LINES = {"deep": (DEEP, "nested too deeply"), "not-utf8": (NOT_UTF8, "not valid UTF-8")}


def _jsonl(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _records_with(bad: bytes, n: int = 4, at: int = 2) -> list[bytes]:
    """``n`` good Dolly records as JSON lines, with ``bad`` as line ``at``."""
    lines = [json.dumps(r).encode() for r in synthetic_records(n)]
    lines.insert(at - 1, bad)
    return lines


# -- the shared reader --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BAD_LINES)
def test_iter_jsonl_names_the_bad_line_and_reads_on(tmp_path, kind):
    bad, reason = BAD_LINES[kind]
    path = _jsonl(tmp_path / "d.jsonl", [b'{"a": 1}', bad, b'{"a": 3}'])
    rows = list(iter_jsonl(path))
    assert [n for n, _ in rows] == [1, 2, 3]
    assert rows[0][1] == {"a": 1} and rows[2][1] == {"a": 3}
    assert isinstance(rows[1][1], BadLine) and str(rows[1][1]).startswith(f"{path}:2: ") and reason in rows[1][1].reason
    # The same from contents already read (the RAG loader reads a file once, with a size cap).
    assert [str(v) if isinstance(v, BadLine) else v for _, v in iter_jsonl(path, text=path.read_bytes())] == [
        str(v) if isinstance(v, BadLine) else v for _, v in rows
    ]


def test_iter_jsonl_splits_lines_at_newlines_only_and_ignores_a_bom(tmp_path):
    """A JSON string may hold a raw U+2028 (str.splitlines would cut the record there); a file saved with a byte
    order mark still reads from its first line."""
    line = json.dumps({"text": "one\u2028two\x0cthree"}, ensure_ascii=False).encode()
    path = _jsonl(tmp_path / "d.jsonl", [b"\xef\xbb\xbf" + line, line])
    assert [v for _, v in iter_jsonl(path)] == [{"text": "one\u2028two\x0cthree"}] * 2
    assert [v for _, v in iter_jsonl(path, text=path.read_bytes())] == [{"text": "one\u2028two\x0cthree"}] * 2
    assert [v for _, v in iter_jsonl(path, text=path.read_text("utf-8"))] == [{"text": "one\u2028two\x0cthree"}] * 2


# -- dolly rag index: the file fails, with its line; later files are indexed --------------------------------------


@pytest.mark.parametrize("kind", BAD_LINES)
def test_rag_index_reports_the_file_and_line_and_indexes_later_files(capsys, tmp_path, memorized_neox_dir, kind):
    bad, reason = BAD_LINES[kind]
    docs = tmp_path / "docs"
    docs.mkdir()
    broken = _jsonl(docs / "a_notes.jsonl", [b'{"text": "first"}', bad, b'{"text": "third"}'])
    (docs / "b_cars.txt").write_text(CARS + "\n", encoding="utf-8")  # read after the broken file
    _jsonl(docs / "c_more.jsonl", [b'{"text": "Bread is baked in an oven."}'])
    index = tmp_path / "index.sqlite"
    code = dolly_main(["rag", "index", str(docs), "--index", str(index), "--model", str(memorized_neox_dir)])
    out, err = capsys.readouterr()
    assert code == 2, err  # a failed file is reported in the exit status, after the others were indexed
    assert "2 added, 0 skipped (unchanged), 0 replaced, 1 failed" in out
    assert "Traceback" not in err and "RecursionError" not in err and "UnicodeDecodeError" not in err
    failure = [line for line in err.splitlines() if str(broken.name) in line]
    assert len(failure) == 1 and f"{broken}:2: " in failure[0] and reason in failure[0], err

    from dolly_langchain.rag import DocumentIndex

    sources = {Path(s).name for s in DocumentIndex(path=index).sources()}
    assert sources == {"b_cars.txt", "c_more.jsonl"}


# -- dolly-finetune: skippable with --skip-bad-records; one line naming file:line without it -----------------------


@pytest.mark.parametrize("kind", BAD_LINES)
def test_finetune_skips_the_line_with_skip_bad_records(tmp_path, kind):
    from finetune.data import load_records

    bad, _ = BAD_LINES[kind]
    path = _jsonl(tmp_path / "d.jsonl", _records_with(bad))
    records, n_bad = load_records(path, skip_bad_records=True)
    assert n_bad == 1 and len(records) == 4


@pytest.mark.parametrize("kind", BAD_LINES)
def test_finetune_without_the_flag_stops_with_one_line(capsys, tmp_path, kind):
    from finetune.train import main as finetune_main

    bad, reason = BAD_LINES[kind]
    path = _jsonl(tmp_path / "d.jsonl", _records_with(bad))
    try:
        status = finetune_main(["--training-dataset", str(path), "--local-output-dir", str(tmp_path / "out"),
                                "--input-model", "not-loaded-before-the-data-is-read"])
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err and "RecursionError" not in err and "UnicodeDecodeError" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert f"{path}" in lines[0] and "record 2 (line 2)" in lines[0] and reason in lines[0]
    assert "--skip-bad-records" in lines[0]
    assert not (tmp_path / "out").exists()


# -- dolly-eval --dolly-data: one line naming file:line, exit 2 -------------------------------------------------------


@pytest.mark.parametrize("kind", BAD_LINES)
def test_dolly_eval_dolly_data_stops_with_one_line(capsys, tmp_path, kind):
    from dolly_langchain.evaluation.cli import main as eval_main

    bad, reason = BAD_LINES[kind]
    path = _jsonl(tmp_path / "dolly.jsonl", _records_with(bad))
    try:
        status = eval_main(["--generation", "--dolly-data", str(path), "--device", "cpu",
                            "--output", str(tmp_path / "out")])
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err and "RecursionError" not in err and "UnicodeDecodeError" not in err
    lines = [line for line in err.splitlines() if line.startswith("dolly-eval: error:")]
    assert len(lines) == 1, err
    assert f"{path}" in lines[0] and "record 2 (line 2)" in lines[0] and reason in lines[0]
    assert "--skip-bad-records" not in lines[0]
