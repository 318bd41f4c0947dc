"""The common base of kdtune's user-facing errors, and how the CLI tells them from bugs.

Every error the library raises for a *user* mistake or an *environment* problem (a bad config, a
missing dataset, a corrupt checkpoint, a run directory in use ...) derives from
:class:`KdtuneError` as well as from its natural built-in type (``ConfigError`` is still a
``ValueError``, ``DatasetNotFoundError`` a ``FileNotFoundError``), so existing ``except`` clauses keep
working. The CLI prints such errors as one line (exit code 2); anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import traceback
from pathlib import Path

#: The installed package directory: an error raised by a frame in here was raised on purpose.
_PACKAGE_DIR = Path(__file__).resolve().parent


class KdtuneError(Exception):
    """Base of the errors kdtune raises on purpose; the message names the problem and the fix."""


class MissingFileError(KdtuneError, FileNotFoundError):
    """A file or directory the user named does not exist."""


class RunDirError(MissingFileError):
    """A path given as a run directory is missing, is not a kdtune run directory, or lacks what the
    command needs (e.g. the checkpoint ``--resume`` continues from)."""


class InputFileError(KdtuneError, ValueError):
    """A file the user pointed to (spec, process, config ...) is missing, binary or malformed."""


def is_user_error(err: BaseException) -> bool:
    """True for errors that a user can fix from the message alone (print one line, no traceback).

    That is every :class:`KdtuneError`, and the ``ValueError`` / ``KeyError`` / ``TypeError`` /
    ``FileNotFoundError`` that kdtune's own code raises to reject an argument — the library's
    public API keeps Python's conventional exception types for those. The same types raised from
    inside torch, numpy or the standard library are bugs (or unforeseen inputs) and keep their
    traceback: the test is where the exception was raised, not only its type.
    """
    if isinstance(err, KdtuneError):
        return True
    if not isinstance(err, ValueError | KeyError | TypeError | FileNotFoundError):
        return False
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE_DIR)


def one_line(err: BaseException) -> str:
    """The message of an error on one line (a KeyError's ``str`` would be the repr of its message)."""
    msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(msg).split()) or type(err).__name__
