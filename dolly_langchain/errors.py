"""The one error base of this project.

Every error dolly-langchain raises on purpose (a bad flag, file, record, model or index; something the user can fix)
is a :class:`DollyError`. Each keeps the built-in base it had before (``ValueError`` for bad values, ``RuntimeError``
for a state that cannot go on), so ``except ValueError`` in existing code still catches it::

    class FinetuneError(DollyError, RuntimeError): ...

The ``dolly`` command tree (and its ``dolly-finetune`` / ``dolly-eval`` aliases) turns any ``DollyError`` into one
line on stderr and exit code 2 (:func:`dolly_langchain.cli.run_command`); library callers catch it to tell "your
input" from a bug.
"""

from __future__ import annotations

__all__ = [
    "EXIT_USAGE",
    "DollyError",
    "DollyLookupError",
    "DollyRuntimeError",
    "DollyTypeError",
    "DollyValueError",
    "MissingDependencyError",
    "MissingFileError",
    "NotSupportedError",
]

#: The exit code of a command stopped by a :class:`DollyError` (argparse uses the same for bad flags).
EXIT_USAGE = 2


class DollyError(Exception):
    """A problem the user can fix; the message names it (flag, file and line, record, model) and how to fix it."""


# The general kinds, for errors raised on purpose that need no class of their own; a room defines its own subclass
# where callers may want to catch that case alone (ModelNotFoundError, IndexFileError, ContextWindowError, ...).


class DollyValueError(DollyError, ValueError):
    """A value passed in cannot be used: an option, a prompt, a setting, the content of a file."""


class DollyTypeError(DollyError, TypeError):
    """An argument of the wrong name or kind (e.g. an unknown keyword argument)."""


class DollyLookupError(DollyError, KeyError):
    """A name that is not known (a preset, an lm-eval task); the message lists the known ones where it can."""

    def __str__(self) -> str:  # KeyError's own str() quotes the message
        return str(self.args[0]) if self.args else ""


class MissingFileError(DollyError, FileNotFoundError):
    """A file named by a flag or an argument does not exist; the message names it and what would do instead."""


class DollyRuntimeError(DollyError, RuntimeError):
    """What was asked cannot be done here (e.g. a model CTranslate2 cannot convert)."""


class MissingDependencyError(DollyError, ImportError):
    """An optional package is not installed; the message says how to install it."""


class NotSupportedError(DollyError, NotImplementedError):
    """A LangChain feature these models do not have (e.g. tool calling)."""
