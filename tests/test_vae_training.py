"""VAE training: a few steps on a tiny folder export a loadable diffusers VAE
with metrics, a comparison grid and the latent scale, and resume exactly."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion_vae.training import vae_training as vt
from guided_diffusion_vae.runtime.errors import UserError
from guided_diffusion_vae.data.image_datasets import ImageDataset
from guided_diffusion_vae.latent.vae_wrapper import VAEInterface
from helpers.vae_helpers import make_image_folder, one_torch_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_train")
    make_image_folder(root / "images", per_class=6, size=16, channels=1)  # 12 gray images
    return str(root / "images")


def _config(images, out, **kw):
    config = dict(data_dir=images, output_dir=str(out), image_size=16, vae_size="tiny", batch_size=4,
                  lr=1e-3, lr_anneal_steps=4, save_interval=2, log_interval=2, holdout_fraction=0.2,
                  num_workers=0, progress=False, scale_images=64, identity_steps=30)
    config.update(kw)
    return config


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_a") / "vae"
    metrics = vt.train_vae(_config(images, out))
    return out, metrics


def test_train_exports_a_loadable_vae(trained, images):
    from diffusers import AutoencoderKL

    out, metrics = trained
    assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors", "latent_stats.json",
                                       "metrics.json", "reconstructions.png"]
    model = AutoencoderKL.from_pretrained(str(out), local_files_only=True, low_cpu_mem_usage=False)
    assert model.config.in_channels == 1 and model.config.latent_channels == 4
    assert list(model.config.block_out_channels) == [16, 32, 64]

    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    # The identity check ran on the held-out images of the two class folders.
    assert 0.0 <= saved["rcas"] <= 1.0 and 0.0 <= saved["trtr"] <= 1.0
    assert saved["split"] == "heldout" and saved["num_images"] == 2 and saved["step"] == 4
    assert 0 < saved["psnr"] < 60 and -1 <= saved["ssim"] <= 1
    train_dir = str(out) + "_train"
    assert {"log.txt", "progress.csv", "metrics.json", "vae_state_000004.pt"} <= set(os.listdir(train_dir))
    assert "eval_psnr" in open(os.path.join(train_dir, "progress.csv")).readline()

    # Grid: 2 rows (real, reconstruction) of the 2 held-out images, 16px shown at 64px.
    grid = np.asarray(Image.open(out / "reconstructions.png"))
    assert grid.shape == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)  # 2x2 tiles of 64 px, 2 px padding around each

    # The stored scale makes the training latents unit-std, through VAEInterface.
    stats = json.loads((out / "latent_stats.json").read_text())
    vae = VAEInterface(str(out), device="cpu", latent_scale="stored")
    assert vae.latent_scale == stats["latent_scale"] and stats["fingerprint"] == vae.fingerprint
    train_paths, _ = vt.split_holdout(sorted(vt_paths(images)), images, 0.2)
    data = ImageDataset(16, train_paths, channels=1, random_flip=False)
    x = torch.stack([torch.from_numpy(data[i][0]) for i in range(len(data))])
    assert abs(vae.encode_batch(x).std().item() - 1) < 1e-3


def vt_paths(images):
    from guided_diffusion_vae.data.image_datasets import list_image_files

    return list_image_files(images)


def test_resume_after_interruption_matches_uninterrupted(trained, images, tmp_path, monkeypatch):
    out = tmp_path / "vae"
    real = vt._step_generator

    def crash_at_step_3(seed, rank, step, device):
        if step == 3:
            raise KeyboardInterrupt
        return real(seed, rank, step, device)

    monkeypatch.setattr(vt, "_step_generator", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        vt.train_vae(_config(images, out))
    assert not out.exists()  # nothing exported before the end
    assert os.listdir(str(out) + "_train").count("vae_state_000002.pt") == 1
    monkeypatch.setattr(vt, "_step_generator", real)
    metrics = vt.train_vae(_config(images, out))
    expected, got = _weights(trained[0]), _weights(out)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    assert metrics["psnr"] == pytest.approx(trained[1]["psnr"])
    # A finished run exports again (idempotent); other settings are refused.
    vt.train_vae(_config(images, out))
    with pytest.raises(UserError, match="vae_state_000004.pt was written with batch_size=4, now 2"):
        vt.train_vae(_config(images, out, batch_size=2))


def test_bad_inputs(images, tmp_path):
    with pytest.raises(UserError, match="image size 18 is not divisible by the VAE's downsampling factor 4"):
        vt.train_vae(_config(images, tmp_path / "v", image_size=18))
    with pytest.raises(UserError, match="fewer than batch_size=64"):
        vt.train_vae(_config(images, tmp_path / "v", batch_size=64))
    with pytest.raises(UserError, match="vae_size must be one of"):
        vt.train_vae(_config(images, tmp_path / "v", vae_size="huge"))
    with pytest.raises(UserError, match="data directory not found"):
        vt.train_vae(_config(str(tmp_path / "none"), tmp_path / "v"))
    # None of these starts left a checkpoint folder (logs included) behind.
    assert sorted(os.listdir(tmp_path)) == []


def test_a_failed_start_leaves_nothing_new_in_the_checkpoint_folder(images, tmp_path):
    with pytest.raises(UserError, match="fewer than batch_size=64"):
        vt.train_vae(_config(images, tmp_path / "v", batch_size=64, checkpoint_dir=str(tmp_path / "states")))
    assert not (tmp_path / "states").exists() and not (tmp_path / "v").exists()
    (tmp_path / "states").mkdir()
    (tmp_path / "states" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="fewer than batch_size=64"):
        vt.train_vae(_config(images, tmp_path / "v", batch_size=64, checkpoint_dir=str(tmp_path / "states")))
    assert os.listdir(tmp_path / "states") == ["notes.txt"]


def test_ssim_psnr_and_helpers(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand((3, 2, 24, 24), generator=g) * 2 - 1
    assert torch.allclose(vt.ssim(x, x), torch.ones(3))
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    very = (x + 0.8 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert (vt.ssim(x, noisy) > vt.ssim(x, very)).all()
    # Constant images: SSIM reduces to the luminance term (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.5, -0.25, (0.01 * 2) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    got = vt.ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # PSNR on [-1, 1]: an error of 0.2 everywhere is 10 log10(4 / 0.04) = 20 dB.
    assert vt.psnr(torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.2)).item() == pytest.approx(20.0, rel=1e-5)

    # Held-out split: fixed fraction, independent of the listing order.
    paths = [os.path.join("/d", f"u_{i}.png") for i in range(40)]
    train, held = vt.split_holdout(paths, "/d", 0.1)
    assert len(held) == 4 and not set(train) & set(held)
    assert vt.split_holdout(paths[::-1], "/d", 0.1)[1] == sorted(held, key=paths[::-1].index)

    # Channels: gray files -> 1, a colour file -> 3.
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.stack([np.zeros((8, 8)), np.ones((8, 8)) * 50, np.zeros((8, 8))], -1).astype(np.uint8)).save(
        tmp_path / "c.png")
    assert vt.detect_channels([str(tmp_path / "g.png")]) == 1
    assert vt.detect_channels([str(tmp_path / "g.png"), str(tmp_path / "c.png")]) == 3


def test_divergence_stops_without_saving_a_poisoned_state(images, tmp_path, monkeypatch):
    real = vt.vae_loss
    calls = []

    def nan_on_second_step(*args):
        loss, parts = real(*args)
        calls.append(1)
        return (loss * float("nan"), parts) if len(calls) == 2 else (loss, parts)

    monkeypatch.setattr(vt, "vae_loss", nan_on_second_step)
    out = tmp_path / "vae"
    with pytest.raises(UserError, match="diverged: non-finite loss by step 2 .*resumes from the start"):
        vt.train_vae(_config(images, out, holdout_fraction=0.0))
    assert not os.path.exists(str(out) + "_train/vae_state_000002.pt") and not out.exists()
