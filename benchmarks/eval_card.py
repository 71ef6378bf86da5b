"""The model card's six shared tasks on the embedded SmolLM2-135M-Instruct: scores, standard errors, wall time (JSON).

    python benchmarks/eval_card.py                          # --samples 500 --data-dir $DOLLY_EVAL_DIR
    python benchmarks/eval_card.py --samples 20             # a quick estimate
    python benchmarks/eval_card.py MODEL --samples 500 --device cuda --batch-size 64

Runs ``dolly-eval``'s own code (lm-evaluation-harness, official task definitions, the card's metrics) on openbookqa,
arc_easy, winogrande, arc_challenge, piqa and boolq: the tasks whose original files this repository's CI keeps in
``$DOLLY_EVAL_DIR`` (hellaswag is not among them; ``dolly_langchain/evaluation/taskdata.py`` lists where each comes
from). Reports per task the score, its standard error, the documents scored and the seconds it took, and estimates
the wall time of the full splits by scaling each task's time by (full split / sample). Results are cached like
``dolly-eval``'s, so an interrupted run continues where it stopped; a task found in the cache is reported with
``"cached": true`` and no timing (``--fresh-cache DIR`` points the cache at an empty directory to time everything).

For comparison, SmolLM2-135M-Instruct's model card (lighteval, a different prompt protocol: chat template, other
normalisation) publishes HellaSwag 40.9, ARC (mean of easy and challenge) 37.3 and PIQA 66.3.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Cheapest first (tokens per document), so an interrupted run has finished the most tasks.
SHARED_TASKS = ("winogrande", "openbookqa", "piqa", "arc_easy", "arc_challenge", "boolq")
PUBLISHED_SMOLLM2_135M_INSTRUCT = {"hellaswag": 0.409, "arc_mean": 0.373, "piqa": 0.663}


def main(argv: list[str] | None = None) -> dict:
    # Libraries print warnings on stdout (DeepSpeed's accelerator probe); keep stdout for the JSON alone.
    with contextlib.redirect_stdout(sys.stderr):
        report = measure(argv)
    print(json.dumps(report, indent=2), flush=True)
    return report


def measure(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="Hub id or directory; default: the embedded model.")
    parser.add_argument("--samples", type=int, default=500, help="Seeded documents per task.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-dir", default=os.environ.get("DOLLY_EVAL_DIR"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--tasks", default=",".join(SHARED_TASKS))
    parser.add_argument("--fresh-cache", help="Use this (empty) directory as the cache, so every task is timed.")
    args = parser.parse_args(argv)
    if not args.data_dir:
        parser.error("--data-dir (or $DOLLY_EVAL_DIR) is needed: the directory of the tasks' original files")
    if args.fresh_cache:
        os.environ["DOLLY_LANGCHAIN_CACHE"] = args.fresh_cache

    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from dolly_langchain.generation import EMBEDDED_MODEL_LABEL
    from dolly_langchain.models import load_model_and_tokenizer, resolve_model_path
    from dolly_langchain.evaluation import harness
    from dolly_langchain.evaluation.card import CARD_METRICS, FULL_SPLIT_SIZES
    from dolly_langchain.evaluation.taskdata import load_docs

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    start = time.perf_counter()
    path = resolve_model_path(args.model)
    if args.model is None:
        from dolly_langchain.models import embedded_model_path

        path = str(embedded_model_path())
    fingerprint = harness.model_fingerprint(path, extra=args.device)
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.to(args.device)
    lm = harness.make_lm(model, tokenizer, args.batch_size)
    load_seconds = time.perf_counter() - start
    report = {"model": args.model or EMBEDDED_MODEL_LABEL, "samples": args.samples, "seed": args.seed,
              "batch_size": args.batch_size, "device": args.device, "cpu_count": os.cpu_count(),
              "machine": platform.processor() or platform.machine(), "load_seconds": round(load_seconds, 1),
              "tasks": {}}
    full_estimate = 0.0
    for task in tasks:
        docs = load_docs(task, args.data_dir)
        cached = harness.cached_score(fingerprint, task, args.samples, args.seed, docs) is not None
        t0 = time.perf_counter()
        score = harness.evaluate_task(lm, task, docs, fingerprint=fingerprint, samples=args.samples, seed=args.seed)
        seconds = time.perf_counter() - t0
        entry = {"metric": CARD_METRICS[task], "value": round(score.value, 4),
                 "stderr": None if score.stderr is None else round(score.stderr, 4), "n": score.n,
                 "n_total": score.n_total, "cached": cached}
        if not cached:
            entry["seconds"] = round(seconds, 1)
            entry["full_split_seconds_estimate"] = round(seconds * FULL_SPLIT_SIZES[task] / score.n, 0)
            full_estimate += entry["full_split_seconds_estimate"]
        report["tasks"][task] = entry
        print(json.dumps({task: entry}), file=sys.stderr, flush=True)
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    report["full_splits_seconds_estimate"] = round(full_estimate) if full_estimate else None
    values = report["tasks"]
    if "arc_easy" in values and "arc_challenge" in values:
        report["arc_mean"] = round((values["arc_easy"]["value"] + values["arc_challenge"]["value"]) / 2, 4)
    report["published_smollm2_135m_instruct_lighteval"] = PUBLISHED_SMOLLM2_135M_INSTRUCT
    return report


if __name__ == "__main__":
    main()
