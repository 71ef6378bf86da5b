"""dolly-eval: the Dolly model card's lm-eval table and instruction following on held-out dolly-15k, in one command.

Launch commands (``dolly-eval ARGS`` and ``python -m finetune.evaluate ARGS`` are the same program)::

    # the embedded SmolLM2-135M-Instruct on the card's seven tasks, a seeded 500 documents per task
    dolly-eval --samples 500 --data-dir ../shared/eval

    # base vs fine-tuned, full splits (hours on a CPU, minutes on a GPU)
    dolly-eval EleutherAI/pythia-2.8b runs/dolly-v2-3b --device cuda --batch-size 64

    # instruction following: the records runs/my-dolly held out, answered by it and by its base model
    dolly-eval runs/my-dolly HuggingFaceTB/SmolLM2-135M-Instruct --generation --samples 200

MODEL is a hub id, a local directory, a ``dolly-finetune`` run directory, or nothing for the embedded model.

The card table (``--tasks``, default all seven when ``--generation`` is not given) runs EleutherAI's
lm-evaluation-harness with its official task definitions; only the data source changes (``--data-dir``, default
``$DOLLY_EVAL_DIR``: the authors' original files, see ``finetune/evaluation/taskdata.py``; without it, the hub
datasets lm-eval normally downloads). It prints the card's row format with standard errors and the card's published
rows, and writes ``OUTPUT/results.json`` and ``OUTPUT/card.png``. Metrics are the card's: acc_norm for openbookqa,
arc_easy, arc_challenge, hellaswag and piqa, acc for winogrande and boolq (``finetune/evaluation/card.py`` says how
that was checked). ``--samples N`` scores a seeded random N documents per task, and every printed number says so.
Results are cached per (model fingerprint, task, sample) under ``~/.cache/dolly_langchain/eval``
(``$DOLLY_LANGCHAIN_CACHE`` moves it), each request as it completes, so an interrupted run resumes.

``--generation`` answers held-out dolly-15k instructions greedily through ``DollyLLM`` (see
``finetune/evaluation/generation.py``): ROUGE-L, the share of answers that ended by themselves, mean length, per
category, and a few answers side by side, in ``results.json`` and ``OUTPUT/generation.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from dolly_langchain.clitools import positive_int
from finetune.evaluation.card import CARD_TASKS

DEFAULT_OUTPUT = "dolly-eval-results"
DEFAULT_GENERATION_SAMPLES = 200


class EvalError(RuntimeError):
    """Bad flags or inputs; the message names the flag or file and the fix."""


# --- Command line -------------------------------------------------------------------------------------------------


def _tasks(value: str) -> tuple[str, ...]:
    if value == "card":
        return CARD_TASKS
    tasks = tuple(t.strip() for t in value.split(",") if t.strip())
    unknown = [t for t in tasks if t not in CARD_TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown or value!r}; use 'card' or some of: "
                                         f"{','.join(CARD_TASKS)}")
    return tasks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dolly-eval",
        description="Evaluate models on the Dolly model card's lm-eval table and on held-out dolly-15k instructions.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("models", nargs="*", metavar="MODEL",
        help="Hub id, local directory or dolly-finetune run directory; none: the embedded SmolLM2-135M-Instruct.")
    add("--tasks", type=_tasks,
        help=f"Card tasks to run: 'card' (all: {','.join(CARD_TASKS)}) or a comma-separated subset. Default: card, "
        "unless --generation is given alone.")
    add("--samples", type=positive_int,
        help="Score a seeded random N documents per task (and N records with --generation) instead of full splits.")
    add("--seed", type=int, default=0, help="Seed of the --samples subsets.")
    add("--batch-size", type=positive_int, default=16, help="Sequences per forward pass (lm-eval and generation).")
    add("--data-dir", default=os.environ.get("DOLLY_EVAL_DIR"),
        help="Directory with the tasks' original files (default $DOLLY_EVAL_DIR); unset: lm-eval's hub datasets.")
    add("--output", default=DEFAULT_OUTPUT, help="Where results.json, card.png and generation.md are written.")
    add("--device", choices=("cpu", "cuda"), help="Where the model runs (default: cuda if available, else cpu).")
    gen = parser.add_argument_group("instruction following")
    gen.add_argument("--generation", action="store_true",
                     help="Answer held-out dolly-15k instructions (a run's held-out records, else a seeded sample "
                     f"of --dolly-data, {DEFAULT_GENERATION_SAMPLES} unless --samples) and score them.")
    gen.add_argument("--dolly-data", default=os.environ.get("DOLLY_15K_PATH"),
                     help="databricks-dolly-15k.jsonl for models that are not dolly-finetune runs "
                     "(default $DOLLY_15K_PATH).")
    gen.add_argument("--max-new-tokens", type=positive_int, default=256, help="Longest answer (Dolly's default: 256).")
    gen.add_argument("--engine", choices=("transformers", "ctranslate2"), default="transformers",
                     help="Generation engine; transformers (fp32 on CPU) is the reference.")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.tasks is None and not args.generation:
        args.tasks = CARD_TASKS
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dolly-eval``; returns the exit status (0, or 2 after a one-line error)."""
    logging.basicConfig(format="%(levelname)s [%(name)s] %(message)s", level=logging.WARNING)
    for noisy in ("lm_eval", "lm-eval"):
        logging.getLogger(noisy).setLevel(logging.ERROR)  # lm-eval logs every step at WARNING
    args = parse_args(argv)
    try:
        run(args)
    except EvalError as err:
        print(f"dolly-eval: error: {err}", file=sys.stderr)
        return 2
    return 0


