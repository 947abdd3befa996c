"""Which timesteps each training batch uses, and how their losses are weighted.

A sampler draws timesteps ``t ~ p(t)`` and returns the importance weights
``1 / (T * p(t))`` that keep the weighted loss an unbiased estimate of the
uniform average over steps.  ``UniformSampler`` is the default and runs on
the device without touching the host; ``LossSecondMomentResampler``
(Nichol & Dhariwal 2021, for training on the variational bound) learns p(t)
from recent losses in host memory.
"""

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.distributed as dist

from ..runtime.errors import UserError


def create_named_schedule_sampler(
    name, diffusion
):
    """The sampler called ``name`` (a key of ``SCHEDULE_SAMPLERS``) for ``diffusion``."""
    if name not in SCHEDULE_SAMPLERS:
        raise UserError(f"unknown schedule_sampler {name!r} (valid: {', '.join(SCHEDULE_SAMPLERS)})")
    return SCHEDULE_SAMPLERS[name](diffusion)


class ScheduleSampler(ABC):
    """A distribution over a diffusion's timesteps, used to reduce loss variance."""

    @abstractmethod
    def weights(self):
        """Unnormalised non-negative sampling weights, a numpy array of shape (T,)."""

    def sample(self, batch_size, device):
        """Draw ``batch_size`` timesteps.

        :return: ``(timesteps, weights)``: a long tensor and a float tensor of
            shape ``(batch_size,)`` on ``device``; weights are ``1 / (T p(t))``.
        """
        probs = np.asarray(self.weights(), dtype=np.float64)
        probs = probs / probs.sum()
        drawn = np.random.choice(len(probs), size=(batch_size,), p=probs)
        importance = 1.0 / (len(probs) * probs[drawn])
        timesteps = torch.from_numpy(drawn).long().to(device)
        return timesteps, torch.from_numpy(importance).float().to(device)


class UniformSampler(ScheduleSampler):
    """Every timestep equally likely; all importance weights are 1."""

    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones(diffusion.num_timesteps, dtype=np.float64)

    def weights(self):
        return self._weights

    def sample(self, batch_size, device):
        # Drawn on the device itself: no host round trip, no synchronisation.
        steps = torch.randint(0, self.diffusion.num_timesteps, (batch_size,), device=device)
        return steps, torch.ones(batch_size, device=device)


def _gather_from_all_ranks(values):
    """Concatenate the 1-D tensors ``values`` of every rank, in rank order, as a list."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values.detach().tolist()
    world = dist.get_world_size()
    mine = torch.tensor([len(values)], dtype=torch.int64, device=values.device)
    sizes = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine)
    sizes = [int(size.item()) for size in sizes]
    # all_gather needs equal shapes: pad to the longest batch, then trim.
    padded = torch.zeros(max(sizes), dtype=values.dtype, device=values.device)
    padded[: len(values)] = values.detach()
    pieces = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded)
    return [value for piece, size in zip(pieces, sizes) for value in piece[:size].tolist()]


class LossAwareSampler(ScheduleSampler):  # adapts to observed losses
    """A sampler whose distribution follows the training losses it is shown."""

    def update_with_local_losses(
        self, local_ts, local_losses
    ):
        """Feed this rank's timesteps and per-sample losses (1-D tensors).

        Every rank must call this with its own batch (sizes may differ); all
        ranks then hold the same history, so their samplers stay identical.
        This synchronises with the host and across ranks.
        """
        timesteps = _gather_from_all_ranks(local_ts)
        losses = _gather_from_all_ranks(local_losses)
        self.update_with_all_losses([int(t) for t in timesteps], losses)

    @abstractmethod
    def update_with_all_losses(
        self, ts, losses
    ):
        """Record losses (floats) at timesteps ``ts`` (ints), gathered from all ranks."""


class LossSecondMomentResampler(LossAwareSampler):  # RMS of recent losses
    """p(t) proportional to the root mean square of the last few losses at t.

    Until every timestep has ``history_per_term`` losses the weights stay
    uniform; afterwards a ``uniform_prob`` share of the probability is spread
    evenly so that no step is ever starved.
    """

    def __init__(
        self, diffusion, history_per_term=10, uniform_prob=0.001
    ):
        self.diffusion = diffusion
        self.history_per_term, self.uniform_prob = history_per_term, uniform_prob
        steps = diffusion.num_timesteps
        self._loss_history = np.zeros([steps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([steps], dtype=np.int64)

    def weights(self):
        steps = self.diffusion.num_timesteps
        if not self._warmed_up():
            return np.ones([steps], dtype=np.float64)
        rms = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        probs = rms / np.sum(rms)
        return probs * (1 - self.uniform_prob) + self.uniform_prob / steps

    def update_with_all_losses(
        self, ts, losses
    ):
        for t, loss in zip(ts, losses):
            filled = self._loss_counts[t]
            if filled < self.history_per_term:
                self._loss_history[t, filled] = loss
                self._loss_counts[t] = filled + 1
            else:
                # Full: drop the oldest entry, append the newest at the end.
                self._loss_history[t] = np.roll(self._loss_history[t], -1)
                self._loss_history[t, -1] = loss

    def state_dict(self):
        """The loss history as tensors (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "loss_history": torch.from_numpy(self._loss_history.copy()),
            "loss_counts": torch.from_numpy(self._loss_counts.copy()),
        }

    def load_state_dict(self, state):
        history = state["loss_history"].cpu().numpy().astype(np.float64)
        counts = state["loss_counts"].cpu().numpy().astype(np.int64)
        if history.shape != self._loss_history.shape or counts.shape != self._loss_counts.shape:
            raise ValueError(
                f"saved loss history has shape {history.shape}, this sampler keeps {self._loss_history.shape}"
            )
        self._loss_history, self._loss_counts = history, counts

    def _warmed_up(self):
        return bool((self._loss_counts == self.history_per_term).all())


# The names --schedule_sampler accepts.
SCHEDULE_SAMPLERS = {"uniform": UniformSampler, "loss-second-moment": LossSecondMomentResampler}
