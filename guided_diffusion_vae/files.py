"""Files that are either complete or absent: the one way this project writes.

Every file a run publishes (checkpoints, caches, samples, reports, configs)
goes through :func:`atomic_write`: written to a temporary beside it, fsynced,
given the permissions the umask allows, and renamed into place.
"""

import contextlib
import errno
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


def check_outside(path, flag, data_dir, data_flag):
    """Refuse an output folder ``path`` that lies in (or is) the data folder
    ``data_dir``: what a run writes there (samples, a cache, a VAE) would be
    read as data by the next run. Symlinks are resolved; creates nothing."""
    if not path or not data_dir:
        return
    out, data = os.path.realpath(path), os.path.realpath(data_dir)
    if out == data or out.startswith(data.rstrip(os.sep) + os.sep):
        raise UserError(f"{flag} {path!r} lies inside {data_flag} {data_dir!r}: what is written there would be "
                        "read as data by the next run; choose a folder outside it")


LOCK_FILE = ".lock"


class FolderInUse(UserError):
    """Another live process holds the folder's lock (:func:`lock_folder`)."""


# lock file path -> the descriptor holding its lock, open for the process's life.
_held_locks = {}


def lock_folder(folder, flag):
    """Take an exclusive lock on ``folder/.lock`` for the rest of this
    process's life, or raise :class:`FolderInUse` naming ``flag``, the folder
    and the PID that holds it: two trainers in one folder once resumed from
    each other's checkpoints and interleaved progress.csv. Call on rank 0
    only; ``folder`` must exist.

    A POSIX record lock (``lockf``), not ``flock``: the kernel drops it when
    its process dies, and unlike a ``flock`` it is not shared with forked
    children, so data-loader workers outliving a killed trainer for a moment
    do not block its restart. (Closing any descriptor of the lock file would
    drop it too; nothing else opens it.)"""
    import fcntl

    path = os.path.join(os.path.abspath(folder), LOCK_FILE)
    held = _held_locks.get(path)
    if held is not None:
        with contextlib.suppress(OSError):
            if os.fstat(held).st_ino == os.stat(path).st_ino:
                return path  # this process holds it already (a second run in one process)
        os.close(held)  # the file was removed and replaced: lock the new one
        del _held_locks[path]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            # A file system without locks (some network mounts): run unguarded
            # rather than refuse every start.
            os.close(fd)
            return path
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise FolderInUse(f"{flag} {folder!r} is in use by another run (PID {holder}, which holds {path}); "
                          "wait for it to finish or use another folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held_locks[path] = fd
    return path


@contextlib.contextmanager
def undone_on_failure(folder, before_undo=None, errors=BaseException):
    """Run the start of a job that writes into ``folder`` (logs, configs);
    if the block raises (one of ``errors``), remove what it created there,
    and ``folder`` itself if it was new: a job that fails to start leaves
    nothing behind. Entries that existed before are never touched, nor
    anything when the folder turns out to be another run's
    (:class:`FolderInUse`). ``before_undo()`` runs first (to close open log
    files). ``folder`` None or "": no undo."""
    if not folder:
        yield
        return
    existed = os.path.isdir(folder)
    before = set(os.listdir(folder)) if existed else set()
    try:
        yield
    except FolderInUse:
        raise  # the folder is another run's: nothing in it is ours to remove
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

