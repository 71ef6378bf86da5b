"""``DocumentIndex``: a persistent document index in one SQLite file, and a LangChain retriever over it.

No server and no model weights by default: chunks, their metadata and an FTS5 full-text table ranked by BM25 live
in one SQLite file (Python's standard library). Give it any LangChain ``Embeddings`` and the chunk vectors are
stored beside the chunks, for dense or hybrid retrieval::

    from dolly_langchain.rag import DocumentIndex, load_tokenizer

    index = DocumentIndex(path="docs.sqlite", tokenizer=load_tokenizer())      # the embedded model's tokenizer
    index.add_paths(["handbook/", "faq.pdf", "tickets.jsonl"])                   # added / skipped / replaced / failed
    index.invoke("How do I reset my password?")                                 # top-k Documents (a BaseRetriever)
    index.as_retriever(k=8, filter={"source": "/abs/path/faq.pdf"})

**Chunks** are cut by LangChain's ``RecursiveCharacterTextSplitter`` measuring length with the *generating
model's* tokenizer (``chunk_tokens`` with ``chunk_overlap``), so a chunk's size is what it costs in the prompt.

**Incremental and crash-safe**: each file is one transaction. A file whose bytes are unchanged is skipped (content
hash); a changed one has its old chunks replaced; :meth:`DocumentIndex.delete` removes one. A process killed
mid-file leaves the index as it was before that file. The file is in WAL mode, so readers query while one writer
adds (each query reads one snapshot); every add or delete ends with a checkpoint, so the ``.sqlite`` file alone
holds the index once no reader is left behind.

**Retrieval** (``search_type``): ``"bm25"`` (FTS5: the Porter-stemmed words of the query, English function words
dropped, OR-ed together), ``"dense"`` (cosine similarity of stored vectors, brute force in numpy), ``"hybrid"`` (the
default when embeddings are given): weighted normalised-score fusion. The top ``max(50, 10k)`` candidates of both
rankers are pooled; each ranker's scores are min-max normalised over that pool (a candidate a ranker did not return
scores 0 there) and the fused score is ``dense_weight * dense + (1 - dense_weight) * bm25``, with
``dense_weight=0.7``: with a small dense model, equal weights pull hit@1 down on databricks-dolly-15k (0.80 -> 0.34
in ../shared/NOTES.md) while 0.3/0.7 beats either ranker alone (benchmarks/rag.py).

**Refusals**: an index is tied to the tokenizer and chunk settings that cut it and to the embedding model that
made its vectors; opening it with others raises :class:`IndexMismatchError` saying what to rebuild. A corrupt,
truncated or foreign file raises :class:`IndexFileError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from dolly_langchain.rag.loaders import MARKDOWN_SUFFIXES, UnreadableFileError, expand_paths, read_file

SCHEMA_VERSION = 1
DEFAULT_CHUNK_TOKENS = 256
DEFAULT_CHUNK_OVERLAP = 32
SearchType = Literal["bm25", "dense", "hybrid"]

# Statements run one by one inside the first write's transaction (executescript would commit it half-way).
_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE sources (
        source TEXT PRIMARY KEY, content_hash TEXT NOT NULL, chunks INTEGER NOT NULL, indexed_at TEXT NOT NULL
    )""",
    """CREATE TABLE chunks (
        id INTEGER PRIMARY KEY,
        chunk_id TEXT NOT NULL UNIQUE,
        source TEXT NOT NULL,
        position INTEGER NOT NULL,
        text TEXT NOT NULL,
        metadata TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        embedding BLOB
    )""",
    "CREATE INDEX chunks_by_source ON chunks (source, position)",
    # External-content FTS5 table over chunks.text, kept in step by the two triggers below.
    """CREATE VIRTUAL TABLE chunks_fts USING fts5 (
        text, content='chunks', content_rowid='id', tokenize='porter unicode61 remove_diacritics 2'
    )""",
    """CREATE TRIGGER chunks_fts_insert AFTER INSERT ON chunks BEGIN
        INSERT INTO chunks_fts (rowid, text) VALUES (new.id, new.text);
    END""",
    """CREATE TRIGGER chunks_fts_delete AFTER DELETE ON chunks BEGIN
        INSERT INTO chunks_fts (chunks_fts, rowid, text) VALUES ('delete', old.id, old.text);
    END""",
)

