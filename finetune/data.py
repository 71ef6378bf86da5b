"""Training data for Dolly's recipe: load and validate records, then tokenize them into Dolly's training format.

The pipeline, in the order it runs:

1. :func:`load_records` reads a hub dataset (by default ``databricks/databricks-dolly-15k``: databricks-dolly-15k
   on the Hugging Face hub, CC BY-SA 3.0) or a local .jsonl/.json/.parquet/.csv file into
   ``{"instruction", "context", "response"}`` dicts. Alpaca-style records (``instruction`` / ``input`` /
   ``output``, dolly-v1's data) are mapped onto the same keys. A record with a missing or empty
   instruction or response stops the run with an error naming the file and the record (line) number, unless
   ``skip_bad_records``.
2. :func:`add_dolly_special_tokens` adds ``### End``, ``### Instruction:`` and ``### Response:\\n`` to the tokenizer
   as special tokens, as Dolly did (the caller then resizes the model's embeddings).
3. :func:`build_dataset` renders each record with :func:`dolly_langchain.prompts.format_training_text` (the one
   source of Dolly's format), tokenizes it, drops the records longer than ``max_length`` (Dolly dropped, never
   truncated, so no example loses its ``### End``) and marks the completion: every token after the
   ``### Response:\\n`` token. TRL's ``SFTTrainer`` turns that mask into labels (completion-only loss), which equal
   the labels Dolly's ``DataCollatorForCompletionOnlyLM`` produced.
4. :func:`split_dataset` holds out ``--test-size`` records with the run's seed, as Dolly did.

:func:`heldout_records` repeats steps 1, 3 (the length rule) and 4 for an evaluation: the records a run held out.
This module imports nothing of the package but :mod:`finetune.common` (the error type and the default dataset).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dolly_langchain.errors import DollyError, DollyValueError
from dolly_langchain.files import BadLine, iter_jsonl
from dolly_langchain.prompts import DOLLY_SPECIAL_TOKENS, RESPONSE_KEY_NL, format_training_text
from finetune.common import DEFAULT_TRAINING_DATASET, FinetuneError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TRAINING_DATASET", "LOCAL_SUFFIXES", "BadRecordError", "add_dolly_special_tokens", "build_dataset",
    "heldout_records", "load_records", "split_dataset", "training_text",
]

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class BadRecordError(DollyError, ValueError):
    """A training record lacks its instruction or response, or the file cannot be read as records."""


# --- 1. Records -------------------------------------------------------------------------------------------------


def load_records(
    source: str | Path, max_records: int | None = None, skip_bad_records: bool = False
) -> tuple[list[dict[str, str]], int]:
    """Read and validate training records from a hub dataset id or a local file.

    Returns ``(records, n_bad)``: records as ``{"instruction", "context", "response"}`` (context ``""`` when the
    record has none) and the number of bad records skipped (always 0 unless ``skip_bad_records``).
    ``max_records`` keeps only the first N records of the source (bad ones included in the count).
    """
    records, bad = [], []
    for n, (where, raw) in enumerate(_iter_raw_records(source), start=1):
        if max_records is not None and n > max_records:
            break
        record, problem = _normalize(raw)
        if problem is None:
            records.append(record)
            continue
        message = f"{source}: {where}: {problem}"
        if not skip_bad_records:
            raise BadRecordError(f"{message}. Fix the record, or pass --skip-bad-records to skip bad records.")
        bad.append(message)
    if bad:
        logger.warning("Skipped %d bad record(s) (--skip-bad-records); first: %s", len(bad), bad[0])
    if not records:
        raise BadRecordError(f"{source}: no usable records (skipped {len(bad)} bad). Check --training-dataset.")
    return records, len(bad)


def _iter_raw_records(source: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, raw record)``; the location names the record (and line) for error messages."""
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise BadRecordError(f"--training-dataset {source}: no such file.")
        if suffix not in LOCAL_SUFFIXES:
            raise BadRecordError(
                f"--training-dataset {source}: unsupported file type {suffix!r}; "
                f"use one of {', '.join(LOCAL_SUFFIXES)}."
            )
        yield from {".jsonl": _iter_jsonl, ".json": _iter_json, ".parquet": _iter_parquet, ".csv": _iter_csv}[
            suffix
        ](path)
        return
    yield from _iter_hub(str(source))


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """Each non-blank line is a record; one that is not valid UTF-8 or JSON (or nests too deep to read) is a bad
    record, reported (or skipped) like any other."""
    for n, (line_no, raw) in enumerate(iter_jsonl(path), start=1):
        if isinstance(raw, BadLine):
            raw = _Unreadable(raw.reason)
        yield f"record {n} (line {line_no})", raw


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        # Many ".json" datasets are JSON Lines (datasets.load_dataset("json") reads both); read line by line, which
        # also names the line of a bad record.
        yield from _iter_jsonl(path)
        return
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"train": [...]} or {"data": [...]}
    if not isinstance(data, list):
        raise BadRecordError(f"{path}: expected a JSON list of records (or JSON Lines), got {type(data).__name__}.")
    for n, raw in enumerate(data, start=1):
        yield f"record {n}", raw


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    for n, raw in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield f"record {n}", raw


