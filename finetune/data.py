"""Training data for Dolly's recipe: load and validate records, then tokenize them into Dolly's training format.

The pipeline, in the order it runs:

1. :func:`load_records` reads the hub dataset ``databricks/databricks-dolly-15k`` or a local .jsonl/.json/.parquet/
   .csv file into ``{"instruction", "context", "response"}`` dicts. Alpaca-style records (``instruction`` /
   ``input`` / ``output``, dolly-v1's data) are mapped onto the same keys. A record with a missing or empty
   instruction or response stops the run with an error naming the file and the record (line) number, unless
   ``skip_bad_records``.
2. :func:`add_dolly_special_tokens` adds ``### End``, ``### Instruction:`` and ``### Response:\\n`` to the tokenizer
   as special tokens, as Dolly did (the caller then resizes the model's embeddings).
3. :func:`build_dataset` renders each record with :func:`dolly_langchain.prompts.format_training_text` (the one
   source of Dolly's format), tokenizes it, drops the records longer than ``max_length`` (Dolly dropped, never
   truncated, so no example loses its ``### End``) and marks the completion: every token after the
   ``### Response:\\n`` token. TRL's ``SFTTrainer`` turns that mask into labels (completion-only loss), which equal
   the labels Dolly's ``DataCollatorForCompletionOnlyLM`` produced.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dolly_langchain.prompts import DOLLY_SPECIAL_TOKENS, RESPONSE_KEY_NL, format_training_text

logger = logging.getLogger(__name__)

DEFAULT_TRAINING_DATASET = "databricks/databricks-dolly-15k"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class BadRecordError(ValueError):
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
    with path.open(encoding="utf-8") as lines:
        n = 0
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            n += 1
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                raw = _Unreadable(f"not valid JSON ({err.msg})")
            yield f"record {n} (line {line_no})", raw


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        # Many ".json" datasets are JSON Lines (datasets.load_dataset("json") reads both).
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
        raise ValueError(f"{RESPONSE_KEY_NL!r} is not a token: call add_dolly_special_tokens(tokenizer) first.")
    columns: dict[str, list] = {"input_ids": [], "completion_mask": []}
    n_dropped = 0
    for start in range(0, len(records), batch_size):
        texts = [training_text(r) for r in records[start : start + batch_size]]
        # Tokenized exactly as Dolly did (tokenizer(text), special tokens split out), but without truncation:
        # Dolly truncated then dropped records of length >= max_length, which also dropped records of exactly
        # max_length; knowing the true length, we keep those and drop only the ones truncation would cut.
        for ids in tokenizer(texts)["input_ids"]:
            if len(ids) > max_length:
                n_dropped += 1
                continue
            # Dolly's collator masked everything up to and including the FIRST response-key token.
            first = ids.index(response_id) + 1
            columns["input_ids"].append(ids)
            columns["completion_mask"].append([0] * first + [1] * (len(ids) - first))
    if n_dropped:
        logger.warning(
            "Dropped %d of %d records longer than --max-length %d tokens", n_dropped, len(records), max_length
        )
    return Dataset.from_dict(columns), n_dropped
