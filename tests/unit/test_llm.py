import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from pydantic import ValidationError

from conftest import MEMORIZED
from dolly_langchain.llm import DollyLLM, StreamingResponse

FRANCE, COLOR, SUMMARY = MEMORIZED
CONTEXT_PROMPT = f"{SUMMARY[0]}\n\nInput:\n{SUMMARY[1]}"


# Every LangChain contract test runs on every engine (CTranslate2 and llama.cpp in float32, so outputs equal
# transformers').
ENGINES = [
    pytest.param({"engine": "transformers"}, id="transformers"),
    pytest.param({"engine": "ctranslate2", "compute_type": "float32"}, id="ctranslate2"),
    pytest.param({"engine": "llamacpp", "compute_type": "f32"}, id="llamacpp"),
]


@pytest.fixture(scope="module", params=ENGINES)
def llm(request, memorized_neox_dir, ct2_cache):
    if request.param["engine"] == "ctranslate2":
        pytest.importorskip("ctranslate2")
    if request.param["engine"] == "llamacpp":
        pytest.importorskip("xllamacpp")
    return DollyLLM.from_model_id(
        str(memorized_neox_dir), do_sample=False, max_new_tokens=40, batch_size=4, **request.param
    )


@pytest.fixture
def count_batches(llm, monkeypatch):
    """Sizes of the batches the engine is given."""
    calls = []
    generate = llm.generation_engine.generate

    def counting_generate(prompts, *args, **kwargs):
        calls.append(len(prompts))
        return generate(prompts, *args, **kwargs)

    monkeypatch.setattr(llm.generation_engine, "generate", counting_generate)
    return calls


def test_invoke_returns_only_the_response(llm):
    assert llm.invoke(FRANCE[0]) == FRANCE[2]
    assert llm.invoke(CONTEXT_PROMPT) == SUMMARY[2]


def test_stop_is_honoured_in_invoke_batch_and_stream(llm):
    assert llm.invoke(FRANCE[0], stop=[" capital"]) == "Paris is the"
    assert llm.batch([FRANCE[0], COLOR[0]], stop=[" primary", " capital"]) == ["Paris is the", "Blue is a"]
    assert "".join(llm.stream(FRANCE[0], stop=[" capital"])) == "Paris is the"


def test_batch_equals_invoke_and_really_batches(llm, count_batches):
    prompts = [FRANCE[0], CONTEXT_PROMPT, COLOR[0], "Name the capital", "What is", "Summarize"]
    singles = [llm.invoke(p) for p in prompts]
    count_batches.clear()
    assert llm.batch(prompts) == singles
    assert sorted(count_batches) == [2, 4]  # batch_size=4: one engine batch of 4 prompts, one of the other 2


def test_stream_chunks_join_to_invoke_and_fire_callbacks(llm):
    tokens = []

    class Collect(BaseCallbackHandler):
        def on_llm_new_token(self, token, **kwargs):
            tokens.append(token)

    chunks = list(llm.stream(CONTEXT_PROMPT, config={"callbacks": [Collect()]}))
    assert len(chunks) > 1
    assert "".join(chunks) == llm.invoke(CONTEXT_PROMPT) == SUMMARY[2]
    assert tokens == chunks


def test_astream_and_ainvoke(llm):
    async def run():
        return [c async for c in llm.astream(FRANCE[0])], await llm.ainvoke(COLOR[0])

    chunks, answer = asyncio.run(run())
    assert "".join(chunks) == FRANCE[2] and answer == COLOR[2]


def test_stream_reraises_errors_from_the_generation_thread(llm, monkeypatch):
    def broken_generate(prompts, options, stop_ids, on_token=None, **kwargs):
        on_token(0, 5, None)  # a token arrives, then the engine fails
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(llm.generation_engine, "generate", broken_generate)
    with pytest.raises(RuntimeError, match="simulated"):
        list(llm.stream(FRANCE[0]))
    with pytest.raises(RuntimeError, match="simulated"):
        llm.invoke(FRANCE[0])


