"""convert_to_ctranslate2: converted tiny models generate what transformers generates; the cache is atomic and keyed
by the source files; bad inputs fail with errors that name them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dolly_langchain.engines import conversion
from dolly_langchain.engines.conversion import CONVERSION_RECORD, convert_to_ctranslate2, read_conversion_record
from dolly_langchain.models import ModelNotFoundError
from dolly_langchain.prompts import END_KEY, FORMAT_RECORD_FILE, format_prompt, write_format_record

from conftest import MEMORIZED, tiny_neox

ctranslate2 = pytest.importorskip("ctranslate2")
transformers = pytest.importorskip("transformers")

PLAIN_PROMPTS = ["the cat sat on the mat", "What is the time", "Paris is the capital of"]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One cache for the tests that only read conversions of the session's fixture models."""
    return tmp_path_factory.mktemp("ct2-cache")


@pytest.fixture
def neox_copy(tiny_neox_dir, tmp_path) -> Path:
    """A private copy of the tiny GPT-NeoX, with a prompt-format record, that a test may modify."""
    path = shutil.copytree(tiny_neox_dir, tmp_path / "tiny-neox")
    write_format_record(path)
    return Path(path)


def _transformers_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int]):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    outputs = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop_ids, pad_token_id=stop_ids[0])
            outputs.append(out[0, len(ids):].tolist())
    return model, outputs


def _ctranslate2_greedy(converted: Path, tokenizer, prompts: list[list[int]], max_new_tokens: int, stop_ids):
    generator = ctranslate2.Generator(str(converted), compute_type="float32")
    results = generator.generate_batch(
        [tokenizer.convert_ids_to_tokens(ids) for ids in prompts], max_length=max_new_tokens,
        include_prompt_in_result=False, end_token=tokenizer.convert_ids_to_tokens(stop_ids), return_end_token=True,
    )
    return generator, [result.sequences_ids[0] for result in results]


