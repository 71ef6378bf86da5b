"""LangChain's integration suite for retrievers on ``DocumentIndex``: a real index (BM25 and all-MiniLM-L6-v2
hybrid) of a few short documents, built once per session with the embedded model's tokenizer."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import pytest
from langchain_core.documents import Document
from langchain_tests.integration_tests import RetrieversIntegrationTests

from dolly_langchain.rag import DocumentIndex
from dolly_langchain.rag.embeddings import MeanPoolingEmbeddings

FACTS = [
    "Paris is the capital of France and its largest city.",
    "The Eiffel Tower in Paris was finished in 1889.",
    "Lyon is a French city known for its food.",
    "Berlin is the capital of Germany.",
    "Bread is baked from flour, water, yeast and salt.",
    "The Loire is the longest river in France.",
]


@cache
def _index_path(directory: str) -> Path:
    from transformers import AutoTokenizer

    from dolly_langchain.models import resolve_model_path

    path = Path(directory) / "index.sqlite"
    index = DocumentIndex(path=path, tokenizer=AutoTokenizer.from_pretrained(str(resolve_model_path(None))),
                          embeddings=MeanPoolingEmbeddings())
    index.add_documents([Document(page_content=text, metadata={"source": f"fact-{i}"}) for i, text in enumerate(FACTS)])
    return path


class TestDocumentIndexRetriever(RetrieversIntegrationTests):
    @pytest.fixture(autouse=True)
    def _index(self, tmp_path_factory):
        type(self)._path = _index_path(str(tmp_path_factory.getbasetemp() / "standard-retriever"))

    @property
    def retriever_constructor(self) -> type[DocumentIndex]:
        return DocumentIndex

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {"path": self._path, "embeddings": MeanPoolingEmbeddings(), "k": 4}

    @property
    def retriever_query_example(self) -> str:
        return "What is the capital of France?"
