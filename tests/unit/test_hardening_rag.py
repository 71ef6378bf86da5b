"""Hardening of ``dolly rag`` (issue 16): what a hostile-but-fair user broke in the document index.

- #4: a FIFO or a device (``/dev/zero``) is one reported failure, never a hang or an endless read; files are read
  up to ``--max-file-mb``;
- #11: a broken symbolic link in an indexed directory is counted and reported as failed;
- #6: an index whose file or directory cannot be written is still queried (opened read-only);
- #2: an index file cannot choose which embedding model is downloaded and loaded;
- #5: re-indexing a directory mirrors it (gone files are removed), ``--no-prune``, ``dolly rag remove``;
- #10 (rag): an index path that cannot be written and invalid chunk settings are one line and exit code 2.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from rag_helpers import CARS

import dolly_langchain.rag.embeddings as embeddings_module
from dolly_langchain.cli import main
from dolly_langchain.rag import DocumentIndex, IndexFileError
from dolly_langchain.rag import cli as rag_cli
from dolly_langchain.rag.loaders import DEFAULT_MAX_FILE_MB, UnreadableFileError, read_file

ROOT = Path(__file__).resolve().parents[2]
BREAD = "Bread is baked from flour, water, yeast and salt in a hot oven until the crust is brown."


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def docs(tmp_path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "cars.txt").write_text(CARS + "\n", encoding="utf-8")
    (folder / "bread.md").write_text(f"# Bread\n\n{BREAD}\n", encoding="utf-8")
    return folder


@pytest.fixture
def make_index(tmp_path, dolly_tokenizer):
    def make(path: Path | None = None, **settings) -> DocumentIndex:
        settings.setdefault("tokenizer", dolly_tokenizer)
        return DocumentIndex(path=path or tmp_path / "index.sqlite", **settings)

    return make


def names(sources) -> list[str]:
    return sorted(Path(source).name for source in sources)


# -- #4: only regular files, up to a size cap ---------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="needs FIFOs and /dev/zero")
def test_a_fifo_and_dev_zero_are_reported_failures_not_a_hang(tmp_path, docs, memorized_neox_dir):
    """Run in a subprocess with a timeout: before the fix, opening the FIFO blocks forever. The explicit FIFO comes
    first so that the unfixed command hangs there (and is killed) rather than reading /dev/zero into memory."""
    os.mkfifo(tmp_path / "pipe.txt")
    os.mkfifo(docs / "queue.md")  # inside a directory: not silently skipped either
    command = (
        "import sys; from dolly_langchain.cli import main; "
        f"sys.exit(main(['rag', 'index', {str(tmp_path / 'pipe.txt')!r}, {str(docs)!r}, '/dev/zero', "
        f"'--index', {str(tmp_path / 'index.sqlite')!r}, '--model', {str(memorized_neox_dir)!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", command], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "2 added, 0 skipped (unchanged), 0 replaced, 3 failed" in result.stdout
    failures = [line for line in result.stderr.splitlines() if line.startswith("dolly: cannot index")]
    assert len(failures) == 3 and "Traceback" not in result.stderr
    assert sum("a FIFO" in line for line in failures) == 2
    assert any("/dev/zero" in line and "character device" in line for line in failures)


def test_read_file_refuses_a_file_over_the_cap(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("word " * 100)
    assert read_file(path, max_bytes=500)[1] == path.read_bytes()
    with pytest.raises(UnreadableFileError, match=r"big\.txt: larger than .* --max-file-mb"):
        read_file(path, max_bytes=499)
    assert DEFAULT_MAX_FILE_MB == rag_cli.DEFAULT_MAX_FILE_MB == 64


def test_add_paths_reports_a_file_over_the_cap_and_indexes_the_rest(make_index, docs):
    (docs / "big.txt").write_text("word " * 1000)
    report = make_index().add_paths([docs], max_file_bytes=1000)
    assert names(report.added) == ["bread.md", "cars.txt"]
    assert [Path(source).name for source, _ in report.failed] == ["big.txt"]


def test_cli_max_file_mb(capsys, tmp_path, docs, memorized_neox_dir):
    path = tmp_path / "index.sqlite"
    code, out, err = run(capsys, "rag", "index", docs, "--index", path, "--model", memorized_neox_dir,
                         "--max-file-mb", str(50 / (1024 * 1024)))  # 50 bytes: bread.md and cars.txt are larger
    assert code == 2 and "0 added, 0 skipped (unchanged), 0 replaced, 2 failed" in out
    assert err.count("--max-file-mb") == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["rag", "index", str(docs), "--index", str(path), "--max-file-mb", "0"])
    assert exit_info.value.code == 2


# -- #11: broken symbolic links -----------------------------------------------------------------------------------


def test_a_broken_symlink_in_a_directory_is_reported_as_failed(make_index, docs):
    (docs / "gone.md").symlink_to(docs / "missing.md")
    (docs / "elsewhere").symlink_to(docs / "removed-notes.txt")  # no suffix on the link: its target's counts
    (docs / "picture.png").symlink_to(docs / "missing.png")  # not a supported type: left alone like other files
    report = make_index().add_paths([docs])
    assert names(report.added) == ["bread.md", "cars.txt"]
    assert sorted(Path(source).name for source, _ in report.failed) == ["missing.md", "removed-notes.txt"]
    assert all("broken symbolic link" in reason for _, reason in report.failed)
    assert report.counts()["failed"] == 2


# -- #6: a read-only index can be queried -------------------------------------------------------------------------


def _in_read_only_directory(index_path: Path, query):
    """Run ``query(path)`` where neither the index nor its directory can be written; returns its result.

    As root permissions do not bind, so the query runs in a forked child that drops to the ``nobody`` user."""
    folder = Path(tempfile.mkdtemp(prefix="dolly-ro-"))
    try:
        path = folder / index_path.name
        shutil.copy(index_path, path)
        os.chmod(path, 0o444)
        os.chmod(folder, 0o555)
        if os.geteuid() != 0:
            return query(path)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            try:
                os.close(read)
                os.setgid(65534)
                os.setuid(65534)
                try:
                    result = {"value": query(path)}
                except Exception as err:  # noqa: BLE001 - reported to the parent
                    result = {"error": f"{type(err).__name__}: {err}"}
                os.write(write, json.dumps(result).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            data = pipe.read()
        os.waitpid(pid, 0)
        result = json.loads(data)
        if "error" in result:
            raise AssertionError(result["error"])
        return result["value"]
    finally:
        os.chmod(folder, 0o755)
        shutil.rmtree(folder, ignore_errors=True)


def test_an_index_in_a_read_only_directory_can_be_queried(make_index, docs, tmp_path):
    index = make_index()
    index.add_paths([docs])

    def query(path: Path):
        found = [Path(d.metadata["source"]).name for d in DocumentIndex(path=path, k=1).invoke("engine wheels")]
        try:
            DocumentIndex(path=path).delete("anything")
        except IndexFileError as err:
            refused = str(err)
        else:
            refused = ""
        return {"found": found, "refused": refused, "left": sorted(os.listdir(path.parent))}

    result = _in_read_only_directory(index.path, query)
    assert result["found"] == ["cars.txt"]
    assert "read-only" in result["refused"]  # writing is refused with one clear line
    assert result["left"] == ["index.sqlite"]


def test_a_read_only_index_is_opened_read_only(make_index, docs, monkeypatch):
    index = make_index()
    index.add_paths([docs])
    from dolly_langchain.rag import store

    monkeypatch.setattr(store, "writable", lambda path: False)
    reader = DocumentIndex(path=index.path, k=1)
    assert names(d.metadata["source"] for d in reader.invoke("flour yeast")) == ["bread.md"]
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader._connection().execute("DELETE FROM sources")


# -- #2: an index file cannot choose the embedding model ----------------------------------------------------------


@pytest.fixture
def loaded(monkeypatch) -> list[str]:
    """The embedding models the CLI tried to load (none is: each attempt fails with an OSError)."""
    attempts: list[str] = []

    def embed_documents(self, texts):
        attempts.append(self.model_name)
        raise OSError("not loaded in this test")

    monkeypatch.setattr(embeddings_module.MeanPoolingEmbeddings, "embed_documents", embed_documents)
    return attempts


@pytest.fixture
def built(capsys, docs, tmp_path, memorized_neox_dir) -> Path:
    path = tmp_path / "docs.sqlite"
    assert run(capsys, "rag", "index", docs, "--index", path, "--model", memorized_neox_dir)[0] == 0
    return path


def _record_embeddings(path: Path, name: str) -> None:
    con = sqlite3.connect(path)
    with con:
        con.execute("INSERT OR REPLACE INTO meta VALUES ('embeddings_id', ?)", (name,))
    con.close()


@pytest.mark.parametrize("recorded", ["some-org/some-encoder", "/tmp/a-local-encoder", "evil\nname"])
def test_an_index_cannot_choose_which_embeddings_load(capsys, built, docs, loaded, recorded, memorized_neox_dir):
    _record_embeddings(built, recorded)
    for argv in (("ask", "What?"), ("index", docs, "--model", memorized_neox_dir)):
        code, out, err = run(capsys, "rag", *argv, "--index", built)
        assert code == 2 and loaded == [] and out == ""
        assert err.startswith("dolly: error:") and err.count("\n") == 1
        assert "does not ship" in err and "--embeddings" in err


def test_named_or_shipped_embeddings_do_load(capsys, built, loaded):
    _record_embeddings(built, "some-org/some-encoder")
    code, _, err = run(capsys, "rag", "ask", "What?", "--index", built, "--embeddings", "some-org/some-encoder")
    assert code == 2 and loaded == ["some-org/some-encoder"] and "cannot load embeddings" in err  # the user's choice
    _record_embeddings(built, "all-MiniLM-L6-v2")
    code, _, err = run(capsys, "rag", "ask", "What?", "--index", built)
    assert loaded[1:] == ["all-MiniLM-L6-v2"]  # shipped with this package: loaded without asking


# -- #5: re-indexing a directory mirrors it -----------------------------------------------------------------------


def test_reindexing_a_directory_removes_the_sources_of_deleted_files(make_index, docs, tmp_path):
    other = tmp_path / "docs-2"  # a sibling whose name starts like the directory's: not under it
    other.mkdir()
    (other / "more.txt").write_text(BREAD)
    outside = tmp_path / "outside.txt"
    outside.write_text("Rivers flow to the sea.")
    index = make_index(k=4)
    index.add_paths([docs, other, outside])
    (docs / "bread.md").unlink()
    (other / "more.txt").unlink()
    outside.unlink()

    report = index.add_paths([docs])
    assert names(report.removed) == ["bread.md"] and names(report.skipped) == ["cars.txt"]
    assert names(index.sources()) == ["cars.txt", "more.txt", "outside.txt"]
    assert "bread.md" not in names(d.metadata["source"] for d in index.invoke("flour yeast oven"))

    report = index.add_paths([other], prune=False)
    assert report.removed == [] and "more.txt" in names(index.sources())


def test_cli_prune_no_prune_and_remove(capsys, docs, tmp_path, memorized_neox_dir):
    path = tmp_path / "docs.sqlite"
    (docs / "sub").mkdir()
    (docs / "sub" / "a.txt").write_text("Apples are red.")
    (docs / "sub" / "b.txt").write_text("Bananas are yellow.")
    index = ("--index", path, "--model", memorized_neox_dir)
    assert run(capsys, "rag", "index", docs, *index)[0] == 0
    (docs / "bread.md").unlink()

    code, out, _ = run(capsys, "rag", "index", docs, *index, "--no-prune")
    assert code == 0 and "0 failed, 0 removed" in out and "holds 4 sources" in out
    code, out, _ = run(capsys, "rag", "index", docs, *index)
    assert code == 0 and "3 skipped (unchanged), 0 replaced, 0 failed, 1 removed" in out and "holds 3 sources" in out

    code, out, err = run(capsys, "rag", "remove", docs / "sub", docs / "never-indexed.txt", "--index", path)
    assert code == 2 and out.count("removed ") == 2 and "holds 1 sources" in out
    assert err.strip() == f"dolly: not in the index: {docs / 'never-indexed.txt'}"
    (docs / "cars.txt").unlink()
    code, out, _ = run(capsys, "rag", "remove", docs / "cars.txt", "--index", path)  # gone from disk: still removed
    assert code == 0 and "removed" in out and "holds 0 sources" in out
    code, _, err = run(capsys, "rag", "remove", "x.txt", "--index", tmp_path / "absent.sqlite")
    assert code == 2 and "no index at" in err and err.count("\n") == 1


# -- #10: bad index paths and chunk settings are one line and exit code 2 -----------------------------------------


def _one_line_error(capsys, *argv) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and err.startswith("dolly: error:") and err.count("\n") == 1, err
    return err


def test_index_paths_that_cannot_be_written(capsys, docs, tmp_path, memorized_neox_dir, monkeypatch):
    model = ("--model", memorized_neox_dir)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert "not a directory" in _one_line_error(capsys, "rag", "index", docs, "--index", a_file / "i.sqlite", *model)
    assert "is a directory" in _one_line_error(capsys, "rag", "index", docs, "--index", tmp_path, *model)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and Path(p) != locked)
    assert "not writable" in _one_line_error(capsys, "rag", "index", docs, "--index", locked / "i.sqlite", *model)
    assert not (locked / "i.sqlite").exists()


def test_an_index_path_under_a_file_is_one_library_error(make_index, docs, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(IndexFileError, match="cannot create index"):
        make_index(tmp_path / "file.txt" / "sub" / "i.sqlite").add_paths([docs])


def test_only_failing_inputs_into_a_new_index(capsys, tmp_path, memorized_neox_dir):
    path = tmp_path / "new.sqlite"
    code, out, err = run(capsys, "rag", "index", tmp_path / "missing.txt", "--index", path, "--model",
                         memorized_neox_dir)
    assert code == 2 and "1 failed" in out and "no index was created" in out and not path.exists()
    assert "Traceback" not in err


@pytest.mark.parametrize("flags, expected", [
    (("--chunk-overlap", "300"), "chunk_overlap=300 is more than chunk_tokens=256"),
    (("--chunk-tokens", "32", "--chunk-overlap", "33"), "--chunk-overlap 33 is more than --chunk-tokens 32"),
])
def test_invalid_chunk_settings_are_one_line(capsys, docs, tmp_path, memorized_neox_dir, flags, expected):
    err = _one_line_error(capsys, "rag", "index", docs, "--index", tmp_path / "i.sqlite", "--model",
                          memorized_neox_dir, *flags)
    assert expected in err and "ValidationError" not in err and "pydantic" not in err


@pytest.mark.parametrize("flags", [("--chunk-tokens", "8"), ("--chunk-overlap", "-1")])
def test_out_of_range_chunk_flags_are_usage_errors(capsys, docs, tmp_path, flags):
    with pytest.raises(SystemExit) as exit_info:
        main(["rag", "index", str(docs), "--index", str(tmp_path / "i.sqlite"), *flags])
    assert exit_info.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_a_question_that_is_not_utf8_is_one_line(capsys, tmp_path):
    from dolly_langchain.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["rag", "ask", "caf\udce9?", "--index", str(tmp_path / "none.sqlite")])
    assert exit_info.value.code == 2
    assert "argument question: is not valid UTF-8 (byte 0xe9" in capsys.readouterr().err
