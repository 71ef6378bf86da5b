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
hash); a changed one has its old chunks replaced; :meth:`DocumentIndex.delete` removes one, and adding a directory
again mirrors it (the sources of its deleted files are removed; ``prune=False`` keeps them). Only regular files are
read, up to ``max_file_bytes``. A process killed mid-file leaves the index as it was before that file. A file or
directory this process cannot write is opened read-only: it can be queried, not changed. The file is in WAL mode, so readers query while one writer
adds (each query reads one snapshot); every add or delete ends with a checkpoint, so the ``.sqlite`` file alone
holds the index once no reader is left behind.

**Retrieval** (``search_type``): ``"bm25"`` (FTS5: the Porter-stemmed words of the query, English function words
dropped, OR-ed together), ``"dense"`` (cosine similarity of stored vectors, brute force in numpy), ``"hybrid"`` (the
default when embeddings are given): weighted normalised-score fusion. The top ``max(50, 10k)`` candidates of both
rankers are pooled; each ranker's scores are min-max normalised over that pool (a candidate a ranker did not return
scores 0 there) and the fused score is ``dense_weight * dense + (1 - dense_weight) * bm25``, with
``dense_weight=0.7``: with a small dense model, equal weights pull hit@1 down on databricks-dolly-15k (0.80 -> 0.34)
while 0.3/0.7 beats either ranker alone (measured with benchmarks/rag.py).

**Refusals**: an index is tied to the tokenizer and chunk settings that cut it and to the embedding model that
made its vectors; opening it with others raises :class:`IndexMismatchError` saying what to rebuild. A corrupt,
truncated or foreign file raises :class:`IndexFileError` naming the file.

The class is put together from one part per concern: :mod:`dolly_langchain.rag.store` (the SQLite file, its schema
and checks, transactions), :mod:`dolly_langchain.rag.ingest` (chunking, embedding, adding and deleting sources) and
:mod:`dolly_langchain.rag.retrieval` (BM25, dense and hybrid ranking). This module holds its settings.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from langchain_core.embeddings import Embeddings
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from dolly_langchain.errors import DollyValueError
from dolly_langchain.rag.ingest import Ingestion, IngestReport
from dolly_langchain.rag.loaders import (  # noqa: F401 - importable from here as before the split
    MARKDOWN_SUFFIXES,
    UnreadableFileError,
    expand_paths,
    read_file,
)
from dolly_langchain.rag.retrieval import Retrieval, SearchType
from dolly_langchain.rag.store import (
    DEFAULT_CHUNK_OVERLAP,
    DEFAULT_CHUNK_TOKENS,
    SCHEMA_VERSION,
    IndexFile,
    IndexFileError,
    IndexMismatchError,
    embeddings_identity,
    tokenizer_fingerprint,
)

__all__ = [
    "DEFAULT_CHUNK_OVERLAP",
    "DEFAULT_CHUNK_TOKENS",
    "SCHEMA_VERSION",
    "DocumentIndex",
    "IndexFileError",
    "IndexMismatchError",
    "IngestReport",
    "SearchType",
    "embeddings_identity",
    "tokenizer_fingerprint",
]


