"""Training the AutoencoderKL that maps spectrograms to diffusion latents.

``train_vae(config)`` (flags: ``vae_train_defaults()``) trains a diffusers
``AutoencoderKL`` on an image folder and exports it, atomically, as a diffusers
directory ``output_dir`` that ``VAEInterface`` (and ``from_pretrained``) loads:

    config.json, diffusion_pytorch_model.safetensors   the EMA weights
    latent_stats.json    latent_scale = 1/std of the training latents
                         (posterior mean), with the model's fingerprint
    metrics.json         held-out reconstruction PSNR / SSIM / L1
    reconstructions.png  held-out images (top row) and reconstructions (bottom)

Training state (resume) and logs live in ``checkpoint_dir`` (default
``<output_dir>_train``): ``vae_state_NNNNNN.pt`` holds model, EMA, optimizer,
step, data position and RNG state; a rerun continues from the newest one.

Objective, per image, in the LDM weighting divided by the pixel count D:

    loss = mean|x - x_rec| + kl_weight * KL(q(z|x) || N(0, I)) / D
           [+ ssim_weight * (1 - SSIM(x, x_rec))]

so ``kl_weight`` means what it means in LDM's configs (1e-6 there), while the
reconstruction term stays at per-pixel scale. No perceptual or adversarial
terms (no pretrained networks are available, and none are needed for a
latent that only has to be reconstructable). The SSIM term is off by default:
on synthetic 64px spectrograms (base, 2000 steps, batch 64) weight 0.2 raised
held-out SSIM from 0.859 to 0.873 at equal PSNR (28.5 dB) and L1 -- a small
gain, on the metric it optimises, from one seed; try it on real data.

Architecture presets (``vae_size``), each with 3 down blocks = 4x downsampling:
    tiny   block_out_channels (16, 32, 64),   1 layer/block, 8 groups   (~0.7M params)
    small  (32, 64, 128),  1 layer/block, 16 groups  (~2.7M)
    base   (64, 128, 256), 2 layers/block, 32 groups (~14M)
"""

import contextlib
import dataclasses
import hashlib
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..runtime import dist_util, logger
from ..data.batching import BatchStream, ShardedBatchSampler
from ..runtime.cuda_graphs import ReplayedStep, graphs_usable
from .ema import EMA, ema_decay
from ..runtime.errors import UserError, check_number, shown
from ..runtime.files import atomic_write_json, check_outside, check_writable_target, folder_written_whole, lock_folder, undone_on_failure
from ..data.array_datasets import ArrayFolderDataset, data_folder_defaults, parse_db_range
from ..data.image_datasets import ImageDataset, data_files, detect_channels, pixel_batches
from ..data.labels import class_names_from_paths
from ..runtime.images import image_grid, to_uint8_images
from .train_util import PRECISIONS, check_output_dir, resolve_precision
from .training_parts import (
    autocast, compile_module, load_latest_state, save_state, settings_text, state_files, train_until,
    wrap_for_processes,
)
from ..latent.vae_wrapper import LATENT_STATS_FILE, latent_shape_of, scale_from_moments, vae_fingerprint
from .person_classifier import reconstruction_identity, to_uint8
from ..runtime.progress import progress as progress_bar

PRESETS = {
    "tiny": {"block_out_channels": (16, 32, 64), "layers_per_block": 1, "norm_num_groups": 8},
    "small": {"block_out_channels": (32, 64, 128), "layers_per_block": 1, "norm_num_groups": 16},
    "base": {"block_out_channels": (64, 128, 256), "layers_per_block": 2, "norm_num_groups": 32},
}
METRICS_FILE = "metrics.json"
GPU_IMAGE_BYTES = 4 << 30  # training images up to this size live on the GPU
GRID_FILE = "reconstructions.png"
# Settings a resumed run must share with the run that wrote the state.
_RESUME_KEYS = ("image_size", "vae_size", "latent_channels", "block_out_channels", "layers_per_block",
                "norm_num_groups", "in_channels", "batch_size", "holdout_fraction", "seed")


def vae_train_defaults():
    """Flags of ``scripts/vae_train.py``."""
    return {
        "data_dir": "",
        "output_dir": "",
        "checkpoint_dir": "",
        "image_size": 64,
        "channels": 0,
        "vae_size": "base",
        "latent_channels": 4,
        "block_out_channels": "",
        "layers_per_block": 0,
        "norm_num_groups": 0,
        "batch_size": 32,
        "lr": 1e-4,
        "weight_decay": 0.0,
        "lr_anneal_steps": 20000,
        "kl_weight": 1e-6,
        "ssim_weight": 0.0,
        "ema_rate": 0.999,
        "grad_clip": 1.0,
        "random_flip": True,
        "holdout_fraction": 0.05,
        "max_eval_images": 256,
        "compile": False,
        "cuda_graph": True,
        "scale_images": 2048,
        "identity_steps": 1500,
        "log_interval": 100,
        "save_interval": 2000,
        "keep_states": 2,
        "resume": True,
        "precision": "auto",
        "num_workers": 2,
        "seed": 0,
        "progress": True,
        # how class labels (the identity check) are read, how .npy/.npz values map to [-1, 1]
        **data_folder_defaults(),
        **dist_util.threads_defaults(),
    }


