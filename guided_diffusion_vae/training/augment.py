"""Non-leaking augmentation: the network is told what was done to each batch.

With so few walks per person the diffusion model starts to reproduce
training walks. Augmenting the training batch gives it more to learn from,
but a plainly augmented model would also *generate* augmented data. Following
EDM (Karras et al. 2022), each applied augmentation is described by a small
vector that the network receives as a condition (``UNetModel(augment_dim)``,
``model(x, t, augment=labels)``); sampling passes no such vector, which means
"not augmented", so samples follow the real data only.

Both augmentations are physical changes of a spectrogram (rows: Doppler, top
= fastest closing; columns: time):

- ``time_shift``: a circular shift along time, a walk seen from another phase
  of the gait cycle. Label ``(sin a, cos a - 1)`` with ``a = 2 pi shift / width``.
- ``doppler_scale``: every radial velocity multiplied by ``s`` in ``[1/(1+m),
  1+m]`` (a slightly faster or slower walker), rows stretched about the
  zero-velocity row. Label ``log(s) / log(1+m)`` in ``[-1, 1]``.

Each is applied to each sample independently with probability ``prob``; the
label of an augmentation not applied is zero. The same code serves pixels and
latents (the VAE keeps the layout, 4x smaller).
"""

import math

import torch
import torch.nn.functional as F

from ..runtime.errors import UserError

# Name -> size of its label.
AUGMENTATIONS = {"time_shift": 2, "doppler_scale": 1}


def augment_defaults():
    """The training flags of augmentation."""
    return {"augment": "none", "augment_prob": 0.5, "augment_doppler_max": 0.1, "augment_zero_doppler": 7.5 / 9}


FLAG_HELP = {
    "augment": "non-leaking augmentation of training batches, told to the network as a condition (sampling asks "
               "for none): 'none', or a comma-separated list of " + ", ".join(AUGMENTATIONS),
    "augment_prob": "chance that each augmentation is applied to each training sample",
    "augment_doppler_max": "doppler_scale multiplies velocities by up to 1 + this (or divides by it)",
    "augment_zero_doppler": "doppler_scale: the zero-velocity row as a share of the height from the top (the "
                            "built-in simulator shows -1.5..7.5 m/s: 7.5/9)",
}


def parse_augment(text):
    """``"time_shift,doppler_scale"`` -> a tuple of names (``()`` for none)."""
    names = tuple(p.strip() for p in str(text or "none").split(",") if p.strip())
    if names in ((), ("none",)):
        return ()
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown or len(set(names)) != len(names):
        raise UserError(f"--augment {text!r}: give 'none' or distinct names from {', '.join(AUGMENTATIONS)}")
    return names


def augment_dim(text):
    """Size of the network's augmentation condition for ``--augment text`` (0: none)."""
    return sum(AUGMENTATIONS[n] for n in parse_augment(text))


def check_augment_config(config):
    """Refuse unusable augmentation flags (before any work)."""
    parse_augment(config["augment"])
    if not 0 < float(config["augment_prob"]) <= 1:
        raise UserError(f"--augment_prob must lie in (0, 1], got {config['augment_prob']}")
    if not 0 < float(config["augment_doppler_max"]) < 1:
        raise UserError(f"--augment_doppler_max must lie in (0, 1), got {config['augment_doppler_max']}")
    if not 0 <= float(config["augment_zero_doppler"]) <= 1:
        raise UserError(f"--augment_zero_doppler must lie in [0, 1], got {config['augment_zero_doppler']}")


def circular_time_shift(x, shift):
    """Roll each sample of ``x (N, C, H, W)`` right along W by ``shift (N,)`` columns."""
    width = x.shape[-1]
    columns = (torch.arange(width, device=x.device)[None, :] - shift[:, None]) % width  # (N, W)
    return torch.gather(x, -1, columns[:, None, None, :].expand_as(x))


def doppler_scale(x, scale, zero_row):
    """Stretch each sample of ``x (N, C, H, W)`` along H by ``scale (N,)``
    about the row at ``zero_row`` (a share of H from the top): the value at
    distance r from that row moves to distance ``scale * r``. Rows that come
    from outside the image repeat its edge."""
    n, _, height, width = x.shape
    # grid_sample's coordinates: -1..1 across pixel edges (align_corners=False).
    centre = 2.0 * zero_row - 1.0
    rows = (torch.arange(height, device=x.device, dtype=x.dtype) + 0.5) / height * 2 - 1
    cols = (torch.arange(width, device=x.device, dtype=x.dtype) + 0.5) / width * 2 - 1
    source_rows = centre + (rows[None, :] - centre) / scale[:, None].to(x.dtype)  # (N, H)
    grid = torch.stack(torch.broadcast_tensors(cols[None, None, :], source_rows[:, :, None]), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class Augmenter:
    """``augmenter(batch) -> (augmented batch, labels (N, dim))`` on the batch's device."""

    def __init__(self, names, prob=0.5, doppler_max=0.1, zero_doppler=7.5 / 9):
        self.names = tuple(names)
        self.prob, self.zero_doppler = float(prob), float(zero_doppler)
        self.log_max = math.log1p(float(doppler_max))
        self.dim = sum(AUGMENTATIONS[n] for n in self.names)

    @classmethod
    def from_config(cls, config):
        """The augmenter of the training flags, or None for ``--augment none``."""
        check_augment_config(config)
        names = parse_augment(config["augment"])
        if not names:
            return None
        return cls(names, config["augment_prob"], config["augment_doppler_max"], config["augment_zero_doppler"])

    def __call__(self, x):
        n = x.shape[0]
        labels = []
        for name in self.names:
            applied = torch.rand(n, device=x.device) < self.prob
            if name == "time_shift":
                shift = torch.randint(0, x.shape[-1], (n,), device=x.device) * applied
                x = circular_time_shift(x, shift)
                angle = 2 * math.pi * shift.float() / x.shape[-1]
                labels += [torch.sin(angle), torch.cos(angle) - 1]
            else:
                log_scale = (torch.rand(n, device=x.device) * 2 - 1) * self.log_max * applied
                x = doppler_scale(x, torch.exp(log_scale), self.zero_doppler)
                labels.append(log_scale / self.log_max)
        return x, torch.stack(labels, dim=1).to(x.dtype)
