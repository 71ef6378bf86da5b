"""Batch jobs on Apache Spark: the plan, the job, the session, and reading and writing tables.

A generation job is three Spark steps over the engine-neutral functions of :mod:`dolly_langchain.batch.frames`:

1. ``mapInPandas(measure)`` over the id, instruction and context columns: each prompt's length (and the rows that
   cannot be answered), kept (``persist``) so it runs once;
2. a global order (a window over the small ``(id, length)`` table: ``row_number`` longest first, ties by id) turns
   into batch ids, the batches ``DollyLLM.batch`` would form in one process;
3. the input joined with its batch ids, range-partitioned by batch id (about one batch per task, so idle workers
   take the next batch), then ``groupBy(batch).applyInPandas(generate_batch)``.

Exactly once: a task that fails (a worker killed, an out-of-memory) is retried by Spark (``spark.task.maxFailures``;
``local[N,F]`` locally) and recomputes the same rows into the same batches; Spark's commit protocol keeps only one
attempt's output. Each Python worker loads the model once (Spark reuses Python workers between tasks), with
``cores / concurrent tasks`` engine threads (``spark.task.cpus`` on a cluster), so workers x threads <= cores.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from dolly_langchain.batch.frames import (
    BATCH,
    EMBED_COLUMNS,
    GENERATE_COLUMNS,
    PLAN_ERROR,
    TOKENS,
    EmbedSpec,
    GenerateSpec,
    clashes,
    embed_batch,
    generate_batch,
    measure,
)
from dolly_langchain.errors import DollyValueError, MissingDependencyError

SPARK_INSTALL = "pip install 'dolly-langchain[spark]'"
JAVA_INSTALL = ("Spark needs a Java runtime (17 or 21): e.g. sudo apt-get install -y openjdk-17-jre-headless, or set "
                "JAVA_HOME to one")


# -- sessions ----------------------------------------------------------------------------------------------------


def java_available() -> bool:
    home = os.environ.get("JAVA_HOME")
    return bool(shutil.which("java") or (home and Path(home, "bin", "java").is_file()))


def spark_session(master: str, *, delta: bool = False, app_name: str = "dolly batch"):
    """``(session, created)``: the active SparkSession (a notebook's, a test's; ``master`` is then not used), or a new
    one on ``master`` (``local[2]``, ``spark://host:7077``, ``yarn``...) with its Python workers on this interpreter
    and, with ``delta``, Delta Lake (``delta-spark``). Stop it only when ``created``."""
    if not java_available():
        raise MissingDependencyError(f"--spark {master}: {JAVA_INSTALL}")
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise MissingDependencyError(f"--spark needs pyspark: {SPARK_INSTALL}") from None
    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    # Workers must run this interpreter (its packages); pyspark's default is whatever `python3` is on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = (SparkSession.builder.master(master).appName(app_name)
               .config("spark.pyspark.python", sys.executable)
               .config("spark.ui.showConsoleProgress", "true")
               .config("spark.sql.execution.arrow.pyspark.enabled", "true"))
    if delta:
        try:
            from delta import configure_spark_with_delta_pip
        except ImportError:
            raise MissingDependencyError("a .delta OUTPUT needs delta-spark: pip install delta-spark") from None
        builder = configure_spark_with_delta_pip(
            builder.config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
            .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog"))
    return builder.getOrCreate(), True


def worker_threads(spark) -> int:
    """Engine threads for each Python worker: locally ``cores // N`` for ``local[N]``; on a cluster Spark's own
    ``spark.task.cpus`` (the cores it reserves for each task). One thread per worker was the fastest on 2 cores
    (issue 20's measurements), which is what ``local[2]`` gives there."""
    master = spark.sparkContext.master
    if master.startswith("local"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        found = re.match(r"local\[(\*|\d+)", master)
        slots = 1 if found is None else (cores if found.group(1) == "*" else int(found.group(1)))
        return max(1, cores // max(slots, 1))
    return max(1, int(spark.conf.get("spark.task.cpus", "1")))


# -- jobs --------------------------------------------------------------------------------------------------------


def run_generate(df, spec: GenerateSpec, batch_function=generate_batch):
    """The Spark job of :func:`~dolly_langchain.batch.api.generate_dataframe`: a lazy DataFrame of the input's
    columns plus ``response``, ``finish_reason``, ``prompt_tokens``, ``completion_tokens``, ``error``.

    ``batch_function(pdf, spec)`` answers one planned batch (:func:`~dolly_langchain.batch.frames.generate_batch`;
    the tests wrap it in one whose first call kills its worker)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType, StringType, StructField, StructType


    df = _renamed(df, clashes(df.columns, GENERATE_COLUMNS))
    _check_column(df, spec.instruction_column, "instruction_column", "--instruction-column")
    if spec.context_column is not None and spec.context_column not in df.columns:
        if spec.context_column != "context":
            _check_column(df, spec.context_column, "context_column", "--context-column")
        spec = replace(spec, context_column=None)
    _check_id(df, spec.id_column)
    if spec.threads is None:
        spec = replace(spec, threads=worker_threads(df.sparkSession))

    key = spec.id_column
    inputs = [key, spec.instruction_column] + ([spec.context_column] if spec.context_column else [])
    measured_schema = StructType([df.schema[key], StructField(TOKENS, LongType()), StructField(PLAN_ERROR, StringType())])

    def measure_partition(batches):
        for pdf in batches:
            yield measure(pdf, spec)[[key, TOKENS, PLAN_ERROR]]

    measured = df.select(*inputs).mapInPandas(measure_partition, measured_schema)
    # One global order: rows that can be answered ranked as DollyLLM.batch ranks prompts (longest first, ties by
    # id), the others apart. The window sorts only (id, length): small, even for millions of rows.
    bad = F.col(TOKENS) < 0
    order = Window.partitionBy(bad.alias("_bad")).orderBy(F.col(TOKENS).desc(), F.col(key).asc())
    rank = F.row_number().over(order) - 1
    size = spec.batch_size
    plan = (measured.withColumn("_bad", bad).withColumn("_rank", rank)
            .withColumn(BATCH, F.when(F.col("_bad"), -1 - F.floor(F.col("_rank") / size))
                        .otherwise(F.floor(F.col("_rank") / size)).cast("long"))
            .drop("_bad", "_rank").persist())
    lowest, highest = plan.agg(F.min(BATCH), F.max(BATCH)).first()
    batches = 0 if lowest is None else highest - lowest + 1
    parallelism = df.sparkSession.sparkContext.defaultParallelism
    # About one batch per task: a worker that finishes early takes the next batch (hash partitioning of a few
    # dozen ids would leave some tasks with three batches and others empty).
    parts = max(1, min(batches, 64 * parallelism))
    planned = df.join(plan, on=key).repartitionByRange(parts, BATCH)
    out_schema = StructType([*df.schema.fields, StructField("response", StringType()),
                             StructField("finish_reason", StringType()), StructField("prompt_tokens", LongType()),
                             StructField("completion_tokens", LongType()), StructField("error", StringType())])
    columns = [*df.columns, *GENERATE_COLUMNS]

    def answer(pdf):
        return batch_function(pdf, spec)[columns]

    return planned.groupBy(BATCH).applyInPandas(answer, out_schema)


def run_embed(df, spec: EmbedSpec):
    """The Spark job of :func:`~dolly_langchain.batch.api.embed_dataframe`: one row per chunk (lazy)."""
    from pyspark.sql.types import ArrayType, FloatType, LongType, StringType, StructField, StructType


    df = _renamed(df, clashes(df.columns, EMBED_COLUMNS))
    _check_column(df, spec.text_column, "text_column", "--text-column")
    _check_id(df, spec.id_column)
    if spec.threads is None:
        spec = replace(spec, threads=worker_threads(df.sparkSession))
    types = {"position": LongType(), "chunk_tokens": LongType(), "embedding": ArrayType(FloatType())}
    out_schema = StructType([*df.schema.fields,
                             *(StructField(name, types.get(name, StringType())) for name in EMBED_COLUMNS)])
    columns = [*df.columns, *EMBED_COLUMNS]

    def embed_partition(batches):
        for pdf in batches:
            yield embed_batch(pdf, spec)[columns]

    return df.mapInPandas(embed_partition, out_schema)


def _renamed(df, renamed: dict[str, str]):
    for old, new in renamed.items():
        df = df.withColumnRenamed(old, new)
    return df


def _check_column(df, name: str, parameter: str, flag: str) -> None:
    if name not in df.columns:
        raise DollyValueError(f"the input has no column {name!r} (its columns: {df.columns}); name the right one "
                              f"with {flag} / {parameter}=")


def _check_id(df, key: str) -> None:
    """A unique, non-empty key: batches are formed in its order, and each input row must come out once."""
    from pyspark.sql import functions as F

    if key not in df.columns:
        raise DollyValueError(
            f"a Spark DataFrame needs a unique key column to batch reproducibly; it has no {key!r} (its columns: "
            f"{df.columns}): name one with --id-column / id_column=, or add one"
        )
    problem = (df.groupBy(key).count().where(F.col(key).isNull() | (F.col("count") > 1)).limit(1).collect())
    if problem:
        value, count = problem[0][key], problem[0]["count"]
        what = "empty values" if value is None else f"{value!r} {count} times"
        raise DollyValueError(f"the id column {key!r} is not a unique key ({what}); name a unique key with "
                              "--id-column / id_column=")


# -- reading and writing -----------------------------------------------------------------------------------------


def read_input(spark, source: str, id_column: str):
    """``source`` as a Spark DataFrame: a JSONL, CSV or Parquet file or directory (local or a URI), else a table
    name. Without ``id_column`` the rows are numbered in the order Spark reads them (stable for the same files)."""
    from dolly_langchain.batch.io import input_format

    if "://" in source or Path(source).exists():
        kind = input_format(source)
        reader = spark.read
        if kind == "jsonl":
            df = reader.json(source)
        elif kind == "csv":
            df = reader.options(header=True, multiLine=True, escape='"').csv(source)
        else:
            df = reader.parquet(source)
    else:
        try:
            df = spark.table(source)
        except Exception as err:  # noqa: BLE001 - pyspark's AnalysisException: no such table
            raise DollyValueError(f"INPUT {source!r} is neither a file, a directory nor a table Spark knows "
                                  f"({str(err).splitlines()[0]})") from None
    if id_column in df.columns:
        return df
    # zipWithIndex numbers rows by partition, then position: the same files read with the same settings give the
    # same numbers, also when a task is retried.
    from pyspark.sql.types import LongType, StructField, StructType

    schema = StructType([StructField(id_column, LongType(), False), *df.schema.fields])
    rows = df.rdd.zipWithIndex().map(lambda pair: (pair[1], *pair[0]))
    return spark.createDataFrame(rows, schema)


def write_output(df, output: str) -> None:
    """Write a Spark DataFrame to ``output``: Delta for a ``.delta`` path (a transaction), else Parquet. A local
    path is written beside it and renamed into place when complete, so a failed job leaves no half-written
    output and an older one stays; a URI relies on Spark's commit protocol (only committed tasks' files)."""
    if output.endswith(".delta"):
        df.write.format("delta").mode("overwrite").save(output)
        return
    if "://" in output and not output.startswith("file://"):
        df.write.mode("overwrite").parquet(output)
        return
    from dolly_langchain.files import replace_dir

    target = Path(output.removeprefix("file://")).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.writing-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        df.write.parquet(str(tmp))
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def spark_error(err: BaseException) -> str | None:
    """The useful line of a Spark job's failure (our own error from a worker when there is one), or ``None`` when
    ``err`` is not Spark's."""
    module = type(err).__module__
    if not module.startswith(("pyspark", "py4j")):
        return None
    text = str(err)
    found = re.search(r"dolly_langchain[\w.]*\.(\w+Error): (.+)", text)
    if found:
        return f"{found.group(1)}: {found.group(2).strip()}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


__all__: list[Any] = ["read_input", "run_embed", "run_generate", "spark_session", "worker_threads", "write_output"]