def _iter_csv(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file)
        for n, raw in enumerate(reader, start=1):
            # line_num is where the record ends; a quoted field may span several lines.
            yield f"record {n} (line {reader.line_num})", raw


def _iter_hub(dataset_id: str) -> Iterator[tuple[str, Any]]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(dataset_id, split="train")
    except Exception as err:  # offline, unknown id, gated: all surface as different exception types
        raise BadRecordError(
            f"--training-dataset {dataset_id}: could not load it from the Hugging Face hub ({err}). Pass a local "
            f".jsonl/.json/.parquet/.csv file instead, or check the dataset id and your network."
        ) from err
    for n, raw in enumerate(dataset, start=1):
        yield f"record {n}", raw


class _Unreadable:
    """Stands for a line that is not a JSON object, so it is reported (or skipped) like any bad record."""

    def __init__(self, problem: str):
        self.problem = problem


def _normalize(raw: Any) -> tuple[dict[str, str], str | None]:
    """Map a Dolly or Alpaca record onto instruction/context/response; return ``(record, problem or None)``."""
    if isinstance(raw, _Unreadable):
        return {}, raw.problem
    if not isinstance(raw, dict):
        return {}, f"expected an object with instruction/response, got {type(raw).__name__}"
    # Alpaca (dolly-v1): input -> context, output -> response.
    response_key = "response" if "response" in raw or "output" not in raw else "output"
    context_key = "context" if "context" in raw or "input" not in raw else "input"
    record = {}
    for key, source_key in (("instruction", "instruction"), ("response", response_key)):
        value = raw.get(source_key)
        if value is None:
            return {}, f"missing {source_key!r} (keys: {', '.join(map(str, raw)) or 'none'})"
        if not isinstance(value, str) or not value.strip():
            return {}, f"empty {source_key!r}"
        record[key] = value
    context = raw.get(context_key)
    record["context"] = context if isinstance(context, str) else ""
    return record, None


# --- 2. Tokenizer -----------------------------------------------------------------------------------------------


def add_dolly_special_tokens(tokenizer) -> int:
    """Add Dolly's keys as special tokens (as Dolly's trainer did) and set pad = eos; return how many were new.

    The caller must resize the model's embeddings to ``len(tokenizer)`` afterwards.
    """
    # Dolly set pad = eos unconditionally: labels come from the completion mask, never from the pad id.
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.add_special_tokens({"additional_special_tokens": list(DOLLY_SPECIAL_TOKENS)})


# --- 3. Dataset -------------------------------------------------------------------------------------------------


def training_text(record: dict[str, str]) -> str:
    """Dolly's training text for one record (see :func:`dolly_langchain.prompts.format_training_text`)."""
    return format_training_text(record["instruction"], record["response"], record["context"] or None)


