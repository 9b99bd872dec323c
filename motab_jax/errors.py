"""The one exception family for bad inputs and environment problems.

Raise a `MotabInputError` (or a subclass) where the fact is known, with a message that names the input
(file and line, config field, value) and says what is accepted or what to do. `run.py` prints any of them
as one `error:` line (the traceback goes to run.log) and exits non-zero; library users get the same
exceptions with the same messages. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MotabInputError(ValueError):
    """A bad input (file, config field, checkpoint, data) or environment (disk, network, lock) problem."""


class EnvironmentProblem(MotabInputError):
    """The machine, not the input: a full or read-only disk, an unreachable hub, a held run-directory lock."""
