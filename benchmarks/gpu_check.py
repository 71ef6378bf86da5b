"""One short GPU check of the project's own paths: DollyLLM on transformers and CTranslate2, and dolly-finetune LoRA.

    python benchmarks/gpu_check.py            # on a CUDA GPU (one H200: about 2-3 minutes)
    python benchmarks/gpu_check.py --smoke    # the same steps, tiny, on the CPU: checks this script itself

Model weights cannot travel to the GPU machine (64 MiB per call), so the model is built where the check runs: a
random-weight Llama with SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads, 3 KV heads, MLP 1536, vocabulary
49152, 8192 positions, tied embeddings) and a byte-level BPE tokenizer trained on the fly with ``tokenizers``
carrying Dolly's special tokens (as ``tests/conftest.py`` does for the tiny models), saved to a temporary directory
and loaded through ``DollyLLM.from_model_id(path, ...)``. Random weights rarely produce a stop token, so every row
generates close to ``--max-new-tokens`` tokens: tokens/s counts the tokens actually generated (the stop token
included) over the wall time, which is a fair speed number for this shape.

Steps, each in its own try/except; each prints ONE JSON line to stdout and appends it to ``$OUT/gpu_check.jsonl``
when ``$OUT`` is set:

1. ``env``: versions, GPU, CUDA, where a libcublas is (CTranslate2's CUDA build dlopens ``libcublas.so.12``).
2. ``model``: the random model and tokenizer that were built.
3. ``transformers_bf16``: contract checks (invoke gives a str; ``stop`` honoured and cut exactly; ``stream``
   chunks join to the invoke text; ``batch`` of 4 equals 4 invokes under greedy) and tokens/s at batch 1/16/64.
   On random weights in bf16 the greedy argmax is a near-tie at many steps, so batch vs invoke can differ without
   a bug; ``transformers_fp32_contract`` repeats the contract checks in fp32, where they must hold.
4. ``lora``: ``finetune.train.train(finetune.train.parse_args([... --lora --bf16 ...]))`` in-process on a synthetic
   JSONL (records close to ``--max-length`` tokens, the worst case the planner assumes): the loss values, whether
   the run directory loads with ``DollyLLM.from_model_id(RUN)``, peak GPU memory (torch.cuda.max_memory_allocated)
   against ``dolly-finetune plan``'s estimate for the same flags (``plan`` line); ``qlora`` likewise with
   ``--load-in-4bit`` when bitsandbytes can be imported (and CUDA is there), else a line saying it did not run.
5. ``ctranslate2_int8_float16`` / ``ctranslate2_float16`` (device cuda, converted there), the same checks; when
   neither loads on CUDA, ``ctranslate2_cpu_int8`` on the machine's CPUs instead; a ``ctranslate2`` line saying it
   did not run when the package is not importable. After training, so that a native crash while CTranslate2 loads
   its CUDA libraries cannot cost the training numbers.
6. ``dolly_eval``: skipped (needs the real model and data, which cannot travel); a line says so.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the project from this working tree (it is not pip-installed on the GPU machine)

START = time.perf_counter()

# SmolLM2-135M-Instruct's shape (its config.json on the hub).
FULL_SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
              "num_key_value_heads": 3, "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": True}
FULL_VOCAB = 49152
SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 512, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
               "tie_word_embeddings": True}
SMOKE_VOCAB = 515  # 512 trained + Dolly's 3, as tests/conftest.py

_WORDS = (  # noqa: SIM905  (the word list of tests/conftest.py, kept as written there)
    "the a an of to in is it that was for on are with as his they be at one have this from or had by word but "
    "what some we can out other were all there when up use your how said each she which do their time if will "
    "way about many then them write would like so these her long make thing see him two has look more day could "
    "go come did number sound no most people my over know water than call first who may down side been now find "
    "capital France Paris primary color blue cat sat mat summarize text name answer question context story poem "
    "explain why sky river mountain city history science music friend letter short list three reasons describe"
).split()
_TOPICS = ("the sea", "a red kite", "winter mornings", "bread", "old maps", "the moon", "trains", "a lost key",
           "bees", "rain on a roof", "chess", "a lighthouse", "coffee", "tides", "volcanoes", "a quiet library")


# --- output -----------------------------------------------------------------------------------------------------


def emit(record: dict) -> None:
    """One JSON line to stdout, and appended to $OUT/gpu_check.jsonl when $OUT is set."""
    record = {**record, "t_s": round(time.perf_counter() - START, 1)}
    line = json.dumps(record, default=str)
    print(line, flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(Path(out) / "gpu_check.jsonl", "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def run_step(name: str, budget_s: float, fn, *args, **kwargs):
    """Run one step; emit its line (or its error, or that the time budget was spent); return its result or None."""
    if time.perf_counter() - START > budget_s:
        emit({"step": name, "ok": False, "skipped": f"time budget of {budget_s:.0f}s spent"})
        return None
    started = time.perf_counter()
    try:
        result = fn(*args, **kwargs)
    except BaseException as err:  # one failed step must not stop the others
        if isinstance(err, KeyboardInterrupt):
            raise
        emit({"step": name, "ok": False, "seconds": round(time.perf_counter() - started, 1),
              "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:600],
              "traceback_tail": traceback.format_exc().strip().splitlines()[-6:]})
        return None
    line = result.pop("_return", None) if isinstance(result, dict) else None
    emit({"step": name, "ok": result.pop("ok", True) if isinstance(result, dict) else True,
          "seconds": round(time.perf_counter() - started, 1), **(result if isinstance(result, dict) else {})})
    return line if line is not None else result


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- 1. environment -------------------------------------------------------------------------------------------


def step_env() -> dict:
    import torch

    info: dict = {
        "python": sys.version.split()[0],
        "versions": {d: _version(d) for d in (
            "torch", "transformers", "tokenizers", "accelerate", "peft", "trl", "datasets", "ctranslate2",
            "langchain-core", "langsmith", "pydantic", "pyarrow", "fsspec", "huggingface-hub", "bitsandbytes")},
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    bf16_supported=torch.cuda.is_bf16_supported())
    # CTranslate2 4.8's CUDA build dlopens libcublas.so.12; a CUDA 13 image may only have libcublas.so.13.
    found = set()
    for base in [*sys.path, "/usr/local/cuda/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/local/nvidia/lib64"]:
        for pattern in ("libcublas.so*", "nvidia/*/lib/libcublas.so*", "nvidia/cu*/lib/libcublas.so*"):
            found.update(Path(p).name for p in glob.glob(os.path.join(base, pattern)))
    try:
        import subprocess

        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=20, check=False).stdout
        found.update(line.split()[0] for line in listing.splitlines() if "libcublas" in line)
    except Exception as err:  # noqa: BLE001
        info["ldconfig_error"] = f"{type(err).__name__}: {err}"[:200]
    info["libcublas_found"] = sorted(found)
    info["libcublas_so_12_found"] = any(name.startswith("libcublas.so.12") for name in found)
    if importlib.util.find_spec("bitsandbytes") is not None:
        try:
            with contextlib.redirect_stdout(sys.stderr):
                import bitsandbytes

            native = getattr(bitsandbytes.cextension, "lib", None)
            library = getattr(getattr(native, "_lib", None), "_name", "")
            info["bitsandbytes_native"] = f"{type(native).__name__} {library}"
        except Exception as err:  # noqa: BLE001
            info["bitsandbytes_error"] = f"{type(err).__name__}: {err}"[:300]
    try:
        import ctranslate2

        info["ctranslate2_cuda_devices"] = ctranslate2.get_cuda_device_count()
        info["ctranslate2_cuda_compute_types"] = sorted(ctranslate2.get_supported_compute_types("cuda")) \
            if info["ctranslate2_cuda_devices"] else []
    except Exception as err:  # noqa: BLE001
        info["ctranslate2_error"] = f"{type(err).__name__}: {err}"[:300]
    return info


# --- 2. the model -------------------------------------------------------------------------------------------------


def _corpus(rng: random.Random, lines: int, pseudo_words: list[str]):
    from dolly_langchain.prompts import format_training_text

    for i in range(lines):
        if i % 4 == 0:
            sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 16)))
            yield format_training_text(sentence.capitalize() + "?", sentence + ".", sentence if i % 3 == 0 else None)
        elif pseudo_words:
            yield " ".join(rng.choice(pseudo_words) for _ in range(40))
        else:
            yield " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14)))


def build_tokenizer(vocab_total: int, smoke: bool):
    """A byte-level BPE trained here, with Dolly's special tokens: ``len(tokenizer) == vocab_total``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dolly_langchain.prompts import DOLLY_SPECIAL_TOKENS

    rng = random.Random(0)
    pseudo_words: list[str] = []
    if not smoke:  # enough distinct words for ~49k merges (English alone would stop far short)
        syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
        syllables += [c + v + e for c in "bdgkmpst" for v in "aeiou" for e in "nrst"]
        pseudo_words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(120000)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_total - len(DOLLY_SPECIAL_TOKENS), special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(_corpus(rng, 400 if smoke else 8000, pseudo_words), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(DOLLY_SPECIAL_TOKENS)})
    return tokenizer


