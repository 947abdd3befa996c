"""Sampling (or training) a diffusion on a subset of its timesteps.

``space_timesteps`` picks which of the original steps to keep;
``SpacedDiffusion`` is the diffusion that jumps between exactly those steps
(its betas are recomputed from the kept cumulative alphas) while the model
and any guidance function still see the original timestep numbers.
"""

import numpy as np
import torch

from ..runtime.errors import UserError
from .gaussian_diffusion import GaussianDiffusion


def _unmeetable(spec, why):
    return UserError(f"timestep_respacing {spec!r} cannot be met: {why}")


def _ddim_steps(num_timesteps, spec):
    """Steps 0, s, 2s, ... for the smallest integer stride s giving the asked count."""
    try:
        wanted = int(spec[len("ddim"):])
    except ValueError:
        raise UserError(
            f"timestep_respacing {spec!r} is malformed: expected 'ddim' followed by a step count"
        ) from None
    for stride in range(1, num_timesteps):
        kept = range(0, num_timesteps, stride)
        if len(kept) == wanted:
            return set(kept)
    raise _unmeetable(spec, f"no integer stride takes exactly {wanted} of {num_timesteps} steps")


def _parse_counts(spec):
    try:
        counts = [int(part) for part in spec.split(",")]
    except ValueError:
        raise UserError(
            f"timestep_respacing {spec!r} is malformed: expected comma-separated step counts "
            "(e.g. '250' or '10,15,20') or 'ddimN'"
        ) from None
    return counts


def _evenly_spaced(start, size, count):
    """``count`` indices spread evenly over [start, start + size), both ends included.

    The fractional position accumulates by repeated addition and is rounded
    half to even, which is what fixes the exact indices of the original.
    """
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    taken, position = [], 0.0
    for _ in range(count):
        taken.append(start + round(position))
        position += stride
    return taken


def space_timesteps(
    num_timesteps, section_counts
):
    """The set of original timesteps to keep.

    :param num_timesteps: steps of the original process.
    :param section_counts: a list of counts, or a string: comma-separated
        counts, or ``"ddimN"`` for DDIM's fixed integer stride giving N steps.
        With counts, the steps are cut into ``len(counts)`` nearly equal
        sections (earlier ones one longer when it does not divide) and section
        ``i`` keeps ``counts[i]`` evenly spaced steps, including both ends.
        For example ``space_timesteps(300, "10,15,20")`` keeps 10 of the first
        100 steps, 15 of the next 100 and 20 of the last 100.
    :raises UserError: naming the spec, when it is malformed or cannot be met.
    """
    spec = section_counts
    if isinstance(spec, str):
        if spec.startswith("ddim"):
            return _ddim_steps(num_timesteps, spec)
        counts = _parse_counts(spec)
    else:
        counts = [int(count) for count in spec]
    if not counts or any(count < 0 for count in counts):
        raise UserError(f"timestep_respacing {spec!r} is malformed: counts must be non-negative integers")

    base, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for index, count in enumerate(counts):
        size = base + (1 if index < extra else 0)
        if size < count:
            raise _unmeetable(
                spec, f"section {index} has {size} of the {num_timesteps} steps, fewer than the {count} asked for"
            )
        kept += _evenly_spaced(start, size, count)
        start += size
    if not kept:
        raise _unmeetable(spec, "it keeps no steps at all")
    return set(kept)


class SpacedDiffusion(GaussianDiffusion):  # a subset of the base steps
    """A diffusion that only visits ``use_timesteps`` of a base process.

    :param use_timesteps: the original timesteps to keep (any iterable).
    :param kwargs: the base process's :class:`GaussianDiffusion` arguments.

    Step ``i`` of this process is original step ``timestep_map[i]``; the
    model and cond_fn are called with that original number (scaled to
    0..1000 when ``rescale_timesteps`` is set).
    """

    def __init__(
        self, use_timesteps, **kwargs
    ):
        self.use_timesteps = set(use_timesteps)
        base_betas = np.asarray(kwargs["betas"], dtype=np.float64)
        self.original_num_steps = len(base_betas)

        # Choose betas so that the kept steps have the base's cumulative alphas.
        self.timestep_map = []
        spaced_betas, prev_abar = [], 1.0
        for step, abar in enumerate(np.cumprod(1.0 - base_betas, axis=0)):
            if step in self.use_timesteps:
                spaced_betas.append(1 - abar / prev_abar)
                prev_abar = abar
                self.timestep_map.append(step)
        kwargs["betas"] = np.array(spaced_betas)
        super().__init__(**kwargs)
        self._map_by_device = {}

    def _timestep_map_on(self, device):
        """The timestep map as a long tensor on ``device`` (copied there once)."""
        mapped = self._map_by_device.get(device)
        if mapped is None:
            mapped = torch.tensor(self.timestep_map, dtype=torch.long, device=device)
            self._map_by_device[device] = mapped
        return mapped

    def _scale_timesteps(self, t):
        # Spaced index -> original step number, looked up on t's device.
        original = self._timestep_map_on(t.device)[t].to(t.dtype)
        if self.rescale_timesteps:
            return original.float() * (1000.0 / self.original_num_steps)
        return original

    def _run_model(self, model, x, t, model_kwargs):
        if isinstance(model, _SpacedModel):  # it maps the timesteps itself
            return model(x, t, **(model_kwargs or {}))
        return super()._run_model(model, x, t, model_kwargs)

    def _wrap_model(self, model):
        """``model`` as a callable taking spaced timesteps, for code outside this
        class; the diffusion's own methods recognise it and do not map twice."""
        if isinstance(model, _SpacedModel):
            return model
        return _SpacedModel(model, self)


class _SpacedModel:
    """Calls ``model(x, original_timesteps, **kwargs)`` given spaced timesteps."""

    def __init__(self, model, diffusion):
        self.model = model
        self._diffusion = diffusion

    def __call__(self, x, ts, **kwargs):
        return self.model(x, self._diffusion._scale_timesteps(ts), **kwargs)
