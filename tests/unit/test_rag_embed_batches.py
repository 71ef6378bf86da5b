"""Building a dense index fast: chunks embedded across sources, sorted by length, one transaction per source kept.

A tiny random BERT encoder (saved with the tiny tokenizer from conftest) stands in for MiniLM; ``HashEmbeddings`` with
a record of each call stands in for any other LangChain ``Embeddings``.
"""

from __future__ import annotations

import copy
import sqlite3

import numpy as np
import pytest
from langchain_core.documents import Document
from rag_helpers import HashEmbeddings

import dolly_langchain.rag.ingest as ingest
from dolly_langchain.rag import DocumentIndex
from dolly_langchain.rag.embeddings import MeanPoolingEmbeddings
from dolly_langchain.rag.store import normalise

WORDS = "river mountain sea forest city road bridge castle garden harbour valley island".split()


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory, dolly_tokenizer):
    import torch
    from transformers import BertConfig, BertModel

    tokenizer = copy.deepcopy(dolly_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("tiny-encoder")
    BertModel(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class RecordingEmbeddings(HashEmbeddings):
    """``HashEmbeddings`` that records the texts of each ``embed_documents`` call, and can fail on call ``fail_on``."""

    def __init__(self, fail_on: int | None = None):
        super().__init__()
        self.batches: list[list[str]] = []
        self.fail_on = fail_on

    def embed_documents(self, texts):
        self.batches.append(list(texts))
        if self.fail_on is not None and len(self.batches) == self.fail_on:
            raise RuntimeError("the encoder ran out of memory")
        return super().embed_documents(texts)


def documents(n: int) -> list[Document]:
    """``n`` one-chunk sources, each about a different pair of words."""
    return [
        Document(page_content=f"Note {i}: the {WORDS[i % 12]} near the {WORDS[(i * 5 + 1) % 12]}.",
                 metadata={"source": f"kb://{i}"})
        for i in range(n)
    ]


def stored(index: DocumentIndex) -> dict[str, tuple[str, np.ndarray]]:
    with sqlite3.connect(index.path) as con:
        rows = con.execute("SELECT source, text, embedding FROM chunks").fetchall()
    return {source: (text, np.frombuffer(blob, dtype=np.float32)) for source, text, blob in rows}


def test_mean_pooling_embeds_in_length_order_and_returns_vectors_in_input_order(tiny_encoder_dir):
    texts = [" ".join(WORDS[: 1 + (i * 7) % 12]) * (1 + i % 4) for i in range(11)]
    embeddings = MeanPoolingEmbeddings(model_name=str(tiny_encoder_dir), batch_size=3)
    model, tokenizer = embeddings._load()
    widths: list[int] = []
    model.register_forward_pre_hook(lambda _module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)

    together = np.array(embeddings.embed_documents(texts))
    lengths = sorted(len(tokenizer(text)["input_ids"]) for text in texts)
    # each batch pads to its own longest text, and the batches come shortest first
    assert widths == [max(lengths[start : start + 3]) for start in range(0, len(texts), 3)]
    alone = np.array([embeddings.embed_documents([text])[0] for text in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert np.linalg.norm(together, axis=1) == pytest.approx(1.0, abs=1e-5)
    assert embeddings.embed_documents([]) == []


def test_chunks_of_many_sources_are_embedded_in_one_call_and_each_source_gets_its_own(dolly_tokenizer, tmp_path):
    embeddings = RecordingEmbeddings()
    index = DocumentIndex(path=tmp_path / "index.sqlite", tokenizer=dolly_tokenizer, embeddings=embeddings)
    report = index.add_documents(documents(40))

    assert len(embeddings.batches) == 1 and len(embeddings.batches[0]) == 40
    assert report.added == [f"kb://{i}" for i in range(40)] and report.chunks == 40
    chunks = stored(index)
    assert len(chunks) == 40
    for source, (text, vector) in chunks.items():  # every vector is its own chunk's, not a neighbour's
        expected = normalise(np.array([HashEmbeddings()._vector(text)], dtype=np.float32))[0]
        np.testing.assert_allclose(vector, expected, atol=1e-6)
    with sqlite3.connect(index.path) as con:
        assert con.execute("SELECT COUNT(*) FROM sources").fetchone()[0] == 40


def test_groups_fill_with_whole_sources_and_the_rest_is_embedded_at_the_end(dolly_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "EMBED_BATCH_CHUNKS", 8)
    embeddings = RecordingEmbeddings()
    index = DocumentIndex(path=tmp_path / "index.sqlite", tokenizer=dolly_tokenizer, embeddings=embeddings,
                          chunk_tokens=16, chunk_overlap=0)
    long = Document(page_content=" ".join(f"the {w} and the {w}s" for w in WORDS * 2), metadata={"source": "kb://long"})
    given = [*documents(5), long, *documents(12)[5:]]
    report = index.add_documents(given)

    with sqlite3.connect(index.path) as con:
        per_source = dict(con.execute("SELECT source, COUNT(*) FROM chunks GROUP BY source"))
    assert per_source["kb://long"] > 8
    expected, group = [], 0
    for document in given:  # a group closes after the source that fills it, never inside a source
        group += per_source[document.metadata["source"]]
        if group >= 8:
            expected.append(group)
            group = 0
    expected += [group] if group else []
    assert [len(batch) for batch in embeddings.batches] == expected
    assert len(expected) >= 2 and sum(expected) == report.chunks
    assert [text for batch in embeddings.batches for text in batch] == [
        text for document in given for text in index._split(document.page_content, False)
    ]


def test_an_embedding_failure_leaves_earlier_groups_written_and_no_source_half_written(
    dolly_tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setattr(ingest, "EMBED_BATCH_CHUNKS", 4)
    index = DocumentIndex(path=tmp_path / "index.sqlite", tokenizer=dolly_tokenizer,
                          embeddings=RecordingEmbeddings(fail_on=2))
    with pytest.raises(RuntimeError, match="out of memory"):
        index.add_documents(documents(10))
    assert index.sources() == [f"kb://{i}" for i in range(4)]
    with sqlite3.connect(index.path) as con:
        assert con.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] == 4

    # the next run embeds only what is missing
    embeddings = RecordingEmbeddings()
    index = DocumentIndex(path=tmp_path / "index.sqlite", tokenizer=dolly_tokenizer, embeddings=embeddings)
    report = index.add_documents(documents(10))
    assert report.skipped == [f"kb://{i}" for i in range(4)] and report.added == [f"kb://{i}" for i in range(4, 10)]
    assert [len(batch) for batch in embeddings.batches] == [4, 2]  # EMBED_BATCH_CHUNKS is still 4 here


def test_the_same_file_twice_in_one_call_is_indexed_once(dolly_tokenizer, tmp_path):
    path = tmp_path / "note.txt"
    path.write_text("The castle stands above the harbour.")
    embeddings = RecordingEmbeddings()
    index = DocumentIndex(path=tmp_path / "index.sqlite", tokenizer=dolly_tokenizer, embeddings=embeddings)
    report = index.add_paths([path, path])
    assert report.added == [str(path.resolve())] and report.skipped == [str(path.resolve())]
    assert report.chunks == 1 and sum(len(batch) for batch in embeddings.batches) == 1
