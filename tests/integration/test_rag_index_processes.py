"""DocumentIndex across processes: a writer killed mid-file, readers querying while a writer adds, real MiniLM.

The child processes load the same tiny tokenizer (saved to a directory) and the same fake embeddings
(tests/rag_helpers.py), so they open the index the parent built.
"""

from __future__ import annotations

import importlib.metadata
import multiprocessing
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from rag_helpers import HashEmbeddings, write_corpus

from dolly_langchain.rag import DocumentIndex
from dolly_langchain.rag.embeddings import MINILM_INSTALL_COMMAND, MINILM_PACKAGE, MeanPoolingEmbeddings

TESTS = Path(__file__).resolve().parents[1]
SETTINGS = {"chunk_tokens": 32, "chunk_overlap": 4}

# Adds files, but the first file's transaction stops after its chunks are inserted: it writes the marker and sleeps
# until the parent kills it. A small page cache makes SQLite spill the uncommitted pages into the write-ahead log.
KILLED_WRITER = """
import sys, time
from pathlib import Path
from transformers import AutoTokenizer
import dolly_langchain.rag.ingest as index_module
from dolly_langchain.rag import DocumentIndex

index_path, tokenizer_dir, marker, *files = sys.argv[1:]
original = index_module._insert_chunks

def insert_then_hang(con, rows, vectors):
    original(con, rows, vectors)
    Path(marker).write_text(str(len(rows)))
    time.sleep(300)

index_module._insert_chunks = insert_then_hang
index = DocumentIndex(path=index_path, tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir), chunk_tokens=32,
                      chunk_overlap=4)
index._connection().execute("PRAGMA cache_size = 8")
index.add_paths(files)
"""

# Adds one new file and rewrites moving.txt (all of its chunks name one version) per round.
WRITER = """
import sys
from pathlib import Path
from transformers import AutoTokenizer
from rag_helpers import HashEmbeddings
from dolly_langchain.rag import DocumentIndex

index_path, tokenizer_dir, folder, rounds = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
index = DocumentIndex(path=index_path, tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir), chunk_tokens=32,
                      chunk_overlap=4, embeddings=HashEmbeddings())
for n in range(1, rounds + 1):
    (folder / f"new{n}.txt").write_text(f"Harbour report {n}: ships arrived at dock {n}.")
    (folder / "moving.txt").write_text(" ".join([f"version{n} lighthouse keeper log"] * 40))
    report = index.add_paths([folder / f"new{n}.txt", folder / "moving.txt"])
    assert not report.failed and len(report.added) == 1 and len(report.replaced) == 1, report
"""


@pytest.fixture
def tokenizer_dir(tmp_path, dolly_tokenizer) -> Path:
    folder = tmp_path / "tokenizer"
    dolly_tokenizer.save_pretrained(folder)
    return folder


def child(script: str, *args: str | Path) -> subprocess.Popen:
    path = os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the child exited ({process.returncode}) before the marker:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the child wrote no marker in time")
        time.sleep(0.05)


@pytest.mark.parametrize("killed", ["new", "changed"])
def test_sigkill_mid_file_leaves_the_index_as_it_was_before_that_file(tmp_path, dolly_tokenizer, tokenizer_dir, killed):
    corpus = write_corpus(tmp_path / "docs")
    path = tmp_path / "index.sqlite"
    index = DocumentIndex(path=path, tokenizer=dolly_tokenizer, **SETTINGS)
    index.add_paths([corpus["text"], corpus["pdf"]])
    before = index.info()
    before_chunks = {d.metadata["chunk_id"] for d in index.search("engine doctor vaccines", k=100)}

    if killed == "new":
        target = tmp_path / "docs" / "big.txt"
    else:
        target = corpus["text"]  # replacing it deletes its old chunks in the same transaction
    target.write_text(" ".join(f"Submarine {i} dives under the polar ice." for i in range(400)))
    marker = tmp_path / "inserted"
    wal = path.with_name(path.name + "-wal")
    wal_before = wal.stat().st_size if wal.exists() else 0
    process = child(KILLED_WRITER, path, tokenizer_dir, marker, target, corpus["jsonl"])
    wait_for(marker, process)
    assert int(marker.read_text()) > 50
    assert wal.stat().st_size > wal_before  # the killed transaction had written into the log
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL

    reopened = DocumentIndex(path=path, tokenizer=dolly_tokenizer)
    after = reopened.info()
    assert (after["sources"], after["chunks"]) == (before["sources"], before["chunks"])
    assert reopened.sources() == sorted([str(corpus["text"].resolve()), str(corpus["pdf"].resolve())])
    assert reopened.search("submarine polar ice", k=5) == []
    assert {d.metadata["chunk_id"] for d in reopened.search("engine doctor vaccines", k=100)} == before_chunks
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchall() == [("ok",)]

    report = reopened.add_paths([target, corpus["jsonl"]])
    assert report.counts()["failed"] == 0 and len(report.added) == (2 if killed == "new" else 1)
    assert [Path(d.metadata["source"]).name for d in reopened.search("submarine polar ice", k=1)] == [target.name]