_WORD = re.compile(r"\w+", re.UNICODE)
# English function words left out of BM25 queries (a query of only these keeps them). OR-ing "how", "the", "is"
# into a query matches nearly every chunk: on dolly-15k dropping them raised hit@5 from 0.918 to 0.932 and cut
# the median query time from about 9 ms to 1.5 ms (benchmarks/rag.py, before and after).
_STOPWORDS = frozenset(
    "a an and are as at be by for from has have how i in is it its of on or that the this to was were what when "
    "where which who whom whose why will with do does did can you your me my we our they their he she his her "
    "them there these those been being than then so if not no about into over after before also".split()
)
_TABLES = {"meta", "sources", "chunks", "chunks_fts"}
_SQLITE_MAGIC = b"SQLite format 3\0"
_MISUSE = (sqlite3.ProgrammingError, sqlite3.InterfaceError)


class IndexFileError(RuntimeError):
    """The index file is missing, corrupt, truncated or not an index; the message names the file."""


class IndexMismatchError(ValueError):
    """The index was built with another tokenizer, chunk size or embedding model; the message says what to rebuild."""


@dataclass
class IngestReport:
    """What one call to :meth:`DocumentIndex.add_paths` / :meth:`DocumentIndex.add_documents` did, per source."""

    added: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    """``(source, one-line reason)`` for each source that could not be indexed; the others went on."""
    chunks: int = 0
    """Chunks written (added and replaced sources)."""

    def counts(self) -> dict[str, int]:
        return {
            "added": len(self.added), "skipped": len(self.skipped), "replaced": len(self.replaced),
            "failed": len(self.failed), "chunks": self.chunks,
        }