FLAG_HELP = {
    "data_dir": "folder of training images (one sub-folder per person also checks that reconstructions keep "
                "the person, rCAS)",
    "output_dir": "the exported VAE: a diffusers folder with latent_stats.json, metrics.json and "
                  "reconstructions.png",
    "checkpoint_dir": "training state and logs ('' = OUTPUT_DIR_train); a rerun resumes from there",
    "image_size": "images are resized and centre-cropped to this square side in pixels",
    "channels": "image channels, 1 or 3 (0: 1 when every sampled image is gray, else 3)",
    "vae_size": "architecture preset; every preset downsamples 4x",
    "latent_channels": "channels of the latents (the diffusion model's input)",
    "block_out_channels": "comma-separated channels per level, e.g. 64,128,256, instead of the preset's "
                          "(each level after the first halves the size)",
    "layers_per_block": "residual layers per level (0: the preset's)",
    "norm_num_groups": "GroupNorm groups (0: the preset's)",
    "batch_size": "images per optimizer step on each process",
    "lr": "AdamW peak learning rate",
    "weight_decay": "AdamW weight decay",
    "lr_anneal_steps": "training steps; the learning rate falls linearly to 0 over them",
    "kl_weight": "weight of the KL term (per pixel, as in LDM's configs)",
    "ssim_weight": "weight of a 1 - SSIM reconstruction term (0: none)",
    "ema_rate": "rate of the weight average that is exported",
    "grad_clip": "clip the gradient norm to this value (0: no clipping)",
    "random_flip": "mirror training images left-right at random (set False for spectrograms: a time-reversed "
                   "walk is not a walk)",
    "holdout_fraction": "share of the images held out for the reconstruction metrics",
    "max_eval_images": "held-out images evaluated at most",
    "compile": "torch.compile the VAE's training forward pass: faster steps after a slow first one (its cache "
               "is kept across runs), worth it on a GPU",
    "cuda_graph": "on one CUDA GPU, capture the training step once and replay it: the small VAE's step is "
                  "otherwise bound by Python launching ~1,200 kernels (ignored with several processes)",
    "scale_images": "training images encoded to measure the latent scale",
    "identity_steps": "steps of the person classifier that checks reconstructions keep identity (rCAS; 0: skip; "
                      "needs one sub-folder per person)",
    "log_interval": "steps between log lines and progress.csv rows",
    "save_interval": "steps between resume states",
    "keep_states": "resume states kept (older ones are deleted)",
    "resume": "continue from the newest state in --checkpoint_dir",
    "precision": "arithmetic of the training step: auto is bf16 autocast on GPUs that support it, else fp32",
    "num_workers": "image-loading processes (0: load in the training process)",
    "seed": "seed of the weights, the batches, the posterior noise and the flips",
    "progress": "show progress (a bar on a terminal, a line every 30 s in a log)",
}
FLAG_CHOICES = {"vae_size": tuple(PRESETS), "precision": PRECISIONS}


# --------------------------------------------------------------------------- #
# configuration checks and the model
# --------------------------------------------------------------------------- #


def resolve_architecture(config, in_channels):
    """``AutoencoderKL`` keyword arguments for ``config`` (UserError on bad values)."""
    size = config["vae_size"]
    if size not in PRESETS:
        raise UserError(f"vae_size must be one of {', '.join(PRESETS)}, got {shown(size)}")
    arch = dict(PRESETS[size])
    text = str(config.get("block_out_channels") or "").strip()
    if text:
        try:
            arch["block_out_channels"] = tuple(int(c) for c in text.split(","))
        except ValueError:
            raise UserError(f"block_out_channels must be comma-separated integers, got {shown(text)}") from None
    for key in ("layers_per_block", "norm_num_groups"):
        if int(config.get(key) or 0) > 0:
            arch[key] = int(config[key])
    groups = arch["norm_num_groups"]
    bad = [c for c in arch["block_out_channels"] if c < 1 or c % groups]
    if bad:
        raise UserError(
            f"block_out_channels {arch['block_out_channels']} must be multiples of norm_num_groups {groups}"
        )
    if int(config["latent_channels"]) < 1:
        raise UserError(f"latent_channels must be >= 1, got {config['latent_channels']}")
    levels = len(arch["block_out_channels"])
    factor = 2 ** (levels - 1)
    if config["image_size"] % factor:
        raise UserError(
            f"image size {config['image_size']} is not divisible by the VAE's downsampling factor {factor}"
        )
    return {
        "in_channels": int(in_channels),
        "out_channels": int(in_channels),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(arch["block_out_channels"]),
        "layers_per_block": arch["layers_per_block"],
        "norm_num_groups": groups,
        "latent_channels": int(config["latent_channels"]),
        "sample_size": int(config["image_size"]),
    }


