"""The OpenAI-compatible ASGI app behind ``dolly serve`` (FastAPI; uvicorn runs it).

Request and response shapes are OpenAI's, so the ``openai`` client and LangChain's ``ChatOpenAI(base_url=...)`` work
unmodified. Generation goes through :class:`~dolly_langchain.chat.ChatDolly` (chat) and
:class:`~dolly_langchain.llm.DollyLLM` (completions) on one runtime: the batching scheduler gathers concurrent
requests into shared engine batches, and the LangChain classes already own prompt formats, stops, structured
output, usage and log-probabilities, so the server adds only HTTP.

Load behaviour (see :class:`ServeSettings`):

- admission: at most ``batch_size`` requests generate and ``max_queue`` wait; the next one is answered 429 with
  ``Retry-After`` at once, before any model work;
- a client that disconnects (mid-stream or while waiting for a whole answer) has its request cancelled: its row
  leaves the batch at the next decoding step (``dolly_requests_running`` drops);
- ``timeout`` ends a request that runs too long (504, or an error event on a stream) and frees its row;
- bad requests get 400/401/404/422 with OpenAI's error body (``{"error": {"message", "type", "param", "code"}}``)
  and never reach the engine; an exception inside one request reaches only that request (500).

Sampling: a request without ``temperature`` decodes as the model's defaults say (greedy, with the embedded model's
anti-loop settings): reproducible, unlike OpenAI's default of 1.0. ``temperature > 0`` samples with ``top_p``
(default 1) and, where the engine honours it, ``seed``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from langchain_core.callbacks import AsyncCallbackHandler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from dolly_langchain.errors import DollyError, NotSupportedError
from dolly_langchain.serve.metrics import CONTENT_TYPE_LATEST, ServerMetrics

__all__ = ["RAG_MODEL_ID", "ServeSettings", "ServerState", "create_app"]

#: The model id that answers from ``--index`` (retrieval + Dolly's context prompt).
RAG_MODEL_ID = "dolly-rag"
#: ``Retry-After`` seconds on a 429: about one batch of short answers on a CPU.
RETRY_AFTER_SECONDS = 1
#: The routes that generate, and so take a place in the queue.
_GENERATION_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
#: How often a non-streamed request checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.1


@dataclass
class ServeSettings:
    """What ``dolly serve``'s flags set (see :mod:`dolly_langchain.serve.cli`)."""

    model: str | None = None
    engine: str | None = None
    compute_type: str = "auto"
    device: str | None = None
    served_model_name: str | None = None
    """The id clients pass as ``model`` (default: ``--model`` as given, or the embedded model's name)."""
    api_key: str | None = None
    max_queue: int = 64
    batch_size: int = 16
    batch_window: float = 0.02
    """Seconds the scheduler waits for more requests before it starts a batch (up to ten times this while they
    keep coming). Longer than the library's 5 ms: HTTP requests of a burst arrive spread out by parsing and
    tokenizing, and a request that misses a batch waits for the whole batch to end."""
    timeout: float | None = 600.0
    max_tokens: int = 256
    """Default ``max_tokens`` of a request that names none."""
    index: Path | None = None
    embeddings: str | None = None
    """Embeddings for ``--index`` (default: what the index records, if this package ships it) and for
    ``/v1/embeddings`` (default: MiniLM, when installed)."""
    model_options: dict[str, Any] = field(default_factory=dict)
    """Extra ``ChatDolly``/``DollyLLM`` fields (e.g. ``repetition_penalty``); a request without ``temperature``
    decodes with these, greedily unless they say ``do_sample=True``."""


