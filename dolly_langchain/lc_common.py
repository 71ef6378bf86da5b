"""Fields and loading shared by the LangChain classes ``DollyLLM`` and ``ChatDolly``, and :class:`DollyAnswerer`, the
same answering of instructions without LangChain (for ``dolly ask``). Nothing here imports LangChain."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dolly_langchain.codec import check_stop
from dolly_langchain.errors import DollyTypeError, DollyValueError
from dolly_langchain.generation import (
    ANSWER_DEFAULTS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_GENERATION,
    EMBEDDED_MODEL_LABEL,
    OPTION_NAMES,
    STRUCTURED_DEFAULTS,
    SamplingOptions,
    sampling_options,
)
from dolly_langchain.runtime import DollyRuntime, load_runtime, shared_runtime

_LOAD_OPTIONS = (*OPTION_NAMES, "batch_size", "stop", "timeout", "max_retries", "streaming", "max_tokens")
#: Per-call keyword arguments besides the sampling options: LangChain's names for them, and JSON output.
_CALL_EXTRAS = ("max_tokens", "timeout", "response_format", "stream", "ls_structured_output_format")


class DollyModelFields(BaseModel):
    """Generation options and the runtime (engine + codec + batching) of a Dolly LangChain model.

    LangChain's standard constructor parameters mean what they mean for every chat model: ``model`` (alias of
    ``model_id``), ``temperature`` (0 decodes greedily), ``max_tokens`` (alias of ``max_new_tokens``), ``stop``,
    ``timeout``, ``max_retries``, ``streaming`` and ``seed``. Unknown parameters are errors.

    Built by name (``ChatDolly(model="databricks/dolly-v2-3b")``, or no ``model`` for the embedded
    SmolLM2-135M-Instruct), nothing loads until the first call; instances of one model with the same ``engine``,
    ``compute_type`` and ``device`` then share one loaded runtime (one copy of the weights, one scheduler, shared
    batches; :func:`~dolly_langchain.runtime.shared_runtime`). ``from_model_id`` loads at once, a runtime of its
    own; ``runtime=`` or ``pipeline=`` bring one already loaded.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, populate_by_name=True,
                              protected_namespaces=())

    given_pipeline: Any = Field(default=None, alias="pipeline", exclude=True)
    """``pipeline=``: bring your own :class:`~dolly_langchain.pipeline.InstructionTextGenerationPipeline`; its
    runtime is used (and shared). Read it back as :attr:`pipeline`."""
    given_runtime: Any = Field(default=None, alias="runtime", exclude=True)
    """``runtime=``: a loaded :class:`~dolly_langchain.runtime.DollyRuntime` to use (and share). Read it back, or
    load it on first use, as :attr:`runtime`."""
    model_id: str | None = Field(default=None, alias="model")
    """``model=``: hub id or local directory of the model; ``None`` is the embedded SmolLM2-135M-Instruct."""
    engine: str | None = None
    """``"transformers"``, ``"ctranslate2"``, or ``None``/``"auto"`` (CTranslate2 int8 for the embedded model when
    installed, transformers otherwise); set to the engine in use once the model is loaded."""
    compute_type: str = "auto"
    """How CTranslate2 stores and computes the weights (``"int8"``, ``"float16"``...; ``"auto"``)."""
    device: str | None = None
    """``"cpu"`` or ``"cuda"`` (``None``: CPU for CTranslate2, where transformers loads it otherwise)."""
    max_new_tokens: int = Field(default=DEFAULT_GENERATION["max_new_tokens"], ge=1, alias="max_tokens")
    """``max_tokens=``: most tokens generated per response (Dolly's default: 256)."""
    do_sample: bool = DEFAULT_GENERATION["do_sample"]
    """Sample (Dolly's default) or decode greedily (``False``, reproducible); ``temperature=0`` is greedy too."""
    temperature: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    """Sampling temperature; 0 decodes greedily (LangChain's meaning). Ignored when ``do_sample`` is False."""
    top_p: float = Field(default=DEFAULT_GENERATION["top_p"], allow_inf_nan=False)
    """Nucleus sampling mass (Dolly's default: 0.92); ignored when decoding greedily."""
    top_k: int = DEFAULT_GENERATION["top_k"]
    """Top-k sampling cut-off, 0 for none (Dolly's default); ignored when decoding greedily."""
    repetition_penalty: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Above 1 discourages tokens already in the prompt or response (1: off); works greedy and sampling.
    ``None``: for the embedded model :data:`~dolly_langchain.generation.ANSWER_DEFAULTS` (structured output:
    ``STRUCTURED_DEFAULTS``), measured: it loops without; off for other models."""
    no_repeat_ngram_size: int | None = Field(default=None, ge=0)
    """Never repeat an n-gram of this many tokens (0: off). ``None``: as ``repetition_penalty``."""
    stop_loops: bool | None = None
    """End a response that starts repeating itself (the same run of tokens three times in a row), keeping the
    decoding unchanged up to there. ``None``: as ``repetition_penalty``."""
    seed: int | None = None
    """Seed for reproducible sampling (greedy decoding needs none)."""
    logprobs: bool = False
    """Report the log-probability of each generated token (``generation_info`` / ``response_metadata``)."""
    stop: list[str] | None = None
    """Stop sequences of every call; a call's own ``stop`` adds to them."""
    timeout: float | None = Field(default=None, gt=0)
    """Seconds a call may take; past it the call raises ``TimeoutError`` and leaves its batch (``None``: no limit)."""
    max_retries: int = Field(default=0, ge=0)
    """Accepted for LangChain's standard constructor; a local model has no transient (network, rate-limit) errors to
    retry, so nothing is retried."""
    streaming: bool = False
    """``invoke`` generates through the stream, so callbacks see each token (``on_llm_new_token``)."""
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1)
    """Most prompts per engine batch. Prompts of one ``batch`` call and calls made at the same time from other
    threads or tasks share batches up to this size; 16 keeps a 2-core CPU busy, raise it on a GPU."""

    @model_validator(mode="after")
    def _attach_runtime(self):
        if self.given_runtime is None and self.given_pipeline is not None:
            try:
                self.given_runtime = self.given_pipeline.runtime
            except AttributeError:
                raise DollyValueError("pipeline= must be a dolly_langchain.pipeline.InstructionTextGenerationPipeline"
                                      ) from None
        if self.given_runtime is None:
            # Built by name: checked now (cheap), loaded on first use.
            from dolly_langchain.generation import ALL_COMPUTE_TYPE_CHOICES, DEVICES, ENGINE_CHOICES

            if self.engine not in (None, *ENGINE_CHOICES):
                raise DollyValueError(f"engine must be one of {ENGINE_CHOICES}, got {self.engine!r}")
            if self.compute_type not in ALL_COMPUTE_TYPE_CHOICES:
                raise DollyValueError(f"compute_type must be one of {ALL_COMPUTE_TYPE_CHOICES}, got "
                                      f"{self.compute_type!r}")
            if self.device not in (None, *DEVICES):
                raise DollyValueError(f"device must be one of {DEVICES}, got {self.device!r}")
            return self
        self._use_runtime(self.given_runtime)
        return self

    def _use_runtime(self, runtime, loaded_by_name: bool = False) -> None:
        if not isinstance(runtime, DollyRuntime):
            raise DollyValueError("runtime must be a dolly_langchain.runtime.DollyRuntime")
        if "batch_size" in self.model_fields_set or self.given_runtime is None:
            runtime.scheduler.batch_size = self.batch_size
        self.given_runtime = runtime
        self.engine = runtime.engine.name
        if self.model_id is None and loaded_by_name:
            self.model_id = EMBEDDED_MODEL_LABEL  # built with no model: the embedded one
        elif self.model_id is None and runtime.engine.name == "transformers":
            self.model_id = runtime.engine.model.name_or_path or None

    @property
    def runtime(self) -> DollyRuntime:
        """The :class:`~dolly_langchain.runtime.DollyRuntime` (codec, engine, and the scheduler that batches calls),
        loaded on first use for a model built by name."""
        if self.given_runtime is None:
            model_id = None if self.model_id == EMBEDDED_MODEL_LABEL else self.model_id
            runtime = shared_runtime(model_id, engine=self.engine, compute_type=self.compute_type, device=self.device)
            if self.given_runtime is None:  # another thread may have got here first: same runtime either way
                self._use_runtime(runtime, loaded_by_name=True)
        return self.given_runtime

    @property
    def is_embedded(self) -> bool:
        """Whether this is the embedded SmolLM2-135M-Instruct (built with no model, or ``from_model_id()``)."""
        return self.model_id in (None, EMBEDDED_MODEL_LABEL) and (
            self.given_runtime is None or self.model_id == EMBEDDED_MODEL_LABEL
        )

    @property
    def model_name(self) -> str:
        """What the model is called in traces and metadata (``ls_model_name``, ``response_metadata``)."""
        if self.model_id:
            return self.model_id
        if self.given_runtime is None:
            return EMBEDDED_MODEL_LABEL
        return str(getattr(self.given_runtime.engine, "model_dir", None) or self.given_runtime.engine.name)

    @classmethod
    def from_model_id(
        cls,
        model_id: str | None = None,
        *,
        engine: str | None = None,
        compute_type: str = "auto",
        device: str | None = None,
        dtype: Any = None,
        device_map: Any = None,
        quantization_config: Any = None,
        model_kwargs: dict | None = None,
        prompt_format: str | None = None,
        **options: Any,
    ):
        """Load a model by hub id or local directory (``None``: the embedded SmolLM2-135M-Instruct).

        ``engine``: ``"transformers"``, ``"ctranslate2"``, or ``None``/``"auto"``: ctranslate2 int8 for the
        embedded model when the package is installed, transformers otherwise. ``compute_type`` (``"auto"``,
        ``"int8"``, ``"int8_float16"``, ``"float16"``, ``"float32"``...) and ``device`` (``"cpu"``, ``"cuda"``)
        choose how CTranslate2 runs; the model is converted once and cached. ``dtype``, ``device_map`` and
        ``quantization_config`` go to transformers' ``from_pretrained``, ``model_kwargs`` carries any other of
        its arguments. ``options`` are this class's fields (``max_new_tokens``, ``do_sample``, ``temperature``,
        ``top_p``, ``top_k``, ``logprobs``, ``batch_size``).
        """
        unknown = set(options) - set(_LOAD_OPTIONS)
        if unknown:
            raise DollyTypeError(f"{cls.__name__}.from_model_id() got unknown options: {sorted(unknown)}")
        runtime = load_runtime(
            model_id, engine=engine, compute_type=compute_type, device=device, prompt_format=prompt_format,
            dtype=dtype, device_map=device_map, quantization_config=quantization_config, model_kwargs=model_kwargs,
        )
        return cls(runtime=runtime, model_id=model_id or EMBEDDED_MODEL_LABEL, **options)

    # -- what callers may want to see --------------------------------------------------------------------------

    @property
    def pipeline(self):
        """Dolly's :class:`~dolly_langchain.pipeline.InstructionTextGenerationPipeline` over this model's runtime
        (the transformers engine; ``None`` on CTranslate2): the pipeline passed in, or one made on first access.

        A compatibility adapter for code that reaches the transformers model, tokenizer or pipeline through
        ``llm.pipeline``, as Dolly's users did; generation never goes through it, so it is imported only here.
        """
        if self.given_pipeline is None and self.runtime.engine.name == "transformers":
            from dolly_langchain.pipeline import InstructionTextGenerationPipeline

            self.given_pipeline = InstructionTextGenerationPipeline.from_runtime(self.runtime)
        return self.given_pipeline

    @property
    def generation_engine(self):
        """The loaded :class:`~dolly_langchain.engines.base.GenerationEngine` that runs the model (``engine`` is the
        name of its kind)."""
        return self.runtime.engine

    @property
    def codec(self):
        """The :class:`~dolly_langchain.codec.PromptCodec`: prompt format, encoding, response extraction."""
        return self.runtime.codec

    @property
    def tokenizer(self):
        return self.runtime.tokenizer

    @property
    def prompt_format(self) -> str:
        return self.runtime.codec.prompt_format

    @property
    def context_window(self) -> int | None:
        """Most tokens (prompt + response) the model attends over; ``None`` if the model does not say."""
        return self.runtime.context_window

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._params()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        params = super()._get_ls_params(stop=stop, **kwargs)  # BaseLLM's or BaseChatModel's, next in the MRO
        params["ls_provider"] = "dolly_langchain"
        # A per-call model= is refused when the call runs (one loaded model per instance), but traces honour it.
        model = kwargs.get("model")
        params["ls_model_name"] = model if isinstance(model, str) else self.model_name
        options = self._sampling({k: v for k, v in kwargs.items() if k in OPTION_NAMES or k == "max_tokens"})
        params["ls_max_tokens"] = options.max_new_tokens
        params["ls_temperature"] = options.temperature if options.do_sample else 0.0
        if stop or self.stop:
            params["ls_stop"] = self._stops(stop)
        if self.given_runtime is not None:  # describing a model built by name must not load it
            params["ls_prompt_format"] = self.prompt_format
            params["ls_engine"] = self.runtime.engine.name
        return params

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` with the model's own tokenizer.

        LangChain's default downloads the ``gpt2`` tokenizer from the hub (minutes of retries offline). Control
        strings in ``text`` (``### End``, ``<|im_end|>``) count as the plain text the model would read them as.
        ``custom_get_token_ids``, when set, is used instead, as in every LangChain model.
        """
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return self.codec.encode_text(text)

    def _params(self) -> dict[str, Any]:
        return {
            "model_id": self.model_name,
            "prompt_format": self.prompt_format,
            **self.runtime.engine.describe(),
            **{name: getattr(self, name) for name in OPTION_NAMES},
            "stop": self.stop,
        }

    # -- one call's settings -----------------------------------------------------------------------------------

    def _sampling(self, kwargs: dict[str, Any]) -> SamplingOptions:
        """The call's :class:`SamplingOptions`: its keyword arguments over this model's fields."""
        unknown = set(kwargs) - set(OPTION_NAMES) - set(_CALL_EXTRAS)
        if unknown:
            raise DollyTypeError(
                f"{type(self).__name__} got unknown keyword arguments {sorted(unknown)}; known: "
                f"{[*OPTION_NAMES, 'max_tokens', 'timeout', 'response_format']}"
            )
        values = {name: kwargs.get(name, getattr(self, name)) for name in OPTION_NAMES}
        if kwargs.get("max_tokens") is not None:
            values["max_new_tokens"] = kwargs["max_tokens"]
        if kwargs.get("response_format") is not None:
            from dolly_langchain.structured import grammar_of_response_format

            values["grammar"] = grammar_of_response_format(kwargs["response_format"])
        if self.is_embedded:  # the embedded model loops without these (generation.ANSWER_DEFAULTS says how much)
            defaults = STRUCTURED_DEFAULTS if values.get("grammar") is not None else ANSWER_DEFAULTS
            for name, value in defaults.items():
                if values[name] is None:
                    values[name] = value
        return sampling_options(values)

    def _stops(self, stop: Any) -> list[str]:
        """This model's ``stop`` sequences and the call's, checked (a string is one stop sequence)."""
        merged = check_stop(self.stop) + check_stop(stop)
        return list(dict.fromkeys(merged))

    def _timeout(self, kwargs: dict[str, Any]) -> float | None:
        timeout = kwargs.get("timeout", self.timeout)
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise DollyValueError(f"timeout must be a number of seconds above 0, or None; got {timeout!r}")
        return timeout

    def _checked(self, ids: list[int], options: SamplingOptions) -> list[int]:
        # Checked for every prompt before any is generated, so a batch fails before spending time on the others.
        self.runtime.check_window(len(ids), options.max_new_tokens)
        return ids


    def _encode_instruction(self, prompt: str, options: SamplingOptions) -> list[int]:
        """An instruction (``DollyLLM``'s prompt) encoded in the model's format, its window checked."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise DollyValueError("the prompt is empty: give DollyLLM an instruction to answer")
        return self._checked(self.codec.encode_prompt(prompt), options)


class DollyAnswerer(DollyModelFields):
    """``DollyLLM``'s answers without LangChain: the same fields, runtime, encoding and options, through
    ``invoke`` and ``stream`` of one instruction (text in, text out).

    For ``dolly ask``: importing LangChain's ``BaseLLM`` takes half a second on a 2-core CPU, longer than loading
    the embedded model. ``DollyLLM(...).invoke(p) == DollyAnswerer(...).invoke(p)`` for the same settings (no
    callbacks, no tracing; ``stop``/``timeout`` as the fields say).
    """

    def invoke(self, prompt: str, **kwargs: Any) -> str:
        """The response to ``prompt`` (an instruction, as ``DollyLLM.invoke`` takes it); kwargs override fields."""
        options = self._sampling(kwargs)
        [completion] = self.runtime.generate([self._encode_instruction(prompt, options)], options, self._stops(None),
                                             timeout=self._timeout(kwargs))
        return completion.text

    def stream(self, prompt: str, **kwargs: Any) -> Iterator[str]:
        """The response's text piece by piece, as ``DollyLLM.stream`` yields it."""
        options = self._sampling(kwargs)
        items = self.runtime.stream(self._encode_instruction(prompt, options), options, self._stops(None),
                                    timeout=self._timeout(kwargs))
        for item in items:
            if isinstance(item, str):
                yield item