class DocumentIndex(BaseRetriever):
    """A persistent chunk index in one SQLite file, usable directly as a LangChain retriever.

    Opening an existing file checks it (integrity, schema, and the settings below against the ones it was
    built with); a path that does not exist yet is created by the first add.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    path: Path
    """The SQLite file."""
    tokenizer: Any = None
    """The generating model's tokenizer; chunks are measured in its tokens. Needed to add, optional to query."""
    chunk_tokens: int = Field(default=DEFAULT_CHUNK_TOKENS, ge=16)
    """Most tokens per chunk. An existing index keeps the value it was built with unless you pass another."""
    chunk_overlap: int = Field(default=DEFAULT_CHUNK_OVERLAP, ge=0)
    """Tokens shared by neighbouring chunks of one document (by default 32, or a quarter of a smaller
    ``chunk_tokens``)."""
    embeddings: Embeddings | None = None
    """Any LangChain ``Embeddings`` for dense/hybrid retrieval; ``None`` gives BM25 only."""
    embeddings_id: str | None = None
    """Name recorded for ``embeddings`` (default: see :func:`embeddings_identity`); must match on reopen."""
    k: int = Field(default=4, ge=1)
    """Documents returned per query."""
    filter: dict[str, Any] | None = None
    """Metadata filter: ``{"source": path or [paths]}`` and/or other metadata keys with the value to equal."""
    search_type: SearchType | None = None
    """``"bm25"``, ``"dense"`` or ``"hybrid"``; ``None`` picks hybrid when ``embeddings`` is set, else BM25."""
    dense_weight: float = Field(default=0.7, ge=0.0, le=1.0)
    """Weight of the dense score in hybrid fusion; BM25 gets the rest."""

    _local: threading.local = PrivateAttr(default_factory=threading.local)
    # ``{"cache": (generation, ids, matrix)}``: one dict shared by the copies ``as_retriever`` makes.
    _vectors: dict = PrivateAttr(default_factory=dict)
    _fingerprint: str | None = PrivateAttr(default=None)
    _checked: bool = PrivateAttr(default=False)

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        # Here, not in a validator: pydantic would turn an IndexMismatchError (a ValueError) into a ValidationError.
        if self.path.exists():
            self._check_file()

    @model_validator(mode="after")
    def _settings(self) -> DocumentIndex:
        if self.chunk_overlap >= self.chunk_tokens and "chunk_overlap" not in self.model_fields_set:
            # The default overlap would swallow small chunks; object.__setattr__ keeps it marked as a default.
            object.__setattr__(self, "chunk_overlap", self.chunk_tokens // 4)
        if self.chunk_overlap > self.chunk_tokens:
            raise ValueError(
                f"chunk_overlap={self.chunk_overlap} is more than chunk_tokens={self.chunk_tokens}; pass a smaller "
                "chunk_overlap"
            )
        if self.tokenizer is not None:
            self._fingerprint = tokenizer_fingerprint(self.tokenizer)  # once: it hashes the whole vocabulary
        if self.embeddings is not None and self.embeddings_id is None:
            self.embeddings_id = embeddings_identity(self.embeddings)
        return self

    # -- opening and checking ------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """One connection per thread and process (sqlite3 connections must not cross threads, and an SQLite
        connection must not be used in a child forked after it was opened: the child holds none of its locks)."""
        con = getattr(self._local, "con", None)
        if con is None or self._local.pid != os.getpid():
            try:
                con = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=True)
                con.execute("PRAGMA busy_timeout = 60000")
                # In WAL mode NORMAL cannot corrupt the file or lose a commit to a killed process; only a power cut
                # may undo the last commits. It saves an fsync per file.
                con.execute("PRAGMA synchronous = NORMAL")
            except sqlite3.Error as err:
                raise IndexFileError(f"cannot open index {self.path}: {err}") from None
            self._local.con, self._local.pid = con, os.getpid()
        return con

    @contextmanager
    def _reading(self, snapshot: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection for queries; SQLite errors become :class:`IndexFileError` naming the file.

        ``snapshot``: run the queries in one read transaction, so a writer committing in between (a changed file
        replacing its chunks) cannot make them disagree.
        """
        if not self.path.exists():
            raise IndexFileError(
                f"no index at {self.path}; build one with: dolly rag index PATH... --index {self.path}"
            )
        con = self._connection()
        try:
            if snapshot:
                con.execute("BEGIN")
            yield con
        except _MISUSE:
            raise  # a bad parameter, not the file's fault
        except sqlite3.Error as err:
            raise self._file_error(err) from None
        finally:
            if snapshot and con.in_transaction:
                with suppress(sqlite3.Error):
                    con.execute("ROLLBACK")  # it only read

    def _file_error(self, err: sqlite3.Error) -> IndexFileError:
        """A corrupt or foreign file (delete and rebuild it), or the file cannot be used now (locked, disk full)."""
        if isinstance(err, sqlite3.OperationalError) and not str(err).startswith("no such"):
            return IndexFileError(f"cannot use index {self.path}: {err}")
        return self._corrupt(err)

    def _corrupt(self, err: Exception) -> IndexFileError:
        return IndexFileError(
            f"{self.path} is not a readable dolly-langchain index ({err}); delete it and rebuild it with "
            f"dolly rag index PATH... --index {self.path}"
        )

    def _foreign(self, why: str) -> IndexFileError:
        return IndexFileError(
            f"{self.path} is an SQLite database but not a dolly-langchain index ({why}); pass the path of your "
            f"index, or rebuild the index in a new file: dolly rag index PATH... --index NEW.sqlite"
        )

    def _check_header(self) -> None:
        """The SQLite header, and a file at least as long as the header says; SQLite alone does not always notice
        a truncated file. Skipped while a write-ahead log exists: the log may hold the missing pages."""
        try:
            with open(self.path, "rb") as file:
                header = file.read(100)
        except OSError as err:
            raise IndexFileError(f"cannot read index {self.path}: {err.strerror or err}") from None
        if not header:
            return
        if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
            raise IndexFileError(
                f"{self.path} is not an SQLite file, so not a dolly-langchain index; pass the path of an index "
                f"built by dolly rag index, or delete it and rebuild it there"
            )
        wal = self.path.with_name(self.path.name + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            return
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        pages = int.from_bytes(header[28:32], "big")
        header_valid = header[24:28] == header[92:96]
        size = self.path.stat().st_size
        if header_valid and pages and size < pages * page_size:
            raise self._corrupt(
                sqlite3.DatabaseError(f"truncated: {size} bytes, its header says {pages * page_size}")
            )

    def _check_file(self) -> None:
        self._check_header()
        with self._reading() as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables:
                return  # an empty database: a first add was interrupted before it committed anything
            if not _TABLES <= tables:
                raise self._foreign(f"no table {', '.join(sorted(_TABLES - tables))}")
            check = con.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise self._corrupt(sqlite3.DatabaseError(check))
            meta = self._meta(con)
        if "schema_version" not in meta:
            raise self._foreign("no schema_version")
        if meta["schema_version"] != str(SCHEMA_VERSION):
            raise IndexMismatchError(
                f"{self.path} has index schema version {meta.get('schema_version')}, this version reads "
                f"{SCHEMA_VERSION}; rebuild it with dolly rag index PATH... --index {self.path}"
            )
        self._check_settings(meta)
        self._checked = True

    def _check_settings(self, meta: dict[str, str]) -> None:
        rebuild = f"rebuild it (delete {self.path}, then dolly rag index PATH... --index {self.path} ...)"
        for name in ("chunk_tokens", "chunk_overlap"):
            built = int(meta[name])
            if name in self.model_fields_set and getattr(self, name) != built:
                raise IndexMismatchError(
                    f"{self.path} was built with {name}={built}, not {getattr(self, name)}; pass {name}={built} "
                    f"or {rebuild}"
                )
            setattr(self, name, built)
        if self._fingerprint is not None and self._fingerprint != meta["tokenizer_fingerprint"]:
            built_name, name = meta["tokenizer_name"], self.tokenizer.name_or_path
            raise IndexMismatchError(
                f"{self.path} was chunked with another tokenizer ({built_name or 'unnamed'}, vocabulary "
                f"{meta['tokenizer_fingerprint']}) than this one ({name or 'unnamed'}, vocabulary "
                f"{self._fingerprint}); use the model it was built for or {rebuild}"
                + (f" with --model {name}" if name else "")
            )
        built_embeddings = meta.get("embeddings_id")
        if self.embeddings is None or meta["chunk_count_at_open"] == "0":
            return
        if built_embeddings is None:
            raise IndexMismatchError(
                f"{self.path} was built without embeddings, so it has no vectors for {self.embeddings_id!r}; "
                f"open it without embeddings (BM25) or {rebuild} --embeddings {self.embeddings_id}"
            )
        if built_embeddings != self.embeddings_id:
            raise IndexMismatchError(
                f"{self.path} holds vectors of {built_embeddings!r}, not {self.embeddings_id!r}; open it with "
                f"embeddings {built_embeddings!r} or {rebuild} --embeddings {self.embeddings_id}"
            )

    @staticmethod
    def _meta(con: sqlite3.Connection) -> dict[str, str]:
        meta = dict(con.execute("SELECT key, value FROM meta"))
        meta["chunk_count_at_open"] = str(con.execute("SELECT count(*) FROM chunks").fetchone()[0])
        return meta

    def info(self) -> dict[str, Any]:
        """What the index holds and how it was built (for ``dolly rag`` and for your own checks)."""
        with self._reading(snapshot=True) as con:
            if not _has_schema(con):
                return {"path": str(self.path), "sources": 0, "chunks": 0, "bytes": self.path.stat().st_size}
            meta = self._meta(con)
            sources = con.execute("SELECT count(*) FROM sources").fetchone()[0]
        return {
            "path": str(self.path), "sources": sources, "chunks": int(meta.pop("chunk_count_at_open")),
            "bytes": self.path.stat().st_size, **meta,
        }

    # -- writing -------------------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``: one writer at a time; a crash or error rolls everything back."""
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = self._connection()
            con.execute("PRAGMA journal_mode = WAL")
            con.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as err:
            raise self._file_error(err) from None
        try:
            if not con.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
                self._create(con)
            yield con
            # Readers cache the vectors per generation; any write moves it on.
            con.execute(
                "INSERT INTO meta VALUES ('generation', '1') "
                "ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
            )
        except BaseException as err:
            if con.in_transaction:  # SQLite rolls back by itself on some errors (disk full)
                con.execute("ROLLBACK")
            if isinstance(err, sqlite3.Error) and not isinstance(err, _MISUSE):
                raise self._file_error(err) from None
            raise
        else:
            con.execute("COMMIT")

    def _checkpoint(self) -> None:
        """Copy the write-ahead log into the main file and empty it, so the file alone is the index (a copy of it
        is complete; a truncated one is detected). Readers still on an older snapshot make it stop short; it does
        not wait for them."""
        if not self.path.exists():
            return
        con = self._connection()
        with suppress(sqlite3.Error):  # only tidiness: the log is replayed by the next reader anyway
            con.execute("PRAGMA busy_timeout = 0")
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        con.execute("PRAGMA busy_timeout = 60000")

    def _create(self, con: sqlite3.Connection) -> None:
        if self.tokenizer is None:
            raise ValueError("creating an index needs the generating model's tokenizer: pass tokenizer=...")
        for statement in _SCHEMA:
            con.execute(statement)
        meta = {
            "schema_version": SCHEMA_VERSION,
            "tokenizer_name": self.tokenizer.name_or_path,
            "tokenizer_fingerprint": self._fingerprint,
            "chunk_tokens": self.chunk_tokens,
            "chunk_overlap": self.chunk_overlap,
            "created_at": _now(),
        }
        con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in meta.items()])

    def add_paths(
        self,
        paths: Iterable[str | Path],
        *,
        text_field: str = "text",
        progress: bool = False,
        on_failure: Callable[[str, str], None] | None = None,
    ) -> IngestReport:
        """Index files and directories (``.txt``, ``.md``, ``.pdf``, ``.jsonl``; directories recursively).

        Each file is one transaction: unchanged files are skipped, changed files replace their chunks. A file that
        cannot be read is recorded in ``report.failed`` (and passed to ``on_failure``) and the rest go on.
        ``text_field`` names the JSONL field holding the text; the record's other fields become metadata.
        """
        from tqdm.auto import tqdm

        files = list(expand_paths([paths] if isinstance(paths, (str, Path)) else list(paths)))
        report = IngestReport()
        try:
            for path in tqdm(files, desc="indexing", unit="file", disable=not progress):
                source = str(path.resolve())
                try:
                    documents, data = read_file(path, text_field=text_field)
                except UnreadableFileError as err:
                    report.failed.append((source, str(err)))
                    if on_failure:
                        on_failure(source, str(err))
                    continue
                self._add_source(source, documents, hashlib.sha256(data).hexdigest(), report)
        finally:
            self._checkpoint()
        return report

    def add_documents(self, documents: Iterable[Document], *, progress: bool = False) -> IngestReport:
        """Index LangChain ``Document``s, grouped into sources by ``metadata["source"]``.

        A source's documents replace whatever the index held for that source; a source whose documents (text and
        metadata) are unchanged is skipped; one with no text is recorded in ``report.failed``. Documents without a
        source are grouped under ``"documents"``.
        """
        from tqdm.auto import tqdm

        groups: dict[str, list[Document]] = {}
        for document in documents:
            groups.setdefault(str(document.metadata.get("source", "documents")), []).append(document)
        report = IngestReport()
        try:
            for source, group in tqdm(groups.items(), desc="indexing", unit="source", disable=not progress):
                group = [document for document in group if document.page_content.strip()]
                if not group:
                    report.failed.append((source, f"{source}: no text to index (every document is empty)"))
                    continue
                digest = hashlib.sha256()
                for document in group:
                    digest.update(document.page_content.encode())
                    digest.update(json.dumps(document.metadata, sort_keys=True, default=str).encode())
                self._add_source(source, group, digest.hexdigest(), report)
        finally:
            self._checkpoint()
        return report

    def _add_source(self, source: str, documents: list[Document], content_hash: str, report: IngestReport) -> None:
        previous = self._source_hash(source)
        if previous == content_hash:
            report.skipped.append(source)
            return
        rows = self._chunk_rows(source, documents)
        if not rows:
            report.failed.append((source, f"{source}: no text to index"))
            return
        vectors = self._embed([row[3] for row in rows]) if self.embeddings is not None else None
        with self._transaction() as con:
            self._check_writable(con, vectors)
            self._checked = True
            con.execute("DELETE FROM chunks WHERE source = ?", (source,))
            _insert_chunks(con, rows, vectors)
            con.execute(
                "INSERT OR REPLACE INTO sources VALUES (?, ?, ?, ?)", (source, content_hash, len(rows), _now())
            )
        (report.added if previous is None else report.replaced).append(source)
        report.chunks += len(rows)

    def _source_hash(self, source: str) -> str | None:
        if not self.path.exists():
            return None
        with self._reading() as con:
            if not _has_schema(con):
                return None
            row = con.execute("SELECT content_hash FROM sources WHERE source = ?", (source,)).fetchone()
        return row[0] if row else None

    def _check_writable(self, con: sqlite3.Connection, vectors: np.ndarray | None) -> None:
        """Inside the write transaction: the settings recorded in the file still match ours."""
        meta = self._meta(con)
        self._check_settings(meta)
        has_chunks = meta["chunk_count_at_open"] != "0"
        if not has_chunks:  # an empty index takes the embeddings (or none) of its first chunks
            con.execute("DELETE FROM meta WHERE key IN ('embeddings_id', 'embeddings_dim')")
            if vectors is not None:
                con.execute("INSERT INTO meta VALUES ('embeddings_id', ?)", (self.embeddings_id,))
                con.execute("INSERT INTO meta VALUES ('embeddings_dim', ?)", (str(vectors.shape[1]),))
        elif vectors is None and meta.get("embeddings_id"):
            raise IndexMismatchError(
                f"{self.path} stores vectors of {meta['embeddings_id']!r}; add to it with those embeddings "
                f"(--embeddings {meta['embeddings_id']}) so every chunk has one"
            )
        elif vectors is not None and meta.get("embeddings_dim") != str(vectors.shape[1]):
            raise IndexMismatchError(
                f"{self.path} holds {meta.get('embeddings_dim')}-dimensional vectors of {meta.get('embeddings_id')!r}, "
                f"but these embeddings give {vectors.shape[1]}; open it with the embeddings it was built with"
            )

    def _chunk_rows(self, source: str, documents: list[Document]) -> list[tuple]:
        """``(chunk_id, source, position, text, metadata_json, content_hash)`` for each chunk of a source."""
        if self.tokenizer is None:
            raise ValueError("adding documents needs the generating model's tokenizer: pass tokenizer=...")
        rows = []
        markdown = Path(source).suffix.lower() in MARKDOWN_SUFFIXES
        for document in documents:
            metadata = {k: v for k, v in document.metadata.items() if k != "source"}
            for text in self._split(document.page_content, markdown):
                position = len(rows)
                text_hash = hashlib.sha256(text.encode()).hexdigest()
                chunk_id = hashlib.sha256(f"{source}\0{position}\0{text_hash}".encode()).hexdigest()[:16]
                rows.append((chunk_id, source, position, text, json.dumps(metadata, default=str), text_hash))
        return rows

    def _split(self, text: str, markdown: bool) -> list[str]:
        """Chunks of at most ``chunk_tokens`` tokens, with ``chunk_overlap`` tokens shared by neighbours.

        The splitter measures pieces with their leading separator (" word") and strips it from a chunk's first
        piece afterwards, which can cost a token ("word" may be two tokens where " word" is one); where a chunk
        comes out over the limit, cut the text again that much smaller.
        """
        size = self.chunk_tokens
        while True:
            chunks = self._splitter(markdown, size).split_text(text)
            excess = max((len(self.tokenizer.tokenize(chunk)) for chunk in chunks), default=0) - self.chunk_tokens
            if excess <= 0 or size - excess <= self.chunk_overlap:
                return chunks
            size -= excess

    def _splitter(self, markdown: bool, size: int):
        from langchain_text_splitters import Language, RecursiveCharacterTextSplitter

        separators = None
        if markdown:
            separators = RecursiveCharacterTextSplitter.get_separators_for_language(Language.MARKDOWN)
        return RecursiveCharacterTextSplitter.from_huggingface_tokenizer(
            self.tokenizer, chunk_size=size, chunk_overlap=self.chunk_overlap, separators=separators
        )

    def _embed(self, texts: list[str]) -> np.ndarray:
        vectors = np.asarray(self.embeddings.embed_documents(texts), dtype=np.float32)
        return _normalise(vectors.reshape(len(texts), -1))

    def delete(self, source: str | Path) -> int:
        """Remove a source and its chunks; returns the chunks removed (0 for a source the index does not hold).

        ``source`` is a document source or a file path, as indexed (absolute) or relative to the current directory,
        whether or not the file still exists.
        """
        if not self.path.exists():
            raise IndexFileError(f"no index at {self.path}; nothing to delete")
        with self._reading() as con:
            if not _has_schema(con):
                return 0
        name = str(source)
        if not self._source_exists(name):
            name = str(Path(name).resolve())
        try:
            with self._transaction() as con:
                removed = con.execute("DELETE FROM chunks WHERE source = ?", (name,)).rowcount
                con.execute("DELETE FROM sources WHERE source = ?", (name,))
        finally:
            self._checkpoint()
        return removed

    def _source_exists(self, source: str) -> bool:
        return self._source_hash(source) is not None

    def sources(self) -> list[str]:
        """The indexed sources, sorted."""
        with self._reading() as con:
            if not _has_schema(con):
                return []
            return [row[0] for row in con.execute("SELECT source FROM sources ORDER BY source")]

    # -- retrieval -----------------------------------------------------------------------------------------

    def as_retriever(self, **settings: Any) -> DocumentIndex:
        """This index with other retrieval settings (``k``, ``filter``, ``search_type``, ``dense_weight``)."""
        unknown = set(settings) - {"k", "filter", "search_type", "dense_weight"}
        if unknown:
            raise TypeError(f"as_retriever() got unknown settings {sorted(unknown)}")
        copy = self.model_copy(update=settings)
        copy._check_retrieval(copy.k, copy.filter, copy.search_type)
        if not isinstance(copy.dense_weight, (int, float)) or not 0 <= copy.dense_weight <= 1:
            raise ValueError(f"dense_weight={copy.dense_weight!r}: pass a number from 0 to 1")
        return copy

    def _check_retrieval(self, k: Any, filter: Any, search_type: Any) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r}: pass the number of documents to return, 1 or more")
        if filter is not None and not isinstance(filter, dict):
            raise ValueError(f"filter={filter!r}: pass a dict such as {{'source': path}}")
        if search_type not in (None, "bm25", "dense", "hybrid"):
            raise ValueError(f"search_type={search_type!r}: pass 'bm25', 'dense' or 'hybrid'")
        if search_type in ("dense", "hybrid") and self.embeddings is None:
            raise ValueError(f"search_type={search_type!r} needs embeddings=...; this index was opened without them")

    def _get_relevant_documents(
        self,
        query: str,
        *,
        run_manager: CallbackManagerForRetrieverRun | None = None,
        k: int | None = None,
        filter: dict[str, Any] | None = None,
        search_type: SearchType | None = None,
    ) -> list[Document]:
        return self.search(query, k, filter=filter, search_type=search_type)

    def search(
        self,
        query: str,
        k: int | None = None,
        *,
        filter: dict[str, Any] | None = None,
        search_type: SearchType | None = None,
    ) -> list[Document]:
        """The ``k`` best chunks for ``query`` as Documents, best first.

        Each document's metadata holds the chunk's ``source``, ``chunk_id``, ``position`` (its order within the
        source), the metadata it was added with (``page`` for PDFs, JSONL fields, ...) and the ``score``.
        """
        k = self.k if k is None else k
        filter = self.filter if filter is None else filter
        search_type = search_type or self.search_type or ("hybrid" if self.embeddings is not None else "bm25")
        self._check_retrieval(k, filter, search_type)
        if not self._checked and self.path.exists():
            self._check_file()  # the file appeared (another process built it) after this object was made
        vector = None
        if search_type != "bm25":  # before the read snapshot: a remote embeddings call may take a while
            vector = _normalise(np.asarray([self.embeddings.embed_query(query)], dtype=np.float32))[0]
        with self._reading(snapshot=True) as con:
            if not _has_schema(con):
                return []
            pool = k if search_type != "hybrid" else max(50, 10 * k)
            bm25 = self._bm25(con, query, pool, filter) if search_type != "dense" else {}
            dense = self._dense(con, vector, pool, filter) if search_type != "bm25" else {}
            if search_type == "hybrid":
                scores = _fuse(bm25, dense, self.dense_weight)
            else:
                scores = bm25 or dense
            best = sorted(scores, key=scores.get, reverse=True)[:k]
            return self._documents(con, best, scores, search_type)

    def _bm25(self, con: sqlite3.Connection, query: str, limit: int, filter: dict | None) -> dict[int, float]:
        words = list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))
        words = [w for w in words if w not in _STOPWORDS] or words
        if not words:
            return {}
        match = " OR ".join(f'"{w}"' for w in words)
        # FTS5's rank (bm25) is lower-is-better; negate it so every ranker's scores are higher-is-better.
        if not filter:
            rows = con.execute(
                "SELECT rowid, -rank FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY rank LIMIT ?", (match, limit)
            )
        else:
            where, params = _filter_sql(filter)
            rows = con.execute(
                "SELECT chunks.id, -chunks_fts.rank FROM chunks_fts JOIN chunks ON chunks.id = chunks_fts.rowid "
                f"WHERE chunks_fts MATCH ? {where} ORDER BY chunks_fts.rank LIMIT ?",
                (match, *params, limit),
            )
        return dict(rows.fetchall())

    def _dense(self, con: sqlite3.Connection, vector: np.ndarray, limit: int, filter: dict | None) -> dict[int, float]:
        ids, matrix = self._load_vectors(con)
        if not len(ids):
            return {}
        if vector.shape[0] != matrix.shape[1]:
            raise IndexMismatchError(
                f"{self.path} holds {matrix.shape[1]}-dimensional vectors but the embeddings give {vector.shape[0]}; "
                "open it with the embeddings it was built with"
            )
        scores = matrix @ vector
        if filter:
            where, params = _filter_sql(filter)
            allowed = {row[0] for row in con.execute(f"SELECT id FROM chunks WHERE 1 {where}", params)}
            scores = np.where(np.isin(ids, list(allowed)), scores, -np.inf)
        top = np.argsort(-scores)[:limit]
        return {int(ids[i]): float(scores[i]) for i in top if np.isfinite(scores[i])}

    def _load_vectors(self, con: sqlite3.Connection) -> tuple[np.ndarray, np.ndarray]:
        """All chunk vectors as one matrix, cached until the index changes (the generation every write moves on).

        Called inside the query's read snapshot, so the generation and the rows agree.
        """
        row = con.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        generation = row[0] if row else None
        cached = self._vectors.get("cache")
        if cached is None or cached[0] != generation:
            rows = con.execute("SELECT id, embedding FROM chunks WHERE embedding IS NOT NULL").fetchall()
            ids = np.array([row[0] for row in rows], dtype=np.int64)
            matrix = np.vstack([np.frombuffer(row[1], dtype=np.float32) for row in rows]) if rows else np.zeros((0, 0))
            self._vectors["cache"] = cached = (generation, ids, matrix)
        return cached[1], cached[2]

    def _documents(self, con: sqlite3.Connection, ids: list[int], scores: dict, search_type: str) -> list[Document]:
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        rows = {
            row[0]: row[1:]
            for row in con.execute(
                f"SELECT id, chunk_id, source, position, text, metadata FROM chunks WHERE id IN ({marks})", ids
            )
        }
        documents = []
        for row_id in ids:
            chunk_id, source, position, text, metadata = rows[row_id]
            metadata = {
                **json.loads(metadata), "source": source, "chunk_id": chunk_id, "position": position,
                "score": round(scores[row_id], 6), "retrieval": search_type,
            }
            documents.append(Document(id=chunk_id, page_content=text, metadata=metadata))
        return documents


