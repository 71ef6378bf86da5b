"""Retrieval-augmented question answering with Dolly: index your documents, retrieve, answer with sources.

- :mod:`dolly_langchain.rag.index`: ``DocumentIndex``, a persistent SQLite index (BM25, optional dense/hybrid)
  that is also a LangChain retriever, put together from :mod:`~dolly_langchain.rag.store` (the file, its schema
  and checks), :mod:`~dolly_langchain.rag.ingest` (chunking and adding) and :mod:`~dolly_langchain.rag.retrieval`
  (ranking and fusion).
- :mod:`dolly_langchain.rag.loaders`: reading text, Markdown, PDF and JSONL files into documents.
- :mod:`dolly_langchain.rag.embeddings`: ``MeanPoolingEmbeddings``, offline all-MiniLM-L6-v2 (optional).
- :mod:`dolly_langchain.rag.chain`: ``retrieval_qa_chain``, passages into Dolly's context prompt within the
  model's window, ``{"answer", "sources"}`` out.
- :mod:`dolly_langchain.rag.cli`: ``dolly rag index`` and ``dolly rag ask``.

::

    from dolly_langchain.llm import DollyLLM
    from dolly_langchain.rag import DocumentIndex, load_tokenizer, retrieval_qa_chain

    index = DocumentIndex(path="docs.sqlite", tokenizer=load_tokenizer())   # the embedded model's tokenizer
    index.add_paths(["docs/"], progress=True)
    llm = DollyLLM.from_model_id(max_new_tokens=128, do_sample=False)
    retrieval_qa_chain(llm, index.as_retriever(k=4)).invoke("What does the handbook say about leave?")
"""

from __future__ import annotations


def __getattr__(name: str):
    # Each name from its module on first use, so building the command tree (dolly_langchain.rag.cli) imports no
    # LangChain and no SQLite code.
    if name == "load_tokenizer":
        from dolly_langchain import models as home
    elif name in ("NO_PASSAGES_ANSWER", "retrieval_qa_chain"):
        from dolly_langchain.rag import chain as home
    elif name == "MeanPoolingEmbeddings":
        from dolly_langchain.rag import embeddings as home
    elif name in ("DocumentIndex", "IndexFileError", "IndexMismatchError", "IngestReport"):
        from dolly_langchain.rag import index as home
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(home, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "NO_PASSAGES_ANSWER",
    "DocumentIndex",
    "IndexFileError",
    "IndexMismatchError",
    "IngestReport",
    "MeanPoolingEmbeddings",
    "load_tokenizer",
    "retrieval_qa_chain",
]
