"""Retrieval QA with the real embedded model (SmolLM2-135M-Instruct, greedy, 32 new tokens) over real-looking files.

A few short generations only: the CPU does about 15 tokens a second.
"""

import hashlib
import re
import warnings
from operator import itemgetter

import pytest
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings

from dolly_langchain.chains import instruction_with_context_chain
from dolly_langchain.llm import DollyLLM
from dolly_langchain.models import ModelNotFoundError, embedded_gguf_path
from dolly_langchain.prompts import INSTRUCTION_WITH_CONTEXT_PROMPT
from dolly_langchain.rag import DocumentIndex, retrieval_qa_chain
from dolly_langchain.rag.chain import PromptPacker

MAX_NEW_TOKENS = 32

FILES = {
    "handbook/leave.md": (
        "# Annual leave\n\nEvery employee receives 25 days of paid annual leave per calendar year. Unused days can be "
        "carried over until 31 March of the next year. Request leave in the HR portal at least two weeks before the "
        "first day off.\n"
    ),
    "it/password.md": (
        "# Resetting your password\n\nTo reset your password, open the self-service page at id.example.com and click "
        "Forgot password. A reset link is sent to your work email and stays valid for 30 minutes. Passwords expire "
        "every 90 days.\n"
    ),
    "facilities/parking.txt": (
        "The office car park opens at 7:00 and closes at 20:00 on weekdays. Visitors must register at reception to "
        "get a parking permit. Bicycles go in the covered rack beside the main entrance.\n"
    ),
}
LEAVE_QUESTION = "Where do employees request leave?"


@pytest.fixture(scope="module")
def llm():
    try:
        embedded_gguf_path()
    except ModelNotFoundError as err:
        pytest.skip(str(err))
    return DollyLLM.from_model_id(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, engine="transformers")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    for name, text in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def index(llm, files, tmp_path_factory):
    index = DocumentIndex(path=tmp_path_factory.mktemp("index") / "docs.sqlite", tokenizer=llm.tokenizer, k=2)
    report = index.add_paths([files])
    assert len(report.added) == 3 and not report.failed
    return index


def _long_context(llm, tokens: int) -> str:
    sentence = "The quarterly report lists revenue, costs and the headcount of every regional office. "
    per_sentence = llm.get_num_tokens(sentence * 2) - llm.get_num_tokens(sentence)
    text = sentence * (tokens // per_sentence + 1)
    assert llm.get_num_tokens(text) >= tokens
    return text


def test_a_10k_token_context_raises_instead_of_a_warning(llm, monkeypatch):
    monkeypatch.setattr(llm.generation_engine, "generate", lambda *a, **k: pytest.fail("generated past the window"))
    assert llm.context_window == 8192
    prompt = INSTRUCTION_WITH_CONTEXT_PROMPT.format(instruction="Summarize the report.", context=_long_context(llm, 10_000))
    tokens = llm.count_prompt_tokens(prompt)
    assert tokens > 10_000
    message = rf"the prompt is {tokens} tokens and max_new_tokens is {MAX_NEW_TOKENS}.* window of 8192"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=message) as raised:
            llm.invoke(prompt)
        assert "Shorten the context" in str(raised.value) and "fewer passages" in str(raised.value)
        assert "lower max_new_tokens" in str(raised.value)
        with pytest.raises(ValueError, match=message):
            list(llm.stream(prompt))
        with pytest.raises(ValueError, match=message):
            llm.batch(["What is 2 + 2?", prompt])
        with pytest.raises(ValueError, match=message):
            instruction_with_context_chain(llm).invoke(
                {"instruction": "Summarize the report.", "context": _long_context(llm, 10_000)}
            )