def _insert_chunks(con: sqlite3.Connection, rows: list[tuple], vectors: np.ndarray | None) -> None:
    blobs = [None] * len(rows) if vectors is None else [vector.tobytes() for vector in vectors]
    con.executemany(
        "INSERT INTO chunks (chunk_id, source, position, text, metadata, content_hash, embedding) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(*row, blob) for row, blob in zip(rows, blobs)],
    )


def _filter_sql(filter: dict[str, Any] | None) -> tuple[str, list]:
    """``AND ...`` clauses for a metadata filter: ``source`` matches the column, other keys the JSON metadata."""
    clauses, params = [], []
    for key, wanted in (filter or {}).items():
        values = list(wanted) if isinstance(wanted, (list, tuple, set)) else [wanted]
        column = "chunks.source" if key == "source" else f"json_extract(chunks.metadata, '$.\"{_json_key(key)}\"')"
        if key == "source":  # as indexed, or a path relative to the current directory
            values = list(dict.fromkeys(name for v in values for name in (str(v), str(Path(str(v)).resolve()))))
        clauses.append(f"{column} IN ({','.join('?' * len(values))})")
        params += values
    return "".join(f" AND {c}" for c in clauses), params


def _has_schema(con: sqlite3.Connection) -> bool:
    """False for an empty database (a first add that never committed)."""
    return con.execute("SELECT 1 FROM sqlite_master WHERE name = 'chunks'").fetchone() is not None


