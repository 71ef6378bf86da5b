"""What ``dolly eval`` runs: the card's lm-eval table and/or instruction following, for some models, into a folder.

:func:`evaluate` is the one entry point, a plain function: the command line (:mod:`dolly_langchain.evaluation.cli`)
and ``dolly finetune --eval-after`` (:func:`after_training`) both call it. It writes ``OUTPUT/results.json`` (and
``card.png``, ``generation.md``), prints the tables, and returns the results.

The parts: :mod:`~dolly_langchain.evaluation.taskdata` (the tasks' original files as lm-eval's rows),
:mod:`~dolly_langchain.evaluation.harness` (lm-eval, seeded samples, the cache), :mod:`~dolly_langchain.evaluation.card`
(the card's table and chart) and :mod:`~dolly_langchain.evaluation.generation` (held-out dolly-15k, ROUGE-L).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dolly_langchain.errors import EXIT_USAGE, DollyError
from dolly_langchain.evaluation.card import CARD_TASKS
from dolly_langchain.files import write_json_atomically, write_text_atomically
from dolly_langchain.generation import (
    COMPUTE_TYPE_CHOICES,
    DEFAULT_BATCH_SIZE,
    DEFAULT_GENERATION,
    EMBEDDED_MODEL_LABEL,
    ENGINE_CHOICES,
)

__all__ = ["DEFAULT_ENGINE", "DEFAULT_GENERATION_SAMPLES", "DEFAULT_OUTPUT", "EVAL_ENGINE_CHOICES", "EvalError",
           "EvalSettings", "after_training", "evaluate", "run"]

DEFAULT_OUTPUT = "dolly-eval-results"
DEFAULT_GENERATION_SAMPLES = 200
#: The engine ``dolly eval`` scores and generates on (``--engine``): transformers in the checkpoint's dtype (fp32 for
#: the embedded model), whose lm-eval scores equal lm-eval's own ``HFLM``. ``ctranslate2``/``auto`` are faster on
#: CPU in int8, at a cost the README's Evaluate section measures.
DEFAULT_ENGINE = "transformers"
#: ``--engine``'s choices: the engines :class:`~dolly_langchain.evaluation.lm.DollyEvalLM` can score on, and auto.
EVAL_ENGINE_CHOICES = tuple(e for e in ENGINE_CHOICES if e in ("auto", "transformers", "ctranslate2"))


class EvalError(DollyError, RuntimeError):
    """Bad flags or inputs; the message names the flag or file and the fix."""


@dataclass(frozen=True)
class EvalSettings:
    """What one evaluation runs, resolved (the names are ``dolly eval``'s flags; :func:`run` also takes its
    parsed arguments)."""

    models: tuple[str | None, ...]
    """Hub ids, local directories or run directories; empty: the embedded model."""
    tasks: tuple[str, ...]
    """Card tasks to score; empty: none (generation only)."""
    samples: int | None
    seed: int
    batch_size: int
    data_dir: str | None
    output: Path
    device: str
    generation: bool
    dolly_data: str | None
    max_new_tokens: int
    engine: str
    """``--engine``: the lm-eval table and ``--generation`` run on it (``auto``: as ``dolly ask`` picks)."""
    compute_type: str = "auto"
    """``--compute-type``: CTranslate2's (``auto``: int8 on CPU, int8_float16 on CUDA)."""


