"""LangChain's integration suite for embeddings on ``MeanPoolingEmbeddings`` with the packaged all-MiniLM-L6-v2."""

from __future__ import annotations

from langchain_tests.integration_tests import EmbeddingsIntegrationTests

from dolly_langchain.rag.embeddings import MeanPoolingEmbeddings


class TestMeanPoolingEmbeddingsIntegration(EmbeddingsIntegrationTests):
    @property
    def embeddings_class(self) -> type[MeanPoolingEmbeddings]:
        return MeanPoolingEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {}
