"""Dolly's ``InstructionTextGenerationPipeline``, rebuilt for transformers 5.

Drop-in for the ``instruct_pipeline.py`` that Dolly's hub repos load as remote code (which raises
AttributeError on transformers 5)::

    from dolly_langchain.pipeline import InstructionTextGenerationPipeline, load_model_tokenizer_for_generate

    model, tokenizer = load_model_tokenizer_for_generate("databricks/dolly-v2-3b")
    generate_text = InstructionTextGenerationPipeline(model=model, tokenizer=tokenizer)
    generate_text("Explain to me the difference between nuclear fission and fusion.")
    # [{'generated_text': '...'}]

What it adds over Dolly's original: real batching (left padding, a pad token set when the tokenizer has none),
``stop_sequences``, models without Dolly's special tokens, chat-template models such as the embedded
SmolLM2-135M-Instruct, and user text that can never become a control token.

The prompt format is chosen from the tokenizer (override with ``prompt_format=``; see
:func:`~dolly_langchain.codec.detect_prompt_format`): ``"dolly"`` (Dolly's special tokens), ``"chat"`` (a chat
template) or ``"dolly-text"``.

This is a thin adapter, as langchain-huggingface's ``HuggingFacePipeline`` is over a transformers pipeline: the
work is done by a :class:`~dolly_langchain.runtime.DollyRuntime` (``pipeline.runtime``: the
:class:`~dolly_langchain.codec.PromptCodec` that builds prompts and extracts responses, and a
:class:`~dolly_langchain.engines.transformers_engine.TransformersEngine` behind the batching scheduler), the same
runtime ``DollyLLM`` and ``ChatDolly`` use. ``DollyLLM(pipeline=p)`` shares ``p.runtime`` and so its batches. Nothing
in the library's own generation path imports this module.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Pipeline

from dolly_langchain.codec import PROMPT_FORMATS, cut_at_stop, detect_prompt_format
from dolly_langchain.errors import DollyValueError
from dolly_langchain.generation import (  # noqa: F401  (check_window: importable from here as before)
    DEFAULT_GENERATION,
    OPTION_NAMES,
    check_window,
    sampling_options,
)
from dolly_langchain.runtime import DollyRuntime

__all__ = [
    "DEFAULT_GENERATION",
    "PROMPT_FORMATS",
    "InstructionTextGenerationPipeline",
    "cut_at_stop",
    "detect_prompt_format",
    "generate_response",
    "load_model_tokenizer_for_generate",
]



class InstructionTextGenerationPipeline(Pipeline):
    """Generate a response to an instruction in the format the model was trained on.

    Call it with an instruction string, a ``{"instruction": ..., "context": ...}`` dict, or a list of either;
    each input gives ``[{"generated_text": response}]``. ``return_full_text=True`` gives Dolly's
    ``"{instruction}\\n{response}"``. Generation options (``max_new_tokens``, ``do_sample``, ``temperature``,
    ``top_p``, ``top_k``, ... any ``generate`` argument) may be set at construction or per call;
    ``stop_sequences=[...]`` ends generation at the first of those strings and cuts it from the response.

    ``runtime=`` (or :meth:`from_runtime`) wraps an existing :class:`~dolly_langchain.runtime.DollyRuntime` on the
    transformers engine instead of building one for ``model`` and ``tokenizer``.
    """

    def __init__(
        self,
        *args: Any,
        do_sample: bool = DEFAULT_GENERATION["do_sample"],
        max_new_tokens: int = DEFAULT_GENERATION["max_new_tokens"],
        top_p: float = DEFAULT_GENERATION["top_p"],
        top_k: int = DEFAULT_GENERATION["top_k"],
        prompt_format: str | None = None,
        runtime: DollyRuntime | None = None,
        task: str = "text-generation",
        **kwargs: Any,
    ):
        super().__init__(
            *args, do_sample=do_sample, max_new_tokens=max_new_tokens, top_p=top_p, top_k=top_k, task=task, **kwargs
        )
        if self.tokenizer is None:
            raise DollyValueError("InstructionTextGenerationPipeline needs a tokenizer: pass tokenizer=...")
        if runtime is None:
            runtime = DollyRuntime.for_transformers(self.model, self.tokenizer, prompt_format)
        elif runtime.engine.name != "transformers" or runtime.engine.model is not self.model:
            raise DollyValueError("runtime= must be the transformers-engine runtime of this pipeline's model")
        self.runtime = runtime

    @classmethod
    def from_runtime(cls, runtime: DollyRuntime, **kwargs: Any) -> InstructionTextGenerationPipeline:
        """The pipeline over a loaded transformers-engine runtime (sharing its model, codec and batches)."""
        if runtime.engine.name != "transformers":
            raise DollyValueError(f"InstructionTextGenerationPipeline runs on the transformers engine, not "
                             f"{runtime.engine.name!r}")
        return cls(model=runtime.engine.model, tokenizer=runtime.tokenizer, runtime=runtime, **kwargs)

    # -- what the runtime knows, under the names this pipeline has always had ----------------------------------

    @property
    def codec(self):
        """The :class:`~dolly_langchain.codec.PromptCodec`: prompt format, encoding, response extraction."""
        return self.runtime.codec

    @property
    def engine(self):
        """The :class:`~dolly_langchain.engines.transformers_engine.TransformersEngine` that runs the model."""
        return self.runtime.engine

    @property
    def prompt_format(self) -> str:
        return self.codec.prompt_format

    @property
    def stop_token_ids(self) -> list[int]:
        return self.codec.stop_token_ids

    @property
    def context_window(self) -> int | None:
        """Most tokens (prompt + generated) the model attends over (see ``DollyRuntime.context_window``)."""
        return self.runtime.context_window

    def check_window(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise a ``ValueError`` naming both numbers when prompt + ``max_new_tokens`` exceed the window."""
        self.runtime.check_window(prompt_tokens, max_new_tokens)

    def prompt_segments(self, instruction: str, context: str | None = None) -> list[tuple[str, bool]]:
        return self.codec.prompt_segments(instruction, context)

    def prompt_text(self, instruction: str, context: str | None = None) -> str:
        return self.codec.prompt_text(instruction, context)

    def encode_prompt(self, instruction: str, context: str | None = None) -> list[int]:
        return self.codec.encode_prompt(instruction, context)

    def stop_strings(self, stop_sequences=None) -> list[str]:
        return self.codec.stop_strings(stop_sequences)

    def decode_response(self, new_ids, stop_sequences=None) -> str:
        return self.codec.decode_response(new_ids, stop_sequences)

    def generate_kwargs(self, stop_sequences=None, **options: Any) -> dict:
        """``model.generate`` arguments for these options (stop tokens, pad token, stop strings, sampling), for
        calling ``self.model.generate`` directly; the pipeline itself generates through ``self.engine``."""
        kwargs = {**self._forward_params, **options}
        stop_sequences = kwargs.pop("stop_sequences", None) if stop_sequences is None else stop_sequences
        if not kwargs.get("do_sample", False):
            for key in ("temperature", "top_p", "top_k"):
                kwargs.pop(key, None)
        stop_strings = self.stop_strings(stop_sequences)
        if stop_strings:
            kwargs.update(stop_strings=stop_strings, tokenizer=self.tokenizer)
        kwargs.setdefault("eos_token_id", self.stop_token_ids)
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        return kwargs

    # -- transformers Pipeline protocol ------------------------------------------------------------------------

    def _sanitize_parameters(self, return_full_text: bool | None = None, stop_sequences=None, **generate_kwargs):
        postprocess_params = {}
        if return_full_text is not None:
            postprocess_params["return_full_text"] = return_full_text
        if stop_sequences:
            generate_kwargs["stop_sequences"] = list(stop_sequences)
            postprocess_params["stop_sequences"] = list(stop_sequences)
        return {}, generate_kwargs, postprocess_params

    def preprocess(self, inputs, **_: Any) -> dict:
        instruction, context = _split_input(inputs)
        ids = self.encode_prompt(instruction, context)
        input_ids = torch.tensor([ids], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "instruction_text": instruction}

    def _forward(self, model_inputs: dict, **generate_kwargs: Any) -> dict:
        kwargs = {**self._forward_params, **generate_kwargs}
        stops = kwargs.pop("stop_sequences", None)
        options = sampling_options(kwargs)
        extra = {k: v for k, v in kwargs.items() if k not in OPTION_NAMES}
        # The Pipeline machinery may have padded a batch: hand the runtime each row's own ids.
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(model_inputs["input_ids"], model_inputs["attention_mask"])]
        for ids in prompts:
            self.check_window(len(ids), options.max_new_tokens)
        if extra:
            # Other generate() arguments (num_beams, ...) have no place in the scheduler's shared batches,
            # which group calls by SamplingOptions alone: such a call runs the engine directly, as Dolly's did.
            watchers = [self.codec.watcher(stops, stop_loops=options.stop_loops) for _ in prompts]
            generated = [o.token_ids for o in self.engine.generate(
                prompts, options, self.stop_token_ids, lambda row, token, _: watchers[row].push(token)[1], **extra
            )]
        else:
            generated = [c.token_ids for c in self.runtime.generate(prompts, options, stops)]
        # One tensor row per prompt (the Pipeline machinery splits batches by tensor rows), padded with a stop id.
        width = max(1, max(len(ids) for ids in generated))
        fill = self.stop_token_ids[0] if self.stop_token_ids else self.tokenizer.pad_token_id
        rows = torch.tensor([ids + [fill] * (width - len(ids)) for ids in generated])
        return {"generated_ids": rows, "instruction_text": model_inputs["instruction_text"]}

    def postprocess(self, model_outputs: dict, return_full_text: bool = False, stop_sequences=None) -> list[dict]:
        response = self.decode_response(model_outputs["generated_ids"][0], stop_sequences)
        if return_full_text:
            response = f"{model_outputs['instruction_text']}\n{response}"
        return [{"generated_text": response}]


