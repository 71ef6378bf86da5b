"""Local files for batch jobs without Spark: JSONL, CSV or Parquet in (a file or a directory of parts), Parquet out,
written atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dolly_langchain.errors import DollyValueError, MissingFileError

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet",
            ".pq": "parquet"}


def _parts(path: Path) -> list[Path]:
    """A directory's data files (sorted by name; Spark's ``_SUCCESS`` and hidden files left out)."""
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(("_", "."))
                  and not any(part.startswith(("_", ".")) for part in p.relative_to(path).parts[:-1]))


def input_format(source: str) -> str:
    """``"jsonl"``, ``"csv"`` or ``"parquet"`` from the file's suffix, or from the suffixes of a directory's parts
    (one kind only); a URI or directory whose parts have no known suffix is read as Parquet (what Spark writes)."""
    if "://" in source:
        suffix = Path(source.rstrip("/")).suffix.lower()
        return SUFFIXES.get(suffix, "parquet")
    path = Path(source)
    if path.is_dir():
        kinds = {SUFFIXES.get(p.suffix.lower()) for p in _parts(path)} - {None}
        if len(kinds) > 1:
            raise DollyValueError(f"INPUT {source} holds {sorted(kinds)} files; give a directory of one kind")
        return kinds.pop() if kinds else "parquet"
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DollyValueError(f"INPUT {source}: unknown file type {path.suffix!r}; give a .jsonl, .csv or .parquet "
                              "file (or a directory of them)")
    return kind


def read_local(source: str):
    """``source`` (a file or a directory of parts) as one pandas DataFrame, parts in name order."""
    import pandas as pd

    path = Path(source)
    if not path.exists():
        raise MissingFileError(f"INPUT {source} does not exist (a .jsonl, .csv or .parquet file, or a directory of "
                               "them; a table name needs --spark)")
    kind = input_format(source)
    files = _parts(path) if path.is_dir() else [path]
    if kind == "parquet":
        return pd.read_parquet(path) if files else pd.DataFrame()
    frames = [_read_jsonl(f) if kind == "jsonl" else _read_csv(f) for f in files
              if path.is_file() or f.suffix.lower() in SUFFIXES]
    if not frames:
        raise DollyValueError(f"INPUT {source} holds no .jsonl, .csv or .parquet files")
    return pd.concat(frames, ignore_index=True)


def _read_jsonl(path: Path):
    import pandas as pd

    from dolly_langchain.files import BadLine, iter_jsonl

    records = []
    for number, record in iter_jsonl(path):
        if isinstance(record, BadLine):
            raise record.error(DollyValueError, "fix or remove that line")
        if not isinstance(record, dict):
            raise DollyValueError(f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}")
        records.append(record)
    return pd.DataFrame.from_records(records)


def _read_csv(path: Path):
    import pandas as pd

    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DollyValueError(f"INPUT {path}: not a readable CSV file ({str(err).splitlines()[0]})") from None


def write_local(pdf, output: str) -> Path:
    """Write ``pdf`` as one Parquet file at ``output``, through a temporary file beside it and one rename: a failed
    write leaves nothing, and an older output (a file, or a directory of parts from Spark) stays until the new one
    is complete."""
    from dolly_langchain.files import replace_dir

    target = Path(output).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.writing-{os.getpid()}")
    try:
        pdf.to_parquet(tmp, index=False)
        replace_dir(tmp, target)  # a plain rename, also over a directory a Spark job left there
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return target
