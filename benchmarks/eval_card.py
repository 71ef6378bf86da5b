"""The model card's six shared tasks on the embedded SmolLM2-135M-Instruct: scores, standard errors, wall time (JSON).

    python benchmarks/eval_card.py                          # --samples 500 --data-dir $DOLLY_EVAL_DIR
    python benchmarks/eval_card.py --samples 20             # a quick estimate
    python benchmarks/eval_card.py MODEL --samples 500 --device cuda --batch-size 64
    python benchmarks/eval_card.py --full                   # full splits (the README's table and chart)
    python benchmarks/eval_card.py --engine ctranslate2     # int8 CTranslate2 instead of fp32 transformers
    python benchmarks/eval_card.py --compare-hflm --samples 500   # lm-eval's HFLM fp32 vs --engine, same docs

Runs ``dolly-eval``'s own code (lm-evaluation-harness, official task definitions, the card's metrics, scored through
``--engine`` by :class:`dolly_langchain.evaluation.lm.DollyEvalLM`) on openbookqa,
arc_easy, winogrande, arc_challenge, piqa and boolq: the tasks whose original files this repository's CI keeps in
``$DOLLY_EVAL_DIR`` (hellaswag is not among them; ``dolly_langchain/evaluation/taskdata.py`` lists where each comes
from). Reports per task the score, its standard error, the documents scored and the seconds it took, and estimates
the wall time of the full splits by scaling each task's time by (full split / sample). Results are cached like
``dolly-eval``'s, so an interrupted run continues where it stopped; a task found in the cache is reported with
``"cached": true`` and no timing (``--fresh-cache DIR`` points the cache at an empty directory to time everything).
Each timed task also reports the tokens the model ran over (contexts once, choices once) and tokens/s.

``--full`` scores the full splits (no sampling) and writes the card table and chart (``--output``, default
``eval-card-full``) as ``dolly eval`` does. ``--compare-hflm`` scores each task's seeded sample twice, with lm-eval's
own ``HFLM`` on the fp32 transformers model and with ``--engine``, without any cache, and reports both scores, their
standard errors, whether they lie within one standard error of each other, identical per-document choices, and the
seconds each took.

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
    parser.add_argument("--engine", default="transformers", choices=("auto", "transformers", "ctranslate2"),
                        help="What scores the tasks (dolly eval --engine); default transformers (fp32 on CPU).")
    parser.add_argument("--compute-type", default="auto", help="ctranslate2 only (dolly eval --compute-type).")
    parser.add_argument("--full", action="store_true", help="Full splits: no sampling; writes the table and chart.")
    parser.add_argument("--output", default="eval-card-full", help="Where --full writes results.json and card.png.")
    parser.add_argument("--compare-hflm", action="store_true",
                        help="Score each task's sample with lm-eval's HFLM (fp32) and with --engine; report both.")
    args = parser.parse_args(argv)
    if not args.data_dir:
        parser.error("--data-dir (or $DOLLY_EVAL_DIR) is needed: the directory of the tasks' original files")
    if args.samples < 1:
        parser.error(f"--samples must be at least 1, got {args.samples}")
    if args.full and args.compare_hflm:
        parser.error("--full and --compare-hflm: compare on a sample (--samples), not the full splits")
    if args.full:
        args.samples = None
    if args.fresh_cache:
        os.environ["DOLLY_LANGCHAIN_CACHE"] = args.fresh_cache

    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from dolly_langchain.generation import EMBEDDED_MODEL_LABEL
    from dolly_langchain.models import resolve_model_path
    from dolly_langchain.evaluation import harness
    from dolly_langchain.evaluation.card import CARD_METRICS, FULL_SPLIT_SIZES
    from dolly_langchain.evaluation.lm import load_eval_lm
    from dolly_langchain.evaluation.runner import engine_key
    from dolly_langchain.evaluation.taskdata import load_docs

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.compare_hflm:
        return compare_hflm(args, tasks)
    start = time.perf_counter()
    path = resolve_model_path(args.model)
    if args.model is None:
        from dolly_langchain.models import embedded_model_path

        path = str(embedded_model_path())
    fingerprint = harness.model_fingerprint(path, extra=engine_key(args.model, args))
    lm = load_eval_lm(args.model, engine=args.engine, compute_type=args.compute_type, device=args.device,
                      batch_size=args.batch_size)
    load_seconds = time.perf_counter() - start
    report = {"model": args.model or EMBEDDED_MODEL_LABEL, "samples": args.samples, "seed": args.seed,
              "batch_size": args.batch_size, "device": args.device, "engine": lm.describe(),
              "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "load_seconds": round(load_seconds, 1), "tasks": {}}
    scores = {}
    full_estimate = 0.0
    for task in tasks:
        docs = load_docs(task, args.data_dir)
        cached = harness.cached_score(fingerprint, task, args.samples, args.seed, docs) is not None
        t0, tokens0, scoring0 = time.perf_counter(), lm.scored_tokens, lm.scoring_seconds
        score = harness.evaluate_task(lm, task, docs, fingerprint=fingerprint, samples=args.samples, seed=args.seed)
        seconds = time.perf_counter() - t0
        scores[task] = score
        entry = {"metric": CARD_METRICS[task], "value": round(score.value, 4),
                 "stderr": None if score.stderr is None else round(score.stderr, 4), "n": score.n,
                 "n_total": score.n_total, "cached": cached}
        if not cached:
            entry["seconds"] = round(seconds, 1)
            scoring = lm.scoring_seconds - scoring0
            entry["scoring_seconds"] = round(scoring, 1)  # in the model; the rest is lm-eval's fixed per-task work
            entry["scored_tokens"] = lm.scored_tokens - tokens0
            entry["tokens_per_second"] = round(entry["scored_tokens"] / scoring) if scoring else None
            # lm-eval's per-task work once, the model's time scaled by documents
            entry["full_split_seconds_estimate"] = round(seconds - scoring + scoring * FULL_SPLIT_SIZES[task]
                                                         / score.n, 0)
            full_estimate += entry["full_split_seconds_estimate"]
        report["tasks"][task] = entry
        print(json.dumps({task: entry}), file=sys.stderr, flush=True)
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    report["full_splits_seconds_estimate"] = round(full_estimate) if full_estimate else None
    values = report["tasks"]
    if "arc_easy" in values and "arc_challenge" in values:
        report["arc_mean"] = round((values["arc_easy"]["value"] + values["arc_challenge"]["value"]) / 2, 4)
    report["published_smollm2_135m_instruct_lighteval"] = PUBLISHED_SMOLLM2_135M_INSTRUCT
    if args.full:
        report["table"], report["chart"] = write_card(report["model"], scores, tasks, Path(args.output))
    return report


def write_card(label: str, scores: dict, tasks: list[str], output: Path) -> tuple[str, str]:
    """The card's table (this model's full-split row and the published rows) and chart, as ``dolly eval`` writes."""
    from dolly_langchain.evaluation.card import Row, card_rows, format_table, plot_chart

    output.mkdir(parents=True, exist_ok=True)
    rows = [Row(model=label, scores=scores, sample=None), *card_rows()]
    chart = plot_chart(rows, output / "card.png", tasks)
    return format_table(rows, tasks), str(chart)


def compare_hflm(args, tasks: list[str]) -> dict:
    """Each task's seeded sample scored by lm-eval's HFLM (fp32 transformers) and by DollyEvalLM on --engine."""
    import tempfile

    import torch
    from lm_eval import simple_evaluate

    from dolly_langchain.evaluation import harness
    from dolly_langchain.evaluation.card import CARD_METRICS
    from dolly_langchain.evaluation.lm import load_eval_lm
    from dolly_langchain.evaluation.taskdata import load_docs
    from dolly_langchain.generation import EMBEDDED_MODEL_LABEL
    from dolly_langchain.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    model.to(args.device)
    reference = harness.make_lm(model, tokenizer, args.batch_size)
    ours = load_eval_lm(args.model, engine=args.engine, compute_type=args.compute_type, device=args.device,
                        batch_size=args.batch_size)
    report = {"model": args.model or EMBEDDED_MODEL_LABEL, "samples": args.samples, "seed": args.seed,
              "batch_size": args.batch_size, "device": args.device, "reference": "lm-eval HFLM, transformers fp32",
              "engine": ours.describe(), "cpu_count": os.cpu_count(), "tasks": {}}
    for task in tasks:
        docs = load_docs(task, args.data_dir)
        metric = CARD_METRICS[task]
        entry = {"metric": metric}
        choices = {}
        for name, lm in (("hflm", reference), ("ours", ours)):
            built = harness.build_task(task, docs)
            indices = harness.sample_indices(len(built.eval_docs), args.samples, args.seed)
            t0 = time.perf_counter()
            out = simple_evaluate(model=lm, tasks=[built], samples=None if indices is None else {task: indices},
                                  task_manager=harness.task_manager(), log_samples=True, num_fewshot=0,
                                  use_cache=None)
            seconds = time.perf_counter() - t0
            result = out["results"][task]
            entry[name] = {"value": round(float(result[f"{metric},none"]), 4),
                           "stderr": round(float(result[f"{metric}_stderr,none"]), 4), "seconds": round(seconds, 1)}
            choices[name] = [s[metric] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]
        diff = entry["ours"]["value"] - entry["hflm"]["value"]
        entry["diff"] = round(diff, 4)
        entry["within_one_stderr"] = abs(diff) <= entry["hflm"]["stderr"]
        entry["documents"] = len(choices["hflm"])
        entry["documents_scored_differently"] = sum(a != b for a, b in zip(choices["hflm"], choices["ours"]))
        entry["speedup"] = round(entry["hflm"]["seconds"] / entry["ours"]["seconds"], 2)
        report["tasks"][task] = entry
        print(json.dumps({task: entry}), file=sys.stderr, flush=True)
    return report


if __name__ == "__main__":
    main()
