"""Interpolation between two samples: slerp, the files written, endpoints that
are exactly the sampling script's samples, refusals that write nothing."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion_vae.core import script_util
from guided_diffusion_vae.core.respace import space_timesteps
from guided_diffusion_vae.runtime.errors import UserError
from guided_diffusion_vae.tools.interpolation import (
    effective_respacing,
    frame_batches,
    label_embedding_rows,
    interpolate_defaults,
    mixed_embeddings,
    run_interpolation,
    slerp,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = {"0": "user_01", "1": "user_02"}


def _checkpoint(path, class_cond=True, in_channels=1, image_size=8, vae=None):
    """A tiny checkpoint of ours (40 diffusion steps) whose zero-initialised
    layers (the output, each residual branch's last conv) are made random, so
    that samples depend on noise and class."""
    from guided_diffusion_vae.training.checkpoint import save_weights
    from guided_diffusion_vae.core.script_util import split_flags

    flags = script_util.model_and_diffusion_defaults()
    flags.update(image_size=image_size, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                 attention_resolutions="4", num_heads=2, diffusion_steps=40, in_channels=in_channels,
                 class_cond=class_cond, num_classes=2, predict_xstart=True)
    model_config, diffusion_config = split_flags(flags)
    torch.manual_seed(0)
    model = script_util.create_model(**model_config)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    # data.image_size is in pixels, as training writes it (sampling checks it against the model's side)
    pixels = image_size * vae["downsample_factor"] if vae else image_size
    data = {"image_size": pixels, "label_map": LABELS if class_cond else None}
    save_weights(str(path), model.state_dict(), {"step": 0, "weights": "model", "model": model_config,
                                                 "diffusion": diffusion_config, "vae": vae, "data": data,
                                                 "train": {}})
    return str(path)


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("cond") / "model000000.safetensors")


@pytest.fixture(scope="module")
def uncond_ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("uncond") / "model000000.safetensors", class_cond=False)


def _config(model_path, output_dir, **kw):
    return {**interpolate_defaults(), "model_path": model_path, "output_dir": str(output_dir), "use_ema": False,
            "timestep_respacing": "5", "steps": 5, "batch_size": 2, "device": "cpu", **kw}


def _sample(model_path, output_dir, seed, user=None):
    """The first sample image_sample_vae.py draws with DDIM for ``seed`` (and ``user``)."""
    from guided_diffusion_vae.sampling.sample_from_checkpoint import latent_sample_defaults, run_sampling

    per_user = {"num_images_per_user": 1, "user_ids": [user]} if user else {"num_images_per_user": 0,
                                                                            "num_samples": 1}
    config = {**latent_sample_defaults(), "model_path": model_path, "output_dir": str(output_dir),
              "use_ema": False, "seed": seed, "sampler": "ddim", "timestep_respacing": "5", "device": "cpu",
              **per_user}
    return np.array(Image.open(run_sampling(config)["images"][0]))


def _png(path):
    return np.array(Image.open(path))


def test_slerp_endpoints_norm_and_parallel_fallback():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 4, generator=gen), torch.randn(3, 4, 4, generator=gen)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    assert mid.shape == a.shape and mid.dtype == a.dtype
    ua, ub = a / a.norm(), b / b.norm()
    for t in (0.1, 0.3, 0.5, 0.9):  # unit vectors stay on the sphere (a straight line would not)
        assert slerp(ua, ub, t).norm().item() == pytest.approx(1.0, abs=1e-6)
    assert ((ua + ub) / 2).norm().item() < 0.99
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])  # orthogonal: the 45 degree point
    torch.testing.assert_close(slerp(e1, e2, 0.5), torch.tensor([1.0, 1.0]) / math.sqrt(2))
    # Nearly parallel: the straight line, never NaN.
    near = a * 2 + 1e-6
    out = slerp(a, near, 0.25)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, 0.75 * a + 0.25 * near)
    torch.testing.assert_close(slerp(a, a, 0.5), a)


def test_mixed_embeddings_and_batches():
    table = torch.randn(3, 5)
    rows = mixed_embeddings(table, 2, 0, [0.0, 0.25, 1.0])
    assert torch.equal(rows[0], table[2]) and torch.equal(rows[2], table[0])
    torch.testing.assert_close(rows[1], 0.75 * table[2] + 0.25 * table[0])
    assert [list(r) for r in frame_batches(6, 3)] == [[0], [1, 2, 3], [4], [5]]
    assert [list(r) for r in frame_batches(2, 16)] == [[0], [1]]
    model = torch.nn.Module()
    own = model.label_emb = torch.nn.Embedding(3, 5)
    with pytest.raises(RuntimeError):
        with label_embedding_rows(model, rows):
            torch.testing.assert_close(model.label_emb(torch.arange(3)), rows)
            raise RuntimeError("inside")
    assert model.label_emb is own  # restored, even after an error
    assert effective_respacing("ddim25", 1000) == "ddim25"
    assert effective_respacing("ddim25", 40) == "25" and effective_respacing("ddim25", 20) == "ddim20"
    # The rule diagnosis uses too: 25 steps however the process is spaced.
    for steps in (20, 40, 1000):
        assert len(space_timesteps(steps, effective_respacing("ddim25", steps))) == min(25, steps)
    assert effective_respacing("ddim10", 40) == "ddim10"


def test_conditional_frames_files_and_endpoints(cond_ckpt, tmp_path):
    out = tmp_path / "interp"
    paths = run_interpolation(_config(cond_ckpt, out, seed_a=1, seed_b=2, user_a="user_01", user_b="2"))
    frames = [_png(out / f"frame_{i:03d}.png") for i in range(5)]
    assert len(paths["frames"]) == 5 and not (out / "frame_005.png").exists()
    assert all(f.shape == (8, 8) and f.dtype == np.uint8 for f in frames)
    assert _png(paths["strip"]).shape == (8 + 4, 5 * 10 + 2)
    with Image.open(paths["gif"]) as gif:
        assert gif.n_frames == 5 and gif.info["duration"] == 120
    # The path moves: neighbouring frames differ, and the ends are different pictures.
    assert all((frames[i] != frames[i + 1]).any() for i in range(4))
    # Endpoints are the sampling script's samples for (seed_a, user_a) and (seed_b, user_b), bit for bit.
    np.testing.assert_array_equal(frames[0], _sample(cond_ckpt, tmp_path / "a", 1, "user_01"))
    np.testing.assert_array_equal(frames[-1], _sample(cond_ckpt, tmp_path / "b", 2, "user_02"))
    assert (frames[-1] != _sample(cond_ckpt, tmp_path / "c", 2, "user_01")).any()  # the person matters


def test_unconditional_model_and_its_refusal(uncond_ckpt, tmp_path):
    out = tmp_path / "interp"
    run_interpolation(_config(uncond_ckpt, out, seed_a=3, seed_b=4, steps=3))
    np.testing.assert_array_equal(_png(out / "frame_000.png"), _sample(uncond_ckpt, tmp_path / "a", 3))
    np.testing.assert_array_equal(_png(out / "frame_002.png"), _sample(uncond_ckpt, tmp_path / "b", 4))
    refused = tmp_path / "refused"
    with pytest.raises(UserError, match="user_a given, but this model is unconditional"):
        run_interpolation(_config(uncond_ckpt, refused, user_a="user_01"))
    assert not refused.exists()


@pytest.mark.parametrize("overrides,message", [
    ({"user_b": "bob"}, r"--user_b: unknown user id 'bob'; the classes are user_01, user_02"),
    ({"user_a": "7"}, r"--user_a: no class name ends in the number 7"),
    ({"steps": 1}, r"steps must be >= 2"),
    ({"output_dir": ""}, r"output_dir is required"),
    ({"model_path": ""}, r"model_path is required"),
])
def test_bad_input_is_one_line_and_writes_nothing(cond_ckpt, tmp_path, overrides, message):
    out = tmp_path / "interp"
    with pytest.raises(UserError, match=message) as err:
        run_interpolation({**_config(cond_ckpt, out), **overrides})
    assert "\n" not in str(err.value)
    assert not out.exists()


def test_latent_model_decodes_through_its_vae(tmp_path):
    from guided_diffusion_vae.latent.vae_wrapper import load_vae
    from helpers.vae_helpers import make_tiny_vae

    vae_dir = make_tiny_vae(tmp_path / "vae", in_channels=1)
    vae = load_vae(vae_dir, device="cpu", latent_scale=1.0).describe()
    ckpt = _checkpoint(tmp_path / "model000000.safetensors", in_channels=4, image_size=4, vae=vae)
    out = tmp_path / "interp"
    run_interpolation(_config(ckpt, out, steps=2, seed_a=5, seed_b=6, user_a="1", user_b="2"))
    first = _png(out / "frame_000.png")
    assert first.shape == (16, 16)
    np.testing.assert_array_equal(first, _sample(ckpt, tmp_path / "a", 5, "1"))
    np.testing.assert_array_equal(_png(out / "frame_001.png"), _sample(ckpt, tmp_path / "b", 6, "2"))


def test_script_end_to_end(cond_ckpt, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "interp"
    cmd = [sys.executable, "scripts/interpolate.py", "--model_path", cond_ckpt, "--seed_a", "1", "--seed_b", "2",
           "--steps", "4", "--timestep_respacing", "5", "--user_a", "1", "--user_b", "user_02",
           "--output_dir", str(out), "--device", "cpu"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["frame_000.png", "frame_001.png", "frame_002.png", "frame_003.png",
                                       "interpolation.gif", "strip.png"]
    np.testing.assert_array_equal(_png(out / "frame_003.png"), _sample(cond_ckpt, tmp_path / "b", 2, "user_02"))
    with Image.open(out / "interpolation.gif") as gif:
        assert gif.n_frames == 4
