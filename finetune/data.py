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
   source of Dolly's format), tokenizes it (:func:`tokenize_records`: control tokens come only from the template,
   never from a record's text, as at inference), drops the records longer than ``max_length`` (Dolly dropped, never
   truncated, so no example loses its ``### End``) and marks the completion: every token after the
   ``### Response:\\n`` token. TRL's ``SFTTrainer`` turns that mask into labels (completion-only loss), which equal
   the labels Dolly's ``DataCollatorForCompletionOnlyLM`` produced.
4. :func:`split_dataset` holds out ``--test-size`` records with the run's seed, as Dolly did.

:func:`heldout_records` repeats steps 1, 3 (the length rule) and 4 for an evaluation: the records a run held out.
This module imports nothing of the package but :mod:`finetune.common` (the error type and the default dataset), the
shared floor (errors, files, prompts) and, for records that hold control strings, :mod:`dolly_langchain.codec`.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dolly_langchain.errors import DollyError, DollyValueError
from dolly_langchain.files import BadLine, iter_jsonl
from dolly_langchain.prompts import (
    DOLLY_SPECIAL_TOKENS,
    END_KEY,
    RESPONSE_KEY_NL,
    format_training_text,
    prompt_segments,
)
from finetune.common import DEFAULT_TRAINING_DATASET, FinetuneError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TRAINING_DATASET", "LOCAL_SUFFIXES", "BadRecordError", "add_dolly_special_tokens", "build_dataset",
    "heldout_records", "load_records", "split_dataset", "tokenize_records", "training_segments", "training_text",
]

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class BadRecordError(DollyError, ValueError):
    """A training record lacks its instruction or response, or the file cannot be read as records."""


# --- 1. Records -------------------------------------------------------------------------------------------------


def load_records(
    source: str | Path, max_records: int | None = None, skip_bad_records: bool = False, *,
    skip_flag: str | None = "--skip-bad-records",
) -> tuple[list[dict[str, str]], int]:
    """Read and validate training records from a hub dataset id or a local file.

    Returns ``(records, n_bad)``: records as ``{"instruction", "context", "response"}`` (context ``""`` when the
    record has none) and the number of bad records skipped (always 0 unless ``skip_bad_records``).
    ``max_records`` keeps only the first N records of the source (bad ones included in the count).
    ``skip_flag``: the caller's flag that skips bad records, named in the error of a bad record; ``None`` when the
    caller has none (``dolly-eval``), so that the message does not suggest a flag the command lacks.
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
            fix = f"Fix the record, or pass {skip_flag} to skip bad records." if skip_flag else "Fix the record."
            raise BadRecordError(f"{message}. {fix}")
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
        # Dolly's collator masked everything up to and including the FIRST response-key token: the template's, since
        # a record's own "### Response:" stays text (tokenize_records; in Dolly's recipe it moved the mask).
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

    Tokenized by :func:`tokenize_records` (Dolly's ``tokenizer(text)``, with user text kept text), but without
    truncation: Dolly truncated then dropped records of length >= max_length, which also dropped records of exactly
    max_length; knowing the true length, we keep those and drop only the ones truncation would cut.
    """
    kept = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        for record, ids in zip(batch, tokenize_records(batch, tokenizer)):
            if len(ids) <= max_length:
                kept.append((record, ids))
    return kept


def training_segments(record: dict[str, str]) -> list[tuple[str, bool]]:
    """:func:`training_text` as ``(text, is_user_text)`` pieces (joined, they are the training text): the prompt's
    (:func:`dolly_langchain.prompts.prompt_segments`), then the response (user text) and ``\n\n### End``."""
    return [*prompt_segments(record["instruction"], record["context"] or None), (record["response"], True),
            (f"\n\n{END_KEY}", False)]


