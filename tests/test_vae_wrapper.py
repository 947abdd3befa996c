"""VAEInterface: the scale is applied exactly once, never diffusers' default,
ranges are converted both ways, and bad inputs give one-line errors."""

import json
import os

import pytest
import torch

from guided_diffusion_vae.runtime.errors import UserError
from guided_diffusion_vae.latent.vae_wrapper import VAEInterface, vae_fingerprint
from helpers.vae_helpers import load_raw_vae, make_tiny_vae, one_torch_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    # scaling_factor set to a conspicuous value: if it were ever applied, the
    # exact comparisons below would be off by that factor.
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "vae", in_channels=1, scaling_factor=0.18215)


def _images(n=5, size=16, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, channels, size, size), generator=g) * 2 - 1


def _open(path, **kw):
    kw.setdefault("device", "cpu")
    return VAEInterface(path, **kw)


def test_scale_applied_exactly_once(vae_dir):
    vae = _open(vae_dir, latent_scale=2.5, max_batch=2)
    raw = load_raw_vae(vae_dir)
    x = _images()
    with torch.no_grad():
        mean = raw.encode(x).latent_dist.mean
        direct = raw.decode(mean).sample.clamp(-1, 1)
    z = vae.encode_batch(x)
    assert z.shape == (5, 4, 4, 4) and z.dtype == torch.float32
    torch.testing.assert_close(z, mean * 2.5, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vae.decode_batch(z), direct, rtol=1e-5, atol=1e-5)
    # Ordinary tensors (not inference tensors): a loss may save them for backward.
    assert not z.is_inference()


def test_no_scale_refuses_instead_of_config_default(vae_dir):
    vae = _open(vae_dir)
    assert vae.latent_scale is None
    with pytest.raises(UserError, match="no latent scale.*measure"):
        vae.encode_batch(_images())
    with pytest.raises(UserError, match="no latent scale"):
        vae.decode_batch(torch.zeros(1, 4, 4, 4))
    # Unscaled access stays available (it is what measuring uses).
    assert vae.encode_unscaled(_images(2)).shape == (2, 4, 4, 4)


def test_measured_scale_gives_unit_std(vae_dir):
    vae = _open(vae_dir)
    data = [(_images(8, seed=s), {}) for s in range(3)]
    scale = vae.measure_latent_scale(data)
    assert vae.latent_scale == scale and scale > 0
    z = torch.cat([vae.encode_batch(x) for x, _ in data])
    assert abs(z.std().item() - 1.0) < 1e-3
    # max_images stops early (an infinite loader is fine).
    assert vae.measure_latent_scale(iter(data * 100), max_images=10) > 0


def test_input_range_zero_one(vae_dir):
    vae = _open(vae_dir, input_range="0,1", latent_scale=1.0)
    raw = load_raw_vae(vae_dir)
    x = _images(3)
    with torch.no_grad():
        mean = raw.encode((x + 1) / 2).latent_dist.mean
        out = raw.decode(mean).sample * 2 - 1
    torch.testing.assert_close(vae.encode_batch(x), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vae.decode_batch(mean, clamp=False), out, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="input_range"):
        _open(vae_dir, input_range="0..1")


def test_posterior_sample_deterministic_and_chunk_independent(vae_dir):
    x = _images(7)
    a = _open(vae_dir, sample_posterior=True, latent_scale=1.0, seed=3, max_batch=2).encode_batch(x)
    b = _open(vae_dir, sample_posterior=True, latent_scale=1.0, seed=3, max_batch=64).encode_batch(x)
    c = _open(vae_dir, sample_posterior=True, latent_scale=1.0, seed=4).encode_batch(x)
    mean = _open(vae_dir, latent_scale=1.0).encode_batch(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, c) and not torch.allclose(a, mean)


def test_describe_and_shapes(vae_dir, tmp_path):
    vae = _open(vae_dir, latent_scale=0.7)
    d = vae.describe()
    assert set(d) == {
        "path", "latent_scale", "latent_channels", "downsample_factor", "input_range",
        "sample_posterior", "in_channels", "fingerprint",
    }
    assert (d["latent_channels"], d["downsample_factor"], d["in_channels"]) == (4, 4, 1)
    assert d["latent_scale"] == 0.7 and d["input_range"] == "-1,1" and d["sample_posterior"] is False
    json.dumps(d)
    assert vae.latent_shape(64) == (4, 16, 16) and vae.latent_shape(128) == (4, 32, 32)
    # Another VAE (different weights) has another fingerprint.
    other = make_tiny_vae(tmp_path / "other", in_channels=1, seed=1)
    assert vae_fingerprint(other) != d["fingerprint"]


def test_stored_scale(vae_dir, tmp_path):
    path = make_tiny_vae(tmp_path / "v", in_channels=1)
    with pytest.raises(UserError, match="latent_stats.json"):
        _open(path, latent_scale="stored")
    with open(os.path.join(path, "latent_stats.json"), "w") as f:
        json.dump({"latent_scale": 1.25, "fingerprint": vae_fingerprint(path)}, f)
    assert _open(path, latent_scale="stored").latent_scale == 1.25


def test_errors_name_the_culprit(vae_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=f"{empty}.*holds no VAE.*config.json"):
        _open(str(empty))
    with pytest.raises(UserError, match="nowhere.*not a directory"):
        _open(str(tmp_path / "nowhere"))
    vae = _open(vae_dir, latent_scale=1.0)
    with pytest.raises(UserError, match=r"image size 18 .*downsampling factor 4"):
        vae.encode_batch(_images(1, size=18))
    with pytest.raises(UserError, match=r"image size 30 .*factor 4"):
        vae.latent_shape(30)
    with pytest.raises(UserError, match=r"data has 3 channels.*expects 1"):
        vae.encode_batch(_images(1, channels=3))
    with pytest.raises(UserError, match=r"latent_scale must be a positive"):
        _open(vae_dir, latent_scale=-1.0)


def test_a_broken_latent_stats_file_is_named(tmp_path):
    from guided_diffusion_vae.latent.vae_wrapper import LATENT_STATS_FILE, read_latent_stats

    assert read_latent_stats(str(tmp_path)) is None  # no file: no stored scale
    path = tmp_path / LATENT_STATS_FILE
    path.write_text("{not json")
    with pytest.raises(UserError, match=r"latent_stats.json' is not readable JSON"):
        read_latent_stats(str(tmp_path))
    path.write_text("[0.18]")
    with pytest.raises(UserError, match=r"latent_stats.json' holds a list, not a JSON object"):
        read_latent_stats(str(tmp_path))
    path.write_text('{"latent_scale": 0.18}')
    assert read_latent_stats(str(tmp_path)) == {"latent_scale": 0.18}
