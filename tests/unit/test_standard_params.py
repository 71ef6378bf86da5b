"""LangChain's standard parameters and metadata on ``DollyLLM`` and ``ChatDolly`` (issue 17, items 1-3, 7):
``model``/``max_tokens`` aliases, ``temperature=0`` greedy, default ``stop`` merged with the call's, ``timeout``,
``max_retries``, ``streaming``, ``seed``, ``repetition_penalty``/``no_repeat_ngram_size`` on both engines;
construction by name, loaded lazily and shared; ``usage_metadata``, ``finish_reason``, ``model_name``."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessageChunk, HumanMessage
from pydantic import ValidationError

import dolly_langchain.runtime as runtime_module
from conftest import MEMORIZED
from dolly_langchain.chat import ChatDolly
from dolly_langchain.codec import PromptCodec
from dolly_langchain.engines.base import GenerationEngine, RowTracker
from dolly_langchain.errors import NotSupportedError
from dolly_langchain.generation import EMBEDDED_MODEL_LABEL
from dolly_langchain.llm import DollyLLM
from dolly_langchain.runtime import DollyRuntime, clear_shared_runtimes

FRANCE, COLOR, SUMMARY = MEMORIZED
STANDARD = {"temperature": 0, "max_tokens": 40, "timeout": 60, "stop": [], "max_retries": 2}


@pytest.fixture(params=["transformers", "ctranslate2", "llamacpp"])
def engine(request, ct2_cache):
    if request.param == "ctranslate2":
        pytest.importorskip("ctranslate2")
    if request.param == "llamacpp":
        pytest.importorskip("xllamacpp")
    clear_shared_runtimes()
    yield request.param
    clear_shared_runtimes()


def _by_name(cls, model_dir, engine, **fields):
    extra = {"ctranslate2": {"compute_type": "float32"}, "llamacpp": {"compute_type": "f32"}}.get(engine, {})
    return cls(model=str(model_dir), engine=engine, **extra, **{**STANDARD, **fields})


# -- 1 and 2: standard constructor parameters; by name, lazily, shared -------------------------------------------


def test_standard_constructor_builds_cheaply_and_loads_on_first_use(memorized_neox_dir, engine, monkeypatch):
    loads = []
    real = runtime_module.load_runtime
    monkeypatch.setattr(runtime_module, "load_runtime", lambda *a, **k: loads.append(a) or real(*a, **k))
    chat = _by_name(ChatDolly, memorized_neox_dir, engine)
    llm = _by_name(DollyLLM, memorized_neox_dir, engine)
    assert loads == [] and chat.given_runtime is None  # nothing loaded yet
    assert chat._get_ls_params()["ls_model_name"] == str(memorized_neox_dir) and loads == []
    assert chat.invoke(FRANCE[0]).content == FRANCE[2]
    assert llm.invoke(COLOR[0]) == COLOR[2]
    assert len(loads) == 1 and chat.runtime is llm.runtime  # one model in memory, one scheduler
    assert chat.engine == engine and chat.model_id == chat.model_name == str(memorized_neox_dir)
    other = _by_name(ChatDolly, memorized_neox_dir, "transformers" if engine == "ctranslate2" else "ctranslate2")
    assert other.runtime is not chat.runtime  # other engine settings: another runtime


def test_aliases_and_unknown_parameters(memorized_neox_dir):
    chat = ChatDolly(model_id=str(memorized_neox_dir), max_new_tokens=7)
    assert chat.model_id == str(memorized_neox_dir) and chat.max_new_tokens == 7
    assert ChatDolly(model="x", max_tokens=9).max_new_tokens == 9
    assert ChatDolly().model_name == EMBEDDED_MODEL_LABEL  # the embedded model, not loaded by asking its name
    for bad in ({"api_key": "k"}, {"max_length": 3}, {"engine": "vllm"}, {"device": "tpu"}, {"timeout": 0},
                {"max_retries": -1}, {"temperature": -1}, {"repetition_penalty": 0}, {"no_repeat_ngram_size": -2}):
        with pytest.raises(ValidationError):
            ChatDolly(**bad)
        with pytest.raises(ValidationError):
            DollyLLM(**bad)


def test_temperature_zero_is_greedy_and_max_tokens_per_call(memorized_neox_dir, engine):
    sampled = _by_name(DollyLLM, memorized_neox_dir, engine, temperature=1.0, do_sample=True)
    assert sampled.invoke(FRANCE[0], temperature=0) == FRANCE[2]
    llm = _by_name(DollyLLM, memorized_neox_dir, engine)
    short = llm.invoke(FRANCE[0], max_tokens=2)
    assert FRANCE[2].startswith(short) and len(short) < len(FRANCE[2])


def test_default_stop_is_merged_with_the_calls(memorized_neox_dir, engine):
    chat = _by_name(ChatDolly, memorized_neox_dir, engine, stop=[" capital"])
    assert chat.invoke(FRANCE[0]).content == "Paris is the"
    assert chat.invoke(FRANCE[0], stop=["Paris"]).content == ""
    llm = _by_name(DollyLLM, memorized_neox_dir, engine, stop=[" capital"])
    assert llm.invoke(COLOR[0], stop=[" primary"]) == "Blue is a"
    assert "".join(llm.stream(FRANCE[0])) == "Paris is the"
    assert chat._get_ls_params(stop=["x"])["ls_stop"] == [" capital", "x"]


def test_streaming_true_invokes_through_the_stream(memorized_neox_dir, engine):
    class Collect(BaseCallbackHandler):
        def __init__(self):
            self.tokens = []

        def on_llm_new_token(self, token, **kwargs):
            self.tokens.append(token)

    for cls in (ChatDolly, DollyLLM):
        model = _by_name(cls, memorized_neox_dir, engine, streaming=True)
        collect = Collect()
        answer = model.invoke(FRANCE[0], config={"callbacks": [collect]})
        assert getattr(answer, "content", answer) == FRANCE[2]
        assert len([t for t in collect.tokens if t]) > 1 and "".join(collect.tokens) == FRANCE[2]


def test_seed_makes_sampling_reproducible(memorized_neox_dir, engine):
    if engine == "ctranslate2":
        llm = _by_name(DollyLLM, memorized_neox_dir, engine, do_sample=True, temperature=0.7)
        with pytest.raises(NotSupportedError, match="engine='transformers'"):
            llm.invoke("Name the capital", seed=1)
        assert llm.invoke(FRANCE[0], seed=1, temperature=0) == FRANCE[2]  # greedy needs no seed
        return
    llm = _by_name(DollyLLM, memorized_neox_dir, engine, do_sample=True, temperature=5.0, top_p=1.0, max_tokens=12)
    prompt = "Name the capital"
    first = [llm.invoke(prompt, seed=seed) for seed in (1, 2, 3)]
    assert [llm.invoke(prompt, seed=seed) for seed in (1, 2, 3)] == first
    assert len(set(first)) > 1  # hot sampling: the seeds give different answers
    seeded = _by_name(DollyLLM, memorized_neox_dir, engine, do_sample=True, temperature=5.0, top_p=1.0,
                      max_tokens=12, seed=2)
    assert seeded.invoke(prompt) == first[1]


# -- 7: repetition_penalty and no_repeat_ngram_size on every engine -------------------------------------------------


def test_no_repeat_ngram_size_and_repetition_penalty_on_both_engines(memorized_neox_dir, engine):
    llm = _by_name(DollyLLM, memorized_neox_dir, engine, max_tokens=30)
    prompt = "the the the the"
    if engine == "llamacpp":  # llama.cpp has no such sampler: refused, naming the option, not ignored
        with pytest.raises(NotSupportedError, match="no_repeat_ngram_size"):
            llm.invoke(prompt, no_repeat_ngram_size=2)
    for size in (1, 2) if engine != "llamacpp" else ():
        ids = llm.runtime.generate([llm.codec.encode_prompt(prompt)],
                                   llm._sampling({"no_repeat_ngram_size": size}))[0].token_ids
        grams = [tuple(ids[i:i + size]) for i in range(len(ids) - size + 1)]
        assert len(grams) == len(set(grams)), (size, ids)
    plain = llm.runtime.generate([llm.codec.encode_prompt(FRANCE[0])], llm._sampling({}))[0].token_ids
    penalized = llm.runtime.generate([llm.codec.encode_prompt(FRANCE[0])],
                                     llm._sampling({"repetition_penalty": 50.0}))[0].token_ids
    assert penalized != plain  # a huge penalty forbids the memorized answer's repeated tokens ("France" again)
    assert len(penalized) == len(set(penalized))
    assert llm.invoke(FRANCE[0], repetition_penalty=1.0, no_repeat_ngram_size=0) == FRANCE[2]
    if engine != "llamacpp":
        # Only the response's own n-grams count: the answer may copy "capital of France" from the question.
        assert llm.invoke(FRANCE[0], no_repeat_ngram_size=2) == FRANCE[2]


# -- 3: usage and metadata ----------------------------------------------------------------------------------------


def test_usage_metadata_and_finish_reason(memorized_neox_dir, engine):
    chat = _by_name(ChatDolly, memorized_neox_dir, engine)
    message = chat.invoke(FRANCE[0])
    prompt_tokens = chat.count_prompt_tokens([HumanMessage(FRANCE[0])])
    usage = message.usage_metadata
    assert usage["input_tokens"] == prompt_tokens and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert message.response_metadata["finish_reason"] == "stop"
    assert message.response_metadata["model_name"] == str(memorized_neox_dir)
    cut = chat.invoke(FRANCE[0], max_tokens=2)
    assert cut.response_metadata["finish_reason"] == "length" and cut.usage_metadata["output_tokens"] == 2

    chunks = list(chat.stream(FRANCE[0]))
    with_usage = [c for c in chunks if c.usage_metadata]
    assert len(with_usage) == 1 and with_usage[0] is chunks[-1]
    total = sum(chunks[1:], chunks[0])
    assert isinstance(total, AIMessageChunk) and total.content == FRANCE[2]
    assert total.usage_metadata == usage and total.response_metadata["finish_reason"] == "stop"
    batch = chat.batch([FRANCE[0], COLOR[0]])
    assert batch[0].usage_metadata == usage and batch[1].usage_metadata["output_tokens"] > 0

    llm = DollyLLM.from_model_id(str(memorized_neox_dir), engine=engine, do_sample=False, max_new_tokens=40,
                                 **{"ctranslate2": {"compute_type": "float32"},
                                    "llamacpp": {"compute_type": "f32"}}.get(engine, {}))
    result = llm.generate([FRANCE[0], COLOR[0]])
    info = result.generations[0][0].generation_info
    assert info["finish_reason"] == "stop" and info["usage_metadata"] == usage
    assert info["model_name"] == str(memorized_neox_dir)
    assert result.llm_output["token_usage"]["prompt_tokens"] == sum(
        g[0].generation_info["usage_metadata"]["input_tokens"] for g in result.generations)
    last = list(llm.stream(FRANCE[0], max_tokens=3))
    assert last  # the final chunk's generation_info is seen through _stream
    final = list(llm._stream(FRANCE[0], max_tokens=3))[-1]
    assert final.generation_info["finish_reason"] == "length"


def test_ls_model_name_is_always_a_string(memorized_neox_dir, ct2_cache):
    pytest.importorskip("ctranslate2")
    llm = DollyLLM.from_model_id(str(memorized_neox_dir), engine="ctranslate2", compute_type="float32")
    bare = DollyLLM(runtime=llm.runtime)
    assert bare.model_id is None and isinstance(bare._get_ls_params()["ls_model_name"], str)
    assert isinstance(ChatDolly(runtime=llm.runtime)._get_ls_params()["ls_model_name"], str)


# -- timeout ------------------------------------------------------------------------------------------------------


class SlowEngine(GenerationEngine):
    """Token 300 every 10 ms until its rows end; records how many tokens each batch generated."""

    name = "slow"
    device = "cpu"
    context_window = 4096

    def __init__(self):
        self.generated = []

    def generate(self, prompts, options, stop_token_ids, on_token=None):
        tracker = RowTracker(len(prompts), stop_token_ids, on_token, options.logprobs)
        for _ in range(options.max_new_tokens):
            for row in range(len(prompts)):
                tracker.add(row, 300, None)
            if tracker.all_done:
                break
            time.sleep(0.01)
        self.generated.append([len(o.token_ids) for o in tracker.outputs])
        return tracker.outputs


def test_timeout_raises_and_frees_the_slot(dolly_tokenizer):
    engine = SlowEngine()
    runtime = DollyRuntime(PromptCodec(dolly_tokenizer, "dolly"), engine)
    chat = ChatDolly(runtime=runtime, temperature=0, max_tokens=1000, timeout=0.2)
    llm = DollyLLM(runtime=runtime, temperature=0, max_tokens=1000, timeout=0.2)
    for call in (lambda: chat.invoke("hi"), lambda: llm.invoke("hi"), lambda: list(chat.stream("hi")),
                 lambda: asyncio.run(chat.ainvoke("hi")), lambda: asyncio.run(_drain(llm.astream("hi")))):
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="timeout=0.2"):
            call()
        assert time.monotonic() - start < 5
    deadline = time.monotonic() + 5
    while len(engine.generated) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(engine.generated) == 5 and all(rows[0] < 200 for rows in engine.generated)  # stopped, not run to 1000
    assert chat.invoke("hi", timeout=30, max_tokens=3).content  # a per-call timeout; the slot is free again


async def _drain(stream):
    return [chunk async for chunk in stream]


def test_structured_output_is_refused_where_the_engine_cannot_constrain(dolly_tokenizer):
    runtime = DollyRuntime(PromptCodec(dolly_tokenizer, "dolly"), SlowEngine())
    with pytest.raises(NotSupportedError, match="JSON schema"):
        ChatDolly(runtime=runtime, max_tokens=3).invoke("hi", response_format={"type": "json_object"})


def test_bind_tools_names_structured_output():
    with pytest.raises(NotSupportedError, match=re.escape("with_structured_output")):
        ChatDolly().bind_tools([])