def build_autoencoder(arch):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**arch)


# (minimum, integer, exclusive) of every numeric flag
VAE_LIMITS = {
    "image_size": (1, True, False), "latent_channels": (1, True, False), "layers_per_block": (0, True, False),
    "norm_num_groups": (0, True, False), "batch_size": (1, True, False), "lr": (0.0, False, True),
    "weight_decay": (0.0, False, False), "lr_anneal_steps": (1, True, False), "kl_weight": (0.0, False, False),
    "ssim_weight": (0.0, False, False), "ema_rate": (0.0, False, True), "grad_clip": (0.0, False, False),
    "holdout_fraction": (0.0, False, False), "max_eval_images": (1, True, False), "scale_images": (1, True, False),
    "identity_steps": (0, True, False), "log_interval": (1, True, False), "save_interval": (1, True, False),
    "keep_states": (1, True, False), "num_workers": (0, True, False), "seed": (0, True, False),
}


def _check_config(config):
    """Every setting refused before any work, with one line naming it."""
    if not config["data_dir"]:
        raise UserError("data_dir is required: a folder of training images")
    if not config["output_dir"]:
        raise UserError("output_dir is required: where the trained VAE is saved")
    for key, (minimum, integer, exclusive) in VAE_LIMITS.items():
        check_number(key, config[key], minimum, integer=integer, exclusive=exclusive)
    if not config["ema_rate"] < 1.0:
        raise UserError(f"ema_rate must lie strictly between 0 and 1, got {config['ema_rate']}")
    if not config["holdout_fraction"] < 1.0:
        raise UserError(f"holdout_fraction must lie in [0, 1), got {config['holdout_fraction']}")
    if config["channels"] not in (0, 1, 3):
        raise UserError(f"channels must be 0 (auto), 1 or 3, got {config['channels']}")
    parse_db_range(config["db_range"])
    check_outside(config["output_dir"], "output_dir", config["data_dir"], "data_dir")
    check_outside(*_checkpoint_dir(config), config["data_dir"], "data_dir")
    check_writable_target(config["output_dir"], "output_dir")
    check_writable_target(*_checkpoint_dir(config))


# --------------------------------------------------------------------------- #
# data
# --------------------------------------------------------------------------- #


def split_holdout(paths, data_dir, fraction):
    """``(train, heldout)`` path lists: a fixed fraction chosen by a hash of the
    relative path, so the split does not depend on order, seed or rank."""
    if fraction <= 0 or len(paths) < 2:
        return list(paths), []
    count = min(len(paths) - 1, max(1, round(fraction * len(paths))))

    def key(path):
        return hashlib.sha1(os.path.relpath(path, data_dir).encode()).hexdigest()

    heldout = set(sorted(paths, key=key)[:count])
    return [p for p in paths if p not in heldout], [p for p in paths if p in heldout]


def load_images(paths, image_size, channels, num_workers=0, desc="loading images", progress=False):
    """All of ``paths`` as one uint8 tensor ``(N, channels, S, S)`` (decoded once)."""
    if not paths:
        return torch.zeros((0, channels, image_size, image_size), dtype=torch.uint8)
    dataset = ImageDataset(image_size, paths, channels=channels, random_flip=False, random_crop=False)
    batches = pixel_batches(dataset, batch_size=64, num_workers=num_workers)
    # back to uint8: the pixels were uint8 / 127.5 - 1, so this is exact
    parts = [torch.round((batch + 1.0) * 127.5).to(torch.uint8)
             for batch in progress_bar(batches, total=math.ceil(len(paths) / 64), desc=desc, disable=not progress,
                                       leave=False)]
    return torch.cat(parts)


def to_model_range(images, device):
    """Training images ``(N, C, S, S)`` -> float32 in [-1, 1] on ``device``:
    uint8 (image folders) or float16 already in [-1, 1] (arrays, whose values
    8 bits would coarsen)."""
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        return images.float().div_(127.5).sub_(1.0)
    return images.float()


def as_uint8(images):
    """Training images as uint8 ``(N, C, S, S)`` (what the reference classifier reads)."""
    return images if images.dtype == torch.uint8 else torch.from_numpy(to_uint8(images.float()))


# --------------------------------------------------------------------------- #
# image quality
# --------------------------------------------------------------------------- #


