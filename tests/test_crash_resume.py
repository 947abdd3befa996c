"""Crash drills: a training run SIGKILLed 12 times at random moments and
resumed each time ends bit-identical to an uninterrupted run, from an image
folder (pixels, loader workers), from a latent cache, and from images
encoded on the fly by a VAE. After every kill the newest checkpoint loads
and at most one save interval of steps is lost. A latent cache build killed
while it encodes ends bit-identical too."""

import os
import random
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from guided_diffusion_vae.training import checkpoint as ckpt
from helpers.vae_helpers import REPO, SCRIPTS, build_latent_chain, make_image_folder

# 12 kills per drill (20 before): the four drills were half of the suite's 20 minutes.
KILLS = 12
STEPS = 100
SAVE_INTERVAL = 1
NET = ["--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2", "--attention_resolutions", "4",
       "--diffusion_steps", "40", "--batch_size", "4", "--lr_anneal_steps", str(STEPS), "--save_interval", str(SAVE_INTERVAL),
       "--log_interval", "1", "--tensorboard", "False", "--precision", "fp32", "--class_cond", "True",
       "--resume_checkpoint", "auto"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


def _run_to_end(cmd):
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]


def _crash_repeatedly(cmd, log_dir, seed):
    """Start ``cmd`` again and again, SIGKILL it at a random moment after
    training began, ``KILLS`` times; then let it finish."""
    rng = random.Random(seed)
    kills = 0
    while kills < KILLS:
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        started = False
        for line in proc.stdout:
            if line.startswith("| step") or "step " in line and "loss" in line:
                started = True
                break
        if not started:  # finished (or failed) before training output: nothing left to kill
            proc.wait(timeout=60)
            break
        time.sleep(rng.uniform(0.0, 0.2))  # anywhere in a step or a checkpoint write
        proc.kill()
        rest = proc.stdout.read()
        proc.wait(timeout=60)
        kills += 1
        reached = max([int(m) for m in re.findall(r"^step (\d+)", line + rest, flags=re.M)], default=0)
        newest = ckpt.latest_model_checkpoint(str(log_dir))
        if reached > SAVE_INTERVAL:
            # "step N" is logged before step N is saved: step N - 1 is on disk.
            assert newest is not None and ckpt.parse_step(newest) >= reached - SAVE_INTERVAL, (reached, newest)
        if newest is not None:
            ckpt.load_weights(newest)  # the newest checkpoint is whole
    _run_to_end(cmd)
    assert not [n for n in os.listdir(log_dir) if n.endswith(".tmp") and not n.startswith(".")]
    return kills


def _same_weights(a, b):
    wa, _ = ckpt.load_weights(a)
    wb, _ = ckpt.load_weights(b)
    return all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def pixel_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixels")
    make_image_folder(root, classes=("user_01", "user_02"), per_class=6, size=8, channels=3)
    return root


def _drill(base, tmp_path, seed):
    """Run ``base`` once whole and once crashed ``KILLS`` times; the final
    model and EMA weights must be equal."""
    _run_to_end([*base, "--log_dir", str(tmp_path / "whole")])
    kills = _crash_repeatedly([*base, "--log_dir", str(tmp_path / "crashed")], tmp_path / "crashed", seed=seed)
    assert kills == KILLS
    for name in (f"model{STEPS:06d}.safetensors", f"ema_0.9999_{STEPS:06d}.safetensors"):
        assert _same_weights(str(tmp_path / "whole" / name), str(tmp_path / "crashed" / name)), name


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return build_latent_chain(tmp_path_factory.mktemp("chain"), size=16, per_class=4, classes=("user_01", "user_02"))


def test_repeated_sigkills_from_an_image_folder_end_bit_identical(pixel_folder, tmp_path):
    _drill([sys.executable, f"{SCRIPTS}/image_train.py", "--data_dir", str(pixel_folder), "--image_size", "8",
            "--num_workers", "1", *NET], tmp_path, seed=1)


def test_repeated_sigkills_from_a_latent_cache_end_bit_identical(chain, tmp_path):
    _drill([sys.executable, f"{SCRIPTS}/image_train_vae.py", "--latent_cache", str(chain / "cache"),
            "--image_size", "16", "--sample_interval", "0", *NET], tmp_path, seed=2)


def test_repeated_sigkills_of_a_run_encoding_images_on_the_fly_end_bit_identical(chain, tmp_path):
    _drill([sys.executable, f"{SCRIPTS}/image_train_vae.py", "--data_dir", str(chain / "images"),
            "--vae_path", str(chain / "vae"), "--latent_scale", "stored", "--image_size", "16", "--num_workers", "0",
            "--sample_interval", "0", *NET], tmp_path, seed=3)


def test_a_latent_cache_build_killed_while_encoding_ends_bit_identical(chain, tmp_path):
    images = tmp_path / "many"
    make_image_folder(images, classes=("user_01", "user_02"), per_class=240, size=16, channels=1)
    base = [sys.executable, f"{SCRIPTS}/encode_latents.py", "--data_dir", str(images), "--vae_path",
            str(chain / "vae"), "--image_size", "16", "--latent_scale", "stored", "--chunk_size", "16",
            "--batch_size", "8", "--num_workers", "0", "--progress", "False"]
    _run_to_end([*base, "--output_dir", str(tmp_path / "whole")])
    rng = random.Random(4)
    kills = 0
    for _ in range(KILLS):
        proc = subprocess.Popen([*base, "--output_dir", str(tmp_path / "crashed")], env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=REPO)
        for line in proc.stdout:
            if line.startswith("encoding"):  # the VAE is loaded and the chunks are claimed
                break
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is not None:
            break  # finished before the kill
        proc.kill()
        proc.wait(timeout=60)
        kills += 1
    assert kills >= 5  # the drill did interrupt the encoding
    _run_to_end([*base, "--output_dir", str(tmp_path / "crashed")])
    for name in ("latents.npy", "labels.npy"):
        a = np.load(tmp_path / "whole" / name)
        b = np.load(tmp_path / "crashed" / name)
        assert a.shape == b.shape and np.array_equal(a, b), name

