"""Question answering over your documents with Dolly: index a folder, ask, print the answer and its sources.

    python examples/rag_dolly.py                                   # this repository's docs, a few questions
    python examples/rag_dolly.py ~/notes --question "What did we decide about the release date?"
    python examples/rag_dolly.py ~/notes --embeddings minilm       # hybrid BM25 + dense retrieval

The index is a file (``--index``, default ``rag_example.sqlite`` in the temp directory); run the example again and
only changed files are re-indexed. Everything runs on the embedded SmolLM2-135M-Instruct unless ``--model`` names
another model; its answers are short and sometimes wrong (135M parameters), the sources are the point.
"""

import argparse
import tempfile
from pathlib import Path

from dolly_langchain.llm import DollyLLM
from dolly_langchain.rag import DocumentIndex, retrieval_qa_chain
from dolly_langchain.rag.embeddings import MeanPoolingEmbeddings

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DOCS = [REPO / "README.md", REPO / "finetune" / "configs" / "README.md"]
DEFAULT_QUESTIONS = [
    "Which DeepSpeed config should I use on A10 GPUs?",
    "How do I resume a killed fine-tuning run?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="files or folders to index (default: this repo's docs)")
    parser.add_argument("--question", action="append", help="ask this (repeatable; default: two sample questions)")
    parser.add_argument("--index", type=Path, default=Path(tempfile.gettempdir()) / "rag_example.sqlite")
    parser.add_argument("--embeddings", default=None, help="'minilm' for hybrid retrieval (default: BM25 only)")
    parser.add_argument("--model", default=None, help="hub id or directory (default: the embedded model)")
    parser.add_argument("--k", type=int, default=4, help="passages per question")
    args = parser.parse_args()

    llm = DollyLLM.from_model_id(args.model, do_sample=False, max_new_tokens=96)
    embeddings = MeanPoolingEmbeddings(model_name=args.embeddings) if args.embeddings else None
    # Chunks are measured in the answering model's tokens, so the prompt budget is exact.
    index = DocumentIndex(path=args.index, tokenizer=llm.tokenizer, embeddings=embeddings, k=args.k)
    report = index.add_paths(args.paths or DEFAULT_DOCS, progress=True)
    print(f"{args.index}: {report.counts()}")
    for source, reason in report.failed:
        print("  failed:", reason)

    chain = retrieval_qa_chain(llm, index)
    for question in args.question or DEFAULT_QUESTIONS:
        print(f"\n== {question}")
        sources = []
        for part in chain.stream(question):  # the answer streams; the sources arrive whole
            print(part.get("answer", ""), end="", flush=True)
            sources = part.get("sources", sources)
        print()
        for number, document in enumerate(sources, start=1):
            cut = " (cut to fit)" if document.metadata.get("truncated") else ""
            print(f"  [{number}] {document.metadata['source']} chunk {document.metadata['position']}{cut}: "
                  f"{document.page_content[:80]!r}")


if __name__ == "__main__":
    main()
