"""The one exception family for bad user input, and how the CLI reports it.

Anything a user can get wrong -- a flag, a config key, a file that is missing, truncated or malformed, a full
disk -- raises a ``UserError`` (or one of the library's errors that derive from it) with a message naming the
file, line or key and what was expected. ``llamalab <command>`` prints such an error as one line and exits 2;
every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os


class UserError(Exception):
    """Bad input: the message names the file, line or key and what was expected."""


class DiskFullError(UserError, OSError):
    """A write ran out of space; the message names the folder, the space needed and the space free."""

    def __str__(self) -> str:  # OSError's own would prefix "[Errno 28] "
        return self.strerror or super().__str__()


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it wraps) is ENOSPC/EDQUOT, including torch's writer's own wording."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        # torch's zip writer reports a short write as "unexpected pos N vs M" (inline_container.cc)
        if "No space left on device" in text or ("inline_container" in text and "unexpected pos" in text):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(folder: os.PathLike | str, needed_bytes: int | None, exc: BaseException) -> DiskFullError:
    """A ``DiskFullError`` for a failed write into ``folder``, with the space needed and free there."""
    import shutil
    from pathlib import Path

    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        free = None
    need = f"about {format_bytes(needed_bytes)} needed" if needed_bytes else "more space needed"
    have = f", {format_bytes(free)} free" if free is not None else ""
    err = DiskFullError(errno.ENOSPC, f"{folder}: disk full while writing ({need}{have}); free some space "
                                      "and run again (nothing already written there was changed)")
    err.__cause__ = exc
    return err


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def describe(exc: BaseException) -> str:
    """One line for a user error: the message itself, or ``path: reason`` for an OSError."""
    if isinstance(exc, OSError) and not isinstance(exc, UserError) and exc.filename is not None:
        reason = exc.strerror or str(exc)
        target = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else str(exc.filename)
        return f"{target}: {reason}"
    text = str(exc)
    if isinstance(exc, KeyError) and len(exc.args) == 1:  # str(KeyError) quotes its message
        text = str(exc.args[0])
    return " ".join(text.split("\n")) if text else type(exc).__name__
