"""The engine seam, concurrent batching, cancellation, error isolation and log-probabilities, on every engine."""

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import MEMORIZED
from dolly_langchain.codec import PromptCodec
from dolly_langchain.engines.base import EngineOutput, GenerationEngine, RowTracker, SamplingOptions, length_groups
from dolly_langchain.llm import DollyLLM
from dolly_langchain.runtime import DollyRuntime

FRANCE, COLOR, SUMMARY = MEMORIZED
CONTEXT_PROMPT = f"{SUMMARY[0]}\n\nInput:\n{SUMMARY[1]}"
PROMPTS = [FRANCE[0], COLOR[0], CONTEXT_PROMPT, "Name the capital", "What is", "Summarize"]


@pytest.fixture(scope="module", params=["transformers", "ctranslate2", "llamacpp"])
def llm(request, memorized_neox_dir, ct2_cache):
    options = {"engine": request.param}
    if request.param == "ctranslate2":
        pytest.importorskip("ctranslate2")
        options["compute_type"] = "float32"
    if request.param == "llamacpp":
        pytest.importorskip("xllamacpp")
        options["compute_type"] = "f32"
    return DollyLLM.from_model_id(str(memorized_neox_dir), do_sample=False, max_new_tokens=40, batch_size=8, **options)


@pytest.fixture
def batches(llm, monkeypatch):
    """Prompt counts of the batches the engine runs."""
    sizes = []
    generate = llm.generation_engine.generate

    def counting(prompts, *args, **kwargs):
        sizes.append(len(prompts))
        return generate(prompts, *args, **kwargs)

    monkeypatch.setattr(llm.generation_engine, "generate", counting)
    return sizes


def test_engines_agree_token_for_token(memorized_neox_dir, ct2_cache):
    pytest.importorskip("ctranslate2")
    reference = DollyLLM.from_model_id(str(memorized_neox_dir), engine="transformers", do_sample=False,
                                       max_new_tokens=40, logprobs=True)
    fast = DollyLLM.from_model_id(str(memorized_neox_dir), engine="ctranslate2", compute_type="float32",
                                  do_sample=False, max_new_tokens=40, logprobs=True)
    for prompt in PROMPTS:
        ids = reference.codec.encode_prompt(prompt)
        options = SamplingOptions(max_new_tokens=12, logprobs=True)
        [a] = reference.generation_engine.generate([ids], options, reference.codec.stop_token_ids)
        [b] = fast.generation_engine.generate([ids], options, fast.codec.stop_token_ids)
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)


def test_concurrent_ainvoke_calls_share_batches_and_equal_lone_calls(llm, batches):
    prompts = PROMPTS * 2
    alone = [llm.invoke(p) for p in prompts]
    batches.clear()

    async def run():
        return await asyncio.gather(*(llm.ainvoke(p) for p in prompts))

    assert asyncio.run(run()) == alone
    assert sum(batches) == len(prompts) and max(batches) > 1 and len(batches) < len(prompts)


def test_calls_from_threads_share_batches(llm, batches):
    prompts = PROMPTS * 2
    alone = [llm.invoke(p) for p in prompts]
    batches.clear()
    barrier = threading.Barrier(len(prompts))

    def call(prompt):
        barrier.wait()
        return llm.invoke(prompt)

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        assert list(pool.map(call, prompts)) == alone
    assert sum(batches) == len(prompts) and max(batches) > 1


def test_abatch_and_batch_split_by_batch_size(llm, batches):
    prompts = PROMPTS * 2  # 12 prompts, batch_size 8
    expected = [llm.invoke(p) for p in prompts]
    batches.clear()
    assert asyncio.run(llm.abatch(prompts)) == expected
    assert sorted(batches) == [4, 8]
    batches.clear()
    assert llm.batch(prompts) == expected
    assert sorted(batches) == [4, 8]


def test_an_engine_error_reaches_only_the_call_that_caused_it(llm, monkeypatch):
    bad_ids = llm.codec.encode_prompt("Summarize")
    generate = llm.generation_engine.generate

    def failing(prompts, *args, **kwargs):
        if any(list(p) == bad_ids for p in prompts):
            raise RuntimeError("this prompt breaks the engine (simulated)")
        return generate(prompts, *args, **kwargs)

    monkeypatch.setattr(llm.generation_engine, "generate", failing)

    async def run():
        return await asyncio.gather(*(llm.ainvoke(p) for p in [FRANCE[0], "Summarize", COLOR[0]]),
                                    return_exceptions=True)

    good1, bad, good2 = asyncio.run(run())
    assert good1 == FRANCE[2] and good2 == COLOR[2]
    assert isinstance(bad, RuntimeError) and "simulated" in str(bad)
    # A validation error also stays with its own call and never reaches the engine.
    with ThreadPoolExecutor(max_workers=2) as pool:
        ok = pool.submit(llm.invoke, FRANCE[0])
        empty = pool.submit(llm.invoke, " ")
        assert ok.result() == FRANCE[2]
        with pytest.raises(ValueError, match="empty"):
            empty.result()


