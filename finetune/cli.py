"""``dolly finetune`` and ``dolly finetune plan``: Dolly's training recipe and its launch planner in the command tree.

``dolly finetune FLAGS`` is ``dolly-finetune FLAGS`` (:mod:`finetune.train`, launch commands under ``--help``) and
``dolly finetune plan FLAGS`` is ``dolly-finetune plan FLAGS`` (:mod:`finetune.plan`): the same flags, defaults and
errors. Building the parsers imports no torch or transformers; training imports them when it runs.
"""

from __future__ import annotations

import argparse

from finetune import plan
from finetune.common import DESCRIPTION, HelpFormatter, add_training_flags, given
from finetune.presets import PRESETS
from finetune.train import EPILOG

__all__ = ["HELP", "PARSER_OPTIONS", "configure", "register", "run"]

HELP = "fine-tune a causal LM with Dolly's recipe (TRL, DeepSpeed, LoRA/QLoRA); `plan` says what to launch"
PARSER_OPTIONS = {"description": DESCRIPTION, "epilog": EPILOG, "formatter_class": HelpFormatter}


def configure(parser: argparse.ArgumentParser) -> None:
    """Every training flag, and ``plan`` as a subcommand."""
    # Not required at argparse level: argparse would demand it of `dolly finetune plan` too (a parent parser checks
    # its required flags after the subcommand's). Checked when training runs instead, with argparse's own message.
    add_training_flags(parser, PRESETS, require_output_dir=False)

    def run_training(args: argparse.Namespace) -> int:
        if not given(args.local_output_dir):
            parser.error("the following arguments are required: --local-output-dir")
        return run(args)

    parser.set_defaults(run=run_training)
    commands = parser.add_subparsers(title="subcommands", metavar="[plan]")
    plan.register(commands)


def run(args: argparse.Namespace) -> int:
    """Train with the parsed flags (:func:`finetune.train.run`)."""
    from finetune.train import run as train

    return train(args)


def register(commands) -> None:
    """Add ``finetune`` (and ``finetune plan``) to the ``dolly`` command tree."""
    configure(commands.add_parser("finetune", help=HELP, **PARSER_OPTIONS))
