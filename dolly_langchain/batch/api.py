"""``generate_dataframe`` and ``embed_dataframe``: the Python API of batch jobs, for pandas and Spark DataFrames.

A pandas DataFrame runs here, batch after batch, with a progress bar, and a pandas DataFrame comes back in the
input's row order. A Spark DataFrame becomes a Spark job (:mod:`dolly_langchain.batch.spark`) and a lazy Spark
DataFrame comes back: write it, or ``toPandas()`` it. Both plan batches the same way
(:func:`dolly_langchain.batch.frames.plan_batches`), so both give the same answers.
"""

from __future__ import annotations

from typing import Any

from dolly_langchain.batch.frames import (
    BATCH,
    EMBED_COLUMNS,
    GENERATE_COLUMNS,
    EmbedSpec,
    GenerateSpec,
    embed_batch,
    generate_batch,
    measure,
    plan_batches,
    rename_clashes,
)
from dolly_langchain.errors import DollyTypeError, DollyValueError
from dolly_langchain.generation import DEFAULT_BATCH_SIZE, DEFAULT_GENERATION


def generate_dataframe(
    df: Any,
    *,
    model: str | None = None,
    engine: str | None = None,
    compute_type: str = "auto",
    device: str | None = None,
    instruction_column: str = "instruction",
    context_column: str | None = "context",
    id_column: str = "id",
    max_new_tokens: int = DEFAULT_GENERATION["max_new_tokens"],
    temperature: float = 0.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    fail_fast: bool = False,
    progress: bool = True,
    threads: int | None = None,
    **options: Any,
):
    """Answer every row's instruction (with its context, when the row has one) with a Dolly model.

    Returns the input's columns plus ``response``, ``finish_reason`` (``"stop"`` or ``"length"``),
    ``prompt_tokens``, ``completion_tokens`` and ``error`` (``None``, or why the row has no response: a missing or
    empty instruction, a prompt over the context window, an engine error). ``fail_fast=True`` raises on the first
    such row instead. ``id_column`` is a unique key (added as the row number when a pandas DataFrame has none): it
    fixes the order batches are formed in, so the answers equal ``DollyLLM.batch`` over the same rows (greedy),
    whatever the partitioning. ``context_column=None`` ignores context; a missing ``"context"`` column means none.

    ``model``, ``engine``, ``compute_type``, ``device``, ``max_new_tokens``, ``batch_size`` and ``options`` (any
    other ``DollyLLM`` field: ``repetition_penalty``, ``stop_loops``, ``top_p``...) mean what they mean for
    ``DollyLLM``; ``temperature=0`` (the default) decodes greedily. ``threads``: engine threads per process
    (default: the engine's own; under Spark, cores / concurrent tasks).
    """
    spec = GenerateSpec(
        model=model, engine=engine, compute_type=compute_type, device=device,
        instruction_column=instruction_column, context_column=context_column, id_column=id_column,
        max_new_tokens=_positive(max_new_tokens, "max_new_tokens"), temperature=_temperature(temperature),
        batch_size=_positive(batch_size, "batch_size"), fail_fast=fail_fast, threads=threads,
        options=tuple(sorted(options.items())),
    )
    _check_options(spec)
    if _is_spark(df):
        from dolly_langchain.batch.spark import run_generate

        return run_generate(df, spec)
    pdf = rename_clashes(_pandas(df).reset_index(drop=True), GENERATE_COLUMNS)
    _check_columns(list(pdf.columns), spec.instruction_column, "instruction_column", "--instruction-column")
    if context_column not in (None, "context"):
        _check_columns(list(pdf.columns), context_column, "context_column", "--context-column")
    pdf = with_id(pdf, id_column)
    return _run_local(pdf, spec, progress)