class DocumentIndex(IndexFile, Ingestion, Retrieval, BaseRetriever):
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
            raise DollyValueError(
                f"chunk_overlap={self.chunk_overlap} is more than chunk_tokens={self.chunk_tokens}; pass a smaller "
                "chunk_overlap"
            )
        if self.tokenizer is not None:
            self._fingerprint = tokenizer_fingerprint(self.tokenizer)  # once: it hashes the whole vocabulary
        if self.embeddings is not None and self.embeddings_id is None:
            self.embeddings_id = embeddings_identity(self.embeddings)
        return self

    # -- chunks embedded elsewhere (dolly batch --embed) ----------------------------------------------------------

    def chunk_settings(self) -> dict[str, Any]:
        """What an index checks before it takes chunks cut and embedded elsewhere: the tokenizer's fingerprint, the
        chunk settings and the embeddings' name."""
        return {"tokenizer_fingerprint": self._fingerprint, "chunk_tokens": self.chunk_tokens,
                "chunk_overlap": self.chunk_overlap, "embeddings_id": self.embeddings_id}

    def chunk_documents(self, source: str, documents: list) -> list[dict[str, Any]]:
        """The chunks this index would store for ``documents`` under ``source``, without writing anything:
        ``{"chunk_id", "source", "position", "text", "metadata", "content_hash"}`` each (``dolly batch --embed``
        cuts them on Spark workers with this)."""
        names = ("chunk_id", "source", "position", "text", "metadata", "content_hash")
        return [dict(zip(names, row)) for row in self._chunk_rows(source, documents)]

    def add_embedded(self, chunks: Any, *, progress: bool = False) -> IngestReport:
        """Add chunks already cut and embedded by ``dolly batch --embed`` (a pandas DataFrame, or the Parquet file or
        directory it wrote), without embedding anything again.

        Each source is one transaction, as in :meth:`add_documents`, and an unchanged source is skipped. The chunks
        must come from this index's tokenizer, chunk settings and embeddings (recorded in their
        ``index_settings`` column); others raise :class:`IndexMismatchError` saying what to rerun. Rows with an
        ``error`` (documents without text) are reported as failed.
        """
        import hashlib
        import json

        import numpy as np
        from tqdm.auto import tqdm

        from dolly_langchain.rag.ingest import _insert_chunks
        from dolly_langchain.rag.store import normalise, utc_now

        frame = _chunk_frame(chunks)
        report = IngestReport()
        failed = frame["error"].notna()
        for source, error in frame.loc[failed, ["source", "error"]].itertuples(index=False):
            report.failed.append((str(source), f"{source}: {error}"))
        frame = frame[~failed]
        if frame.empty:
            return report
        self._check_embedded_settings([json.loads(text) for text in frame["index_settings"].unique()])
        try:
            for source, group in tqdm(frame.groupby("source", sort=True), desc="loading", unit="source",
                                      disable=not progress):
                group = group.sort_values("position")
                content_hash = str(group["source_hash"].iloc[0])
                previous = self._source_hash(str(source))
                if previous == content_hash:
                    report.skipped.append(str(source))
                    continue
                rows = [(r.chunk_id, str(source), int(r.position), r.chunk, r.chunk_metadata,
                         hashlib.sha256(r.chunk.encode()).hexdigest()) for r in group.itertuples(index=False)]
                vectors = normalise(np.asarray(np.stack(group["embedding"].map(np.asarray)), dtype=np.float32))
                with self._transaction() as con:
                    self._check_writable(con, vectors)
                    self._checked = True
                    con.execute("DELETE FROM chunks WHERE source = ?", (str(source),))
                    _insert_chunks(con, rows, vectors)
                    con.execute("INSERT OR REPLACE INTO sources VALUES (?, ?, ?, ?)",
                                (str(source), content_hash, len(rows), utc_now()))
                (report.added if previous is None else report.replaced).append(str(source))
                report.chunks += len(rows)
        finally:
            self._checkpoint()
        return report

    def _check_embedded_settings(self, recorded: list[dict[str, Any]]) -> None:
        if self.embeddings is None:
            named = sorted({str(settings.get("embeddings_id")) for settings in recorded})
            raise DollyValueError(f"{self.path}: loading embedded chunks needs the embeddings they were made with "
                                  f"({', '.join(named)}) to answer queries: pass embeddings=")
        ours = self.chunk_settings()
        for settings in recorded:
            for name in ("tokenizer_fingerprint", "chunk_tokens", "chunk_overlap", "embeddings_id"):
                if settings.get(name) != ours[name]:
                    raise IndexMismatchError(
                        f"{self.path}: these chunks were cut or embedded with {name}={settings.get(name)!r}, this "
                        f"index uses {ours[name]!r}; open the index with the model, chunk settings and embeddings of "
                        "the batch job, or rerun dolly batch --embed with this index's (--model, --embeddings)"
                    )


def _chunk_frame(chunks: Any):
    """``dolly batch --embed``'s output as a pandas DataFrame: one given, or read from its Parquet file or
    directory."""
    import pandas as pd

    if isinstance(chunks, pd.DataFrame):
        frame = chunks
    else:
        path = Path(chunks)
        if not path.exists():
            raise IndexFileError(f"no chunks at {path}: pass the OUTPUT of dolly batch --embed (Parquet)")
        frame = pd.read_parquet(path)
    needed = {"source", "chunk_id", "position", "chunk", "chunk_metadata", "source_hash", "embedding",
              "index_settings", "error"}
    missing = sorted(needed - set(frame.columns))
    if missing:
        raise DollyValueError(f"these are not chunks from dolly batch --embed: columns {missing} are missing")
    return frame
