"""``dolly serve`` as a real server process on a loopback port, with the embedded model, called by the ``openai``
client, LangChain's ``ChatOpenAI`` and plain HTTP (httpx): shapes, auth, bad requests, overflow, dropped streams,
timeouts and SIGTERM draining. No HTTP is mocked."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

KEY = "test-key-0123"
PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
LONG = [{"role": "user", "content": "Write a very long story about a dragon and a knight, at least 2000 words."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def dolly_serve(*flags: str, env: dict | None = None, ready: bool = True):
    """A ``dolly serve`` process on a free loopback port; yields (base URL, process). Stopped with SIGTERM."""
    port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "dolly"), "serve", "--port", str(port), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        if ready:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                assert process.poll() is None, process.stdout.read()
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            else:
                pytest.fail("the server did not become ready in 180 s")
        yield base, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def metric(base: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else "") + r" ([0-9.e+-]+)"
    found = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    assert found, f"{name}{{{labels}}} not in /metrics"
    return float(found.group(1))


@pytest.fixture(scope="module")
def server():
    """The embedded model with an API key and default limits."""
    with dolly_serve("--api-key", KEY) as (base, _):
        yield base


@pytest.fixture(scope="module")
def tight():
    """One request generates, one waits, and a request may run 5 s: for overflow and dropped streams."""
    with dolly_serve("--api-key", KEY, "--batch-size", "1", "--max-queue", "1", "--timeout", "5") as (base, _):
        yield base


@pytest.fixture(scope="module")
def impatient():
    """Requests may run 1 s: a long story cannot end on its own first (at 5 s, on a quiet CPU, it did)."""
    with dolly_serve("--api-key", KEY, "--batch-size", "1", "--timeout", "1") as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


# -- the OpenAI client and ChatOpenAI, unmodified -------------------------------------------------------------------


def test_models_lists_the_model_and_the_offline_embeddings(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "SmolLM2-135M-Instruct"
    assert "all-MiniLM-L6-v2" in ids  # installed by ./dev install


def test_chat_completion_answers_with_usage(client, model_id):
    response = client.chat.completions.create(model=model_id, messages=PROMPT, max_tokens=24, temperature=0)
    choice = response.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 5 and 0 < response.usage.completion_tokens <= 24
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_greedy_answers_are_the_same_streamed_or_not(client, model_id):
    whole = client.chat.completions.create(model=model_id, messages=PROMPT, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(model=model_id, messages=PROMPT, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_max_tokens_cuts_with_finish_reason_length(client, model_id):
    response = client.chat.completions.create(model=model_id, messages=LONG, max_completion_tokens=5)
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 5


def test_stop_and_logprobs(client, model_id):
    response = client.chat.completions.create(model=model_id, messages=PROMPT, max_tokens=24, stop=["Paris"],
                                              logprobs=True)
    assert "Paris" not in response.choices[0].message.content
    content = response.choices[0].logprobs.content
    assert content and all(t.logprob <= 0 for t in content)


def test_structured_output_through_response_format(client, model_id):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"]}
    response = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Give a city and its country as JSON."}],
        max_tokens=60, response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
    )
    value = json.loads(response.choices[0].message.content)
    assert set(value) == {"city", "country"} and all(isinstance(v, str) for v in value.values())


def test_completions_take_a_dolly_instruction(client, model_id):
    # "... Answer in one sentence.": without it, int8 answers differ between CPUs (AVX512-VNNI vs AVX2) and may loop
    prompt = "What is the capital of France? Answer in one sentence."
    response = client.completions.create(model=model_id, prompt=prompt, max_tokens=16, temperature=0)
    assert "Paris" in response.choices[0].text and response.usage.completion_tokens <= 16
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model_id, prompt=prompt, max_tokens=16, temperature=0, stream=True))
    assert streamed == response.choices[0].text


def test_embeddings_float_and_base64(client):
    floats = client.embeddings.create(model="all-MiniLM-L6-v2", input=["a cat", "a dog"], encoding_format="float")
    assert len(floats.data) == 2 and len(floats.data[0].embedding) == 384
    default = client.embeddings.create(model="all-MiniLM-L6-v2", input="a cat")  # the client asks for base64
    assert default.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-5)
    assert floats.usage.prompt_tokens > 0


def test_chat_openai_invoke_and_stream(server, model_id):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=f"{server}/v1", api_key=KEY, model=model_id, temperature=0, max_tokens=24)
    message = chat.invoke("What is the capital of France? Answer in one sentence.")
    assert "Paris" in message.content and message.usage_metadata["output_tokens"] > 0
    streamed = "".join(chunk.content for chunk in chat.stream("What is the capital of France? Answer in one sentence."))
    assert streamed == message.content


def test_concurrent_requests_share_batches_and_all_answer(client, model_id):
    results = []

    def ask():
        r = client.chat.completions.create(model=model_id, messages=PROMPT, max_tokens=24, temperature=0)
        results.append(r.choices[0].message.content)

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 6 and all("Paris" in r for r in results)


# -- auth, health, metrics ------------------------------------------------------------------------------------------


def test_every_route_but_health_needs_the_key(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/completions"), ("POST", "/v1/embeddings")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = httpx.request(method, f"{server}{path}", headers=headers, json={})
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()


def test_metrics_count_requests_and_tokens(server, client, model_id):
    before = metric(server, "dolly_generated_tokens_total")
    ok = metric(server, "dolly_requests_total", 'status="ok"')
    client.chat.completions.create(model=model_id, messages=PROMPT, max_tokens=8)
    assert metric(server, "dolly_generated_tokens_total") > before
    assert metric(server, "dolly_requests_total", 'status="ok"') == ok + 1
    for name in ("dolly_requests_running", "dolly_requests_waiting", "dolly_prompt_tokens_total",
                 "dolly_time_to_first_token_seconds_count", "dolly_request_seconds_count"):
        metric(server, name)


# -- bad requests: 400/404/422 with OpenAI's error body, and no model work -------------------------------------------


@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope", "messages": PROMPT}, 404, "model"),
    ({"model": "MODEL", "messages": []}, 400, "messages"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "   "}]}, 400, "messages[0]"),
    ({"model": "MODEL", "messages": PROMPT, "max_tokens": 100_000}, 400, None),
    ({"model": "MODEL", "messages": PROMPT, "n": 3}, 400, "n"),
    ({"model": "MODEL", "messages": PROMPT, "temperature": -1}, 422, "temperature"),
    ({"model": "MODEL", "messages": [{"role": "robot", "content": "hi"}]}, 422, None),
    ({"model": "MODEL"}, 422, "messages"),
    ({"model": "MODEL", "messages": PROMPT, "response_format": {"type": "json_schema"}}, 400, "response_format"),
])
def test_bad_chat_requests_never_reach_the_engine(server, model_id, body, status, param):
    body = json.loads(json.dumps(body).replace('"MODEL"', json.dumps(model_id)))
    prompt_tokens = metric(server, "dolly_prompt_tokens_total")
    response = httpx.post(f"{server}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param
    assert metric(server, "dolly_prompt_tokens_total") == prompt_tokens


def test_malformed_json_is_400(server):
    response = httpx.post(f"{server}/v1/chat/completions", content=b'{"model": ', timeout=10,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_the_window_error_names_both_numbers(client, model_id):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model_id, messages=PROMPT, max_tokens=100_000)
    assert "100000" in str(caught.value.body)


# -- load: overflow, dropped streams, timeouts ------------------------------------------------------------------------


def _open_stream(base: str, model: str, max_tokens: int = 400):
    """A streamed chat request held open; returns (httpx client, response) after its first chunk arrived."""
    http = httpx.Client(timeout=60)
    request = http.build_request("POST", f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                                 json={"model": model, "messages": LONG, "max_tokens": max_tokens, "stream": True})
    response = http.send(request, stream=True)
    assert response.status_code == 200
    return http, response


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_overflow_is_429_with_retry_after_at_once(tight):
    model = openai.OpenAI(base_url=f"{tight}/v1", api_key=KEY).models.list().data[0].id
    held = [_open_stream(tight, model) for _ in range(2)]  # one generating, one waiting: the queue is full
    try:
        assert _wait_for(lambda: metric(tight, "dolly_requests_running") == 1, 10)
        rejected = metric(tight, "dolly_requests_total", 'status="rejected"')
        started = time.perf_counter()
        response = httpx.post(f"{tight}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": model, "messages": PROMPT}, timeout=10)
        elapsed = time.perf_counter() - started
        assert response.status_code == 429 and response.headers["Retry-After"] == "1"
        assert response.json()["error"]["code"] == "queue_full"
        assert elapsed < 1.0, "a rejection does no model work"
        assert metric(tight, "dolly_requests_total", 'status="rejected"') == rejected + 1
    finally:
        for http, response in held:
            response.close()
            http.close()
    assert _wait_for(lambda: metric(tight, "dolly_requests_running") == 0
                     and metric(tight, "dolly_requests_waiting") == 0, 10)


def test_a_dropped_stream_frees_its_slot(tight):
    model = openai.OpenAI(base_url=f"{tight}/v1", api_key=KEY).models.list().data[0].id
    cancelled = metric(tight, "dolly_requests_total", 'status="cancelled"')
    http, response = _open_stream(tight, model)
    lines = response.iter_lines()
    assert next(line for line in lines if line.startswith("data:"))  # generating
    assert metric(tight, "dolly_requests_running") == 1
    response.close()
    http.close()
    assert _wait_for(lambda: metric(tight, "dolly_requests_running") == 0, 3), "the row must leave its batch"
    assert _wait_for(lambda: metric(tight, "dolly_requests_total", 'status="cancelled"') == cancelled + 1, 3)
    # and the slot is usable again at once
    answer = openai.OpenAI(base_url=f"{tight}/v1", api_key=KEY, max_retries=0).chat.completions.create(
        model=model, messages=PROMPT, max_tokens=8)
    assert answer.choices[0].message.content


def test_a_request_past_the_timeout_is_504_and_frees_its_slot(impatient):
    model = openai.OpenAI(base_url=f"{impatient}/v1", api_key=KEY).models.list().data[0].id
    started = time.perf_counter()
    response = httpx.post(f"{impatient}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": model, "messages": LONG, "max_tokens": 4000, "temperature": 0},
                          timeout=60)
    assert response.status_code == 504, response.text
    assert "timeout" in response.json()["error"]["message"]
    assert 0.9 < time.perf_counter() - started < 10
    assert _wait_for(lambda: metric(impatient, "dolly_requests_running") == 0, 3)
    assert metric(impatient, "dolly_requests_total", 'status="timeout"') >= 1


def test_a_streamed_request_past_the_timeout_ends_with_an_error_event(impatient):
    model = openai.OpenAI(base_url=f"{impatient}/v1", api_key=KEY).models.list().data[0].id
    with httpx.stream("POST", f"{impatient}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": model, "messages": LONG, "max_tokens": 4000, "stream": True},
                      timeout=60) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "timeout_error"


# -- the process: loopback without a key, SIGTERM drain ---------------------------------------------------------------


def test_without_a_key_it_refuses_a_public_host():
    env = {name: value for name, value in os.environ.items() if name != "DOLLY_API_KEY"}
    result = subprocess.run([str(Path(sys.executable).parent / "dolly"), "serve", "--host", "0.0.0.0"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert "--no-api-key" in result.stderr and "Traceback" not in result.stderr


def test_health_turns_ok_and_sigterm_drains():
    with dolly_serve(ready=False) as (base, process):
        statuses = set()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                response = httpx.get(f"{base}/health", timeout=2)
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            statuses.add((response.status_code, response.json()["status"]))
            if response.status_code == 200:
                break
            time.sleep(0.2)
        # "loading" lasts about a second on this CPU (the unit tests check it with a slow loader)
        assert (200, "ok") in statuses and statuses <= {(503, "loading"), (200, "ok")}
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        http, response = _open_stream(base, model, max_tokens=40)
        process.send_signal(signal.SIGTERM)  # while the stream runs
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
        http.close()
        assert events[-1] == "data: [DONE]" and '"finish_reason": "length"' in events[-2]
        assert process.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/health", timeout=2)


def test_seed_on_the_ctranslate2_engine_is_a_clear_400(client, model_id):
    with pytest.raises(openai.BadRequestError) as caught:  # the embedded model runs on CTranslate2 by default
        client.chat.completions.create(model=model_id, messages=PROMPT, temperature=0.7, seed=1, stream=True)
    error = caught.value.body
    assert error["param"] == "seed" and error["code"] == "unsupported_parameter" and "transformers" in error["message"]


def test_dolly_rag_answers_from_the_index_with_its_sources(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "password.md").write_text(
        "# Resetting your password\n\nTo reset your password, open the self-service page at id.example.com and "
        "click Forgot password. A reset link is sent to your work email and stays valid for 30 minutes.\n")
    (docs / "parking.txt").write_text("The office car park opens at 7:00 and closes at 20:00 on weekdays.\n")
    index = tmp_path / "docs.sqlite"
    dolly = str(Path(sys.executable).parent / "dolly")
    subprocess.run([dolly, "rag", "index", str(docs), "--index", str(index)], check=True, capture_output=True,
                   timeout=300)
    with dolly_serve("--api-key", KEY, "--index", str(index)) as (base, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
        assert "dolly-rag" in [m.id for m in client.models.list().data]
        question = [{"role": "user", "content": "Where do I reset my password?"}]
        response = client.chat.completions.create(model="dolly-rag", messages=question, max_tokens=32)
        body = response.model_dump()
        assert response.choices[0].message.content
        assert body["sources"][0]["source"].endswith("password.md") and "id.example.com" in body["sources"][0]["text"]
        assert response.usage.completion_tokens > 0 and response.usage.prompt_tokens > 20
        chunks = list(client.chat.completions.create(model="dolly-rag", messages=question, max_tokens=32,
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            response.choices[0].message.content
        assert chunks[-1].model_dump()["sources"][0]["source"].endswith("password.md")