def build_dataset(records: list[dict[str, str]], tokenizer, max_length: int, batch_size: int = 1000):
    """Tokenize records into a TRL-ready dataset; return ``(dataset, n_dropped)``.

    Columns: ``input_ids`` and ``completion_mask`` (1 on the tokens after ``### Response:\\n``: the response,
    ``\\n\\n`` and ``### End``). TRL's SFTTrainer sees ``input_ids`` and skips its own tokenization, then builds
    the labels from the mask (``completion_only_loss=True``). Records longer than ``max_length`` tokens are
    dropped and counted in ``n_dropped``.
    """
    from datasets import Dataset

    response_id = tokenizer.convert_tokens_to_ids(RESPONSE_KEY_NL)
    if response_id is None or response_id == tokenizer.unk_token_id:
        raise DollyValueError(f"{RESPONSE_KEY_NL!r} is not a token: call add_dolly_special_tokens(tokenizer) first.")
    columns: dict[str, list] = {"input_ids": [], "completion_mask": []}
    kept = _tokenize_within(records, tokenizer, max_length, batch_size)
    for _, ids in kept:
        # Dolly's collator masked everything up to and including the FIRST response-key token.
        first = ids.index(response_id) + 1
        columns["input_ids"].append(ids)
        columns["completion_mask"].append([0] * first + [1] * (len(ids) - first))
    n_dropped = len(records) - len(kept)
    if n_dropped:
        logger.warning(
            "Dropped %d of %d records longer than --max-length %d tokens", n_dropped, len(records), max_length
        )
    return Dataset.from_dict(columns), n_dropped


def _tokenize_within(records: list[dict[str, str]], tokenizer, max_length: int,
                     batch_size: int = 1000) -> list[tuple[dict[str, str], list[int]]]:
    """The length rule, shared by training and :func:`heldout_records`: ``(record, token ids)`` of each record whose
    training text is at most ``max_length`` tokens, in order; the others are dropped.

    Tokenized exactly as Dolly did (``tokenizer(text)``, special tokens split out), but without truncation: Dolly
    truncated then dropped records of length >= max_length, which also dropped records of exactly max_length;
    knowing the true length, we keep those and drop only the ones truncation would cut.
    """
    kept = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        for record, ids in zip(batch, tokenizer([training_text(r) for r in batch])["input_ids"]):
            if len(ids) <= max_length:
                kept.append((record, ids))
    return kept


# --- 4. Split ---------------------------------------------------------------------------------------------------


def split_dataset(dataset, test_size: int | float, seed: int):
    """Dolly's split: shuffle with the seed, hold out ``test_size`` records (0: no evaluation).

    Returns ``(train, held_out)`` datasets (``held_out`` is None for ``test_size`` 0). Which records are held out
    depends only on the number of records, ``test_size`` and ``seed``.
    """
    if not test_size:
        return dataset.shuffle(seed=seed), None
    if isinstance(test_size, int) and test_size >= len(dataset):
        raise FinetuneError(
            f"--test-size {test_size} leaves no training records: only {len(dataset)} usable records. Pass a "
            "smaller --test-size (a count, or a ratio such as 0.05)."
        )
    split = dataset.train_test_split(test_size=test_size, seed=seed)
    return split["train"], split["test"]


def heldout_records(training_dataset: str | Path, *, max_records: int | None = None, skip_bad_records: bool = False,
                    tokenizer, max_length: int, test_size: int | float, seed: int) -> list[dict[str, str]]:
    """The records a ``dolly-finetune`` run with these flags held out, as ``{"instruction", "context", "response"}``.

    The same steps as training: :func:`load_records` (``--training-dataset``, ``--max-records``,
    ``--skip-bad-records``), drop the records longer than ``max_length`` tokens (training's rule; pass the run's own
    tokenizer, which carries Dolly's tokens), then :func:`split_dataset` with ``test_size`` and ``seed``. Since the
    split depends only on the number of records and the seed, an index dataset stands in for the tokenized one.
    ``test_size`` 0 held out nothing: ``[]``. Raises :class:`BadRecordError` when the data cannot be read again.
    """
    from datasets import Dataset

    records, _ = load_records(training_dataset, max_records, skip_bad_records)
    kept = [record for record, _ in _tokenize_within(records, tokenizer, max_length)]
    _, held_out = split_dataset(Dataset.from_dict({"i": list(range(len(kept)))}), test_size, seed)
    return [] if held_out is None else [kept[i] for i in held_out["i"]]