def test_threads_get_the_same_results_as_sequential_calls(llm):
    prompts = [FRANCE[0], COLOR[0], CONTEXT_PROMPT] * 3
    sequential = [llm.invoke(p) for p in prompts]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(llm.invoke, prompts))
    assert parallel == sequential
    results = {}

    def streamer(i):
        results[i] = "".join(llm.stream(prompts[i]))

    threads = [threading.Thread(target=streamer, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(3)] == sequential[:3]


def test_bad_input_is_refused(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.invoke("")
    with pytest.raises(ValueError, match="empty"):
        llm.invoke("  \n ")
    with pytest.raises(TypeError, match="unknown keyword"):
        llm.invoke(FRANCE[0], max_length=5)
    with pytest.raises(ValidationError):
        DollyLLM(pipeline=llm.pipeline, max_length=5)
    with pytest.raises(ValidationError, match="InstructionTextGenerationPipeline"):
        DollyLLM(pipeline="not a pipeline")
    with pytest.raises(TypeError, match="unknown options"):
        DollyLLM.from_model_id("unused", max_length=5)


def test_per_call_options_override_fields(llm):
    short = llm.invoke(FRANCE[0], max_new_tokens=2)
    assert short and FRANCE[2].startswith(short) and len(short) < len(FRANCE[2])


def test_identifying_and_tracing_params(llm, memorized_neox_dir):
    params = llm._identifying_params
    assert params["model_id"] == str(memorized_neox_dir) and params["prompt_format"] == "dolly"
    assert params["max_new_tokens"] == 40 and params["do_sample"] is False
    assert params["engine"] == llm.generation_engine.name
    ls = llm._get_ls_params(stop=["x"])
    assert ls["ls_model_name"] == str(memorized_neox_dir) and ls["ls_prompt_format"] == "dolly"
    assert ls["ls_stop"] == ["x"] and ls["ls_model_type"] == "llm" and ls["ls_max_tokens"] == 40
    assert ls["ls_engine"] == llm.generation_engine.name
    assert llm.tokenizer is not None and llm.context_window == 512
    if llm.generation_engine.name == "transformers":
        assert llm.pipeline.model is not None and llm.pipeline.tokenizer is llm.tokenizer
    else:
        assert llm.pipeline is None and params["compute_type"] in ("float32", "f32")


def test_bring_your_own_pipeline(llm):
    if llm.pipeline is None:
        pytest.skip("the ctranslate2 engine has no transformers pipeline")
    other = DollyLLM(pipeline=llm.pipeline, do_sample=False, max_new_tokens=40)
    assert other.invoke(COLOR[0]) == COLOR[2]
    assert other.runtime is llm.runtime  # one pipeline, one scheduler: their calls share batches


@pytest.mark.parametrize(
    "pieces, stops",
    [
        (["  Hel", "lo wor", "ld  ", "\n"], []),
        (["Paris is", " the capi", "tal of"], [" capital"]),
        (["a ##", "# E", "nd b"], ["### End"]),
        (["a ##", "x ### Enough"], ["### End"]),
        (["\n", " ", "x", " ", " y"], ["zz"]),
    ],
)
def test_streaming_response_joins_to_cut_and_stripped_text(pieces, stops):
    from dolly_langchain.pipeline import cut_at_stop

    buffer = StreamingResponse(stops)
    out = [buffer.feed(p) for p in pieces] + [buffer.finish()]
    assert "".join(out) == cut_at_stop("".join(pieces).lstrip(), stops).strip()


# -- tokens and the context window --------------------------------------------------------------------------------

WINDOW = 512  # max_position_embeddings of the tiny fixture models


def _words(n: int) -> str:
    import random

    from conftest import _WORDS

    rng = random.Random(n)
    return " ".join(rng.choice(_WORDS) for _ in range(n))


@pytest.fixture
def no_hub_tokenizer(monkeypatch):
    """Make LangChain's gpt2 fallback and any GPT-2 tokenizer download fail loudly."""
    import langchain_core.language_models.base as lc_base
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("LangChain's gpt2 tokenizer (a hub download) was used")

    monkeypatch.setattr(lc_base, "_get_token_ids_default_method", refuse)
    monkeypatch.setattr(lc_base, "get_tokenizer", refuse)
    monkeypatch.setattr(transformers.GPT2TokenizerFast, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


def test_token_counts_use_the_pipelines_tokenizer_not_the_hub(llm, dolly_tokenizer, no_hub_tokenizer):
    for text in ("Name three primary colors.", FRANCE[2], _words(300), "x"):
        ids = dolly_tokenizer(text)["input_ids"]
        assert llm.get_token_ids(text) == ids
        assert llm.get_num_tokens(text) == len(ids) == len(llm.tokenizer.encode(text))
    assert llm.get_num_tokens("") == 0
    # Control strings in the text are counted as the plain text the model reads them as, not as one token.
    assert llm.get_num_tokens("### End") > 1
    assert dolly_tokenizer.convert_tokens_to_ids("### End") not in llm.get_token_ids("a ### End b")
    # Messages are counted with the same tokenizer.
    from langchain_core.messages import HumanMessage

    assert llm.get_num_tokens_from_messages([HumanMessage(FRANCE[0])]) == len(dolly_tokenizer(f"Human: {FRANCE[0]}")["input_ids"])


def test_custom_get_token_ids_is_honoured(llm):
    custom = DollyLLM(runtime=llm.runtime, custom_get_token_ids=lambda text: [1] * len(text.split()))
    assert custom.get_num_tokens("one two three") == 3


def test_count_prompt_tokens_counts_the_prompt_the_model_reads(llm, dolly_tokenizer):
    from dolly_langchain.prompts import format_prompt

    for instruction, context, _ in MEMORIZED:
        prompt = f"{instruction}\n\nInput:\n{context}" if context else instruction
        assert llm.count_prompt_tokens(prompt) == len(dolly_tokenizer(format_prompt(instruction, context))["input_ids"])
        assert llm.count_prompt_tokens(prompt) > llm.get_num_tokens(prompt)  # the format adds its own tokens
    assert llm.context_window == WINDOW == llm.generation_engine.context_window


def _over_window_prompt(llm, max_new_tokens=40):
    """A prompt of fewer than WINDOW tokens that no longer fits once max_new_tokens are added."""
    for n in range(300, 400):
        prompt = _words(n)
        tokens = llm.count_prompt_tokens(prompt)
        if WINDOW - max_new_tokens + 5 <= tokens <= WINDOW - 5:
            return prompt, tokens
    raise AssertionError("no prompt of the wanted length")


def _window_error(tokens, max_new_tokens=40):
    return (
        rf"the prompt is {tokens} tokens and max_new_tokens is {max_new_tokens}: {tokens + max_new_tokens} tokens "
        rf"do not fit the model's window of {WINDOW}\. Shorten the context \(or retrieve fewer passages\), or lower "
        r"max_new_tokens"
    )


@pytest.fixture
def count_generate(llm, monkeypatch):
    """Shapes (rows, longest prompt) of what the engine is asked to generate."""
    calls = []
    generate = llm.generation_engine.generate

    def counting_generate(prompts, *args, **kwargs):
        calls.append((len(prompts), max(len(p) for p in prompts)))
        return generate(prompts, *args, **kwargs)

    monkeypatch.setattr(llm.generation_engine, "generate", counting_generate)
    return calls


def test_prompt_over_the_window_raises_in_invoke_batch_and_stream(llm, count_generate):
    import warnings

    prompt, tokens = _over_window_prompt(llm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clear error, not a warning
        with pytest.raises(ValueError, match=_window_error(tokens)):
            llm.invoke(prompt)
        with pytest.raises(ValueError, match=_window_error(tokens)):
            list(llm.stream(prompt))
        with pytest.raises(ValueError, match=_window_error(tokens)):
            asyncio.run(llm.ainvoke(prompt))
        # In a batch every prompt is checked before any is generated, wherever the long one is.
        for prompts in ([FRANCE[0], COLOR[0], prompt], [prompt, FRANCE[0]]):
            with pytest.raises(ValueError, match=_window_error(tokens)):
                llm.batch(prompts)
    assert count_generate == []


def test_max_new_tokens_counts_against_the_window(llm, count_generate):
    prompt, tokens = _over_window_prompt(llm)
    fits = WINDOW - tokens
    with pytest.raises(ValueError, match=_window_error(tokens, fits + 1)):
        llm.invoke(prompt, max_new_tokens=fits + 1)
    assert count_generate == []
    llm.invoke(prompt, max_new_tokens=fits)  # exactly the window: generated
    assert count_generate == [(1, tokens)]
    small = DollyLLM(runtime=llm.runtime, do_sample=False, max_new_tokens=fits)
    assert small.batch([prompt, FRANCE[0]])[1] == FRANCE[2]


def test_the_pipeline_itself_refuses_a_prompt_over_the_window(llm, count_generate):
    if llm.pipeline is None:
        pytest.skip("the ctranslate2 engine has no transformers pipeline")
    prompt, tokens = _over_window_prompt(llm)
    with pytest.raises(ValueError, match=_window_error(tokens)):
        llm.pipeline(prompt, max_new_tokens=40)
    assert count_generate == []


def test_a_tail_held_back_until_generation_ends_is_streamed(dolly_tokenizer):
    """A row that ends on part of a multi-byte character: the watcher held it back (it decodes as U+FFFD until the
    rest arrives) and must still emit it at the end, so the stream equals the decoded answer."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from dolly_langchain.codec import ResponseWatcher

    ids = dolly_tokenizer("Paris is", add_special_tokens=False)["input_ids"]
    ids.append(dolly_tokenizer.convert_tokens_to_ids(bytes_to_unicode()[0xC3]))  # first byte of "é" only
    expected = dolly_tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert expected.endswith("\ufffd")
    watcher = ResponseWatcher(dolly_tokenizer, [])
    streamed = "".join(watcher.push(i)[0] for i in ids) + watcher.finish()
    assert streamed == expected


def test_an_empty_answer_streams_as_one_empty_chunk(llm):
    """A stop string at the very start leaves nothing to say: invoke gives "", and stream one "" (LangChain refuses a
    stream without chunks)."""
    assert llm.invoke(FRANCE[0], stop=["Paris"]) == ""
    assert list(llm.stream(FRANCE[0], stop=["Paris"])) == [""]

    async def collect():
        return [c async for c in llm.astream(FRANCE[0], stop=["Paris"])]

    assert asyncio.run(collect()) == [""]


def test_the_pipeline_adapter_is_made_only_when_asked_for(memorized_neox_dir):
    """Generation never needs Dolly's pipeline adapter: a transformers DollyLLM answers without importing it, and
    ``llm.pipeline`` gives the adapter over the same runtime (so its calls share the batches)."""
    import subprocess
    import sys

    code = (
        "import sys; from dolly_langchain.llm import DollyLLM; from dolly_langchain.chat import ChatDolly; "
        f"llm = DollyLLM.from_model_id({str(memorized_neox_dir)!r}, engine='transformers', do_sample=False, "
        "max_new_tokens=8); llm.invoke('Name a primary color.'); ChatDolly.from_llm(llm).invoke('Hi'); "
        "print('dolly_langchain.pipeline' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

    llm = DollyLLM.from_model_id(str(memorized_neox_dir), engine="transformers", do_sample=False, max_new_tokens=40)
    assert llm.pipeline.runtime is llm.runtime and llm.pipeline is llm.pipeline
    assert llm.pipeline(COLOR[0]) == [{"generated_text": COLOR[2]}]


def test_the_pipeline_adapter_runs_on_transformers_only(memorized_neox_dir, ct2_cache):
    pytest.importorskip("ctranslate2")
    from dolly_langchain.pipeline import InstructionTextGenerationPipeline

    llm = DollyLLM.from_model_id(str(memorized_neox_dir), engine="ctranslate2", compute_type="float32")
    assert llm.pipeline is None
    with pytest.raises(ValueError, match="transformers engine"):
        InstructionTextGenerationPipeline.from_runtime(llm.runtime)
