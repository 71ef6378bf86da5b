"""What the ``dolly`` subcommands share: the one error handler, the error type for a bad flag, argument types, the
generation flags and model loading.

Subcommand modules (and the ``dolly-finetune`` / ``dolly-eval`` aliases) import from here, never from
:mod:`dolly_langchain.cli`, which imports them to build the tree.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dolly_langchain.errors import EXIT_USAGE, DollyError  # noqa: F401  (EXIT_USAGE: importable from here as before)
from dolly_langchain.generation import (
    COMPUTE_TYPE_CHOICES,
    DEFAULT_GENERATION,
    DEVICES,
    EMBEDDED_MODEL_NAME,
    ENGINE_CHOICES,
)


class CLIError(DollyError):
    """A problem with a flag or an input file of a command; printed as one line, exit code 2."""


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` with ``parser`` and run the chosen command (``args.run``); the one handler of every command:
    a :class:`~dolly_langchain.errors.DollyError` becomes ``PROG: error: MESSAGE`` on stderr and exit code 2."""
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except DollyError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """:func:`add_model_arguments`, then ``--stream`` and ``--json``: the same for every one-shot command."""
    add_model_arguments(parser)
    parser.add_argument("--stream", action="store_true", help="print the response as it is generated")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the response and timings")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--max-new-tokens``, ``--temperature``, ``--engine``, ``--compute-type``, ``--device``."""
    parser.add_argument(
        "--model", metavar="ID_OR_PATH", default=None,
        help=f"hub id or local model directory (default: the embedded {EMBEDDED_MODEL_NAME})",
    )
    default_tokens = DEFAULT_GENERATION["max_new_tokens"]
    parser.add_argument("--max-new-tokens", type=positive_int, default=default_tokens, metavar="N",
                        help=f"default: {default_tokens}")
    parser.add_argument(
        "--temperature", type=non_negative_float, default=0.0, metavar="T",
        help=f"0 (default) decodes greedily and reproducibly; above 0 samples with Dolly's "
        f"top_p={DEFAULT_GENERATION['top_p']}",
    )
    parser.add_argument(
        "--engine", choices=ENGINE_CHOICES, default="auto",
        help="auto (default): ctranslate2 for the embedded model when installed, transformers otherwise",
    )
    parser.add_argument(
        "--compute-type", default="auto", metavar="TYPE",
        choices=COMPUTE_TYPE_CHOICES,
        help="ctranslate2 only: auto (default) is int8 on CPU and int8_float16 on CUDA",
    )
    parser.add_argument("--device", choices=DEVICES, default=None,
                        help="where the model runs (default: cpu for ctranslate2, the model's device for transformers)")


def load_llm(args: argparse.Namespace, *, chat: bool = False):
    """The ``DollyLLM`` (``ChatDolly`` with ``chat=True``) that ``--model``, ``--engine``, ``--compute-type``,
    ``--device``, ``--max-new-tokens`` and ``--temperature`` ask for."""
    if chat:
        from dolly_langchain.chat import ChatDolly as model_class
    else:
        from dolly_langchain.llm import DollyLLM as model_class

    options = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        options["temperature"] = args.temperature
    print(f"dolly: loading {args.model or f'the embedded {EMBEDDED_MODEL_NAME}'} ...", file=sys.stderr, flush=True)
    try:
        return model_class.from_model_id(
            args.model, engine=args.engine, compute_type=args.compute_type, device=args.device, **options
        )
    except ImportError as err:
        raise CLIError(str(err)) from None
    except ValueError as err:  # an engine option this model or machine cannot take (e.g. --device cuda, no GPU)
        raise CLIError(f"{err}") from None