class ApiError(DollyError):
    """A request the server refuses (or could not serve), answered with OpenAI's error body and its HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# -- request shapes (OpenAI's; unknown fields are ignored, as OpenAI-compatible servers do) --------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    """``base64``: little-endian float32 bytes, base64-encoded (what the ``openai`` client asks for by default)."""


# -- the state shared by the routes ------------------------------------------------------------------------------


class ServerState:
    """The loaded models and the counters the routes share. Loading runs in a thread, so ``/health`` answers
    "loading" meanwhile; everything else waits for it (503 until then)."""

    def __init__(self, settings: ServeSettings, *, chat: Any = None, llm: Any = None):
        self.settings = settings
        self.chat, self.llm = chat, llm
        self.rag_chain: Any = None
        self.rag_index: Any = None
        self.embeddings: Any = None
        self.embeddings_id: str | None = None
        self.status = "loading" if chat is None else "ok"
        self.load_error: str | None = None
        self.in_flight = 0
        self.draining = False
        self.metrics = ServerMetrics(self.running, self.waiting)
        self.on_loaded: Callable[[ServerState], None] | None = None
        """Called from the loading thread once ``status`` is ``ok`` or ``failed`` (the command prints, or stops)."""

    @property
    def model_id(self) -> str:
        if self.settings.served_model_name:
            return self.settings.served_model_name
        if self.settings.model:
            return self.settings.model
        from dolly_langchain.generation import EMBEDDED_MODEL_NAME

        return EMBEDDED_MODEL_NAME

    # -- loading ------------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Load the model (and the index and embeddings, when asked), then answer once; ``status`` becomes ``ok``,
        or ``failed`` with the reason in ``load_error``."""
        try:
            if self.chat is None:
                from dolly_langchain.chat import ChatDolly
                from dolly_langchain.llm import DollyLLM

                s = self.settings
                engine = s.engine
                if engine in (None, "auto") and s.compute_type in (None, "auto"):
                    # A server's work is concurrent requests sharing batches: "auto" here is the batch engine
                    # (CTranslate2 int8 for the embedded model), not auto's llama.cpp-for-lone-prompts routing, whose
                    # drain on SIGTERM and dropped-stream cancellation under this server are not verified yet.
                    from dolly_langchain.runtime import resolve_engine

                    engine = resolve_engine(engine, s.model)
                llm = DollyLLM.from_model_id(s.model, engine=engine, compute_type=s.compute_type, device=s.device,
                                             batch_size=s.batch_size, max_new_tokens=s.max_tokens,
                                             **{"do_sample": False, **s.model_options})
                self.llm, self.chat = llm, ChatDolly.from_llm(llm)
            self.chat.runtime.scheduler.window = self.settings.batch_window
            self.chat.invoke("Hi", max_tokens=1)  # "until the model answers": the first call's allocations too
            self._load_extras()
            self.status = "ok"
        except Exception as err:  # noqa: BLE001 - reported by /health and the command, not lost in a thread
            self.load_error = str(err) if isinstance(err, DollyError) else f"{type(err).__name__}: {err}"
            self.status = "failed"
        if self.on_loaded is not None:
            self.on_loaded(self)

    def _load_extras(self) -> None:
        s = self.settings
        if s.index is not None:
            from dolly_langchain.rag.chain import retrieval_qa_chain
            from dolly_langchain.rag.cli import open_for_questions

            self.rag_index = open_for_questions(s.index, s.embeddings, tokenizer=self.llm.tokenizer)
            self.rag_chain = retrieval_qa_chain(self.llm, self.rag_index)
            self.embeddings = self.rag_index.embeddings
        if self.embeddings is None:
            self.embeddings = _offline_embeddings(s.embeddings)
        if self.embeddings is not None:
            self.embeddings_id = getattr(self.embeddings, "model_name", None) or "embeddings"

    # -- load ---------------------------------------------------------------------------------------------------

    def running(self) -> int:
        return self.chat.runtime.load()[0] if self.status == "ok" else 0

    def waiting(self) -> int:
        return self.chat.runtime.load()[1] if self.status == "ok" else 0

    def check_ready(self) -> None:
        """Raise 503 while the model loads (or failed to), and while the server drains."""
        if self.status != "ok":
            raise ApiError(503, f"the model is {self.status}" + (f": {self.load_error}" if self.load_error else ""),
                           "service_unavailable", code=self.status)
        if self.draining:
            raise ApiError(503, "the server is shutting down", "service_unavailable", code="draining")

    def check_room(self) -> None:
        """Raise 429 (with ``Retry-After``) when ``batch_size`` requests generate and ``max_queue`` wait."""
        if self.in_flight >= self.settings.batch_size + self.settings.max_queue:
            self.metrics.requests.labels("rejected").inc()
            raise ApiError(429, f"the server is busy: {self.settings.batch_size} requests are generating and "
                           f"{self.settings.max_queue} waiting (--max-queue); retry after {RETRY_AFTER_SECONDS} s",
                           "rate_limit_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    def admit(self) -> None:
        """Take a place for one request, or raise 429 (queue full) / 503 (loading, draining)."""
        self.check_ready()
        self.check_room()
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1


def _offline_embeddings(name: str | None):
    """The embeddings for ``/v1/embeddings``: the named ones, else the offline MiniLM when installed, else None."""
    from dolly_langchain.rag.embeddings import MeanPoolingEmbeddings

    try:
        embeddings = MeanPoolingEmbeddings(model_name=name or "minilm")
        embeddings.embed_query("warm-up")
    except (OSError, ImportError, DollyError):
        if name is not None:
            raise
        return None
    return embeddings


# -- the app ------------------------------------------------------------------------------------------------------


def create_app(settings: ServeSettings, *, chat: Any = None, llm: Any = None, load_in_background: bool = True
               ) -> FastAPI:
    """The server's ASGI app. Without ``chat``/``llm`` the model named by ``settings`` loads when the app starts
    (in a thread: ``/health`` says "loading" until it answers)."""
    state = ServerState(settings, chat=chat, llm=llm)
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.status == "loading":
            loader = threading.Thread(target=state.load, name="dolly-serve-load", daemon=True)
            loader.start()
            if not load_in_background:
                await asyncio.to_thread(loader.join)
        elif chat is not None:
            state._load_extras()
        yield
        state.draining = True

    app = FastAPI(title="dolly-langchain", description="OpenAI-compatible API over a local Dolly-style model",
                  lifespan=lifespan)
    app.state.dolly = state

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        key = settings.api_key
        if key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                return ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                "authentication_error", code="invalid_api_key").response()
        if request.url.path in _GENERATION_ROUTES and state.status == "ok":
            try:  # a full queue answers at once, before the body is read, parsed and tokenized
                state.check_room()
            except ApiError as err:
                return err.response()
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        if 400 <= err.status < 500 and err.status != 429:
            state.metrics.requests.labels("client_error").inc()
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        problems = err.errors()
        first = problems[0] if problems else {}
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        message = "; ".join(f"{'.'.join(map(str, p.get('loc', ())[1:])) or 'body'}: {p.get('msg')}"
                            for p in problems[:5])
        status = 400 if first.get("type") == "json_invalid" else 422
        state.metrics.requests.labels("client_error").inc()
        return ApiError(status, message or "invalid request", param=where).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return ApiError(err.status_code, str(err.detail), kind).response()

    @app.get("/health")
    async def health():
        body = {"status": state.status}
        if state.load_error:
            body["message"] = state.load_error
        return JSONResponse(body, status_code=200 if state.status == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        ids = [state.model_id]
        if state.rag_chain is not None:
            ids.append(RAG_MODEL_ID)
        if state.embeddings_id is not None:
            ids.append(state.embeddings_id)
        return {"object": "list",
                "data": [{"id": i, "object": "model", "created": created, "owned_by": "dolly-langchain"} for i in ids]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        state.check_ready()
        return await _serve(state, request, body, _chat_call(state, body))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        state.check_ready()
        return await _serve(state, request, body, _completion_call(state, body))

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        state.check_ready()
        if state.embeddings is None or body.model != state.embeddings_id:
            known = f"'{state.embeddings_id}'" if state.embeddings_id else "none (start with --embeddings NAME)"
            raise ApiError(404, f"no embeddings model {body.model!r}; served: {known}", "not_found_error",
                           param="model", code="model_not_found")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or any(not isinstance(t, str) or not t for t in texts):
            raise ApiError(400, "input must be a non-empty string or a list of non-empty strings", param="input")
        vectors = await asyncio.to_thread(state.embeddings.embed_documents, texts)
        if body.encoding_format == "base64":
            import base64

            import numpy as np

            vectors = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii") for v in vectors]
        tokens = await asyncio.to_thread(state.embeddings.count_tokens, texts)
        state.metrics.requests.labels("ok").inc()
        return {"object": "list", "model": body.model,
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return app


# -- one generation request -----------------------------------------------------------------------------------------


@dataclass
class _Call:
    """What a route asks of the model: ``run()`` for a whole answer, ``stream()`` for its chunks, and how to shape
    them into OpenAI's objects."""

    run: Callable[[], Any]
    stream: Callable[[], AsyncIterator[tuple[str, dict | None]]]
    whole: Callable[[Any, str, int], dict]
    chunk: Callable[[str, str | None, str, int, dict | None], dict]
    prompt_tokens: int = 0


def _sampling_kwargs(state: ServerState, body: _Sampling, max_tokens: int | None) -> dict[str, Any]:
    if body.n != 1:
        raise ApiError(400, f"n={body.n} is not supported: this server returns one choice per request; send "
                       "several requests (they share engine batches)", param="n", code="unsupported_parameter")
    kwargs: dict[str, Any] = {"max_tokens": max_tokens or state.settings.max_tokens}
    if body.temperature is not None:
        kwargs["temperature"] = body.temperature
        kwargs["do_sample"] = body.temperature > 0
        kwargs["top_p"] = body.top_p if body.top_p is not None else 1.0
    if body.seed is not None:
        kwargs["seed"] = body.seed
    if state.settings.timeout is not None:
        kwargs["timeout"] = state.settings.timeout
    return kwargs


def _stops(body: _Sampling) -> list[str] | None:
    if body.stop is None:
        return None
    stops = [body.stop] if isinstance(body.stop, str) else body.stop
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop must be up to 4 non-empty strings", param="stop")
    return stops


def _check_model(state: ServerState, model: str, rag_ok: bool) -> None:
    if model == state.model_id or (rag_ok and model == RAG_MODEL_ID and state.rag_chain is not None):
        return
    known = [state.model_id] + ([RAG_MODEL_ID] if rag_ok and state.rag_chain is not None else [])
    raise ApiError(404, f"the model {model!r} does not exist here; served: {', '.join(known)} (GET /v1/models)",
                   "not_found_error", param="model", code="model_not_found")


def _messages(body: ChatCompletionRequest) -> list:
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    if not body.messages:
        raise ApiError(400, "messages is empty: send at least one user message", param="messages")
    kinds = {"system": SystemMessage, "developer": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
    out = []
    for number, message in enumerate(body.messages):
        content = message.content
        if isinstance(content, list):  # OpenAI's content parts: text only
            if any(part.get("type") != "text" for part in content):
                raise ApiError(400, f"messages[{number}]: only text content parts are supported (this model reads "
                               "no images, audio or files)", param=f"messages[{number}].content")
            content = "".join(str(part.get("text", "")) for part in content)
        if content is None or not content.strip() and message.role == "user":
            raise ApiError(400, f"messages[{number}] ({message.role}) has no text", param=f"messages[{number}]")
        out.append(kinds[message.role](content=content))
    if body.messages[-1].role != "user":
        raise ApiError(400, "the last message must be the user's", param="messages")
    return out


def _chat_call(state: ServerState, body: ChatCompletionRequest) -> _Call:
    _check_model(state, body.model, rag_ok=True)
    if body.top_logprobs:
        raise ApiError(400, "top_logprobs is not supported: the engines report the chosen token's log-probability "
                       "only (logprobs: true)", param="top_logprobs", code="unsupported_parameter")
    messages = _messages(body)
    kwargs = _sampling_kwargs(state, body, body.max_completion_tokens or body.max_tokens)
    stop = _stops(body)
    if body.logprobs:
        kwargs["logprobs"] = True
    if body.response_format is not None and body.response_format.get("type") != "text":
        from dolly_langchain.structured import grammar_of_response_format

        kwargs["response_format"] = _client_error(grammar_of_response_format, body.response_format,
                                                  param="response_format")
    if body.model == RAG_MODEL_ID:
        return _rag_call(state, body, messages, kwargs, stop)
    chat = state.chat
    options = _client_error(chat._sampling, {k: v for k, v in kwargs.items() if k != "timeout"})
    _client_error(chat.runtime.check_options, options, param="seed")
    prompt = _client_error(chat._encode, messages, options)  # window and text checks before the engine
    created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"

    async def run():
        return await chat.ainvoke(messages, stop=stop, **kwargs)

    async def stream():
        async for chunk in chat.astream(messages, stop=stop, **kwargs):
            final = chunk.response_metadata if chunk.response_metadata.get("finish_reason") else None
            info = None
            if final is not None:
                info = {"finish_reason": final["finish_reason"], "usage": chunk.usage_metadata,
                        "logprobs": final.get("logprobs")}
            yield chunk.text, info

    def whole(message, model: str, at: int) -> dict:
        meta = message.response_metadata
        choice = {"index": 0, "message": {"role": "assistant", "content": message.content},
                  "finish_reason": meta.get("finish_reason", "stop"), "logprobs": _chat_logprobs(meta.get("logprobs"))}
        return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [choice], "usage": _usage(message.usage_metadata)}

    def chunk(text: str, finish: str | None, model: str, at: int, info: dict | None) -> dict:
        delta = {"content": text} if text or finish is None else {}
        if at == 0:
            delta = {"role": "assistant", **delta}
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                             "logprobs": _chat_logprobs(info.get("logprobs")) if info else None}]}

    return _Call(run, stream, whole, chunk, prompt_tokens=len(prompt))


