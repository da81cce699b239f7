"""Errors that the next round would repeat.

A client that hits one of these (a bad config value, missing or unreadable data, a checkpoint
or private-state file it cannot use, a full disk) replies with an error the server reads as
permanent, and the run stops after that round instead of failing the same way every round.
Anything else a client raises (a node that drops out, a transient fault) keeps the run going.
Every message names the key or file, the value, and what to do about it.
"""

from __future__ import annotations

import errno
import os


class PermanentError(Exception):
    """An error that cannot heal by itself: retrying the round gives the same error."""


class CheckpointError(PermanentError, ValueError):
    """A model checkpoint file (``pretrained``) cannot be read safely as weights."""


class DiskFullError(PermanentError, OSError):
    """A write failed because the file system is full (or over quota)."""

    def __str__(self) -> str:
        # The message already names the file; OSError would append it again as ": '<path>'".
        return str(self.strerror)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT, also where a library wrapped it (safetensors raises its own error type
    whose text carries the system's message)."""
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL
    return any(os.strerror(code) in str(exc) for code in _DISK_FULL)


def disk_full(path: object, what: str, remedy: str) -> DiskFullError:
    """The error to raise for an ENOSPC/EDQUOT while writing ``what`` at ``path``; its
    ``filename`` is the path, for handlers that print only that."""
    return DiskFullError(errno.ENOSPC, f"no space left on the device to write {what} {path}; {remedy}", str(path))


# The code of a client's error reply for a PermanentError (Flower's own codes are 0-8).
PERMANENT_ERROR_CODE = 100


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line: what a summary shows per failed client."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
