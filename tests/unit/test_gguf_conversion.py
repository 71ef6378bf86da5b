"""GGUF conversions for the llamacpp engine: llama.cpp on the converted file computes what transformers computes."""

import json

import pytest

pytest.importorskip("xllamacpp")
pytest.importorskip("gguf")

from conftest import MEMORIZED, _save  # noqa: E402
from dolly_langchain.engines.gguf_conversion import (  # noqa: E402
    CONVERSION_RECORD,
    GGUF_FILE,
    convert_to_gguf,
    read_conversion_record,
)
from dolly_langchain.engines.llamacpp_engine import LlamaCppEngine  # noqa: E402
from dolly_langchain.engines.transformers_engine import TransformersEngine  # noqa: E402
from dolly_langchain.errors import NotSupportedError  # noqa: E402
from dolly_langchain.generation import SamplingOptions  # noqa: E402
from dolly_langchain.llm import DollyLLM  # noqa: E402


def tiny_llama(vocab_size: int, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, initializer_range=0.3,
                         **overrides)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, dolly_tokenizer):
    """A random tiny Llama (grouped-query attention, tied embeddings: SmolLM2's layout) + Dolly tokenizer."""
    return _save(tmp_path_factory.mktemp("tiny-llama"), tiny_llama(len(dolly_tokenizer)), dolly_tokenizer)


def _reference(model_dir):
    from transformers import AutoModelForCausalLM

    return TransformersEngine(AutoModelForCausalLM.from_pretrained(model_dir).eval(), 0)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "memorized_neox_dir"])
def test_float32_conversion_generates_what_transformers_generates(fixture, request, dolly_tokenizer, ct2_cache):
    model_dir = request.getfixturevalue(fixture)
    engine = LlamaCppEngine.from_model(str(model_dir), compute_type="f32", parallel=4)
    reference = _reference(model_dir)
    prompts = [dolly_tokenizer.encode(text) for text in
               ("What is the capital of France?", "cat sat mat blue water", "Name three", MEMORIZED[2][1])]
    options = SamplingOptions(max_new_tokens=12, logprobs=True)
    together = engine.generate(prompts, options, [])  # four rows at once, on llama.cpp's slots
    expected = reference.generate(prompts, options, [])
    for ours, theirs in zip(together, expected):
        assert ours.token_ids == theirs.token_ids
        assert ours.logprobs == pytest.approx(theirs.logprobs, abs=1e-3)
    if fixture == "tiny_llama_dir":
        assert len({t for o in together for t in o.token_ids}) > 4  # random weights that still pick varied tokens
    alone = [engine.generate([p], options, [])[0].token_ids for p in prompts]
    assert alone == [o.token_ids for o in together]


def test_eight_bit_conversion_keeps_the_memorized_answers(memorized_neox_dir, ct2_cache):
    llm = DollyLLM.from_model_id(str(memorized_neox_dir), engine="llamacpp", compute_type="q8_0", do_sample=False,
                                 max_new_tokens=40)
    assert llm.generation_engine.describe()["compute_type"] == "q8_0"
    for instruction, context, response in MEMORIZED:
        prompt = instruction if context is None else f"{instruction}\n\nInput:\n{context}"
        assert llm.invoke(prompt) == response


def test_a_conversion_is_cached_and_recorded(tiny_llama_dir, ct2_cache):
    first = convert_to_gguf(str(tiny_llama_dir), "f16")
    stamp = (first / GGUF_FILE).stat().st_mtime_ns
    again = convert_to_gguf(str(tiny_llama_dir), "f16")
    assert again == first and (again / GGUF_FILE).stat().st_mtime_ns == stamp
    record = read_conversion_record(first)
    assert record["quantization"] == "f16" and record["architecture"] == "llama"
    assert record["source"] == str(tiny_llama_dir.resolve()) and record["context_window"] == 512
    assert record["eos_token_ids"] == [0] and record["light_tokenizer"] is True
    assert (first / "tokenizer.json").is_file()


def test_gpt_j_and_scaled_rope_are_refused_with_nothing_left_behind(tiny_gptj_dir, tmp_path, dolly_tokenizer,
                                                                    ct2_cache):
    cache = tmp_path / "cache"
    with pytest.raises(NotSupportedError, match="GPT-J"):
        convert_to_gguf(str(tiny_gptj_dir), "q8_0", cache=cache)
    scaled = _save(tmp_path / "scaled", tiny_llama(len(dolly_tokenizer),
                                                   rope_scaling={"rope_type": "linear", "factor": 2.0}),
                   dolly_tokenizer)
    with pytest.raises(NotSupportedError, match="plain RoPE"):
        convert_to_gguf(str(scaled), "q8_0", cache=cache)
    leftovers = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert leftovers == []


def test_engine_auto_keeps_gpt_j_off_llamacpp(tiny_gptj_dir, ct2_cache):
    with pytest.raises(NotSupportedError, match="engine='ctranslate2'"):
        DollyLLM.from_model_id(str(tiny_gptj_dir), engine="llamacpp").invoke("Name three")


def test_compute_types_of_the_other_engine_are_refused_by_name(memorized_neox_dir, ct2_cache):
    with pytest.raises(ValueError, match="GGUF type"):
        DollyLLM.from_model_id(str(memorized_neox_dir), engine="ctranslate2", compute_type="q8_0").invoke("x")
    with pytest.raises(ValueError, match="CTranslate2 type"):
        DollyLLM.from_model_id(str(memorized_neox_dir), engine="llamacpp", compute_type="int8").invoke("x")


def test_a_record_without_its_file_is_not_loaded(tmp_path):
    (tmp_path / CONVERSION_RECORD).write_text(json.dumps({"quantization": "f32", "vocab_size": 8}))
    with pytest.raises(ValueError, match="not a GGUF conversion"):
        LlamaCppEngine(tmp_path)


def test_loading_llama_cpp_keeps_the_process_signal_handlers(tiny_llama_dir, ct2_cache):
    """xllamacpp installs llama.cpp's own SIGINT/SIGTERM handlers; loading an engine (here in a thread, as `dolly
    serve` loads) must leave Ctrl+C raising KeyboardInterrupt and SIGTERM reaching the process's handler."""
    import os
    import signal
    import threading
    import time

    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *args: seen.append("term"))
    try:
        engines = []
        loader = threading.Thread(target=lambda: engines.append(
            LlamaCppEngine.from_model(str(tiny_llama_dir), compute_type="f32", parallel=1)))
        loader.start()
        loader.join()
        assert engines, "the engine did not load"
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        assert seen == ["term"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    finally:
        signal.signal(signal.SIGTERM, previous)
