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

import json
from collections.abc import AsyncIterator, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

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
from langchain_core.exceptions import OutputParserException
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from pydantic import ConfigDict

from dolly_langchain.errors import DollyTypeError, DollyValueError, NotSupportedError
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
        names = ("model_id", *OPTION_NAMES, "batch_size", "stop", "timeout")
        options = {name: getattr(llm, name) for name in names}
        if "streaming" in llm.model_fields_set:
            # Only when set: LangChain reads an explicit streaming=False as "never stream", even in .stream().
            options["streaming"] = llm.streaming
        return cls(runtime=llm.runtime, pipeline=llm.given_pipeline, **{**options, **fields})

    @property
    def _llm_type(self) -> str:
        return "dolly-chat"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any):
        raise NotSupportedError(
            "ChatDolly does not support tool calling: Dolly-style models were not trained to call tools. For "
            "answers in a fixed shape use chat.with_structured_output(schema) (JSON constrained to the schema); for "
            "agents use a tool-calling model, or put the tool's output into the conversation as text."
        )

    def with_structured_output(
        self,
        schema: dict | type,
        *,
        method: Literal["json_schema", "json_mode", "function_calling"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable:
        """A runnable that answers with a parsed object: an instance of a pydantic ``schema``, else a dict.

        ``schema``: a pydantic model class, a ``TypedDict`` class or a JSON-schema dict. ``method="json_schema"``
        constrains decoding to the schema (:mod:`dolly_langchain.structured`): every token is checked against a
        grammar compiled from it, so the output always parses and validates: near ``max_tokens`` the grammar
        closes the value with the fewest tokens (only a ``max_tokens`` below the shortest valid document cuts it,
        and that fails to parse). ``method="json_mode"`` without a
        schema constrains to any JSON object (describe the fields in the prompt); with one, it enforces it too. ``include_raw=True`` returns
        ``{"raw": AIMessage, "parsed": ..., "parsing_error": ...}`` instead of raising on a parse error.
        ``strict`` is accepted for LangChain's signature; constrained decoding is always strict.
        ``method="function_calling"`` (many models' default) is read as ``"json_schema"``: there is no tool calling,
        and the constrained decoding gives what a tool call's arguments would.
        """
        from langchain_core.runnables import RunnableMap, RunnablePassthrough

        from dolly_langchain.structured import JsonGrammar, is_pydantic_model

        if kwargs:
            raise DollyTypeError(f"with_structured_output() got unknown arguments {sorted(kwargs)}")
        if method not in ("json_schema", "json_mode", "function_calling"):
            raise DollyValueError(f"method must be 'json_schema', 'json_mode' or 'function_calling', got {method!r}")
        if method == "function_calling":
            # There is no tool calling to route through; the schema-constrained decoding gives what a tool call's
            # arguments would (an object valid under the schema), so the common default of other models works too.
            method = "json_schema"
        if schema is None:
            if method == "json_schema":
                raise DollyValueError("method='json_schema' needs a schema; use method='json_mode' for any JSON")
            grammar = JsonGrammar.json_mode()
        else:
            # json_mode with a schema enforces the schema too: a hosted JSON mode only promises JSON, but when the
            # decoder is ours there is no reason to let a small model drop a required field.
            grammar = JsonGrammar.from_schema(schema)
        llm = self.bind(
            response_format=grammar,
            ls_structured_output_format={"kwargs": {"method": method}, "schema": _traced_schema(schema, grammar)},
        )
        parser = _strict_parser(schema if is_pydantic_model(schema) else None)
        if not include_raw:
            return llm | parser
        parse = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parse.with_fallbacks([fallback], exception_key="parsing_error")

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
        [completion] = self.runtime.generate([self._encode(messages, options)], options, self._stops(stop),
                                             timeout=self._timeout(kwargs))
        return self._result(completion)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        options = self._sampling(kwargs)
        [completion] = await self.runtime.agenerate([self._encode(messages, options)], options, self._stops(stop),
                                                    timeout=self._timeout(kwargs))
        return self._result(completion)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        options = self._sampling(kwargs)
        items = self.runtime.stream(self._encode(messages, options), options, self._stops(stop),
                                    timeout=self._timeout(kwargs))
        for item in items:
            chunk = self._chunk(item)
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
        items = self.runtime.astream(self._encode(messages, options), options, self._stops(stop),
                                     timeout=self._timeout(kwargs))
        async for item in items:
            chunk = self._chunk(item)
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    # -- results -----------------------------------------------------------------------------------------------

    def _metadata(self, completion: Completion) -> dict[str, Any]:
        metadata: dict[str, Any] = {"model_name": self.model_name, "finish_reason": completion.finish_reason,
                                    "model_provider": "dolly_langchain"}
        if completion.logprobs is not None:
            # ChatOpenAI's shape: response_metadata["logprobs"]["content"] = [{"token", "logprob", ...}].
            metadata["logprobs"] = {"content": [dict(t) for t in completion.logprobs]}
        return metadata

    def _result(self, completion: Completion) -> ChatResult:
        message = AIMessage(content=completion.text, response_metadata=self._metadata(completion),
                            usage_metadata=completion.usage)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _chunk(self, item: str | Completion) -> ChatGenerationChunk:
        if isinstance(item, str):
            return ChatGenerationChunk(message=AIMessageChunk(content=item))
        # The last chunk: no text (it came before), the usage and metadata, once, as LangChain sums chunks.
        return ChatGenerationChunk(message=AIMessageChunk(
            content="", response_metadata=self._metadata(item), usage_metadata=item.usage, chunk_position="last",
        ))


class _StrictFinalParse:
    """Makes LangChain's JSON (or pydantic) output parser strict about the final result.

    LangChain's JSON parser completes a cut-off value (``{"name": "Al`` becomes ``{"name": "Al"}``), which suits the
    partial results of a stream but would hand back a truncated object as the answer. Here the final parse refuses
    a response that ``max_tokens`` cut (``finish_reason == "length"``) or that is not complete JSON, naming the fix;
    streamed partial results stay as LangChain makes them.
    """

    def parse_result(self, result, *, partial: bool = False):
        if not partial:
            text = result[0].text
            message = getattr(result[0], "message", None)
            if message is not None and message.response_metadata.get("finish_reason") == "length":
                raise OutputParserException(
                    "the response was cut by max_tokens before its JSON value was complete; raise max_tokens",
                    llm_output=text,
                )
            try:
                json.loads(text)
            except json.JSONDecodeError as err:
                raise OutputParserException(f"the response is not complete JSON ({err})", llm_output=text) from None
        return super().parse_result(result, partial=partial)


class _StrictJsonOutputParser(_StrictFinalParse, JsonOutputParser):
    pass


class _StrictPydanticOutputParser(_StrictFinalParse, PydanticOutputParser):
    pass


def _strict_parser(pydantic_class: type | None):
    if pydantic_class is None:
        return _StrictJsonOutputParser()
    return _StrictPydanticOutputParser(pydantic_object=pydantic_class)


def _traced_schema(schema: Any, grammar) -> dict | None:
    """The schema as LangChain traces it (``convert_to_json_schema``, which wants a titled dict), else as given."""
    from langchain_core.utils.function_calling import convert_to_json_schema

    if schema is None:
        return None
    try:
        return convert_to_json_schema(schema)
    except ValueError:  # an untitled JSON-schema dict: LangChain cannot name it, the grammar's schema is the same
        return grammar.schema


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