def test_the_packer_fits_10k_tokens_of_passages_into_the_window(llm):
    passages = [Document(page_content=_long_context(llm, 500), metadata={"source": f"r{i}", "chunk_id": str(i)})
                for i in range(20)]
    packed = PromptPacker.for_llm(llm, None, None, min_passage_tokens=32).pack("Summarize the report.", passages)
    tokens = llm.count_prompt_tokens(packed["prompt"])
    assert 8192 - MAX_NEW_TOKENS - 32 < tokens <= 8192 - MAX_NEW_TOKENS  # filled, never over
    sources = packed["sources"]
    assert [d.metadata["source"] for d in sources] == [f"r{i}" for i in range(len(sources))]
    assert sources[-1].metadata["truncated"] is True and len(sources[-1].page_content) < len(passages[0].page_content)


def test_retrieval_qa_chain_answers_with_the_right_source_first(llm, index, files):
    chain = retrieval_qa_chain(llm, index)
    result = chain.invoke(LEAVE_QUESTION)
    assert "HR portal" in result["answer"]
    sources = result["sources"]
    assert sources[0].metadata["source"] == str((files / "handbook" / "leave.md").resolve())
    assert sources[0].page_content in FILES["handbook/leave.md"] and "truncated" not in sources[0].metadata
    assert all(d.metadata["chunk_id"] == d.id for d in sources)
    # Streaming through the chain gives the same answer, piece by piece.
    parts = list(chain.stream(LEAVE_QUESTION))
    pieces = [p["answer"] for p in parts if "answer" in p]
    assert len(pieces) > 1 and "".join(pieces) == result["answer"]
    assert [p["sources"] for p in parts if "sources" in p] == [sources]


def test_langchain_create_retrieval_chain(llm, index):
    from langchain_classic.chains import create_retrieval_chain
    from langchain_classic.chains.combine_documents import create_stuff_documents_chain
    from langchain_core.runnables import RunnablePassthrough

    answer_from_documents = RunnablePassthrough.assign(instruction=itemgetter("input")) | create_stuff_documents_chain(
        llm, INSTRUCTION_WITH_CONTEXT_PROMPT
    )
    chain = create_retrieval_chain(index.as_retriever(k=1), answer_from_documents)
    result = chain.invoke({"input": "How long does the password reset link stay valid?"})
    assert "30 minutes" in result["answer"]
    assert [d.metadata["source"].endswith("it/password.md") for d in result["context"]] == [True]


class HashedBagOfWords(Embeddings):
    """Deterministic stand-in embeddings: lower-cased words hashed into 256 buckets."""

    dim = 256

    def _embed(self, text: str) -> list[float]:
        vector = [0.0] * self.dim
        for word in re.findall(r"\w+", text.lower()):
            vector[int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        return vector

    def embed_documents(self, texts):
        return [self._embed(t) for t in texts]

    def embed_query(self, text):
        return self._embed(text)


def test_qdrant_local_mode_retriever_plugs_into_the_chain(llm, tmp_path):
    pytest.importorskip("langchain_qdrant")
    from langchain_qdrant import QdrantVectorStore
    from qdrant_client import QdrantClient
    from qdrant_client.models import Distance, VectorParams

    client = QdrantClient(path=str(tmp_path / "qdrant"))
    try:
        client.create_collection("handbook", vectors_config=VectorParams(size=HashedBagOfWords.dim, distance=Distance.COSINE))
        store = QdrantVectorStore(client=client, collection_name="handbook", embedding=HashedBagOfWords())
        store.add_documents([
            Document(page_content=text, metadata={"source": name, "chunk_id": f"{name}#0"}) for name, text in FILES.items()
        ])
        chain = retrieval_qa_chain(llm, store.as_retriever(search_kwargs={"k": 2}))
        result = chain.invoke("What time does the office car park open on weekdays?")
    finally:
        client.close()
    assert "7:00" in result["answer"]
    first = result["sources"][0]
    assert first.metadata["source"] == "facilities/parking.txt" and first.metadata["chunk_id"] == "facilities/parking.txt#0"
    assert first.page_content == FILES["facilities/parking.txt"]
    assert {d.metadata["_collection_name"] for d in result["sources"]} == {"handbook"}  # they came from Qdrant