def _gaussian_window(size, sigma, channels, device):
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x, y, data_range=2.0, window_size=11, sigma=1.5):
    """Per-image SSIM of ``x`` and ``y`` ``(N, C, H, W)`` (Wang et al. 2004).

    Gaussian-weighted local statistics (11x11, sigma 1.5, 'valid' region),
    constants K1 = 0.01, K2 = 0.03 of ``data_range`` (2 for [-1, 1]); the map is
    averaged over channels and positions. Windows shrink for images under 11 px.
    :return: ``(N,)`` float32, 1 for identical images.
    """
    x, y = x.float(), y.float()
    size = min(window_size, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2  # odd
    window = _gaussian_window(size, sigma, x.shape[1], x.device)

    def blur(t):
        return F.conv2d(t, window, groups=x.shape[1])

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))


def psnr(x, y, data_range=2.0):
    """Per-image PSNR in dB of ``x`` and ``y`` ``(N, C, H, W)`` (``data_range`` 2 for [-1, 1])."""
    mse = (x.float() - y.float()).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return 10 * torch.log10(data_range**2 / mse)


# --------------------------------------------------------------------------- #
# the objective
# --------------------------------------------------------------------------- #


class AutoencoderObjective(torch.nn.Module):
    """Encode, sample the posterior with the given noise, decode (one module, so
    DistributedDataParallel sees every parameter in one forward).

    ``forward(x, noise)``: ``x`` ``(N, C, S, S)`` in [-1, 1], ``noise`` standard
    normal ``(N, latent_channels, S/f, S/f)``; returns ``(reconstruction,
    kl per image (N,))``.
    """

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, noise):
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)
        reconstruction = self.vae.decode(z).sample
        mean, logvar = posterior.mean.float(), posterior.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))
        return reconstruction, kl


def vae_loss(x, reconstruction, kl, kl_weight, ssim_weight):
    """Total loss and its parts (see the module docstring); all 0-dim tensors."""
    reconstruction = reconstruction.float()
    pixels = x[0].numel()
    parts = {"rec_l1": (x - reconstruction).abs().mean(), "kl": kl.mean()}
    loss = parts["rec_l1"] + kl_weight * parts["kl"] / pixels
    if ssim_weight > 0:
        parts["ssim_loss"] = 1 - ssim(x, reconstruction).mean()
        loss = loss + ssim_weight * parts["ssim_loss"]
    parts["loss"] = loss
    return loss, parts


# --------------------------------------------------------------------------- #
# evaluation, latent scale, export
# --------------------------------------------------------------------------- #