def test_logprobs_in_generation_info(llm):
    result = llm.generate([FRANCE[0]], logprobs=True)
    generation = result.generations[0][0]
    info = generation.generation_info["logprobs"]
    assert generation.text == FRANCE[2]
    assert "".join(info["tokens"]).strip() == FRANCE[2]
    assert len(info["tokens"]) == len(info["token_logprobs"]) == len(info["token_ids"])
    assert all(lp <= 0 and math.isfinite(lp) for lp in info["token_logprobs"])
    # The first token's log-probability is the model's log-softmax at the end of the prompt.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llm.model_id)
    ids = torch.tensor([llm.codec.encode_prompt(FRANCE[0])])
    with torch.no_grad():
        expected = torch.log_softmax(model(ids).logits[0, -1], -1)[info["token_ids"][0]].item()
    assert info["token_logprobs"][0] == pytest.approx(expected, abs=1e-3)
    # Off by default; streaming carries them on its last chunk.
    assert "logprobs" not in llm.generate([FRANCE[0]]).generations[0][0].generation_info
    with_logprobs = DollyLLM(runtime=llm.runtime, do_sample=False, max_new_tokens=40, logprobs=True)
    chunks = list(with_logprobs._stream(FRANCE[0]))
    assert "".join(c.text for c in chunks) == FRANCE[2]
    assert chunks[-1].generation_info["logprobs"]["token_ids"] == info["token_ids"]


def test_logprobs_stop_at_a_stop_string(llm):
    info = llm.generate([FRANCE[0]], stop=[" capital"], logprobs=True).generations[0][0].generation_info["logprobs"]
    assert "".join(info["tokens"]).strip().startswith("Paris is the")
    assert "France" not in "".join(info["tokens"])


# -- cancellation, with an engine slow enough to cancel ---------------------------------------------------------


class SlowEngine(GenerationEngine):
    """Emits token 300 every 5 ms until a row is stopped or reaches max_new_tokens; counts what it generated."""

    name = "slow"

    def __init__(self):
        self.generated = []  # per batch: tokens per row

    @property
    def device(self):
        return "cpu"

    @property
    def context_window(self):
        return 512

    def generate(self, prompts, options, stop_token_ids, on_token=None):
        tracker = RowTracker(len(prompts), stop_token_ids, on_token, options.logprobs)
        for _ in range(options.max_new_tokens):
            for row in range(len(prompts)):
                tracker.add(row, 300, -1.0)
            if tracker.all_done:
                break
            time.sleep(0.005)
        self.generated.append([len(o.token_ids) for o in tracker.outputs])
        return tracker.outputs


@pytest.fixture
def slow_llm(dolly_tokenizer):
    engine = SlowEngine()
    runtime = DollyRuntime(PromptCodec(dolly_tokenizer, "dolly"), engine)
    return DollyLLM(runtime=runtime, do_sample=False, max_new_tokens=400), engine


def test_a_cancelled_ainvoke_frees_its_slot(slow_llm):
    llm, engine = slow_llm

    async def run():
        slow = asyncio.create_task(llm.ainvoke("Write forever."))
        await asyncio.sleep(0.2)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        return await llm.ainvoke("Write a little.", max_new_tokens=3)

    started = time.monotonic()
    answer = asyncio.run(run())
    assert answer and time.monotonic() - started < 1.5  # 400 tokens would take 2 s
    assert engine.generated[0][0] < 100


def test_a_cancelled_call_that_has_not_started_never_reaches_the_engine(slow_llm):
    llm, engine = slow_llm
    llm.runtime.scheduler.batch_size = 1

    async def run():
        first = asyncio.create_task(llm.ainvoke("One.", max_new_tokens=40))
        queued = asyncio.create_task(llm.ainvoke("Two.", max_new_tokens=40))
        await asyncio.sleep(0.05)
        queued.cancel()
        await first
        return await asyncio.gather(queued, return_exceptions=True)

    [outcome] = asyncio.run(run())
    assert isinstance(outcome, asyncio.CancelledError)
    assert engine.generated == [[40]]


