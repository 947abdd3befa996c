"""The latent pipeline end to end: vae_train -> encode_latents -> mpiexec
image_train_vae -> image_sample_vae from the checkpoint alone; plus the
boundaries (on-the-fly vs cached batches, a moved VAE, unknown user ids)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion_vae.training import checkpoint as ckpt
from guided_diffusion_vae.runtime.errors import UserError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
from vae_helpers import REPO, SCRIPTS, build_latent_chain, run_script  # noqa: E402

TINY_DIFFUSION = [
    "--image_size", "16", "--num_channels", "32", "--channel_mult", "1,2", "--attention_resolutions", "2",
    "--num_head_channels", "16", "--compile", "False", "--num_workers", "0", "--diffusion_steps", "100",
]



@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Images of three users, a VAE trained on them, and their latent cache."""
    return build_latent_chain(tmp_path_factory.mktemp("chain"), size=16, per_class=8)


def test_whole_chain_with_mpiexec_and_sampling_from_the_checkpoint(chain, tmp_path, mpiexec, launch_env):
    run = tmp_path / "run"
    out = run_script([*mpiexec, "-n", "2", sys.executable, f"{SCRIPTS}/image_train_vae.py",
                "--config", os.path.join(REPO, "configs", "microdoppler_small.yaml"),
                "--latent_cache", str(chain / "cache"), *TINY_DIFFUSION, "--batch_size", "4",
                "--lr_anneal_steps", "3", "--log_interval", "1", "--sample_interval", "3",
                "--num_preview_samples", "3", "--log_dir", str(run)], launch_env)
    assert "weights identical on all 2 ranks" in out
    meta = ckpt.read_metadata(str(run / "model000003.safetensors"))
    assert meta["model"]["in_channels"] == 4 and meta["model"]["image_size"] == 4  # 16 px / 4
    assert meta["model"]["num_classes"] == 3 and meta["data"]["image_size"] == 16
    assert meta["data"]["label_map"] == {"0": "user_01", "1": "user_02", "2": "user_03"}
    stats = json.loads((chain / "vae" / "latent_stats.json").read_text())
    assert meta["vae"]["latent_scale"] == pytest.approx(stats["latent_scale"])
    assert meta["vae"]["path"] == str(chain / "vae")
    assert (run / "samples" / "preview_000003.png").exists()

    out_dir = tmp_path / "out"
    log = run_script([sys.executable, f"{SCRIPTS}/image_sample_vae.py", "--model_path", str(run), "--user_ids", "1", "3",
                "--num_images_per_user", "2", "--output_dir", str(out_dir), "--use_ddim", "True",
                "--timestep_respacing", "ddim10", "--seed", "42"], launch_env)
    assert "ema_0.9999_000003.safetensors" in log
    assert "sqrt(alpha_bar)" not in log  # ddimN starts one stride below t=T
    for user in ("user_01", "user_03"):
        for k in range(2):
            image = Image.open(out_dir / user / f"generated_{k:03d}.png")
            assert image.size == (16, 16) and image.mode == "L"  # the data's size and channels
    assert not (out_dir / "user_02").exists()
    with np.load(out_dir / "samples_4x16x16x1.npz") as data:
        assert list(data["arr_1"]) == [0, 0, 2, 2]

    # The same seed gives the same images, whatever the batch size.
    again = tmp_path / "again"
    run_script([sys.executable, f"{SCRIPTS}/image_sample_vae.py", "--model_path", str(run), "--user_ids", "1", "3",
          "--num_images_per_user", "2", "--output_dir", str(again), "--use_ddim", "True",
          "--timestep_respacing", "ddim10", "--seed", "42", "--batch_size", "3"], launch_env)
    a = np.asarray(Image.open(out_dir / "user_03" / "generated_001.png"), dtype=int)
    b = np.asarray(Image.open(again / "user_03" / "generated_001.png"), dtype=int)
    assert np.abs(a - b).max() <= 1

    # An epsilon model (cosine schedule) started at t=T: the user is warned.
    log = run_script([sys.executable, f"{SCRIPTS}/image_sample_vae.py", "--model_path", str(run), "--user_ids", "1",
                      "--num_images_per_user", "1", "--output_dir", str(tmp_path / "from_T"), "--use_ddim", "True",
                      "--timestep_respacing", "10"], launch_env)
    assert "the first sampling step has sqrt(alpha_bar) = " in log and "ddimN" in log

    # Bad input: unknown user id lists valid ones; a moved VAE names the path and the flag.
    result = subprocess.run([sys.executable, f"{SCRIPTS}/image_sample_vae.py", "--model_path", str(run),
                             "--user_ids", "7", "--output_dir", str(tmp_path / "x")],
                            env=launch_env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2 and "no class name ends in the number 7; the classes are user_01, user_02, user_03" in result.stderr
    result = subprocess.run([sys.executable, f"{SCRIPTS}/image_sample_vae.py", "--model_path", str(run),
                             "--vae_path", str(tmp_path / "moved"), "--output_dir", str(tmp_path / "x")],
                            env=launch_env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2
    assert f"expected at {chain / 'vae'}" in result.stderr and "--vae_path" in result.stderr
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_on_the_fly_and_cached_training_batches_agree(chain):
    from guided_diffusion_vae.training.latent_training import latent_train_defaults, latent_training_data

    base = {**latent_train_defaults(), "image_size": 16, "batch_size": 4, "seed": 3, "class_cond": True,
            "random_flip": False, "num_workers": 0}
    cached = latent_training_data({**base, "latent_cache": str(chain / "cache")})
    fly = latent_training_data({**base, "data_dir": str(chain / "images"), "vae_path": str(chain / "vae")})
    assert cached.sample_shape == fly.sample_shape == (4, 4, 4)
    assert cached.label_map == fly.label_map
    assert cached.vae_meta["latent_scale"] == pytest.approx(fly.vae_meta["latent_scale"])
    for _ in range(3):
        (z_cached, c1), (images, c2) = next(cached.batches), next(fly.batches)
        z_fly = fly.batch_transform(images)
        torch.testing.assert_close(z_fly, z_cached, rtol=1e-4, atol=1e-4)
        assert torch.equal(c1["y"], c2["y"])
    assert z_cached.std().item() == pytest.approx(1.0, abs=0.5)  # unit-variance latents


def test_on_the_fly_needs_a_scale_and_refuses_mismatched_cache(chain):
    from guided_diffusion_vae.training.latent_training import latent_train_defaults, latent_training_data

    base = {**latent_train_defaults(), "image_size": 16, "batch_size": 4, "num_workers": 0}
    with pytest.raises(UserError, match="image_size is 16 in the cache but 32"):
        latent_training_data({**base, "image_size": 32, "latent_cache": str(chain / "cache")})
    with pytest.raises(UserError, match="--latent_cache CACHE_DIR, or --data_dir IMAGES with --vae_path"):
        latent_training_data(base)
    with pytest.raises(UserError, match="not divisible by the VAE's downsampling factor 4"):
        latent_training_data({**base, "image_size": 18, "data_dir": str(chain / "images"),
                              "vae_path": str(chain / "vae")})


def test_on_the_fly_training_with_a_measured_scale_under_mpiexec(chain, tmp_path, mpiexec, launch_env):
    run = tmp_path / "run"
    out = run_script([*mpiexec, "-n", "2", sys.executable, f"{SCRIPTS}/image_train_vae.py", "--data_dir",
                str(chain / "images"), "--vae_path", str(chain / "vae"), "--latent_scale", "measured",
                "--measure_scale_batches", "2", *TINY_DIFFUSION, "--class_cond", "True", "--batch_size", "4",
                "--lr_anneal_steps", "2", "--log_interval", "1", "--log_dir", str(run)], launch_env)
    assert "measured latent scale" in out and "weights identical on all 2 ranks" in out
    meta = ckpt.read_metadata(str(run / "model000002.safetensors"))
    assert meta["data"]["source"] == "images" and meta["vae"]["latent_scale"] > 0


def test_a_model_trained_with_augmentation_samples_from_its_checkpoint(chain, tmp_path):
    """--augment: the checkpoint records the condition's size, sampling asks for none."""
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = run_script([sys.executable, f"{SCRIPTS}/image_train_vae.py", "--latent_cache", str(chain / "cache"),
                      "--image_size", "16", "--num_channels", "32", "--channel_mult", "1,2",
                      "--attention_resolutions", "2", "--num_head_channels", "16", "--compile", "False",
                      "--num_workers", "0", "--diffusion_steps", "100", "--class_cond", "True", "--batch_size", "4",
                      "--lr_anneal_steps", "2", "--augment", "time_shift,doppler_scale", "--log_dir", str(run)], env)
    assert "done:" in log
    meta = ckpt.read_metadata(str(run / "model000002.safetensors"))
    assert meta["model"]["augment_dim"] == 3 and meta["train"]["augment"] == "time_shift,doppler_scale"
    state, _ = ckpt.load_weights(str(run / "ema_0.9999_000002.safetensors"))
    assert state["augment_emb.weight"].shape[1] == 3
    out = tmp_path / "out"
    run_script([sys.executable, f"{SCRIPTS}/image_sample_vae.py", "--model_path", str(run), "--user_ids", "1",
                "--num_images_per_user", "2", "--output_dir", str(out), "--use_ddim", "True",
                "--timestep_respacing", "ddim10"], env)
    assert len(list((out / "user_01").glob("generated_*.png"))) == 2
    with np.load(next(out.glob("samples_*.npz"))) as data:
        assert np.isfinite(data["arr_0"].astype(float)).all()
