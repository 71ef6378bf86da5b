"""Generation throughput across engines, batching of concurrent calls, and the quality cost of int8.

    python benchmarks/generation.py                 # embedded SmolLM2-135M-Instruct, dolly-15k prompts, greedy
    python benchmarks/generation.py --max-new-tokens 64 --batch-size 16 --single-prompts 8 --quality-prompts 50

Prints one JSON object. Every run uses the same model, the same prompts (dolly-15k instructions rendered with
Dolly's templates, as a chain passes them to the LLM; the same token ids on every engine), greedy decoding and
the same ``max_new_tokens``, in one process. Generated tokens are counted per response up to and including
the stop token, so idle rows of a batch do not count.

- ``engines``: ``DollyLLM`` on transformers (fp32, today's reference), CTranslate2 int8 and CTranslate2 float32:
  ``batch1`` is ``invoke`` on each of ``--single-prompts`` prompts in turn, ``batch16`` one ``batch`` call of
  ``--batch-size`` prompts;
- ``concurrency``: on the default engine, ``--batch-size`` concurrent ``ainvoke`` calls (``asyncio.gather``)
  against one ``batch`` call of the same prompts, and how many concurrent answers equal each prompt alone;
- ``llamacpp``: when ``xllamacpp`` is installed, llama.cpp on the shipped Q4_1 GGUF, one prompt at a time
  (``benchmarks/llamacpp_reference.py``) on the ``batch16`` prompts, as the outside reference: run with all
  cores and with one thread, the faster of the two (``llamacpp_runs`` holds both);
- ``int8_quality``: ROUGE-L F1 (``rouge-score``) of CTranslate2 int8 answers against fp32 answers on
  ``--quality-prompts`` instructions, and how many are identical;
- ``engine_comparison`` (``--engines-only`` runs just this): every engine, each in its own process, one answer at
  a time and one batch of 16 against llama.cpp itself on the shipped GGUF, and each llama.cpp quantization's
  ROUGE-L against fp32 answers (``benchmarks/engine_comparison.py``);
- ``cold_start``: ``dolly ask`` in fresh processes with warm caches (median of ``--cold-start-runs``), import
  times and what each import loads (``benchmarks/cold_start.py``), measured first, before this process loads any
  model. ``--cold-start-only`` runs just this (no dolly-15k needed, about a minute).

Targets on a 2-core CPU: ctranslate2 batch 1 >= 3x transformers batch 1; the default engine one at a time >= llama.cpp
one at a time, and its batch 16 >= 2x llama.cpp one at a time (``engine_comparison``); concurrent ainvoke >= 0.8x
one batch call, in generated tokens/s; ``dolly ask`` <= 1.5 s wall.
Instructions come from databricks-dolly-15k (``--data``, default ``$DOLLY_15K_PATH``); none are stored here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=os.environ.get("DOLLY_15K_PATH"),
                        help="databricks-dolly-15k.jsonl (default: $DOLLY_15K_PATH)")
    parser.add_argument("--model", default=None, help="hub id or directory (default: the embedded SmolLM2)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--single-prompts", type=int, default=8, help="prompts run one at a time per engine")
    parser.add_argument("--quality-prompts", type=int, default=50, help="prompts for int8 vs fp32 ROUGE-L (0: skip)")
    parser.add_argument("--max-context-chars", type=int, default=1000,
                        help="skip records whose context is longer, so prompts stay chat-sized")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cold-start-runs", type=int, default=5, help="fresh `dolly ask` processes timed (0: skip)")
    parser.add_argument("--cold-start-only", action="store_true", help="measure only the cold start")
    parser.add_argument("--engines-only", action="store_true",
                        help="only the engine comparison against llama.cpp (benchmarks/engine_comparison.py)")
    parser.add_argument("--comparison-rounds", type=int, default=2, help="interleaved rounds of the engine comparison")
    args = parser.parse_args(argv)
    if args.cold_start_only:
        return args
    if args.data is None or not Path(args.data).is_file():
        parser.error("--data: databricks-dolly-15k.jsonl not found; pass --data PATH or set DOLLY_15K_PATH")
    return args


def load_prompts(path: Path, count: int, max_context_chars: int, seed: int) -> list[str]:
    """Sample instructions and render them with Dolly's templates (what a chain would pass to the LLM)."""
    from dolly_langchain.prompts import INSTRUCTION_PROMPT, INSTRUCTION_WITH_CONTEXT_PROMPT

    with open(path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    records = [r for r in records if len(r["context"]) <= max_context_chars]
    random.Random(seed).shuffle(records)
    prompts = []
    for record in records[:count]:
        if record["context"]:
            prompts.append(INSTRUCTION_WITH_CONTEXT_PROMPT.format(**record))
        else:
            prompts.append(INSTRUCTION_PROMPT.format(instruction=record["instruction"]))
    return prompts


class TokenCounter:
    """Wraps an engine's ``generate`` to count generated tokens per row, the stop token included."""

    def __init__(self, engine, max_new_tokens: int):
        self.engine, self.max_new_tokens = engine, max_new_tokens
        self.tokens = self.batches = 0
        self.original = engine.generate

    def __enter__(self):
        def counting(prompts, *args, **kwargs):
            outputs = self.original(prompts, *args, **kwargs)
            # A row shorter than max_new_tokens ended at a stop token, which it generated too.
            self.tokens += sum(len(o.token_ids) + (len(o.token_ids) < self.max_new_tokens) for o in outputs)
            self.batches += 1
            return outputs

        self.engine.generate = counting
        self.tokens = self.batches = 0
        return self

    def __exit__(self, *exc):
        self.engine.generate = self.original


def timed(llm, max_new_tokens: int, run) -> tuple[dict, list[str]]:
    with TokenCounter(llm.generation_engine, max_new_tokens) as counter:
        start = time.perf_counter()
        outputs = run()
        seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "generated_tokens": counter.tokens, "engine_batches": counter.batches,
            "tokens_per_s": round(counter.tokens / seconds, 2)}, outputs


