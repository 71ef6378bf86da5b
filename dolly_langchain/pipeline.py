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

The prompt format is chosen from the tokenizer (override with ``prompt_format=``):

- ``"dolly"``: the tokenizer has Dolly's special tokens (``### End`` ...): :func:`~dolly_langchain.prompts.format_prompt`,
  generation stops at the ``### End`` token id and the response is cut by token ids.
- ``"chat"``: no Dolly tokens but a chat template (and no Dolly format record beside the checkpoint): the
  instruction is the user message; generation stops at the template's end-of-turn token.
- ``"dolly-text"``: anything else: ``format_prompt`` text, generation stops at the *text* ``### End``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import Pipeline

from dolly_langchain.prompts import (
    DOLLY_SPECIAL_TOKENS,
    END_KEY,
    INSTRUCTION_WITH_CONTEXT_PROMPT,
    prompt_segments,
    read_format_record,
)

PROMPT_FORMATS = ("dolly", "chat", "dolly-text")

# Dolly's sampling defaults (instruct_pipeline.py in databricks/dolly).
DEFAULT_GENERATION = {"do_sample": True, "max_new_tokens": 256, "top_p": 0.92, "top_k": 0}

# Options that only make sense when sampling; passing them with do_sample=False makes transformers warn.
_SAMPLING_ONLY = ("temperature", "top_p", "top_k")

# Stands in for the user message while a chat template is rendered, so the template's own text can be told
# apart from user text (a private-use code point no tokenizer template alters).
_USER_SENTINEL = "\ue000dolly-user-text\ue000"


