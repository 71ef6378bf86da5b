"""LangChain's unit suite for embeddings on ``MeanPoolingEmbeddings`` (nothing loads until the first call)."""

from __future__ import annotations

from langchain_tests.unit_tests import EmbeddingsUnitTests

from dolly_langchain.rag.embeddings import MeanPoolingEmbeddings


class TestMeanPoolingEmbeddingsUnit(EmbeddingsUnitTests):
    @property
    def embeddings_class(self) -> type[MeanPoolingEmbeddings]:
        return MeanPoolingEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {}  # all-MiniLM-L6-v2, shipped in a PyPI package: no hub
