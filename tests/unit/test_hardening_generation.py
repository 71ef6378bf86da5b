"""Hardening (issue 16, items 1, 8 and 13): one caller's bad argument fails only that caller; bad stop and
sampling values are refused or read as meant; text that is not valid Unicode gets a clear error."""

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from langchain_core.messages import HumanMessage
from pydantic import ValidationError

from conftest import MEMORIZED
from dolly_langchain.chat import ChatDolly
from dolly_langchain.codec import check_stop
from dolly_langchain.engines.scheduler import Request
from dolly_langchain.errors import DollyError, DollyTypeError, DollyValueError
from dolly_langchain.generation import SamplingOptions, sampling_options
from dolly_langchain.llm import DollyLLM

FRANCE, COLOR, SUMMARY = MEMORIZED


@pytest.fixture(scope="module")
def llm(memorized_neox_dir):
    return DollyLLM.from_model_id(
        str(memorized_neox_dir), engine="transformers", do_sample=False, max_new_tokens=40, batch_size=16
    )


class Boom(RuntimeError):
    pass


def _failing_request(llm, after_tokens: int = 3) -> Request:
    """A request whose own token callback fails mid-decoding (as a bad stop string or stream listener would)."""

    def on_token(token_id, logprob):
        if request.tokens_seen >= after_tokens:
            raise Boom("this row's callback failed")
        return False

    ids = llm.codec.encode_prompt(FRANCE[0])
    request = Request(ids, llm._sampling({}), on_token)
    return request


# -- item 1: per-row errors during decoding --------------------------------------------------------------------


def test_a_row_failing_mid_decoding_fails_only_its_own_request(llm):
    runtime = llm.runtime
    options = llm._sampling({})
    good = [runtime._request(llm.codec.encode_prompt(p), options, None) for p in (FRANCE[0], COLOR[0])]
    bad = _failing_request(llm)
    runtime.scheduler.submit([good[0], bad, good[1]])  # one batch: the failure comes after tokens were generated
    with pytest.raises(Boom):
        bad.future.result(timeout=60)
    assert bad.tokens_seen >= 3
    assert [runtime._completion(r.future.result(timeout=60), None).text for r in good] == [FRANCE[2], COLOR[2]]


def test_32_threads_one_bad_stop_fails_only_that_call(llm):
    barrier = threading.Barrier(32)

    def call(i):
        barrier.wait(timeout=30)
        prompt = (FRANCE, COLOR)[i % 2]
        try:
            return llm.invoke(prompt[0], stop=[123] if i == 7 else None)
        except Exception as err:  # noqa: BLE001
            return err

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(call, range(32)))
    assert time.monotonic() - start < 120
    failures = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert failures == [7]
    assert isinstance(results[7], DollyTypeError) and "123" in str(results[7])
    assert all(r == (FRANCE, COLOR)[i % 2][2] for i, r in enumerate(results) if i != 7)


def test_32_threads_with_a_row_failing_mid_decoding(llm):
    """Concurrent calls share batches with a request whose callback fails after tokens: only it fails."""
    barrier = threading.Barrier(32)
    bad = _failing_request(llm, after_tokens=2)

    def call(i):
        barrier.wait(timeout=30)
        if i == 5:
            llm.runtime.scheduler.submit([bad])
            try:
                return bad.future.result(timeout=60)
            except Exception as err:  # noqa: BLE001
                return err
        try:
            return llm.invoke((FRANCE, COLOR)[i % 2][0])
        except Exception as err:  # noqa: BLE001
            return err

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(call, range(32)))
    assert time.monotonic() - start < 120
    assert isinstance(results[5], Boom)
    assert all(r == (FRANCE, COLOR)[i % 2][2] for i, r in enumerate(results) if i != 5)