def step_model(out_dir: Path, smoke: bool) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    tokenizer = build_tokenizer(SMOKE_VOCAB if smoke else FULL_VOCAB, smoke)
    tokenizer_s = time.perf_counter() - started
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    # initializer_range: at transformers' 0.02 a random model this deep mostly repeats one token (the tiny one repeats
    # the prompt's last, "### Response:", and answers nothing); wider weights give varied text for the stop and
    # stream checks, and change nothing about speed.
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos,
                         initializer_range=0.1 if smoke else 0.05, **(SMOKE_SHAPE if smoke else FULL_SHAPE))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    if not smoke:
        model = model.to(torch.bfloat16)  # SmolLM2's checkpoint dtype; also halves what is written and read
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"path": str(out_dir), "parameters": params, "vocab": len(tokenizer), "tokenizer_seconds":
            round(tokenizer_s, 1), "saved_dtype": str(model.dtype).replace("torch.", ""),
            "initializer_range": config.initializer_range, "shape": dict(SMOKE_SHAPE if smoke else FULL_SHAPE)}


# --- 3./4. DollyLLM: contract checks and throughput -----------------------------------------------------------


def make_prompts(count: int) -> list[str]:
    """Short, similar-length instructions (little padding in a batch), all different."""
    verbs = ("Write a short story about", "Describe", "Explain why people like", "Write a poem about",
             "List three facts about", "Summarize what you know about")
    return [f"{verbs[i % len(verbs)]} {_TOPICS[i % len(_TOPICS)]} (request {i})." for i in range(count)]