def bench_engine(llm, single: list[str], batch: list[str], max_new_tokens: int) -> dict:
    llm.invoke(single[0], max_new_tokens=4)  # warm-up: first-call allocations
    batch1, _ = timed(llm, max_new_tokens, lambda: [llm.invoke(p) for p in single])
    batch16, _ = timed(llm, max_new_tokens, lambda: llm.batch(batch))
    return {**llm.generation_engine.describe(), "batch1": batch1, "batch16": batch16}


def bench_concurrency(llm, prompts: list[str], max_new_tokens: int) -> dict:
    async def gather():
        return await asyncio.gather(*(llm.ainvoke(p) for p in prompts))

    batch, batch_out = timed(llm, max_new_tokens, lambda: llm.batch(prompts))
    concurrent, concurrent_out = timed(llm, max_new_tokens, lambda: asyncio.run(gather()))
    alone = [llm.invoke(p) for p in prompts]
    return {
        **llm.generation_engine.describe(),
        "one_batch_call": batch,
        "concurrent_ainvoke": concurrent,
        "concurrent_over_batch": round(concurrent["tokens_per_s"] / batch["tokens_per_s"], 2),
        "concurrent_equal_batch": sum(a == b for a, b in zip(concurrent_out, batch_out)),
        "concurrent_equal_alone": sum(a == b for a, b in zip(concurrent_out, alone)),
        "calls": len(prompts),
    }


