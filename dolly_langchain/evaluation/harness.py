"""Running EleutherAI's lm-evaluation-harness on the card's tasks, with the data from local files and a cache.

Nothing here scores anything: lm-eval builds the requests from its own task definitions (the YAML files and
``process_docs``/``doc_to_text`` functions it ships), runs them through its ``HFLM`` wrapper around our already
loaded model, and computes ``acc``/``acc_norm`` and their standard errors. What changes is only where the documents
come from (:func:`build_task`) and which of them are scored (``samples``: a seeded random subset, never the first N).

Caching, per (model fingerprint, task, sample): a finished task's metrics are stored as one JSON file (its name also
carries a hash of the documents, so an edited data file is scored afresh), and every
scored request is stored as it completes in lm-eval's own request cache (``CachingLM``, SQLite), so an interrupted
run resumes where it stopped and a repeated run recomputes nothing. Both live under
``dolly_langchain.models.cache_dir() / "eval" / FINGERPRINT``. The request cache holds pickles, so that directory is
kept the user's alone (mode 0700; see :func:`private_cache_dir`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
from pathlib import Path
from typing import Any

from dolly_langchain.evaluation.card import CARD_METRICS, FULL_SPLIT_SIZES, Score
from dolly_langchain.evaluation.taskdata import EVAL_SPLITS
from dolly_langchain.errors import DollyError, DollyLookupError
from dolly_langchain.files import checkpoint_fingerprint, write_json_atomically

logger = logging.getLogger(__name__)

# Where each task's official YAML lives inside lm_eval/tasks/. Indexing only these folders takes well under a second;
# indexing all of lm-eval's tasks (TaskManager's default) takes ~17 s on 2 CPU cores.
TASK_DIRS = {
    "openbookqa": "openbookqa",
    "arc_easy": "arc",
    "arc_challenge": "arc",
    "winogrande": "winogrande",
    "piqa": "piqa",
    "boolq": "super_glue/boolq",
    "hellaswag": "hellaswag",
}

CACHE_VERSION = 1  # bump when what a cached result means changes


@functools.lru_cache(maxsize=1)
def task_manager():
    """lm-eval's ``TaskManager`` over the folders of the card's tasks (their official definitions)."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.tasks.__file__).parent
    return TaskManager(include_defaults=False, include_path=sorted({str(root / d) for d in TASK_DIRS.values()}))


def task_config(name: str) -> dict[str, Any]:
    """The task's official configuration, as lm-eval reads it from its YAML (``!function`` entries resolved)."""
    # lm-eval has no public "give me a task's config" call; TaskManager builds tasks from exactly this loader.
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = task_manager().task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise DollyLookupError(f"lm-eval has no task {name!r}")
    return load_yaml(entry.yaml_path, resolve_func=True)


def build_task(name: str, docs: list[dict] | None = None):
    """lm-eval's Task ``name`` from its official definition; with ``docs``, the data come from them, not the hub.

    Only the data source changes: ``custom_dataset`` returns ``docs`` as the split the task evaluates, and the
    training/other splits are unset (official configs name a ``train`` split, which local data do not have; lm-eval
    would raise KeyError). Prompts, choices, targets, ``process_docs`` and metrics are the task's own.
    """
    config = task_config(name)
    if docs is not None:
        split = EVAL_SPLITS[name]
        config.update(
            custom_dataset=_local_dataset(docs, split),
            training_split=None,
            validation_split=split if split == "validation" else None,
            test_split=split if split == "test" else None,
        )
    return task_manager().load(config)["tasks"][name]


def _local_dataset(docs: list[dict], split: str):
    def load(**_metadata):  # lm-eval passes the task's metadata (version, config source) as keyword arguments
        import datasets

        return datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})

    return load


def sample_indices(n_total: int, samples: int | None, seed: int) -> list[int] | None:
    """A seeded random subset of ``samples`` document indices (sorted), or ``None`` for the whole split.

    The first ``samples`` of one seeded permutation, so a smaller sample is part of a larger one with the same seed
    (its requests are then already in the request cache).
    """
    if samples is None or samples >= n_total:
        return None
    order = list(range(n_total))
    random.Random(seed).shuffle(order)
    return sorted(order[:samples])


def sample_label(samples: int | None, seed: int) -> str | None:
    """How documents were chosen, as printed next to the numbers; ``None`` for full splits."""
    return None if samples is None else f"seeded sample: {samples} per task (seed {seed})"


# --- model fingerprint and cache ----------------------------------------------------------------------------------


def model_fingerprint(path: str, extra: str = "") -> str:
    """A short hash identifying a model's weights, the key of its cached results.

    A local directory: :func:`dolly_langchain.files.checkpoint_fingerprint` (file names, sizes and sampled bytes:
    cheap for multi-GB files, changed by any retraining); a hub id: the id and the downloaded revision. ``extra``
    adds e.g. device/dtype, and :data:`CACHE_VERSION` is folded in, so a change of what a result means misses.
    """
    salt = f"eval-v{CACHE_VERSION}|{extra}"
    if Path(path).is_dir():
        return checkpoint_fingerprint(path, salt=salt)[:16]
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(path, "config.json")  # .../snapshots/<commit>/config.json once downloaded
    revision = Path(config).parent.name if isinstance(config, str) else "not-downloaded"
    return hashlib.sha256(f"{salt}|hub:{path}@{revision}".encode()).hexdigest()[:16]


