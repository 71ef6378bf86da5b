"""dolly-eval: the Dolly model card's lm-eval table and instruction following on held-out dolly-15k, in one command.

Launch commands (``dolly-eval ARGS`` and ``python -m finetune.evaluate ARGS`` are the same program)::

    # the embedded SmolLM2-135M-Instruct on the card's seven tasks, a seeded 500 documents per task
    dolly-eval --samples 500 --data-dir ~/dolly-eval-data

    # base vs fine-tuned, full splits (hours on a CPU, minutes on a GPU)
    dolly-eval EleutherAI/pythia-2.8b runs/dolly-v2-3b --device cuda --batch-size 64

    # instruction following: the records runs/my-dolly held out, answered by it and by its base model
    dolly-eval runs/my-dolly HuggingFaceTB/SmolLM2-135M-Instruct --generation --samples 200

MODEL is a hub id, a local directory, a ``dolly-finetune`` run directory, or nothing for the embedded model.

The card table (``--tasks``, default all seven when ``--generation`` is not given) runs EleutherAI's
lm-evaluation-harness with its official task definitions, scored through this library's engines (``--engine``:
transformers by default, whose scores equal lm-eval's ``HFLM``; each shared context is computed once for its
choices, see ``dolly_langchain/evaluation/lm.py``); only the data source changes (``--data-dir``, default
``$DOLLY_EVAL_DIR``: the authors' original files, see ``dolly_langchain/evaluation/taskdata.py``; without it, the hub
datasets lm-eval normally downloads). It prints the card's row format with standard errors and the card's published
rows, and writes ``OUTPUT/results.json`` and ``OUTPUT/card.png``. Metrics are the card's: acc_norm for openbookqa,
arc_easy, arc_challenge, hellaswag and piqa, acc for winogrande and boolq (``dolly_langchain/evaluation/card.py`` says
how that was checked). ``--samples N`` scores a seeded random N documents per task, and every printed number says so.
Results are cached per (model fingerprint, engine and compute type, task, sample) under
``~/.cache/dolly_langchain/eval`` (``$DOLLY_LANGCHAIN_CACHE`` moves it), each request as it completes, so an interrupted run resumes.

``--generation`` answers held-out dolly-15k instructions greedily through ``DollyLLM`` (see
``dolly_langchain/evaluation/generation.py``): ROUGE-L, the share of answers that ended by themselves, mean length,
per category, and a few answers side by side, in ``results.json`` and ``OUTPUT/generation.md``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from dolly_langchain.clitools import positive_int, run_command
from dolly_langchain.evaluation.card import CARD_TASKS
from dolly_langchain.evaluation.runner import (
    DEFAULT_ENGINE,
    DEFAULT_GENERATION_SAMPLES,
    DEFAULT_OUTPUT,
    EVAL_ENGINE_CHOICES,
    configure_logging,
    evaluate,
    resolve_device,
    resolve_tasks,
)
from dolly_langchain.generation import (
    COMPUTE_TYPE_CHOICES,
    DEFAULT_BATCH_SIZE,
    DEFAULT_GENERATION,
    DEVICES,
)

__all__ = ["HELP", "PARSER_OPTIONS", "build_parser", "configure", "main", "parse_args", "register", "run"]

HELP = "score models on the Dolly model card's lm-eval table and on held-out dolly-15k instructions"
PARSER_OPTIONS = {
    "description": "Evaluate models on the Dolly model card's lm-eval table and on held-out dolly-15k instructions.",
    "epilog": __doc__.split("\n\n", 1)[1],
    "formatter_class": argparse.RawDescriptionHelpFormatter,
}


def register(commands) -> None:
    """Add ``dolly eval`` to the ``dolly`` command tree."""
    configure(commands.add_parser("eval", help=HELP, **PARSER_OPTIONS))


def _tasks(value: str) -> tuple[str, ...]:
    if value == "card":
        return CARD_TASKS
    tasks = tuple(t.strip() for t in value.split(",") if t.strip())
    unknown = [t for t in tasks if t not in CARD_TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown or value!r}; use 'card' or some of: "
                                         f"{','.join(CARD_TASKS)}")
    return tasks


def configure(parser: argparse.ArgumentParser) -> None:
    """Add every ``dolly eval`` flag to ``parser`` and make :func:`run` its command."""
    add = parser.add_argument
    add("models", nargs="*", metavar="MODEL",
        help="Hub id, local directory or dolly-finetune run directory; none: the embedded SmolLM2-135M-Instruct.")
    add("--tasks", type=_tasks,
        help=f"Card tasks to run: 'card' (all: {','.join(CARD_TASKS)}) or a comma-separated subset. Default: card, "
        "unless --generation is given alone.")
    add("--samples", type=positive_int,
        help="Score a seeded random N documents per task (and N records with --generation) instead of full splits.")
    add("--seed", type=int, default=0, help="Seed of the --samples subsets.")
    add("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
        help="Sequences per forward pass (lm-eval and generation).")
    add("--data-dir", default=os.environ.get("DOLLY_EVAL_DIR"),
        help="Directory with the tasks' original files (default $DOLLY_EVAL_DIR); unset: lm-eval's hub datasets.")
    add("--output", default=DEFAULT_OUTPUT, help="Where results.json, card.png and generation.md are written.")
    add("--device", choices=DEVICES, help="Where the model runs (default: cuda if available, else cpu).")
    add("--engine", choices=EVAL_ENGINE_CHOICES, default=DEFAULT_ENGINE,
        help=f"What scores the lm-eval table and answers --generation (default: {DEFAULT_ENGINE}, in the "
        "checkpoint's dtype: the reference, equal to lm-eval's HFLM). ctranslate2: CTranslate2 (int8 on CPU unless "
        "--compute-type), faster, scores slightly off fp32; auto: ctranslate2 for the embedded model when "
        "installed, transformers otherwise (as dolly ask).")
    add("--compute-type", default="auto", choices=COMPUTE_TYPE_CHOICES, metavar="TYPE",
        help="ctranslate2 only: auto (default) is int8 on CPU and int8_float16 on CUDA; float32 for scores "
        "equal to the transformers engine's to rounding.")
    gen = parser.add_argument_group("instruction following")
    gen.add_argument("--generation", action="store_true",
                     help="Answer held-out dolly-15k instructions (a run's held-out records, else a seeded sample "
                     f"of --dolly-data, {DEFAULT_GENERATION_SAMPLES} unless --samples) and score them.")
    gen.add_argument("--dolly-data", default=os.environ.get("DOLLY_15K_PATH"),
                     help="databricks-dolly-15k.jsonl for models that are not dolly-finetune runs "
                     "(default $DOLLY_15K_PATH).")
    gen.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_GENERATION["max_new_tokens"],
                     help=f"Longest answer (Dolly's default: {DEFAULT_GENERATION['max_new_tokens']}).")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``dolly eval`` with parsed ``args``; an :class:`~dolly_langchain.evaluation.runner.EvalError` (a
    :class:`~dolly_langchain.errors.DollyError`) is the caller's to print."""
    configure_logging()
    evaluate(args.models, tasks=args.tasks, samples=args.samples, seed=args.seed, batch_size=args.batch_size,
             data_dir=args.data_dir, output=args.output, device=args.device, generation=args.generation,
             dolly_data=args.dolly_data, max_new_tokens=args.max_new_tokens, engine=args.engine,
             compute_type=args.compute_type)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``dolly-eval`` parser (``dolly eval`` is the same flags in the ``dolly`` tree)."""
    parser = argparse.ArgumentParser(prog="dolly-eval", **PARSER_OPTIONS)
    configure(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``dolly-eval``'s arguments with ``tasks`` and ``device`` resolved, as :func:`runner.run
    <dolly_langchain.evaluation.runner.run>` takes them."""
    args = build_parser().parse_args(argv)
    args.tasks = resolve_tasks(args.tasks, args.generation) or None
    args.device = resolve_device(args.device)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dolly-eval``; returns the exit status (0, or 2 after a one-line error)."""
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
