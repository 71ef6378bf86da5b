"""Retrieval and answer quality of ``dolly_langchain.rag`` on databricks-dolly-15k.

    python benchmarks/rag.py                                  # everything (about 15 min on a 2-core CPU)
    python benchmarks/rag.py --qa-samples 0                   # retrieval only
    python benchmarks/rag.py --embeddings none                # BM25 only (no embedding model needed)
    python benchmarks/rag.py --qa-samples 0 --compare-build   # the dense build: per source vs grouped, fp32 vs bf16

Prints one JSON object.

**Retrieval.** The 4,120 unique non-empty contexts of dolly-15k are indexed (one source each, chunked with the
embedded SmolLM2's tokenizer, ``--chunk-tokens``); each of the 1,773 closed_qa instructions is a query whose gold
passage is its own context. For BM25, dense (all-MiniLM-L6-v2) and hybrid (weighted score fusion) it reports hit@1
and hit@5 (the gold context among the first 1 / 5 distinct sources), MRR (reciprocal rank of the gold context among
the top 20 chunks, 0 if absent), and the p50/p95 latency of a k=5 query; plus build time and file size for a
BM25-only index and for one with vectors.

**Build speed** (``--compare-build``): the index with vectors is built three more ways in the same run, from the same
contexts: ``per_source`` embeds each source's chunks in a call of their own (how the index was built before chunks
were grouped across sources: ``EMBED_BATCH_CHUNKS`` = 1), and ``bfloat16`` groups them like the default but runs the
encoder under bfloat16 autocast. ``build_speedup`` is per-source seconds over each build's seconds; dense retrieval
is scored on each index, so a faster build that retrieves differently shows here.

**Answers.** ``--qa-samples`` closed_qa records (seeded) are answered greedily by the embedded model three ways:
(a) no context, (b) the passages retrieved for the instruction, packed into the prompt exactly as
``retrieval_qa_chain`` does (top ``--qa-k``, within the token budget), (c) the gold context. Score: SQuAD-style token
F1 against the gold response (lower-cased, punctuation and articles dropped), averaged.

Targets: BM25 hit@5 >= 0.93, hybrid hit@5 >= 0.96 and hit@1 >= 0.85, BM25 query p95 < 50 ms, retrieved-context F1
>= 0.9 x gold-context F1. The data come from ``--data`` (default ``$DOLLY_15K_PATH``); none are stored here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import string
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=os.environ.get("DOLLY_15K_PATH"),
                        help="databricks-dolly-15k.jsonl (default: $DOLLY_15K_PATH)")
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--embeddings", default="minilm", help="'minilm' (default), an encoder dir, or 'none'")
    parser.add_argument("--qa-samples", type=int, default=100, help="closed_qa records to answer; 0 skips answers")
    parser.add_argument("--qa-k", type=int, default=3, help="passages retrieved for each answer")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-build", action="store_true",
                        help="also build the dense index per source (the old way) and in bfloat16; report speed-ups")
    args = parser.parse_args(argv)
    if args.data is None or not Path(args.data).is_file():
        parser.error("--data: databricks-dolly-15k.jsonl not found; pass --data PATH or set DOLLY_15K_PATH")
    return args


def load_data(path: Path) -> tuple[list[str], list[dict]]:
    """The unique non-empty contexts, and the closed_qa records with the id of their context."""
    with open(path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    contexts = list(dict.fromkeys(r["context"] for r in records if r["context"].strip()))
    ids = {context: i for i, context in enumerate(contexts)}
    closed_qa = [{**r, "gold": _source(ids[r["context"]])} for r in records if r["category"] == "closed_qa"]
    return contexts, closed_qa


def _source(context_id: int) -> str:
    return f"dolly-context-{context_id}"


def build(path: Path, contexts: list[str], tokenizer, chunk_tokens: int, embeddings=None) -> dict:
    from langchain_core.documents import Document

    from dolly_langchain.rag import DocumentIndex

    index = DocumentIndex(path=path, tokenizer=tokenizer, chunk_tokens=chunk_tokens, embeddings=embeddings)
    started = time.perf_counter()
    report = index.add_documents(
        [Document(page_content=c, metadata={"source": _source(i)}) for i, c in enumerate(contexts)], progress=True
    )
    seconds = time.perf_counter() - started
    return {"index": index, "seconds": round(seconds, 1), "bytes": path.stat().st_size, "chunks": report.chunks}


def compare_builds(result: dict, workdir: Path, contexts, queries, tokenizer, args, grouped: dict) -> None:
    import dolly_langchain.rag.ingest as ingest
    from dolly_langchain.rag.embeddings import MeanPoolingEmbeddings

    grouped_chunks = ingest.EMBED_BATCH_CHUNKS
    ingest.EMBED_BATCH_CHUNKS = 1
    try:
        per_source = build(workdir / "per-source.sqlite", contexts, tokenizer, args.chunk_tokens,
                           MeanPoolingEmbeddings(model_name=args.embeddings))
    finally:
        ingest.EMBED_BATCH_CHUNKS = grouped_chunks
    bfloat16 = build(workdir / "bfloat16.sqlite", contexts, tokenizer, args.chunk_tokens,
                     MeanPoolingEmbeddings(model_name=args.embeddings, precision="bfloat16"))
    builds = {"per_source": per_source, "grouped_float32": grouped, "grouped_bfloat16": bfloat16}
    result["build_compare"] = {
        "embed_batch_chunks": grouped_chunks,
        "seconds": {name: b["seconds"] for name, b in builds.items()},
        "build_speedup": {name: round(per_source["seconds"] / b["seconds"], 2) for name, b in builds.items()},
        "dense_retrieval": {},
    }
    for name, b in builds.items():
        scores = evaluate_retrieval(b["index"], queries, "dense")
        result["build_compare"]["dense_retrieval"][name] = {k: scores[k] for k in ("hit@1", "hit@5", "mrr")}
        print(f"rag benchmark: dense retrieval on the {name} index: {scores}", file=sys.stderr)


def evaluate_retrieval(index, queries: list[dict], search_type: str) -> dict:
    hits1 = hits5 = 0
    reciprocal_ranks, latencies = [], []
    for query in queries:
        started = time.perf_counter()
        top = index.search(query["instruction"], k=5, search_type=search_type)
        latencies.append(time.perf_counter() - started)
        first = _distinct_sources(top)
        hits1 += first[:1] == [query["gold"]]
        hits5 += query["gold"] in first[:5]
        ranked = _distinct_sources(index.search(query["instruction"], k=20, search_type=search_type))
        reciprocal_ranks.append(1 / (ranked.index(query["gold"]) + 1) if query["gold"] in ranked else 0.0)
    latencies.sort()
    return {
        "hit@1": round(hits1 / len(queries), 4),
        "hit@5": round(hits5 / len(queries), 4),
        "mrr": round(statistics.fmean(reciprocal_ranks), 4),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
        "p95_ms": round(1000 * latencies[int(len(latencies) * 0.95)], 2),
    }


def _distinct_sources(documents) -> list[str]:
    return list(dict.fromkeys(d.metadata["source"] for d in documents))


def evaluate_answers(args, index, queries: list[dict]) -> dict:
    from dolly_langchain.llm import DollyLLM
    from dolly_langchain.prompts import INSTRUCTION_PROMPT, INSTRUCTION_WITH_CONTEXT_PROMPT
    from dolly_langchain.rag.chain import PromptPacker

    sample = random.Random(args.seed).sample(queries, args.qa_samples)
    llm = DollyLLM.from_model_id(max_new_tokens=args.max_new_tokens, do_sample=False, batch_size=args.batch_size)
    packer = PromptPacker.for_llm(llm, None, None, min_passage_tokens=32)
    retrieved = [packer.pack(r["instruction"], index.search(r["instruction"], k=args.qa_k)) for r in sample]
    prompts = {
        "no_context": [INSTRUCTION_PROMPT.format(instruction=r["instruction"]) for r in sample],
        "retrieved": [packed["prompt"] for packed in retrieved],
        "gold": [INSTRUCTION_WITH_CONTEXT_PROMPT.format(instruction=r["instruction"], context=r["context"])
                 for r in sample],
    }
    scores, seconds = {}, {}
    for name, batch in prompts.items():
        started = time.perf_counter()
        answers = llm.batch(batch)
        seconds[name] = round(time.perf_counter() - started, 1)
        scores[name] = round(statistics.fmean(token_f1(a, r["response"]) for a, r in zip(answers, sample)), 4)
        print(f"rag benchmark: answers with {name}: F1 {scores[name]} in {seconds[name]} s", file=sys.stderr)
    gold_given = statistics.fmean(
        r["gold"] in _distinct_sources(packed["sources"]) for r, packed in zip(sample, retrieved)
    )
    return {
        "samples": len(sample), "k": args.qa_k, "max_new_tokens": args.max_new_tokens,
        "token_f1": scores,
        "retrieved_over_gold": round(scores["retrieved"] / scores["gold"], 4) if scores["gold"] else None,
        "gold_context_among_retrieved": round(gold_given, 4),
        "seconds": seconds,
    }


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1: overlap of normalised word multisets."""
    predicted, expected = _normalise(prediction), _normalise(reference)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if not predicted or not expected or not common:
        return float(predicted == expected)
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def _normalise(text: str) -> list[str]:
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def main(argv=None) -> None:
    args = parse_args(argv)
    from dolly_langchain.models import load_tokenizer

    contexts, queries = load_data(args.data)
    tokenizer = load_tokenizer()
    result = {"data": str(args.data), "contexts": len(contexts), "queries": len(queries),
              "chunk_tokens": args.chunk_tokens}
    with tempfile.TemporaryDirectory() as workdir:
        built = {"bm25": build(Path(workdir, "bm25.sqlite"), contexts, tokenizer, args.chunk_tokens)}
        modes = {"bm25": (built["bm25"]["index"], "bm25")}
        if args.embeddings != "none":
            from dolly_langchain.rag.embeddings import MeanPoolingEmbeddings

            embeddings = MeanPoolingEmbeddings(model_name=args.embeddings)
            built["with_vectors"] = build(Path(workdir, "dense.sqlite"), contexts, tokenizer, args.chunk_tokens,
                                          embeddings)
            dense_index = built["with_vectors"]["index"]
            modes.update(dense=(dense_index, "dense"), hybrid=(dense_index, "hybrid"))
            result["embeddings"] = embeddings.model_name
            if args.compare_build:
                compare_builds(result, Path(workdir), contexts, queries, tokenizer, args, built["with_vectors"])
        result["build"] = {name: {k: v for k, v in b.items() if k != "index"} for name, b in built.items()}
        result["retrieval"] = {}
        for name, (index, search_type) in modes.items():
            result["retrieval"][name] = evaluate_retrieval(index, queries, search_type)
            print(f"rag benchmark: {name}: {result['retrieval'][name]}", file=sys.stderr)
        if args.qa_samples:
            qa_index = modes.get("hybrid", modes["bm25"])[0]
            result["qa"] = evaluate_answers(args, qa_index, queries)
            result["qa"]["retrieval"] = "hybrid" if "hybrid" in modes else "bm25"
    result["targets"] = targets(result)
    print(json.dumps(result, indent=2))


def targets(result: dict) -> dict:
    retrieval = result["retrieval"]
    met = {"bm25_hit@5>=0.93": retrieval["bm25"]["hit@5"] >= 0.93, "bm25_p95<50ms": retrieval["bm25"]["p95_ms"] < 50}
    if "hybrid" in retrieval:
        met["hybrid_hit@5>=0.96"] = retrieval["hybrid"]["hit@5"] >= 0.96
        met["hybrid_hit@1>=0.85"] = retrieval["hybrid"]["hit@1"] >= 0.85
    if "build_compare" in result:
        compare = result["build_compare"]
        met["dense_build_speedup>=2.5"] = compare["build_speedup"]["grouped_float32"] >= 2.5
        met["dense_retrieval_unchanged"] = (
            compare["dense_retrieval"]["grouped_float32"] == compare["dense_retrieval"]["per_source"]
        )
    if "qa" in result and result["qa"]["retrieved_over_gold"] is not None:
        met["retrieved_f1>=0.9*gold_f1"] = result["qa"]["retrieved_over_gold"] >= 0.9
    return met


if __name__ == "__main__":
    main()