def cache_root() -> Path:
    from dolly_langchain.models import cache_dir

    return cache_dir() / "eval"


class UnsafeCacheError(DollyError, PermissionError):
    """The eval cache is not the user's alone: lm-eval unpickles its request cache, so someone else could run code."""


def private_cache_dir(fingerprint: str) -> Path:
    """``cache_root() / fingerprint``, made safe for lm-eval's request cache (created if missing).

    lm-eval's request cache (``CachingLM``) is a ``SqliteDict``, whose values are pickles: whoever can write it runs
    code in the next evaluation. So the cache root and the fingerprint's folder are created with mode 0700, and the
    user's own ones with wider permissions (made before this check, or under a umask of 002) are narrowed to 0700,
    their request files to 0600. A folder or request file that belongs to another user is refused with one line:
    its contents cannot be trusted, and it cannot be made private.
    """
    folder = cache_root() / fingerprint
    for path in (folder.parent, folder):
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)  # the mode is the leaf's; parents get the umask's
        except OSError as err:
            raise UnsafeCacheError(f"{path}: cannot create the eval cache directory: {err.strerror or err}. Set "
                                   "$DOLLY_LANGCHAIN_CACHE to a directory of your own.") from None
        _make_private(path, 0o700)
    for path in sorted(folder.glob(f"{REQUEST_CACHE_NAME}*")):
        _make_private(path, 0o600)
    return folder


REQUEST_CACHE_NAME = "requests"  # lm-eval appends "_rank0.db"


def _make_private(path: Path, mode: int) -> None:
    """Refuse ``path`` unless the user owns it; narrow its mode to ``mode`` when group or others have any access."""
    import os
    import stat

    if not hasattr(os, "getuid"):  # Windows: no POSIX owners or modes
        return
    info = path.stat()
    if info.st_uid != os.getuid():
        raise UnsafeCacheError(
            f"{path}: the eval cache belongs to another user (uid {info.st_uid}), and lm-eval unpickles its request "
            "cache: remove it, or set $DOLLY_LANGCHAIN_CACHE to a directory of your own."
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        try:
            path.chmod(mode)
        except OSError as err:
            raise UnsafeCacheError(f"{path}: cannot make the eval cache private (chmod {mode:o}): "
                                   f"{err.strerror or err}.") from None


def data_digest(docs: list[dict] | None) -> str:
    """A short hash of a task's documents (``"hub"`` when lm-eval loads them), so edited files are not served stale."""
    import json

    if docs is None:
        return "hub"
    return hashlib.sha256(json.dumps(docs, sort_keys=True).encode()).hexdigest()[:8]


def _result_file(fingerprint: str, task: str, samples: int | None, seed: int, docs: list[dict] | None) -> Path:
    which = "full" if samples is None else f"n{samples}-seed{seed}"
    return cache_root() / fingerprint / f"{task}-{which}-{data_digest(docs)}.json"


def cached_score(fingerprint: str, task: str, samples: int | None, seed: int, docs: list[dict] | None
                 ) -> Score | None:
    """The cached score of ``task`` on these documents with this sample, or ``None``."""
    import json

    path = _result_file(fingerprint, task, samples, seed, docs)
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return Score(**data["score"])


# --- running ------------------------------------------------------------------------------------------------------


def make_lm(model, tokenizer, batch_size: int):
    """lm-eval's ``HFLM`` around an already loaded transformers model (it takes the model as ``pretrained``)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def evaluate_task(lm, task_name: str, docs: list[dict] | None, *, fingerprint: str, samples: int | None,
                  seed: int) -> Score:
    """Score one task with lm-eval (or return the cached score): the card's metric, its stderr, and the counts."""
    cached = cached_score(fingerprint, task_name, samples, seed, docs)
    if cached is not None:
        return cached
    from lm_eval import simple_evaluate

    task = build_task(task_name, docs)
    n_total = len(task.eval_docs)
    indices = sample_indices(n_total, samples, seed)
    request_cache = private_cache_dir(fingerprint) / REQUEST_CACHE_NAME  # pickles: only the user may write there
    out = simple_evaluate(
        model=lm,
        tasks=[task],
        samples=None if indices is None else {task_name: indices},
        use_cache=str(request_cache),  # every scored request is stored as it completes: interruptions resume
        task_manager=task_manager(),
        log_samples=False,
        num_fewshot=0,
    )
    metric = CARD_METRICS[task_name]
    result = out["results"][task_name]
    stderr = result.get(f"{metric}_stderr,none")
    score = Score(
        value=float(result[f"{metric},none"]),
        stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
        n=len(indices) if indices is not None else n_total,
        n_total=n_total,
    )
    if n_total != FULL_SPLIT_SIZES[task_name]:
        logger.warning("%s: %d documents, the card's full split has %d", task_name, n_total,
                       FULL_SPLIT_SIZES[task_name])
    write_json_atomically(_result_file(fingerprint, task_name, samples, seed, docs),
                          {"task": task_name, "metric": metric, "score": score.__dict__,
                           "lm_eval_results": {k: v for k, v in result.items() if isinstance(v, (int, float, str))}})
    return score
