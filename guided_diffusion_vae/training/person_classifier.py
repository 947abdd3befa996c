"""The reference person classifier: the yardstick of every identity metric.

A small CNN for spectrograms (Doppler along the rows, time along the
columns). Three conv blocks halve the image three times; the features are then
averaged over time, so the classifier reads the Doppler profile of a walk
wherever in the record a step falls, and a linear layer maps them to an
embedding (the feature space of the Frechet distance and of precision and
recall) before the class logits.

Images enter as uint8 ``(N, C, H, W)`` arrays or tensors and are mapped to
[-1, 1] here, so real, reconstructed and generated images go through exactly
the same path. Saved classifiers are safetensors files whose metadata holds
the class names, image geometry and how the classifier was trained.
"""

import json
import math
import os

import numpy as np
import torch
from torch import nn

from ..runtime.errors import UserError
from ..runtime.files import atomic_write_safetensors

META_KEY = "guided_diffusion_vae_classifier"


class SpectrogramCNN(nn.Module):
    """Conv(3x3)-BN-ReLU-MaxPool x3, mean over time, embedding, logits.

    :param num_classes: number of people.
    :param image_size: side of the square input (a multiple of 8).
    :param in_channels: 1 (grayscale) or 3.
    :param width: channels of the first block (x2, x4 in the next ones).
    :param embed_dim: size of the embedding returned by :meth:`features`.
    """

    def __init__(self, num_classes, image_size, in_channels=1, width=16, embed_dim=128):
        super().__init__()
        if image_size % 8:
            raise UserError(f"the reference classifier needs an image size divisible by 8, got {image_size}")

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True), nn.MaxPool2d(2))

        self.blocks = nn.Sequential(block(in_channels, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.embed = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * width * (image_size // 8), embed_dim))
        # The embedding is taken before the ReLU: no dead coordinates, so its
        # covariance (Frechet distance) stays full rank.
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(embed_dim, num_classes))

    def features(self, x):
        """``x`` float ``(N, C, H, W)`` in [-1, 1] -> embedding ``(N, embed_dim)``."""
        return self.embed(self.blocks(x).mean(dim=3))

    def forward(self, x):
        return self.head(self.features(x))


def to_input(images_uint8, device):
    """uint8 ``(N, C, H, W)`` (numpy or tensor) -> float32 in [-1, 1] on ``device``."""
    x = torch.as_tensor(images_uint8)
    return x.to(device).float().div_(127.5).sub_(1.0)


def match_channels(x, channels):
    """Float images ``(N, C, H, W)`` with ``channels`` channels: colour to gray by
    ITU-R 601 luma (as PIL's "L"), gray to colour by repetition."""
    if x.shape[1] == 3 and channels == 1:
        return 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]
    if x.shape[1] == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    return x


def to_uint8(x):
    """Float images in [-1, 1] -> uint8 numpy (the inverse of :func:`to_input`)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


# Time shifts of the augmentation: up to this share of the image width.
MAX_TIME_SHIFT = 0.125


def _shifted_in_time(x, shifts):
    """Each image ``x[i]`` shifted along time (columns) by ``shifts[i]``
    columns, padded with the edge column: a record may start at any moment of
    a walk, so identity must not depend on where the steps fall."""
    w = x.shape[3]
    cols = torch.arange(w, device=x.device)[None, :] - shifts[:, None]  # (N, W) source column of each column
    cols = cols.clamp_(0, w - 1)
    return torch.gather(x, 3, cols[:, None, None, :].expand(-1, x.shape[1], x.shape[2], -1))


def _batch_draws(count, batch_size, steps, width, generator, augment):
    """``(indices, shifts)``: the examples ``(steps, batch_size)`` of every
    step, each pass over the ``count`` examples in a new random order, and
    their time shifts ``(steps, batch_size)`` (None without ``augment``),
    drawn from ``generator`` in the order a step-by-step loop would draw them.
    Drawn before the first step, so that the loop never copies from the host:
    a copy to the GPU waits for the GPU, which would end every step."""
    limit = max(1, int(width * MAX_TIME_SHIFT))
    order, pos = torch.randperm(count, generator=generator), 0
    indices, shifts = [], []
    for _ in range(steps):
        if pos + batch_size > count:
            order, pos = torch.randperm(count, generator=generator), 0
        indices.append(order[pos:pos + batch_size])
        pos += batch_size
        if augment:
            shifts.append(torch.randint(-limit, limit + 1, (batch_size,), generator=generator))
    return torch.stack(indices), torch.stack(shifts) if augment else None


def classifier_defaults():
    """How the reference (and every comparison) classifier is trained."""
    return {"classifier_steps": 1500, "classifier_batch_size": 64, "classifier_lr": 2e-3,
            "classifier_width": 16, "classifier_embed_dim": 128}


FLAG_HELP = {
    "classifier_steps": "optimizer steps of every classifier trained (reference, TSTR, augmentation)",
    "classifier_batch_size": "classifier training batch size",
    "classifier_lr": "classifier peak learning rate (one-cycle schedule, AdamW)",
    "classifier_width": "channels of the classifier's first conv block (x2, x4 after)",
    "classifier_embed_dim": "size of the classifier embedding used for the Frechet distance and precision/recall",
}


def train_classifier(images, labels, num_classes, *, device, steps=1500, batch_size=64, lr=2e-3, width=16,
                     embed_dim=128, seed=0, augment=True, log=None):
    """Train a :class:`SpectrogramCNN` on uint8 ``images (N, C, S, S)`` and int
    ``labels (N,)`` for a fixed number of optimizer steps (so small and large
    training sets get the same effort); returns the model in eval mode.

    AdamW with a one-cycle learning rate; time-shift augmentation; all the
    randomness comes from ``seed``.
    """
    images = torch.as_tensor(images)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if images.ndim != 4 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise UserError(f"classifier training needs images (N, C, S, S) with N labels, got {tuple(images.shape)}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SpectrogramCNN(num_classes, images.shape[-1], images.shape[1], width, embed_dim).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    data = to_input(images, device)
    targets = labels.to(device)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    batch_size = min(batch_size, len(data))
    model.train()
    indices, shifts = _batch_draws(len(data), batch_size, steps, data.shape[3], gen, augment)
    indices = indices.to(device)
    shifts = shifts.to(device) if augment else None
    for step in range(steps):
        idx = indices[step]
        x = data[idx]
        if augment:
            x = _shifted_in_time(x, shifts[step])
        loss = loss_fn(model(x), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step + 1) % max(1, steps // 4) == 0:
            log(f"    classifier step {step + 1}/{steps}: loss {float(loss):.3f}")
    return model.eval()


@torch.no_grad()
def predict(model, images, device, batch_size=256):
    """Predicted class of each uint8 image ``(N, C, S, S)``: int64 numpy ``(N,)``."""
    out = [model(to_input(images[i:i + batch_size], device)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0,), dtype=np.int64)


@torch.no_grad()
def embed(model, images, device, batch_size=256):
    """Embedding of each uint8 image: float64 numpy ``(N, embed_dim)``."""
    out = [model.features(to_input(images[i:i + batch_size], device)).double().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.embed[2].out_features))


def save_classifier(path, model, info):
    """Write ``model`` and ``info`` (class names, image size, channels, how it
    was trained) as one safetensors file, atomically."""
    arch = {"num_classes": model.head[2].out_features, "image_size": int(info["image_size"]),
            "in_channels": model.blocks[0][0].in_channels, "width": model.blocks[0][0].out_channels,
            "embed_dim": model.embed[2].out_features}
    meta = {META_KEY: json.dumps({"arch": arch, **info})}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_safetensors(path, state, meta)
    return path


def load_classifier(path, device):
    """``(model, info)`` from a file written by :func:`save_classifier`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise UserError(f"classifier file not found: {path}")
    try:
        with safe_open(path, "pt") as f:
            meta = (f.metadata() or {}).get(META_KEY)
        state = load_file(path)
    except Exception as err:  # safetensors raises its own error types
        raise UserError(f"{path} is not a readable safetensors file: {err}") from None
    if meta is None:
        raise UserError(f"{path} is not a reference classifier written by evaluate.py (no '{META_KEY}' metadata)")
    info = json.loads(meta)
    arch = info.pop("arch")
    model = SpectrogramCNN(**arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not fit the stored architecture: {str(err).splitlines()[0]}") from None
    info["image_size"] = arch["image_size"]
    info["in_channels"] = arch["in_channels"]
    return model.to(device).eval(), info


def accuracy(pred, labels):
    """Share of ``pred == labels``; NaN for empty inputs."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    return float((pred == labels).mean()) if len(labels) else math.nan


def reconstruction_identity(train_images, train_labels, heldout_images, heldout_labels, reconstructions,
                            num_classes, *, device, steps=1500, seed=0):
    """TRTR and rCAS: a reference classifier trained on ``train_images`` scores
    the real held-out images and their reconstructions (all uint8 ``(N, C, S, S)``).
    rCAS far below TRTR means the autoencoder erases who is walking."""
    model = train_classifier(train_images, train_labels, num_classes, device=device, steps=steps, seed=seed)
    heldout_labels = np.asarray(heldout_labels)
    return {"trtr": accuracy(predict(model, heldout_images, device), heldout_labels),
            "rcas": accuracy(predict(model, reconstructions, device), heldout_labels),
            "num_classes": int(num_classes), "num_heldout": int(len(heldout_labels))}
