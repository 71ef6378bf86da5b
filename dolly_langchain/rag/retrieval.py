"""How the index is searched: BM25, dense vectors, and their fusion into one ranking.

:class:`Retrieval` is the part of :class:`~dolly_langchain.rag.index.DocumentIndex` that answers queries
(``search_type``):

- ``"bm25"``: SQLite FTS5 over the chunks, matching the Porter-stemmed words of the query with English function
  words dropped, OR-ed together;
- ``"dense"``: cosine similarity of the stored unit vectors, brute force in numpy (the matrix is cached until the
  index changes);
- ``"hybrid"`` (the default when embeddings are given): weighted normalised-score fusion. The top ``max(50, 10k)``
  candidates of both rankers are pooled; each ranker's scores are min-max normalised over that pool (a candidate a
  ranker did not return scores 0 there) and the fused score is ``dense_weight * dense + (1 - dense_weight) * bm25``
  (:func:`fuse`).

Every query reads one snapshot of the file, so a writer replacing a source in between cannot make the rankers
disagree. A metadata ``filter`` becomes SQL on the ``source`` column and the JSON metadata (:func:`filter_sql`).
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any, Literal

import numpy as np
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from typing_extensions import Self

from dolly_langchain.errors import DollyTypeError, DollyValueError
from dolly_langchain.rag.store import IndexMismatchError, has_schema, normalise

SearchType = Literal["bm25", "dense", "hybrid"]

_WORD = re.compile(r"\w+", re.UNICODE)
# English function words left out of BM25 queries (a query of only these keeps them). OR-ing "how", "the", "is"
# into a query matches nearly every chunk: on dolly-15k dropping them raised hit@5 from 0.918 to 0.932 and cut
# the median query time from about 9 ms to 1.5 ms (benchmarks/rag.py, before and after).
_STOPWORDS = frozenset(
    "a an and are as at be by for from has have how i in is it its of on or that the this to was were what when "
    "where which who whom whose why will with do does did can you your me my we our they their he she his her "
    "them there these those been being than then so if not no about into over after before also".split()
)


class Retrieval:
    """The query half of :class:`~dolly_langchain.rag.index.DocumentIndex` (a mixin over
    :class:`~dolly_langchain.rag.store.IndexFile`: it reads through its snapshots), and the LangChain retriever
    method."""

    def as_retriever(self, **settings: Any) -> Self:
        """This index with other retrieval settings (``k``, ``filter``, ``search_type``, ``dense_weight``)."""
        unknown = set(settings) - {"k", "filter", "search_type", "dense_weight"}
        if unknown:
            raise DollyTypeError(f"as_retriever() got unknown settings {sorted(unknown)}")
        copy = self.model_copy(update=settings)
        copy._check_retrieval(copy.k, copy.filter, copy.search_type)
        if not isinstance(copy.dense_weight, (int, float)) or not 0 <= copy.dense_weight <= 1:
            raise DollyValueError(f"dense_weight={copy.dense_weight!r}: pass a number from 0 to 1")
        return copy

    def _check_retrieval(self, k: Any, filter: Any, search_type: Any) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise DollyValueError(f"k={k!r}: pass the number of documents to return, 1 or more")
        if filter is not None and not isinstance(filter, dict):
            raise DollyValueError(f"filter={filter!r}: pass a dict such as {{'source': path}}")
        if search_type not in (None, "bm25", "dense", "hybrid"):
            raise DollyValueError(f"search_type={search_type!r}: pass 'bm25', 'dense' or 'hybrid'")
        if search_type in ("dense", "hybrid") and self.embeddings is None:
            raise DollyValueError(f"search_type={search_type!r} needs embeddings=...; this index was opened without them")

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
            vector = normalise(np.asarray([self.embeddings.embed_query(query)], dtype=np.float32))[0]
        with self._reading(snapshot=True) as con:
            if not has_schema(con):
                return []
            pool = k if search_type != "hybrid" else max(50, 10 * k)
            bm25 = self._bm25(con, query, pool, filter) if search_type != "dense" else {}
            dense = self._dense(con, vector, pool, filter) if search_type != "bm25" else {}
            if search_type == "hybrid":
                scores = fuse(bm25, dense, self.dense_weight)
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
            where, params = filter_sql(filter)
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
            where, params = filter_sql(filter)
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


def filter_sql(filter: dict[str, Any] | None) -> tuple[str, list]:
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


def _json_key(key: str) -> str:
    if not re.fullmatch(r"[\w .-]+", key):
        raise DollyValueError(f"filter key {key!r}: use letters, digits, spaces, '.', '-' or '_'")
    return key


def fuse(bm25: dict[int, float], dense: dict[int, float], dense_weight: float) -> dict[int, float]:
    """Weighted min-max normalised score fusion over the pooled candidates of both rankers."""
    pool = set(bm25) | set(dense)
    bm25_norm, dense_norm = minmax(bm25), minmax(dense)
    return {i: dense_weight * dense_norm.get(i, 0.0) + (1 - dense_weight) * bm25_norm.get(i, 0.0) for i in pool}


def minmax(scores: dict[int, float]) -> dict[int, float]:
    """Scores scaled to 0..1 (all 1.0 when they are equal)."""
    if not scores:
        return {}
    low, high = min(scores.values()), max(scores.values())
    span = high - low
    return {i: (s - low) / span if span else 1.0 for i, s in scores.items()}