def embed_dataframe(
    df: Any,
    *,
    text_column: str = "text",
    id_column: str = "id",
    model: str | None = None,
    embeddings: str = "minilm",
    chunk_tokens: int | None = None,
    chunk_overlap: int | None = None,
    batch_size: int = 32,
    fail_fast: bool = False,
    progress: bool = True,
    threads: int | None = None,
):
    """Cut every row's text into the chunks ``dolly rag index`` would cut (``model``'s tokenizer, ``chunk_tokens``,
    ``chunk_overlap``) and embed them (``embeddings``: ``"minilm"``, an encoder directory or a hub id).

    Returns one row per chunk: the input's columns plus ``source`` (the row's id, as text), ``chunk_id``,
    ``position``, ``chunk``, ``chunk_tokens``, ``chunk_metadata``, ``source_hash``, ``embedding`` (a list of
    floats), ``index_settings`` and ``error`` (a row without text: one row, no chunk).
    ``DocumentIndex.add_embedded`` loads the result without embedding again.
    """
    spec = EmbedSpec(text_column=text_column, id_column=id_column, model=model, embeddings=embeddings,
                     chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap,
                     batch_size=_positive(batch_size, "batch_size"), fail_fast=fail_fast, threads=threads)
    if _is_spark(df):
        from dolly_langchain.batch.spark import run_embed

        return run_embed(df, spec)
    pdf = rename_clashes(_pandas(df).reset_index(drop=True), EMBED_COLUMNS)
    _check_columns(list(pdf.columns), text_column, "text_column", "--text-column")
    pdf = with_id(pdf, id_column)
    _check_unique(pdf, id_column)
    from tqdm.auto import tqdm

    parts = []
    step = max(spec.batch_size * 8, 64)
    for start in tqdm(range(0, len(pdf), step), desc="embedding", unit="batch", disable=not progress):
        parts.append(embed_batch(pdf.iloc[start : start + step], spec))
    import pandas as pd

    if not parts:
        return embed_batch(pdf, spec)
    return pd.concat(parts, ignore_index=True)


# -- in this process ---------------------------------------------------------------------------------------------


def _run_local(pdf, spec: GenerateSpec, progress: bool):
    import pandas as pd
    from tqdm.auto import tqdm

    _check_unique(pdf, spec.id_column)
    planned = plan_batches(measure(pdf, spec), spec)
    groups = list(planned.groupby(BATCH, sort=True))
    answered = [generate_batch(group, spec)
                for _, group in tqdm(groups, desc="answering", unit="batch", disable=not progress)]
    if not answered:
        return generate_batch(planned, spec)
    out = pd.concat(answered)
    return out.loc[pdf.index].reset_index(drop=True)  # the input's order


def with_id(pdf, id_column: str):
    """``pdf`` with ``id_column``: its own, or the row number (0, 1, ...) added as the first column."""
    if id_column in pdf.columns:
        return pdf
    out = pdf.reset_index(drop=True)
    out.insert(0, id_column, range(len(out)))
    return out


def _check_unique(pdf, id_column: str) -> None:
    ids = pdf[id_column]
    if ids.isna().any():
        raise DollyValueError(f"the id column {id_column!r} has empty values; every row needs a unique key "
                              "(--id-column / id_column=)")
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        raise DollyValueError(f"the id column {id_column!r} is not unique ({duplicated.iloc[0]!r} repeats); name a "
                              "unique key with --id-column / id_column=, or drop the column to number the rows")


def _check_columns(columns: list[str], name: str, parameter: str, flag: str) -> None:
    if name not in columns:
        raise DollyValueError(f"the input has no column {name!r} (its columns: {columns}); name the right one with "
                              f"{flag} / {parameter}=")


def _check_options(spec: GenerateSpec) -> None:
    """Unknown ``DollyLLM`` options fail here, before any data is read or job started."""
    from dolly_langchain.llm import DollyLLM

    try:
        DollyLLM(**spec.llm_fields())
    except ValueError as err:  # pydantic's ValidationError is a ValueError
        raise DollyValueError(f"generate_dataframe: {str(err).splitlines()[0]}: {err}") from None


def _is_spark(df: Any) -> bool:
    module = type(df).__module__
    return module.startswith("pyspark.sql")


def _pandas(df: Any):
    import pandas as pd

    if isinstance(df, pd.DataFrame):
        return df
    raise DollyTypeError(f"expected a pandas or Spark DataFrame, got {type(df).__name__}")


def _positive(value: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DollyValueError(f"{name} must be an integer of 1 or more, got {value!r}")
    return value


def _temperature(value: float) -> float:
    import math

    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise DollyValueError(f"temperature must be a finite number of 0 or more, got {value!r}")
    return float(value)

