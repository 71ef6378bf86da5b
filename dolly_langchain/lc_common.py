"""Fields and loading shared by the LangChain classes ``DollyLLM`` and ``ChatDolly``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dolly_langchain.errors import DollyTypeError, DollyValueError
from dolly_langchain.generation import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_GENERATION,
    EMBEDDED_MODEL_LABEL,
    OPTION_NAMES,
    SamplingOptions,
    sampling_options,
)
from dolly_langchain.runtime import DollyRuntime, load_runtime

_LOAD_OPTIONS = (*OPTION_NAMES, "batch_size")


class DollyModelFields(BaseModel):
    """Generation options and the runtime (engine + codec + batching) of a Dolly LangChain model."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    given_pipeline: Any = Field(default=None, alias="pipeline", exclude=True)
    """``pipeline=``: bring your own :class:`~dolly_langchain.pipeline.InstructionTextGenerationPipeline`; its
    runtime is used (and shared). Read it back as :attr:`pipeline`."""
    runtime: Any = Field(default=None, exclude=True)
    """The :class:`~dolly_langchain.runtime.DollyRuntime`: codec, engine and the scheduler that batches calls."""
    model_id: str | None = None
    """Hub id or local directory the model came from."""
    max_new_tokens: int = DEFAULT_GENERATION["max_new_tokens"]
    """Most tokens generated per response (Dolly's default: 256)."""
    do_sample: bool = DEFAULT_GENERATION["do_sample"]
    """Sample (Dolly's default) or decode greedily (``False``, reproducible)."""
    temperature: float = Field(default=1.0, allow_inf_nan=False)
    """Sampling temperature; ignored when ``do_sample`` is False."""
    top_p: float = Field(default=DEFAULT_GENERATION["top_p"], allow_inf_nan=False)
    """Nucleus sampling mass (Dolly's default: 0.92); ignored when ``do_sample`` is False."""
    top_k: int = DEFAULT_GENERATION["top_k"]
    """Top-k sampling cut-off, 0 for none (Dolly's default); ignored when ``do_sample`` is False."""
    logprobs: bool = False
    """Report the log-probability of each generated token (``generation_info`` / ``response_metadata``)."""
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1)
    """Most prompts per engine batch. Prompts of one ``batch`` call and calls made at the same time from other
    threads or tasks share batches up to this size; 16 keeps a 2-core CPU busy, raise it on a GPU."""

    @model_validator(mode="after")
    def _attach_runtime(self):
        if self.runtime is None:
            if self.given_pipeline is None:
                raise DollyValueError(
                    f"{type(self).__name__} needs pipeline=InstructionTextGenerationPipeline(...), runtime=..., or "
                    f"{type(self).__name__}.from_model_id(...)"
                )
            try:
                self.runtime = self.given_pipeline.runtime
            except AttributeError:
                raise DollyValueError("pipeline= must be a dolly_langchain.pipeline.InstructionTextGenerationPipeline"
                                      ) from None
        if not isinstance(self.runtime, DollyRuntime):
            raise DollyValueError("runtime must be a dolly_langchain.runtime.DollyRuntime")
        self.runtime.scheduler.batch_size = self.batch_size
        if self.model_id is None and self.runtime.engine.name == "transformers":
            self.model_id = self.runtime.engine.model.name_or_path or None
        return self

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
    def engine(self):
        """The :class:`~dolly_langchain.engines.base.GenerationEngine` that runs the model."""
        return self.runtime.engine

    @property
    def codec(self):
        """The :class:`~dolly_langchain.codec.PromptCodec`: prompt format, encoding, response extraction."""
        return self.runtime.codec

    @property
    def tokenizer(self):
        return self.runtime.codec.tokenizer

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
        params["ls_model_name"] = self.model_id
        params["ls_max_tokens"] = kwargs.get("max_new_tokens", self.max_new_tokens)
        params["ls_prompt_format"] = self.prompt_format
        params["ls_engine"] = self.engine.name
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
            "model_id": self.model_id,
            "prompt_format": self.prompt_format,
            **self.engine.describe(),
            **{name: getattr(self, name) for name in OPTION_NAMES},
        }

    def _sampling(self, kwargs: dict[str, Any]) -> SamplingOptions:
        unknown = set(kwargs) - set(OPTION_NAMES)
        if unknown:
            raise DollyTypeError(
                f"{type(self).__name__} got unknown keyword arguments {sorted(unknown)}; known: {list(OPTION_NAMES)}"
            )
        return sampling_options({name: kwargs.get(name, getattr(self, name)) for name in OPTION_NAMES})

    def _checked(self, ids: list[int], options: SamplingOptions) -> list[int]:
        # Checked for every prompt before any is generated, so a batch fails before spending time on the others.
        self.runtime.check_window(len(ids), options.max_new_tokens)
        return ids
