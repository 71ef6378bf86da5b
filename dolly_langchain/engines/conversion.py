"""Converting the checkpoints ``DollyLLM`` loads into CTranslate2 models, once, cached on disk.

    from dolly_langchain.engines.conversion import convert_to_ctranslate2
    from dolly_langchain.models import resolve_model_path

    model_dir = convert_to_ctranslate2(resolve_model_path(None), "int8")  # the embedded SmolLM2, int8
    generator = ctranslate2.Generator(str(model_dir), compute_type="int8")

A conversion lives under ``<cache_dir()>/ctranslate2/<name>-<fingerprint>-<compute_type>``. The fingerprint covers
the source files that matter (their names, sizes and modification times) and the converter's version, so a
retrained or re-downloaded checkpoint, or a new CTranslate2, gets a fresh conversion and an unchanged one is found
again with a few ``stat`` calls. Supported architectures are CTranslate2's: among ours GPT-NeoX (Pythia, Dolly v2),
GPT-J (Dolly v1) and Llama (SmolLM2, the embedded model).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import sys
import time
from pathlib import Path

from dolly_langchain.errors import DollyRuntimeError, DollyValueError, MissingDependencyError, NotSupportedError
from dolly_langchain.files import checkpoint_fingerprint, publish_dir
from dolly_langchain.generation import COMPUTE_TYPES
from dolly_langchain.models import ModelNotFoundError, cache_dir, resolve_model_path
from dolly_langchain.prompts import FORMAT_RECORD_FILE
from dolly_langchain.tokenizer import matches_transformers

#: The record written last into every finished conversion; its presence marks the conversion complete.
CONVERSION_RECORD = "dolly_ctranslate2.json"

# Bump when _converter()'s shims or the record change what a conversion writes, so cached conversions are redone
# (2: the record says whether the transformers-free tokenizer matches, see dolly_langchain.tokenizer).
_SHIM_VERSION = 2

# The files of a checkpoint that a conversion reads: they make up the fingerprint, and they are all that is fetched
# for a hub id. Only the checkpoint's top level counts (a fine-tune's checkpoint-*/ folders do not).
_CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    FORMAT_RECORD_FILE,
    "*.safetensors",
    "*.bin",
    "*.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.*",
)

# Copied next to the converted weights when the source has them, so the conversion loads on its own.
_COPIED_FILES = ("generation_config.json", FORMAT_RECORD_FILE)


def convert_to_ctranslate2(source: str | Path, compute_type: str, *, cache: Path | None = None) -> Path:
    """Return a directory holding a CTranslate2 conversion of the HF checkpoint ``source``, converting it on first use.

    ``source`` is a local checkpoint directory (one with a ``config.json``, or a ``dolly-finetune`` run directory
    whose model is in ``model/``) or a hub id, resolved to its local snapshot with ``snapshot_download`` (the local HF
    cache serves it when the hub is unreachable). Pass what :func:`~dolly_langchain.models.resolve_model_path`
    returns; ``None`` (the embedded model) must be resolved by the caller.

    ``compute_type`` is one of :data:`COMPUTE_TYPES` and decides how the weights are stored (the converter's
    ``quantization``); ``"auto"`` is resolved by the caller, for its device.

    The result, ``(cache or cache_dir()) / "ctranslate2" / f"{name}-{fingerprint[:16]}-{compute_type}"``, holds
    CTranslate2's ``model.bin``, ``config.json`` and ``vocabulary.json``, the source's tokenizer (saved with
    ``save_pretrained``), its ``generation_config.json`` and ``dolly_prompt_format.json`` when it has them, and the
    record :data:`CONVERSION_RECORD` (see :func:`read_conversion_record`), written last. A finished conversion is
    returned at once; otherwise the conversion is written into a temporary directory beside the target and renamed
    into place, so an interrupted or failed conversion never leaves a directory that looks complete, and when two
    processes convert at once the first to finish wins and the other keeps its copy.

    Raises ValueError for an unknown ``compute_type``, :class:`~dolly_langchain.models.ModelNotFoundError` when
    ``source`` is neither a checkpoint directory nor a hub id found online or in the HF cache, and RuntimeError when
    CTranslate2 cannot convert the checkpoint (an architecture it does not support, for instance).
    """
    if compute_type not in COMPUTE_TYPES:
        raise DollyValueError(f"compute_type must be one of {', '.join(COMPUTE_TYPES)}; got {compute_type!r} "
                         "('auto' is resolved for a device before conversion)")
    ctranslate2_version = _ctranslate2_version()
    name, checkpoint, label = _resolve_source(source)
    fingerprint = _fingerprint(checkpoint, ctranslate2_version)
    target = (cache or cache_dir()) / "ctranslate2" / f"{name}-{fingerprint[:16]}-{compute_type}"
    if (target / CONVERSION_RECORD).is_file():
        return target

    print(f"dolly: converting {label} to CTranslate2 ({compute_type}) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    record = {"source": label, "fingerprint": fingerprint, "compute_type": compute_type,
              "ctranslate2_version": ctranslate2_version}
    _convert_atomically(checkpoint, target, record)
    print(f"dolly: converted in {time.perf_counter() - start:.1f} s -> {target}", file=sys.stderr, flush=True)
    return target


def read_conversion_record(path: str | Path) -> dict | None:
    """The record of a conversion made by :func:`convert_to_ctranslate2`, or None for a directory without one.

    Keys: ``source`` (hub id or absolute directory), ``fingerprint``, ``compute_type``, ``context_window`` (the
    source config's ``max_position_embeddings``, or None), ``ctranslate2_version`` and ``architecture`` (the source
    config's ``model_type``). A directory converted some other way (``ct2-transformers-converter``) has none.
    """
    record = Path(path) / CONVERSION_RECORD
    if not record.is_file():
        return None
    return json.loads(record.read_text(encoding="utf-8"))


def _ctranslate2_version() -> str:
    # Read from the installed metadata: importing ctranslate2 (and torch with its converter) is only needed when
    # there is something to convert.
    try:
        return importlib.metadata.version("ctranslate2")
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependencyError("converting to CTranslate2 needs the ctranslate2 package: pip install 'ctranslate2>=4.5'"
                          ) from None


def _resolve_source(source: str | Path) -> tuple[str, Path, str]:
    """``(name for the cache entry, local checkpoint directory, label for messages and the record)``."""
    resolved = resolve_model_path(str(source))  # a local path without config.json fails here, naming it
    path = Path(resolved)
    if path.is_dir():
        path = path.resolve()
        return _safe_name(path.name), path, str(path)

    import huggingface_hub

    try:
        snapshot = huggingface_hub.snapshot_download(resolved, allow_patterns=list(_CHECKPOINT_FILES))
    except (OSError, ValueError) as err:  # hub errors are OSErrors; a malformed id is a ValueError
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotFoundError(f"could not find model {resolved!r} on the Hugging Face hub or in the local HF cache "
                                 f"({reason}); pass a local checkpoint directory instead") from err
    if not (Path(snapshot) / "config.json").is_file():
        raise ModelNotFoundError(f"model {resolved!r} has no config.json; it is not a transformers checkpoint")
    return _safe_name(resolved.replace("/", "--")), Path(snapshot), resolved


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-") or "model"


def _fingerprint(checkpoint: Path, ctranslate2_version: str) -> str:
    """The checkpoint files a conversion reads (:func:`~dolly_langchain.files.checkpoint_fingerprint`), salted with
    the converter's versions. Hub snapshots are symlinks into the blob store; they are followed."""
    salt = f"ctranslate2 {ctranslate2_version}\nshim {_SHIM_VERSION}"
    return checkpoint_fingerprint(checkpoint, salt=salt, patterns=_CHECKPOINT_FILES)


def _convert_atomically(checkpoint: Path, target: Path, record: dict) -> None:
    """Write the conversion into a temporary directory beside ``target``, then rename it into place (an unfinished
    copy someone left is replaced; another process's finished copy is kept)."""
    with publish_dir(target, CONVERSION_RECORD) as tmp:
        _write_conversion(checkpoint, tmp, record)


def _write_conversion(checkpoint: Path, out: Path, record: dict) -> None:
    """Convert the weights into ``out``, save the tokenizer and the copied files beside them, then the record."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError, KeyError) as err:
        raise DollyRuntimeError(f"CTranslate2 cannot convert {record['source']}: its config.json does not load in "
                           f"transformers ({err}); is it a transformers causal LM?") from err
    try:
        _converter(checkpoint).convert(str(out), quantization=record["compute_type"], force=True)
    except Exception as err:  # noqa: BLE001 - every converter failure means the same thing to the user
        raise DollyRuntimeError(f"CTranslate2 cannot convert {record['source']} (model_type {config.model_type!r}): "
                           f"{err}. Use engine='transformers' for this model.") from err

    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out)
    for name in _COPIED_FILES:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, out / name)
    record = {**record, "context_window": getattr(config, "max_position_embeddings", None),
              "architecture": config.model_type, "light_tokenizer": matches_transformers(out)}
    (out / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _converter(checkpoint: Path):
    """CTranslate2's TransformersConverter for ``checkpoint``, fixed up for transformers 5's GPT-NeoX.

    CTranslate2 4.8.5's GPT-NeoX loader was written against transformers 4 and fails on transformers 5 twice:

    - it reads ``config.rotary_pct``, which transformers 5 keeps only as ``rope_parameters["partial_rotary_factor"]``
      (``rotary_emb_base`` became ``rope_parameters["rope_theta"]``): AttributeError;
    - it reads the output projection as ``model.embed_out``, which transformers 5 renamed ``lm_head`` (checkpoints
      saved with ``embed_out.weight`` are renamed on load): AttributeError.

    The loader also never passes ``rope_theta`` on (it assumes Pythia's 10000) and ignores RoPE scaling, so a
    checkpoint that differs there is refused rather than silently converted wrong. The other loaders we rely on need
    no shim: the converter already loads with ``dtype=``, the GPT-J loader reads ``rotary_dim`` (still a config
    attribute; GPT-J's base is fixed at 10000) and q/k/v_proj, fc_in/fc_out, lm_head (unchanged), and the Llama
    loader reads ``config.rope_scaling``, which transformers 5 keeps as an alias of ``rope_parameters``
    (``rope_theta`` and ``rope_type`` included). The unit tests compare logits and greedy outputs with transformers
    for GPT-NeoX and GPT-J; the embedded SmolLM2 (Llama) was checked the same way.
    """
    from ctranslate2.converters import TransformersConverter

    class Converter(TransformersConverter):
        def load_model(self, model_class, model_name_or_path, **kwargs):
            model = super().load_model(model_class, model_name_or_path, **kwargs)
            if model.config.model_type == "gpt_neox":
                _restore_gpt_neox_names(model)
            return model

    return Converter(str(checkpoint))


def _restore_gpt_neox_names(model) -> None:
    """Give a transformers 5 GPT-NeoX the transformers 4 names CTranslate2's loader reads (see :func:`_converter`)."""
    rope = model.config.rope_parameters
    if rope.get("rope_type", "default") != "default" or float(rope["rope_theta"]) != 10000.0:
        raise NotSupportedError(
            f"CTranslate2's GPT-NeoX converter supports only plain RoPE with base 10000; this checkpoint has "
            f"rope_parameters={rope}")
    model.config.rotary_pct = rope["partial_rotary_factor"]
    model.embed_out = model.lm_head
