"""The card's evaluation sets from their authors' original files, converted to the rows lm-eval's hub datasets hold.

lm-eval's task definitions read Hugging Face hub datasets. Offline, ``--data-dir`` (default ``$DOLLY_EVAL_DIR``)
holds the files as their authors released them, in this layout::

    openbookqa/test.jsonl                 AI2 OpenBookQA-V1-Sep2018, Data/Main/test.jsonl
    arc_easy/ARC-Easy-Test.jsonl          AI2 ARC-V1-Feb2018, ARC-Easy/ARC-Easy-Test.jsonl
    arc_challenge/ARC-Challenge-Test.jsonl  AI2 ARC-V1-Feb2018, ARC-Challenge/ARC-Challenge-Test.jsonl
    winogrande/dev.jsonl + dev-labels.lst WinoGrande 1.1 (the winogrande_xl validation split)
    piqa/valid.jsonl + valid-labels.lst   PIQA
    boolq/val.jsonl                       SuperGLUE BoolQ
    hellaswag/hellaswag_val.jsonl         HellaSwag (also found as hellaswag_val.jsonl at the top)

:func:`load_docs` turns each into exactly the rows of the hub dataset lm-eval would load (same field names, same
encodings): OpenBookQA's and ARC's nested ``question.stem``/``question.choices`` become ``question_stem`` or
``question`` plus ``choices: {text: [...], label: [...]}`` with labels kept as released (ARC has A-E and 1-4);
WinoGrande and PIQA answers come from the ``.lst`` label files (``answer`` "1"/"2" as a string, ``label`` 0/1 as an
int); BoolQ's boolean ``label`` becomes 0/1; HellaSwag's integer ``label`` becomes a string as on the hub. Fields
the hub copy does not have (WinoGrande's ``qID``, PIQA's ``id``) are dropped. The task's own ``process_docs`` and
prompt functions then run on these rows unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dolly_langchain.errors import DollyError
from dolly_langchain.files import BadLine, iter_jsonl

#: Files per task, relative to the data directory, and where to get them.
TASK_FILES: dict[str, tuple[str, ...]] = {
    "openbookqa": ("openbookqa/test.jsonl",),
    "arc_easy": ("arc_easy/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("arc_challenge/ARC-Challenge-Test.jsonl",),
    "winogrande": ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"),
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "boolq": ("boolq/val.jsonl",),
    "hellaswag": ("hellaswag/hellaswag_val.jsonl",),
}

SOURCES = {
    "openbookqa": "Data/Main/test.jsonl in https://ai2-public-datasets.s3.amazonaws.com/open-book-qa/"
                  "OpenBookQA-V1-Sep2018.zip",
    "arc_easy": "ARC-Easy/ARC-Easy-Test.jsonl in https://ai2-public-datasets.s3.amazonaws.com/arc/ARC-V1-Feb2018.zip",
    "arc_challenge": "ARC-Challenge/ARC-Challenge-Test.jsonl in "
                     "https://ai2-public-datasets.s3.amazonaws.com/arc/ARC-V1-Feb2018.zip",
    "winogrande": "dev.jsonl and dev-labels.lst in https://storage.googleapis.com/ai2-mosaic/public/winogrande/"
                  "winogrande_1.1.zip",
    "piqa": "valid.jsonl and valid-labels.lst from https://yonatanbisk.com/piqa/data/",
    "boolq": "val.jsonl in https://dl.fbaipublicfiles.com/glue/superglue/data/v2/BoolQ.zip",
    "hellaswag": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
}

#: The split name lm-eval's task config evaluates (``test_split`` if it has one, else ``validation_split``).
EVAL_SPLITS = {
    "openbookqa": "test",
    "arc_easy": "test",
    "arc_challenge": "test",
    "winogrande": "validation",
    "piqa": "validation",
    "boolq": "validation",
    "hellaswag": "validation",
}


class TaskDataError(DollyError, ValueError):
    """A task's file is missing or not in its authors' format; the message names the file and the fix."""


class MissingTaskFile(TaskDataError):
    """A task's file is not in the data directory."""


def task_paths(task: str, data_dir: str | Path) -> list[Path]:
    """The files ``task`` needs in ``data_dir``; raises :class:`MissingTaskFile` naming the first one missing."""
    if task not in TASK_FILES:
        raise TaskDataError(f"unknown task {task!r}; known: {', '.join(TASK_FILES)}")
    paths = [Path(data_dir) / name for name in TASK_FILES[task]]
    if task == "hellaswag" and not paths[0].is_file() and (Path(data_dir) / paths[0].name).is_file():
        paths = [Path(data_dir) / paths[0].name]  # the file as downloaded, dropped straight into the directory
    for path in paths:
        if not path.is_file():
            raise MissingTaskFile(f"{task}: {path} not found; get {SOURCES[task]} and put it there")
    return paths


