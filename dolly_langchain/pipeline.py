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
template) or ``"dolly-text"``. Prompt building and response extraction live in
:class:`~dolly_langchain.codec.PromptCodec` (``pipeline.codec``) and generation in a
:class:`~dolly_langchain.engines.transformers_engine.TransformersEngine` (``pipeline.engine``), the same pieces
``DollyLLM`` uses with either engine.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Pipeline

from dolly_langchain.codec import PROMPT_FORMATS, PromptCodec, cut_at_stop, detect_prompt_format
from dolly_langchain.engines.base import SamplingOptions
from dolly_langchain.engines.transformers_engine import TransformersEngine

__all__ = [
    "DEFAULT_GENERATION",
    "PROMPT_FORMATS",
    "InstructionTextGenerationPipeline",
    "cut_at_stop",
    "detect_prompt_format",
    "generate_response",
    "load_model_tokenizer_for_generate",
]

# Dolly's sampling defaults (instruct_pipeline.py in databricks/dolly).
DEFAULT_GENERATION = {"do_sample": True, "max_new_tokens": 256, "top_p": 0.92, "top_k": 0}

# Options SamplingOptions carries; any other generate() argument goes to model.generate as is.
_SAMPLING_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k")


class InstructionTextGenerationPipeline(Pipeline):
    """Generate a response to an instruction in the format the model was trained on.

    Call it with an instruction string, a ``{"instruction": ..., "context": ...}`` dict, or a list of either;
    each input gives ``[{"generated_text": response}]``. ``return_full_text=True`` gives Dolly's
    ``"{instruction}\\n{response}"``. Generation options (``max_new_tokens``, ``do_sample``, ``temperature``,
    ``top_p``, ``top_k``, ... any ``generate`` argument) may be set at construction or per call;
    ``stop_sequences=[...]`` ends generation at the first of those strings and cuts it from the response.
    """

    def __init__(
        self,
        *args: Any,
        do_sample: bool = DEFAULT_GENERATION["do_sample"],
        max_new_tokens: int = DEFAULT_GENERATION["max_new_tokens"],
        top_p: float = DEFAULT_GENERATION["top_p"],
        top_k: int = DEFAULT_GENERATION["top_k"],
        prompt_format: str | None = None,
        task: str = "text-generation",
        **kwargs: Any,
    ):
        super().__init__(
            *args, do_sample=do_sample, max_new_tokens=max_new_tokens, top_p=top_p, top_k=top_k, task=task, **kwargs
        )
        if self.tokenizer is None:
            raise ValueError("InstructionTextGenerationPipeline needs a tokenizer: pass tokenizer=...")
        self.codec = PromptCodec(
            self.tokenizer, prompt_format, model_dir=self.model.name_or_path,
            eos_token_ids=self.model.generation_config.eos_token_id,
        )
        fallback = self.tokenizer.model_max_length if self.tokenizer.model_max_length < 1_000_000 else None
        self.engine = TransformersEngine(self.model, self.tokenizer.pad_token_id, fallback_window=fallback)

    # -- what the codec knows, under the names this pipeline has always had ------------------------------------

    @property
    def prompt_format(self) -> str:
        return self.codec.prompt_format

    @property
    def stop_token_ids(self) -> list[int]:
        return self.codec.stop_token_ids

    @property
    def context_window(self) -> int | None:
        """Most tokens (prompt + generated) the model attends over: its ``max_position_embeddings``.

        Falls back to the tokenizer's ``model_max_length`` when the config has no such field; ``None`` when
        neither is known (tokenizers without a limit report a huge sentinel, which is ignored).
        """
        return self.engine.context_window

    def check_window(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise a ``ValueError`` naming both numbers when prompt + ``max_new_tokens`` exceed the window."""
        check_window(self.context_window, prompt_tokens, max_new_tokens)

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
        extra = {k: v for k, v in kwargs.items() if k not in _SAMPLING_FIELDS}
        # The Pipeline machinery may have padded a batch: hand the engine each row's own ids.
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(model_inputs["input_ids"], model_inputs["attention_mask"])]
        for ids in prompts:
            self.check_window(len(ids), options.max_new_tokens)
        watchers = [self.codec.watcher(stops) for _ in prompts]
        outputs = self.engine.generate(
            prompts, options, self.stop_token_ids, lambda row, token, _: watchers[row].push(token)[1], **extra
        )
        # One tensor row per prompt (the Pipeline machinery splits batches by tensor rows), padded with a stop id.
        width = max(1, max(len(o.token_ids) for o in outputs))
        fill = self.stop_token_ids[0] if self.stop_token_ids else self.tokenizer.pad_token_id
        generated = torch.tensor([o.token_ids + [fill] * (width - len(o.token_ids)) for o in outputs])
        return {"generated_ids": generated, "instruction_text": model_inputs["instruction_text"]}

    def postprocess(self, model_outputs: dict, return_full_text: bool = False, stop_sequences=None) -> list[dict]:
        response = self.decode_response(model_outputs["generated_ids"][0], stop_sequences)
        if return_full_text:
            response = f"{model_outputs['instruction_text']}\n{response}"
        return [{"generated_text": response}]


def sampling_options(options: dict[str, Any], *, logprobs: bool = False) -> SamplingOptions:
    """:class:`SamplingOptions` from generate-style keyword arguments (Dolly's defaults for those missing)."""
    do_sample = bool(options.get("do_sample", DEFAULT_GENERATION["do_sample"]))
    return SamplingOptions(
        max_new_tokens=int(options.get("max_new_tokens") or DEFAULT_GENERATION["max_new_tokens"]),
        do_sample=do_sample,
        temperature=float(options.get("temperature") or 1.0) if do_sample else 1.0,
        top_p=float(options.get("top_p") or 1.0) if do_sample else 1.0,
        top_k=int(options.get("top_k") or 0) if do_sample else 0,
        logprobs=logprobs,
    )


def check_window(window: int | None, prompt_tokens: int, max_new_tokens: int | None) -> None:
    """Raise a ``ValueError`` naming both numbers when prompt + ``max_new_tokens`` exceed ``window``.

    transformers only warns and then generates from positions the model never saw in training (or fails
    with a tensor size mismatch, as Dolly's users saw with RetrievalQA); refusing up front is clearer.
    """
    max_new_tokens = max_new_tokens or 0
    if window is not None and prompt_tokens + max_new_tokens > window:
        raise ValueError(
            f"the prompt is {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}: "
            f"{prompt_tokens + max_new_tokens} tokens do not fit the model's window of {window}. "
            "Shorten the context (or retrieve fewer passages), or lower max_new_tokens."
        )


def _split_input(inputs) -> tuple[str, str | None]:
    if isinstance(inputs, str):
        return inputs, None
    if isinstance(inputs, dict) and "instruction" in inputs and set(inputs) <= {"instruction", "context"}:
        return inputs["instruction"], inputs.get("context") or None
    raise ValueError(
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