def detect_prompt_format(tokenizer, model_dir: str | None = None) -> str:
    """Pick ``"dolly"``, ``"chat"`` or ``"dolly-text"`` for a tokenizer (see the module docstring)."""
    added = tokenizer.get_added_vocab()
    if all(token in added for token in DOLLY_SPECIAL_TOKENS):
        return "dolly"
    record = read_format_record(model_dir) if model_dir else None
    if record is None and tokenizer.chat_template:
        return "chat"
    return "dolly-text"


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
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise ValueError("InstructionTextGenerationPipeline needs a tokenizer: pass tokenizer=...")
        # Batched generation with a decoder-only model needs left padding and a pad token; Pythia has none.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.prompt_format = prompt_format or detect_prompt_format(tokenizer, self.model.name_or_path)
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        self._control_ids = {
            token.content: token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special
        }
        self._control_pattern = re.compile(
            "|".join(re.escape(t) for t in sorted(self._control_ids, key=len, reverse=True)) or r"(?!)"
        )
        self._bos_ids = _leading_special_ids(tokenizer) if self.prompt_format != "chat" else []
        self.stop_token_ids = self._find_stop_token_ids()

    @property
    def context_window(self) -> int | None:
        """Most tokens (prompt + generated) the model attends over: its ``max_position_embeddings``.

        Falls back to the tokenizer's ``model_max_length`` when the config has no such field; ``None`` when
        neither is known (tokenizers without a limit report a huge sentinel, which is ignored).
        """
        config = self.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config  # multimodal configs
        window = getattr(config, "max_position_embeddings", None)
        if window is None and self.tokenizer.model_max_length < 1_000_000:
            window = self.tokenizer.model_max_length
        return window

    def check_window(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise a ``ValueError`` naming both numbers when prompt + ``max_new_tokens`` exceed the window.

        transformers only warns and then generates from positions the model never saw in training (or fails
        with a tensor size mismatch, as Dolly's users saw with RetrievalQA); refusing up front is clearer.
        """
        window = self.context_window
        max_new_tokens = max_new_tokens or 0
        if window is not None and prompt_tokens + max_new_tokens > window:
            raise ValueError(
                f"the prompt is {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}: "
                f"{prompt_tokens + max_new_tokens} tokens do not fit the model's window of {window}. "
                "Shorten the context (or retrieve fewer passages), or lower max_new_tokens."
            )

    # -- prompt building -------------------------------------------------------------------------------------

    def prompt_segments(self, instruction: str, context: str | None = None) -> list[tuple[str, bool]]:
        """The model-format prompt as ``(text, is_user_text)`` pieces; their texts joined are the prompt."""
        if self.prompt_format != "chat":
            return prompt_segments(instruction, context)
        user = INSTRUCTION_WITH_CONTEXT_PROMPT.format(instruction=instruction, context=context) if context else instruction
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": _USER_SENTINEL}], tokenize=False, add_generation_prompt=True
        )
        if rendered.count(_USER_SENTINEL) != 1:
            raise ValueError("the tokenizer's chat template does not place the user message verbatim; "
                             "pass prompt_format='dolly-text'")
        before, after = rendered.split(_USER_SENTINEL)
        return [(before, False), (user, True), (after, False)]

    def prompt_text(self, instruction: str, context: str | None = None) -> str:
        """The exact text the model sees for this instruction."""
        return "".join(text for text, _ in self.prompt_segments(instruction, context))

    def encode_prompt(self, instruction: str, context: str | None = None) -> list[int]:
        """Token ids of the prompt. Control tokens come only from the template, never from user text.

        Text between the template's control tokens is encoded with ``split_special_tokens=True``, so a user who
        writes ``### End`` or ``<|im_end|>`` gets those characters as plain text. For text without such strings
        the ids equal tokenizing the whole prompt at once (what training saw): HF tokenizers split at added
        tokens before any other step.
        """
        ids = list(self._bos_ids)
        pending = ""
        for text, is_user in self.prompt_segments(instruction, context):
            if is_user:
                pending += text
                continue
            start = 0
            for match in self._control_pattern.finditer(text):
                pending += text[start : match.start()]
                ids += self._encode_plain(pending)
                pending = ""
                ids.append(self._control_ids[match.group()])
                start = match.end()
            pending += text[start:]
        return ids + self._encode_plain(pending)

    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        # verbose=False: no "sequence length is longer than the maximum" warning; check_window refuses those.
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]

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
        input_ids = model_inputs["input_ids"]
        kwargs = self.generate_kwargs(**generate_kwargs)
        self.check_window(input_ids.shape[1], kwargs.get("max_new_tokens"))
        generated = self.model.generate(input_ids=input_ids, attention_mask=model_inputs["attention_mask"], **kwargs)
        return {"generated_ids": generated[:, input_ids.shape[1] :], "instruction_text": model_inputs["instruction_text"]}

    def postprocess(self, model_outputs: dict, return_full_text: bool = False, stop_sequences=None) -> list[dict]:
        response = self.decode_response(model_outputs["generated_ids"][0], stop_sequences)
        if return_full_text:
            response = f"{model_outputs['instruction_text']}\n{response}"
        return [{"generated_text": response}]

    # -- generation helpers shared with DollyLLM's streaming ---------------------------------------------------

    def generate_kwargs(self, stop_sequences=None, **options: Any) -> dict:
        """``model.generate`` arguments for these options: stop tokens, pad token, stop strings, sampling."""
        kwargs = {**self._forward_params, **options}
        stop_sequences = kwargs.pop("stop_sequences", None) if stop_sequences is None else stop_sequences
        if not kwargs.get("do_sample", False):
            for key in _SAMPLING_ONLY:
                kwargs.pop(key, None)
        stop_strings = self.stop_strings(stop_sequences)
        if stop_strings:
            kwargs.update(stop_strings=stop_strings, tokenizer=self.tokenizer)
        kwargs.setdefault("eos_token_id", self.stop_token_ids)
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        return kwargs

    def stop_strings(self, stop_sequences=None) -> list[str]:
        """Strings at which text must end: ``### End`` for ``dolly-text``, plus the caller's stop sequences."""
        strings = [END_KEY] if self.prompt_format == "dolly-text" else []
        return strings + [s for s in (stop_sequences or []) if s]

    def decode_response(self, new_ids, stop_sequences=None) -> str:
        """Turn generated ids into the response: cut at the first stop token, decode, cut at stop strings."""
        ids = new_ids.tolist() if isinstance(new_ids, torch.Tensor) else list(new_ids)
        stops = set(self.stop_token_ids)
        end = next((i for i, token in enumerate(ids) if token in stops), len(ids))
        text = self.tokenizer.decode(ids[:end], skip_special_tokens=True)
        return cut_at_stop(text, self.stop_strings(stop_sequences)).strip()

    def _find_stop_token_ids(self) -> list[int]:
        ids = []
        if self.prompt_format == "dolly":
            ids.append(self.tokenizer.convert_tokens_to_ids(END_KEY))
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            ids += source if isinstance(source, list) else [source] if source is not None else []
        return list(dict.fromkeys(ids))


def cut_at_stop(text: str, stop_strings) -> str:
    """Cut ``text`` before the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in stop_strings:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


def _split_input(inputs) -> tuple[str, str | None]:
    if isinstance(inputs, str):
        return inputs, None
    if isinstance(inputs, dict) and "instruction" in inputs and set(inputs) <= {"instruction", "context"}:
        return inputs["instruction"], inputs.get("context") or None
    raise ValueError(
        f"expected an instruction string or a dict with keys 'instruction' and optional 'context', got {inputs!r}"
    )


def _leading_special_ids(tokenizer) -> list[int]:
    """Ids the tokenizer puts before any text (a BOS for Llama-style tokenizers, nothing for GPT-NeoX)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            return with_special[:start]
    return []


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
