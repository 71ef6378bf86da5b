"""``dolly serve``: an OpenAI-compatible HTTP server over the batching engine.

    dolly serve                                  # the embedded model on http://127.0.0.1:8000/v1
    dolly serve --model runs/my-dolly --api-key "$KEY" --host 0.0.0.0 --max-queue 64

Any OpenAI client works unmodified (``openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)``,
LangChain's ``ChatOpenAI(base_url=...)``): ``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /v1/embeddings``, ``GET /v1/models``, plus ``GET /health`` and ``GET /metrics`` (Prometheus).

- :mod:`dolly_langchain.serve.app`: the ASGI app (FastAPI): routes, OpenAI-shaped requests and errors, admission
  (``--max-queue``), auth, cancellation on disconnect and timeouts. Generation goes through ``ChatDolly`` and
  ``DollyLLM`` on one shared runtime, so concurrent requests share engine batches.
- :mod:`dolly_langchain.serve.metrics`: the Prometheus metrics.
- :mod:`dolly_langchain.serve.cli`: the ``dolly serve`` command (uvicorn).

The server needs the ``serve`` extra: ``pip install 'dolly-langchain[serve]'``.
"""

from __future__ import annotations

__all__ = ["INSTALL_HINT"]

INSTALL_HINT = "pip install 'dolly-langchain[serve]' (fastapi, uvicorn, prometheus-client)"
