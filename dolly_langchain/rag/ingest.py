"""What goes into the index: files and documents cut into chunks, embedded, written one source per transaction.

:class:`Ingestion` is the part of :class:`~dolly_langchain.rag.index.DocumentIndex` that adds, replaces and deletes
sources:

- **chunks** are cut by LangChain's ``RecursiveCharacterTextSplitter`` measuring length with the *generating
  model's* tokenizer (``chunk_tokens`` with ``chunk_overlap``; Markdown separators for ``.md`` files), so a chunk's
  size is what it costs in the prompt;
- **incremental**: a source whose content hash is unchanged is skipped, a changed one has its chunks replaced;
- **one transaction per source**: a process killed mid-file leaves the index as it was before that file; a file
  that cannot be read is reported (``IngestReport.failed``) and the others go on;
- **embedded across sources**: chunks are embedded in groups of about :data:`EMBED_BATCH_CHUNKS`, gathered from as
  many sources as it takes (a dolly-15k context is 1-3 chunks, a forward pass per source wasted the batch), then
  each source is written in its own transaction as before.

Reading files is :mod:`dolly_langchain.rag.loaders`; the file and its transactions, :mod:`dolly_langchain.rag.store`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from langchain_core.documents import Document

from dolly_langchain.errors import DollyValueError
from dolly_langchain.rag.loaders import (
    DEFAULT_MAX_FILE_MB,
    MARKDOWN_SUFFIXES,
    MB,
    UnreadableFileError,
    read_file,
    walk_directory,
)
from dolly_langchain.rag.store import IndexFileError, IndexMismatchError, has_schema, normalise, utc_now

#: Chunks gathered (from whole sources) before one call to ``embed_documents``; the embeddings batch them further
#: (:class:`~dolly_langchain.rag.embeddings.MeanPoolingEmbeddings` sorts them by length). Sources waiting for their
#: group to fill are not yet in the index; a process killed meanwhile leaves them out, like a file not yet read.
EMBED_BATCH_CHUNKS = 512


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
    removed: list[str] = field(default_factory=list)
    """Sources removed because the directory they were under no longer holds them (``add_paths(prune=True)``);
    not part of :meth:`counts`, which keeps its keys."""

    def counts(self) -> dict[str, int]:
        return {
            "added": len(self.added), "skipped": len(self.skipped), "replaced": len(self.replaced),
            "failed": len(self.failed), "chunks": self.chunks,
        }


class Ingestion:
    """The writing half of :class:`~dolly_langchain.rag.index.DocumentIndex` (a mixin over
    :class:`~dolly_langchain.rag.store.IndexFile`: it uses its transactions, checks and checkpoint)."""

    def add_paths(
        self,
        paths: Iterable[str | Path],
        *,
        text_field: str = "text",
        progress: bool = False,
        on_failure: Callable[[str, str], None] | None = None,
        prune: bool = True,
        max_file_bytes: int | None = DEFAULT_MAX_FILE_MB * MB,
    ) -> IngestReport:
        """Index files and directories (``.txt``, ``.md``, ``.pdf``, ``.jsonl``; directories recursively).

        Each file is one transaction: unchanged files are skipped, changed files replace their chunks. A file that
        cannot be read (not a regular file, a broken link, over ``max_file_bytes``, ...) is recorded in
        ``report.failed`` (and passed to ``on_failure``) and the rest go on. ``text_field`` names the JSONL field
        holding the text; the record's other fields become metadata.

        ``prune``: a directory is mirrored: the sources under it that it no longer holds (deleted files) are removed
        from the index and listed in ``report.removed``. A directory that could not be listed completely is not
        pruned (its failure is reported instead).
        """
        from tqdm.auto import tqdm

        files: list[Path] = []
        unlisted: list[tuple[str, str]] = []  # directories that could not be listed: (source, reason)
        folders: dict[str, set[str]] = {}  # a directory to mirror -> the sources it holds now
        for path in map(Path, [paths] if isinstance(paths, (str, Path)) else list(paths)):
            if not path.is_dir():
                files.append(path)
                continue
            errors: list[tuple[Path, str]] = []
            found = walk_directory(path, errors)
            files += found
            unlisted += [
                (str(folder.resolve()), f"{folder}: cannot list this directory ({why})") for folder, why in errors
            ]
            if not errors:
                folders[str(path.resolve())] = {str(found_path.resolve()) for found_path in found}
        report = IngestReport()

        def failed(source: str, reason: str) -> None:
            report.failed.append((source, reason))
            if on_failure:
                on_failure(source, reason)

        for source, reason in unlisted:
            failed(source, reason)
        pending = _Pending()
        try:
            for path in tqdm(files, desc="indexing", unit="file", disable=not progress):
                source = str(path.resolve())
                try:
                    documents, data = read_file(path, text_field=text_field, max_bytes=max_file_bytes)
                except UnreadableFileError as err:
                    failed(source, str(err))
                    continue
                self._add_source(source, documents, hashlib.sha256(data).hexdigest(), report, pending)
            self._write_pending(pending, report)
            if prune:
                for folder, present in folders.items():
                    self._prune(folder, present, report)
        finally:
            self._checkpoint()
        return report

    def _prune(self, folder: str, present: set[str], report: IngestReport) -> None:
        """Remove the sources under ``folder`` that are not in ``present``, in one transaction."""
        if not self.path.exists():
            return
        prefix = os.path.join(folder, "")
        gone = [source for source in self.sources() if source.startswith(prefix) and source not in present]
        if not gone:
            return
        with self._transaction() as con:
            for source in gone:
                con.execute("DELETE FROM chunks WHERE source = ?", (source,))
                con.execute("DELETE FROM sources WHERE source = ?", (source,))
        report.removed += gone

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
        pending = _Pending()
        try:
            for source, group in tqdm(groups.items(), desc="indexing", unit="source", disable=not progress):
                group = [document for document in group if document.page_content.strip()]
                if not group:
                    report.failed.append((source, f"{source}: no text to index (every document is empty)"))
                    continue
                self._add_source(source, group, source_digest(group), report, pending)
            self._write_pending(pending, report)
        finally:
            self._checkpoint()
        return report

    def _add_source(
        self, source: str, documents: list[Document], content_hash: str, report: IngestReport, pending: "_Pending"
    ) -> None:
        """Chunk a changed source and queue it; the queue is embedded and written once it holds enough chunks."""
        queued = pending.sources.get(source)
        previous = queued[2] if queued is not None else self._source_hash(source)
        if queued is not None and queued[1] == content_hash or previous == content_hash:
            report.skipped.append(source)
            return
        rows = self._chunk_rows(source, documents)
        if not rows:
            report.failed.append((source, f"{source}: no text to index"))
            return
        if queued is not None:  # the same source again with other content: the newer one replaces it in the queue
            pending.chunks -= len(queued[0])
        pending.sources[source] = (rows, content_hash, previous)
        pending.chunks += len(rows)
        if pending.chunks >= EMBED_BATCH_CHUNKS:
            self._write_pending(pending, report)

    def _write_pending(self, pending: "_Pending", report: IngestReport) -> None:
        """Embed the queued sources' chunks in one call, then write each source in its own transaction."""
        queued = list(pending.sources.items())
        pending.sources.clear()
        pending.chunks = 0
        if not queued:
            return
        vectors = None
        if self.embeddings is not None:
            vectors = self._embed([row[3] for _, (rows, _, _) in queued for row in rows])
        start = 0
        for source, (rows, content_hash, previous) in queued:
            self._write_source(source, rows, content_hash, previous, report,
                               None if vectors is None else vectors[start : start + len(rows)])
            start += len(rows)

    def _write_source(
        self, source: str, rows: list[tuple], content_hash: str, previous: str | None, report: IngestReport,
        vectors: np.ndarray | None,
    ) -> None:
        with self._transaction() as con:
            self._check_writable(con, vectors)
            self._checked = True
            con.execute("DELETE FROM chunks WHERE source = ?", (source,))
            _insert_chunks(con, rows, vectors)
            con.execute(
                "INSERT OR REPLACE INTO sources VALUES (?, ?, ?, ?)", (source, content_hash, len(rows), utc_now())
            )
        (report.added if previous is None else report.replaced).append(source)
        report.chunks += len(rows)

    def _source_hash(self, source: str) -> str | None:
        if not self.path.exists():
            return None
        with self._reading() as con:
            if not has_schema(con):
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
            raise DollyValueError("adding documents needs the generating model's tokenizer: pass tokenizer=...")
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
        return normalise(vectors.reshape(len(texts), -1))

    def delete(self, source: str | Path) -> int:
        """Remove a source and its chunks; returns the chunks removed (0 for a source the index does not hold).

        ``source`` is a document source or a file path, as indexed (absolute) or relative to the current directory,
        whether or not the file still exists.
        """
        if not self.path.exists():
            raise IndexFileError(f"no index at {self.path}; nothing to delete")
        with self._reading() as con:
            if not has_schema(con):
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
            if not has_schema(con):
                return []
            return [row[0] for row in con.execute("SELECT source FROM sources ORDER BY source")]


def _insert_chunks(con: sqlite3.Connection, rows: list[tuple], vectors: np.ndarray | None) -> None:
    blobs = [None] * len(rows) if vectors is None else [vector.tobytes() for vector in vectors]
    con.executemany(
        "INSERT INTO chunks (chunk_id, source, position, text, metadata, content_hash, embedding) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(*row, blob) for row, blob in zip(rows, blobs)],
    )


def source_digest(documents: Iterable[Document]) -> str:
    """The content hash recorded for a source made of ``documents`` (their text and metadata, in order): a source
    added again with the same hash is skipped."""
    digest = hashlib.sha256()
    for document in documents:
        digest.update(document.page_content.encode())
        digest.update(json.dumps(document.metadata, sort_keys=True, default=str).encode())
    return digest.hexdigest()


@dataclass
class _Pending:
    """Chunked sources waiting to be embedded together: source -> (rows, content hash, previous hash)."""

    sources: dict[str, tuple[list[tuple], str, str | None]] = field(default_factory=dict)
    chunks: int = 0