def check_reads(index: DocumentIndex, moving: Path, stop, state: dict) -> None:
    """Query until ``stop()`` (and once more after): every answer consistent, whatever the writer is doing."""
    while True:
        done = stop()
        assert [Path(d.metadata["source"]).name for d in index.search("granite quarries", k=1)] == ["stable.txt"]
        chunks = index.search("lighthouse keeper", k=1000, filter={"source": str(moving)}, search_type="bm25")
        seen = {version for c in chunks for version in re.findall(r"version(\d+)", c.page_content)}
        assert len(seen) == 1, f"chunks of several versions at once: {seen}"  # one snapshot per query
        assert sorted(c.metadata["position"] for c in chunks) == list(range(len(chunks)))
        assert len(index.search("harbour ships dock", k=3)) == 3  # hybrid: the vectors follow the file
        sources = len(index.sources())
        assert sources >= state["sources"], "an added source disappeared"
        state["sources"] = sources
        state["versions"] |= seen
        state["reads"] += 1
        if done:
            return


def test_readers_query_while_a_writer_adds(tmp_path, dolly_tokenizer, tokenizer_dir):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "stable.txt").write_text("The stable anchor document about granite quarries never changes.")
    moving = folder / "moving.txt"
    moving.write_text(" ".join(["version0 lighthouse keeper log"] * 40))
    path = tmp_path / "index.sqlite"
    embeddings = HashEmbeddings()
    DocumentIndex(path=path, tokenizer=dolly_tokenizer, embeddings=embeddings, **SETTINGS).add_paths(
        [folder / "stable.txt", moving])
    shared = DocumentIndex(path=path, embeddings=embeddings)  # one object: a connection per thread and process
    stop_file = tmp_path / "stop"
    rounds = 12
    writer = child(WRITER, path, tokenizer_dir, folder, rounds)

    # A forked process reading through the object it inherited (opened, with a connection, before the fork).
    context = multiprocessing.get_context("fork")
    results = context.Queue()

    def read_in_process() -> None:
        state = {"sources": 0, "versions": set(), "reads": 0}
        try:
            check_reads(shared, moving, stop_file.exists, state)
            results.put(("ok", state["reads"]))
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            results.put(("error", f"{type(err).__name__}: {err}"))

    forked = context.Process(target=read_in_process)
    forked.start()

    errors, states = [], []

    def read_in_thread(index: DocumentIndex) -> None:
        state = {"sources": 0, "versions": set(), "reads": 0}
        states.append(state)
        try:
            check_reads(index, moving, lambda: writer.poll() is not None, state)
        except Exception as err:  # noqa: BLE001 - collected for the assertion below
            errors.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=read_in_thread, args=(index,))
               for index in (shared, shared, DocumentIndex(path=path, embeddings=embeddings))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    output = writer.stdout.read()
    assert writer.wait() == 0, output
    stop_file.touch()
    status, detail = results.get(timeout=120)
    forked.join(timeout=30)

    assert errors == [] and status == "ok", (errors, detail)
    assert all(state["reads"] > 1 and str(rounds) in state["versions"] for state in states)
    assert len(set().union(*(state["versions"] for state in states))) > 2  # they read while it wrote
    assert len(DocumentIndex(path=path).sources()) == 2 + rounds
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_minilm_embeddings_rank_the_related_passage_first(tmp_path, dolly_tokenizer):
    try:
        importlib.metadata.distribution(MINILM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"all-MiniLM-L6-v2 is not installed; install it with: {MINILM_INSTALL_COMMAND}")
    embeddings = MeanPoolingEmbeddings()
    passages = [
        "To reset your password, open Settings, choose Security and follow the emailed link.",
        "Knead the dough for ten minutes, then let it rise in a warm place before baking.",
        "The volcano erupted overnight, covering the island's villages in grey ash.",
    ]
    vectors = np.asarray(embeddings.embed_documents(passages))
    assert vectors.shape == (3, 384)
    assert np.linalg.norm(vectors, axis=1) == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    query = np.asarray(embeddings.embed_query("I forgot my login credentials, how do I get back into my account?"))
    assert int(np.argmax(vectors @ query)) == 0

    index = DocumentIndex(path=tmp_path / "minilm.sqlite", tokenizer=dolly_tokenizer, embeddings=embeddings)
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, passage in zip(("account", "bread", "volcano"), passages):
        (folder / f"{name}.txt").write_text(passage)
    index.add_paths([folder])
    assert index.info()["embeddings_id"] == "all-MiniLM-L6-v2" and index.info()["embeddings_dim"] == "384"
    [top] = index.search("Which mountain spewed smoke and cinders?", k=1, search_type="dense")
    assert Path(top.metadata["source"]).name == "volcano.txt"
    assert Path(index.invoke("How long should I knead?", k=1)[0].metadata["source"]).name == "bread.txt"
