"""Instruction following on held-out databricks-dolly-15k: generate greedily through ``DollyLLM``, score ROUGE-L.

Which records: those a ``dolly-finetune`` run held out (its ``--seed`` and ``--test-size`` reproduce the split,
recorded in ``RUN_DIR/heldout_split.json`` by :func:`record_split` at the end of training), or, for a model that is
not a run, a seeded sample of the dolly-15k file. When several models are compared, all answer the same records: the
held-out records of the first run directory among them, else the same seeded sample.

Per model: ROUGE-L F1 of each answer against the record's human response (Google's ``rouge-score``, with stemming),
the share of answers that ended by themselves (``### End``, end-of-turn or EOS) rather than at ``max_new_tokens``,
the mean answer length in tokens, all also per category; and a few answers side by side.
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dolly_langchain.errors import DollyError
from dolly_langchain.files import BadLine, iter_jsonl, write_json_atomically

logger = logging.getLogger(__name__)

SPLIT_RECORD_FILE = "heldout_split.json"


class GenerationEvalError(DollyError, ValueError):
    """Bad input for the generation evaluation; the message names the file or flag to fix."""


# --- which records --------------------------------------------------------------------------------------------------


def record_split(run_dir: str | Path, args, max_length: int, n_heldout: int) -> Path:
    """Write what reproduces a ``dolly-finetune`` run's held-out split into ``run_dir/heldout_split.json``.

    ``args`` are the run's parsed flags (``training_dataset``, ``max_records``, ``skip_bad_records``,
    ``test_size``, ``seed``); ``max_length`` the resolved longest record (longer ones were dropped before the split).
    """
    source = args.training_dataset
    if Path(source).is_file():
        source = str(Path(source).resolve())
    record = {
        "training_dataset": source,
        "max_records": args.max_records,
        "skip_bad_records": bool(args.skip_bad_records),
        "test_size": args.test_size,
        "seed": args.seed,
        "max_length": int(max_length),
        "n_heldout": int(n_heldout),
    }
    return write_json_atomically(Path(run_dir) / SPLIT_RECORD_FILE, record)


def find_run_dir(model: str | None) -> Path | None:
    """The run directory of ``model`` if it is a ``dolly-finetune`` run (or its ``model/``) with a split record."""
    if model is None:
        return None
    path = Path(model).expanduser()
    for candidate in (path, path.parent):
        if (candidate / SPLIT_RECORD_FILE).is_file():
            return candidate
    return None


def heldout_records(run_dir: str | Path) -> list[dict[str, str]]:
    """The records ``run_dir``'s training held out, reproduced from its split record, with their categories.

    Same steps as ``dolly-finetune`` (:func:`finetune.data.heldout_records`): load and validate the records, drop
    those longer than ``max_length`` tokens (with the run's own tokenizer, which carries Dolly's tokens), then split
    with the run's seed and ``--test-size``. The count must match what the run recorded, or the data file changed
    since training.
    """
    from transformers import AutoTokenizer

    from dolly_langchain.models import resolve_model_path
    from finetune.data import BadRecordError
    from finetune.data import heldout_records as reproduce_heldout

    run_dir = Path(run_dir)
    split_file = run_dir / SPLIT_RECORD_FILE
    spec = json.loads(split_file.read_text(encoding="utf-8"))
    if not spec["test_size"]:
        raise GenerationEvalError(f"{run_dir} was trained with --test-size 0: it held out no records. Pass "
                                  "--dolly-data to score a seeded sample of a data file instead.")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(str(run_dir)))
    try:
        heldout = reproduce_heldout(spec["training_dataset"], max_records=spec["max_records"],
                                    skip_bad_records=spec["skip_bad_records"], tokenizer=tokenizer,
                                    max_length=spec["max_length"], test_size=spec["test_size"], seed=spec["seed"],
                                    skip_flag=None)  # dolly-eval has no --skip-bad-records: the run's choice holds
    except BadRecordError as err:
        raise GenerationEvalError(f"{split_file}: cannot read the run's training data again: {err}") from None
    if spec.get("n_heldout") and len(heldout) != spec["n_heldout"]:
        raise GenerationEvalError(
            f"{split_file}: the run held out {spec['n_heldout']} records but {spec['training_dataset']} now gives "
            f"{len(heldout)}; the data file changed since training."
        )
    return _with_categories(heldout, spec["training_dataset"])


def sample_records(path: str | Path, n: int, seed: int) -> list[dict[str, str]]:
    """A seeded random sample of ``n`` records of a dolly-15k style file (validated as ``dolly-finetune`` does)."""
    from finetune.data import BadRecordError, load_records

    try:
        records, _ = load_records(str(path), skip_flag=None)  # dolly-eval offers no --skip-bad-records
    except BadRecordError as err:
        raise GenerationEvalError(f"--dolly-data: {err}") from None
    chosen = random.Random(seed).sample(records, min(n, len(records)))
    return _with_categories(chosen, str(path))


def _with_categories(records: list[dict[str, str]], source: str) -> list[dict[str, str]]:
    """Attach each record's ``category`` from its source file (``load_records`` keeps only the three texts)."""
    categories: dict[tuple[str, str, str], str] = {}
    path = Path(source)
    if path.suffix.lower() == ".jsonl" and path.is_file():
        for _, raw in iter_jsonl(path):
            if isinstance(raw, BadLine):
                continue
            if isinstance(raw, dict) and isinstance(raw.get("category"), str):
                key = (raw.get("instruction"), raw.get("context") or "", raw.get("response"))
                categories[key] = raw["category"]
    return [{**r, "category": categories.get((r["instruction"], r["context"], r["response"]), "unknown")}
            for r in records]