def _split_input(inputs) -> tuple[str, str | None]:
    if isinstance(inputs, str):
        return inputs, None
    if isinstance(inputs, dict) and "instruction" in inputs and set(inputs) <= {"instruction", "context"}:
        return inputs["instruction"], inputs.get("context") or None
    raise DollyValueError(
        f"expected an instruction string or a dict with keys 'instruction' and optional 'context', got {inputs!r}"
    )


def load_model_tokenizer_for_generate(pretrained_model_name_or_path: str | None = None, **model_kwargs: Any):
    """Load a model and tokenizer ready for generation, as Dolly's ``training/generate.py`` did.

    ``None`` loads the embedded SmolLM2-135M-Instruct. ``model_kwargs`` go to ``from_pretrained`` (``dtype``,
    ``device_map``, ``quantization_config``); remote code is never trusted. The tokenizer pads on the left.
    """
    from dolly_langchain.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(pretrained_model_name_or_path, **model_kwargs)
    tokenizer.padding_side = "left"
    return model, tokenizer


def generate_response(instruction: str, *, model, tokenizer, context: str | None = None, **kwargs: Any) -> str:
    """Answer one instruction (Dolly's ``generate_response``); ``kwargs`` are pipeline/generation options."""
    generation_pipeline = InstructionTextGenerationPipeline(model=model, tokenizer=tokenizer, **kwargs)
    inputs = {"instruction": instruction, "context": context} if context else instruction
    return generation_pipeline(inputs)[0]["generated_text"]