def tokenize_records(records: list[dict[str, str]], tokenizer) -> list[list[int]]:
    """Token ids of each record's training text, in which only the template makes control tokens.

    Dolly's recipe (and this module until it was fixed) tokenized the whole text, ``tokenizer(text)``, with the
    special tokens active, so a record's own text could inject control tokens: an instruction containing
    ``### Response:`` became the response key, moving the loss mask into the instruction, and ``### End`` inside a
    response became the real end token mid-answer, teaching the model to stop there. Inference never lets user text
    become a control token (:meth:`dolly_langchain.codec.PromptCodec.encode_segments`); training must not either,
    or the model learns from records what no prompt can show it.

    So each record is tokenized Dolly's way (one batched ``tokenizer(texts)``: the same ids as before) only when
    the control tokens found in its text are exactly the template's, at the template's places; any other record
    (a control string in its instruction, context or response, or one that forms across the border with the
    template) is encoded by the inference codec, segment by segment, user text with ``split_special_tokens``: the
    characters stay plain text, exactly as a prompt with them would be encoded. The tokenizer's own framing (a BOS,
    an EOS) is kept as ``tokenizer(text)`` adds it.
    """
    if not records:
        return []
    controls = _control_pattern(tokenizer)
    texts = [training_text(record) for record in records]
    encoded = tokenizer(texts)["input_ids"]
    codec = None
    for k, (record, text) in enumerate(zip(records, texts)):
        segments = training_segments(record)
        if _control_spans(controls, text) == _template_control_spans(controls, segments):
            continue
        if codec is None:
            codec, trailing = _training_codec(tokenizer), _trailing_special_ids(tokenizer)
        encoded[k] = codec.encode_segments(segments) + trailing
    return encoded


def _control_pattern(tokenizer) -> re.Pattern:
    """The control tokens (the tokenizer's special added tokens), longest first: the inference codec's set."""
    specials = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    return re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) or r"(?!)")


def _control_spans(controls: re.Pattern, text: str) -> list[tuple[int, int]]:
    return [match.span() for match in controls.finditer(text)]


def _template_control_spans(controls: re.Pattern, segments: list[tuple[str, bool]]) -> list[tuple[int, int]]:
    """Where the template's own control tokens sit in the joined text of ``segments``."""
    spans, offset = [], 0
    for text, is_user in segments:
        if not is_user:
            spans += [(offset + start, offset + end) for start, end in _control_spans(controls, text)]
        offset += len(text)
    return spans


def _training_codec(tokenizer):
    """The inference codec over the training tokenizer, for its encoding only (it sets left padding, which is for
    generation: the tokenizer's own padding side is put back)."""
    from dolly_langchain.codec import PromptCodec

    padding_side = tokenizer.padding_side
    codec = PromptCodec(tokenizer, "dolly")
    tokenizer.padding_side = padding_side
    return codec


def _trailing_special_ids(tokenizer) -> list[int]:
    """Ids ``tokenizer(text)`` puts after any text (an EOS for some tokenizers; nothing for GPT-NeoX or SmolLM2)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            return with_special[start + len(without) :]
    return []


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
                    tokenizer, max_length: int, test_size: int | float, seed: int,
                    skip_flag: str | None = "--skip-bad-records") -> list[dict[str, str]]:
    """The records a ``dolly-finetune`` run with these flags held out, as ``{"instruction", "context", "response"}``.

    The same steps as training: :func:`load_records` (``--training-dataset``, ``--max-records``,
    ``--skip-bad-records``), drop the records longer than ``max_length`` tokens (training's rule; pass the run's own
    tokenizer, which carries Dolly's tokens), then :func:`split_dataset` with ``test_size`` and ``seed``. Since the
    split depends only on the number of records and the seed, an index dataset stands in for the tokenized one.
    ``test_size`` 0 held out nothing: ``[]``. Raises :class:`BadRecordError` when the data cannot be read again
    (``skip_flag`` as in :func:`load_records`).
    """
    from datasets import Dataset

    records, _ = load_records(training_dataset, max_records, skip_bad_records, skip_flag=skip_flag)
    kept = [record for record, _ in _tokenize_within(records, tokenizer, max_length)]
    _, held_out = split_dataset(Dataset.from_dict({"i": list(range(len(kept)))}), test_size, seed)
    return [] if held_out is None else [kept[i] for i in held_out["i"]]
