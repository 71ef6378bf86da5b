"""What ``DollyLLM`` and ``ChatDolly`` share: a codec, an engine, and the scheduler that batches their calls.

:func:`load_runtime` loads a model on either engine; :class:`DollyRuntime` turns encoded prompts into
:class:`Completion` objects, synchronously, asynchronously, or as streams of text chunks. Every call, from any
thread or event loop, goes through one :class:`~dolly_langchain.engines.scheduler.BatchScheduler`, so concurrent
calls share batches and never run the engine at the same time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from dolly_langchain.codec import PromptCodec
from dolly_langchain.engines.base import GenerationEngine
from dolly_langchain.engines.scheduler import DEFAULT_WINDOW, BatchScheduler, Request
from dolly_langchain.errors import DollyValueError, NotSupportedError
from dolly_langchain.generation import (
    COMPUTE_TYPES,
    DEFAULT_BATCH_SIZE,
    ENGINE_CHOICES,
    ENGINES,
    GGUF_QUANTIZATIONS,
    SamplingOptions,
    check_window,
)
from dolly_langchain.tokenizer import full_tokenizer

_DONE = object()


@dataclass
class Completion:
    """One response: its text, the generated ids it came from, and per-token log-probabilities when asked for."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None
    """``[{"token", "token_id", "logprob"}]`` for the tokens of ``text`` (``logprobs=True`` only)."""
    prompt_tokens: int = 0
    """Tokens the model read (the prompt in its format)."""
    finish_reason: str = "stop"
    """``"stop"`` (an end token or a stop sequence ended the response) or ``"length"`` (``max_new_tokens`` did)."""

    @property
    def usage(self) -> dict[str, int]:
        """LangChain's ``usage_metadata`` shape: ``input_tokens``, ``output_tokens``, ``total_tokens``."""
        generated = len(self.token_ids)
        return {"input_tokens": self.prompt_tokens, "output_tokens": generated,
                "total_tokens": self.prompt_tokens + generated}