# --- Run ----------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the card table and/or the generation evaluation; write ``results.json``; return it."""
    from finetune.evaluation.card import write_json_atomically

    output = Path(args.output)
    results: dict[str, Any] = {"dolly_eval": _settings(args)}
    if args.tasks:
        results["card"] = run_card(args, output)
    if args.generation:
        results["generation"] = run_generation(args, output)
    write_json_atomically(output / "results.json", results)
    print(f"\nWrote {output / 'results.json'}")
    return results


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.metadata

    return {
        "models": args.models or [None],
        "samples": args.samples,
        "seed": args.seed,
        "device": args.device,
        "data_dir": args.data_dir,
        "lm_eval_version": importlib.metadata.version("lm_eval"),
    }


def run_card(args: argparse.Namespace, output: Path) -> dict[str, Any]:
    """The card's table for every MODEL: print it, chart it, return its JSON."""
    from tqdm.auto import tqdm

    from finetune.evaluation import harness
    from finetune.evaluation.card import Row, card_rows, format_table, plot_chart, rows_to_json

    docs, errors = _load_task_docs(args.tasks, args.data_dir)
    for message in errors.values():
        print(f"dolly-eval: {message}", file=sys.stderr)
    runnable = [t for t in args.tasks if t not in errors]
    if not runnable:
        raise EvalError(f"none of the tasks {','.join(args.tasks)} has data; fix --data-dir (see the lines above)")
    rows, timings = [], {}
    for model_id in args.models or [None]:
        label, scores, seconds = _score_model(args, model_id, runnable, docs, errors, harness, tqdm)
        rows.append(Row(model=label, scores=scores, sample=harness.sample_label(args.samples, args.seed)))
        timings[label] = seconds
    scored = [t for t in runnable if any(t in row.scores for row in rows)]
    if not scored:
        raise EvalError("no task could be scored (see the lines above)")
    rows += card_rows()
    table = format_table(rows, scored)
    print("\n" + table)
    chart = plot_chart(rows, output / "card.png", scored)
    print(f"\nChart: {chart}")
    return {"tasks": scored, "errors": errors, "rows": rows_to_json(rows), "table": table, "chart": chart.name,
            "seconds": timings}


def _load_task_docs(tasks, data_dir) -> tuple[dict[str, list | None], dict[str, str]]:
    """Each task's documents from ``data_dir`` (``None``: lm-eval loads the hub dataset), and per-task errors."""
    from finetune.evaluation.taskdata import TaskDataError, load_docs

    docs, errors = {}, {}
    for task in tasks:
        if data_dir is None:
            docs[task] = None
            continue
        try:
            docs[task] = load_docs(task, data_dir)
        except TaskDataError as err:
            errors[task] = str(err)
    return docs, errors


def _score_model(args, model_id, tasks, docs, errors, harness, tqdm):
    """Score one model on ``tasks`` (cached tasks first, the model loaded only if something is left to run)."""
    from dolly_langchain.models import EMBEDDED_MODEL_NAME, ModelNotFoundError, resolve_model_path

    label = model_id or f"{EMBEDDED_MODEL_NAME} (embedded)"
    try:
        path = resolve_model_path(model_id)
    except ModelNotFoundError as err:
        raise EvalError(str(err)) from None
    fingerprint = harness.model_fingerprint(path, extra=args.device)
    scores: dict[str, Any] = {}
    lm = None
    start = time.perf_counter()
    for task in tqdm(tasks, desc=f"{label}: tasks", unit="task"):
        score = harness.cached_score(fingerprint, task, args.samples, args.seed, docs[task])
        if score is None:
            if lm is None:
                lm = _load_lm(model_id, args)
            try:
                score = harness.evaluate_task(lm, task, docs[task], fingerprint=fingerprint, samples=args.samples,
                                              seed=args.seed)
            except Exception as err:  # noqa: BLE001 - e.g. the hub dataset is unreachable; other tasks still run
                errors[task] = f"{task}: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}"
                if docs[task] is None:
                    errors[task] += " (lm-eval could not load its hub dataset; pass --data-dir with the original files)"
                print(f"dolly-eval: {errors[task]}", file=sys.stderr)
                continue
        scores[task] = score
    return label, scores, time.perf_counter() - start


