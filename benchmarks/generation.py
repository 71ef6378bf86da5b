"""Generation throughput: one prompt at a time vs ``DollyLLM.batch`` vs raw batched ``model.generate``.

    python benchmarks/generation.py                      # embedded SmolLM2-135M-Instruct, 48 dolly instructions
    python benchmarks/generation.py --num-prompts 64 --max-new-tokens 64 --batch-size 16

Prints one JSON object. All three paths run on the same model, prompts (the same token ids, in the model's own
format) and greedy settings in one process; each counts the tokens it really generated (up to and including the
first stop token of each row), so padding rows and the idle tail of a batch do not count.

- ``single``: ``DollyLLM.invoke`` on each prompt in turn;
- ``batched``: ``DollyLLM.batch`` over all prompts (``--batch-size`` per ``generate`` call);
- ``raw_generate``: the same prompts, in the data's order, left-padded into batches of ``--batch-size`` and fed to
  ``model.generate`` directly: what a user gets from transformers alone.

Targets on a 2-core CPU: batched/single >= 6 and batched/raw_generate >= 0.9 in generated tokens/s.
Instructions come from databricks-dolly-15k (``--data``, default ``$DOLLY_15K_PATH``); none are stored here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=os.environ.get("DOLLY_15K_PATH"),
                        help="databricks-dolly-15k.jsonl (default: $DOLLY_15K_PATH)")
    parser.add_argument("--model", default=None, help="hub id or directory (default: the embedded SmolLM2)")
    parser.add_argument("--num-prompts", type=int, default=48, help="instructions sampled from the data (32-64)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-context-chars", type=int, default=1000,
                        help="skip records whose context is longer, so prompts stay chat-sized")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
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


class GeneratedTokenCounter:
    """Wraps ``model.generate`` to count generated tokens per row up to and including the first stop token."""

    def __init__(self, model, stop_ids: list[int]):
        self.model, self.stop_ids, self.tokens, self.calls = model, set(stop_ids), 0, 0
        self.original = model.generate

    def __enter__(self):
        def counting_generate(*args, **kwargs):
            out = self.original(*args, **kwargs)
            prompt_len = kwargs["input_ids"].shape[1]
            for row in out[:, prompt_len:].tolist():
                end = next((i + 1 for i, t in enumerate(row) if t in self.stop_ids), len(row))
                self.tokens += end
            self.calls += 1
            return out

        self.model.generate = counting_generate
        return self

    def __exit__(self, *exc):
        self.model.generate = self.original


def run_single(llm, prompts, counter) -> dict:
    start = time.perf_counter()
    with counter:
        outputs = [llm.invoke(p) for p in prompts]
    return _result(counter, time.perf_counter() - start, outputs)


def run_batched(llm, prompts, counter) -> dict:
    start = time.perf_counter()
    with counter:
        outputs = llm.batch(prompts)
    return _result(counter, time.perf_counter() - start, outputs)


def run_raw_generate(llm, prompts, batch_size: int, max_new_tokens: int, counter) -> dict:
    pipe = llm.pipeline
    encoded = [pipe.encode_prompt(p) for p in prompts]
    start = time.perf_counter()
    with counter:
        for i in range(0, len(encoded), batch_size):
            batch = encoded[i : i + batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([[pipe.tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in batch])
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
            with torch.inference_mode():
                pipe.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                    max_new_tokens=max_new_tokens, eos_token_id=pipe.stop_token_ids,
                                    pad_token_id=pipe.tokenizer.pad_token_id)
    return _result(counter, time.perf_counter() - start, None)


def _result(counter, seconds: float, outputs) -> dict:
    result = {"seconds": round(seconds, 2), "generated_tokens": counter.tokens, "generate_calls": counter.calls,
              "tokens_per_s": round(counter.tokens / seconds, 2)}
    counter.tokens = counter.calls = 0
    if outputs is not None:
        result["empty_responses"] = sum(1 for o in outputs if not o)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    from dolly_langchain.llm import DollyLLM

    prompts = load_prompts(args.data, args.num_prompts, args.max_context_chars, args.seed)
    llm = DollyLLM.from_model_id(args.model, do_sample=False, max_new_tokens=args.max_new_tokens,
                                 batch_size=args.batch_size)
    counter = GeneratedTokenCounter(llm.pipeline.model, llm.pipeline.stop_token_ids)
    llm.invoke(prompts[0], max_new_tokens=4)  # warm-up: first-call allocations and lazy init
    counter.tokens = counter.calls = 0
    single = run_single(llm, prompts, counter)
    batched = run_batched(llm, prompts, counter)
    raw = run_raw_generate(llm, prompts, args.batch_size, args.max_new_tokens, counter)
    report = {
        "model": llm.model_id,
        "prompt_format": llm.pipeline.prompt_format,
        "num_prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "single": single,
        "batched": batched,
        "raw_generate": raw,
        "batched_over_single": round(batched["tokens_per_s"] / single["tokens_per_s"], 2),
        "batched_over_raw_generate": round(batched["tokens_per_s"] / raw["tokens_per_s"], 2),
        "targets": {"batched_over_single": 6.0, "batched_over_raw_generate": 0.9},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
