"""``DollyLLM``: a LangChain LLM over :class:`~dolly_langchain.pipeline.InstructionTextGenerationPipeline`.

Shaped like a partner package's LLM (compare ``langchain_huggingface.HuggingFacePipeline``)::

    from dolly_langchain.llm import DollyLLM

    llm = DollyLLM.from_model_id()                                  # the embedded SmolLM2-135M-Instruct
    llm = DollyLLM.from_model_id("databricks/dolly-v2-3b", dtype=torch.bfloat16, device_map="auto")
    llm = DollyLLM(pipeline=my_instruction_pipeline)                # bring your own pipeline

    llm.invoke("Name three primary colors.")                       # only the response, never the prompt
    llm.batch([...])                                                # one batched generate per batch_size prompts
    for chunk in llm.stream("Write a haiku.", stop=["\\n\\n"]): ...  # text as it is generated

Where it differs from ``HuggingFacePipeline``: it returns only the response; ``stop`` is honoured in invoke,
batch and stream (generation halts there and the text is cut before it); batching pads on the left with a pad
token set automatically; errors raised while streaming reach the caller; unknown keyword arguments are refused.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.llms import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from dolly_langchain.pipeline import DEFAULT_GENERATION, InstructionTextGenerationPipeline, cut_at_stop

EMBEDDED_MODEL_LABEL = "SmolLM2-135M-Instruct (embedded)"
_OPTION_NAMES = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k")


class DollyLLM(BaseLLM):
    """A Dolly-style instruction-following LLM for LangChain, running a local transformers model."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    pipeline: Any = None
    """The :class:`InstructionTextGenerationPipeline`; its ``.model`` and ``.tokenizer`` are the loaded objects."""
    model_id: str | None = None
    """Hub id or local directory the model came from; ``None`` with ``from_model_id()`` means the embedded model."""
    max_new_tokens: int = DEFAULT_GENERATION["max_new_tokens"]
    """Most tokens generated per response (Dolly's default: 256)."""
    do_sample: bool = DEFAULT_GENERATION["do_sample"]
    """Sample (Dolly's default) or decode greedily (``False``, reproducible)."""
    temperature: float = 1.0
    """Sampling temperature; ignored when ``do_sample`` is False."""
    top_p: float = DEFAULT_GENERATION["top_p"]
    """Nucleus sampling mass (Dolly's default: 0.92); ignored when ``do_sample`` is False."""
    top_k: int = DEFAULT_GENERATION["top_k"]
    """Top-k sampling cut-off, 0 for none (Dolly's default); ignored when ``do_sample`` is False."""
    batch_size: int = Field(default=16, ge=1)
    """Prompts per ``generate`` call in ``batch``/``generate``; 16 keeps a 2-core CPU busy, raise it on a GPU."""

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="after")
    def _check_pipeline(self) -> DollyLLM:
        if not isinstance(self.pipeline, InstructionTextGenerationPipeline):
            raise ValueError(
                "DollyLLM needs pipeline=InstructionTextGenerationPipeline(...) or DollyLLM.from_model_id(...)"
            )
        if self.model_id is None and self.pipeline.model.name_or_path:
            self.model_id = self.pipeline.model.name_or_path
        return self

    @classmethod
    def from_model_id(
        cls,
        model_id: str | None = None,
        *,
        dtype: Any = None,
        device_map: Any = None,
        quantization_config: Any = None,
        model_kwargs: dict | None = None,
        prompt_format: str | None = None,
        **options: Any,
    ) -> DollyLLM:
        """Load a model by hub id or local directory (``None``: the embedded SmolLM2-135M-Instruct).

        ``dtype``, ``device_map`` and ``quantization_config`` go to ``from_pretrained`` the transformers 5 way;
        ``model_kwargs`` carries any other ``from_pretrained`` argument. ``options`` are this class's fields
        (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``, ``top_k``, ``batch_size``).
        """
        from dolly_langchain.models import load_model_and_tokenizer

        unknown = set(options) - set(_OPTION_NAMES) - {"batch_size"}
        if unknown:
            raise TypeError(f"DollyLLM.from_model_id() got unknown options: {sorted(unknown)}")
        load_kwargs = dict(model_kwargs or {})
        for key, value in (("dtype", dtype), ("device_map", device_map), ("quantization_config", quantization_config)):
            if value is not None:
                load_kwargs[key] = value
        model, tokenizer = load_model_and_tokenizer(model_id, **load_kwargs)
        pipeline = InstructionTextGenerationPipeline(model=model, tokenizer=tokenizer, prompt_format=prompt_format)
        return cls(pipeline=pipeline, model_id=model_id or EMBEDDED_MODEL_LABEL, **options)

    # -- LangChain metadata ----------------------------------------------------------------------------------

    @property
    def _llm_type(self) -> str:
        return "dolly"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "prompt_format": self.pipeline.prompt_format,
            **{name: getattr(self, name) for name in _OPTION_NAMES},
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "dolly_langchain"
        params["ls_model_name"] = self.model_id
        params["ls_max_tokens"] = kwargs.get("max_new_tokens", self.max_new_tokens)
        params["ls_prompt_format"] = self.pipeline.prompt_format
        return params

    # -- tokens ----------------------------------------------------------------------------------------------

    @property
    def context_window(self) -> int | None:
        """Most tokens (prompt + response) the model attends over; ``None`` if the model does not say."""
        return self.pipeline.context_window

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` with the model's own tokenizer.

        LangChain's default downloads the ``gpt2`` tokenizer from the hub (minutes of retries offline). Control
        strings in ``text`` (``### End``, ``<|im_end|>``) count as the plain text the model would read them as.
        ``custom_get_token_ids``, when set, is used instead, as in every LangChain model.
        """
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return self.pipeline.tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)[
            "input_ids"
        ]

    def count_prompt_tokens(self, prompt: str) -> int:
        """Tokens the model reads for ``prompt`` once wrapped in its format (Dolly's text or the chat template)."""
        return len(self.pipeline.encode_prompt(prompt))

    # -- generation ------------------------------------------------------------------------------------------

    def _options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        unknown = set(kwargs) - set(_OPTION_NAMES)
        if unknown:
            raise TypeError(f"DollyLLM got unknown keyword arguments {sorted(unknown)}; known: {list(_OPTION_NAMES)}")
        return {name: kwargs.get(name, getattr(self, name)) for name in _OPTION_NAMES}

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        options = self._options(kwargs)
        for prompt in prompts:
            self._check_prompt(prompt, options["max_new_tokens"])
        # Longest first, so each batch holds prompts of similar length and pads little; results go back in order.
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        with self._lock:
            outputs = self.pipeline(
                [prompts[i] for i in order], batch_size=self.batch_size, stop_sequences=stop, **options
            )
        texts = [""] * len(prompts)
        for position, output in zip(order, outputs):
            texts[position] = output[0]["generated_text"]
        return LLMResult(generations=[[Generation(text=text)] for text in texts])

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        options = self._options(kwargs)
        self._check_prompt(prompt, options["max_new_tokens"])
        pipe = self.pipeline
        inputs = pipe.preprocess(prompt)
        streamer = TextIteratorStreamer(pipe.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancelled = threading.Event()

        class _Cancel(StoppingCriteria):
            # Lets an abandoned stream stop the generation thread instead of running to max_new_tokens.
            def __call__(self, input_ids, scores, **_):
                return cancelled.is_set()

        generate_kwargs = pipe.generate_kwargs(stop_sequences=stop, **options)
        generate_kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancel()])
        errors: list[BaseException] = []

        def run() -> None:
            try:
                pipe.model.generate(
                    input_ids=inputs["input_ids"].to(pipe.device),
                    attention_mask=inputs["attention_mask"].to(pipe.device),
                    streamer=streamer,
                    **generate_kwargs,
                )
            except BaseException as err:  # re-raised in the caller's thread below
                errors.append(err)
                streamer.end()

        text = StreamingResponse(pipe.stop_strings(stop))
        with self._lock:
            thread = threading.Thread(target=run, name="dolly-generate", daemon=True)
            thread.start()
            try:
                for piece in streamer:
                    out = text.feed(piece)
                    if out:
                        yield self._chunk(out, run_manager)
                    if text.stopped:
                        cancelled.set()
                        break
                tail = text.finish()
                thread.join()
                if errors:
                    raise errors[0]
                if tail:
                    yield self._chunk(tail, run_manager)
            finally:
                cancelled.set()
                thread.join()

    def _check_prompt(self, prompt: str, max_new_tokens: int) -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty: give DollyLLM an instruction to answer")
        # Checked for every prompt before any is generated, so a batch fails before spending time on the others.
        self.pipeline.check_window(self.count_prompt_tokens(prompt), max_new_tokens)

    @staticmethod
    def _chunk(text: str, run_manager: CallbackManagerForLLMRun | None) -> GenerationChunk:
        chunk = GenerationChunk(text=text)
        if run_manager:
            run_manager.on_llm_new_token(text, chunk=chunk)
        return chunk


class StreamingResponse:
    """Turns generated text pieces into the chunks of ``cut_at_stop(text, stops).strip()``.

    Whatever it emits, joined, equals that final text: leading whitespace is dropped, trailing whitespace and
    any tail that could be the start of a stop string are held back until more text shows what they are.
    """

    def __init__(self, stop_strings: list[str]):
        self.stop_strings = stop_strings
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        self.text += piece
        body = self.text.lstrip()
        cut = cut_at_stop(body, self.stop_strings)
        if len(cut) < len(body):
            self.stopped = True
            return self._emit(cut.rstrip())
        safe = len(body) - max((_overlap(body, s) for s in self.stop_strings), default=0)
        return self._emit(body[:safe].rstrip())

    def finish(self) -> str:
        return self._emit(cut_at_stop(self.text.lstrip(), self.stop_strings).rstrip())

    def _emit(self, ready: str) -> str:
        if len(ready) <= self.emitted:
            return ""
        out, self.emitted = ready[self.emitted :], len(ready)
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0

