"""What the ``dolly`` subcommands share: the one-line error type, argument types and model loading."""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2


class CLIError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


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
    """``--model``, ``--max-new-tokens``, ``--temperature``, ``--stream``, ``--json``: the same for every command."""
    parser.add_argument(
        "--model", metavar="ID_OR_PATH", default=None,
        help="hub id or local model directory (default: the embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, metavar="N", help="default: 256")
    parser.add_argument(
        "--temperature", type=non_negative_float, default=0.0, metavar="T",
        help="0 (default) decodes greedily and reproducibly; above 0 samples with Dolly's top_p=0.92",
    )
    parser.add_argument(
        "--engine", choices=("auto", "transformers", "ctranslate2"), default="auto",
        help="auto (default): ctranslate2 for the embedded model when installed, transformers otherwise",
    )
    parser.add_argument(
        "--compute-type", default="auto", metavar="TYPE",
        choices=("auto", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "float16", "bfloat16", "float32"),
        help="ctranslate2 only: auto (default) is int8 on CPU and int8_float16 on CUDA",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where the model runs (default: cpu for ctranslate2, the model's device for transformers)")
    parser.add_argument("--stream", action="store_true", help="print the response as it is generated")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the response and timings")


def load_llm(args: argparse.Namespace):
    """The ``DollyLLM`` that ``--model``, ``--engine``, ``--compute-type``, ``--device``, ``--max-new-tokens`` and
    ``--temperature`` ask for."""
    from dolly_langchain.llm import DollyLLM
    from dolly_langchain.models import ModelNotFoundError

    options = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        options["temperature"] = args.temperature
    print(f"dolly: loading {args.model or 'the embedded SmolLM2-135M-Instruct'} ...", file=sys.stderr, flush=True)
    try:
        return DollyLLM.from_model_id(
            args.model, engine=args.engine, compute_type=args.compute_type, device=args.device, **options
        )
    except (ModelNotFoundError, ImportError) as err:
        raise CLIError(str(err)) from None
    except ValueError as err:  # an engine option this model or machine cannot take (e.g. --device cuda, no GPU)
        raise CLIError(f"{err}") from None
