"""Training logs: key/value diagnostics and text, with guided-diffusion's logger API.

Typical use::

    logger.configure(dir="runs/exp1", format_strs=["stdout", "log", "csv", "tensorboard"])
    for step in ...:
        logger.logkv_mean("loss", loss)        # float or 0-dim tensor, no host sync
        if step % 100 == 0:
            logger.logkv("step", step)
            logger.dumpkvs()                   # one table row / json line / TB point
    logger.log("done")                         # free text (stdout and log.txt)

Output formats (``format_strs``, or ``$OPENAI_LOG_FORMAT`` as a comma list;
default ``stdout,log,csv``):

``stdout``      a table per dump and the text messages on standard output
``log``         the same into ``<dir>/log.txt``
``csv``         ``<dir>/progress.csv`` (columns grow when new keys appear)
``json``        ``<dir>/progress.json``, one JSON object per dump
``tensorboard`` event files under ``<dir>/tb`` (``torch.utils.tensorboard``);
                also receives :func:`log_image` and :func:`log_scalar`

The directory is ``dir``, else ``$OPENAI_LOGDIR``, else a new time-stamped
folder in the system temp directory.

Ranks: only rank 0 writes by default. Other ranks get no outputs (their
ERROR-level messages still reach stderr) unless ``$OPENAI_LOG_FORMAT_MPI`` names
formats for them or ``configure(all_ranks=True)`` is used; their files carry a
``-rankNNN`` suffix. Values logged on other ranks are dropped unless ``comm`` is
given (an mpi4py communicator, or ``"torch"`` for the torch.distributed group):
then every rank must call :func:`dumpkvs` and rank 0 writes the count-weighted
mean of each ``logkv_mean`` key over the ranks.

Tensors: :func:`logkv_mean` and :func:`logkv` keep 0-dim tensors where they are
(a running sum on the tensor's device); they are read back to the host once,
all keys of a device together, in :func:`dumpkvs`. Logging a GPU loss every
step therefore never waits for the GPU.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import functools
import json
import os
import sys
import tempfile
import time
from collections import OrderedDict
from numbers import Number
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from . import dist_util
from .images import image_grid

DEBUG = 10
INFO = 20
WARN = 30
ERROR = 40
DISABLED = 50

__all__ = [
    "DEBUG", "INFO", "WARN", "ERROR", "DISABLED",
    "configure", "choose_dir", "add_outputs", "reset", "close", "scoped_configure", "quiet_configure", "get_current", "get_dir", "set_level",
    "set_comm",
    "logkv", "logkv_mean", "logkvs", "logkvs_mean", "dumpkvs", "getkvs",
    "record_tabular", "dump_tabular",
    "log", "debug", "info", "warn", "error",
    "log_image", "log_scalar", "profile_kv", "profile",
    "Logger", "KVWriter", "SeqWriter", "TextOutput", "JSONOutput", "CSVOutput", "TensorBoardOutput",
    "HumanOutputFormat", "JSONOutputFormat",
    "CSVOutputFormat", "TensorBoardOutputFormat", "make_output_format",
]


# --------------------------------------------------------------------------- #
# value helpers
# --------------------------------------------------------------------------- #


def _to_plain(value: Any) -> Any:
    """A JSON/CSV friendly version of a logged value (host values only)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.item() if value.size == 1 else value.tolist()
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, Number) and not isinstance(value, bool)


def _format_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- #
# output formats
# --------------------------------------------------------------------------- #


