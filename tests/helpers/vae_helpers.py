"""Small AutoencoderKL models and image folders for the VAE tests (CPU-fast)."""

import os
import pathlib

import numpy as np
import torch

TINY_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
)


def make_tiny_vae(path, in_channels=1, seed=0, **overrides):
    """Save a randomly initialised 3-level (4x downsampling) AutoencoderKL to ``path``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kwargs = dict(TINY_VAE, in_channels=in_channels, out_channels=in_channels)
    kwargs.update(overrides)
    model = AutoencoderKL(**kwargs)
    model.save_pretrained(str(path))
    return str(path)


def load_raw_vae(path):
    """The saved model straight from diffusers, for checks independent of our wrapper."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(path), local_files_only=True).eval()


def spectrogram_like(rng, size, channels):
    """A uint8 (size, size, channels) image with a few sinusoidal Doppler tracks."""
    t = np.linspace(0, 1, size)
    img = np.zeros((size, size), np.float32)
    for _ in range(3):
        freq, phase, amp = rng.uniform(1, 4), rng.uniform(0, 6.3), rng.uniform(0.1, 0.35)
        centre = size * (0.5 + amp * np.sin(2 * np.pi * freq * t + phase))
        rows = np.arange(size)[:, None]
        img += np.exp(-((rows - centre[None, :]) ** 2) / (2 * (size / 24) ** 2))
    img = img / img.max() + rng.normal(0, 0.05, img.shape)
    img = np.clip(img * 255, 0, 255).astype(np.uint8)
    return np.repeat(img[:, :, None], channels, axis=2)


def make_image_folder(root, *, classes=("user_01", "user_02"), per_class=6, size=16, channels=1, seed=0):
    """Write PNGs ``root/<class>/<class>_<i>.png``; returns the sorted file list."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for name in classes:
        folder = os.path.join(str(root), name)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            arr = spectrogram_like(rng, size, channels)
            mode = "L" if channels == 1 else "RGB"
            img = Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode=mode)
            path = os.path.join(folder, f"{name}_{i:03d}.png")
            img.save(path)
            paths.append(path)
    return sorted(paths)


def one_torch_thread():
    """Generator for an autouse fixture: tiny convolutions run far faster on one
    thread than on cores shared with other processes (and restore afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(REPO, "scripts")


def run_script(args, env=None, timeout=300):
    """Run a command from the repository root; fail the test with its output
    unless it exits 0. Returns stdout and stderr together."""
    import subprocess

    env = env or {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


def build_latent_chain(root, *, size, per_class, classes=("user_01", "user_02", "user_03")):
    """The real chain through the scripts: gray images of ``classes`` ->
    ``vae_train.py`` (tiny, 4 steps) -> ``encode_latents.py`` (stored scale, no
    flips). Writes ``root/images``, ``root/vae`` and ``root/cache``."""
    import sys

    root = str(root)
    images, vae, cache = (os.path.join(root, name) for name in ("images", "vae", "cache"))
    make_image_folder(images, classes=classes, per_class=per_class, size=size, channels=1)
    run_script([sys.executable, f"{SCRIPTS}/vae_train.py", "--data_dir", images, "--image_size", str(size),
                "--output_dir", vae, "--vae_size", "tiny", "--lr_anneal_steps", "4", "--batch_size", "4",
                "--num_workers", "0", "--progress", "False",
                "--identity_steps", "20"])
    run_script([sys.executable, f"{SCRIPTS}/encode_latents.py", "--data_dir", images, "--vae_path", vae,
                "--image_size", str(size), "--output_dir", cache, "--latent_scale", "stored",
                "--random_flip", "False", "--num_workers", "0", "--progress", "False"])
    return pathlib.Path(root)
