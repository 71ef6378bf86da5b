"""The index file: one SQLite database, its schema, and the checks run before anything reads or writes it.

:class:`IndexFile` is the part of :class:`~dolly_langchain.rag.index.DocumentIndex` that owns the file:

- **connections**: one per thread and process, in WAL mode (readers query while one writer adds);
- **checks on open**: the SQLite header (and a file at least as long as it says), the tables, ``PRAGMA
  quick_check``, the schema version, and the settings the index was built with (tokenizer, chunk size, embedding
  model) against the ones it is opened with. A corrupt, truncated or foreign file raises :class:`IndexFileError`
  naming the file; other settings raise :class:`IndexMismatchError` saying what to rebuild;
- **transactions**: ``BEGIN IMMEDIATE`` ... ``COMMIT`` (one writer at a time; a crash or error rolls everything
  back), the schema created by the first one, and a checkpoint after each add or delete so that the ``.sqlite``
  file alone holds the index.

What goes into the file is :mod:`dolly_langchain.rag.ingest`; how it is searched, :mod:`dolly_langchain.rag.retrieval`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from typing import Any

import numpy as np
from langchain_core.embeddings import Embeddings

from dolly_langchain.errors import DollyError, DollyValueError

SCHEMA_VERSION = 1
DEFAULT_CHUNK_TOKENS = 256
DEFAULT_CHUNK_OVERLAP = 32

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

_TABLES = {"meta", "sources", "chunks", "chunks_fts"}
_SQLITE_MAGIC = b"SQLite format 3\0"
_MISUSE = (sqlite3.ProgrammingError, sqlite3.InterfaceError)


class IndexFileError(DollyError, RuntimeError):
    """The index file is missing, corrupt, truncated or not an index; the message names the file."""


class IndexMismatchError(DollyError, ValueError):
    """The index was built with another tokenizer, chunk size or embedding model; the message says what to rebuild."""


class IndexFile:
    """The file half of :class:`~dolly_langchain.rag.index.DocumentIndex` (a mixin: it reads the index's ``path``,
    ``tokenizer``, chunk settings and ``embeddings_id`` fields and its ``_local``, ``_fingerprint`` and ``_checked``
    private attributes)."""

    # -- opening and checking ------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """One connection per thread and process (sqlite3 connections must not cross threads, and an SQLite
        connection must not be used in a child forked after it was opened: the child holds none of its locks)."""
        con = getattr(self._local, "con", None)
        if con is None or self._local.pid != os.getpid():
            if self.path.exists() and not writable(self.path):
                con = self._read_only_connection()
                self._local.con, self._local.pid = con, os.getpid()
                return con
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

    def _read_only_connection(self) -> sqlite3.Connection:
        """For a file or directory this process cannot write (a shared or mounted index): ``mode=ro``, which reads
        the write-ahead log where one is left; where SQLite cannot set up its shared memory without writing,
        ``immutable=1`` (no locks: nothing can write there anyway)."""
        uri = self.path.resolve().as_uri() + "?mode=ro"
        error: sqlite3.Error | None = None
        for options in ("", "&immutable=1"):
            con = None
            try:
                con = sqlite3.connect(uri + options, uri=True, timeout=60, isolation_level=None,
                                      check_same_thread=True)
                con.execute("SELECT count(*) FROM sqlite_master").fetchone()
                return con
            except sqlite3.Error as err:
                error = err
                if con is not None:
                    con.close()
        raise IndexFileError(f"cannot open index {self.path} read-only: {error}")

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
            if not has_schema(con):
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
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise IndexFileError(
                    f"cannot create index {self.path}: {err.strerror or err} ({err.filename or self.path.parent}); "
                    "pass --index a file in a directory you can write"
                ) from None
        elif not writable(self.path):
            raise IndexFileError(
                f"cannot write index {self.path}: the file or its directory is read-only (it can still be queried); "
                "make both writable, or copy the index somewhere you can write"
            )
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
            raise DollyValueError("creating an index needs the generating model's tokenizer: pass tokenizer=...")
        for statement in _SCHEMA:
            con.execute(statement)
        meta = {
            "schema_version": SCHEMA_VERSION,
            "tokenizer_name": self.tokenizer.name_or_path,
            "tokenizer_fingerprint": self._fingerprint,
            "chunk_tokens": self.chunk_tokens,
            "chunk_overlap": self.chunk_overlap,
            "created_at": utc_now(),
        }
        con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in meta.items()])


def writable(path) -> bool:
    """Whether this process can write the index file and create its journal files beside it."""
    return os.access(path, os.W_OK) and os.access(os.path.dirname(os.path.abspath(path)) or ".", os.W_OK | os.X_OK)


def has_schema(con: sqlite3.Connection) -> bool:
    """False for an empty database (a first add that never committed)."""
    return con.execute("SELECT 1 FROM sqlite_master WHERE name = 'chunks'").fetchone() is not None


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero): the file stores unit vectors, so a dot product is the
    cosine similarity."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


def utc_now() -> str:
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