def _rag_call(state: ServerState, body: ChatCompletionRequest, messages: list, kwargs: dict, stop) -> _Call:
    """``dolly-rag``: the last user message is the question; the answer comes from the index's passages through
    Dolly's context prompt (``retrieval_qa_chain``), with this request's sampling options. The passages used are
    in ``sources`` beside ``choices`` (on the last chunk when streamed)."""
    from dolly_langchain.rag.chain import retrieval_qa_chain

    if "response_format" in kwargs or kwargs.get("logprobs"):
        raise ApiError(400, f"{RAG_MODEL_ID} answers in text, without response_format or logprobs", param="model")
    question = messages[-1].content
    fields = {"max_new_tokens": kwargs["max_tokens"], "timeout": kwargs.get("timeout"), "stop": stop or []}
    for name in ("temperature", "do_sample", "top_p", "seed"):
        if name in kwargs:
            fields[name] = kwargs[name]
    llm = state.llm.model_copy(update=fields)  # shares the loaded runtime: RAG answers batch with the others
    _client_error(llm._sampling, {})
    chain = retrieval_qa_chain(llm, state.rag_index)
    created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"

    async def run():
        usage = _UsageRecorder()
        result = await chain.ainvoke(question, config={"callbacks": [usage]})
        return {**result, "usage": usage.usage}

    async def stream():
        usage, sources = _UsageRecorder(), []
        async for part in chain.astream(question, config={"callbacks": [usage]}):
            if part.get("answer"):
                yield part["answer"], None
            sources = part.get("sources", sources)
        yield "", {"finish_reason": "stop", "usage": usage.usage, "sources": sources}

    def whole(result, model: str, at: int) -> dict:
        return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["answer"]},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": _usage(result["usage"]), "sources": [_source(d) for d in result["sources"]]}

    def chunk(text: str, finish: str | None, model: str, at: int, info: dict | None) -> dict:
        delta = ({"role": "assistant"} if at == 0 else {}) | ({"content": text} if text or finish is None else {})
        out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if info and info.get("sources") is not None:
            out["sources"] = [_source(d) for d in info["sources"]]
        return out

    return _Call(run, stream, whole, chunk)


