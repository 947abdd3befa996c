"""Pieces every trainer shares: the diffusion model's ``TrainLoop``, the VAE
trainer and the noisy-classifier trainer wrap for several processes, run in
bf16, average weights (``ema``), resume the same way and run the same loop
(:func:`train_until`).

SIGTERM (preemption: SLURM, docker and Kubernetes signal the whole process
group), SIGINT (Ctrl-C, a notebook's stop button) and SIGUSR1 (to mpiexec,
which forwards it to the ranks) ask a trainer to save and return
(:class:`StopRequests`, ``dist_util.STOP_SIGNALS``); data-loader workers
ignore them.

Resume states are ``<prefix>_state_<step:06d>.pt`` files read with
``weights_only=True``; each records the settings it was written with, and a
run with other settings refuses to resume from it, naming the first setting
that changed.
"""

import contextlib
import json
import os
import re
import signal

import torch
from torch.nn.parallel import DistributedDataParallel

import torch.distributed as dist

from . import checkpoint as ckpt
from ..runtime import dist_util, logger
from ..runtime.errors import UserError


def wrap_for_processes(module, device, **ddp_options):
    """``module`` wrapped in DistributedDataParallel when there are several
    processes (DDP copies rank 0's weights to the others), else itself."""
    if dist_util.world_size() <= 1:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   **ddp_options)


def compile_module(module):
    """``torch.compile(module)`` with Inductor's cache in a folder that outlives
    ``/tmp`` (``~/.cache/guided_diffusion_vae/inductor`` unless
    ``TORCHINDUCTOR_CACHE_DIR`` is set): a cold compile of the benchmark UNet
    took 105 s on an H100, a cached one 7 s (docs/BENCHMARKS.md)."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
            os.path.expanduser("~"), ".cache", "guided_diffusion_vae", "inductor")
    return torch.compile(module)


def autocast(precision, device, cache=True):
    """The context a forward pass runs in: bf16 autocast, or nothing for fp32.
    ``cache=False`` for code captured in a CUDA graph (a cached weight cast
    would outlive the capture)."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def state_files(folder, prefix):
    """``[(step, path), ...]`` of ``prefix_state_NNNNNN.pt`` in ``folder``, oldest first."""
    pattern = re.compile(rf"{re.escape(prefix)}_state_(\d+)\.pt")
    if not os.path.isdir(folder):
        return []
    return sorted((int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
                  if (m := pattern.fullmatch(name)))


def save_state(folder, prefix, step, state, keep):
    """Write ``state`` (tensors, numbers, strings) for ``step`` atomically and
    keep only the newest ``keep`` states. Call on rank 0."""
    path = os.path.join(folder, f"{prefix}_state_{step:06d}.pt")
    ckpt.save_training_state(path, {**state, "step": int(step)})
    for _, old in state_files(folder, prefix)[:-max(1, int(keep))]:
        os.remove(old)
    return path


def load_latest_state(folder, prefix, settings):
    """The newest state in ``folder`` (None without one), after checking it
    was written with ``settings`` (a JSON-able dict)."""
    found = state_files(folder, prefix)
    if not found:
        return None
    _, path = found[-1]
    state = dist_util.load_state_dict(path, map_location="cpu", weights_only=True)
    saved = json.loads(state["settings"])
    for key in sorted(settings):
        if saved.get(key) != settings[key]:
            raise UserError(f"{path} was written with {key}={saved.get(key)!r}, now {settings[key]!r}; "
                            "use the same settings, another output folder, or --resume False")
    return state, path


def settings_text(settings):
    """The form resume states store their settings in."""
    return json.dumps(settings, sort_keys=True)


class StopRequests:
    """Records the stop signals (``dist_util.STOP_SIGNALS``) while a trainer
    runs (``with StopRequests() as stop``); a second SIGINT interrupts at once. ``stop.requested(device, check)`` is
    the same on every rank: with several processes it is agreed on only
    when ``check`` is true (e.g. at log steps), as an all-reduce."""

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def _record(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self):
        try:
            for sig in dist_util.STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def requested(self, device, check=True):
        if dist_util.world_size() == 1:
            return self.signal_name is not None
        if not check:
            return False
        # Every rank must leave at the same step, or the next all-reduce hangs.
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def train_until(trainer, total, check_every):
    """The loop of every trainer: ``trainer.advance()`` (one step and what
    follows it at its intervals: logging, saving, previews) until
    ``trainer.step`` (steps done) reaches ``total`` (0: until stopped).

    A stop signal ends it early: agreed on by every rank at a step that is a
    multiple of ``check_every``, it calls ``trainer.save_now()`` and says how
    to continue. Returns True when ``total`` was reached, False when stopped
    (saved). Nothing is saved for a stop at the last step: finishing saves.
    """
    total = int(total or 0)
    with StopRequests() as stop:
        while not total or trainer.step < total:
            trainer.advance()
            if (not total or trainer.step < total) and stop.requested(trainer.device,
                                                                      trainer.step % check_every == 0):
                trainer.save_now()
                logger.log(f"{stop.signal_name or 'stop signal'} received: saved at step {trainer.step}; rerun "
                           "the same command to continue")
                return False
    return True
