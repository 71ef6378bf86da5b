"""Generation settings, defined once: Dolly's defaults, sampling options, engines, compute types, batch size, window.

Everything that decides *how* a response is generated lives here and is imported everywhere else (the LangChain
classes, the runtime, the engines, the pipeline adapter, the CLI flags, ``dolly eval --generation``):

- :data:`DEFAULT_GENERATION`: Dolly's sampling defaults (``instruct_pipeline.py`` in databricks/dolly).
- :class:`SamplingOptions`: how tokens are picked for one call; hashable, so calls with equal options share a batch.
- :func:`sampling_options`: the one conversion of generate-style keyword arguments into :class:`SamplingOptions`.
- :func:`check_window`: refuse a prompt + ``max_new_tokens`` the model's window cannot hold.
- :data:`ENGINES`, :data:`ENGINE_CHOICES`, :data:`COMPUTE_TYPES`, :data:`DEVICES`: what ``engine=``,
  ``compute_type=`` and ``device=`` (and ``--engine``, ``--compute-type``, ``--device``) accept.
- :data:`DEFAULT_BATCH_SIZE`, :data:`EMBEDDED_MODEL_LABEL`.

NOTE: where we differ from Dolly: the command line decodes greedily by default (``--temperature 0``: reproducible
answers), while the library keeps Dolly's sampling defaults.

This module imports nothing heavy (no torch, transformers or langchain), so command-line parsers can use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from dolly_langchain.errors import DollyValueError
from dolly_langchain.models import EMBEDDED_MODEL_NAME

__all__ = [
    "ANSWER_DEFAULTS",
    "STRUCTURED_DEFAULTS",
    "ALL_COMPUTE_TYPE_CHOICES",
    "COMPUTE_TYPES",
    "COMPUTE_TYPE_CHOICES",
    "GGUF_QUANTIZATIONS",
    "ContextWindowError",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_GENERATION",
    "DEVICES",
    "EMBEDDED_MODEL_LABEL",
    "EMBEDDED_MODEL_NAME",
    "ENGINES",
    "ENGINE_CHOICES",
    "OPTION_NAMES",
    "SamplingOptions",
    "check_window",
    "sampling_options",
]

#: Dolly's sampling defaults (``instruct_pipeline.py`` in databricks/dolly): nucleus sampling, top-k off.
DEFAULT_GENERATION = {"do_sample": True, "max_new_tokens": 256, "top_p": 0.92, "top_k": 0}

#: The engines a model can run on (see :mod:`dolly_langchain.engines`); ``"auto"`` picks one per model.
ENGINES = ("transformers", "ctranslate2", "llamacpp")
ENGINE_CHOICES = ("auto", *ENGINES)

#: CTranslate2 compute types: how the weights are stored (a conversion's ``quantization``) and computed.
#: ``"auto"`` is int8 on CPU and int8_float16 on CUDA.
COMPUTE_TYPES = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "float16", "bfloat16", "float32")
COMPUTE_TYPE_CHOICES = ("auto", *COMPUTE_TYPES)
#: llama.cpp (``engine="llamacpp"``) weight types of a GGUF conversion; ``"auto"`` is the embedded model's shipped
#: Q4_1 tensors and Q8_0 for every other model (see :mod:`dolly_langchain.engines.gguf_conversion`).
GGUF_QUANTIZATIONS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "f16", "f32")
#: What ``compute_type=`` / ``--compute-type`` accept for any engine: CTranslate2's types and the GGUF types.
ALL_COMPUTE_TYPE_CHOICES = (*COMPUTE_TYPE_CHOICES, *GGUF_QUANTIZATIONS)
#: Where a model runs (``device=``, ``--device``).
DEVICES = ("cpu", "cuda")

#: Most prompts per engine batch: the prompts of one ``batch`` call and calls made at the same time share batches up
#: to this size. 16 keeps a 2-core CPU busy; raise it on a GPU.
DEFAULT_BATCH_SIZE = 16

#: How the embedded default model is named in results, ``--json`` output and ``ls_model_name``.
EMBEDDED_MODEL_LABEL = f"{EMBEDDED_MODEL_NAME} (embedded)"

#: Decoding that keeps a small model's answers from looping, chosen by ``benchmarks/answers.py`` (embedded model,
#: greedy, 128 new tokens, 96 seeded dolly-15k records, ``--records 96 --seed 1``): greedy answers loop in 27% of
#: them (ROUGE-L 0.182, closed_qa token F1 0.280). ``stop_loops`` ends an answer where it starts repeating itself,
#: decoding unchanged up to there: 0% loop, ROUGE-L 0.192 (+0.011 over greedy's, 95% paired interval
#: [+0.003, +0.020]), F1 0.285. Changing the decoding instead costs quality: no_repeat_ngram_size 4 loops in 3% at
#: ROUGE-L 0.167 (-0.015 [-0.028, -0.003]) and F1 0.208; 3 in 0% at 0.165; repetition_penalty 1.1-1.3 cost more
#: (it also penalises copying from the context). The defaults of ``dolly ask``, ``dolly chat``, ``dolly rag ask``,
#: ``dolly serve`` and of the embedded model in ``DollyLLM``/``ChatDolly``; other models default to none of them
#: (their own behaviour, as in transformers). ``--no-stop-loops`` turns it off.
ANSWER_DEFAULTS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "stop_loops": True}

#: The embedded model's defaults for structured output (a call with a grammar), chosen by ``benchmarks/structured.py``:
#: inside a JSON string value the small model repeats itself until ``max_tokens`` cuts the value, which the
#: n-gram ban does not stop (it rephrases: "a cat is a cat, a cat is a feline, ..."); a repetition penalty does.
STRUCTURED_DEFAULTS = {"repetition_penalty": 1.2, "no_repeat_ngram_size": 0, "stop_loops": False}

#: The per-call generation options of ``DollyLLM``/``ChatDolly`` (fields of the same names set their defaults).
OPTION_NAMES = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
                "no_repeat_ngram_size", "stop_loops", "seed", "logprobs")


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick tokens. Hashable: calls with equal options can share a batch."""

    max_new_tokens: int = DEFAULT_GENERATION["max_new_tokens"]
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k cut-off."""
    repetition_penalty: float = 1.0
    """Above 1 lowers the score of every token already in the prompt or the response (CTRL's penalty, as
    transformers and CTranslate2 apply it); 1 is off."""
    no_repeat_ngram_size: int = 0
    """Never generate an n-gram of this many tokens twice; 0 is off."""
    stop_loops: bool = False
    """End the response once it repeats itself: the same run of tokens three times in a row, or a run of three
    words for the third time (:data:`dolly_langchain.codec.LOOP_MAX_PERIOD` and the constants beside it). Decoding
    is unchanged up to there, so the answer is the same as without it, minus the loop's tail."""
    seed: int | None = None
    """Seeds the sampler before the batch runs, for reproducible sampling (``None``: not seeded). Greedy decoding
    ignores it. A seeded call is reproducible when it runs alone or with the same calls in its batch; the
    transformers engine honours it, CTranslate2 cannot (a clear error)."""
    logprobs: bool = False
    """Report each generated token's log-probability (log-softmax of the model's logits before sampling)."""
    grammar: Any = None
    """A :class:`~dolly_langchain.structured.JsonGrammar` the response must match (constrained decoding), or
    ``None``. Set by ``response_format=`` / ``with_structured_output``."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise DollyValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature):
            raise DollyValueError(f"temperature must be a finite number, got {self.temperature}")
        if self.do_sample and self.temperature <= 0:
            raise DollyValueError(f"temperature must be above 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise DollyValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise DollyValueError(f"top_k must be 0 (no cut-off) or more, got {self.top_k}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise DollyValueError(f"repetition_penalty must be above 0 (1 is off), got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise DollyValueError(f"no_repeat_ngram_size must be 0 (off) or more, got {self.no_repeat_ngram_size}")


#: What a missing option means: Dolly's default, else the SamplingOptions field's.
_DEFAULTS = {**{f.name: f.default for f in fields(SamplingOptions)}, **DEFAULT_GENERATION}


def sampling_options(values: Mapping[str, Any]) -> SamplingOptions:
    """:class:`SamplingOptions` from generate-style keyword arguments (:data:`OPTION_NAMES`, and ``grammar``); a
    name that is missing or ``None`` takes Dolly's default (:data:`DEFAULT_GENERATION`, else the
    :class:`SamplingOptions` default).

    ``temperature=0`` means greedy decoding, as it does for every LangChain chat model. Greedy decoding
    (``do_sample=False``) ignores ``temperature``, ``top_p``, ``top_k`` and ``seed``, as transformers' ``generate``
    does, so greedy calls with different sampling settings still share a batch. Other names are the caller's to
    check (``DollyLLM`` refuses them; the pipeline adapter hands them to ``generate``).
    """

    def get(name: str):
        value = values.get(name)
        return _DEFAULTS[name] if value is None else value

    def number(name: str, kind: type):
        value = get(name)
        if kind is int and isinstance(value, int):
            return int(value)
        try:
            converted = float(value)
        except (TypeError, ValueError):
            raise DollyValueError(f"{name} must be a number, got {value!r}") from None
        # nan and inf are refused even where greedy decoding would ignore them: they are never meant.
        if not math.isfinite(converted):
            raise DollyValueError(f"{name} must be a finite number, got {value!r}")
        if kind is int:
            if converted != int(converted):
                raise DollyValueError(f"{name} must be a whole number, got {value!r}")
            return int(converted)
        return converted

    temperature, top_p, top_k = number("temperature", float), number("top_p", float), number("top_k", int)
    do_sample = bool(get("do_sample")) and temperature != 0  # LangChain's temperature=0: greedy
    seed = values.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise DollyValueError(f"seed must be a whole number or None, got {seed!r}")
    return SamplingOptions(
        max_new_tokens=number("max_new_tokens", int),
        do_sample=do_sample,
        temperature=temperature if do_sample else 1.0,
        top_p=top_p if do_sample else 1.0,
        top_k=top_k if do_sample else 0,
        repetition_penalty=number("repetition_penalty", float),
        no_repeat_ngram_size=number("no_repeat_ngram_size", int),
        stop_loops=bool(get("stop_loops")),
        seed=seed if do_sample else None,
        logprobs=bool(get("logprobs")),
        grammar=values.get("grammar"),
    )


class ContextWindowError(DollyValueError):
    """A prompt and ``max_new_tokens`` that do not fit the model's window (a ``ValueError``, as before)."""


def check_window(window: int | None, prompt_tokens: int, max_new_tokens: int | None) -> None:
    """Raise a :class:`ContextWindowError` naming both numbers when prompt + ``max_new_tokens`` exceed ``window``.

    transformers only warns and then generates from positions the model never saw in training (or fails
    with a tensor size mismatch, as Dolly's users saw with RetrievalQA); refusing up front is clearer.
    """
    max_new_tokens = max_new_tokens or 0
    if window is not None and prompt_tokens + max_new_tokens > window:
        raise ContextWindowError(
            f"the prompt is {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}: "
            f"{prompt_tokens + max_new_tokens} tokens do not fit the model's window of {window}. "
            "Shorten the context (or retrieve fewer passages), or lower max_new_tokens."
        )
