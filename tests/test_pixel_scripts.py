"""The pixel-space scripts end to end: mpiexec training, sampling from the
checkpoint alone, SIGTERM, and bad input."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from guided_diffusion_vae.training import checkpoint as ckpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "scripts", "image_train.py")
SAMPLE = os.path.join(REPO, "scripts", "image_sample.py")
TINY = [
    "--image_size", "16", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
    "--attention_resolutions", "8", "--diffusion_steps", "50", "--num_workers", "0",
]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of small non-square RGB images."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, base in (("cat", 40), ("dog", 200)):
        (root / name).mkdir()
        for i in range(6):
            pixels = np.clip(base + rng.normal(0, 20, (20, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_mpiexec_training_then_sampling_from_the_checkpoint_alone(tmp_path, image_folder, mpiexec, launch_env):
    run = tmp_path / "run"
    cmd = [*mpiexec, "-n", "2", sys.executable, TRAIN, "--data_dir", str(image_folder), *TINY,
           "--class_cond", "True", "--batch_size", "2", "--lr_anneal_steps", "3", "--log_interval", "1",
           "--log_dir", str(run), "--sample_interval", "3", "--num_preview_samples", "4"]
    result = subprocess.run(cmd, env=launch_env, capture_output=True, text=True, timeout=300, cwd=REPO)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "weights identical on all 2 ranks" in out
    assert re.search(r"step 3/3 +loss [0-9.]+ +[0-9.]+ img/s +ETA", out)
    for name in ("model000003.safetensors", "ema_0.9999_000003.safetensors", "opt000003.pt",
                 "progress.csv", "log.txt", "config.yaml", "samples/preview_000003.png"):
        assert (run / name).exists(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    meta = ckpt.read_metadata(str(run / "model000003.safetensors"))
    assert meta["data"]["label_map"] == {"0": "cat", "1": "dog"}

    out_dir = tmp_path / "samples"
    cmd = [sys.executable, SAMPLE, "--model_path", str(run), "--output_dir", str(out_dir),
           "--num_images_per_user", "2", "--use_ddim", "True", "--timestep_respacing", "ddim5"]
    result = subprocess.run(cmd, env=launch_env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "ema_0.9999_000003.safetensors" in result.stdout  # EMA weights by default
    for name in ("cat/generated_000.png", "cat/generated_001.png", "dog/generated_001.png", "grid.png"):
        assert (out_dir / name).exists(), name
    image = Image.open(out_dir / "dog" / "generated_000.png")
    assert image.size == (16, 16) and image.mode == "RGB"
    with np.load(out_dir / "samples_4x16x16x3.npz") as data:
        assert data["arr_0"].shape == (4, 16, 16, 3) and list(data["arr_1"]) == [0, 0, 1, 1]


def test_sigterm_saves_and_exits_cleanly(tmp_path, image_folder, launch_env):
    run = tmp_path / "run"
    cmd = [sys.executable, TRAIN, "--data_dir", str(image_folder), *TINY, "--batch_size", "2",
           "--log_interval", "1", "--save_interval", "0", "--log_dir", str(run), "--tensorboard", "False"]
    proc = subprocess.Popen(cmd, env=launch_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines = []
    deadline = time.time() + 120
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 2") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM received: saved at step" in out
    saved = ckpt.latest_model_checkpoint(str(run))
    assert saved is not None and ckpt.parse_step(saved) >= 2
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]


def test_bad_input_gives_one_line_and_exit_code_2(tmp_path, image_folder, launch_env):
    cases = [
        ([TRAIN, "--data_dir", str(tmp_path / "missing"), *TINY], "missing"),
        ([TRAIN, "--data_dir", str(image_folder), *TINY, "--num_channel", "8"], "did you mean '--num_channels'"),
        ([TRAIN, "--data_dir", str(image_folder), *TINY, "--attention_resolutions", "3"], "attention_resolutions '3'"),
        ([SAMPLE, "--model_path", str(tmp_path / "nope.safetensors"), "--output_dir", str(tmp_path / "o")],
         "checkpoint not found"),
    ]
    for args, expected in cases:
        result = subprocess.run([sys.executable, *args, "--log_dir", str(tmp_path / "log")] if args[0] == TRAIN
                                else [sys.executable, *args],
                                env=launch_env, capture_output=True, text=True, timeout=120, cwd=REPO)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        err_lines = result.stderr.strip().splitlines()
        assert err_lines[-1].startswith("error: ") and expected in err_lines[-1], result.stderr[-2000:]
        assert "Traceback" not in result.stderr


def test_original_bare_pt_checkpoint_samples_given_the_flags(tmp_path, launch_env):
    import torch

    from guided_diffusion_vae.core import script_util

    flags = script_util.model_and_diffusion_defaults()
    flags.update(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
                 diffusion_steps=50)
    model, _ = script_util.create_model_and_diffusion(**flags)
    torch.save(model.state_dict(), tmp_path / "model000100.pt")
    out_dir = tmp_path / "out"
    model_flags = TINY[:-2]  # without --num_workers, a training flag
    cmd = [sys.executable, SAMPLE, "--model_path", str(tmp_path / "model000100.pt"), "--use_ema", "False",
           "--output_dir", str(out_dir), "--num_samples", "3", "--timestep_respacing", "5", *model_flags]
    result = subprocess.run(cmd, env=launch_env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bare state dict" in result.stdout
    assert sorted(os.listdir(out_dir / "samples")) == ["generated_000.png", "generated_001.png", "generated_002.png"]
    # Wrong flags: strict loading names the mismatch instead of sampling noise.
    cmd = [*cmd[:-len(model_flags)], *[f if f != "32" else "64" for f in model_flags]]
    result = subprocess.run(cmd, env=launch_env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2 and "does not fit the model" in result.stderr
    assert "num_channels differs" in result.stderr
