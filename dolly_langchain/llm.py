"""``DollyLLM``: a LangChain LLM over a local model, on the transformers or CTranslate2 engine.

Shaped like a partner package's LLM (compare ``langchain_huggingface.HuggingFacePipeline``)::

    from dolly_langchain.llm import DollyLLM

    llm = DollyLLM.from_model_id()                                  # embedded SmolLM2-135M-Instruct, CTranslate2 int8
    llm = DollyLLM.from_model_id(engine="transformers")            # the same model on transformers (reference outputs)
    llm = DollyLLM.from_model_id("databricks/dolly-v2-3b", dtype=torch.bfloat16, device_map="auto")
    llm = DollyLLM.from_model_id("runs/my-dolly", engine="ctranslate2", device="cuda", compute_type="int8_float16")
    llm = DollyLLM(pipeline=my_instruction_pipeline)                # bring your own pipeline (its runtime)

    llm.invoke("Name three primary colors.")                       # only the response, never the prompt
    llm.batch([...])                                                # batches of batch_size prompts
    for chunk in llm.stream("Write a haiku.", stop=["\\n\\n"]): ...  # text as it is generated

Where it differs from ``HuggingFacePipeline``: it returns only the response; ``stop`` is honoured in invoke,
batch and stream (generation halts there and the text is cut before it); batching pads on the left with a pad
token set automatically; errors raised while streaming reach the caller; unknown keyword arguments are refused.
Calls made at the same time from several threads or asyncio tasks are gathered into shared batches
(:mod:`dolly_langchain.engines.scheduler`) instead of waiting for each other, and ``logprobs=True`` reports the
log-probability of every generated token in ``generation_info["logprobs"]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.llms import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from langchain_core.runnables import Runnable, RunnableConfig
from pydantic import ConfigDict

from dolly_langchain.codec import StreamingResponse
from dolly_langchain.generation import EMBEDDED_MODEL_LABEL
from dolly_langchain.lc_common import DollyModelFields
from dolly_langchain.runtime import Completion

__all__ = ["EMBEDDED_MODEL_LABEL", "DollyLLM", "StreamingResponse"]


class DollyLLM(DollyModelFields, BaseLLM):
    """A Dolly-style instruction-following LLM for LangChain, running a local model on transformers or CTranslate2.

    Fields: see :class:`~dolly_langchain.lc_common.DollyModelFields` (``max_new_tokens``, ``do_sample``,
    ``temperature``, ``top_p``, ``top_k``, ``logprobs``, ``batch_size``); per-call keyword arguments of the same
    names override them.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    # -- LangChain metadata ----------------------------------------------------------------------------------

    @property
    def _llm_type(self) -> str:
        return "dolly"

    # -- tokens ----------------------------------------------------------------------------------------------

    def count_prompt_tokens(self, prompt: str) -> int:
        """Tokens the model reads for ``prompt`` once wrapped in its format (Dolly's text or the chat template)."""
        return len(self.codec.encode_prompt(prompt))

    # -- batches -----------------------------------------------------------------------------------------------

    def batch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """LangChain's ``batch``; with ``return_exceptions=True`` each input's error is its own.

        ``BaseLLM.batch`` runs all prompts as one ``generate`` call and, when any prompt fails, returns that one
        error for every input. Here, when that happens, the inputs are run again as separate concurrent calls
        (which still share engine batches through the scheduler), so one bad prompt fails only itself.
        """
        if not return_exceptions or len(inputs) < 2:
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        try:
            return super().batch(inputs, config, return_exceptions=False, **kwargs)
        except Exception:  # noqa: BLE001 - find out which inputs failed: one call each
            return Runnable.batch(self, inputs, config, return_exceptions=True, **kwargs)

    async def abatch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """Async :meth:`batch`: with ``return_exceptions=True`` each input's error is its own."""
        if not return_exceptions or len(inputs) < 2:
            return await super().abatch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        try:
            return await super().abatch(inputs, config, return_exceptions=False, **kwargs)
        except Exception:  # noqa: BLE001
            return await Runnable.abatch(self, inputs, config, return_exceptions=True, **kwargs)

    # -- generation ------------------------------------------------------------------------------------------

    def _encode(self, prompt: str, options) -> list[int]:
        return self._encode_instruction(prompt, options)

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        if self.streaming:
            # streaming=True: each prompt goes through the stream, so callbacks see every token as it comes.
            return LLMResult(generations=[[self._streamed(p, stop, run_manager, kwargs)] for p in prompts])
        options = self._sampling(kwargs)
        encoded = [self._encode(p, options) for p in prompts]
        completions = self.runtime.generate(encoded, options, self._stops(stop), timeout=self._timeout(kwargs))
        return self._result(completions)

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        if self.streaming:
            generations = []
            for prompt in prompts:
                final: GenerationChunk | None = None
                async for chunk in self._astream(prompt, stop, run_manager, **kwargs):
                    final = chunk if final is None else final + chunk
                generations.append([final])
            return LLMResult(generations=generations)
        options = self._sampling(kwargs)
        encoded = [self._encode(p, options) for p in prompts]
        completions = await self.runtime.agenerate(encoded, options, self._stops(stop),
                                                   timeout=self._timeout(kwargs))
        return self._result(completions)

    def _streamed(self, prompt: str, stop, run_manager, kwargs) -> GenerationChunk:
        final: GenerationChunk | None = None
        for chunk in self._stream(prompt, stop, run_manager, **kwargs):
            final = chunk if final is None else final + chunk
        return final

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        options = self._sampling(kwargs)
        items = self.runtime.stream(self._encode(prompt, options), options, self._stops(stop),
                                    timeout=self._timeout(kwargs))
        for item in items:
            chunk = self._chunk(item)
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        options = self._sampling(kwargs)
        items = self.runtime.astream(self._encode(prompt, options), options, self._stops(stop),
                                     timeout=self._timeout(kwargs))
        async for item in items:
            chunk = self._chunk(item)
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    # -- results -----------------------------------------------------------------------------------------------

    def _info(self, completion: Completion) -> dict[str, Any]:
        """``generation_info``: why the response ended, the model, token counts, and (``logprobs=True``) the
        response's tokens with their log-probabilities (OpenAI completions' shape)."""
        info: dict[str, Any] = {"finish_reason": completion.finish_reason, "model_name": self.model_name,
                                "usage_metadata": completion.usage}
        if completion.logprobs is not None:
            info["logprobs"] = {
                "tokens": [t["token"] for t in completion.logprobs],
                "token_logprobs": [t["logprob"] for t in completion.logprobs],
                "token_ids": [t["token_id"] for t in completion.logprobs],
            }
        return info

    def _result(self, completions: list[Completion]) -> LLMResult:
        total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for completion in completions:
            usage = completion.usage
            total["prompt_tokens"] += usage["input_tokens"]
            total["completion_tokens"] += usage["output_tokens"]
            total["total_tokens"] += usage["total_tokens"]
        generations = [[Generation(text=c.text, generation_info=self._info(c))] for c in completions]
        # llm_output["token_usage"]: the totals in the shape LangChain's OpenAI LLM reports them.
        return LLMResult(generations=generations, llm_output={"token_usage": total, "model_name": self.model_name})

    def _chunk(self, item: str | Completion) -> GenerationChunk:
        if isinstance(item, str):
            return GenerationChunk(text=item)
        # The last chunk carries no text (it came before) but the generation_info, once.
        return GenerationChunk(text="", generation_info=self._info(item))