class KVWriter:
    """Receives one dict of key/values per :func:`dumpkvs`."""

    def writekvs(self, kvs: dict, step: Optional[int] = None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SeqWriter:
    """Receives free-text messages."""

    def writeseq(self, seq: Sequence[Any]) -> None:
        raise NotImplementedError


class TextOutput(KVWriter, SeqWriter):
    """A boxed two-column table per dump, plus plain text lines."""

    def __init__(self, target) -> None:
        if isinstance(target, (str, os.PathLike)):
            self.file = open(target, "a", encoding="utf-8")
            self._owned = True
        else:
            if not hasattr(target, "write"):
                raise TypeError(f"expected a path or a writable stream, got {target!r}")
            self.file = target
            self._owned = False

    def writekvs(self, kvs: dict, step: Optional[int] = None) -> None:
        if not kvs:
            self.file.write("(nothing logged)\n")
            self.file.flush()
            return
        rows = [(_shorten(str(k)), _shorten(_format_cell(v))) for k, v in kvs.items()]
        rows.sort(key=lambda row: row[0].lower())
        left = max(len(k) for k, _ in rows)
        right = max(len(v) for _, v in rows)
        rule = "-" * (left + right + 7)
        body = [f"| {k.ljust(left)} | {v.ljust(right)} |" for k, v in rows]
        self.file.write("\n".join([rule, *body, rule]) + "\n")
        self.file.flush()

    def writeseq(self, seq: Sequence[Any]) -> None:
        self.file.write(" ".join(str(part) for part in seq) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self._owned:
            self.file.close()


class JSONOutput(KVWriter):
    """One JSON object per line."""

    def __init__(self, path: str) -> None:
        self.file = open(path, "a", encoding="utf-8")

    def writekvs(self, kvs: dict, step: Optional[int] = None) -> None:
        record = {str(k): _to_plain(v) for k, v in kvs.items()}
        self.file.write(json.dumps(record, default=str) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class CSVOutput(KVWriter):
    """A CSV table; a key seen for the first time adds a column (file rewritten).

    An existing table in the same place is continued, not replaced: a resumed
    run keeps the history of the run it resumes (rows written after its last
    checkpoint, before an interruption, stay too and may repeat a step).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.columns: list[str] = []
        exists = os.path.isfile(path) and os.path.getsize(path) > 0
        self.file = open(path, "r+" if exists else "w+", encoding="utf-8", newline="")
        if exists:
            header = next(csv.reader(self.file), [])
            self.columns = [c for c in header]
            self.file.seek(0, os.SEEK_END)

    def _rewrite_with(self, columns: list[str]) -> None:
        self.file.seek(0)
        old_rows = list(csv.reader(self.file))[1:] if self.columns else []
        self.file.seek(0)
        self.file.truncate()
        writer = csv.writer(self.file)
        writer.writerow(columns)
        pad = len(columns) - len(self.columns)
        for row in old_rows:
            writer.writerow(row + [""] * pad)
        self.columns = columns

    def writekvs(self, kvs: dict, step: Optional[int] = None) -> None:
        fresh = [str(k) for k in kvs if str(k) not in self.columns]
        if fresh:
            self._rewrite_with(self.columns + fresh)
        by_name = {str(k): v for k, v in kvs.items()}
        cells = []
        for name in self.columns:
            value = _to_plain(by_name[name]) if name in by_name else ""
            cells.append("" if value is None else value)
        csv.writer(self.file).writerow(cells)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _image_to_hwc_uint8(image: Any) -> np.ndarray:
    """uint8 HWC from HW / HWC / CHW / NCHW / NHWC (uint8, or float in [0, 1])."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float64) / 255.0
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    channel_counts = (1, 3, 4)
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.ndim == 3:
        if arr.shape[-1] in channel_counts:
            return arr
        if arr.shape[0] in channel_counts:
            return np.transpose(arr, (1, 2, 0))
        raise ValueError(f"cannot tell the channel axis of an image of shape {arr.shape}")
    if arr.ndim == 4:
        if arr.shape[1] not in channel_counts and arr.shape[-1] in channel_counts:
            arr = np.transpose(arr, (0, 3, 1, 2))  # NHWC -> NCHW
        if arr.shape[1] not in channel_counts:
            raise ValueError(f"expected NCHW images with 1, 3 or 4 channels, got shape {arr.shape}")
        return image_grid(np.ascontiguousarray(np.transpose(arr, (0, 2, 3, 1))), background=0)
    raise ValueError(f"expected an image array with 2 to 4 dimensions, got shape {arr.shape}")


class TensorBoardOutput(KVWriter):
    """Scalars (one point per dump), images and explicit scalars into TensorBoard."""

    def __init__(self, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir)
        self.step = 0  # used when neither the call nor the kvs give a step

    def _resolve_step(self, step: Optional[int], kvs: Optional[dict] = None) -> int:
        if step is not None:
            return int(step)
        if kvs is not None and _is_number(kvs.get("step")):
            return int(kvs["step"])
        return self.step

    def writekvs(self, kvs: dict, step: Optional[int] = None) -> None:
        at = self._resolve_step(step, kvs)
        for key, value in kvs.items():
            value = _to_plain(value)
            if _is_number(value):
                self.writer.add_scalar(str(key), float(value), global_step=at)
        self.writer.flush()
        self.step = at + 1

    def writescalar(self, tag: str, value: float, step: Optional[int]) -> None:
        self.writer.add_scalar(tag, float(value), global_step=self._resolve_step(step))
        self.writer.flush()

    def writeimage(self, tag: str, image_hwc: np.ndarray, step: Optional[int]) -> None:
        self.writer.add_image(tag, image_hwc, global_step=self._resolve_step(step), dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# the original module's class names
HumanOutputFormat = TextOutput
JSONOutputFormat = JSONOutput
CSVOutputFormat = CSVOutput
TensorBoardOutputFormat = TensorBoardOutput


def make_output_format(fmt: str, ev_dir: str, log_suffix: str = "") -> KVWriter:
    """Build one output by name (stdout, log, json, csv, tensorboard)."""
    if fmt != "stdout":
        os.makedirs(ev_dir, exist_ok=True)
    if fmt == "stdout":
        return TextOutput(sys.stdout)
    if fmt == "log":
        return TextOutput(os.path.join(ev_dir, f"log{log_suffix}.txt"))
    if fmt == "json":
        return JSONOutput(os.path.join(ev_dir, f"progress{log_suffix}.json"))
    if fmt == "csv":
        return CSVOutput(os.path.join(ev_dir, f"progress{log_suffix}.csv"))
    if fmt == "tensorboard":
        return TensorBoardOutput(os.path.join(ev_dir, f"tb{log_suffix}"))
    raise ValueError(f"unknown log format {fmt!r} (use stdout, log, csv, json, tensorboard)")


# --------------------------------------------------------------------------- #
# the logger
# --------------------------------------------------------------------------- #


class _Mean:
    """Running sum and count of one logkv_mean key; ``total`` may be a device tensor."""

    __slots__ = ("total", "count")

    def __init__(self) -> None:
        self.total: Any = 0.0
        self.count = 0


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class Logger:
    DEFAULT: Optional["Logger"] = None  # the stdout-only logger used before configure()
    CURRENT: Optional["Logger"] = None

    def __init__(self, dir: Optional[str], output_formats: Iterable[KVWriter], comm: Any = None,
                 rank: int = 0) -> None:
        self.dir = dir
        self.output_formats = list(output_formats)
        self.comm = comm
        self.rank = rank
        self.level = INFO
        self._kvs: "OrderedDict[str, Any]" = OrderedDict()  # raw value or _Mean

    # ---- key/values ------------------------------------------------------ #

    def logkv(self, key: str, val: Any) -> None:
        if isinstance(val, torch.Tensor):
            val = val.detach()
        self._kvs[key] = val

    def logkv_mean(self, key: str, val: Any) -> None:
        slot = self._kvs.get(key)
        if not isinstance(slot, _Mean):
            slot = _Mean()
            self._kvs[key] = slot
        if isinstance(val, torch.Tensor):
            if val.numel() != 1:
                raise ValueError(f"logkv_mean({key!r}) needs a scalar, got a tensor of shape {tuple(val.shape)}")
            val = val.detach().reshape(()).to(_accumulation_dtype(val.device))
            if isinstance(slot.total, torch.Tensor) and slot.total.device != val.device:
                val = val.to(slot.total.device, non_blocking=True)
            # tensor + tensor or tensor + float: queued on the device, no sync
            slot.total = val + slot.total
        else:
            val = float(_to_plain(val))
            slot.total = slot.total + val
        slot.count += 1

    def _materialize(self) -> "OrderedDict[str, Any]":
        """Resolve means and pull every tensor to the host (one copy per device)."""
        resolved: "OrderedDict[str, Any]" = OrderedDict()
        pending: dict[torch.device, list[tuple[str, torch.Tensor, int]]] = {}
        for key, slot in self._kvs.items():
            if isinstance(slot, _Mean):
                if isinstance(slot.total, torch.Tensor):
                    pending.setdefault(slot.total.device, []).append((key, slot.total, slot.count))
                    resolved[key] = None  # keeps the order; filled below
                else:
                    resolved[key] = slot.total / max(slot.count, 1)
            elif isinstance(slot, torch.Tensor) and slot.numel() == 1:
                pending.setdefault(slot.device, []).append((key, slot, 1))
                resolved[key] = None
            else:
                resolved[key] = _to_plain(slot)
        for device, items in pending.items():
            dtype = _accumulation_dtype(device)
            stacked = torch.stack([t.reshape(()).to(dtype) for _, t, _ in items])
            for (key, _, count), value in zip(items, stacked.cpu().tolist()):
                resolved[key] = value / count
        return resolved

    def _mean_counts(self) -> dict[str, int]:
        return {k: s.count for k, s in self._kvs.items() if isinstance(s, _Mean)}

    def _combine_over_ranks(self, values: "OrderedDict[str, Any]") -> Optional["OrderedDict[str, Any]"]:
        """Count-weighted means over the ranks of ``self.comm``; None on non-root ranks."""
        counts = self._mean_counts()
        mine = {k: (v, counts.get(k, 1)) for k, v in values.items()}
        if self.comm == "torch":
            import torch.distributed as tdist

            if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
                return values
            everyone = [None] * tdist.get_world_size() if tdist.get_rank() == 0 else None
            tdist.gather_object(mine, everyone, dst=0)
            is_root = tdist.get_rank() == 0
        else:  # an mpi4py communicator
            everyone = self.comm.gather(mine, root=0)
            is_root = self.comm.Get_rank() == 0
        if not is_root:
            return None
        merged: "OrderedDict[str, Any]" = OrderedDict()
        weights: dict[str, float] = {}
        for entry in everyone:
            for key, (value, count) in entry.items():
                if not _is_number(value):
                    merged.setdefault(key, value)
                    continue
                prior = merged.get(key, 0.0)
                prior = prior if _is_number(prior) else 0.0
                merged[key] = prior + value * count
                weights[key] = weights.get(key, 0.0) + count
        for key, weight in weights.items():
            merged[key] = merged[key] / weight
        return merged

    def dumpkvs(self, step: Optional[int] = None) -> dict:
        """Write the current key/values to every output and start a new row."""
        values = self._materialize()
        if self.comm is not None:
            combined = self._combine_over_ranks(values)
            values = combined if combined is not None else OrderedDict()
        if self.level < DISABLED and values:
            for fmt in self.output_formats:
                if isinstance(fmt, KVWriter):
                    fmt.writekvs(values, step=step)
        self._kvs.clear()
        return dict(values)

    def getkvs(self) -> dict:
        """The values a dump would write now (forces the device reads)."""
        return dict(self._materialize())

    # ---- text -------------------------------------------------------------- #

    def log(self, *args: Any, level: int = INFO) -> None:
        if level < self.level:
            return
        writers = [fmt for fmt in self.output_formats if isinstance(fmt, SeqWriter)]
        for fmt in writers:
            fmt.writeseq(args)
        if not writers and self.rank > 0 and level >= ERROR:
            print(f"[rank {self.rank}]", *args, file=sys.stderr, flush=True)

    # ---- images / explicit scalars ----------------------------------------- #

    def log_image(self, tag: str, image: Any, step: Optional[int] = None) -> None:
        targets = [fmt for fmt in self.output_formats if hasattr(fmt, "writeimage")]
        if not targets:
            return
        hwc = _image_to_hwc_uint8(image)
        for fmt in targets:
            fmt.writeimage(tag, hwc, step)

    def log_scalar(self, tag: str, value: Any, step: Optional[int] = None) -> None:
        targets = [fmt for fmt in self.output_formats if hasattr(fmt, "writescalar")]
        if not targets:
            return
        value = float(_to_plain(value))
        for fmt in targets:
            fmt.writescalar(tag, value, step)

    # ---- misc ---------------------------------------------------------------- #

    def set_level(self, level: int) -> None:
        self.level = level

    def set_comm(self, comm: Any) -> None:
        self.comm = comm

    def get_dir(self) -> Optional[str]:
        return self.dir

    def close(self) -> None:
        for fmt in self.output_formats:
            fmt.close()


# --------------------------------------------------------------------------- #
# module-level API (acts on the current logger)
# --------------------------------------------------------------------------- #


def _parse_formats(spec: Any) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, str):
        return [part.strip() for part in spec.split(",") if part.strip()]
    return [str(part) for part in spec]


def _default_logger() -> Logger:
    r = dist_util.rank()
    outputs = [TextOutput(sys.stdout)] if r == 0 else []
    return Logger(dir=None, output_formats=outputs, rank=r)


def get_current() -> Logger:
    if Logger.CURRENT is None:
        Logger.DEFAULT = Logger.CURRENT = _default_logger()
    return Logger.CURRENT


# Whether a newly configured logger says where it logs (see quiet_configure).
_announce_dirs = True


@contextlib.contextmanager
def quiet_configure():
    """Inside the block, :func:`configure` and :func:`scoped_configure` leave
    out their "Logging to DIR" line: a pipeline says where it logs once, and
    its stages, which each log into their own folder, say so in their headers."""
    global _announce_dirs
    before, _announce_dirs = _announce_dirs, False
    try:
        yield
    finally:
        _announce_dirs = before


def choose_dir(dir: Optional[str] = None, flag: str = "log_dir") -> tuple:
    """``(folder, what named it)``: the folder :func:`configure` would log
    into, without creating it: ``dir``, else ``$OPENAI_LOGDIR``, else a new
    time-stamped folder in the system temp directory. The second item names
    the source for error messages (``flag``, ``OPENAI_LOGDIR`` or ``the new
    log folder``), so a caller can check the folder before anything is written."""
    if dir:
        source = flag
    elif os.environ.get("OPENAI_LOGDIR"):
        dir, source = os.environ["OPENAI_LOGDIR"], "OPENAI_LOGDIR"
    else:
        stamp = datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f")
        dir, source = os.path.join(tempfile.gettempdir(), stamp), "the new log folder"
    return os.path.abspath(os.path.expanduser(os.fspath(dir))), source


def _build_logger(dir: Optional[str], format_strs: Any, comm: Any, log_suffix: str,
                  all_ranks: bool) -> Logger:
    dir, _ = choose_dir(dir)

    r = dist_util.rank()
    if r == 0:
        if format_strs is None:
            format_strs = os.environ.get("OPENAI_LOG_FORMAT", "stdout,log,csv")
    else:
        log_suffix = f"{log_suffix}-rank{r:03d}"
        if not all_ranks:
            format_strs = os.environ.get("OPENAI_LOG_FORMAT_MPI", "")
        elif format_strs is None:
            format_strs = os.environ.get("OPENAI_LOG_FORMAT", "stdout,log,csv")
    names = _parse_formats(format_strs)
    if r == 0 or names:
        os.makedirs(dir, exist_ok=True)
    outputs = [make_output_format(name, dir, log_suffix) for name in names]
    built = Logger(dir=dir, output_formats=outputs, comm=comm, rank=r)
    if outputs and _announce_dirs:
        built.log(f"Logging to {dir}")
    return built


def configure(dir: Optional[str] = None, format_strs: Any = None, comm: Any = None,
              log_suffix: str = "", *, all_ranks: bool = False) -> Logger:
    """Start logging into ``dir`` (see the module docstring for formats and ranks).

    A logger configured earlier is closed (its files flushed).
    """
    previous = Logger.CURRENT
    Logger.CURRENT = _build_logger(dir, format_strs, comm, log_suffix, all_ranks)
    if previous is not None and previous is not Logger.DEFAULT:
        previous.close()
    return Logger.CURRENT


def add_outputs(format_strs: Any) -> None:
    """Add outputs (e.g. ``"tensorboard"``) to the configured logger on rank 0:
    a trainer opens them only once its start is accepted, so a refused start
    leaves no event file behind."""
    current = get_current()
    if current.rank == 0 and current.dir is not None:
        current.output_formats += [make_output_format(name, current.dir) for name in _parse_formats(format_strs)]


def reset() -> None:
    """Close the configured logger and go back to the default (stdout on rank 0)."""
    if Logger.CURRENT is not None and Logger.CURRENT is not Logger.DEFAULT:
        Logger.CURRENT.close()
        Logger.CURRENT = Logger.DEFAULT
        log("Reset logger")


def close() -> None:
    """Close the configured logger's files and go back to the default, quietly
    (a failed start whose log folder is then removed)."""
    if Logger.CURRENT is not None and Logger.CURRENT is not Logger.DEFAULT:
        Logger.CURRENT.close()
        Logger.CURRENT = Logger.DEFAULT


@contextlib.contextmanager
def scoped_configure(dir: Optional[str] = None, format_strs: Any = None, comm: Any = None):
    """Log somewhere else inside a ``with`` block, then restore the previous logger."""
    outer = get_current()
    inner = _build_logger(dir, format_strs, comm, "", False)
    Logger.CURRENT = inner
    try:
        yield inner
    finally:
        inner.close()
        Logger.CURRENT = outer


def logkv(key: str, val: Any) -> None:
    """Set ``key`` to ``val`` for the next dump (the last value wins)."""
    get_current().logkv(key, val)


def logkv_mean(key: str, val: Any) -> None:
    """Add ``val`` (float, or 0-dim tensor kept on its device) to ``key``'s mean for the next dump."""
    get_current().logkv_mean(key, val)


def logkvs(d: dict) -> None:
    for key, val in d.items():
        logkv(key, val)


def logkvs_mean(d: dict) -> None:
    for key, val in d.items():
        logkv_mean(key, val)


def dumpkvs(step: Optional[int] = None) -> dict:
    """Write and clear the pending key/values; ``step`` is the TensorBoard x value."""
    return get_current().dumpkvs(step=step)


def getkvs() -> dict:
    return get_current().getkvs()


record_tabular = logkv
dump_tabular = dumpkvs


def log(*args: Any, level: int = INFO) -> None:
    """Write a text line to the stdout/log outputs (when ``level`` passes)."""
    get_current().log(*args, level=level)


def debug(*args: Any) -> None:
    log(*args, level=DEBUG)


def info(*args: Any) -> None:
    log(*args, level=INFO)


def warn(*args: Any) -> None:
    log(*args, level=WARN)


def error(*args: Any) -> None:
    log(*args, level=ERROR)


def log_image(tag: str, image: Any, step: Optional[int] = None) -> None:
    """Send an image to the image-capable outputs (TensorBoard); no-op without one.

    ``image``: uint8 (or float in [0, 1]) array or tensor, HW, HWC, CHW, or a
    batch NCHW / NHWC that is tiled into one grid.
    """
    get_current().log_image(tag, image, step)


def log_scalar(tag: str, value: Any, step: Optional[int] = None) -> None:
    """Write one scalar at an explicit step to the TensorBoard outputs (not the table)."""
    get_current().log_scalar(tag, value, step)


def set_level(level: int) -> None:
    get_current().set_level(level)


def set_comm(comm: Any) -> None:
    get_current().set_comm(comm)


def get_dir() -> Optional[str]:
    """The log directory (None before :func:`configure`)."""
    return get_current().get_dir()


@contextlib.contextmanager
def profile_kv(scope: str):
    """Add the wall time of the block to the key ``wait_<scope>`` of the next dump."""
    started = time.perf_counter()
    try:
        yield
    finally:
        current = get_current()
        key = f"wait_{scope}"
        elapsed = time.perf_counter() - started
        previous = current._kvs.get(key, 0.0)
        current._kvs[key] = (previous if isinstance(previous, float) else 0.0) + elapsed


def profile(name: str):
    """Decorator form of :func:`profile_kv`."""

    def wrap(fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            with profile_kv(name):
                return fn(*args, **kwargs)

        return timed

    return wrap