def _load_lm(model_id, args):
    from dolly_langchain.models import ModelNotFoundError, load_model_and_tokenizer
    from finetune.evaluation import harness

    try:
        model, tokenizer = load_model_and_tokenizer(model_id)
    except ModelNotFoundError as err:
        raise EvalError(str(err)) from None
    model.to(args.device)
    return harness.make_lm(model, tokenizer, args.batch_size)


def run_generation(args: argparse.Namespace, output: Path) -> dict[str, Any]:
    """Every MODEL answers the same held-out records; print the summary and side-by-side answers."""
    from dolly_langchain.lc_common import EMBEDDED_MODEL_LABEL
    from dolly_langchain.llm import DollyLLM
    from dolly_langchain.models import ModelNotFoundError
    from finetune.evaluation import generation as gen

    records, sample = _generation_records(args, gen)
    results, summaries = [], []
    for model_id in args.models or [None]:
        label = model_id or EMBEDDED_MODEL_LABEL
        try:
            llm = DollyLLM.from_model_id(model_id, engine=args.engine, device=args.device, do_sample=False,
                                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        except (ModelNotFoundError, OSError, ValueError) as err:
            raise EvalError(f"{label}: {err}") from None
        raw = gen.generate_answers(llm, records, args.max_new_tokens, args.batch_size, desc=f"{label}: answers")
        result = gen.score_model(label, records, raw)
        results.append(result)
        summaries.append(gen.summarize(result, records))
        del llm
    summary = gen.format_summary(summaries, sample)
    side = gen.format_side_by_side(records, results)
    print("\n" + summary + "\n\n" + side)
    output.mkdir(parents=True, exist_ok=True)
    _write_text(output / "generation.md", f"{summary}\n\n{side}\n")
    return {
        "sample": sample,
        "max_new_tokens": args.max_new_tokens,
        "engine": args.engine,
        "summaries": summaries,
        "answers": [
            {"instruction": r["instruction"], "context": r["context"], "response": r["response"],
             "category": r["category"],
             "answers": {res.model: None if res.answers[k] is None else res.answers[k].__dict__ for res in results}}
            for k, r in enumerate(records)
        ],
    }


def _generation_records(args, gen) -> tuple[list[dict], str]:
    """The held-out records of the first run directory among MODELs, else a seeded sample of --dolly-data."""
    import random

    run_dir = next((d for d in map(gen.find_run_dir, args.models) if d is not None), None)
    try:
        if run_dir is not None:
            records = gen.heldout_records(run_dir)
            sample = f"the {len(records)} records {run_dir} held out"
            if args.samples and args.samples < len(records):
                records = random.Random(args.seed).sample(records, args.samples)
                sample = f"a seeded sample of {args.samples} of {sample} (seed {args.seed})"
            return records, sample
        if not args.dolly_data:
            raise EvalError("--generation needs --dolly-data (or $DOLLY_15K_PATH) with databricks-dolly-15k.jsonl, "
                            "or a dolly-finetune run directory as MODEL")
        n = args.samples or DEFAULT_GENERATION_SAMPLES
        records = gen.sample_records(args.dolly_data, n, args.seed)
        return records, f"a seeded sample of {len(records)} records of {args.dolly_data} (seed {args.seed})"
    except gen.GenerationEvalError as err:
        raise EvalError(str(err)) from None


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --- dolly-finetune --eval-after -----------------------------------------------------------------------------------


def after_training(args: argparse.Namespace, trainer, final_dir: Path) -> None:
    """Called by ``dolly-finetune`` on rank 0 when the final model is saved.

    Records the held-out split in the run directory (``heldout_split.json``, what ``--generation`` needs to find the
    records again), then, with ``--eval-after card|generation|both``, evaluates the final model with
    ``--eval-samples`` documents per task / records into ``RUN_DIR/eval`` (results.json, card.png, generation.md).
    """
    from finetune.evaluation.generation import record_split

    run_dir = Path(args.local_output_dir)
    eval_dataset = trainer.eval_dataset
    n_heldout = 0 if eval_dataset is None or getattr(args, "packing", False) else len(eval_dataset)
    record_split(run_dir, args, trainer.args.max_length, n_heldout)
    if not getattr(args, "eval_after", None):
        return
    argv = [str(final_dir), "--output", str(run_dir / "eval")]
    if args.eval_samples:
        argv += ["--samples", str(args.eval_samples)]
    if args.eval_after in ("card", "both"):
        argv += ["--tasks", "card"]
    if args.eval_after in ("generation", "both"):
        argv += ["--generation"]
    try:
        status = main(argv)
    except Exception:
        logging.getLogger("finetune").error("--eval-after: dolly-eval failed; the model is saved, retry with: "
                                            "dolly-eval %s", " ".join(argv))
        raise
    if status:
        logging.getLogger("finetune").warning("--eval-after: dolly-eval %s failed (exit %d)", " ".join(argv), status)


if __name__ == "__main__":
    raise SystemExit(main())