def test_bad_stop_is_refused_at_the_call_before_anything_is_queued(llm, monkeypatch):
    submitted = []

    def submit(requests):
        submitted.append(requests)
        raise AssertionError("a call with a bad stop was queued")

    monkeypatch.setattr(llm.runtime.scheduler, "submit", submit)
    for stop in ([123], [None], ["ok", b"bytes"], 5, {"a": 1}):
        with pytest.raises(DollyTypeError, match="stop"):
            llm.invoke(FRANCE[0], stop=stop)
        with pytest.raises(DollyTypeError, match="stop"):
            list(llm.stream(FRANCE[0], stop=stop))
        with pytest.raises(DollyTypeError, match="stop"):
            asyncio.run(llm.ainvoke(FRANCE[0], stop=stop))
    assert submitted == []


def test_batch_with_return_exceptions_fails_only_the_bad_prompt(llm):
    out = llm.batch([FRANCE[0], "", COLOR[0]], return_exceptions=True)
    assert out[0] == FRANCE[2] and out[2] == COLOR[2]
    assert isinstance(out[1], DollyValueError) and "empty" in str(out[1])
    out = asyncio.run(llm.abatch([FRANCE[0], "  ", COLOR[0]], return_exceptions=True))
    assert out[0] == FRANCE[2] and out[2] == COLOR[2]
    assert isinstance(out[1], DollyValueError)
    with pytest.raises(DollyValueError):  # without return_exceptions the error is raised, as before
        llm.batch([FRANCE[0], "", COLOR[0]])
    assert llm.batch([FRANCE[0], COLOR[0]], return_exceptions=True) == [FRANCE[2], COLOR[2]]


def test_chat_batch_with_return_exceptions_fails_only_the_bad_conversation(llm):
    chat = ChatDolly.from_llm(llm)
    out = chat.batch([[HumanMessage(FRANCE[0])], [HumanMessage("")], [HumanMessage(COLOR[0])]],
                     return_exceptions=True)
    assert out[0].content == FRANCE[2] and out[2].content == COLOR[2]
    assert isinstance(out[1], DollyValueError)


# -- item 8: stop given as one string; nan and inf --------------------------------------------------------------


def test_a_string_stop_is_one_stop_sequence_not_its_characters(llm):
    assert check_stop("ab") == ["ab"]
    assert check_stop(None) == [] and check_stop(("a", "b")) == ["a", "b"]
    # Split into characters, " c" would cut "Paris is the capital" at its first "c" or space.
    assert llm.invoke(FRANCE[0], stop=" capital") == "Paris is the"
    assert "".join(llm.stream(FRANCE[0], stop=" capital")) == "Paris is the"
    chat = ChatDolly.from_llm(llm)
    assert chat.invoke([HumanMessage(FRANCE[0])], stop=" capital").content == "Paris is the"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan"])
def test_temperature_and_top_p_must_be_finite(llm, value):
    with pytest.raises(DollyValueError, match="temperature"):
        sampling_options({"do_sample": True, "temperature": value})
    with pytest.raises(DollyValueError, match="temperature"):
        sampling_options({"do_sample": False, "temperature": value})  # greedy ignores it, but nan is never meant
    with pytest.raises(DollyValueError, match="top_p"):
        sampling_options({"do_sample": True, "top_p": value})
    with pytest.raises(DollyValueError, match="temperature"):
        llm.invoke(FRANCE[0], temperature=value, do_sample=True)


def test_sampling_options_refuses_nan_directly_and_non_numbers():
    with pytest.raises(DollyValueError, match="finite"):
        SamplingOptions(do_sample=True, temperature=math.nan)
    with pytest.raises(DollyValueError, match="finite"):
        SamplingOptions(do_sample=False, temperature=math.inf)
    with pytest.raises(DollyValueError, match="max_new_tokens"):
        sampling_options({"max_new_tokens": math.nan})
    with pytest.raises(DollyValueError, match="top_k"):
        sampling_options({"do_sample": True, "top_k": "many"})
    with pytest.raises(DollyValueError, match="max_new_tokens"):
        sampling_options({"max_new_tokens": 2.5})
    assert sampling_options({"max_new_tokens": 10.0, "do_sample": True, "temperature": "0.5"}) == SamplingOptions(
        max_new_tokens=10, do_sample=True, temperature=0.5, top_p=0.92, top_k=0
    )


