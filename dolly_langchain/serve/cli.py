"""``dolly serve``: run the OpenAI-compatible server (:mod:`dolly_langchain.serve.app`) with uvicorn.

    dolly serve                                               # embedded model, http://127.0.0.1:8000/v1, no key
    DOLLY_API_KEY=secret dolly serve --host 0.0.0.0 --model runs/my-dolly --max-queue 64 --timeout 120
    dolly serve --index docs.sqlite                           # also the model "dolly-rag": answers from the index

Without an API key the server listens on loopback only; ``--host`` elsewhere then needs ``--no-api-key`` too, so
an open server is always a decision. SIGTERM (or Ctrl-C) drains: no new requests, running ones finish (at most
``--drain-seconds``), exit 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
from pathlib import Path

from dolly_langchain.clitools import CLIError, add_model_arguments, check_device, int_at_least, positive_float

HELP = "serve the model over an OpenAI-compatible HTTP API"
PARSER_OPTIONS = {"description": "Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, "
                  "/v1/completions, /v1/embeddings, /v1/models, /health, /metrics)."}
API_KEY_ENV = "DOLLY_API_KEY"


def register(commands) -> None:
    configure(commands.add_parser("serve", help=HELP, **PARSER_OPTIONS))


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--served-model-name", metavar="NAME", default=None,
                        help="the id clients send as model (default: --model as given, or the embedded model's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback)")
    parser.add_argument("--port", type=int_at_least(1, "--port"), default=8000, help="default: 8000")
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--api-key", metavar="KEY", default=None,
                     help=f"required as 'Authorization: Bearer KEY' on every route but /health (or set ${API_KEY_ENV})")
    key.add_argument("--api-key-file", type=Path, metavar="PATH", default=None,
                     help="read the API key from this file (its first line)")
    key.add_argument("--no-api-key", action="store_true",
                     help="serve without a key on a non-loopback --host (anyone who can reach it can use it)")
    parser.add_argument("--max-queue", type=int_at_least(0, "--max-queue"), default=64, metavar="N",
                        help="requests that may wait beyond those generating; the next gets 429 (default: 64)")
    parser.add_argument("--batch-size", type=int_at_least(1, "--batch-size"), default=16, metavar="N",
                        help="requests generated together in one engine batch (default: 16)")
    parser.add_argument("--batch-window-ms", type=positive_float, default=20.0, metavar="MS",
                        help="how long to wait for more requests before starting a batch (default: 20; up to 10x "
                        "while requests keep arriving)")
    parser.add_argument("--timeout", type=positive_float, default=600.0, metavar="S",
                        help="end a request that runs longer than this many seconds (default: 600)")
    parser.add_argument("--drain-seconds", type=positive_float, default=30.0, metavar="S",
                        help="on SIGTERM, how long running requests may take to finish (default: 30)")
    parser.add_argument("--index", type=Path, metavar="FILE", default=None,
                        help="a dolly rag index: adds the model 'dolly-rag', which answers from it")
    parser.add_argument("--embeddings", metavar="NAME", default=None,
                        help="embeddings for --index and /v1/embeddings (default: the index's, else MiniLM if "
                        "installed)")
    parser.set_defaults(run=run)


def api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key, --api-key-file or $DOLLY_API_KEY (in that order); None for no key."""
    if args.no_api_key:
        return None
    if args.api_key is not None:
        key = args.api_key
    elif args.api_key_file is not None:
        try:
            key = args.api_key_file.read_text(encoding="utf-8").splitlines()[0] if args.api_key_file.stat().st_size \
                else ""
        except (OSError, UnicodeDecodeError) as err:
            raise CLIError(f"cannot read --api-key-file {args.api_key_file}: {err}") from None
    else:
        key = os.environ.get(API_KEY_ENV)
        if not key:  # unset or empty: no key
            return None
    key = key.strip()
    if not key:
        raise CLIError("the API key is empty (--api-key or --api-key-file); set one, or leave them out to serve on "
                       "loopback without a key")
    return key


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _draining_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, except that SIGTERM/SIGINT drain and the process then exits 0.

        NOTE: uvicorn re-raises the signal after its graceful shutdown, so the process would die by SIGTERM (exit
        -15) even when every request finished; a supervisor (systemd, Kubernetes) should see a clean exit after a
        drain. A second Ctrl-C still forces the exit, as in uvicorn."""

        state_to_drain = None

        def handle_exit(self, sig, frame) -> None:
            if self.state_to_drain is not None:
                self.state_to_drain.draining = True  # requests on kept-alive connections get 503 meanwhile
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    return DrainingServer


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from dolly_langchain.serve.app import ServeSettings, create_app
    except ImportError as err:
        from dolly_langchain.serve import INSTALL_HINT

        raise CLIError(f"dolly serve needs {err.name}: {INSTALL_HINT}") from None
    key = api_key(args)
    if key is None and not _is_loopback(args.host) and not args.no_api_key:
        raise CLIError(f"--host {args.host} is not loopback and no API key is set: pass --api-key KEY (or "
                       f"${API_KEY_ENV}, --api-key-file), or --no-api-key to serve it open")
    if args.index is not None and not args.index.exists():
        raise CLIError(f"no index at {args.index}; build one with: dolly rag index PATH... --index {args.index}")
    check_device(args)
    options = {"do_sample": args.temperature > 0, "repetition_penalty": args.repetition_penalty,
               "no_repeat_ngram_size": args.no_repeat_ngram_size, "stop_loops": args.stop_loops}
    if args.temperature > 0:
        options["temperature"] = args.temperature
    settings = ServeSettings(
        model=args.model, engine=args.engine, compute_type=args.compute_type, device=args.device,
        served_model_name=args.served_model_name, api_key=key, max_queue=args.max_queue, batch_size=args.batch_size,
        batch_window=args.batch_window_ms / 1000,
        timeout=args.timeout, max_tokens=args.max_new_tokens, index=args.index, embeddings=args.embeddings,
        model_options=options,
    )
    app = create_app(settings)
    state = app.state.dolly
    where = f"http://{args.host}:{args.port}/v1"
    auth = "API key required" if key else "no API key (loopback only)" if _is_loopback(args.host) else \
        "NO API KEY: open to anyone who can reach it"
    print(f"dolly serve: {where} ({auth}); model {state.model_id!r}"
          f"{' and ' + repr('dolly-rag') if args.index else ''}; loading, GET /health says when it is ready",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.drain_seconds)
    server = _draining_server_class()(config)
    server.state_to_drain = state

    def loaded(state) -> None:
        if state.status == "ok":
            print(f"dolly serve: ready on {where}", file=sys.stderr, flush=True)
        else:
            server.should_exit = True  # a server that cannot answer should not look alive

    state.on_loaded = loaded
    server.run()
    if state.status == "failed":
        raise CLIError(f"the model did not load: {state.load_error}")
    return 0
