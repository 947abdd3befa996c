"""Progress of long loops: a bar where a person watches, plain lines where a
file records.

On a terminal (or in a notebook) :func:`progress` is a tqdm bar. Anywhere
else (``nohup``, SLURM logs, a pipe) a bar would fill the log with carriage
returns and cursor codes, so it prints a plain line on stdout at most every
``PLAIN_INTERVAL_S`` seconds and one when the loop ends. Inner loops
(``leave=False``) print nothing there: their outer loop reports.
"""

import sys
import time

from tqdm.auto import tqdm

PLAIN_INTERVAL_S = 30.0


def _watched(stream):
    if "ipykernel" in sys.modules:  # a notebook: tqdm.auto draws a widget
        return True
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress(iterable=None, *, total=None, desc="", unit="it", leave=True, disable=False, initial=0):
    """A bar or a plain-line reporter over ``iterable`` (or driven by ``update``).

    Supports what this project uses of tqdm: iteration, ``update(n)``,
    ``set_postfix_str``, ``close`` and use as a context manager."""
    if disable or (not leave and not _watched(sys.stderr)):
        return tqdm(iterable, total=total, disable=True)
    if _watched(sys.stderr):
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, initial=initial, dynamic_ncols=True)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, interval_s=PLAIN_INTERVAL_S)


def _duration(seconds):
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class PlainProgress:
    """``desc: n/total (p%), rate unit/s, ETA`` lines on stdout, now and then."""

    def __init__(self, iterable=None, *, total=None, desc="", unit="it", initial=0, interval_s=PLAIN_INTERVAL_S):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self._start_n = int(initial)
        self.interval_s = interval_s
        self._start = self._last_print = time.time()
        self._postfix = ""
        self._closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __len__(self):
        return self.total if self.total is not None else len(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix_str(self, text, refresh=True):
        self._postfix = str(text)

    def set_postfix(self, **values):
        self._postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def set_description(self, desc, refresh=True):
        self.desc = desc

    def update(self, n=1):
        self.n += n
        now = time.time()
        if now - self._last_print >= self.interval_s:
            self._last_print = now
            self._print(now)

    def line(self, now=None):
        now = time.time() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        rate = (self.n - self._start_n) / elapsed
        parts = [f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"]
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        else:
            parts.append(f"took {_duration(elapsed)}")
        if self._postfix:
            parts.append(self._postfix)
        return f"{self.desc}: " + ", ".join(parts) if self.desc else ", ".join(parts)

    def _print(self, now=None):
        print(self.line(now), file=sys.stdout, flush=True)

    def close(self):
        if not self._closed:
            self._closed = True
            self._print()