def test_abandoning_a_stream_stops_its_row(slow_llm):
    llm, engine = slow_llm

    async def run():
        stream = llm.astream("Write forever.")
        chunks = [await stream.__anext__() for _ in range(3)]
        await stream.aclose()
        return chunks

    assert len(asyncio.run(run())) == 3
    deadline = time.monotonic() + 2
    while not engine.generated and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.generated and engine.generated[0][0] < 100
    # The sync stream too.
    stream = llm.stream("Write forever.")
    next(stream)
    stream.close()
    deadline = time.monotonic() + 2
    while len(engine.generated) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.generated[1][0] < 100


def test_sampling_options_are_checked():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingOptions(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingOptions(do_sample=True, top_p=0)
    assert EngineOutput().token_ids == []


def test_engine_option_errors_are_clear(memorized_neox_dir, ct2_cache):
    pytest.importorskip("ctranslate2")
    with pytest.raises(ValueError, match="transformers options"):
        DollyLLM.from_model_id(str(memorized_neox_dir), engine="ctranslate2", dtype=torch.float16)
    with pytest.raises(ValueError, match="compute_type is a CTranslate2 option"):
        DollyLLM.from_model_id(str(memorized_neox_dir), engine="transformers", compute_type="int8")
    with pytest.raises(ValueError, match="engine must be one of"):
        DollyLLM.from_model_id(str(memorized_neox_dir), engine="vllm")
    with pytest.raises(ValueError, match="compute_type must be one of"):
        DollyLLM.from_model_id(str(memorized_neox_dir), engine="ctranslate2", compute_type="int3")
    import ctranslate2

    if ctranslate2.get_cuda_device_count() == 0:
        with pytest.raises(ValueError, match="no CUDA GPU"):
            DollyLLM.from_model_id(str(memorized_neox_dir), engine="ctranslate2", device="cuda")


def test_sampling_runs_on_both_engines(llm):
    text = llm.invoke(FRANCE[0], do_sample=True, temperature=0.7, top_p=0.9, top_k=20)
    assert isinstance(text, str)


def test_length_groups_split_only_where_padding_costs_more_than_a_second_loop():
    # Thirteen questions and three long RAG prompts (prompt lengths of benchmarks/generation.py's batch).
    lengths = [40, 259, 36, 177, 37, 38, 39, 42, 44, 47, 191, 49, 49, 60, 67, 36]
    groups = length_groups(lengths, max_new_tokens=64, step_cost=16)
    assert sorted(len(g) for g in groups) == [3, 13]
    assert sorted(lengths[i] for i in groups[-1]) == [177, 191, 259]
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert length_groups([10, 12, 14, 30], 64, 16) == [[0, 1, 2, 3]]      # similar lengths stay one batch
    assert length_groups([10, 500], 64, 10_000) == [[0, 1]]                # a costly loop is never worth it
    assert length_groups([], 64, 16) == []


def test_ctranslate2_rows_of_very_different_lengths_run_apart_and_come_back_in_order(
    memorized_neox_dir, ct2_cache, monkeypatch
):
    pytest.importorskip("ctranslate2")
    fast = DollyLLM.from_model_id(str(memorized_neox_dir), engine="ctranslate2", compute_type="float32",
                                  do_sample=False, max_new_tokens=8)
    codec, engine = fast.codec, fast.generation_engine
    long_prompt = codec.encode_prompt(" ".join([CONTEXT_PROMPT] * 12))
    prompts = [codec.encode_prompt(FRANCE[0]), long_prompt, codec.encode_prompt(COLOR[0])]
    options = SamplingOptions(max_new_tokens=8)
    calls = []
    generate_batch = engine.generator.generate_batch

    class Spy:
        def __getattr__(self, name):
            return getattr(engine.generator, name)

        def generate_batch(self, tokens, **kwargs):
            calls.append(len(tokens))
            return generate_batch(tokens, **kwargs)

    alone = [engine.generate([p], options, codec.stop_token_ids)[0].token_ids for p in prompts]
    monkeypatch.setattr(engine, "generator", Spy())
    together = [out.token_ids for out in engine.generate(prompts, options, codec.stop_token_ids)]
    assert together == alone
    assert sorted(calls) == [1, 2]
