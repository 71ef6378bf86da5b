"""The engine-neutral half of a batch job: pandas DataFrames in, pandas DataFrames out.

Whatever runs the job (a loop in this process, Spark's ``applyInPandas``, later a Ray Data adapter) calls the same
three steps, so outputs do not depend on the runner:

1. :func:`measure` (any slice of rows): each row's prompt length in tokens, or why it cannot be answered
   (missing or empty instruction, over the context window);
2. :func:`plan_batches` (all rows, or the runner's global sort): batch ids from a stable order, the one
   ``DollyLLM.batch`` uses: longest prompt first, ties by the id key. Rows that cannot be answered are planned
   apart, so they never change which rows share a batch;
3. :func:`generate_batch` / :func:`embed_batch` (one batch): the model's answers or chunk vectors, one ``error``
   value per row instead of a failed job (unless ``fail_fast``).

Why batches are planned before distribution: with CTranslate2 int8 (left padding) an answer depends on the rows it
shares a batch with; Spark's default partitioning changed 216 of 400 answers against the in-process run (issue 20).
The same rows in the same batches, in the same order, give the same answers, whatever the partitioning.

The model loads once per Python process (:func:`worker_llm`, over :func:`dolly_langchain.runtime.shared_runtime`),
not once per partition or batch: Spark reuses its Python workers between tasks.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from dolly_langchain.errors import DollyValueError
from dolly_langchain.generation import DEFAULT_BATCH_SIZE, DEFAULT_GENERATION

#: Columns ``generate_batch`` adds to the input's.
GENERATE_COLUMNS = ("response", "finish_reason", "prompt_tokens", "completion_tokens", "error")
#: Columns ``embed_batch`` adds (one output row per chunk of an input row).
EMBED_COLUMNS = ("source", "chunk_id", "position", "chunk", "chunk_tokens", "chunk_metadata", "source_hash",
                 "embedding", "index_settings", "error")
#: Internal columns of the plan, dropped from the output.
TOKENS, PLAN_ERROR, BATCH = "_dolly_tokens", "_dolly_error", "_dolly_batch"


class BatchRowError(DollyValueError):
    """A row cannot be answered or embedded (``fail_fast=True`` / ``--fail-fast``); the message names the row."""


@dataclass(frozen=True)
class GenerateSpec:
    """Everything a worker needs to answer a batch: picklable, so Spark ships it to every executor."""

    model: str | None = None
    engine: str | None = None
    compute_type: str = "auto"
    device: str | None = None
    instruction_column: str = "instruction"
    context_column: str | None = "context"
    id_column: str = "id"
    max_new_tokens: int = DEFAULT_GENERATION["max_new_tokens"]
    temperature: float = 0.0
    batch_size: int = DEFAULT_BATCH_SIZE
    fail_fast: bool = False
    threads: int | None = None
    """Engine threads in each worker (CTranslate2 ``intra_threads``, torch's threads); ``None``: the engine's
    default. The Spark runner sets it so that workers x threads <= cores."""
    options: tuple[tuple[str, Any], ...] = ()
    """Other ``DollyLLM`` fields (``repetition_penalty``, ``stop_loops``, ``top_p``...), as sorted pairs."""

    def llm_fields(self) -> dict[str, Any]:
        fields = {"model": self.model, "engine": self.engine, "compute_type": self.compute_type,
                  "device": self.device, "max_new_tokens": self.max_new_tokens, "do_sample": self.temperature > 0,
                  "batch_size": self.batch_size, **dict(self.options)}
        if self.temperature > 0:
            fields["temperature"] = self.temperature
        return fields


@dataclass(frozen=True)
class EmbedSpec:
    """Everything a worker needs to chunk and embed a batch of documents."""

    text_column: str = "text"
    id_column: str = "id"
    model: str | None = None
    """The generating model whose tokenizer measures chunks (as ``dolly rag index --model``)."""
    embeddings: str = "minilm"
    chunk_tokens: int | None = None
    chunk_overlap: int | None = None
    batch_size: int = 32
    fail_fast: bool = False
    threads: int | None = None
    extra: dict = field(default_factory=dict, compare=False)


def clashes(columns: list[str], added: tuple[str, ...]) -> dict[str, str]:
    """Input columns named like an output column (dolly-15k has its human ``response``): kept as ``input_NAME``."""
    renamed = {name: f"input_{name}" for name in columns if name in added}
    taken = [new for new in renamed.values() if new in columns]
    if taken:
        raise DollyValueError(f"the input has columns {sorted(renamed)} and {taken}: the output adds {list(added)} and "
                              f"would keep the input's as {taken}; rename them first")
    return renamed


def rename_clashes(pdf, added: tuple[str, ...]):
    renamed = clashes(list(pdf.columns), added)
    return pdf.rename(columns=renamed) if renamed else pdf


# -- one model per process ---------------------------------------------------------------------------------------

_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.Lock()


def _set_threads(threads: int | None) -> None:
    """Engine threads of this process, before its model loads: CTranslate2 reads ``DOLLY_CT2_THREADS`` and llama.cpp
    ``DOLLY_LLAMACPP_THREADS`` when their engines load (``engine="auto"`` runs a lone last row on llama.cpp), torch
    takes ``set_num_threads``. A user's own variables win."""
    if threads is None:
        return
    os.environ.setdefault("DOLLY_CT2_THREADS", str(threads))
    os.environ.setdefault("DOLLY_LLAMACPP_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)


def worker_llm(spec: GenerateSpec):
    """This process's ``DollyLLM`` for ``spec``'s model and options; built once, its weights loaded on first use
    through :func:`~dolly_langchain.runtime.shared_runtime` (one copy per process)."""
    fields = spec.llm_fields()
    key = ("llm", *sorted((k, repr(v)) for k, v in fields.items()))
    with _CACHE_LOCK:
        if key not in _CACHE:
            _set_threads(spec.threads)
            from dolly_langchain.llm import DollyLLM

            _CACHE[key] = DollyLLM(**fields)
        return _CACHE[key]


def worker_embedder(spec: EmbedSpec):
    """This process's ``(chunker, embeddings, settings)`` for ``spec``: a :class:`DocumentIndex` that is never
    written (its chunking is the one ``dolly rag index`` uses), the embeddings, and the settings an index checks."""
    key = ("embed", spec.model, spec.embeddings, spec.chunk_tokens, spec.chunk_overlap, spec.batch_size)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _set_threads(spec.threads)
            _CACHE[key] = _load_embedder(spec)
        return _CACHE[key]


def _load_embedder(spec: EmbedSpec):
    import tempfile
    from pathlib import Path

    from dolly_langchain.models import load_tokenizer
    from dolly_langchain.rag.embeddings import MeanPoolingEmbeddings
    from dolly_langchain.rag.index import DocumentIndex

    tokenizer = load_tokenizer(spec.model)
    embeddings = MeanPoolingEmbeddings(model_name=spec.embeddings, batch_size=spec.batch_size)
    settings = {k: v for k, v in (("chunk_tokens", spec.chunk_tokens), ("chunk_overlap", spec.chunk_overlap))
                if v is not None}
    # A DocumentIndex only creates its file on the first add, and this one is never added to: it is here for its
    # chunking, so the chunks are exactly those `dolly rag index` cuts with the same tokenizer and settings.
    never_written = Path(tempfile.gettempdir()) / f"dolly-batch-chunker-{os.getpid()}" / "unused.sqlite"
    chunker = DocumentIndex(path=never_written, tokenizer=tokenizer, embeddings=embeddings, **settings)
    return chunker, embeddings, json.dumps(chunker.chunk_settings(), sort_keys=True)


# -- step 1: measure ---------------------------------------------------------------------------------------------


def prompt_text(instruction: str, context: str | None) -> str:
    """The text ``DollyLLM`` is given for a record: the instruction, and Dolly's ``Input:`` block when it has context
    (``format_prompt`` splits it back into instruction and context)."""
    from dolly_langchain.prompts import INSTRUCTION_PROMPT, INSTRUCTION_WITH_CONTEXT_PROMPT

    if context:
        return INSTRUCTION_WITH_CONTEXT_PROMPT.format(instruction=instruction, context=context)
    return INSTRUCTION_PROMPT.format(instruction=instruction)


def _text(value: Any) -> str | None:
    """A cell as text: ``None`` for a missing value (None, NaN, pandas' NA)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):  # lists and arrays: not a missing value
        pass
    return value if isinstance(value, str) else str(value)


def _record(row: dict, spec: GenerateSpec) -> tuple[str | None, str | None]:
    """``(prompt, None)`` or ``(None, why this row cannot be answered)``."""
    instruction = _text(row.get(spec.instruction_column))
    if instruction is None:
        return None, f"missing instruction (column {spec.instruction_column!r} is empty)"
    if not instruction.strip():
        return None, f"empty instruction (column {spec.instruction_column!r} holds only whitespace)"
    context = _text(row.get(spec.context_column)) if spec.context_column else None
    return prompt_text(instruction, context.strip() if context and context.strip() else None), None


def measure(pdf, spec: GenerateSpec):
    """``pdf`` with ``_dolly_tokens`` (the prompt's length, -1 when it cannot be answered) and ``_dolly_error``."""
    llm = worker_llm(spec)
    tokens, errors = [], []
    for row in pdf.to_dict("records"):
        prompt, error = _record(row, spec)
        count = -1
        if prompt is not None:
            try:
                count = llm.count_prompt_tokens(prompt)
                llm.runtime.check_window(count, spec.max_new_tokens)
            except ValueError as err:  # over the window, text the tokenizer cannot take
                error, count = str(err), -1
        if error is not None and spec.fail_fast:
            raise BatchRowError(f"row {spec.id_column}={row.get(spec.id_column)!r}: {error} (--fail-fast)")
        tokens.append(count)
        errors.append(error)
    import pandas as pd

    out = pdf.copy()
    out[TOKENS] = pd.Series(tokens, index=pdf.index, dtype="int64")
    out[PLAN_ERROR] = pd.Series(errors, index=pdf.index, dtype=object)  # object: pandas 3 would make None NaN
    return out


# -- step 2: plan ------------------------------------------------------------------------------------------------


def plan_batches(measured, spec: GenerateSpec):
    """Batch ids for measured rows (in this process): what the Spark runner computes with a global sort.

    Answerable rows are ordered as ``DollyLLM.batch`` orders prompts (longest first; ties by the id key) and cut into
    batches of ``batch_size``, numbered from 0; rows that cannot be answered get negative ids, ``batch_size`` to a
    batch, so they never take an answerable row's place."""
    ordered = measured.sort_values([TOKENS, spec.id_column], ascending=[False, True], kind="stable")
    ok = ordered[TOKENS] >= 0
    rank_ok = ok.cumsum() - 1
    rank_bad = (~ok).cumsum() - 1
    out = measured.copy()
    batch = (rank_ok // spec.batch_size).where(ok, -1 - rank_bad // spec.batch_size)
    out[BATCH] = batch.reindex(measured.index).astype("int64")
    return out


# -- step 3: one batch -------------------------------------------------------------------------------------------


def generate_batch(pdf, spec: GenerateSpec):
    """Answer one planned batch: the input's columns plus :data:`GENERATE_COLUMNS` (plan columns dropped)."""
    import pandas as pd

    rows = pdf.sort_values([TOKENS, spec.id_column], ascending=[False, True], kind="stable")
    n = len(rows)
    response: list[str | None] = [None] * n
    finish: list[str | None] = [None] * n
    prompt_tokens = [max(int(t), 0) for t in rows[TOKENS]]
    completion_tokens = [0] * n
    errors: list[str | None] = [_text(error) for error in rows[PLAN_ERROR]]  # NaN, pd.NA or None: no error
    todo = [i for i in range(n) if errors[i] is None]
    if todo:
        records = rows.to_dict("records")
        prompts = [_record(records[i], spec)[0] for i in todo]
        results = _generate(worker_llm(spec), prompts, spec, [records[i].get(spec.id_column) for i in todo])
        for i, result in zip(todo, results):
            if isinstance(result, Exception):
                errors[i] = f"{type(result).__name__}: {result}"
                continue
            info = result.generation_info or {}
            usage = info.get("usage_metadata", {})
            response[i], finish[i] = result.text, info.get("finish_reason")
            prompt_tokens[i] = usage.get("input_tokens", prompt_tokens[i])
            completion_tokens[i] = usage.get("output_tokens", 0)
    out = rows.drop(columns=[TOKENS, PLAN_ERROR, BATCH], errors="ignore").copy()
    out["response"] = pd.Series(response, index=out.index, dtype=object)
    out["finish_reason"] = pd.Series(finish, index=out.index, dtype=object)
    out["prompt_tokens"] = pd.Series(prompt_tokens, index=out.index, dtype="int64")
    out["completion_tokens"] = pd.Series(completion_tokens, index=out.index, dtype="int64")
    out["error"] = pd.Series(errors, index=out.index, dtype=object)
    return out


def _generate(llm, prompts: list[str], spec: GenerateSpec, ids: list) -> list:
    """The generations of one batch, as one ``DollyLLM.generate`` call (the batch ``DollyLLM.batch`` would run);
    if it fails, each prompt alone, so one bad row gets the error and the others their answers."""
    try:
        return [generations[0] for generations in llm.generate(prompts).generations]
    except Exception as err:  # noqa: BLE001 - found per row below
        if spec.fail_fast:
            raise BatchRowError(f"a batch with rows {spec.id_column} in {ids!r} failed: {err} (--fail-fast)") from err
    results: list = []
    for prompt, row_id in zip(prompts, ids):
        try:
            results.append(llm.generate([prompt]).generations[0][0])
        except Exception as err:  # noqa: BLE001 - the row's error value
            if spec.fail_fast:
                raise BatchRowError(f"row {spec.id_column}={row_id!r}: {err} (--fail-fast)") from err
            results.append(err)
    return results


def embed_batch(pdf, spec: EmbedSpec):
    """Chunk and embed one batch of documents: one output row per chunk (the input's columns plus
    :data:`EMBED_COLUMNS`); a row without text is one row with ``error`` set and no chunk."""
    import pandas as pd
    from langchain_core.documents import Document

    chunker, embeddings, settings = worker_embedder(spec)
    out_rows: list[dict] = []
    texts: list[str] = []
    base_columns = [c for c in pdf.columns if c not in (TOKENS, PLAN_ERROR, BATCH)]
    for row in pdf[base_columns].to_dict("records"):
        text = _text(row.get(spec.text_column))
        source = str(row.get(spec.id_column))
        blank = {name: None for name in EMBED_COLUMNS} | {"source": source, "index_settings": settings}
        if text is None or not text.strip():
            error = f"{'missing' if text is None else 'empty'} text (column {spec.text_column!r})"
            if spec.fail_fast:
                raise BatchRowError(f"row {spec.id_column}={row.get(spec.id_column)!r}: {error} (--fail-fast)")
            out_rows.append(row | blank | {"error": error})
            continue
        metadata = {k: _json_safe(v) for k, v in row.items() if k != spec.text_column}
        document = Document(page_content=text, metadata={"source": source, **metadata})
        digest = source_digest([document])
        for chunk in chunker.chunk_documents(source, [document]):
            out_rows.append(row | blank | {
                "chunk_id": chunk["chunk_id"], "position": chunk["position"], "chunk": chunk["text"],
                "chunk_tokens": len(chunker.tokenizer.tokenize(chunk["text"])), "chunk_metadata": chunk["metadata"],
                "source_hash": digest,
            })
            texts.append(chunk["text"])
    vectors = iter(embeddings.embed_documents(texts)) if texts else iter(())
    for row in out_rows:
        if row["error"] is None:
            row["embedding"] = [float(x) for x in next(vectors)]
    out = pd.DataFrame(out_rows, columns=[*base_columns, *EMBED_COLUMNS])
    out["position"] = out["position"].astype("Int64")
    out["chunk_tokens"] = out["chunk_tokens"].astype("Int64")
    return out


def source_digest(documents) -> str:
    """The content hash ``DocumentIndex.add_documents`` records for a source (text and metadata), so an index that
    loads these chunks skips the source when the same document is added again."""
    from dolly_langchain.rag.ingest import source_digest as index_digest

    return index_digest(documents)


def _json_safe(value: Any) -> Any:
    """A cell as JSON-able metadata (numpy scalars to Python, missing values to None)."""
    if hasattr(value, "item") and not isinstance(value, (list, dict)):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def spec_dict(spec) -> dict:
    """A spec as a plain dict (for benchmark and job reports)."""
    return asdict(spec)
