"""Errors that are the user's to fix: one line naming the culprit."""

import errno
import math
import numbers
import os
import reprlib
import sys
import traceback


class UserError(ValueError):
    """Bad input (a path, a key, a value, an id); scripts print it and exit 2."""


# The most characters of a user's value an error message repeats: enough to
# recognise it, never the megabytes a hostile config can expand to.
SHOWN_CHARS = 100


def shown(value, limit=SHOWN_CHARS):
    """``repr(value)`` for an error message, cut to about ``limit`` characters
    (a cut ends in ``...``). Containers are cut while they are written, so a
    value whose full repr would not fit in memory costs no more than a short one."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = short.maxlong = limit
    # At most 10 items a level, 3 levels deep: a thousand items visited at worst.
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = short.maxfrozenset = 10
    short.maxlevel = 3
    text = short.repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


# The longest error line run_main prints: the backstop for a message that
# repeats a user's value without :func:`shown` (a 1 MiB config value, a
# path with a newline in it).
MAX_MESSAGE_CHARS = 2000


def one_line(message, limit=MAX_MESSAGE_CHARS):
    """``message`` as a single line of at most about ``limit`` characters."""
    text = " ".join(str(message).splitlines())
    return text if len(text) <= limit else f"{text[:limit]}... (cut from {len(text)} characters)"


_main_failed = False
_debug = False


def set_debug(on: bool) -> None:
    """``--debug``: :func:`run_main` prints the traceback of a UserError too."""
    global _debug
    _debug = bool(on)


def main_failed() -> bool:
    """True once ``run_main``'s function has raised (exit handlers then skip
    work that waits on other processes, which may be gone)."""
    return _main_failed


# Faults of the machine or the file system that the user fixes (room,
# permissions), not bugs: reported in one line like a UserError.
_FILE_FAULTS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied",
                errno.EPERM: "not permitted", errno.EROFS: "read-only file system"}


def file_fault_message(err, path=None):
    """One line for an OSError that is a file-system fault while writing
    ``path`` (default: the file the error names), else None."""
    path = err.filename if path is None and isinstance(err, OSError) else path
    if not isinstance(err, OSError) or err.errno not in _FILE_FAULTS or not path:
        return None
    return f"cannot write {os.fsdecode(path)}: {_FILE_FAULTS[err.errno]}"


def run_main(main_fn):
    """Call ``main_fn()``; a UserError, or a file-system fault that no check
    caught before (a folder made read-only mid-run, a full disk), becomes a
    one-line message and exit code 2."""
    global _main_failed
    try:
        return main_fn()
    except (UserError, OSError) as err:
        message = str(err) if isinstance(err, UserError) else file_fault_message(err)
        _main_failed = True
        if message is None:
            raise
        if _debug:
            traceback.print_exc()
        print(f"error: {one_line(message)}", file=sys.stderr)
        sys.exit(2)
    except BaseException:
        _main_failed = True
        raise


def check_number(name, value, minimum, *, integer=False, exclusive=False, note=""):
    """Return ``value`` if it is a finite number (an integer with ``integer``)
    at least ``minimum`` (above it with ``exclusive``), else raise a one-line
    UserError naming the flag ``name`` and the value."""
    kind = "an integer" if integer else "a finite number"
    bound = f"{'>' if exclusive else '>='} {minimum}"
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if integer and is_number and not isinstance(value, numbers.Integral):
        is_number = math.isfinite(value) and float(value).is_integer()
    if not is_number or not math.isfinite(value) or value < minimum or (exclusive and value == minimum):
        raise UserError(f"{name} must be {kind} {bound}{note}, got {shown(value)}")
    return value