# --- generating and scoring ----------------------------------------------------------------------------------------


@dataclass
class Answer:
    text: str
    new_tokens: int
    ended: bool
    """Stopped by itself (``### End``, end-of-turn, EOS) rather than at ``max_new_tokens``."""
    rouge_l: float


@dataclass
class ModelGenerations:
    model: str
    answers: list[Answer | None] = field(default_factory=list)
    """One per record, ``None`` where the prompt does not fit the model's context window."""


def generate_answers(llm, records: Sequence[dict[str, str]], max_new_tokens: int, batch_size: int,
                     desc: str = "generating") -> list[tuple[str, int, bool] | None]:
    """Greedy answers of ``llm`` (a ``DollyLLM``) to ``records``, in batches, with a progress bar.

    Goes through the LLM's runtime (its codec, engine and batch scheduler, what ``llm.batch`` uses) rather than
    ``llm.batch`` itself, because only the raw completion says whether generation stopped at an end token or ran
    into ``max_new_tokens``. Returns ``(text, generated tokens, ended by itself)`` or ``None`` for a prompt that does
    not fit the context window with ``max_new_tokens`` more.
    """
    from tqdm.auto import tqdm

    from dolly_langchain.generation import SamplingOptions

    options = SamplingOptions(max_new_tokens=max_new_tokens, do_sample=False)
    encoded: list[list[int] | None] = []
    for record in records:
        ids = llm.codec.encode_prompt(record["instruction"], record["context"] or None)
        try:
            llm.runtime.check_window(len(ids), max_new_tokens)
        except ValueError:
            ids = None
        encoded.append(ids)
    results: list[tuple[str, int, bool] | None] = [None] * len(records)
    todo = [i for i, ids in enumerate(encoded) if ids is not None]
    with tqdm(total=len(todo), desc=desc, unit="answer") as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            completions = llm.runtime.generate([encoded[i] for i in chunk], options)
            for i, completion in zip(chunk, completions):
                n = len(completion.token_ids)  # the stop token id itself is not included
                results[i] = (completion.text, n, n < max_new_tokens)
            bar.update(len(chunk))
    return results


def rouge_l(reference: str, prediction: str) -> float:
    """ROUGE-L F1 (rouge-score, Porter stemming), as reported for summarisation and instruction following."""
    return _scorer().score(reference, prediction)["rougeL"].fmeasure


_SCORER = None


def _scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


def score_model(model_label: str, records: Sequence[dict[str, str]], raw: Sequence[tuple[str, int, bool] | None]
                ) -> ModelGenerations:
    answers = []
    for record, item in zip(records, raw):
        if item is None:
            answers.append(None)
            continue
        text, n, ended = item
        answers.append(Answer(text=text, new_tokens=n, ended=ended, rouge_l=rouge_l(record["response"], text)))
    return ModelGenerations(model=model_label, answers=answers)


def summarize(result: ModelGenerations, records: Sequence[dict[str, str]]) -> dict[str, Any]:
    """Overall and per-category ROUGE-L, share ended by itself, mean length (tokens), counts."""
    groups: dict[str, list[Answer]] = defaultdict(list)
    skipped = 0
    for record, answer in zip(records, result.answers):
        if answer is None:
            skipped += 1
            continue
        groups["all"].append(answer)
        groups[record["category"]].append(answer)

    def stats(answers: list[Answer]) -> dict[str, float | int]:
        n = len(answers)
        return {
            "n": n,
            "rouge_l": sum(a.rouge_l for a in answers) / n,
            "ended_share": sum(a.ended for a in answers) / n,
            "mean_tokens": sum(a.new_tokens for a in answers) / n,
        }

    overall = stats(groups.pop("all")) if groups.get("all") else {"n": 0}
    return {
        "model": result.model,
        "overall": overall,
        "per_category": {c: stats(a) for c, a in sorted(groups.items())},
        "skipped_too_long": skipped,
    }


def format_summary(summaries: Sequence[dict[str, Any]], sample: str) -> str:
    """The per-model and per-category table."""
    lines = [f"Instruction following on {sample}: greedy decoding, ROUGE-L F1 vs the human response.", "",
             "model | category | n | ROUGE-L | ended by itself | mean tokens", "--- | --- | --- | --- | --- | ---"]
    for summary in summaries:
        rows = [("all", summary["overall"])] + list(summary["per_category"].items())
        for category, s in rows:
            if not s.get("n"):
                lines.append(f"{summary['model']} | {category} | 0 | - | - | -")
                continue
            lines.append(f"{summary['model']} | {category} | {s['n']} | {s['rouge_l']:.3f} | "
                         f"{s['ended_share']:.0%} | {s['mean_tokens']:.1f}")
        if summary["skipped_too_long"]:
            lines.append(f"({summary['model']}: {summary['skipped_too_long']} records skipped, prompt too long for "
                         "its context window)")
    return "\n".join(lines)


def format_side_by_side(records: Sequence[dict[str, str]], results: Sequence[ModelGenerations], n: int = 3,
                        width: int = 300) -> str:
    """A Markdown table of the first ``n`` records: instruction, human response, each model's answer."""

    def cell(text: str | None) -> str:
        if text is None:
            return "(prompt too long)"
        text = " ".join(text.split())
        text = text if len(text) <= width else text[:width - 1] + "…"
        return text.replace("|", "\\|") or "(empty)"

    header = ["instruction", "human response", *(r.model for r in results)]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for k, record in enumerate(records[:n]):
        answers = [None if r.answers[k] is None else r.answers[k].text for r in results]
        lines.append(" | ".join([cell(record["instruction"]), cell(record["response"]), *map(cell, answers)]))
    return "\n".join(lines)
