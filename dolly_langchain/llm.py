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
from dolly_langchain.errors import DollyValueError
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
        if not isinstance(prompt, str) or not prompt.strip():
            raise DollyValueError("the prompt is empty: give DollyLLM an instruction to answer")
        return self._checked(self.codec.encode_prompt(prompt), options)

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        options = self._sampling(kwargs)
        encoded = [self._encode(p, options) for p in prompts]
        completions = self.runtime.generate(encoded, options, stop)
        return LLMResult(generations=[[self._generation(c)] for c in completions])

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        options = self._sampling(kwargs)
        encoded = [self._encode(p, options) for p in prompts]
        completions = await self.runtime.agenerate(encoded, options, stop)
        return LLMResult(generations=[[self._generation(c)] for c in completions])

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        options = self._sampling(kwargs)
        for item in self.runtime.stream(self._encode(prompt, options), options, stop):
            chunk = self._chunk(item)
            if chunk is not None:
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
        async for item in self.runtime.astream(self._encode(prompt, options), options, stop):
            chunk = self._chunk(item)
            if chunk is not None:
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    @staticmethod
    def _generation(completion: Completion) -> Generation:
        return Generation(text=completion.text, generation_info=_info(completion))

    @staticmethod
    def _chunk(item: str | Completion) -> GenerationChunk | None:
        if isinstance(item, str):
            return GenerationChunk(text=item)
        info = _info(item)
        # An empty answer still streams one (empty) chunk: LangChain refuses a stream that yields none.
        return GenerationChunk(text="", generation_info=info) if info or not item.text else None


def _info(completion: Completion) -> dict[str, Any] | None:
    """``generation_info``: the response's tokens and their log-probabilities (OpenAI completions' shape)."""
    if completion.logprobs is None:
        return None
    return {
        "logprobs": {
            "tokens": [t["token"] for t in completion.logprobs],
            "token_logprobs": [t["logprob"] for t in completion.logprobs],
            "token_ids": [t["token_id"] for t in completion.logprobs],
        }
    }

