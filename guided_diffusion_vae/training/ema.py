"""Exponential moving averages of weights, with the warm-up every trainer uses.

The diffusion, VAE and classifier trainers all average their weights the
same way; the decay rule lives here once.
"""

import copy

import torch


def ema_decay(rate, updates, warmup=True):
    """The decay for the ``updates``-th update: ``min(rate, (1 + n) / (10 + n))``
    with warm-up, so a 0.9999 average is not still mostly the random
    initialisation after a few thousand steps; ``rate`` itself without it
    (the original's rule)."""
    if not warmup:
        return float(rate)
    return min(float(rate), (1.0 + updates) / (10.0 + updates))


class EMA:
    """A float32 moving average of a model's parameters (``decay`` from
    :func:`ema_decay`), saved and loaded by parameter name."""

    def __init__(self, model, rate, warmup=True):
        self.rate, self.warmup = float(rate), bool(warmup)
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [p.detach().clone().float() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model, updates):
        decay = ema_decay(self.rate, updates, self.warmup)
        current = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(self.params, current, 1 - decay)

    @torch.no_grad()
    def update_by(self, model, weight):
        """Move towards ``model`` by ``weight`` (``1 - decay``, a 0-dim device
        tensor): no host value, so a CUDA graph can hold the update."""
        current = [p.detach().float() for p in model.parameters()]
        step = torch._foreach_sub(current, self.params)
        torch._foreach_mul_(step, weight)
        torch._foreach_add_(self.params, step)

    def state_dict(self):
        return {name: p.cpu() for name, p in zip(self.names, self.params)}

    def load_state_dict(self, state):
        for name, p in zip(self.names, self.params):
            p.copy_(state[name])

    def copy_to(self, model):
        """A copy of ``model`` holding the averaged weights."""
        clone = copy.deepcopy(model)
        with torch.no_grad():
            for p, e in zip(clone.parameters(), self.params):
                p.copy_(e.to(p.dtype))
        return clone