class _UsageRecorder(AsyncCallbackHandler):
    """The token counts of the model call inside a chain (``DollyLLM`` reports them in ``generation_info``)."""

    def __init__(self):
        self.usage: dict | None = None

    async def on_llm_end(self, response, **kwargs: Any) -> None:
        info = response.generations[0][0].generation_info if response.generations else None
        if info and info.get("usage_metadata"):
            self.usage = info["usage_metadata"]


def _source(document) -> dict[str, Any]:
    return {"source": document.metadata.get("source"), "text": document.page_content,
            "metadata": json.loads(json.dumps(document.metadata, default=str))}


def _completion_call(state: ServerState, body: CompletionRequest) -> _Call:
    _check_model(state, body.model, rag_ok=False)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ApiError(400, "prompt must be one string (send one request per prompt; they share batches)",
                       param="prompt")
    if body.echo:
        raise ApiError(400, "echo is not supported", param="echo", code="unsupported_parameter")
    prompt = prompts[0]
    if not prompt.strip():
        raise ApiError(400, "prompt is empty: send the instruction to answer", param="prompt")
    kwargs = _sampling_kwargs(state, body, body.max_tokens)
    if body.logprobs:
        if body.logprobs > 1:
            raise ApiError(400, "logprobs above 1 is not supported: the engines report the chosen token's "
                           "log-probability only", param="logprobs", code="unsupported_parameter")
        kwargs["logprobs"] = True
    stop = _stops(body)
    llm = state.llm
    options = _client_error(llm._sampling, {k: v for k, v in kwargs.items() if k != "timeout"})
    _client_error(llm.runtime.check_options, options, param="seed")
    ids = _client_error(llm._encode, prompt, options)
    created, cid = int(time.time()), f"cmpl-{uuid.uuid4().hex}"

    async def run():
        result = await llm.agenerate([prompt], stop=stop, **kwargs)
        return result.generations[0][0]

    async def stream():
        async for chunk in llm._astream(prompt, stop=stop, **kwargs):
            info = chunk.generation_info or None
            if info is not None and "finish_reason" in info:
                yield chunk.text, {"finish_reason": info["finish_reason"], "usage": info.get("usage_metadata"),
                                   "logprobs": info.get("logprobs")}
            else:
                yield chunk.text, None

    def whole(generation, model: str, at: int) -> dict:
        info = generation.generation_info or {}
        return {"id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": generation.text, "finish_reason": info.get("finish_reason", "stop"),
                             "logprobs": info.get("logprobs")}],
                "usage": _usage(info.get("usage_metadata"))}

    def chunk(text: str, finish: str | None, model: str, at: int, info: dict | None) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish,
                             "logprobs": info.get("logprobs") if info else None}]}

    return _Call(run, stream, whole, chunk, prompt_tokens=len(ids))


