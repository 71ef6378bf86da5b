"""File helpers every room shares: JSON Lines reading with file:line errors, atomic writes, checkpoint fingerprints.

Each is written once here and imported by the RAG loaders, the training data, the evaluation and the model caches:

- :func:`iter_jsonl`: ``(line number, value)`` per non-blank line; a bad line becomes a :class:`BadLine` value that
  names ``file:line`` and why, so a caller can stop at it (``raise bad.error(...)``) or skip it and go on.
- :func:`atomic_file`, :func:`write_text_atomically`, :func:`write_json_atomically`: a temporary file beside the
  target, renamed into place; readers see the old file or the new one, never half of one.
- :func:`publish_dir` (a new directory, e.g. a cache entry another process may be writing too) and
  :func:`replace_dir` (swap a finished directory in for an old one).
- :func:`checkpoint_fingerprint`: a short hash that changes when a checkpoint's files change, cheap on multi-GB
  weights.

Nothing heavy is imported here (standard library only).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BadLine",
    "atomic_file",
    "checkpoint_fingerprint",
    "iter_jsonl",
    "publish_dir",
    "replace_dir",
    "write_json_atomically",
    "write_text_atomically",
]


# --- JSON Lines -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadLine:
    """A JSONL line that holds no JSON value: where it is and why."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"

    def error(self, error_type: type[Exception], hint: str = "") -> Exception:
        """``error_type("FILE:LINE: reason[; hint]")``, ready to raise."""
        return error_type(f"{self}; {hint}" if hint else str(self))


def iter_jsonl(path: str | Path, text: str | bytes | None = None) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for each non-blank line of a JSON Lines file, or of ``text`` (its contents,
    already read, as bytes or str).

    A line that is not valid UTF-8, not valid JSON, or nested too deep for Python's parser (``RecursionError``)
    yields a :class:`BadLine` instead of a value, and reading goes on with the next line: one bad record never
    aborts a whole file, and the caller decides whether it is fatal. Line numbers count from 1 and include blank
    lines, as an editor shows them. Lines end at ``\n`` only, as JSON Lines defines them (a JSON string may hold a
    raw U+2028, which ``str.splitlines`` would cut); a UTF-8 byte order mark before the first line is ignored.
    """
    name = str(path)
    if isinstance(text, bytes):
        yield from _parse_lines(name, io.BytesIO(text))
    elif text is not None:
        yield from _parse_lines(name, io.StringIO(text, newline="\n"))
    else:
        with open(path, "rb") as handle:
            yield from _parse_lines(name, handle)


def _parse_lines(name: str, lines: Iterable[bytes | str]) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(lines, start=1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, BadLine(name, number, f"not valid UTF-8 (byte {err.start})")
                continue
        if number == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            yield number, BadLine(name, number, f"not valid JSON ({err.msg})")
        except RecursionError:
            yield number, BadLine(name, number, "JSON nested too deeply to read")


# --- atomic writes --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to (by any writer: ``savefig``, ``save``...), renamed to ``path`` with
    ordinary permissions when the block ends (``mkstemp`` creates files owner-only); removed if the block fails.
    ``suffix`` keeps an extension a writer reads the format from. Parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same directory and one rename
    (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomically(path: str | Path, data: Mapping | list) -> Path:
    """Write ``data`` as indented JSON (and a final newline) to ``path`` atomically (:func:`write_text_atomically`)."""
    return write_text_atomically(path, json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def publish_dir(target: str | Path, complete: str) -> Iterator[Path]:
    """Build a new directory under a temporary name beside ``target``; rename it to ``target`` when the block ends.

    ``complete`` is the file whose presence marks a finished ``target`` (e.g. ``config.json``). A ``target`` left
    without it (an interrupted writer's) is replaced. If another process published ``target`` first, its copy is
    kept and ours is discarded: two processes filling the same cache entry both end with a complete one. An error
    in the block removes the temporary directory and leaves ``target`` as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        yield tmp
        if target.is_dir() and not (target / complete).is_file():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / complete).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` is moved aside first, then deleted (directories cannot be
    renamed over one another)."""
    src, dst = Path(src), Path(dst)
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


# --- fingerprints ---------------------------------------------------------------------------------------------------


_SAMPLE = 1 << 20  # bytes read from each of three places in a large file


def checkpoint_fingerprint(directory: str | Path, *, salt: str = "", patterns: Iterable[str] = ("*",)) -> str:
    """A sha256 (hex) over the names, sizes, modification times and sampled bytes of a checkpoint directory's files.

    Files up to 4 MiB are hashed whole; larger ones (weights) by their first, middle and last MiB, which any
    retraining changes, so fingerprinting a multi-GB model costs milliseconds. A rewritten file (newer mtime) counts
    as changed even when the sampled bytes agree: a stale cache costs a user wrong answers, a fresh one seconds. Only files matching ``patterns``
    count (e.g. the files a conversion reads); ``salt`` folds in what else the result depends on (a converter
    version, a device). Hub snapshots are symlinks into the blob store: they are followed.
    """
    digest = hashlib.sha256(f"{salt}\n".encode())
    patterns = tuple(patterns)
    for file in sorted(Path(directory).iterdir()):
        if not file.is_file() or not any(fnmatch.fnmatch(file.name, pattern) for pattern in patterns):
            continue
        stat = file.stat()
        size = stat.st_size
        digest.update(f"{file.name}\0{size}\0{stat.st_mtime_ns}\n".encode())
        with file.open("rb") as handle:
            if size <= 4 * _SAMPLE:
                digest.update(handle.read())
            else:
                for offset in (0, size // 2, size - _SAMPLE):
                    handle.seek(offset)
                    digest.update(handle.read(_SAMPLE))
    return digest.hexdigest()