def evaluate(
    models: Sequence[str | None] = (),
    *,
    tasks: Sequence[str] | None = None,
    samples: int | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    data_dir: str | Path | None = None,
    output: str | Path = DEFAULT_OUTPUT,
    device: str | None = None,
    generation: bool = False,
    dolly_data: str | Path | None = None,
    max_new_tokens: int = DEFAULT_GENERATION["max_new_tokens"],
    engine: str = DEFAULT_ENGINE,
    compute_type: str = "auto",
) -> dict[str, Any]:
    """Evaluate ``models`` (none: the embedded model) and write ``output/results.json``; return the results.

    ``tasks``: card tasks (``None``: all seven, unless ``generation`` alone); ``samples``: a seeded random N
    documents per task / records (``None``: full splits); ``data_dir``: the tasks' original files (``None``:
    lm-eval's hub datasets); ``generation``: answer held-out dolly-15k records (a run's, else ``dolly_data``);
    ``device``: ``None`` picks cuda when available; ``engine``/``compute_type``: what scores the table and
    generates (see :data:`DEFAULT_ENGINE`). Raises :class:`EvalError` for inputs the user can fix.
    """
    tasks = resolve_tasks(tasks, generation)
    unknown = [t for t in tasks if t not in CARD_TASKS]
    if unknown:
        raise EvalError(f"unknown task(s) {unknown}; use some of: {','.join(CARD_TASKS)}")
    for name, value in (("samples", samples), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if value is not None and value < 1:
            raise EvalError(f"{name} must be at least 1, got {value}")
    if engine not in EVAL_ENGINE_CHOICES:
        raise EvalError(f"--engine: unknown engine {engine!r}; use one of: {', '.join(EVAL_ENGINE_CHOICES)}")
    if compute_type not in COMPUTE_TYPE_CHOICES:
        raise EvalError(f"--compute-type: unknown compute type {compute_type!r}; use one of: "
                        f"{', '.join(COMPUTE_TYPE_CHOICES)}")
    settings = EvalSettings(
        models=tuple(models), tasks=tasks, samples=samples, seed=seed, batch_size=batch_size,
        data_dir=None if data_dir is None else str(data_dir), output=Path(output), device=resolve_device(device),
        generation=generation, dolly_data=None if dolly_data is None else str(dolly_data),
        max_new_tokens=max_new_tokens, engine=engine, compute_type=compute_type,
    )
    return run(settings)


def resolve_tasks(tasks: Sequence[str] | None, generation: bool) -> tuple[str, ...]:
    """``None`` means the card's seven tasks, or none when the generation evaluation is asked for alone."""
    if tasks is None:
        return () if generation else CARD_TASKS
    return tuple(tasks)


def resolve_device(device: str | None) -> str:
    """``None`` means cuda if available, else cpu."""
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def configure_logging() -> None:
    """One-line log records; lm-eval's step-by-step WARNING lines silenced."""
    logging.basicConfig(format="%(levelname)s [%(name)s] %(message)s", level=logging.WARNING)
    for noisy in ("lm_eval", "lm-eval"):
        logging.getLogger(noisy).setLevel(logging.ERROR)  # lm-eval logs every step at WARNING


# --- Run ----------------------------------------------------------------------------------------------------------


def run(args: EvalSettings) -> dict[str, Any]:
    """Run the card table and/or the generation evaluation; write ``results.json``; return it.

    ``args``: :class:`EvalSettings`, or ``dolly eval``'s parsed arguments with ``tasks`` and ``device`` resolved.
    """
    output = Path(args.output)
    check_output(output)
    results: dict[str, Any] = {"dolly_eval": _settings(args)}
    if args.tasks:
        results["card"] = run_card(args, output)
    if args.generation:
        results["generation"] = run_generation(args, output)
    write_json_atomically(output / "results.json", results)
    print(f"\nWrote {output / 'results.json'}")
    return results


def check_output(output: Path) -> None:
    """Refuse an ``--output`` that cannot become a directory of results before anything is loaded or scored (the
    results would otherwise be lost at the end, when they are written)."""
    from dolly_langchain.clitools import output_dir_problem

    problem = output_dir_problem(output)
    if problem:
        raise EvalError(f"--output {output}: {problem}; pass a directory to write the results into.")


def _settings(args: EvalSettings) -> dict[str, Any]:
    import importlib.metadata

    return {
        "models": list(args.models) or [None],
        "samples": args.samples,
        "seed": args.seed,
        "device": args.device,
        "data_dir": args.data_dir,
        "engine": args.engine,
        "compute_type": getattr(args, "compute_type", "auto"),
        "lm_eval_version": importlib.metadata.version("lm_eval"),
    }


def run_card(args: EvalSettings, output: Path) -> dict[str, Any]:
    """The card's table for every MODEL: print it, chart it, return its JSON."""
    from dolly_langchain.evaluation.card import Row, card_rows, format_table, plot_chart, rows_to_json
    from dolly_langchain.evaluation.harness import sample_label

    docs, errors = _load_task_docs(args.tasks, args.data_dir)
    for message in errors.values():
        print(f"dolly-eval: {message}", file=sys.stderr)
    runnable = [t for t in args.tasks if t not in errors]
    if not runnable:
        raise EvalError(f"none of the tasks {','.join(args.tasks)} has data; fix --data-dir (see the lines above)")
    rows, timings = [], {}
    for model_id in args.models or [None]:
        label, scores, seconds = _score_model(args, model_id, runnable, docs, errors)
        rows.append(Row(model=label, scores=scores, sample=sample_label(args.samples, args.seed)))
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
    from dolly_langchain.evaluation.taskdata import TaskDataError, load_docs

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


def _score_model(args, model_id, tasks, docs, errors):
    """Score one model on ``tasks`` (cached tasks first, the model loaded only if something is left to run)."""
    from tqdm.auto import tqdm

    import dolly_langchain.evaluation.harness as harness
    from dolly_langchain.models import ModelNotFoundError, resolve_model_path

    label = model_id or EMBEDDED_MODEL_LABEL
    try:
        path = resolve_model_path(model_id)
    except ModelNotFoundError as err:
        raise EvalError(str(err)) from None
    fingerprint = harness.model_fingerprint(path, extra=engine_key(model_id, args))
    # The request cache holds pickles: refuse (one line) a cache that is not the user's alone before the model loads.
    harness.private_cache_dir(fingerprint)
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


def engine_key(model_id, args) -> str:
    """What the cached results of a model depend on besides its weights: device, engine and compute type
    (``--engine auto`` and ``--compute-type auto`` resolved, so equal settings share a cache)."""
    from dolly_langchain.runtime import resolve_engine

    compute_type = getattr(args, "compute_type", "auto")
    engine = args.engine
    if engine == "auto" and compute_type not in (None, "auto"):
        engine = "ctranslate2"  # a compute type picks CTranslate2, as dolly_langchain.runtime.load_runtime does
    try:
        engine = resolve_engine(engine, model_id)
        if engine == "ctranslate2":
            from dolly_langchain.engines.ctranslate2_engine import resolve_compute_type

            compute_type = resolve_compute_type(compute_type, args.device)
        elif compute_type not in (None, "auto"):
            raise EvalError(f"--compute-type {compute_type} is a CTranslate2 option; pass --engine ctranslate2 (or "
                            "leave --compute-type at auto for the transformers engine)")
        else:
            compute_type = "checkpoint-dtype"
    except ValueError as err:  # an engine this machine cannot run (no ctranslate2, no GPU for it)
        raise EvalError(f"--engine {args.engine}: {err}") from None
    return f"{args.device}|{engine}|{compute_type}"


def _load_lm(model_id, args):
    """lm-eval's LM over this library's engine (``--engine``, ``--compute-type``, ``--device``)."""
    from dolly_langchain.evaluation.lm import load_eval_lm
    from dolly_langchain.models import ModelNotFoundError

    try:
        return load_eval_lm(model_id, engine=args.engine, compute_type=getattr(args, "compute_type", "auto"),
                            device=args.device, batch_size=args.batch_size)
    except ModelNotFoundError as err:
        raise EvalError(str(err)) from None
    except (ImportError, ValueError) as err:  # an engine option this model or machine cannot take
        raise EvalError(f"--engine {args.engine}: {err}") from None


def run_generation(args: EvalSettings, output: Path) -> dict[str, Any]:
    """Every MODEL answers the same held-out records; print the summary and side-by-side answers."""
    import dolly_langchain.evaluation.generation as gen
    from dolly_langchain.llm import DollyLLM
    from dolly_langchain.models import ModelNotFoundError

    records, sample = _generation_records(args, gen)
    results, summaries = [], []
    for model_id in args.models or [None]:
        label = model_id or EMBEDDED_MODEL_LABEL
        try:
            llm = DollyLLM.from_model_id(model_id, engine=args.engine,
                                         compute_type=getattr(args, "compute_type", "auto"), device=args.device,
                                         do_sample=False, max_new_tokens=args.max_new_tokens,
                                         batch_size=args.batch_size)
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
    write_text_atomically(output / "generation.md", f"{summary}\n\n{side}\n")
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


# --- dolly-finetune --eval-after -----------------------------------------------------------------------------------


def after_training(args, trainer, final_dir: Path) -> None:
    """Called by ``dolly-finetune`` on rank 0 when the final model is saved.

    Records the held-out split in the run directory (``heldout_split.json``, what ``--generation`` needs to find the
    records again), then, with ``--eval-after card|generation|both``, evaluates the final model with
    ``--eval-samples`` documents per task / records into ``RUN_DIR/eval`` (results.json, card.png, generation.md).
    A user error of the evaluation is logged with the command that retries it; training has succeeded either way.
    """
    from dolly_langchain.evaluation.generation import record_split

    run_dir = Path(args.local_output_dir)
    eval_dataset = trainer.eval_dataset
    n_heldout = 0 if eval_dataset is None or args.packing else len(eval_dataset)
    record_split(run_dir, args, trainer.args.max_length, n_heldout)
    if not args.eval_after:
        return
    card = args.eval_after in ("card", "both")
    generation = args.eval_after in ("generation", "both")
    samples = args.eval_samples or None
    retry = [str(final_dir), "--output", str(run_dir / "eval")]  # the same evaluation as a command, for the logs
    retry += ["--samples", str(samples)] if samples else []
    retry += ["--tasks", "card"] if card else []
    retry += ["--generation"] if generation else []
    log = logging.getLogger("finetune")  # these lines belong to the training run's log
    configure_logging()
    try:
        evaluate([str(final_dir)], tasks=CARD_TASKS if card else None, samples=samples, generation=generation,
                 output=run_dir / "eval", data_dir=os.environ.get("DOLLY_EVAL_DIR"),
                 dolly_data=os.environ.get("DOLLY_15K_PATH"))
    except DollyError as err:
        print(f"dolly-eval: error: {err}", file=sys.stderr)
        log.warning("--eval-after: dolly-eval %s failed (exit %d)", " ".join(retry), EXIT_USAGE)
    except Exception:
        log.error("--eval-after: dolly-eval failed; the model is saved, retry with: dolly-eval %s", " ".join(retry))
        raise
