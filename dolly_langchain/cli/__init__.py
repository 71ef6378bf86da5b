"""``dolly``: one command tree for every job.

    dolly ask "Give me three tips for writing clear commit messages."      # dolly_langchain.cli.ask
    dolly chat                                                             # dolly_langchain.cli.chat
    dolly rag index docs/ --index docs.sqlite                              # dolly_langchain.rag.cli
    dolly rag ask "How do I reset my password?" --index docs.sqlite
    dolly serve --port 8000                                                # dolly_langchain.serve.cli
    dolly eval runs/my-dolly --tasks card --samples 500                    # dolly_langchain.evaluation.cli
    dolly finetune --input-model EleutherAI/pythia-410m --local-output-dir runs/dolly-410m   # finetune.cli
    dolly finetune plan --preset dolly-v2-12b-a100

Each subcommand lives in its own module, which provides ``HELP`` (its line in ``dolly --help``), ``PARSER_OPTIONS``
(description, epilog, formatter), ``configure(parser)`` (adds its flags and sets ``run``) and ``register(commands)``
(adds it to this tree). ``dolly-finetune`` and ``dolly-eval`` are aliases: the same ``configure`` on a parser of
that name. Any :class:`~dolly_langchain.errors.DollyError` becomes one line on stderr and exit code 2
(:func:`~dolly_langchain.clitools.run_command`). Building the tree imports no torch or transformers; commands import them when they run.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dolly_langchain.cli.ask import run as ask_command  # noqa: F401  (importable from here as before)
from dolly_langchain.clitools import EXIT_USAGE, CLIError, run_command  # noqa: F401  (likewise)

__all__ = ["build_parser", "main", "run_command"]


def build_parser(prog: str = "dolly") -> argparse.ArgumentParser:
    """The whole ``dolly`` tree: ask, chat, rag (index, ask, remove), serve, eval, finetune (plan)."""
    from dolly_langchain.batch import cli as batch
    from dolly_langchain.cli import ask, chat
    from dolly_langchain.evaluation import cli as evaluation
    from dolly_langchain.rag import cli as rag
    from dolly_langchain.serve import cli as serve
    from finetune import cli as finetune

    parser = argparse.ArgumentParser(
        prog=prog, description="Dolly-style instruction following on local models: answer, chat, retrieve, "
        "evaluate and fine-tune."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (ask, chat, rag, serve, batch, evaluation, finetune):
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dolly``."""
    return run_command(build_parser(), argv)