def load_docs(task: str, data_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``task``'s evaluation split, read from the original files and encoded as on the hub."""
    paths = task_paths(task, data_dir)
    return CONVERTERS[task](*paths)


# --- converters, one per original format ---------------------------------------------------------------------------


def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` per record; the first line that is not a JSON object stops with a TaskDataError."""
    for line_no, record in iter_jsonl(path):
        if isinstance(record, BadLine):
            raise TaskDataError(f"{path} line {line_no}: {record.reason}")
        if not isinstance(record, dict):
            raise TaskDataError(f"{path} line {line_no}: expected a JSON object")
        yield line_no, record


def _labels(path: Path, n_records: int, records_path: Path) -> list[str]:
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != n_records:
        raise TaskDataError(f"{path} has {len(labels)} labels but {records_path} has {n_records} records; "
                            "use the two files from the same release")
    return labels


def _field(path: Path, line_no: int, record: dict, *keys: str) -> Any:
    value: Any = record
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise TaskDataError(f"{path} line {line_no}: missing {'.'.join(keys)!r}; is this the original file?")
        value = value[key]
    return value


def _ai2_question(path: Path, question_key: str) -> list[dict[str, Any]]:
    """OpenBookQA / ARC: ``question.stem`` and ``question.choices[{text, label}]`` -> flat hub rows."""
    docs = []
    for line_no, r in _jsonl(path):
        choices = _field(path, line_no, r, "question", "choices")
        docs.append({
            "id": _field(path, line_no, r, "id"),
            question_key: _field(path, line_no, r, "question", "stem"),
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": _field(path, line_no, r, "answerKey"),
        })
    return docs


def openbookqa(path: Path) -> list[dict[str, Any]]:
    """allenai/openbookqa (main): ``id``, ``question_stem``, ``choices``, ``answerKey``."""
    return _ai2_question(path, "question_stem")


def arc(path: Path) -> list[dict[str, Any]]:
    """allenai/ai2_arc: ``id``, ``question``, ``choices``, ``answerKey`` (labels A-E or 1-4, as released)."""
    return _ai2_question(path, "question")


def winogrande(path: Path, labels_path: Path) -> list[dict[str, Any]]:
    """allenai/winogrande (winogrande_xl): ``sentence``, ``option1``, ``option2``, ``answer`` ("1"/"2")."""
    records = list(_jsonl(path))
    labels = _labels(labels_path, len(records), path)
    docs = []
    for (line_no, r), label in zip(records, labels):
        if label not in ("1", "2"):
            raise TaskDataError(f"{labels_path}: label {label!r} for {path} line {line_no} is not 1 or 2")
        if "answer" in r and str(r["answer"]) != label:
            raise TaskDataError(f"{path} line {line_no}: answer {r['answer']!r} disagrees with {labels_path} "
                                f"({label!r}); use the two files from the same release")
        docs.append({
            "sentence": _field(path, line_no, r, "sentence"),
            "option1": _field(path, line_no, r, "option1"),
            "option2": _field(path, line_no, r, "option2"),
            "answer": label,
        })
    return docs


def piqa(path: Path, labels_path: Path) -> list[dict[str, Any]]:
    """PIQA as lm-eval loads it: ``goal``, ``sol1``, ``sol2``, ``label`` (0/1, from the labels file)."""
    records = list(_jsonl(path))
    labels = _labels(labels_path, len(records), path)
    docs = []
    for (line_no, r), label in zip(records, labels):
        if label not in ("0", "1"):
            raise TaskDataError(f"{labels_path}: label {label!r} for {path} line {line_no} is not 0 or 1")
        docs.append({
            "goal": _field(path, line_no, r, "goal"),
            "sol1": _field(path, line_no, r, "sol1"),
            "sol2": _field(path, line_no, r, "sol2"),
            "label": int(label),
        })
    return docs


def boolq(path: Path) -> list[dict[str, Any]]:
    """super_glue/boolq: ``question``, ``passage``, ``idx``, ``label`` (the file's true/false as 1/0)."""
    docs = []
    for line_no, r in _jsonl(path):
        label = _field(path, line_no, r, "label")
        if not isinstance(label, bool):
            raise TaskDataError(f"{path} line {line_no}: label {label!r} is not true/false")
        docs.append({
            "question": _field(path, line_no, r, "question"),
            "passage": _field(path, line_no, r, "passage"),
            "idx": _field(path, line_no, r, "idx"),
            "label": int(label),
        })
    return docs


HELLASWAG_FIELDS = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split", "split_type")


def hellaswag(path: Path) -> list[dict[str, Any]]:
    """Rowan/hellaswag: the original fields, with ``label`` as a string ("0".."3") as the hub stores it."""
    docs = []
    for line_no, r in _jsonl(path):
        doc = {key: _field(path, line_no, r, key) for key in HELLASWAG_FIELDS}
        if len(doc["endings"]) != 4:
            raise TaskDataError(f"{path} line {line_no}: expected 4 endings, got {len(doc['endings'])}")
        doc["label"] = str(_field(path, line_no, r, "label"))
        docs.append(doc)
    return docs


CONVERTERS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "openbookqa": openbookqa,
    "arc_easy": arc,
    "arc_challenge": arc,
    "winogrande": winogrande,
    "piqa": piqa,
    "boolq": boolq,
    "hellaswag": hellaswag,
}
