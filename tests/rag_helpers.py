"""Helpers for the document-index tests: a fake embedding model, a hand-written PDF, and a small corpus.

- ``HashEmbeddings``: a deterministic bag-of-words embedding (words hashed into buckets, a few synonyms sharing one),
  so texts that share words, or synonyms, are close. No weights; the same vectors in every process.
- ``write_pdf``: a real PDF with a text layer that pypdf extracts, written by hand (no PDF library needed).
- ``write_corpus``: a text file, a Markdown file, a two-page PDF and a JSONL file on distinct topics.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from langchain_core.embeddings import Embeddings

from dolly_langchain.rag.embeddings import MeanPoolingEmbeddings

# Words the fake model treats as one: a query for "automobile" is close to a passage about a "car", which shares no
# word with it (BM25 cannot find it, dense retrieval can).
SYNONYMS = {"automobile": "car", "vehicle": "car", "cars": "car", "physician": "doctor", "medic": "doctor"}
STOPWORDS = set("a an and are at be by do does for from how in is it of on or the to what which who with".split())


class HashEmbeddings(Embeddings):
    """Counts of words hashed (md5, stable across processes) into ``dim`` buckets; ``calls`` counts texts embedded."""

    def __init__(self, dim: int = 64):
        self.dim = dim
        self.calls = 0

    def _vector(self, text: str) -> list[float]:
        vector = [0.0] * self.dim
        for word in re.findall(r"[a-z]+", text.lower()):
            if word not in STOPWORDS:
                word = SYNONYMS.get(word, word)
                vector[int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        return vector

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        self.calls += len(texts)
        return [self._vector(text) for text in texts]

    def embed_query(self, text: str) -> list[float]:
        return self._vector(text)


class OtherHashEmbeddings(HashEmbeddings):
    """Another "model" (another class, so another recorded identity)."""


class QueriesOnlyEmbeddings(MeanPoolingEmbeddings):
    """The packaged MiniLM, refusing to embed more than one text per call: an index that loads precomputed chunk
    vectors (``DocumentIndex.add_embedded``) must only ever embed queries."""

    def embed_documents(self, texts):
        if len(texts) > 1:
            raise AssertionError("the index embedded chunks again")
        return super().embed_documents(texts)


def write_pdf(path: Path, pages: list[str]) -> Path:
    """A minimal PDF, one text line per page in Helvetica; pypdf extracts the text back."""
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [{}] /Count {} >>".format(" ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages))),
                                                          len(pages)),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for i, text in enumerate(pages):
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 12 Tf 72 720 Td ({escaped}) Tj ET"
        objects.append(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
            f"/Contents {5 + 2 * i} 0 R >>"
        )
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    out = b"%PDF-1.4\n"
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{offset:010d} 00000 n \n" for offset in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(out)
    return path


CARS = "The car engine needs fresh oil. A mechanic repairs the engine and replaces the brakes of the car."
BREAD = "# Baking bread\n\nKnead the dough, let the yeast rise, then bake the loaf in a hot oven.\n"
CLINIC = ["The doctor examines patients in the clinic every morning.", "Nurses give vaccines at the hospital."]
RECORDS = [
    {"text": "Volcanoes erupt lava and ash over the island.", "category": "geology", "id": 1},
    {"text": "Penguins live in Antarctica and eat krill and fish.", "category": "biology", "id": 2},
]


def write_corpus(folder: Path) -> dict[str, Path]:
    """One file of each supported kind, each on its own topic; returns them by kind."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "text": folder / "cars.txt",
        "markdown": folder / "bread.md",
        "pdf": folder / "clinic.pdf",
        "jsonl": folder / "facts.jsonl",
    }
    files["text"].write_text(CARS)
    files["markdown"].write_text(BREAD)
    write_pdf(files["pdf"], CLINIC)
    files["jsonl"].write_text("".join(json.dumps(record) + "\n" for record in RECORDS))
    return files
