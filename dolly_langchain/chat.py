"""``ChatDolly``: a LangChain chat model over the same engines as ``DollyLLM``.

    from langchain_core.messages import HumanMessage, SystemMessage
    from dolly_langchain.chat import ChatDolly

    chat = ChatDolly.from_model_id(do_sample=False)            # embedded SmolLM2-135M-Instruct (CTranslate2 int8)
    chat.invoke([SystemMessage("Answer in one sentence."), HumanMessage("What is a llama?")])
    chat = ChatDolly.from_llm(llm)                              # share a DollyLLM's model and batches

How messages become a prompt (:meth:`~dolly_langchain.codec.PromptCodec.message_segments`):

- a model with a chat template (SmolLM2, most instruct models) gets the conversation rendered by its template;
- a Dolly-format model (trained on single instructions, e.g. ``databricks/dolly-v2-3b`` or a ``dolly-finetune``
  run) gets the last human message as the instruction, and the system message and earlier turns as its context
  (Dolly's ``Input:`` block), one ``System: ...`` / ``User: ...`` / ``Assistant: ...`` paragraph per message.
  A single human message gives exactly ``DollyLLM``'s prompt for that instruction.

Message text is always user text: a ``<|im_end|>`` or ``### End`` inside a message stays plain text.
Streaming, ``stop``, batching (``batch``/``abatch`` and concurrent calls share engine batches), callbacks and
``logprobs=True`` (``response_metadata["logprobs"]``) work as in ``DollyLLM``. There is no tool calling:
``bind_tools`` raises ``NotImplementedError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict

from dolly_langchain.errors import DollyValueError, NotSupportedError
from dolly_langchain.generation import OPTION_NAMES
from dolly_langchain.lc_common import DollyModelFields
from dolly_langchain.runtime import Completion

_CHAT_ROLES = {"human": "user", "user": "user", "ai": "assistant", "assistant": "assistant", "system": "system"}


class ChatDolly(DollyModelFields, BaseChatModel):
    """A chat model over a local model on transformers or CTranslate2 (see the module docstring).

    No tool calling: the models this runs were not trained for it, so ``bind_tools`` refuses.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    @classmethod
    def from_llm(cls, llm, **fields: Any) -> ChatDolly:
        """A chat model on a ``DollyLLM``'s loaded model, engine and scheduler, with its generation options."""
        options = {name: getattr(llm, name) for name in ("model_id", *OPTION_NAMES, "batch_size")}
        return cls(runtime=llm.runtime, pipeline=llm.given_pipeline, **{**options, **fields})

    @property
    def _llm_type(self) -> str:
        return "dolly-chat"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any):
        raise NotSupportedError(
            "ChatDolly does not support tool calling: Dolly-style models were not trained to call tools. "
            "Use a tool-calling model for agents, or put the tool's output into the conversation as text."
        )

    def get_num_tokens(self, text: str) -> int:
        return self.codec.count_tokens(text)

    def count_prompt_tokens(self, messages: Sequence[BaseMessage]) -> int:
        """Tokens the model reads for this conversation once rendered in its format."""
        return len(self.codec.encode_messages(_roles(messages)))

    # -- generation ------------------------------------------------------------------------------------------

    def _encode(self, messages: list[BaseMessage], options) -> list[int]:
        return self._checked(self.codec.encode_messages(_roles(messages)), options)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        options = self._sampling(kwargs)
        [completion] = self.runtime.generate([self._encode(messages, options)], options, stop)
        return _result(completion)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        options = self._sampling(kwargs)
        [completion] = await self.runtime.agenerate([self._encode(messages, options)], options, stop)
        return _result(completion)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        options = self._sampling(kwargs)
        for item in self.runtime.stream(self._encode(messages, options), options, stop):
            chunk = _chunk(item)
            if chunk is not None:
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        options = self._sampling(kwargs)
        async for item in self.runtime.astream(self._encode(messages, options), options, stop):
            chunk = _chunk(item)
            if chunk is not None:
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk


def _roles(messages: Sequence[BaseMessage]) -> list[tuple[str, str]]:
    """``(role, text)`` pairs for the codec; tool messages and non-text content are refused."""
    out = []
    for message in messages:
        if isinstance(message, HumanMessage):
            role = "user"
        elif isinstance(message, AIMessage):
            if message.tool_calls:
                raise DollyValueError("ChatDolly does not support tool calling: an AI message carries tool calls")
            role = "assistant"
        elif isinstance(message, SystemMessage):
            role = "system"
        elif isinstance(message, ChatMessage) and message.role in _CHAT_ROLES:
            role = _CHAT_ROLES[message.role]
        else:
            raise DollyValueError(
                f"ChatDolly takes system, human and AI messages; got a {message.type!r} message "
                "(no tool calling: put tool output into a human message as text)"
            )
        out.append((role, _text(message)))
    return out


def _text(message: BaseMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    parts = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise DollyValueError(f"ChatDolly reads text only; a {message.type} message holds a {kind!r} block")
    return "".join(parts)


def _metadata(completion: Completion) -> dict[str, Any]:
    if completion.logprobs is None:
        return {}
    # ChatOpenAI's shape: response_metadata["logprobs"]["content"] = [{"token", "logprob", ...}].
    return {"logprobs": {"content": [dict(t) for t in completion.logprobs]}}


def _result(completion: Completion) -> ChatResult:
    message = AIMessage(content=completion.text, response_metadata=_metadata(completion))
    return ChatResult(generations=[ChatGeneration(message=message)])


def _chunk(item: str | Completion) -> ChatGenerationChunk | None:
    if isinstance(item, str):
        return ChatGenerationChunk(message=AIMessageChunk(content=item))
    metadata = _metadata(item)
    if not metadata and item.text:
        return None  # the text came in the chunks before; an empty answer still streams one (empty) chunk
    return ChatGenerationChunk(message=AIMessageChunk(content="", response_metadata=metadata))