def int8_quality(fp32_llm, int8_llm, prompts: list[str]) -> dict:
    from rouge_score import rouge_scorer

    reference = fp32_llm.batch(prompts)
    candidate = int8_llm.batch(prompts)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(ref, cand)["rougeL"].fmeasure for ref, cand in zip(reference, candidate)]
    return {
        "prompts": len(prompts),
        "reference": fp32_llm.generation_engine.describe(),
        "rougeL_f1_mean": round(sum(scores) / len(scores), 4),
        "rougeL_f1_median": round(sorted(scores)[len(scores) // 2], 4),
        "identical_answers": sum(a == b for a, b in zip(reference, candidate)),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    import cold_start

    if args.cold_start_only:
        print(json.dumps({"cold_start": cold_start.run(runs=args.cold_start_runs or 5)}, indent=2, ensure_ascii=False))
        return 0
    import engine_comparison

    if args.engines_only:
        print(json.dumps({"engine_comparison": engine_comparison.compare(
            args.data, args.batch_size, args.max_new_tokens, args.seed, list(engine_comparison.DEFAULT_ENGINES),
            args.quality_prompts, args.comparison_rounds)}, indent=2))
        return 0
    # First, while this process has loaded nothing that competes for the CPU.
    cold = cold_start.run(runs=args.cold_start_runs) if args.cold_start_runs else None
    import torch

    from dolly_langchain.engines.ctranslate2_engine import available as ct2_available
    from dolly_langchain.llm import DollyLLM

    needed = max(args.batch_size, args.single_prompts, args.quality_prompts)
    prompts = load_prompts(args.data, needed, args.max_context_chars, args.seed)
    single, batch = prompts[: args.single_prompts], prompts[: args.batch_size]
    options = {"do_sample": False, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}

    report: dict = {"model": args.model or "SmolLM2-135M-Instruct (embedded)", "max_new_tokens": args.max_new_tokens,
                    "batch_size": args.batch_size, "single_prompts": len(single), "torch_threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count(), "engines": {}}
    llms = {"transformers": DollyLLM.from_model_id(args.model, engine="transformers", **options)}
    if ct2_available():
        for compute_type in ("int8", "float32"):
            started = time.perf_counter()
            llms[f"ctranslate2_{compute_type}"] = DollyLLM.from_model_id(
                args.model, engine="ctranslate2", compute_type=compute_type, **options)
            report[f"ctranslate2_{compute_type}_load_seconds"] = round(time.perf_counter() - started, 2)
    for name, llm in llms.items():
        report["engines"][name] = bench_engine(llm, single, batch, args.max_new_tokens)
    default = DollyLLM.from_model_id(args.model, **options) if args.model is None else llms["transformers"]
    report["default_engine"] = default.generation_engine.describe()
    report["concurrency"] = bench_concurrency(default, batch, args.max_new_tokens)

    import llamacpp_reference

    if args.model is None and llamacpp_reference.available():
        # The prompts of the batch16 runs, one at a time: the comparison is on the same prompts.
        messages = [[{"role": "user", "content": p}] for p in batch]
        # llama.cpp at its own default (all usable cores) and at one thread; the faster run is the reference, so
        # the comparison is against llama.cpp at its best on this machine, as ours uses its best thread count.
        runs = []
        for threads in sorted({1, llamacpp_reference.default_threads()}):
            result = llamacpp_reference.run_llamacpp(messages, args.max_new_tokens, threads=threads)
            runs.append({k: v for k, v in result.items() if k != "responses"})
        report["llamacpp"] = max(runs, key=lambda run: run["tokens_per_s"])
        report["llamacpp_runs"] = runs
    if args.quality_prompts and "ctranslate2_int8" in llms:
        report["int8_quality"] = int8_quality(llms["transformers"], llms["ctranslate2_int8"],
                                              prompts[: args.quality_prompts])

    engines = report["engines"]
    ratios = {}
    ct2 = engines.get(f"ctranslate2_{default.generation_engine.describe().get('compute_type', '')}")
    if ct2:
        ratios["ctranslate2_b1_over_transformers_b1"] = round(
            ct2["batch1"]["tokens_per_s"] / engines["transformers"]["batch1"]["tokens_per_s"], 2)
        if "llamacpp" in report:
            ratios["ctranslate2_b16_over_llamacpp_b1"] = round(
                ct2["batch16"]["tokens_per_s"] / report["llamacpp"]["tokens_per_s"], 2)
    ratios["concurrent_over_batch"] = report["concurrency"]["concurrent_over_batch"]
    report["ratios"] = ratios
    report["targets"] = {"ctranslate2_b1_over_transformers_b1": 3.0, "ctranslate2_b16_over_llamacpp_b1": 2.0,
                         "concurrent_over_batch": 0.8, "cold_start_ask_wall_s": cold_start.TARGET_SECONDS}
    if cold is not None:
        report["cold_start"] = cold
    if args.model is None:
        del llms, default  # free this process's engines before the comparison's own processes run
        report["engine_comparison"] = engine_comparison.compare(
            args.data, args.batch_size, args.max_new_tokens, args.seed, list(engine_comparison.DEFAULT_ENGINES),
            args.quality_prompts, args.comparison_rounds)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