class TokenCounter:
    """Counts the tokens the engine generated per row (the stop token included) while active."""

    def __init__(self, engine, max_new_tokens: int):
        self.engine, self.max_new_tokens = engine, max_new_tokens
        self.tokens = self.rows = self.short_rows = self.batches = 0

    def __enter__(self):
        original = self.engine.generate

        def counting(prompts, *args, **kwargs):
            outputs = original(prompts, *args, **kwargs)
            for output in outputs:
                n = len(output.token_ids)
                self.tokens += n + (n < self.max_new_tokens)  # a short row ended at a stop token it generated
                self.short_rows += n < self.max_new_tokens
            self.rows += len(outputs)
            self.batches += 1
            return outputs

        self.engine.generate = counting
        return self

    def __exit__(self, *exc):
        del self.engine.generate  # back to the class's method


def _engine(llm):
    return getattr(llm, "engine", None) or llm.runtime.engine


def _set_batch_size(llm, size: int) -> None:
    llm.batch_size = size
    llm.runtime.scheduler.batch_size = size


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _try(checks: dict, name: str, fn) -> None:
    """Run one sub-check; its exception is recorded under ``name`` instead of ending the others."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001
        checks[f"{name}_error"] = f"{type(err).__name__}: {err}"[:300]


def contract_checks(llm, prompts: list[str]) -> dict:
    """invoke -> str; stop honoured (cut exactly at its first occurrence); stream joins to invoke; batch == invokes."""
    checks: dict = {}
    text = llm.invoke(prompts[0])
    checks["invoke_is_str"] = isinstance(text, str)
    checks["invoke_chars"] = len(text)
    checks["invoke_head"] = text[:60]
    # A stop string taken from the middle of the greedy answer: the answer with it must end right before it.
    start = len(text) // 3
    stop = None
    for i in range(start, max(start, len(text) - 3)):
        piece = text[i:i + 3]
        if piece.isascii() and piece.strip() and "\ufffd" not in piece:
            stop = piece
            break
    if stop is None and len(text) >= 2:
        stop = text[len(text) // 2:len(text) // 2 + 2]

    def check_stop():
        cut = llm.invoke(prompts[0], stop=[stop])
        expected = text[: text.find(stop)].strip()
        checks.update(stop=stop, stop_absent=stop not in cut, stop_cut_exact=cut == expected, stop_cut_chars=len(cut))
        checks["stop_stream_equal"] = "".join(llm.stream(prompts[0], stop=[stop])) == cut

    if stop:
        _try(checks, "stop", check_stop)
    else:
        checks["stop"] = "not checked: the answer was empty (a stop token first)"

    def check_stream():
        chunks = list(llm.stream(prompts[0]))
        joined = "".join(chunks)
        checks.update(stream_chunks=len(chunks), stream_joins_to_invoke=joined == text)
        if joined != text:
            checks["stream_first_difference_at"] = _common_prefix(joined, text)
            checks["stream_tail_missing"] = text[len(joined):][:20] if text.startswith(joined) else None
            # Random weights emit lone bytes >= 0x80 (U+FFFD once decoded): tell that case apart from others.
            checks["stream_joins_to_invoke_ignoring_fffd"] = joined.replace("\ufffd", "") == text.replace("\ufffd", "")

    _try(checks, "stream", check_stream)

    def check_batch():
        batch = llm.batch(prompts[:4])
        single = [text] + [llm.invoke(p) for p in prompts[1:4]]
        checks["batch_equal_invoke_rows"] = f"{sum(a == b for a, b in zip(batch, single))}/4"
        checks["batch_vs_invoke_common_prefix_chars"] = [_common_prefix(a, b) for a, b in zip(batch, single)]
        checks["answer_chars"] = [len(s) for s in single]

    _try(checks, "batch", check_batch)
    checks["contract_ok"] = bool(
        checks["invoke_is_str"] and checks.get("stop_absent", True) and checks.get("stop_cut_exact", True)
        and checks.get("stop_stream_equal", True) and checks.get("stream_joins_to_invoke") is True
        and not any(k.endswith("_error") for k in checks)
    )
    return checks


def throughput(llm, prompts: list[str], batch_sizes: list[int], single_prompts: int, max_new_tokens: int) -> dict:
    import torch

    engine = _engine(llm)
    cuda = torch.cuda.is_available()
    _set_batch_size(llm, max(batch_sizes))
    llm.batch(prompts[: max(batch_sizes)], max_new_tokens=4)  # warm-up: allocations, kernels, the scheduler thread
    results = {}
    for size in batch_sizes:
        _set_batch_size(llm, size)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with TokenCounter(engine, max_new_tokens) as counter:
            started = time.perf_counter()
            if size == 1:
                for prompt in prompts[:single_prompts]:
                    llm.invoke(prompt)
            else:
                llm.batch(prompts[:size])
            seconds = time.perf_counter() - started
        results[f"batch{size}"] = {
            "batch_size": size, "prompts": single_prompts if size == 1 else size, "seconds": round(seconds, 3),
            "generated_tokens": counter.tokens, "rows_stopped_early": counter.short_rows,
            "engine_batches": counter.batches, "tokens_per_s": round(counter.tokens / seconds, 1),
            **({"torch_peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)} if cuda else {}),
        }
    return results


def step_llm(model_dir: Path, engine_kwargs: dict, prompts: list[str], batch_sizes: list[int], single: int,
             max_new_tokens: int, contract_only: bool = False) -> dict:
    from dolly_langchain.llm import DollyLLM

    started = time.perf_counter()
    llm = DollyLLM.from_model_id(str(model_dir), do_sample=False, max_new_tokens=max_new_tokens,
                                 batch_size=max(batch_sizes), **engine_kwargs)
    load_s = time.perf_counter() - started
    result: dict = {"load_seconds": round(load_s, 1), "engine": _engine(llm).describe(),
                    "max_new_tokens": max_new_tokens}
    try:
        result["contract"] = contract_checks(llm, prompts)
    except Exception as err:  # noqa: BLE001 - still measure speed
        result["contract"] = {"error": f"{type(err).__name__}: {err}"[:400]}
    if not contract_only:
        result["throughput"] = throughput(llm, prompts, batch_sizes, single, max_new_tokens)
    del llm
    gc.collect()
    return result


# --- 5. LoRA fine-tuning -------------------------------------------------------------------------------------------


def write_dataset(path: Path, model_dir: Path, records: int, max_length: int) -> dict:
    """Dolly-style records whose training text is 85-98% of ``max_length`` tokens (the planner's worst case)."""
    from transformers import AutoTokenizer

    from dolly_langchain.prompts import format_training_text

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rng = random.Random(1)
    lengths = []
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(records):
            instruction = f"{rng.choice(('Describe', 'Explain', 'Summarize'))} {rng.choice(_TOPICS)} ({i})."
            context = " ".join(rng.choice(_WORDS) for _ in range(12)) if i % 2 else ""
            target = int(max_length * rng.uniform(0.85, 0.97))
            words: list[str] = []
            chunk = 16
            while True:
                words += [rng.choice(_WORDS) for _ in range(chunk)]
                n = len(tokenizer(format_training_text(instruction, " ".join(words), context or None))["input_ids"])
                if n >= target:
                    while n > target and len(words) > 1:
                        words.pop()
                        n = len(tokenizer(format_training_text(instruction, " ".join(words),
                                                               context or None))["input_ids"])
                    break
                chunk = max(1, min(64, (target - n) // 2))
            lengths.append(n)
            handle.write(json.dumps({"instruction": instruction, "context": context, "response": " ".join(words),
                                     "category": "open_qa"}) + "\n")
    return {"records": records, "tokens_min": min(lengths), "tokens_max": max(lengths),
            "tokens_mean": round(sum(lengths) / len(lengths), 1)}


def _plan(train_argv: list[str]) -> dict:
    from finetune import plan

    argv = [a for a in train_argv]
    i = argv.index("--local-output-dir")
    del argv[i:i + 2]
    argv += ["--num-gpus", "1", "--gpu-memory-gb", "141", "--json"]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = plan.main(argv)
    if code:
        raise RuntimeError(f"finetune.plan.main returned {code}: {buffer.getvalue()[-300:]}")
    return json.loads(buffer.getvalue())


def step_plan(train_argv: list[str], model_dir: Path, data: Path, smoke: bool) -> dict:
    """``dolly-finetune plan`` for the flags of the LoRA run (it counts the records of the data file, so write it)."""
    data_info = write_dataset(data, model_dir, *((16, 128) if smoke else (64, 512))) if not data.exists() else None
    plan = _plan(train_argv)
    return {"argv": train_argv, "data": data_info, "plan": plan, "_return": plan}


def step_lora(model_dir: Path, work: Path, smoke: bool, plan: dict | None, qlora: bool = False) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    run_dir = work / ("qlora-run" if qlora else "lora-run")
    data = work / "train.jsonl"
    max_length, records = (128, 16) if smoke else (512, 64)
    data_info = write_dataset(data, model_dir, records, max_length) if not data.exists() else {"reused": str(data)}
    argv = train_argv(model_dir, run_dir, data, smoke, qlora)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base_alloc = torch.cuda.memory_allocated() if cuda else 0

    import finetune.train as ft

    started = time.perf_counter()
    train_error = None
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its log dicts; stdout is for JSON lines
            ft.train(ft.parse_args(argv))
    except BaseException as err:  # e.g. a post-training hook failed: the model may be saved anyway
        if isinstance(err, KeyboardInterrupt):
            raise
        train_error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:400]
        train_tb = traceback.format_exc().strip().splitlines()[-4:]
    train_s = time.perf_counter() - started
    result: dict = {"argv": argv, "data": data_info, "train_seconds": round(train_s, 1)}
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        result.update(peak_gpu_allocated_gb=round(peak / 2**30, 3),
                      peak_gpu_reserved_gb=round(torch.cuda.max_memory_reserved() / 2**30, 3),
                      gpu_allocated_before_gb=round(base_alloc / 2**30, 3),
                      peak_minus_before_gb=round((peak - base_alloc) / 2**30, 3))
    if train_error:
        result.update(train_error=train_error, train_traceback_tail=train_tb)
    state = run_dir / "model" / "trainer_state.json"
    if not state.is_file():
        result["ok"] = False
        result["error"] = f"no {state}: the run did not finish" + (f" ({train_error})" if train_error else "")
        return result
    history = json.loads(state.read_text(encoding="utf-8"))
    losses = [round(e["loss"], 4) for e in history.get("log_history", []) if "loss" in e]
    summary = next((e for e in reversed(history.get("log_history", [])) if "train_runtime" in e), {})
    result.update(global_step=history.get("global_step"), losses=losses,
                  loss_fell=bool(losses) and losses[-1] < losses[0],
                  train_runtime=summary.get("train_runtime"),
                  train_samples_per_second=summary.get("train_samples_per_second"),
                  run_dir_entries=sorted(p.name for p in run_dir.iterdir())[:30])
    # The run directory itself loads as the final (merged) model.
    try:
        from dolly_langchain.llm import DollyLLM

        kwargs = {"dtype": torch.bfloat16, "device_map": "cuda"} if cuda else {}
        llm = DollyLLM.from_model_id(str(run_dir), engine="transformers", do_sample=False, max_new_tokens=8, **kwargs)
        answer = llm.invoke("Describe the sea.")
        result.update(run_dir_loads=isinstance(answer, str), run_dir_answer_chars=len(answer),
                      loaded_from=str(getattr(_engine(llm).model, "name_or_path", "")))
        del llm
    except Exception as err:  # noqa: BLE001 - keep the training numbers
        result.update(run_dir_loads=False, run_dir_load_error=f"{type(err).__name__}: {err}"[:400])
        result["ok"] = False
    gc.collect()
    if plan and cuda:
        estimate = plan.get("memory_per_gpu_gb", {})
        measured = result["peak_gpu_allocated_gb"]
        result["plan_gpu_gb"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in estimate.items()}
        if estimate.get("total"):
            # The plan adds a flat CUDA overhead (context, fragmentation) that max_memory_allocated does not see.
            without_overhead = estimate["total"] - estimate.get("cuda_overhead", 0)
            result["measured_over_plan_without_overhead"] = round(measured / without_overhead, 3)
            result["measured_reserved_plus_overhead_over_plan_total"] = round(
                (result["peak_gpu_reserved_gb"] + estimate.get("cuda_overhead", 0)) / estimate["total"], 3)
        result["plan_steps"] = plan.get("steps")
    if train_error:
        result["ok"] = False
    return result


def train_argv(model_dir: Path, run_dir: Path, data: Path, smoke: bool, qlora: bool = False) -> list[str]:
    argv = ["--input-model", str(model_dir), "--local-output-dir", str(run_dir), "--training-dataset", str(data),
            "--lora", "--max-records", "16" if smoke else "64", "--epochs", "1", "--per-device-train-batch-size",
            "8", "--test-size", "0", "--save-steps", "1000", "--logging-steps", "1", "--report-to", "none",
            "--max-length", "128" if smoke else "512", "--lr", "1e-3"]
    if not smoke:
        argv.append("--bf16")
    if qlora:
        argv.append("--load-in-4bit")
    return argv


# --- main ----------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model (2 layers, fp32) on the CPU: transformers, ctranslate2 int8, 2 LoRA steps")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 64 (16 with --smoke)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (model, runs) at the end")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="seconds after which the remaining steps are skipped (each says so)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dolly-gpu-check-"))
    try:
        return _main(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _main(args: argparse.Namespace, work: Path) -> int:
    smoke = args.smoke
    max_new = args.max_new_tokens or (16 if smoke else 64)
    # Conversions and hub look-ups stay in the scratch directory; nothing can be downloaded on the GPU machine.
    os.environ["DOLLY_LANGCHAIN_CACHE"] = str(work / "cache")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
    os.environ.pop("LANGCHAIN_TRACING_V2", None)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
    budget = args.budget

    env = run_step("env", budget, step_env) or {}
    cuda = bool(env.get("cuda_available"))
    if not smoke and not cuda:
        emit({"step": "note", "ok": False, "error": "no CUDA GPU: the GPU steps will fail; use --smoke on a CPU"})
    model_dir = work / "model"
    model = run_step("model", budget, step_model, model_dir, smoke)
    if model is None:
        emit({"step": "done", "ok": False, "error": "no model was built; nothing else can run"})
        return 1

    import torch

    prompts = make_prompts(64)
    sizes = [1, 4] if smoke else [1, 16, 64]
    single = 2 if smoke else 4
    if smoke:
        run_step("transformers_fp32", budget, step_llm, model_dir, {"engine": "transformers"}, prompts, sizes,
                 single, max_new)
    else:
        run_step("transformers_bf16", budget, step_llm, model_dir,
                 {"engine": "transformers", "dtype": torch.bfloat16, "device_map": "cuda"}, prompts, sizes, single,
                 max_new)
        run_step("transformers_fp32_contract", budget, step_llm, model_dir,
                 {"engine": "transformers", "dtype": torch.float32, "device_map": "cuda"}, prompts, [4], single,
                 max_new, contract_only=True)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    # Training before CTranslate2: a native crash in CTranslate2's CUDA loading must not cost the training numbers.
    data = work / "train.jsonl"
    plan = run_step("plan", budget, step_plan, train_argv(model_dir, work / "lora-run", data, smoke), model_dir, data,
                    smoke)
    run_step("lora", budget, step_lora, model_dir, work, smoke, plan if isinstance(plan, dict) else None)
    if cuda and importlib.util.find_spec("bitsandbytes") is not None:
        qplan = run_step("qlora_plan", budget, step_plan,
                         train_argv(model_dir, work / "qlora-run", data, smoke, qlora=True), model_dir, data, smoke)
        run_step("qlora", budget, step_lora, model_dir, work, smoke, qplan if isinstance(qplan, dict) else None,
                 qlora=True)
    else:
        emit({"step": "qlora", "ok": False, "ran": False,
              "reason": "bitsandbytes is not importable here" if cuda else "QLoRA needs CUDA (and bitsandbytes)"})
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    if importlib.util.find_spec("ctranslate2") is None:
        emit({"step": "ctranslate2", "ok": False, "ran": False,
              "reason": "ctranslate2 is not importable here (its 40.8 MiB cp312 wheel was not carried). CTranslate2 "
              "4.8.5's CUDA build dlopens libcublas.so.12: env.libcublas_found lists what this machine has"})
    elif smoke:
        run_step("ctranslate2_cpu_int8", budget, step_llm, model_dir,
                 {"engine": "ctranslate2", "device": "cpu", "compute_type": "int8"}, prompts, sizes, single, max_new)
    else:
        ct2_ok = False
        for compute_type in ("int8_float16", "float16"):
            ct2_ok |= run_step(f"ctranslate2_{compute_type}", budget, step_llm, model_dir,
                               {"engine": "ctranslate2", "device": "cuda", "compute_type": compute_type}, prompts,
                               sizes, single, max_new) is not None
        if not ct2_ok:  # the CUDA build could not run here: at least the engine on this machine's CPUs
            run_step("ctranslate2_cpu_int8", budget, step_llm, model_dir,
                     {"engine": "ctranslate2", "device": "cpu", "compute_type": "int8"}, prompts, [1, 16], 2,
                     max_new)
    emit({"step": "dolly_eval", "ok": False, "ran": False,
          "reason": "skipped: dolly-eval needs the real model weights and the task data, which cannot travel to "
          "the GPU machine (64 MiB per call); its CPU numbers are in the README"})
    emit({"step": "done", "ok": True, "total_seconds": round(time.perf_counter() - START, 1),
          "work_dir": str(work) if args.keep else None})
    return 0


if __name__ == "__main__":
    sys.exit(main())
