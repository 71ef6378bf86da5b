"""Batch jobs: answer or embed a table of records, in this process or as an Apache Spark job (``dolly batch``).

::

    from dolly_langchain.batch import generate_dataframe, embed_dataframe

    answers = generate_dataframe(pandas_df, max_new_tokens=64)            # in-process, a progress bar
    answers = generate_dataframe(spark.table("support.tickets"))          # a Spark DataFrame in, one out (lazy)
    chunks = embed_dataframe(spark_df, text_column="text")                # chunk vectors for DocumentIndex.add_embedded

- :mod:`~dolly_langchain.batch.frames`: the engine-neutral part, pandas in and pandas out: prompt lengths, batch
  plans, one batch's generation or embedding, and the per-process model cache (the model loads once per worker).
- :mod:`~dolly_langchain.batch.api`: ``generate_dataframe`` / ``embed_dataframe`` (pandas or Spark).
- :mod:`~dolly_langchain.batch.spark`: the Spark runner (``applyInPandas`` over batch ids planned before
  distribution), sessions, reading and atomic writing.
- :mod:`~dolly_langchain.batch.io`: local files in (JSONL, CSV, Parquet) and Parquet out, atomically.
- :mod:`~dolly_langchain.batch.cli`: ``dolly batch INPUT OUTPUT [--spark MASTER] ...``.

Nothing here imports pandas, pyspark, torch or transformers until a function runs.
"""

from __future__ import annotations

__all__ = ["embed_dataframe", "generate_dataframe"]


def __getattr__(name: str):
    # Lazy: ``dolly --help`` builds the command tree, which imports this package; pandas waits for a real job.
    if name in __all__:
        from dolly_langchain.batch import api

        return getattr(api, name)
    raise AttributeError(f"module 'dolly_langchain.batch' has no attribute {name!r}")
