"""The ``transformers`` engine: ``model.generate`` on any model transformers loads (GPUs, quantization, device_map)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria

from dolly_langchain.engines.base import EngineOutput, GenerationEngine, RowTracker, TokenCallback
from dolly_langchain.generation import SamplingOptions


class TransformersEngine(GenerationEngine):
    """Runs a transformers causal LM. Prompts are left-padded into one batch with ``pad_token_id``.

    Per-row stopping and streaming use a ``StoppingCriteria`` that sees each step's new tokens (transformers 5
    criteria return one flag per row), so stop strings and cancelled calls end their row without ending the batch.
    ``extra`` keyword arguments of :meth:`generate` go to ``model.generate`` unchanged (``repetition_penalty``...).
    """

    name = "transformers"
    supports_grammar = True

    def __init__(self, model, pad_token_id: int):
        self.model = model
        self.pad_token_id = pad_token_id

    @property
    def logits_width(self) -> int | None:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def device(self) -> str:
        return str(self.model.device)

    @property
    def context_window(self) -> int | None:
        config = self.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config  # multimodal configs
        return getattr(config, "max_position_embeddings", None)  # DollyRuntime falls back to the tokenizer's limit

    def describe(self) -> dict:
        return {**super().describe(), "dtype": str(self.model.dtype).replace("torch.", "")}

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        options: SamplingOptions,
        stop_token_ids: Sequence[int],
        on_token: TokenCallback | None = None,
        constraints: Sequence[Any] | None = None,
        **extra: Any,
    ) -> list[EngineOutput]:
        if not prompts:
            return []
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + list(p) for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        tracker = RowTracker(len(prompts), stop_token_ids, on_token, options.logprobs)
        recorder = _LogprobRecorder() if options.logprobs else None
        kwargs: dict[str, Any] = {"max_new_tokens": options.max_new_tokens, "do_sample": options.do_sample}
        if options.do_sample:
            kwargs.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k)
            if options.seed is not None:
                # generate() takes no generator: the global one is seeded. Only the scheduler's worker thread runs
                # an engine, so nothing else draws from it between the seed and the batch.
                torch.manual_seed(options.seed)
        if options.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = options.repetition_penalty
        kwargs.update(extra)
        # Custom processors run before transformers' sampling warpers, so the recorder sees the model's own
        # distribution (after repetition penalties and the like), as CTranslate2 reports it.
        processors = list(kwargs.get("logits_processor", []))
        if recorder is not None:
            processors.insert(0, recorder)
        if options.no_repeat_ngram_size:
            processors.insert(0, _NoRepeatInResponse(options.no_repeat_ngram_size, width))
        if constraints is not None:
            # First of all, so the recorded log-probabilities and the sampling warpers see only allowed tokens.
            processors.insert(0, _GrammarMask(constraints, tracker, width, options.max_new_tokens))
        if processors:
            kwargs["logits_processor"] = processors
        kwargs["stopping_criteria"] = [_Rows(tracker, recorder, constraints), *kwargs.get("stopping_criteria", [])]
        device = self.model.device
        with torch.inference_mode():
            self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                eos_token_id=list(stop_token_ids) or None,
                pad_token_id=self.pad_token_id,
                **kwargs,
            )
        return tracker.outputs


class _LogprobRecorder(LogitsProcessor):
    """Keeps the last step's log-softmax so the chosen tokens' log-probabilities can be read after sampling."""

    last: torch.Tensor | None = None

    def __call__(self, input_ids, scores):
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores


class _NoRepeatInResponse(LogitsProcessor):
    """Bans a token that would repeat an n-gram of the response, as CTranslate2's ``no_repeat_ngram_size`` does.

    NOTE: transformers' own ``no_repeat_ngram_size`` also counts the prompt's n-grams, so an answer could never
    copy four words from its context ("The capital of Freedonia is Blorptown" became "... is Blorberts"); both
    engines look at the generated tokens only.
    """

    def __init__(self, size: int, prompt_width: int):
        self.size, self.prompt_width = size, prompt_width

    def __call__(self, input_ids, scores):
        n = self.size
        for row, ids in enumerate(input_ids[:, self.prompt_width:].tolist()):
            if len(ids) < n - 1 or not ids and n > 1:
                continue
            prefix = tuple(ids[len(ids) - n + 1:]) if n > 1 else ()
            banned = {ids[i + n - 1] for i in range(len(ids) - n + 1) if tuple(ids[i:i + n - 1]) == prefix}
            if banned:
                scores[row, list(banned)] = float("-inf")
        return scores


class _GrammarMask(LogitsProcessor):
    """Structured output: every row still generating may pick only the tokens its grammar allows next, and closes
    its value in time to end within ``max_new_tokens`` (see ``dolly_langchain.structured``)."""

    def __init__(self, constraints: Sequence[Any], tracker: RowTracker, prompt_width: int, max_new_tokens: int):
        self.constraints, self.tracker = constraints, tracker
        self.prompt_width, self.max_new_tokens = prompt_width, max_new_tokens

    def __call__(self, input_ids, scores):
        tokens_left = self.max_new_tokens - (input_ids.shape[1] - self.prompt_width)
        for row, constraint in enumerate(self.constraints):
            if not self.tracker.done[row]:
                allowed = torch.from_numpy(constraint.allowed_mask(tokens_left)).to(scores.device)
                width = min(scores.shape[-1], allowed.shape[0])
                scores[row, :width].masked_fill_(~allowed[:width], float("-inf"))
                scores[row, width:] = float("-inf")
        return scores


class _Rows(StoppingCriteria):
    """Hands each step's new token per row to the tracker (and the row's grammar); rows it reports ended stop in
    transformers too."""

    def __init__(self, tracker: RowTracker, recorder: _LogprobRecorder | None, constraints: Sequence[Any] | None):
        self.tracker, self.recorder, self.constraints = tracker, recorder, constraints

    def __call__(self, input_ids, scores, **kwargs):
        new = input_ids[:, -1].tolist()
        for row, token in enumerate(new):
            if not self.tracker.done[row]:
                if self.constraints is not None and token not in self.tracker.stop_ids:
                    self.constraints[row].accept(token)
                logprob = float(self.recorder.last[row, token]) if self.recorder is not None else None
                self.tracker.add(row, token, logprob)
        return torch.tensor(self.tracker.done, dtype=torch.bool, device=input_ids.device)