def test_model_fields_refuse_nan_temperature(llm):
    with pytest.raises(ValidationError, match="finite"):
        DollyLLM(runtime=llm.runtime, temperature=math.nan)
    with pytest.raises(ValidationError, match="finite"):
        ChatDolly(runtime=llm.runtime, top_p=math.inf)


# -- item 13: lone surrogates -----------------------------------------------------------------------------------


def test_a_lone_surrogate_gives_a_clear_value_error(llm):
    bad = "What is \ud800 the capital?"
    for call in (
        lambda: llm.invoke(bad),
        lambda: list(llm.stream(bad)),
        lambda: llm.get_num_tokens(bad),
        lambda: llm.codec.encode_prompt(FRANCE[0], context=bad),
        lambda: ChatDolly.from_llm(llm).invoke([HumanMessage(bad)]),
    ):
        with pytest.raises(DollyValueError, match="surrogate") as info:
            call()
        assert isinstance(info.value, DollyError) and "character 8" in str(info.value)
    out = llm.batch([FRANCE[0], bad], return_exceptions=True)
    assert out[0] == FRANCE[2] and isinstance(out[1], DollyValueError)


class _SlowEngine:
    """A fake engine that makes one token every 10 ms until the row's callback says stop (or 2000 tokens)."""

    name = "slow-fake"

    def __init__(self):
        self.started = threading.Event()
        self.stopped_rows = 0

    def generate(self, prompts, options, stop_token_ids, on_token=None):
        from dolly_langchain.engines.base import EngineOutput

        outputs = []
        for row in range(len(prompts)):
            tokens = []
            for _ in range(2000):
                self.started.set()
                time.sleep(0.01)
                tokens.append(5)
                if on_token is not None and on_token(row, 5, None):
                    self.stopped_rows += 1
                    break
            outputs.append(EngineOutput(token_ids=tokens))
        return outputs


def test_closing_a_scheduler_stops_its_batch_cancels_its_queue_and_ends_its_worker():
    from dolly_langchain.engines.scheduler import BatchScheduler

    engine = _SlowEngine()
    scheduler = BatchScheduler(engine, stop_token_ids=[0], batch_size=1, window=0.001)
    running = Request([1, 2], SamplingOptions(max_new_tokens=2000, do_sample=False))
    queued = Request([3, 4], SamplingOptions(max_new_tokens=2000, do_sample=False))
    scheduler.submit([running, queued])
    assert engine.started.wait(10)
    worker = scheduler._worker

    started = time.monotonic()
    scheduler.close()
    assert time.monotonic() - started < 5
    assert not worker.is_alive()
    assert engine.stopped_rows == 1 and len(running.future.result(timeout=1).token_ids) < 2000
    assert queued.future.cancelled()
    with pytest.raises(DollyError, match="closed"):
        scheduler.submit([Request([1], SamplingOptions(max_new_tokens=4, do_sample=False))])


def test_a_process_that_exits_mid_generation_stops_the_batch_before_python_finalizes(tmp_path):
    """The atexit hook closes every scheduler: a worker thread left inside an engine's native code while Python
    finalizes can abort the process after the program has finished (exit code -6)."""
    import subprocess
    import sys

    marker = tmp_path / "stopped"
    script = f"""
import threading, time
from dolly_langchain.engines.base import EngineOutput
from dolly_langchain.engines.scheduler import BatchScheduler, Request
from dolly_langchain.generation import SamplingOptions

started = threading.Event()

class Endless:
    name = "endless-fake"

    def generate(self, prompts, options, stop_token_ids, on_token=None):
        tokens = []
        while True:
            started.set()
            time.sleep(0.01)
            tokens.append(5)
            if on_token(0, 5, None):
                open({str(marker)!r}, "w").write("stopped")
                return [EngineOutput(token_ids=tokens)]

BatchScheduler(Endless(), [0], batch_size=1).submit([Request([1], SamplingOptions(max_new_tokens=9, do_sample=False))])
started.wait(10)
print("leaving")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == "leaving"
    assert marker.read_text() == "stopped"  # the row was told to stop, and the engine returned, before the process ended