def _json_key(key: str) -> str:
    if not re.fullmatch(r"[\w .-]+", key):
        raise ValueError(f"filter key {key!r}: use letters, digits, spaces, '.', '-' or '_'")
    return key


def _fuse(bm25: dict[int, float], dense: dict[int, float], dense_weight: float) -> dict[int, float]:
    """Weighted min-max normalised score fusion over the pooled candidates of both rankers."""
    pool = set(bm25) | set(dense)
    bm25_norm, dense_norm = _minmax(bm25), _minmax(dense)
    return {i: dense_weight * dense_norm.get(i, 0.0) + (1 - dense_weight) * bm25_norm.get(i, 0.0) for i in pool}


def _minmax(scores: dict[int, float]) -> dict[int, float]:
    if not scores:
        return {}
    low, high = min(scores.values()), max(scores.values())
    span = high - low
    return {i: (s - low) / span if span else 1.0 for i, s in scores.items()}


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of a tokenizer's class and vocabulary: equal fingerprints cut text into the same tokens."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(f"{type(tokenizer).__name__}\0{vocab}".encode()).hexdigest()[:32]


def embeddings_identity(embeddings: Embeddings) -> str:
    """The name an index records for an ``Embeddings`` object: the model name for this package's embeddings,
    else the class path. Pass ``embeddings_id=`` to :class:`DocumentIndex` to record a more precise name
    (two models behind one class would otherwise look alike)."""
    from dolly_langchain.rag.embeddings import MeanPoolingEmbeddings

    if isinstance(embeddings, MeanPoolingEmbeddings):
        return embeddings.model_name
    return f"{type(embeddings).__module__}.{type(embeddings).__qualname__}"
