"""The one exception family for bad inputs and environment problems.

Raise a `MotabInputError` (or a subclass) where the fact is known, with a message that names the input
(file and line, config field, value) and says what is accepted or what to do. `run.py` prints any of them
as one `error:` line (the traceback goes to run.log) and exits non-zero; library users get the same
exceptions with the same messages. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os


class MotabInputError(ValueError):
    """A bad input (file, config field, checkpoint, data) or environment (disk, network, lock) problem."""


class EnvironmentProblem(MotabInputError):
    """The machine, not the input: a full or read-only disk, an unreachable hub, a held run-directory lock."""


class Unreachable(EnvironmentProblem, ConnectionError):
    """A network source (the Hugging Face hub) that cannot be reached (also a `ConnectionError`)."""


class MissingInputError(MotabInputError, FileNotFoundError):
    """A file, folder, model or data set that is not there (also a `FileNotFoundError`, for callers that catch
    that)."""


class CheckpointError(MotabInputError):
    """A weights file (safetensors, GGUF) that is not whole or not valid; the message names the file (and tensor)."""


class PromptTooLongError(MotabInputError):
    """A prompt longer than the positions the engine's caches were sized for (`max_prompt_len`)."""


# What each errno means for the user, and what to do.
_DISK_ERRORS: dict[int, str] = {
    errno.ENOSPC: "no space left on the device; free space (or point run_dir at another disk) and rerun the same "
                  "command: finished work is kept",
    errno.EDQUOT: "disk quota exceeded; free space (or point run_dir at another disk) and rerun the same command: "
                  "finished work is kept",
    errno.EFBIG: "a file would exceed the file-size limit (`ulimit -f`, or a FAT disk's 4 GiB); raise the limit (or "
                 "point run_dir at another disk) and rerun the same command: finished work is kept",
    errno.EROFS: "the file system is read-only; give a run_dir on a writable disk",
    errno.EACCES: "permission denied; give a run_dir you can write to (or fix the folder's permissions)",
    errno.EPERM: "operation not permitted; give a run_dir you can write to (or fix the folder's permissions)",
}


def environment_problem(error: OSError, doing: str = "") -> EnvironmentProblem | None:
    """The `EnvironmentProblem` an `OSError` from writing or reading a file amounts to (a full, read-only or
    forbidden disk), naming the file and what to do; None for any other `OSError` (those stay as they are).

    `doing`: what was being done, e.g. "appending records to <file>", when `error` does not name the file.
    """
    if not isinstance(error, OSError) or error.errno not in _DISK_ERRORS:
        return None
    where = doing or (f"writing {os.fsdecode(error.filename)}" if error.filename is not None else "writing")
    return EnvironmentProblem(f"{where}: {_DISK_ERRORS[error.errno]} ({os.strerror(error.errno)})")
