"""The ``llamacpp`` engine: llama.cpp's server engine, in process (``xllamacpp``), on a GGUF conversion of the model.

    engine = LlamaCppEngine.from_model(None)                     # embedded model: its shipped Q4_1 tensors
    engine = LlamaCppEngine.from_model("runs/dolly-pythia-410m")  # converted to Q8_0 once, cached

llama.cpp answers one prompt at a time faster than CTranslate2 on a small CPU (4-bit and 8-bit block kernels, no
padding); ``benchmarks/generation.py --engines`` measures both against llama.cpp on the shipped GGUF in one run.

How a batch runs: each row is one streaming completion request with the prompt given as token ids, sent from its
own thread; llama.cpp's server schedules the requests on its slots (``parallel``) and batches them itself
(continuous batching: a short row's slot is free as soon as it ends, and nothing is padded). Every sampled token
comes back as it is sampled: its text in the conversion's placeholder vocabulary is its id (``<ID>``), and with
``logprobs`` llama.cpp's ``n_probs`` adds its log-probability (it sorts the vocabulary per token, so only then).
Each token goes through
:class:`~dolly_langchain.engines.base.RowTracker` (stop ids, ``on_token``: stop strings, ``stop_loops``,
cancellation), and a row that ends on our side closes its stream, which cancels the request in llama.cpp.

What it does not do: ``no_repeat_ngram_size`` (llama.cpp has no such sampler: a clear error) and grammar masks from
:mod:`dolly_langchain.structured` (structured calls run on a transformers copy of the checkpoint, as for
CTranslate2). Sampling maps to llama.cpp's samplers in transformers' order (repetition penalty over the whole
sequence, temperature, top-k, top-p; llama.cpp's default min-p, DRY and XTC are off), and ``seed`` seeds a call.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from pathlib import Path

from dolly_langchain.engines.base import (
    EngineOutput,
    GenerationEngine,
    RowTracker,
    TokenCallback,
    import_engine_package,
    threads_from_env,
    usable_cpus,
)
from dolly_langchain.errors import DollyRuntimeError, DollyValueError, NotSupportedError
from dolly_langchain.generation import DEFAULT_BATCH_SIZE, SamplingOptions

# A generated token's text in a conversion's placeholder vocabulary (gguf_conversion): its id in angle brackets.
_TOKEN_TEXT = re.compile(r"<(\d+)>")
INSTALL_HINT = "pip install 'xllamacpp>=2026.10.11549,<2027'"
#: KV cache tokens shared by the slots (llama.cpp's unified cache): enough for every slot to hold a long prompt
#: on a small model, without reserving ``parallel x window`` tokens for a large one.
KV_CACHE_TOKENS = 16384


def import_xllamacpp():
    """Import ``xllamacpp`` or raise an ImportError that says how to install it."""
    return import_engine_package("xllamacpp", "llamacpp", INSTALL_HINT)


def available() -> bool:
    """Whether ``xllamacpp`` (and ``gguf``, for conversions) can be imported."""
    try:
        import_xllamacpp()
        import gguf  # noqa: F401
    except ImportError:
        return False
    return True


def default_threads() -> int:
    """llama.cpp's threads when none are named: every CPU this process may use (``DOLLY_LLAMACPP_THREADS`` overrides).

    Unlike CTranslate2's OpenMP threads (one per two CPUs is fastest there), llama.cpp's were fastest at one per CPU
    on the 2-CPU machine this was measured on."""
    env = threads_from_env("DOLLY_LLAMACPP_THREADS", 1)
    return env if env is not None else usable_cpus()


class LlamaCppEngine(GenerationEngine):
    """Generates with llama.cpp on a GGUF written by :func:`~dolly_langchain.engines.gguf_conversion.convert_to_gguf`."""

    name = "llamacpp"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "cpu",
        threads: int | None = None,
        parallel: int = DEFAULT_BATCH_SIZE,
        context_window: int | None = None,
    ):
        from dolly_langchain.engines.gguf_conversion import GGUF_FILE, read_conversion_record

        xlc = import_xllamacpp()
        self.model_dir = Path(model_dir)
        gguf = self.model_dir / GGUF_FILE
        record = read_conversion_record(self.model_dir)
        if record is None or not gguf.is_file():
            raise DollyValueError(f"{self.model_dir} is not a GGUF conversion made by dolly_langchain (no "
                                  f"{GGUF_FILE} and record); load the model by id or directory instead")
        if device not in ("cpu", "cuda"):
            raise DollyValueError(f"device must be 'cpu' or 'cuda' for engine='llamacpp', got {device!r}")
        if parallel < 1:
            raise DollyValueError(f"parallel must be at least 1, got {parallel}")
        self._record = record
        self._device = device
        self.quantization = record["quantization"]
        self.threads = default_threads() if threads is None else int(threads)
        self.parallel = int(parallel)
        self._context_window = context_window or record.get("context_window")
        self._vocab_size = int(record["vocab_size"])

        params = xlc.CommonParams()
        params.model.path = str(gguf)
        window = self._context_window or 2048
        params.n_ctx = max(window, min(window * self.parallel, KV_CACHE_TOKENS))
        params.n_parallel = self.parallel
        params.kv_unified = True  # the slots share one cache of n_ctx tokens; each may use up to the whole window
        params.cpuparams.n_threads = self.threads
        params.cpuparams_batch.n_threads = self.threads
        params.n_gpu_layers = 999 if device == "cuda" else 0
        if self.quantization == "f32":
            # llama.cpp keeps keys and values in float16 by default; a float32 model keeps them in float32 too, so
            # its outputs equal transformers' float32 ones (log-probabilities within 1e-3, tested).
            params.cache_type_k = xlc.ggml_type.GGML_TYPE_F32
            params.cache_type_v = xlc.ggml_type.GGML_TYPE_F32
            params.flash_attn_type = xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED  # its CPU kernel rounds to 16 bits
        params.cache_ram_mib = 0  # no host-memory prompt cache (8 GiB by default): calls do not reuse prompts
        params.cache_idle_slots = False
        params.verbosity = 0  # llama.cpp's log stays silent
        # No warm-up decode: it cost 0.3 s of every start (`dolly ask`) and the first call pays far less for it.
        params.warmup = False
        params.endpoint_metrics = False
        try:
            # llama.cpp's server engine in this process. It also binds an HTTP listener on 127.0.0.1 (port 0: any
            # free port) that nothing here uses; requests go straight to its handlers.
            self._server = xlc.Server(params)
        except Exception as err:  # noqa: BLE001 - a load failure means the same thing whatever its type
            raise DollyRuntimeError(f"llama.cpp could not load {gguf}: {err}") from err
        self._lock = threading.Lock()

    @classmethod
    def from_model(cls, model_id: str | None = None, *, device: str = "cpu", compute_type: str | None = "auto",
                   **kwargs) -> LlamaCppEngine:
        """Convert (once, cached) and load a model by hub id, local directory, or ``None`` for the embedded one.
        ``compute_type`` is the GGUF quantization (see :func:`~dolly_langchain.engines.gguf_conversion.resolve_quantization`)."""
        from dolly_langchain.engines.gguf_conversion import convert_to_gguf, resolve_quantization
        from dolly_langchain.models import resolve_model_path

        import_xllamacpp()
        source = resolve_model_path(model_id)
        return cls(convert_to_gguf(source, resolve_quantization(compute_type, source)), device=device, **kwargs)

    @property
    def device(self) -> str:
        return self._device

    @property
    def context_window(self) -> int | None:
        return self._context_window

    @property
    def logits_width(self) -> int | None:
        return self._vocab_size

    @property
    def source_checkpoint(self) -> str | None:
        """The transformers checkpoint this conversion was made from (structured output runs on it)."""
        return self._record.get("source")

    @property
    def compute_type(self) -> str:
        return self.quantization

    def describe(self) -> dict:
        return {**super().describe(), "compute_type": self.quantization, "threads": self.threads,
                "parallel": self.parallel}

    def _request(self, prompt: Sequence[int], options: SamplingOptions) -> dict:
        if options.no_repeat_ngram_size:
            raise NotSupportedError("no_repeat_ngram_size is not available on engine='llamacpp' (llama.cpp has no "
                                    "such sampler); use stop_loops=True, repetition_penalty=, or another engine")
        bad = next((i for i in prompt if not 0 <= i < self._vocab_size), None)
        if bad is not None:
            raise DollyValueError(f"token id {bad} is outside the model's vocabulary of {self._vocab_size}")
        request = {
            "prompt": list(prompt),
            "max_tokens": options.max_new_tokens,
            "stream": True,
            "cache_prompt": False,  # each call's output must not depend on what ran in its slot before
            "repeat_penalty": options.repetition_penalty,
            # the whole sequence, as transformers' repetition_penalty (llama.cpp keeps a ring of this many tokens)
            "repeat_last_n": len(prompt) + options.max_new_tokens if options.repetition_penalty != 1.0 else 0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "dry_multiplier": 0.0,
            "min_p": 0.0,
            "typical_p": 1.0,
            "xtc_probability": 0.0,
            "top_n_sigma": -1.0,
        }
        if options.logprobs:
            request["n_probs"] = 1  # each streamed token carries its log-probability (llama.cpp sorts the vocabulary)
        if options.do_sample:
            request.update(temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                           samplers=["penalties", "temperature", "top_k", "top_p"])
        else:
            request.update(temperature=0.0, top_k=1, top_p=1.0, samplers=["penalties", "top_k"])
        return request

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        options: SamplingOptions,
        stop_token_ids: Sequence[int],
        on_token: TokenCallback | None = None,
    ) -> list[EngineOutput]:
        if not prompts:
            return []
        requests = [self._request(prompt, options) for prompt in prompts]
        if options.seed is not None and options.do_sample:
            # One seed per row, derived from the call's, so rows of one batch do not repeat each other's samples.
            for row, request in enumerate(requests):
                request["seed"] = (options.seed + row) % (2**31)
        tracker = RowTracker(len(prompts), stop_token_ids, on_token, options.logprobs)
        errors: list[BaseException | None] = [None] * len(prompts)

        def run(row: int) -> None:
            def receive(chunk) -> bool:
                if "choices" not in chunk:  # an error object instead of a chunk
                    errors[row] = DollyRuntimeError(f"llama.cpp: {chunk.get('message') or chunk}")
                    return True
                choice = chunk["choices"][0]
                if options.logprobs:
                    entries = [(int(e["id"]), float(e["logprob"]))
                               for e in (choice.get("logprobs") or {}).get("content") or ()]
                else:  # the placeholder vocabulary: a token's text is "<ID>" (see gguf_conversion)
                    entries = [(int(i), None) for i in _TOKEN_TEXT.findall(choice.get("text") or "")]
                for token_id, logprob in entries:
                    with self._lock:  # on_token and the tracker run for one row at a time
                        try:
                            if tracker.add(row, token_id, logprob):
                                return True
                        except BaseException as err:  # noqa: BLE001 - xllamacpp would swallow it
                            errors[row] = err
                            return True
                return False

            try:
                self._server.handle_completions(requests[row], receive)
            except BaseException as err:  # noqa: BLE001 - reported for this row, the others go on
                errors[row] = err
            finally:
                with self._lock:
                    tracker.done[row] = True

        if len(prompts) == 1:
            run(0)
        else:
            threads = [threading.Thread(target=run, args=(row,), name=f"dolly-llamacpp-{row}", daemon=True)
                       for row in range(len(prompts))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        failed = next((err for err in errors if err is not None), None)
        if failed is not None:
            raise failed
        return tracker.outputs

    def close(self) -> None:
        """Stop llama.cpp's server threads and free the model (also done when the engine is garbage collected)."""
        self._server = None