@torch.no_grad()
def reconstruct(vae, images, device, batch_size=64):
    """Posterior-mean reconstructions (float32) of images in [-1, 1], clamped, on CPU."""
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device)
        out.append(vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def evaluate(vae, images_uint8, device, batch_size=64):
    """Reconstruction quality of ``images_uint8`` (in float32): mean PSNR (dB,
    on the [-1, 1] range, i.e. the same as on [0, 1]), SSIM and L1, plus the
    reconstructions ``(N, C, S, S)`` in [-1, 1]."""
    real = to_model_range(images_uint8, torch.device("cpu"))
    recon = reconstruct(vae, real, device, batch_size)
    return {
        "psnr": float(psnr(real, recon).mean()),
        "ssim": float(ssim(real, recon).mean()),
        "l1": float((real - recon).abs().mean()),
        "num_images": int(real.shape[0]),
    }, recon


@torch.no_grad()
def measure_latent_stats(vae, images_uint8, device, batch_size=64):
    """Mean, std and ``latent_scale = 1/std`` of the posterior-mean latents (all values)."""
    total = total_sq = 0.0
    count = 0
    for start in range(0, images_uint8.shape[0], batch_size):
        x = to_model_range(images_uint8[start:start + batch_size], device)
        z = vae.encode(x).latent_dist.mean.double()
        total += z.sum().item()
        total_sq += z.pow(2).sum().item()
        count += z.numel()
    scale = scale_from_moments(total, total_sq, count)
    return {"latent_scale": scale, "raw_std": 1.0 / scale, "raw_mean": total / count,
            "num_images": int(images_uint8.shape[0])}


def comparison_grid(real, recon, min_tile=64):
    """uint8 HWC image: ``real`` on the top row, ``recon`` below (both [-1, 1] NCHW)."""
    n = real.shape[0]
    pair = torch.cat([real, recon])  # (2n, C, S, S)
    scale = max(1, math.ceil(min_tile / real.shape[-1]))
    if scale > 1:
        pair = F.interpolate(pair, scale_factor=scale, mode="nearest")
    grid = image_grid(to_uint8_images(pair), columns=n)
    return grid[:, :, 0] if grid.shape[-1] == 1 else grid


def _save_png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


def export_vae(vae, output_dir, *, stats, metrics, grid):
    """Write ``output_dir`` as a whole: save into a temporary sibling folder,
    then rename it into place (an old export is swapped out, then removed)."""
    with folder_written_whole(output_dir) as tmp:
        # The config then carries our measured scale, for other diffusers users;
        # our own code never reads scaling_factor (see vae_wrapper).
        vae.register_to_config(scaling_factor=float(stats["latent_scale"]))
        vae.save_pretrained(tmp, safe_serialization=True)
        stats = dict(stats, fingerprint=vae_fingerprint(tmp), input_range="-1,1", sample_posterior=False)
        metrics = dict(metrics, fingerprint=stats["fingerprint"])
        for name, obj in ((LATENT_STATS_FILE, stats), (METRICS_FILE, metrics)):
            atomic_write_json(os.path.join(tmp, name), obj)
        _save_png(os.path.join(tmp, GRID_FILE), grid)
        umask = os.umask(0)
        os.umask(umask)
        for name in os.listdir(tmp):
            # Temporary-file writers create 0600 files; a model folder is for sharing.
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
    return stats, metrics


# --------------------------------------------------------------------------- #
# training state
# --------------------------------------------------------------------------- #


def _resume_settings(config, arch, db_range=None):
    settings = {key: config.get(key) for key in _RESUME_KEYS}
    settings.update(block_out_channels=list(arch["block_out_channels"]), layers_per_block=arch["layers_per_block"],
                    norm_num_groups=arch["norm_num_groups"], in_channels=arch["in_channels"])
    if db_range is not None:  # array data: a state made with another mapping saw other values
        settings["db_range"] = list(db_range)
    return settings


# --------------------------------------------------------------------------- #
# the run
# --------------------------------------------------------------------------- #


def _step_generator(seed, rank, step, device):
    """Posterior noise and flips of a step: a pure function of (seed, rank, step),
    so a resumed run draws exactly what the uninterrupted one would have."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + rank * 10_007 + step) % (2**63))
    return gen


def train_vae(config):
    """Train (or resume), evaluate and export; returns the final metrics dict."""
    config = dict(vae_train_defaults(), **config)
    _check_config(config)
    dist_util.setup_dist()
    rank, world, device = dist_util.rank(), dist_util.world_size(), dist_util.dev()
    dist_util.set_threads(config["threads"], logger.log)  # before the log folder exists
    checkpoint_dir, named = _checkpoint_dir(config)
    with contextlib.ExitStack() as logging:
        # A start that fails (bad data, a state made with other settings)
        # leaves nothing new in checkpoint_dir, not even the log.
        with undone_on_failure(checkpoint_dir if rank == 0 else None, before_undo=logging.close):
            check_output_dir(checkpoint_dir, named)
            if rank == 0:
                lock_folder(checkpoint_dir, named)
            logging.enter_context(logger.scoped_configure(checkpoint_dir, format_strs=None if rank == 0 else ""))
            data, vae, run = _start(config, checkpoint_dir, rank, world, device)
        if not run.train():
            return None  # stopped by a signal: saved, nothing exported; a rerun resumes
        labels = _class_labels(config, data, data.local_paths, data.heldout_paths[: config["max_eval_images"]])
        return _finish(config, vae, run.ema, data.images, data.heldout, run.step, rank, device, labels,
                       data.db_range)


def _checkpoint_dir(config):
    """``(folder, flag naming it)``: where training state and logs go."""
    if config["checkpoint_dir"]:
        return config["checkpoint_dir"], "checkpoint_dir"
    return os.path.abspath(config["output_dir"]).rstrip("/") + "_train", "checkpoint_dir (output_dir + _train)"


def _start(config, checkpoint_dir, rank, world, device):
    """The VAE training run up to its first step: data, model, resume."""
    data = _training_data(config, rank, world, device)
    torch.manual_seed(config["seed"])
    vae = build_autoencoder(data.arch).to(device)
    # Measured on an H100 (base, 64px, batch 64): bf16 autocast + cuDNN
    # autotuning in NCHW 36 ms/step; NHWC (channels_last) 49-53 ms (slow
    # GroupNorm); fp32 44 ms. So: NCHW, autotuned.
    dist_util.autotune_convolutions(device)
    run = _VAERun(config, data, vae, checkpoint_dir, rank, world, device)
    run.resume()
    return data, vae, run


@dataclasses.dataclass
class _VAEData:
    """This rank's training images (uint8, or float16 for arrays, in memory)
    and rank 0's held-out ones. ``files``: the file of each entry of ``paths``
    (its label source); ``db_range``: the dB range of array data (else None)."""

    paths: list
    local_paths: list
    heldout_paths: list
    arch: dict
    images: torch.Tensor
    batch_source: torch.Tensor
    stream: BatchStream
    heldout: object
    files: list
    db_range: object = None


def _open_data(config):
    """``(entries, file of each, channels, loader of entries, db_range)`` of
    the data folder: image files, or the spectrograms of ``.npy``/``.npz`` files
    (read, checked and mapped to [-1, 1] now; see array_datasets)."""
    kind, files = data_files(config["data_dir"])
    if kind == "images":
        if parse_db_range(config["db_range"]) != "auto":
            raise UserError(f"db_range applies to .npy/.npz data; {config['data_dir']} holds images")
        channels = config["channels"] or detect_channels(files)

        def load(paths, **kw):
            return load_images(paths, config["image_size"], channels, **kw)

        return files, files, channels, load, None
    arrays = ArrayFolderDataset(config["data_dir"], files, config["image_size"],
                                db_range="measure" if parse_db_range(config["db_range"]) == "auto"
                                else parse_db_range(config["db_range"]), channels=config["channels"] or 1)
    logger.log(arrays.describe())
    position = {name: i for i, name in enumerate(arrays.all_paths)}

    def load(paths, **_):
        return torch.from_numpy(arrays.pixels([position[p] for p in paths])).to(torch.float16)

    return arrays.all_paths, arrays.files, arrays.channels, load, arrays.db_range


def _training_data(config, rank, world, device):
    paths, files, channels, load, db_range = _open_data(config)
    arch = resolve_architecture(config, channels)
    train_paths, heldout_paths = split_holdout(paths, config["data_dir"], config["holdout_fraction"])
    logger.log(
        f"VAE training: {len(train_paths)} training / {len(heldout_paths)} held-out images from "
        f"{config['data_dir']}, {channels} channel(s), {config['image_size']}px; AutoencoderKL with blocks "
        f"{','.join(str(c) for c in arch['block_out_channels'])}, {arch['layers_per_block']} layer(s) per block, "
        f"{arch['latent_channels']} latent channels"
    )
    local_paths = train_paths[rank::world]
    images = load(local_paths, num_workers=config["num_workers"], desc="loading images",
                  progress=config["progress"] and rank == 0)
    # Batches are gathered where the images are: on the GPU when they fit
    # (no host work per step), else from pinned host memory.
    batch_source = images
    if device.type == "cuda":
        batch_source = images.to(device) if images.numel() <= GPU_IMAGE_BYTES else images.pin_memory()
    try:
        sampler = ShardedBatchSampler(len(images), config["batch_size"], shuffle=True,
                                      seed=config["seed"] * 1000 + rank)
    except ValueError:
        raise UserError(
            f"{config['data_dir']}: {len(images)} training image(s) per rank, fewer than "
            f"batch_size={config['batch_size']} (lower batch_size or holdout_fraction)"
        ) from None
    heldout = None  # rank 0 evaluates (EMA weights) on the held-out images
    if rank == 0 and heldout_paths:
        heldout = load(heldout_paths[: config["max_eval_images"]])
    return _VAEData(paths, local_paths, heldout_paths, arch, images, batch_source,
                    BatchStream(sampler, lambda s: iter(s)), heldout, files, db_range)


class _VAERun:
    """The optimisation state of one VAE training run and its steps."""

    def __init__(self, config, data, vae, checkpoint_dir, rank, world, device):
        self.config, self.data, self.vae = config, data, vae
        self.checkpoint_dir, self.rank, self.world, self.device = checkpoint_dir, rank, world, device
        self.precision = resolve_precision(config["precision"], device)
        self.objective = AutoencoderObjective(vae)
        # One CUDA graph per step where possible: measured on an H100 (small
        # VAE, batch 64), the GPU works 13 ms of a 36 ms eager step; the rest
        # is Python launching kernels. The graph reads lr, the EMA weight and
        # the batch from device tensors filled before each replay.
        self.graph_mode = bool(config["cuda_graph"]) and graphs_usable(device) and world == 1
        self.replayed = ReplayedStep(self._device_step) if self.graph_mode else None
        self.lr_tensor = torch.tensor(float(config["lr"]), device=device) if self.graph_mode else None
        self.ema_weight = torch.zeros((), device=device) if self.graph_mode else None
        self.opt = torch.optim.AdamW(vae.parameters(), lr=self.lr_tensor if self.graph_mode else config["lr"],
                                     weight_decay=config["weight_decay"], fused=device.type == "cuda",
                                     capturable=self.graph_mode)
        self.ema = EMA(vae, config["ema_rate"])
        self.settings = _resume_settings(config, data.arch, data.db_range)
        self.step = 0
        factor = 2 ** (len(data.arch["block_out_channels"]) - 1)
        self.noise_shape = (config["batch_size"], *latent_shape_of(
            {"latent_channels": data.arch["latent_channels"], "downsample_factor": factor}, config["image_size"]))
        # Non-finite losses are counted on the device and checked at log and
        # save times only: a check every step would stall the GPU queue.
        self.nonfinite = torch.zeros((), device=device)

    def resume(self):
        found = load_latest_state(self.checkpoint_dir, "vae", self.settings) if self.config["resume"] else None
        if found:
            state, path = found
            self.vae.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.opt.load_state_dict(state["optimizer"])
            if self.graph_mode:  # loading replaced the lr tensor the graph reads
                for group in self.opt.param_groups:
                    group["lr"] = self.lr_tensor
            # Only the position: each rank keeps its own shuffling seed.
            self.data.stream.load_state_dict(dict(state["data"], seed=self.data.stream.sampler.seed))
            torch.set_rng_state(state["torch_rng"])
            self.step = int(state["step"])
            logger.log(f"resumed from {path} at step {self.step}")
        dist_util.sync_params(self.vae.parameters())
        objective = compile_module(self.objective) if self.config["compile"] else self.objective
        self.model = wrap_for_processes(objective, self.device)

    def save(self):
        if self.rank == 0:
            save_state(self.checkpoint_dir, "vae", self.step, {
                "settings": settings_text(self.settings), "model": self.vae.state_dict(),
                "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "data": self.data.stream.state_dict(), "torch_rng": torch.get_rng_state(),
            }, keep=self.config["keep_states"])
        dist_util.barrier()

    def check_finite(self):
        bad = self.nonfinite.clone()
        if dist_util.is_distributed():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item() > 0:
            last = state_files(self.checkpoint_dir, "vae")
            raise UserError(
                f"VAE training diverged: non-finite loss by step {self.step} (rerun resumes from "
                f"{last[-1][1] if last else 'the start'}); lower lr or use --precision fp32"
            )

    def train_step(self):
        """One step: the batch, flips and posterior noise are drawn here (from
        a generator of this step), then the step runs eagerly, or replays its
        CUDA graph (``cuda_graph``: two eager warm-up steps, then a capture)."""
        config, device, total = self.config, self.device, self.config["lr_anneal_steps"]
        indices = torch.as_tensor(next(self.data.stream), device=self.data.batch_source.device)
        gen = _step_generator(config["seed"], self.rank, self.step, device)
        x = to_model_range(self.data.batch_source[indices], device)
        if config["random_flip"]:
            flip = torch.rand(x.shape[0], generator=gen, device=device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        noise = torch.randn(self.noise_shape, generator=gen, device=device)
        lr = config["lr"] * (1 - self.step / total)
        if not self.graph_mode:
            for group in self.opt.param_groups:
                group["lr"] = lr
            parts = self._device_step(x, noise)
        else:
            self.lr_tensor.fill_(lr)
            self.ema_weight.fill_(1 - ema_decay(self.ema.rate, self.step, self.ema.warmup))
            # The next replay overwrites the graph's outputs: the logger keeps copies.
            parts = {k: v.clone() for k, v in self.replayed(x, noise).items()}
        for key, value in parts.items():
            logger.logkv_mean(key, value.detach())
        self.step += 1

    def _device_step(self, x, noise):
        """Loss, backward, clipping, AdamW and EMA on device tensors only (no
        host reads, so it can be captured); returns the logged 0-dim parts."""
        config = self.config
        with autocast(self.precision, self.device, cache=not self.graph_mode):
            reconstruction, kl = self.model(x, noise)
        loss, parts = vae_loss(x, reconstruction, kl, config["kl_weight"], config["ssim_weight"])
        self.nonfinite += (~torch.isfinite(loss.detach())).float()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.vae.parameters(), config["grad_clip"] or float("inf"))
        self.opt.step()
        if self.graph_mode:
            self.ema.update_by(self.vae, self.ema_weight)
        else:
            self.ema.update(self.vae, self.step)
        return {"grad_norm": grad_norm.detach(), **{k: v.detach() for k, v in parts.items()}}

    def train(self):
        """Train to ``lr_anneal_steps``; False when a stop signal ended it early (saved)."""
        config, total = self.config, self.config["lr_anneal_steps"]
        self._bar = progress_bar(total=total, initial=min(self.step, total), desc="VAE training", unit="step",
                                 disable=not (config["progress"] and self.rank == 0))
        self._started, self._first = time.time(), self.step
        try:
            return train_until(self, total, config["log_interval"])
        finally:
            self._bar.close()

    def advance(self):
        """One step, then logging and saving at their intervals."""
        self.train_step()
        self._bar.update(1)
        self._log_and_save(self._bar, self._started, self._first)

    def save_now(self):
        """Saving at a stop (never a poisoned state), unless this step was just saved."""
        if self.step % self.config["save_interval"]:
            self.check_finite()
            self.save()

    def _log_and_save(self, bar, started, first):
        """Log at log steps; save (and check the held-out images) at save steps."""
        config, total = self.config, self.config["lr_anneal_steps"]
        if self.step % config["log_interval"] == 0 or self.step == total:
            self.check_finite()
            logger.logkv("step", self.step)
            logger.logkv("lr", config["lr"] * (1 - (self.step - 1) / total))
            logger.logkv("images_per_sec", (self.step - first) * config["batch_size"] * self.world
                         / (time.time() - started))
            row = logger.dumpkvs()
            if row and "loss" in row:
                bar.set_postfix(loss=f"{row['loss']:.4f}")
        if self.step % config["save_interval"] == 0 or self.step == total:
            self.check_finite()  # never save a poisoned state
            self.save()
            if self.step < total and self.data.heldout is not None:
                quick, _ = evaluate(self.ema.copy_to(self.vae).eval(), self.data.heldout, self.device)
                logger.log(f"step {self.step}: held-out PSNR {quick['psnr']:.2f} dB, "
                           f"SSIM {quick['ssim']:.4f} (EMA)")


def _class_labels(config, data, train_paths, heldout_paths):
    """``(train_labels, heldout_labels, num_classes)`` by ``label_source``
    (class sub-folders, file-name prefixes or ``labels_csv``), or None when
    the data have no classes or the identity check is off."""

    if not config["identity_steps"] or not heldout_paths:
        return None
    if config["image_size"] % 8:
        logger.log("identity check skipped: the reference classifier needs an image size divisible by 8")
        return None
    try:
        by_entry = dict(zip(data.paths, class_names_from_paths(data.files, config["data_dir"], config["label_source"],
                                                               config["labels_csv"])))
        names = sorted(set(by_entry.values()))
        index = {name: i for i, name in enumerate(names)}
        train = [index[by_entry[p]] for p in train_paths]
        heldout = [index[by_entry[p]] for p in heldout_paths]
    except UserError as err:
        logger.log(f"identity check skipped: no class labels ({err})")
        return None
    if len(names) < 2:
        logger.log("identity check skipped: the data hold one class")
        return None
    return np.asarray(train), np.asarray(heldout), len(names)


def _identity(config, train_images, heldout, recon, labels, device):
    """TRTR / rCAS of the exported VAE on its held-out images (evaluation.classifier)."""

    train_labels, heldout_labels, num_classes = labels
    recon_uint8 = to_uint8(recon)
    result = reconstruction_identity(as_uint8(train_images), train_labels, as_uint8(heldout), heldout_labels,
                                     recon_uint8, num_classes,
                                     device=device, steps=config["identity_steps"], seed=config["seed"])
    ratio = result["rcas"] / result["trtr"] if result["trtr"] else float("nan")
    logger.log(f"identity: a person classifier trained on the training images scores {result['trtr']:.3f} on the "
               f"{result['num_heldout']} held-out images (TRTR) and {result['rcas']:.3f} on their reconstructions "
               f"(rCAS, {ratio:.2f} x TRTR; chance {1 / num_classes:.3f})")
    if ratio < 0.9:
        logger.warn("the VAE loses identity: reconstructions are classified much worse than the originals; "
                    "train it longer, or with more latent channels, before training diffusion on it")
    return result


def _finish(config, vae, ema, train_images, heldout, step, rank, device, labels=None, db_range=None):
    """Rank 0: EMA weights -> held-out metrics, latent scale, grid, export
    (with the dB range of array data, which encoding must repeat)."""
    metrics = None
    if rank == 0:
        final = ema.copy_to(vae).eval().requires_grad_(False)
        if heldout is not None:
            eval_images, split = heldout, "heldout"
        else:
            eval_images, split = train_images[: config["max_eval_images"]], "train"
            logger.warn("no held-out images (holdout_fraction 0): the reported PSNR/SSIM are on training images")
        quality, recon = evaluate(final, eval_images, device)
        stats = measure_latent_stats(final, train_images[: config["scale_images"]], device)
        stats["step"] = step
        if db_range is not None:
            stats["db_range"] = [float(v) for v in db_range]
        shown = min(8, eval_images.shape[0])
        grid = comparison_grid(to_model_range(eval_images[:shown], torch.device("cpu")), recon[:shown])
        metrics = dict(quality, split=split, step=step, weights=f"ema_{config['ema_rate']}",
                       latent_scale=stats["latent_scale"])
        if labels is not None and split == "heldout":
            identity = _identity(config, train_images, eval_images, recon, labels, device)
            metrics.update(trtr=identity["trtr"], rcas=identity["rcas"])
        final = final.to("cpu")
        stats, metrics = export_vae(final, config["output_dir"], stats=stats, metrics=metrics, grid=grid)
        logger.logkvs({f"eval_{k}": v for k, v in quality.items()})
        logger.logkv("latent_scale", stats["latent_scale"])
        logger.dumpkvs()
        logger.log(
            f"saved VAE to {config['output_dir']}: {split} PSNR {quality['psnr']:.2f} dB, SSIM {quality['ssim']:.4f}, "
            f"L1 {quality['l1']:.4f} on {quality['num_images']} images; latent_scale {stats['latent_scale']:.5g}"
        )
        atomic_write_json(os.path.join(logger.get_dir(), METRICS_FILE), metrics)
    metrics = dist_util.broadcast_object(metrics)
    dist_util.barrier()
    return metrics