def _assert_same_logits(generator, model, tokenizer, prompts: list[list[int]]):
    """Every position's logits agree: the strongest check, immune to near-ties in greedy decoding."""
    for ids in prompts:
        ours = np.asarray(generator.forward_batch([tokenizer.convert_ids_to_tokens(ids)]))[0]
        with torch.no_grad():
            reference = model(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_gpt_neox_conversion_answers_like_transformers(memorized_neox_dir, dolly_tokenizer, shared_cache):
    converted = convert_to_ctranslate2(memorized_neox_dir, "float32", cache=shared_cache)
    prompts = [dolly_tokenizer(format_prompt(i, c))["input_ids"] for i, c, _ in MEMORIZED]
    stop_ids = dolly_tokenizer.convert_tokens_to_ids([END_KEY, dolly_tokenizer.eos_token])

    model, expected = _transformers_greedy(memorized_neox_dir, prompts, 40, stop_ids)
    generator, got = _ctranslate2_greedy(converted, dolly_tokenizer, prompts, 40, stop_ids)

    assert got == expected
    # The memorized answers, ended by "### End": conversion kept the model, not just its ties.
    answers = [dolly_tokenizer.decode(ids[:-1]).strip() for ids in got]
    assert answers == [response for _, _, response in MEMORIZED]
    assert all(ids[-1] == stop_ids[0] for ids in got)
    _assert_same_logits(generator, model, dolly_tokenizer, prompts)


@pytest.mark.parametrize("fixture", ["tiny_neox_dir", "tiny_gptj_dir"])
def test_random_tiny_models_generate_like_transformers(fixture, request, dolly_tokenizer, shared_cache):
    source = request.getfixturevalue(fixture)
    converted = convert_to_ctranslate2(source, "float32", cache=shared_cache)
    prompts = [dolly_tokenizer(text)["input_ids"] for text in PLAIN_PROMPTS]
    stop_ids = [dolly_tokenizer.eos_token_id]

    model, expected = _transformers_greedy(source, prompts, 8, stop_ids)
    generator, got = _ctranslate2_greedy(converted, dolly_tokenizer, prompts, 8, stop_ids)

    assert got == expected
    _assert_same_logits(generator, model, dolly_tokenizer, prompts)


def test_conversion_is_self_contained_and_recorded(neox_copy, dolly_tokenizer, tmp_path, capsys):
    converted = convert_to_ctranslate2(neox_copy, "float32", cache=tmp_path / "cache")

    assert converted.parent == tmp_path / "cache" / "ctranslate2"
    assert converted.name.startswith("tiny-neox-") and converted.name.endswith("-float32")
    for name in ("model.bin", "config.json", "vocabulary.json", "generation_config.json", FORMAT_RECORD_FILE):
        assert (converted / name).is_file(), name
    assert (converted / FORMAT_RECORD_FILE).read_text() == (neox_copy / FORMAT_RECORD_FILE).read_text()

    tokenizer = transformers.AutoTokenizer.from_pretrained(converted)
    text = format_prompt("Name a primary color.") + "Blue.\n\n" + END_KEY
    assert tokenizer(text)["input_ids"] == dolly_tokenizer(text)["input_ids"]
    vocabulary = json.loads((converted / "vocabulary.json").read_text())
    assert vocabulary == dolly_tokenizer.convert_ids_to_tokens(list(range(len(dolly_tokenizer))))

    record = read_conversion_record(converted)
    assert record == json.loads((converted / CONVERSION_RECORD).read_text())
    assert record["source"] == str(neox_copy.resolve())
    assert record["compute_type"] == "float32"
    assert record["context_window"] == 512
    assert record["architecture"] == "gpt_neox"
    assert record["ctranslate2_version"] == ctranslate2.__version__
    assert converted.name == f"tiny-neox-{record['fingerprint'][:16]}-float32"

    err = capsys.readouterr().err
    assert f"dolly: converting {neox_copy.resolve()} to CTranslate2 (float32) ..." in err
    assert f"-> {converted}" in err
    assert read_conversion_record(tmp_path) is None


def test_second_call_returns_the_cached_conversion(neox_copy, tmp_path, monkeypatch, capsys):
    first = convert_to_ctranslate2(neox_copy, "float32", cache=tmp_path)
    capsys.readouterr()

    def no_conversion(checkpoint):
        raise AssertionError("converted again")

    monkeypatch.setattr(conversion, "_converter", no_conversion)
    assert convert_to_ctranslate2(str(neox_copy), "float32", cache=tmp_path) == first
    assert capsys.readouterr().err == ""


def test_changed_source_or_compute_type_gets_a_new_conversion(neox_copy, tmp_path):
    first = convert_to_ctranslate2(neox_copy, "float32", cache=tmp_path)
    int8 = convert_to_ctranslate2(neox_copy, "int8", cache=tmp_path)
    assert int8 != first and int8.name.endswith("-int8")
    assert read_conversion_record(int8)["fingerprint"] == read_conversion_record(first)["fingerprint"]

    weights = neox_copy / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # "retrained": a newer file
    second = convert_to_ctranslate2(neox_copy, "float32", cache=tmp_path)

    assert second != first
    assert read_conversion_record(second)["fingerprint"] != read_conversion_record(first)["fingerprint"]
    assert (first / CONVERSION_RECORD).is_file()  # the old one is left alone


def test_failed_conversion_leaves_nothing_behind(neox_copy, tmp_path, monkeypatch):
    real_converter = conversion._converter

    class FailsMidway:
        def __init__(self, checkpoint):
            self.real = real_converter(checkpoint)

        def convert(self, output_dir, **kwargs):
            self.real.convert(output_dir, **kwargs)  # model.bin written...
            raise OSError("disk full")  # ...then the tokenizer can't be

    monkeypatch.setattr(conversion, "_converter", FailsMidway)
    with pytest.raises(RuntimeError, match=rf"CTranslate2 cannot convert {neox_copy.resolve()}.*disk full"):
        convert_to_ctranslate2(neox_copy, "float32", cache=tmp_path)
    assert list((tmp_path / "ctranslate2").iterdir()) == []

    monkeypatch.setattr(conversion, "_converter", real_converter)
    converted = convert_to_ctranslate2(neox_copy, "float32", cache=tmp_path)
    assert [p.name for p in (tmp_path / "ctranslate2").iterdir()] == [converted.name]


def test_unfinished_target_is_replaced(neox_copy, tmp_path):
    converted = convert_to_ctranslate2(neox_copy, "float32", cache=tmp_path)
    (converted / CONVERSION_RECORD).unlink()  # what a crash between files would look like without the temp dir
    assert convert_to_ctranslate2(neox_copy, "float32", cache=tmp_path) == converted
    assert read_conversion_record(converted)["architecture"] == "gpt_neox"


def test_hub_id_converts_its_local_snapshot(neox_copy, tmp_path, monkeypatch):
    import huggingface_hub

    def snapshot_download(repo_id, **kwargs):
        assert repo_id == "acme/tiny-dolly"
        return str(neox_copy)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    converted = convert_to_ctranslate2("acme/tiny-dolly", "float32", cache=tmp_path)
    assert converted.name.startswith("acme--tiny-dolly-")
    assert read_conversion_record(converted)["source"] == "acme/tiny-dolly"


def test_unreachable_hub_id_names_the_id(tmp_path, monkeypatch):
    import huggingface_hub

    def snapshot_download(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the hub and nothing is cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(ModelNotFoundError, match=r"'acme/missing'.*local HF cache.*nothing is cached"):
        convert_to_ctranslate2("acme/missing", "float32", cache=tmp_path)


@pytest.mark.parametrize("compute_type", ["auto", "int16", "fp32"])
def test_unknown_compute_type_is_refused(neox_copy, tmp_path, compute_type):
    with pytest.raises(ValueError, match=rf"one of int8, .*float32; got '{compute_type}'"):
        convert_to_ctranslate2(neox_copy, compute_type, cache=tmp_path)


def test_directory_without_config_is_refused(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"weights.*no config\.json"):
        convert_to_ctranslate2(tmp_path / "weights", "int8", cache=tmp_path)


def test_unsupported_architecture_is_refused(tmp_path):
    transformers.GPTNeoConfig(num_layers=1, attention_types=[[["global"], 1]]).save_pretrained(tmp_path / "neo")
    with pytest.raises(RuntimeError, match=r"cannot convert .*neo \(model_type 'gpt_neo'\).*engine='transformers'"):
        convert_to_ctranslate2(tmp_path / "neo", "int8", cache=tmp_path / "cache")
    assert list((tmp_path / "cache" / "ctranslate2").iterdir()) == []


def test_gpt_neox_with_a_rope_base_ctranslate2_ignores_is_refused(dolly_tokenizer, tmp_path):
    model = tiny_neox(len(dolly_tokenizer))
    model.config.rope_parameters["rope_theta"] = 500.0
    model.save_pretrained(tmp_path / "neox")
    dolly_tokenizer.save_pretrained(tmp_path / "neox")
    with pytest.raises(RuntimeError, match=r"model_type 'gpt_neox'.*base 10000.*'rope_theta': 500\.0"):
        convert_to_ctranslate2(tmp_path / "neox", "float32", cache=tmp_path / "cache")
