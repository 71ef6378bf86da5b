"""Reading files into LangChain ``Document``s for the index: plain text, Markdown, PDF and JSONL.

Each reader returns the documents of one file, all carrying ``metadata["source"]``, the file's absolute path
(the index picks Markdown chunk separators by its suffix). A file that cannot be read raises
:class:`UnreadableFileError` with one line that names the file (and the line, for JSONL) and what is wrong; the
index reports it and goes on with the other files.

Only regular files are read, and at most ``max_bytes`` of them (:data:`DEFAULT_MAX_FILE_MB` by default): a FIFO, a
device such as ``/dev/zero``, a socket, a broken symbolic link or a file over the cap is one such error, never a
read that hangs or does not end. The type is checked on the opened file (``O_NONBLOCK``, so opening a FIFO does not
wait for a writer), not on the name, so a file swapped for a FIFO in between is refused too.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from langchain_core.documents import Document

from dolly_langchain.errors import DollyError
from dolly_langchain.files import BadLine, iter_jsonl

TEXT_SUFFIXES = (".txt", ".text")
MARKDOWN_SUFFIXES = (".md", ".markdown")
PDF_SUFFIXES = (".pdf",)
JSONL_SUFFIXES = (".jsonl",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + MARKDOWN_SUFFIXES + PDF_SUFFIXES + JSONL_SUFFIXES

#: Default field of a JSONL record that holds the text; every other field becomes metadata.
DEFAULT_TEXT_FIELD = "text"

#: Default size cap of one file (``dolly rag index --max-file-mb``).
DEFAULT_MAX_FILE_MB = 64
MB = 1024 * 1024


class UnreadableFileError(DollyError, ValueError):
    """A file that cannot be indexed; the message is one line naming the file and the reason."""


def expand_paths(paths: list[str | Path], errors: list[tuple[Path, str]] | None = None) -> Iterator[Path]:
    """Yield the files to index: each file as given, each directory's supported files (recursively, sorted).

    Paths that do not exist and files of an unsupported type are yielded too, so that reading them reports
    them as failed instead of silently dropping them; so are the entries of a directory with a supported suffix
    that are not regular files (FIFOs, devices) and its broken symbolic links whose name or target has a
    supported suffix. Symbolic links to directories are not followed. ``errors`` (when given) receives
    ``(directory, reason)`` for each directory that could not be listed.
    """
    for path in map(Path, paths):
        if path.is_dir():
            yield from walk_directory(path, errors)
        else:
            yield path


def walk_directory(folder: Path, errors: list[tuple[Path, str]] | None = None) -> list[Path]:
    """The entries of ``folder`` (recursively, sorted) that :func:`expand_paths` yields for it."""

    def failed(err: OSError) -> None:
        if errors is not None:
            errors.append((Path(err.filename or folder), err.strerror or str(err)))

    found = []
    for root, _, names in os.walk(folder, onerror=failed):
        for name in names:
            path = Path(root, name)
            if path.suffix.lower() in SUPPORTED_SUFFIXES or _is_broken_link_to_supported(path):
                found.append(path)
    return sorted(found)


def _is_broken_link_to_supported(path: Path) -> bool:
    if not path.is_symlink() or path.exists():
        return False
    try:
        return Path(os.readlink(path)).suffix.lower() in SUPPORTED_SUFFIXES
    except OSError:
        return False


def _read_regular_file(path: Path, max_bytes: int | None) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``max_bytes`` bytes, else UnreadableFileError."""
    if path.is_symlink() and not path.exists():
        raise UnreadableFileError(f"{path}: a broken symbolic link (its target {os.readlink(path)} does not exist)")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as err:
        raise UnreadableFileError(f"{path}: {err.strerror or err}") from None
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnreadableFileError(f"{path}: not a regular file ({_kind(mode)}); only regular files are indexed")
        try:
            data = file.read() if max_bytes is None else file.read(max_bytes + 1)
        except OSError as err:
            raise UnreadableFileError(f"{path}: {err.strerror or err}") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise UnreadableFileError(
            f"{path}: larger than the {max_bytes / MB:g} MB cap per file; raise it with --max-file-mb "
            "(max_file_bytes=...) or split the file"
        )
    return data


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_file(
    path: str | Path, *, text_field: str = DEFAULT_TEXT_FIELD, max_bytes: int | None = DEFAULT_MAX_FILE_MB * MB
) -> tuple[list[Document], bytes]:
    """Read one file into documents; also return its bytes (the index hashes them to skip unchanged files).

    Only a regular file of at most ``max_bytes`` bytes (``None``: no cap) is read; anything else raises
    :class:`UnreadableFileError`.
    """
    path = Path(path)
    data = _read_regular_file(path, max_bytes)
    suffix = path.suffix.lower()
    source = str(path.resolve())
    if suffix in PDF_SUFFIXES:
        documents = _read_pdf(path, data, source)
    elif suffix in JSONL_SUFFIXES:
        documents = _read_jsonl(path, data, source, text_field)
    elif suffix in MARKDOWN_SUFFIXES + TEXT_SUFFIXES:
        documents = [Document(page_content=_decode(path, data), metadata={"source": source})]
    else:
        raise UnreadableFileError(
            f"{path}: unsupported file type {suffix or '(no suffix)'}; supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    documents = [d for d in documents if d.page_content.strip()]
    if not documents:
        raise UnreadableFileError(f"{path}: no text to index (an empty file, or a PDF without a text layer)")
    return documents, data


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UnreadableFileError(f"{path}: not UTF-8 text (byte {err.start}); convert it to UTF-8") from None


def _read_pdf(path: Path, data: bytes, source: str) -> list[Document]:
    """One document per page, so each chunk knows its page."""
    import io

    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as err:  # noqa: BLE001 - pypdf raises many types on malformed files; one line, then go on
        reason = " ".join(str(err).split()) or type(err).__name__
        raise UnreadableFileError(f"{path}: not a readable PDF ({reason})") from None
    return [
        Document(page_content=text, metadata={"source": source, "page": number})
        for number, text in enumerate(pages, start=1)
    ]


def _read_jsonl(path: Path, data: bytes, source: str, text_field: str) -> list[Document]:
    """One document per record: ``record[text_field]`` is the text, the other fields and ``line`` the metadata
    (a record's own ``source`` or ``line`` field gives way to the file path and line number). A line that is not
    UTF-8 or JSON fails the file with its line number (one reported failure; the index goes on with other files)."""
    documents = []
    for line_number, record in iter_jsonl(path, text=data):
        if isinstance(record, BadLine):  # "FILE:LINE: invalid JSON (Expecting ...)", as this reader always said
            reason = record.reason.replace("not valid JSON", "invalid JSON", 1)
            raise UnreadableFileError(f"{path}:{line_number}: {reason}")
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise UnreadableFileError(
                f"{path}:{line_number}: no string field {text_field!r}; name the text field with --text-field"
            )
        metadata = {key: value for key, value in record.items() if key != text_field}
        metadata.update(source=source, line=line_number)
        documents.append(Document(page_content=record[text_field], metadata=metadata))
    return documents