class DollyRuntime:
    """A codec and an engine behind one scheduler: what ``DollyLLM``, ``ChatDolly`` and the pipeline adapter share."""

    def __init__(self, codec: PromptCodec, engine: GenerationEngine, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 window: float = DEFAULT_WINDOW):
        self.codec = codec
        self.engine = engine
        self.scheduler = BatchScheduler(engine, codec.stop_token_ids, batch_size=batch_size, window=window)
        self._grammar_scheduler: BatchScheduler | None = None
        self._grammar_lock = threading.Lock()

    @classmethod
    def for_transformers(cls, model, tokenizer, prompt_format: str | None = None, **kwargs: Any) -> DollyRuntime:
        """The runtime of a loaded transformers model and its tokenizer (the ``"transformers"`` engine)."""
        from dolly_langchain.engines.transformers_engine import TransformersEngine

        codec = PromptCodec(tokenizer, prompt_format, model_dir=model.name_or_path,
                            eos_token_ids=model.generation_config.eos_token_id)
        return cls(codec, TransformersEngine(model, tokenizer.pad_token_id), **kwargs)

    @property
    def tokenizer(self):
        """The model's transformers tokenizer (for RAG chunking, structured output, the pipeline adapter). The codec
        may encode with a transformers-free twin (:class:`~dolly_langchain.tokenizer.LightTokenizer`, CTranslate2
        conversions); then this loads transformers' on first access."""
        return full_tokenizer(self.codec.tokenizer)

    @property
    def context_window(self) -> int | None:
        """Most tokens (prompt + generated) the model attends over: what the engine reads from the model's config,
        else the tokenizer's ``model_max_length``; ``None`` when neither is known (tokenizers without a limit report
        a huge sentinel, which is ignored)."""
        if self.engine.context_window is not None:
            return self.engine.context_window
        limit = self.codec.tokenizer.model_max_length
        return limit if limit < 1_000_000 else None

    def check_window(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise a ``ValueError`` naming both numbers when prompt + ``max_new_tokens`` exceed the window."""
        check_window(self.context_window, prompt_tokens, max_new_tokens)

    # -- generation ----------------------------------------------------------------------------------------------

    def check_options(self, options: SamplingOptions) -> None:
        """Raise :class:`NotSupportedError` for options this runtime's engine cannot honour (before any work)."""
        if options.seed is not None and not self.engine.supports_seed:
            raise NotSupportedError(
                f"seed= cannot be honoured by the {self.engine.name} engine: it seeds its sampler once per thread, not "
                "per call. Use engine='transformers' for seeded sampling, or temperature=0 for reproducible answers."
            )

    def _request(self, ids, options: SamplingOptions, stop, listener=None) -> Request:
        # A grammar's value must be finished, so a constrained row is never ended early as a loop (the grammar
        # closes it within max_tokens instead).
        watcher = self.codec.watcher(stop, stop_loops=options.stop_loops and options.grammar is None)
        self.check_options(options)
        constraint = None
        if options.grammar is not None:
            constraint = self._constraint_factory(options.grammar)()

        def on_token(token_id: int, logprob) -> bool:
            text, stopped = watcher.push(token_id)
            if text and listener is not None:
                listener(text)
            return stopped

        def on_finish() -> None:
            tail = watcher.finish()
            if tail and listener is not None:
                listener(tail)

        request = Request(ids, options, on_token, on_finish)
        request.watcher = watcher
        request.constraint = constraint
        return request

    def _submit(self, requests: list[Request]) -> None:
        if requests and requests[0].options.grammar is not None:
            self.grammar_scheduler().submit(requests)
        else:
            self.scheduler.submit(requests)

    def _completion(self, output, stop, request: Request | None = None) -> Completion:
        text = self.codec.decode_response(output.token_ids, stop)
        logprobs = None
        if output.logprobs is not None:
            logprobs = self.codec.response_tokens(output.token_ids, output.logprobs, stop)
        completion = Completion(text=text, token_ids=list(output.token_ids), logprobs=logprobs)
        if request is not None:
            completion.prompt_tokens = len(request.prompt_ids)
            stopped = request.watcher.text.stopped
            if not stopped and len(output.token_ids) >= request.options.max_new_tokens:
                completion.finish_reason = "length"
        return completion

    def load(self) -> tuple[int, int]:
        """(running, waiting): requests generating now and requests queued, over this runtime's schedulers."""
        schedulers = [self.scheduler, *([self._grammar_scheduler] if self._grammar_scheduler is not None else [])]
        return sum(s.running for s in schedulers), sum(s.waiting for s in schedulers)

    # -- structured output ---------------------------------------------------------------------------------------

    def grammar_scheduler(self) -> BatchScheduler:
        """Where calls with a grammar (structured output) run: this runtime's own scheduler when its engine can
        mask logits, else a transformers engine over the same checkpoint, loaded on the first such call.

        CTranslate2's Python API cannot change logits while it generates (CTranslate2 issue #1469), so on that
        engine constrained calls run on transformers: exact, at transformers' speed (measured in
        ``benchmarks/structured.py``), with the weights loaded a second time (float32: 540 MB for the embedded
        model); unconstrained calls stay on CTranslate2.
        """
        if self.engine.supports_grammar:
            return self.scheduler
        with self._grammar_lock:
            if self._grammar_scheduler is None:
                engine = self._grammar_engine()
                self._grammar_scheduler = BatchScheduler(engine, self.codec.stop_token_ids,
                                                         batch_size=self.scheduler.batch_size)
        return self._grammar_scheduler

    def _grammar_engine(self) -> GenerationEngine:
        source = getattr(self.engine, "source_checkpoint", None)
        if source is None:
            raise NotSupportedError(
                f"the {self.engine.name} engine cannot constrain generation to a JSON schema and knows no checkpoint "
                "to run constrained calls on; load the model with engine='transformers' for structured output"
            )
        from dolly_langchain.engines.transformers_engine import TransformersEngine
        from dolly_langchain.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(source)
        if self.engine.device != "cpu":
            model.to(self.engine.device)
        return TransformersEngine(model, tokenizer.pad_token_id)

    def _constraint_factory(self, grammar):
        from dolly_langchain.structured import constraint_factory

        engine = self.grammar_scheduler().engine
        width = engine.logits_width or len(self.tokenizer)
        return constraint_factory(grammar, self.tokenizer, width, self.codec.stop_token_ids)

    def generate(self, prompts: Sequence[Sequence[int]], options: SamplingOptions, stop=None,
                 timeout: float | None = None) -> list[Completion]:
        """Completions for encoded prompts, in order; blocks until all are done.

        ``timeout`` (seconds): a :class:`TimeoutError` once it has passed, and the prompts leave their batches."""
        # Longest first, so batches hold prompts of similar length and pad little; results go back in order.
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        requests = {i: self._request(prompts[i], options, stop) for i in order}
        self._submit([requests[i] for i in order])
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return [self._completion(_result(requests[i].future, deadline, timeout), stop, requests[i])
                    for i in range(len(prompts))]
        except BaseException:
            for request in requests.values():
                request.cancel()
            raise

    async def agenerate(self, prompts: Sequence[Sequence[int]], options: SamplingOptions, stop=None,
                        timeout: float | None = None) -> list[Completion]:
        """Like :meth:`generate`, awaiting instead of blocking; cancelling the task frees its batch slots."""
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        requests = {i: self._request(prompts[i], options, stop) for i in order}
        self._submit([requests[i] for i in order])
        try:
            gathered = asyncio.gather(*(asyncio.wrap_future(requests[i].future) for i in range(len(prompts))))
            outputs = await _within(gathered, timeout)
        except BaseException:  # CancelledError and TimeoutError included
            for request in requests.values():
                request.cancel()
            raise
        return [self._completion(output, stop, requests[i]) for i, output in enumerate(outputs)]

    def stream(self, ids: Sequence[int], options: SamplingOptions, stop=None,
               timeout: float | None = None) -> Iterator[str | Completion]:
        """Text chunks as they are generated, then the :class:`Completion`. Closing the iterator cancels."""
        events: queue.Queue = queue.Queue()
        request = self._request(ids, options, stop, listener=events.put)
        request.future.add_done_callback(lambda _: events.put(_DONE))
        self._submit([request])
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                try:
                    item = events.get(timeout=_left(deadline, timeout))
                except queue.Empty:
                    raise _timed_out(timeout) from None
                if item is _DONE:
                    break
                yield item
            yield self._completion(request.future.result(), stop, request)
        finally:
            request.cancel()

    async def astream(self, ids: Sequence[int], options: SamplingOptions, stop=None,
                      timeout: float | None = None) -> AsyncIterator[str | Completion]:
        """Async :meth:`stream`; a cancelled, abandoned or timed-out stream frees its slot."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        request = self._request(ids, options, stop, listener=put)
        request.future.add_done_callback(lambda _: put(_DONE) if not loop.is_closed() else None)
        self._submit([request])
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while (item := await _within(events.get(), _left(deadline, timeout), timeout)) is not _DONE:
                yield item
            yield self._completion(request.future.result(), stop, request)
        finally:
            request.cancel()


def _result(future: concurrent.futures.Future, deadline: float | None, timeout: float | None):
    try:
        return future.result(timeout=_left(deadline, timeout))
    except concurrent.futures.TimeoutError:
        if future.done():
            raise  # the generation itself raised a TimeoutError
        raise _timed_out(timeout) from None


def _left(deadline: float | None, timeout: float | None) -> float | None:
    """Seconds left until ``deadline`` (``None``: no deadline); raises the call's TimeoutError once it passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise _timed_out(timeout)
    return left


def _timed_out(timeout: float | None) -> TimeoutError:
    return TimeoutError(f"the model did not finish within timeout={timeout:g} seconds; the call was cancelled "
                        "(raise timeout=, or lower max_tokens)")


async def _within(awaitable, seconds: float | None, timeout: float | None = None):
    if seconds is None:
        return await awaitable
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        raise _timed_out(timeout if timeout is not None else seconds) from None


# -- one loaded model per (model, engine settings) in a process ------------------------------------------------------

_SHARED: dict[tuple, DollyRuntime] = {}
_SHARED_LOCK = threading.Lock()
_KEY_LOCKS: dict[tuple, threading.Lock] = {}


def shared_runtime(model_id: str | None = None, *, engine: str | None = None, compute_type: str = "auto",
                   device: str | None = None) -> DollyRuntime:
    """The process-wide runtime of a model on an engine: loaded by the first caller, shared by every later one.

    ``ChatDolly(model=...)`` and ``DollyLLM(model=...)`` load through this on first use, so instances of one model
    with the same engine settings hold one copy of the weights and one scheduler (their calls share batches).
    Two threads asking at once load it once. :func:`clear_shared_runtimes` forgets them (tests, reloads).
    """
    resolved = "auto" if routes_auto(engine, model_id, compute_type, device) else resolve_engine(engine, model_id)
    key = (model_id, resolved, compute_type or "auto", device)
    with _SHARED_LOCK:
        if key in _SHARED:
            return _SHARED[key]
        lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with lock:  # a slow load of one model does not hold up loads of others
        if key not in _SHARED:
            runtime = load_runtime(model_id, engine=resolved, compute_type=compute_type, device=device)
            with _SHARED_LOCK:
                _SHARED[key] = runtime
        return _SHARED[key]


def clear_shared_runtimes() -> None:
    """Forget the runtimes :func:`shared_runtime` loaded (instances that hold one keep it)."""
    with _SHARED_LOCK:
        _SHARED.clear()
        _KEY_LOCKS.clear()


def load_runtime(
    model_id: str | None = None,
    *,
    engine: str | None = None,
    compute_type: str = "auto",
    device: str | None = None,
    prompt_format: str | None = None,
    dtype: Any = None,
    device_map: Any = None,
    quantization_config: Any = None,
    model_kwargs: dict | None = None,
) -> DollyRuntime:
    """Load a model (hub id, local directory, ``None`` for the embedded one) on an engine.

    ``engine=None`` or ``"auto"``: for the embedded model on CPU with llama.cpp (``xllamacpp``) and CTranslate2
    installed, both: lone prompts on llama.cpp, batches on CTranslate2 int8
    (:class:`~dolly_langchain.engines.routing.RoutingEngine`); else ``"ctranslate2"`` for the embedded model when
    the ctranslate2 package is installed and no transformers-only option is given, ``"llamacpp"`` or
    ``"ctranslate2"`` when a GGUF or CTranslate2 ``compute_type`` is named; ``"transformers"`` otherwise. ``compute_type`` and
    ``device`` ("cpu" or "cuda") choose how CTranslate2 runs; ``dtype``, ``device_map``, ``quantization_config``
    and ``model_kwargs`` go to transformers' ``from_pretrained``.
    """
    transformers_only = {
        name: value
        for name, value in (("dtype", dtype), ("device_map", device_map), ("quantization_config", quantization_config),
                            ("model_kwargs", model_kwargs))
        if value
    }
    if not transformers_only and routes_auto(engine, model_id, compute_type, device):
        return _load_routing(prompt_format)
    if engine in (None, "auto") and compute_type not in (None, "auto"):
        # a compute type only means something to CTranslate2 (its types) or llama.cpp (GGUF types)
        engine = "llamacpp" if compute_type in GGUF_QUANTIZATIONS else "ctranslate2"
    engine = resolve_engine(engine, model_id, transformers_only)
    if engine in ("ctranslate2", "llamacpp"):
        if transformers_only:
            raise DollyValueError(f"{sorted(transformers_only)} are transformers options; with engine={engine!r} use "
                             "compute_type= and device= (or pass engine='transformers')")
        if engine == "llamacpp":
            return _load_llamacpp(model_id, compute_type, device or "cpu", prompt_format)
        if compute_type in GGUF_QUANTIZATIONS:
            raise DollyValueError(f"compute_type {compute_type!r} is a GGUF type for engine='llamacpp'; CTranslate2 "
                                  f"takes {', '.join(COMPUTE_TYPES)}")
        return _load_ctranslate2(model_id, compute_type, device or "cpu", prompt_format)
    if compute_type not in (None, "auto"):
        raise DollyValueError("compute_type is a CTranslate2 option; with engine='transformers' pass dtype= (e.g. "
                         "torch.bfloat16) or quantization_config=")
    from dolly_langchain.models import load_model_and_tokenizer

    load_kwargs = dict(model_kwargs or {})
    for key, value in (("dtype", dtype), ("device_map", device_map), ("quantization_config", quantization_config)):
        if value is not None:
            load_kwargs[key] = value
    model, tokenizer = load_model_and_tokenizer(model_id, **load_kwargs)
    if device is not None and device_map is None:
        model.to(device)
    return DollyRuntime.for_transformers(model, tokenizer, prompt_format)


def routes_auto(engine: str | None, model_id: str | None, compute_type: str | None = "auto",
                device: str | None = None) -> bool:
    """Whether ``engine="auto"`` means two engines here (:class:`~dolly_langchain.engines.routing.RoutingEngine`):
    the embedded model on CPU, no compute type named, with both llama.cpp and CTranslate2 installed."""
    if engine not in (None, "auto") or model_id is not None or compute_type not in (None, "auto"):
        return False
    if device not in (None, "cpu"):
        return False
    import importlib.util

    # Found, not imported: a lone `dolly ask` never imports CTranslate2 (the batch engine loads on the first batch).
    return all(importlib.util.find_spec(name) is not None for name in ("ctranslate2", "xllamacpp", "gguf"))


def resolve_engine(engine: str | None, model_id: str | None, transformers_only: dict | None = None) -> str:
    """The engine ``engine=None``/``"auto"`` means for this model (see :func:`load_runtime`); for the embedded model
    on CPU, where ``"auto"`` routes lone prompts to llama.cpp (:func:`routes_auto`), this names the batch engine."""
    if engine in (None, "auto"):
        from dolly_langchain.engines.ctranslate2_engine import available

        return "ctranslate2" if model_id is None and not transformers_only and available() else "transformers"
    if engine not in ENGINES:
        raise DollyValueError(f"engine must be one of {ENGINE_CHOICES}, got {engine!r}")
    return engine


def _load_routing(prompt_format) -> DollyRuntime:
    """The embedded model with ``engine="auto"``: llama.cpp on its shipped tensors for lone prompts, CTranslate2 int8
    (loaded on the first batch) for batches (:mod:`dolly_langchain.engines.routing`)."""
    from dolly_langchain.engines.ctranslate2_engine import CTranslate2Engine
    from dolly_langchain.engines.gguf_conversion import read_conversion_record
    from dolly_langchain.engines.llamacpp_engine import LlamaCppEngine
    from dolly_langchain.engines.routing import RoutingEngine

    single = LlamaCppEngine.from_model(None, parallel=1)  # lone prompts only: one slot
    engine = RoutingEngine(single, lambda: CTranslate2Engine.from_model(None, compute_type="int8"))
    return _converted_runtime(engine, read_conversion_record(single.model_dir) or {}, prompt_format)


def _load_llamacpp(model_id, compute_type, device, prompt_format) -> DollyRuntime:
    from dolly_langchain.engines.gguf_conversion import read_conversion_record
    from dolly_langchain.engines.llamacpp_engine import LlamaCppEngine

    if compute_type not in (None, "auto", *GGUF_QUANTIZATIONS):
        raise DollyValueError(f"compute_type {compute_type!r} is a CTranslate2 type; engine='llamacpp' takes 'auto' "
                              f"or a GGUF type: {', '.join(GGUF_QUANTIZATIONS)}")
    engine = LlamaCppEngine.from_model(model_id, device=device, compute_type=compute_type)
    return _converted_runtime(engine, read_conversion_record(engine.model_dir) or {}, prompt_format)


def _load_ctranslate2(model_id, compute_type, device, prompt_format) -> DollyRuntime:
    from dolly_langchain.engines.conversion import read_conversion_record
    from dolly_langchain.engines.ctranslate2_engine import CTranslate2Engine

    engine = CTranslate2Engine.from_model(model_id, device=device, compute_type=compute_type or "auto")
    return _converted_runtime(engine, read_conversion_record(engine.model_dir) or {}, prompt_format)


def _converted_runtime(engine: GenerationEngine, record: dict, prompt_format) -> DollyRuntime:
    """The runtime of an engine on a converted copy (CTranslate2 or GGUF), with the tokenizer saved beside it."""
    model_dir = engine.model_dir
    # A conversion whose record says the transformers-free tokenizer reproduces transformers' is read with it, so
    # this engine runs without importing transformers or torch (dolly_langchain.tokenizer); others keep transformers'.
    if record.get("light_tokenizer"):
        from dolly_langchain.tokenizer import LightTokenizer

        tokenizer = LightTokenizer(model_dir)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    eos = None
    if (model_dir / "generation_config.json").is_file():
        # What GenerationConfig.from_pretrained reads as eos_token_id, without importing transformers.
        eos = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
    return DollyRuntime(PromptCodec(tokenizer, prompt_format, model_dir=str(model_dir), eos_token_ids=eos), engine)
