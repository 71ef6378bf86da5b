"""Tiny records in each evaluation set's original format (written here, never copied from the real files)."""

from __future__ import annotations

import json
from pathlib import Path


def _jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _lines(path: Path, values: list[str]) -> None:
    path.write_text("".join(v + "\n" for v in values), encoding="utf-8")


def _ai2(i: int, stem: str, texts: list[str], labels: list[str], answer: str) -> dict:
    return {"id": f"Q{i}", "question": {"stem": stem, "choices": [{"text": t, "label": l} for t, l in
                                                                  zip(texts, labels)]}, "answerKey": answer}


OPENBOOKQA = [
    _ai2(1, "The sun is a", ["star", "planet", "moon", "comet"], list("ABCD"), "A"),
    _ai2(2, "Water freezes at", ["zero degrees", "ten degrees", "fifty degrees", "boiling"], list("ABCD"), "A"),
    _ai2(3, "A magnet attracts", ["wood", "iron", "glass", "paper"], list("ABCD"), "B"),
]
ARC = [
    _ai2(1, "Which is a mammal?", ["shark", "whale", "trout", "eel"], list("ABCD"), "B"),
    _ai2(2, "What do plants need to grow?", ["sunlight", "darkness", "salt"], ["1", "2", "3"], "1"),
    _ai2(3, "Which is the hottest?", ["ice", "lava", "snow", "rain", "fog"], list("ABCDE"), "B"),
    _ai2(4, "Which falls when dropped?", ["a ball", "smoke", "light", "sound"], ["1", "2", "3", "4"], "1"),
]
WINOGRANDE = [
    {"qID": "w-1", "sentence": "The cup fell off the table because _ was too close to the edge.",
     "option1": "the cup", "option2": "the table", "answer": "1"},
    {"qID": "w-2", "sentence": "Anna gave Maria a gift because _ was having a birthday.",
     "option1": "Anna", "option2": "Maria", "answer": "2"},
]
WINOGRANDE_LABELS = ["1", "2"]
PIQA = [
    {"id": "p-1", "goal": "To dry wet shoes", "sol1": "stuff them with newspaper", "sol2": "fill them with water"},
    {"id": "p-2", "goal": "To cut paper", "sol1": "use a spoon", "sol2": "use scissors"},
]
PIQA_LABELS = ["0", "1"]
BOOLQ = [
    {"question": "is the sun a star", "passage": "Sun -- The Sun is the star at the center of the Solar System.",
     "idx": 0, "label": True},
    {"question": "is a whale a fish", "passage": "Whale -- Whales are marine mammals.", "idx": 1, "label": False},
]
HELLASWAG = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Home and Garden", "ctx_a": "[header] How to water a plant [title] Fill a can.",
     "ctx_b": "then", "ctx": "[header] How to water a plant [title] Fill a can. then", "split": "val",
     "split_type": "zeroshot", "label": 0,
     "endings": ["pour it slowly [step] Stop when wet.", "throw the can.", "eat the soil.", "paint the pot."],
     "source_id": "wikihow~12345"},
]


def write_eval_dir(root: Path, tasks=("openbookqa", "arc_easy", "arc_challenge", "winogrande", "piqa", "boolq",
                                      "hellaswag")) -> Path:
    """An evaluation directory in ``../shared/eval``'s layout with the records above (only ``tasks``)."""
    if "openbookqa" in tasks:
        _jsonl(root / "openbookqa/test.jsonl", OPENBOOKQA)
    if "arc_easy" in tasks:
        _jsonl(root / "arc_easy/ARC-Easy-Test.jsonl", ARC)
    if "arc_challenge" in tasks:
        _jsonl(root / "arc_challenge/ARC-Challenge-Test.jsonl", ARC[::-1])
    if "winogrande" in tasks:
        _jsonl(root / "winogrande/dev.jsonl", WINOGRANDE)
        _lines(root / "winogrande/dev-labels.lst", WINOGRANDE_LABELS)
    if "piqa" in tasks:
        _jsonl(root / "piqa/valid.jsonl", PIQA)
        _lines(root / "piqa/valid-labels.lst", PIQA_LABELS)
    if "boolq" in tasks:
        _jsonl(root / "boolq/val.jsonl", BOOLQ)
    if "hellaswag" in tasks:
        _jsonl(root / "hellaswag/hellaswag_val.jsonl", HELLASWAG)
    return root
