"""Files that are either complete or absent: the one way this project writes.

Every file a run publishes (checkpoints, caches, samples, reports, configs)
goes through :func:`atomic_write`: written to a temporary beside it, fsynced,
given the permissions the umask allows, and renamed into place.
"""

import contextlib
import json
import os
import shutil
import tempfile
import time

from .errors import UserError


def _current_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_stale_temporaries(folder, prefix, min_age_s=60.0):
    """Temporaries of this file left by a writer that was killed (SIGKILL,
    power loss). Only older ones: a live writer of the same file is unlikely,
    but never disturbed within its first minute."""
    now = time.time()
    for name in os.listdir(folder):
        if name.startswith(prefix) and name.endswith(".tmp"):
            full = os.path.join(folder, name)
            try:
                if now - os.path.getmtime(full) > min_age_s:
                    os.remove(full)
            except OSError:
                pass


def read_json_object(path):
    """The object (a dict) stored as JSON in ``path``; a :class:`UserError`
    naming the file when it cannot be read, is not JSON, or holds another type."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{os.fspath(path)!r} is not readable JSON: {str(err).splitlines()[0]}") from None
    if not isinstance(value, dict):
        raise UserError(f"{os.fspath(path)!r} holds a {type(value).__name__}, not a JSON object")
    return value


def atomic_write(path, write_fn):
    """Call ``write_fn(tmp_path)`` then move the finished file onto ``path``.

    The temporary file lives in the same folder (so the rename is atomic) and
    is fsynced first: a crash at any moment leaves either the old file or the
    complete new one, never a torn file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix = f".{os.path.basename(path)}."
    _remove_stale_temporaries(folder, prefix)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write_fn(tmp)
        # mkstemp makes 0600 files (and a writer may replace the file); what we
        # publish respects the umask, as open() would, so collaborators on a
        # shared cluster can read it.
        os.chmod(tmp, 0o666 & ~_current_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def atomic_write_bytes(path, data):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def atomic_write_npy(path, array):
    """``np.save`` of ``array`` (never with pickled objects), atomically."""
    import numpy as np

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    return atomic_write(path, write)


def check_writable_target(path, flag):
    """Refuse, before long work, an output folder that could not be written
    later: a file in the way, a path below a file, or a folder this user may
    not write to. Creates nothing (a failed run leaves no empty folder)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path!r} exists and is not a folder")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path!r} lies below {parent!r}, which is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path!r}: {parent!r} is not writable")
    return path


@contextlib.contextmanager
def undone_on_failure(folder, before_undo=None, errors=BaseException):
    """Run the start of a job that writes into ``folder`` (logs, configs);
    if the block raises (one of ``errors``), remove what it created there,
    and ``folder`` itself if it was new: a job that fails to start leaves
    nothing behind. Entries that existed before are never touched.
    ``before_undo()`` runs first (to close open log files). ``folder`` None
    or "": no undo."""
    if not folder:
        yield
        return
    existed = os.path.isdir(folder)
    before = set(os.listdir(folder)) if existed else set()
    try:
        yield
    except errors:
        if before_undo is not None:
            before_undo()
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        elif os.path.isdir(folder):
            for name in set(os.listdir(folder)) - before:
                full = os.path.join(folder, name)
                if os.path.isdir(full) and not os.path.islink(full):
                    shutil.rmtree(full, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.remove(full)
        raise

