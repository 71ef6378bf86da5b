"""DocumentIndex: storage, ingestion, incremental updates, BM25/dense/hybrid retrieval, refusals, loaders, embeddings.

Everything runs on the tiny tokenizer trained in conftest and on ``HashEmbeddings`` (a bag-of-words fake): no weights,
no network. The multi-process checks (SIGKILL mid-ingest, readers beside a writer, real MiniLM) are in
tests/integration/test_rag_index_processes.py.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from langchain_core.documents import Document
from rag_helpers import CARS, HashEmbeddings, OtherHashEmbeddings, write_corpus, write_pdf

import dolly_langchain.rag.ingest as index_module
from dolly_langchain.rag import DocumentIndex, IndexFileError, IndexMismatchError, IngestReport
from dolly_langchain.rag.embeddings import MINILM, MINILM_INSTALL_COMMAND, MeanPoolingEmbeddings
from dolly_langchain.rag.index import embeddings_identity
from dolly_langchain.rag.loaders import UnreadableFileError, read_file

LONG_TEXT = " ".join(
    f"Sentence {i} tells how the river flows past mountain number {i} towards the sea." for i in range(60)
)


@pytest.fixture
def corpus(tmp_path) -> dict[str, Path]:
    return write_corpus(tmp_path / "docs")


@pytest.fixture
def make_index(tmp_path, dolly_tokenizer):
    """``make_index(**settings)``: a DocumentIndex on tmp_path/index.sqlite with the tiny tokenizer."""

    def make(path: Path | None = None, **settings) -> DocumentIndex:
        settings.setdefault("tokenizer", dolly_tokenizer)
        return DocumentIndex(path=path or tmp_path / "index.sqlite", **settings)

    return make


def sources_of(documents: list[Document]) -> list[str]:
    return [Path(d.metadata["source"]).name for d in documents]


# -- storage and ingestion -----------------------------------------------------------------------------------------


def test_one_sqlite_file_holds_chunks_metadata_and_a_bm25_fts5_table(make_index, corpus):
    index = make_index()
    report = index.add_paths([corpus["text"]])

    assert report.counts() == {"added": 1, "skipped": 0, "replaced": 0, "failed": 0, "chunks": 1}
    con = sqlite3.connect(index.path)
    tables = {name: sql for name, sql in con.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'")}
    assert "USING fts5" in tables["chunks_fts"]
    row = con.execute("SELECT source, position, chunk_id, content_hash, text FROM chunks").fetchone()
    assert row[:2] == (str(corpus["text"].resolve()), 0)
    assert len(row[2]) == 16 and len(row[3]) == 64 and row[4] == CARS
    # The FTS table answers BM25-ranked queries by itself.
    assert con.execute("SELECT bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH 'engine'").fetchone()[0] < 0


def test_adds_text_markdown_pdf_and_jsonl_from_a_directory(make_index, corpus):
    folder = corpus["text"].parent
    (folder / "nested").mkdir()
    corpus["jsonl"] = corpus["jsonl"].rename(folder / "nested" / "facts.jsonl")  # directories are read recursively
    (folder / "logo.png").write_bytes(b"\x89PNG")  # other file types in a directory are left alone
    index = make_index()
    report = index.add_paths([folder])

    assert sorted(Path(s).name for s in report.added) == ["bread.md", "cars.txt", "clinic.pdf", "facts.jsonl"]
    assert report.failed == [] and report.chunks == index.info()["chunks"] == 6  # 1 + 1 + 2 pages + 2 records
    assert index.sources() == sorted(str(p.resolve()) for p in corpus.values())

    assert sources_of(index.search("how do I bake a loaf of bread", k=1)) == ["bread.md"]
    [page] = index.search("vaccines hospital", k=1)
    assert Path(page.metadata["source"]).name == "clinic.pdf" and page.metadata["page"] == 2
    assert page.page_content == "Nurses give vaccines at the hospital."
    [record] = index.search("penguins krill", k=1)
    assert record.page_content == "Penguins live in Antarctica and eat krill and fish."
    assert {k: record.metadata[k] for k in ("category", "id", "line")} == {"category": "biology", "id": 2, "line": 2}
    assert "text" not in record.metadata


def test_jsonl_text_field_is_named_and_the_other_fields_become_metadata(make_index, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"instruction": "Why is the sky blue?", "response": "Rayleigh scattering of light."})
                    + "\n\n" + json.dumps({"instruction": "Name a prime.", "response": "Seven is prime."}) + "\n")
    index = make_index()
    report = index.add_paths([path], text_field="response")

    assert report.counts()["added"] == 1 and report.chunks == 2
    [document] = index.search("scattering", k=1)
    assert document.page_content == "Rayleigh scattering of light."
    assert document.metadata["instruction"] == "Why is the sky blue?" and document.metadata["line"] == 1
    assert "response" not in document.metadata
    # A JSONL file without that field fails with its line named; the field is the fix.
    failed = make_index(tmp_path / "other.sqlite").add_paths([path]).failed
    assert failed == [(str(path.resolve()), f"{path}:1: no string field 'text'; name the text field with --text-field")]


def test_chunks_are_cut_with_the_tokenizer_and_overlap(make_index, dolly_tokenizer, tmp_path):
    path = tmp_path / "long.txt"
    path.write_text(LONG_TEXT)
    index = make_index(chunk_tokens=48, chunk_overlap=12)
    report = index.add_paths([path])

    chunks = sorted(index.search("river", k=1000), key=lambda d: d.metadata["position"])
    assert len(chunks) == report.chunks > 5
    assert [c.metadata["position"] for c in chunks] == list(range(len(chunks)))
    assert all(len(dolly_tokenizer.tokenize(c.page_content)) <= 48 for c in chunks)
    for before, after in zip(chunks, chunks[1:]):  # neighbours share words: the end of one starts the next
        assert after.page_content.split()[0] in before.page_content.split()[-12:]
    words = LONG_TEXT.split()
    assert all(word in {w for c in chunks for w in c.page_content.split()} for word in words)


def test_markdown_is_cut_at_headings(make_index, tmp_path):
    path = tmp_path / "guide.md"
    sections = [f"## Section {name}\n\n" + " ".join([f"{name} paragraph text"] * 6) for name in ("alpha", "beta")]
    path.write_text("# Guide\n\n" + "\n\n".join(sections))
    index = make_index(chunk_tokens=64, chunk_overlap=0)
    index.add_paths([path])

    chunks = index.search("section", k=100)
    assert any(c.page_content.startswith("## Section beta") for c in chunks)


def test_chunk_ids_are_stable_across_indexes(make_index, corpus, tmp_path):
    first = make_index(tmp_path / "a.sqlite")
    second = make_index(tmp_path / "b.sqlite")
    first.add_paths([corpus["pdf"]])
    second.add_paths([corpus["pdf"]])

    ids = [d.metadata["chunk_id"] for d in first.search("doctor nurses", k=10)]
    assert len(ids) == 2 and len(set(ids)) == 2
    assert sorted(ids) == sorted(d.metadata["chunk_id"] for d in second.search("doctor nurses", k=10))


def test_add_documents_groups_by_source_and_keeps_metadata(make_index):
    index = make_index()
    documents = [
        Document(page_content="Tea is brewed from leaves.", metadata={"source": "kb://drinks", "kind": "faq"}),
        Document(page_content="Coffee is brewed from beans.", metadata={"source": "kb://drinks", "kind": "faq"}),
        Document(page_content="Bicycles have two wheels.", metadata={"topic": "transport"}),
        Document(page_content="   ", metadata={"source": "kb://blank"}),
    ]
    report = index.add_documents(documents)

    assert report.added == ["kb://drinks", "documents"] and report.chunks == 3
    assert [source for source, _ in report.failed] == ["kb://blank"]
    [coffee] = index.search("coffee beans", k=1)
    assert coffee.metadata["source"] == "kb://drinks" and coffee.metadata["kind"] == "faq"
    assert coffee.metadata["position"] == 1
    [bicycles] = index.search("wheels", k=1)
    assert bicycles.metadata["source"] == "documents" and bicycles.metadata["topic"] == "transport"

    assert index.add_documents(documents[:3]).skipped == ["kb://drinks", "documents"]
    changed = [Document(page_content="Cocoa is made from beans.", metadata={"source": "kb://drinks"})]
    assert index.add_documents(changed).replaced == ["kb://drinks"]
    assert sources_of(index.search("coffee tea", k=5)) == []
    assert index.search("cocoa", k=5)[0].page_content == "Cocoa is made from beans."


def test_ingest_report_counts():
    report = IngestReport(added=["a", "b"], skipped=["c"], failed=[("d", "d: broken")], chunks=7)
    assert report.counts() == {"added": 2, "skipped": 1, "replaced": 0, "failed": 1, "chunks": 7}


# -- incremental updates -------------------------------------------------------------------------------------------


def test_unchanged_files_are_skipped_changed_replaced_deleted_removed(make_index, corpus, monkeypatch):
    embeddings = HashEmbeddings()
    index = make_index(embeddings=embeddings)
    assert len(index.add_paths([corpus["text"].parent]).added) == 4
    embedded = embeddings.calls

    again = index.add_paths([corpus["text"].parent])
    assert again.counts() == {"added": 0, "skipped": 4, "replaced": 0, "failed": 0, "chunks": 0}
    assert embeddings.calls == embedded  # a skipped file is not even embedded again

    corpus["text"].write_text("The bicycle chain needs oil.")
    changed = index.add_paths([corpus["text"].parent])
    assert changed.replaced == [str(corpus["text"].resolve())] and len(changed.skipped) == 3
    assert index.search("bicycle chain", k=1, search_type="bm25")[0].page_content == "The bicycle chain needs oil."
    assert index.search("mechanic brakes", k=5, search_type="bm25") == []
    assert index.info()["chunks"] == 6

    monkeypatch.chdir(corpus["text"].parent)
    assert index.delete("bread.md") == 1  # a path relative to the current directory
    corpus["pdf"].unlink()
    assert index.delete("clinic.pdf") == 2  # the file is gone from disk, its chunks still go
    assert index.delete(corpus["pdf"]) == 0
    assert index.delete("never-indexed.txt") == 0
    assert [Path(s).name for s in index.sources()] == ["cars.txt", "facts.jsonl"]
    assert index.search("bake bread doctor vaccines", k=5, search_type="bm25") == []
    assert index.info()["chunks"] == 3


def test_an_error_mid_file_leaves_the_index_as_it_was(make_index, corpus, monkeypatch):
    index = make_index()
    index.add_paths([corpus["text"], corpus["jsonl"]])
    before = index.info()

    def fail_after_insert(con, rows, vectors):
        original(con, rows, vectors)
        raise KeyboardInterrupt  # what Ctrl-C mid-file does

    original = index_module._insert_chunks
    monkeypatch.setattr(index_module, "_insert_chunks", fail_after_insert)
    corpus["text"].write_text("Completely new text about submarines.")
    with pytest.raises(KeyboardInterrupt):
        index.add_paths([corpus["text"], corpus["pdf"]])

    after = index.info()
    assert (after["sources"], after["chunks"]) == (before["sources"], before["chunks"])
    assert index.search("submarines", k=5) == []
    assert sources_of(index.search("mechanic brakes", k=1)) == ["cars.txt"]
    monkeypatch.undo()
    assert index.add_paths([corpus["text"], corpus["pdf"]]).counts()["replaced"] == 1


def test_unreadable_files_fail_one_line_each_and_the_rest_go_on(make_index, corpus, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (bad / "broken.jsonl").write_text('{"text": "fine"}\n{not json\n')
    (bad / "broken.pdf").write_bytes(b"%PDF-1.4\nnot really a pdf\n")
    write_pdf(bad / "scanned.pdf", ["", ""])
    (bad / "empty.md").write_text("  \n")
    (bad / "notes.docx").write_bytes(b"PK\x03\x04")
    missing = tmp_path / "missing.txt"
    seen = []

    report = make_index().add_paths(
        [corpus["text"], *sorted(bad.iterdir()), missing, corpus["jsonl"]], on_failure=lambda s, r: seen.append(s)
    )

    assert report.counts() == {"added": 2, "skipped": 0, "replaced": 0, "failed": 7, "chunks": 3}
    reasons = dict(report.failed)
    assert seen == [source for source, _ in report.failed]
    expected = {
        "latin1.txt": "not UTF-8", "broken.jsonl": ":2: invalid JSON", "broken.pdf": "not a readable PDF",
        "scanned.pdf": "no text to index", "empty.md": "no text to index", "notes.docx": "unsupported file type .docx",
        "missing.txt": "No such file",
    }
    for name, reason in expected.items():
        [line] = [r for s, r in reasons.items() if Path(s).name == name]
        assert name in line and reason in line and "\n" not in line


def test_add_paths_takes_one_path_too(make_index, corpus):
    assert make_index().add_paths(str(corpus["text"])).added == [str(corpus["text"].resolve())]


# -- retrieval -----------------------------------------------------------------------------------------------------


def test_retriever_k_filter_as_retriever_and_invoke(make_index, corpus, monkeypatch):
    index = make_index()
    index.add_paths([corpus["text"].parent])
    query = "engine oil bread doctor vaccines penguins volcanoes"

    assert len(index.invoke(query)) == 4  # k defaults to 4
    documents = index.invoke(query, k=2)
    assert len(documents) == 2 and all(isinstance(d, Document) for d in documents)
    assert all({"source", "chunk_id", "position"} <= set(d.metadata) for d in documents)
    assert all(d.id == d.metadata["chunk_id"] for d in documents)

    pdf = str(corpus["pdf"].resolve())
    assert {d.metadata["source"] for d in index.search(query, k=10, filter={"source": pdf})} == {pdf}
    retriever = index.as_retriever(k=1, filter={"source": [pdf, str(corpus["text"])]})
    assert len(retriever.invoke(query)) == 1
    assert sources_of(retriever.invoke("mechanic")) == ["cars.txt"]
    assert retriever.invoke("penguins") == []  # facts.jsonl is filtered out
    assert len(index.invoke(query)) == 4  # the original keeps its settings

    monkeypatch.chdir(corpus["text"].parent)
    assert sources_of(index.search(query, k=10, filter={"source": "clinic.pdf"})) == ["clinic.pdf"] * 2
    assert sources_of(index.search(query, k=10, filter={"category": "geology"})) == ["facts.jsonl"]


def test_bad_retrieval_settings_are_refused(make_index, corpus):
    index = make_index()
    index.add_paths([corpus["text"]])
    with pytest.raises(TypeError, match="unknown settings.*'top_k'"):
        index.as_retriever(top_k=3)
    with pytest.raises(ValueError, match="k=0"):
        index.as_retriever(k=0)
    with pytest.raises(ValueError, match="search_type='semantic'"):
        index.search("engine", search_type="semantic")
    with pytest.raises(ValueError, match="needs embeddings"):
        index.search("engine", search_type="dense")
    with pytest.raises(ValueError, match="dense_weight"):
        index.as_retriever(dense_weight=1.5)


def test_dense_retrieval_finds_what_bm25_cannot(make_index, corpus):
    index = make_index(embeddings=HashEmbeddings())
    index.add_paths([corpus["text"].parent])
    info = index.info()
    assert info["embeddings_id"] == "rag_helpers.HashEmbeddings" and info["embeddings_dim"] == "64"

    assert index.search("automobile", search_type="bm25") == []  # no shared word
    [dense] = index.search("automobile", k=1, search_type="dense")
    [hybrid] = index.invoke("automobile", k=1)  # hybrid is the default with embeddings
    assert sources_of([dense, hybrid]) == ["cars.txt", "cars.txt"]
    assert (dense.metadata["retrieval"], hybrid.metadata["retrieval"]) == ("dense", "hybrid")
    assert sources_of(index.search("physician", k=1, filter={"source": str(corpus["pdf"])})) == ["clinic.pdf"]


def test_hybrid_fuses_min_max_normalised_scores_with_dense_weight_0_7(make_index, corpus):
    index = make_index(embeddings=HashEmbeddings())
    index.add_paths([corpus["text"].parent])
    query = "the doctor repairs the engine of the car"

    def scores(**settings):
        return {d.metadata["chunk_id"]: d.metadata["score"] for d in index.search(query, k=100, **settings)}

    def minmax(values):
        low, high = min(values.values()), max(values.values())
        return {i: (s - low) / (high - low) for i, s in values.items()}

    bm25, dense = minmax(scores(search_type="bm25")), minmax(scores(search_type="dense"))
    assert index.dense_weight == 0.7 and set(bm25) < set(dense)
    expected = {i: 0.7 * dense[i] + 0.3 * bm25.get(i, 0.0) for i in dense}
    hybrid = scores(search_type="hybrid")
    assert hybrid == pytest.approx(expected, abs=1e-4)
    assert list(hybrid) == sorted(hybrid, key=hybrid.get, reverse=True)
    only_dense = index.as_retriever(k=100, dense_weight=1.0).invoke(query)
    assert [d.metadata["score"] for d in only_dense] == pytest.approx([dense[d.metadata["chunk_id"]]
                                                                        for d in only_dense], abs=1e-4)


def test_a_retriever_copy_sees_later_writes(make_index, corpus):
    index = make_index(embeddings=HashEmbeddings())
    index.add_paths([corpus["text"]])
    retriever = index.as_retriever(k=1, search_type="dense")
    assert sources_of(retriever.invoke("vehicle")) == ["cars.txt"]

    corpus["text"].write_text("Submarines dive under the ocean.")
    index.add_paths([corpus["text"], corpus["pdf"]])
    assert retriever.invoke("submarines ocean")[0].page_content == "Submarines dive under the ocean."
    index.delete(corpus["text"])
    assert sources_of(retriever.invoke("submarines ocean")) == ["clinic.pdf"]


def test_a_missing_or_empty_index(make_index, tmp_path):
    index = make_index()
    with pytest.raises(IndexFileError, match=f"no index at {index.path}"):
        index.search("anything")
    with pytest.raises(IndexFileError, match="no index"):
        index.delete("a.txt")
    index.path.touch()  # what a first add killed before its commit can leave
    assert (index.sources(), index.search("anything"), index.info()["chunks"]) == ([], [], 0)
    with pytest.raises(ValueError, match="tokenizer"):
        DocumentIndex(path=tmp_path / "new.sqlite").add_documents([Document(page_content="x", metadata={})])


def test_chunk_overlap_is_checked_against_chunk_tokens(make_index):
    with pytest.raises(ValueError, match="chunk_overlap=65 is more than chunk_tokens=64; pass a smaller"):
        make_index(chunk_tokens=64, chunk_overlap=65)
    small = make_index(chunk_tokens=16)  # the default overlap (32) shrinks to fit
    assert (small.chunk_tokens, small.chunk_overlap) == (16, 4)
    small.add_documents([Document(page_content=LONG_TEXT, metadata={"source": "long"})])
    reopened = make_index(chunk_tokens=16)
    assert reopened.chunk_overlap == 4 and len(reopened.search("river", k=100)) > 10


# -- refusals: another tokenizer, chunk size or embedding model; a corrupt or foreign file ------------------------


@pytest.fixture
def built(make_index, corpus) -> DocumentIndex:
    """An index of the corpus built with chunk_tokens=64, chunk_overlap=8 and no embeddings."""
    index = make_index(chunk_tokens=64, chunk_overlap=8)
    index.add_paths([corpus["text"].parent])
    return index


def test_an_existing_index_keeps_its_chunk_settings(built, make_index):
    reopened = make_index()
    assert (reopened.chunk_tokens, reopened.chunk_overlap) == (64, 8)
    assert DocumentIndex(path=built.path).info()["tokenizer_fingerprint"] == built.info()["tokenizer_fingerprint"]


@pytest.mark.parametrize("setting, message", [
    ({"chunk_tokens": 128}, "was built with chunk_tokens=64, not 128; pass chunk_tokens=64 or rebuild it"),
    ({"chunk_overlap": 16}, "was built with chunk_overlap=8, not 16; pass chunk_overlap=8 or rebuild it"),
])
def test_other_chunk_settings_are_refused(built, make_index, setting, message):
    with pytest.raises(IndexMismatchError, match=message) as error:
        make_index(**setting)
    assert str(built.path) in str(error.value)


def test_another_tokenizer_is_refused(built, plain_tokenizer):
    with pytest.raises(IndexMismatchError, match="was chunked with another tokenizer .* rebuild it") as error:
        DocumentIndex(path=built.path, tokenizer=plain_tokenizer)
    assert str(built.path) in str(error.value)


def test_an_index_without_vectors_refuses_embeddings(built, make_index):
    with pytest.raises(IndexMismatchError, match="built without embeddings.*rebuild it") as error:
        make_index(embeddings=HashEmbeddings())
    assert str(built.path) in str(error.value)


def test_other_embeddings_are_refused_and_no_embeddings_cannot_add(make_index, corpus, tmp_path):
    index = make_index(embeddings=HashEmbeddings())
    index.add_paths([corpus["text"]])
    with pytest.raises(IndexMismatchError, match="holds vectors of 'rag_helpers.HashEmbeddings', not "
                                                 "'rag_helpers.OtherHashEmbeddings'"):
        make_index(embeddings=OtherHashEmbeddings())
    named = tmp_path / "named.sqlite"  # two models behind one class: embeddings_id tells them apart
    make_index(named, embeddings=HashEmbeddings(), embeddings_id="name-a").add_paths([corpus["text"]])
    with pytest.raises(IndexMismatchError, match="holds vectors of 'name-a', not 'name-b'"):
        make_index(named, embeddings=HashEmbeddings(), embeddings_id="name-b")

    same_name_other_size = make_index(embeddings=HashEmbeddings(dim=32))
    with pytest.raises(IndexMismatchError, match="64-dimensional"):
        same_name_other_size.add_paths([corpus["pdf"]])

    bm25_only = make_index()  # querying without the embeddings works (BM25) ...
    assert sources_of(bm25_only.search("mechanic", k=1)) == ["cars.txt"]
    with pytest.raises(IndexMismatchError, match="add to it with those embeddings"):  # ... adding does not
        bm25_only.add_paths([corpus["pdf"]])
    assert index.info()["chunks"] == 1


def _assert_file_error(path: Path, *message: str) -> None:
    with pytest.raises(IndexFileError) as error:
        DocumentIndex(path=path)
    text = str(error.value)
    assert str(path) in text and all(m in text for m in message), text
    assert error.value.__cause__ is None and (error.value.__context__ is None or error.value.__suppress_context__)


def test_a_text_file_is_not_an_index(tmp_path):
    path = tmp_path / "notes.sqlite"
    path.write_text("These are my notes, not a database.\n" * 10)
    _assert_file_error(path, "not an SQLite file", "rebuild")


def test_a_foreign_sqlite_file_is_not_an_index(tmp_path):
    path = tmp_path / "app.sqlite"
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE users (name TEXT)")
        con.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    _assert_file_error(path, "not a dolly-langchain index (no table chunks, chunks_fts, sources)", "rebuild")


def test_a_truncated_index_is_refused(make_index, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("\n\n".join(LONG_TEXT.replace("river", f"river{i}") for i in range(30)))
    index = make_index(chunk_tokens=32, chunk_overlap=4)
    index.add_paths([big])
    copy = tmp_path / "copy.sqlite"
    shutil.copy(index.path, copy)  # the file alone is the index: the adds end with a checkpoint
    assert DocumentIndex(path=copy).info()["chunks"] == index.info()["chunks"] > 100
    truncated = tmp_path / "truncated.sqlite"
    shutil.copy(index.path, truncated)
    os.truncate(truncated, os.path.getsize(truncated) // 2)
    _assert_file_error(truncated, "not a readable dolly-langchain index", "truncated", "delete it and rebuild")


def test_a_corrupt_index_is_refused(built, tmp_path):
    corrupt = tmp_path / "corrupt.sqlite"
    shutil.copy(built.path, corrupt)
    data = bytearray(corrupt.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    data[page_size:] = os.urandom(len(data) - page_size)  # every page but the header's
    corrupt.write_bytes(bytes(data))
    _assert_file_error(corrupt, "not a readable dolly-langchain index", "rebuild")


# -- loaders and embeddings ------------------------------------------------------------------------------------------


def test_read_file_returns_documents_and_bytes(corpus):
    documents, data = read_file(corpus["pdf"])
    assert [d.metadata for d in documents] == [{"source": str(corpus["pdf"].resolve()), "page": n} for n in (1, 2)]
    assert data == corpus["pdf"].read_bytes()
    csv = corpus["text"].with_suffix(".csv")
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(UnreadableFileError, match=r"cars\.csv: unsupported file type \.csv; supported: \.txt"):
        read_file(csv)


def test_embeddings_identity_and_missing_package(monkeypatch):
    assert embeddings_identity(MeanPoolingEmbeddings(model_name="sentence-transformers/all-MiniLM-L6-v2")) == MINILM
    assert embeddings_identity(HashEmbeddings()) == "rag_helpers.HashEmbeddings"
    with pytest.raises(ValueError):
        MeanPoolingEmbeddings(batchsize=8)

    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModuleNotFoundError, match=MINILM_INSTALL_COMMAND.replace(".", r"\.")):
        MeanPoolingEmbeddings().embed_query("hello")


def test_vectors_are_stored_normalised(make_index, corpus):
    index = make_index(embeddings=HashEmbeddings())
    index.add_paths([corpus["jsonl"]])
    blobs = [row[0] for row in sqlite3.connect(index.path).execute("SELECT embedding FROM chunks")]
    norms = [np.linalg.norm(np.frombuffer(blob, dtype=np.float32)) for blob in blobs]
    assert norms == pytest.approx([1.0, 1.0], abs=1e-6)