def _client_error(function, *args, param: str | None = None):
    """Run a check; a DollyError (bad value, window exceeded, unsupported option) is the client's 400."""
    try:
        return function(*args)
    except NotSupportedError as err:
        raise ApiError(400, str(err), param=param, code="unsupported_parameter") from None
    except (DollyError, ValueError, TypeError) as err:
        raise ApiError(400, str(err), param=param) from None


def _usage(usage: dict | None) -> dict[str, int]:
    usage = usage or {}
    prompt, completion = usage.get("input_tokens", 0), usage.get("output_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chat_logprobs(logprobs: dict | None) -> dict | None:
    if not logprobs:
        return None
    return {"content": [{"token": t["token"], "logprob": t["logprob"],
                         "bytes": list(t["token"].encode("utf-8")), "top_logprobs": []}
                        for t in logprobs.get("content", [])]}


async def _serve(state: ServerState, request: Request, body: _Sampling, call: _Call):
    """Admit, run (streamed or whole), count, and free the place however the request ends."""
    state.admit()
    started = time.perf_counter()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        release = _once(state.release)
        return _AdmittedStream(_sse(state, call, body.model, started, include_usage, release), release,
                               media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    task = asyncio.ensure_future(call.run())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                break
            if await request.is_disconnected():
                task.cancel()  # the row leaves its batch at the next decoding step
                state.metrics.requests.labels("cancelled").inc()
                return Response(status_code=499)
        result = task.result()
    except asyncio.CancelledError:
        task.cancel()
        state.metrics.requests.labels("cancelled").inc()
        raise
    except Exception as err:  # noqa: BLE001 - one request's failure is that request's answer
        raise _failure(state, err) from None
    finally:
        state.release()
        state.metrics.request_seconds.observe(time.perf_counter() - started)
    answer = call.whole(result, body.model, 0)
    state.metrics.usage({"input_tokens": answer["usage"]["prompt_tokens"],
                         "output_tokens": answer["usage"]["completion_tokens"]})
    state.metrics.requests.labels("ok").inc()
    return answer


def _failure(state: ServerState, err: BaseException) -> ApiError:
    if isinstance(err, ApiError):
        return err
    if isinstance(err, TimeoutError):
        state.metrics.requests.labels("timeout").inc()
        return ApiError(504, f"{err} (the server's --timeout is {state.settings.timeout:g} s)", "timeout_error",
                        code="timeout")
    if isinstance(err, (DollyError, ValueError)):
        state.metrics.requests.labels("client_error").inc()
        return ApiError(400, str(err))
    state.metrics.requests.labels("error").inc()
    return ApiError(500, f"generation failed: {type(err).__name__}: {err}", "server_error")


def _once(function: Callable[[], None]) -> Callable[[], None]:
    done = False

    def call() -> None:
        nonlocal done
        if not done:
            done = True
            function()

    return call


class _AdmittedStream(StreamingResponse):
    """A stream that gives its admission place back however the response ends: the generator's own ``finally``
    does it, but a client gone before the first chunk means the generator never starts, and then this does."""

    def __init__(self, content, release: Callable[[], None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


async def _sse(state: ServerState, call: _Call, model: str, started: float, include_usage: bool,
               release: Callable[[], None]):
    """Server-sent events in OpenAI's shape, ending with ``data: [DONE]``. A client that goes away closes this
    generator (Starlette cancels it), which closes the model's stream and frees the row."""
    at, status, usage = 0, "ok", None
    try:
        try:
            async for text, info in call.stream():
                if at == 0:
                    state.metrics.time_to_first_token.observe(time.perf_counter() - started)
                finish = info["finish_reason"] if info else None
                if text and finish:  # text first, then the finishing chunk without text
                    yield _event(call.chunk(text, None, model, at, None))
                    at += 1
                    text = ""
                if text or finish:
                    yield _event(call.chunk(text, finish, model, at, info))
                    at += 1
                if info:
                    usage = info.get("usage")
        except Exception as err:  # noqa: BLE001 - after the headers went out, an error is an event
            failure = _failure(state, err)
            status = "reported"
            yield _event(failure.body())
            yield "data: [DONE]\n\n"
            return
        if include_usage:
            chunk = call.chunk("", None, model, at, None)
            chunk["choices"] = []
            chunk["usage"] = _usage(usage)
            yield _event(chunk)
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        status = "cancelled"
        raise
    finally:
        release()
        state.metrics.request_seconds.observe(time.perf_counter() - started)
        state.metrics.usage(usage)
        if status != "reported":
            state.metrics.requests.labels(status).inc()


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
