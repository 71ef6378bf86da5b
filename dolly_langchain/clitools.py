"""What the ``dolly`` subcommands share: the one error handler, the error type for a bad flag, argument types, the
generation flags and model loading.

Subcommand modules (and the ``dolly-finetune`` / ``dolly-eval`` aliases) import from here, never from
:mod:`dolly_langchain.cli`, which imports them to build the tree.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from dolly_langchain.errors import EXIT_USAGE, DollyError  # noqa: F401  (EXIT_USAGE: importable from here as before)
from dolly_langchain.generation import (
    ANSWER_DEFAULTS,
    ALL_COMPUTE_TYPE_CHOICES,
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


# Argument types: each refuses what the flag cannot mean (argparse puts the flag's name in front of the message,
# ``argument --epochs: must be a finite number, got nan``, and exits with code 2). ``float()`` reads
# "nan" and "inf": the float types refuse both, as no flag of ours means either.


def int_at_least(minimum: int, name: str):
    """An argument type: an integer of ``minimum`` or more. ``name`` is what argparse calls the type in its
    "invalid NAME value" message."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = name
    return parse


#: An integer of 1 or more (a count, a size, a number of steps).
positive_int = int_at_least(1, "positive_int")
#: An integer of 0 or more.
non_negative_int = int_at_least(0, "non_negative_int")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text.strip()}")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0."""
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value:g}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number of 0 or more (``--temperature``: ``nan`` or ``inf`` would otherwise decode greedily without
    a word)."""
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value:g}")
    return value


def fraction(text: str) -> float:
    """A finite number from 0 up to, not including, 1 (a dropout rate)."""
    value = _finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {value:g}")
    return value


def text(value: str) -> str:
    """Text from the command line (an instruction, a message): refuses bytes that are not UTF-8, which Python hands
    over as lone surrogates (``\\udcff`` for the byte 0xff) and a tokenizer cannot take."""
    problem = text_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def text_problem(value: str) -> str | None:
    """Why ``value`` is not text a model can read (a lone surrogate: bytes that were not UTF-8), or ``None``."""
    found = _SURROGATE.search(value)
    if found is None:
        return None
    char, position = found.group(), found.start()
    if "\udc80" <= char <= "\udcff":  # surrogateescape: how Python decodes argv (and stdin) bytes
        return f"is not valid UTF-8 (byte 0x{ord(char) - 0xDC00:02x} at character {position}); pass UTF-8 text"
    return f"holds a lone surrogate (U+{ord(char):04X} at character {position}), which is not text"


_SURROGATE = re.compile("[\ud800-\udfff]")


def output_dir_problem(path: str | Path) -> str | None:
    """Why a directory cannot be created or written at ``path`` (a file there, a file above it, no write
    permission), or ``None``; checked before a command starts work that would only fail when it writes."""
    path = Path(path)
    existing = path
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    if existing == path and not path.is_dir():
        return "exists and is not a directory"
    if not existing.is_dir():
        return f"cannot be created: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable" if existing == path else f"cannot be created: {existing} is not writable"
    return None


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """:func:`add_model_arguments`, then ``--stream`` and ``--json``: the same for every one-shot command."""
    add_model_arguments(parser)
    parser.add_argument("--stream", action="store_true", help="print the response as it is generated")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the response and timings")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--max-new-tokens``, ``--temperature``, ``--repetition-penalty``, ``--no-repeat-ngram-size``,
    ``--stop-loops``, ``--engine``, ``--compute-type``, ``--device``."""
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
    penalty, ngram = ANSWER_DEFAULTS["repetition_penalty"], ANSWER_DEFAULTS["no_repeat_ngram_size"]
    parser.add_argument(
        "--repetition-penalty", type=positive_float, default=penalty, metavar="P",
        help=f"above 1 discourages repeating what is already there, the context included (default {penalty:g}: off)",
    )
    parser.add_argument(
        "--no-repeat-ngram-size", type=non_negative_int, default=ngram, metavar="N",
        help=f"never repeat a run of N tokens (default {ngram}: off)",
    )
    loops = ANSWER_DEFAULTS.get("stop_loops", False)
    parser.add_argument(
        "--stop-loops", action=argparse.BooleanOptionalAction, default=loops,
        help=f"end an answer where it starts repeating itself, decoding unchanged up to there (default: "
        f"{'on' if loops else 'off'}; chosen by benchmarks/answers.py: greedy answers loop without it)",
    )
    parser.add_argument(
        "--engine", choices=ENGINE_CHOICES, default="auto",
        help="auto (default): for the embedded model on CPU, llama.cpp for one answer and ctranslate2 int8 for "
        "batches; transformers for other models. llamacpp: GGUF conversion (not GPT-J)",
    )
    parser.add_argument(
        "--compute-type", default="auto", metavar="TYPE",
        choices=ALL_COMPUTE_TYPE_CHOICES,
        help="how the weights are stored. ctranslate2: auto (default) is int8 on CPU and int8_float16 on CUDA; "
        "llamacpp (GGUF types q4_0 ... f32): auto is the embedded model's shipped q4_1, q8_0 for other models",
    )
    parser.add_argument("--device", choices=DEVICES, default=None,
                        help="where the model runs (default: cpu for ctranslate2, the model's device for transformers)")


def load_llm(args: argparse.Namespace, *, chat: bool = False, langchain: bool = True):
    """The ``DollyLLM`` (``ChatDolly`` with ``chat=True``) that ``--model``, ``--engine``, ``--compute-type``,
    ``--device``, ``--max-new-tokens``, ``--temperature``, ``--repetition-penalty`` and ``--no-repeat-ngram-size``
    ask for. ``langchain=False``: a :class:`~dolly_langchain.lc_common.DollyAnswerer` instead of ``DollyLLM`` (the
    same answers, ``invoke`` and ``stream``, without importing LangChain)."""
    if chat:
        from dolly_langchain.chat import ChatDolly as model_class
    elif langchain:
        from dolly_langchain.llm import DollyLLM as model_class
    else:
        from dolly_langchain.lc_common import DollyAnswerer as model_class

    check_device(args)
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0,
               "repetition_penalty": args.repetition_penalty, "no_repeat_ngram_size": args.no_repeat_ngram_size,
               "stop_loops": args.stop_loops}
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


def check_device(args: argparse.Namespace) -> None:
    """Refuse ``--device cuda`` for the transformers engine when PyTorch sees no CUDA GPU, before the model loads
    (PyTorch would otherwise fail on ``model.to("cuda")`` with an AssertionError, after the load). CTranslate2
    checks its own devices."""
    if args.device != "cuda":
        return
    if args.engine == "auto" and args.compute_type not in (None, "auto"):
        return  # a compute type picks CTranslate2 (dolly_langchain.runtime.load_runtime)
    from dolly_langchain.runtime import resolve_engine

    if resolve_engine(args.engine, args.model) != "transformers":
        return
    import torch

    if not torch.cuda.is_available():
        raise CLIError("--device cuda: PyTorch sees no CUDA GPU on this machine (no GPU, no driver, or a CPU-only "
                       "build of torch); pass --device cpu, or run where a GPU is available.")
