"""``dolly batch``: answer (or embed) every record of a file or table, in this process or as a Spark job.

    dolly batch records.jsonl answers.parquet --max-new-tokens 64                 # in-process, a progress bar
    dolly batch records.jsonl answers.parquet --spark 'local[2]'                  # Spark on this machine (Java 17+)
    dolly batch sales.tickets out/answers.parquet --spark yarn --instruction-column question --id-column ticket_id
    dolly batch docs.jsonl chunks.parquet --embed --text-column text             # chunk vectors for an index

OUTPUT is Parquet (a file in-process, a directory of parts under Spark; ``.delta`` with delta-spark installed)
holding the input's columns plus ``response``, ``finish_reason``, ``prompt_tokens``, ``completion_tokens`` and
``error`` (with ``--embed``: one row per chunk and its ``embedding``; load them with
``DocumentIndex.add_embedded``). An input column named like one of these is kept as ``input_NAME``. A row that
cannot be answered gets an ``error`` and the job goes on, unless ``--fail-fast``. The output appears only when the
job succeeded; an older one stays until then.
"""

from __future__ import annotations

import argparse
import sys
import time

from dolly_langchain.clitools import CLIError, add_model_arguments, int_at_least, non_negative_int, positive_int

HELP = "answer or embed every record of a file or table (in-process or on Spark)"
PARSER_OPTIONS = {"description": "Answer every record of INPUT with the model (or, with --embed, chunk and embed "
                  "its texts) and write OUTPUT (Parquet). Without --spark it runs here; with --spark MASTER as a "
                  "Spark job."}


def register(commands) -> None:
    configure(commands.add_parser("batch", help=HELP, **PARSER_OPTIONS))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="INPUT",
                        help="a .jsonl, .csv or .parquet file or a directory of them; with --spark also a table name")
    parser.add_argument("output", metavar="OUTPUT",
                        help="the Parquet file (a directory of parts under --spark; .delta: a Delta table)")
    parser.add_argument("--spark", metavar="MASTER", default=None,
                        help="run as a Spark job on MASTER: local[2], local[2,3] (3 tries per task), spark://HOST:7077,"
                        " yarn (needs pyspark and Java 17+)")
    add_model_arguments(parser)
    parser.add_argument("--instruction-column", default="instruction", metavar="NAME",
                        help="column holding the instruction (default: instruction)")
    parser.add_argument("--context-column", default="context", metavar="NAME",
                        help="column holding the context, when there is one (default: context)")
    parser.add_argument("--id-column", default="id", metavar="NAME",
                        help="unique key of a record (default: id; when the input has none, rows are numbered)")
    parser.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                        help="prompts per engine batch (default 16; --embed: texts per forward pass, 32)")
    parser.add_argument("--embed", action="store_true",
                        help="chunk and embed --text-column as `dolly rag index` would, instead of answering")
    parser.add_argument("--text-column", default="text", metavar="NAME",
                        help="--embed: column holding the text (default: text)")
    parser.add_argument("--embeddings", default="minilm", metavar="NAME",
                        help="--embed: 'minilm' (offline all-MiniLM-L6-v2, the default), an encoder directory or hub id")
    parser.add_argument("--chunk-tokens", type=int_at_least(16, "chunk_tokens"), default=None, metavar="N",
                        help="--embed: most tokens per chunk, as dolly rag index --chunk-tokens (default 256)")
    parser.add_argument("--chunk-overlap", type=non_negative_int, default=None, metavar="N",
                        help="--embed: tokens shared by neighbouring chunks (default 32)")
    parser.add_argument("--fail-fast", action="store_true",
                        help="stop at the first row that cannot be answered, instead of recording its error")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    _check(args)
    started = time.perf_counter()
    spark, created = None, False
    try:
        if args.spark is None:
            summary = _run_local(args)
        else:
            from dolly_langchain.batch.spark import spark_session

            spark, created = spark_session(args.spark, delta=args.output.endswith(".delta"))
            summary = _run_spark(spark, args)
    except Exception as err:
        from dolly_langchain.batch.spark import spark_error

        message = spark_error(err)
        if message is None:
            raise
        raise CLIError(f"the Spark job failed: {message}") from None
    finally:
        if created:
            spark.stop()
    seconds = time.perf_counter() - started
    print(f"dolly batch: {summary} in {seconds:.1f} s -> {args.output}", file=sys.stderr)
    return 0


def _check(args: argparse.Namespace) -> None:
    if args.output.endswith(".delta") and args.spark is None:
        raise CLIError("a .delta OUTPUT is a Delta table: it needs --spark (and delta-spark installed)")
    if args.input == args.output:
        raise CLIError(f"INPUT and OUTPUT are the same path ({args.input}); write the results elsewhere")
    if not args.embed:
        for flag, value, default in (("--text-column", args.text_column, "text"),
                                     ("--embeddings", args.embeddings, "minilm"),
                                     ("--chunk-tokens", args.chunk_tokens, None),
                                     ("--chunk-overlap", args.chunk_overlap, None)):
            if value != default:
                raise CLIError(f"{flag} is for --embed; to answer, name the instruction with --instruction-column")


def _generate_options(args: argparse.Namespace) -> dict:
    from dolly_langchain.generation import DEFAULT_BATCH_SIZE

    return {
        "model": args.model, "engine": args.engine, "compute_type": args.compute_type, "device": args.device,
        "instruction_column": args.instruction_column, "context_column": args.context_column,
        "id_column": args.id_column, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "batch_size": args.batch_size or DEFAULT_BATCH_SIZE, "fail_fast": args.fail_fast,
        "repetition_penalty": args.repetition_penalty, "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "stop_loops": args.stop_loops,
    }


def _embed_options(args: argparse.Namespace) -> dict:
    return {"text_column": args.text_column, "id_column": args.id_column, "model": args.model,
            "embeddings": args.embeddings, "chunk_tokens": args.chunk_tokens, "chunk_overlap": args.chunk_overlap,
            "batch_size": args.batch_size or 32, "fail_fast": args.fail_fast}


def _run_local(args: argparse.Namespace) -> str:
    from dolly_langchain.batch.api import embed_dataframe, generate_dataframe
    from dolly_langchain.batch.io import read_local, write_local

    pdf = read_local(args.input)
    if args.embed:
        out = embed_dataframe(pdf, **_embed_options(args))
        write_local(out, args.output)
        return f"{len(pdf)} rows, {int(out['error'].isna().sum())} chunks embedded"
    out = generate_dataframe(pdf, **_generate_options(args))
    write_local(out, args.output)
    return (f"{len(out)} rows answered, {int(out['error'].notna().sum())} errors, "
            f"{int(out['completion_tokens'].sum())} tokens generated")


def _run_spark(spark, args: argparse.Namespace) -> str:
    from dolly_langchain.batch.api import embed_dataframe, generate_dataframe
    from dolly_langchain.batch.spark import read_input, write_output

    df = read_input(spark, args.input, args.id_column)
    out = embed_dataframe(df, **_embed_options(args)) if args.embed else generate_dataframe(df, **_generate_options(args))
    write_output(out, args.output)
    from pyspark.sql import functions as F

    written = spark.read.parquet(args.output) if not args.output.endswith(".delta") else spark.read.format(
        "delta").load(args.output)
    if args.embed:
        chunks = written.where(F.col("error").isNull()).count()
        return f"{chunks} chunks embedded"
    rows, errors, tokens = written.agg(F.count(F.lit(1)), F.count("error"), F.sum("completion_tokens")).first()
    return f"{rows} rows answered, {errors} errors, {tokens or 0} tokens generated"
