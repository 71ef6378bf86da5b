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

__all__ = ["EXIT_USAGE", "DollyError"]

#: The exit code of a command stopped by a :class:`DollyError` (argparse uses the same for bad flags).
EXIT_USAGE = 2


class DollyError(Exception):
    """A problem the user can fix; the message names it (flag, file and line, record, model) and how to fix it."""
