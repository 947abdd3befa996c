"""Latent cache: build, reload, resume after an interruption, refusal of
mismatches, and equality with encoding on the fly."""

import importlib.util
import os

import numpy as np
import pytest
import torch

from guided_diffusion_vae.latent import latent_datasets as ld
from guided_diffusion_vae.runtime.errors import UserError, run_main
from guided_diffusion_vae.data.image_datasets import ImageFolderDataset, load_data
from guided_diffusion_vae.latent.vae_wrapper import VAEInterface
from helpers.vae_helpers import make_image_folder, make_tiny_vae, one_torch_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_torch_thread)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    vae_dir = make_tiny_vae(root / "vae", in_channels=1)
    make_image_folder(root / "images", per_class=5, size=16, channels=1)  # 10 images, 2 classes
    return {"root": root, "vae": vae_dir, "images": str(root / "images")}


def _build(setup, out, **kw):
    args = dict(data_dir=setup["images"], vae_path=setup["vae"], output_dir=str(out), image_size=16,
                batch_size=3, chunk_size=4, num_workers=0, progress=False, device="cpu")
    args.update(kw)
    return ld.build_latent_cache(**args)


@pytest.fixture(scope="module")
def flipped_cache(setup):
    out = setup["root"] / "cache_flip"
    _build(setup, out, random_flip=True)
    return out


def test_build_and_reload(setup, flipped_cache):
    cache = ld.LatentCache(str(flipped_cache))
    meta = cache.meta
    assert sorted(os.listdir(flipped_cache)) == ["labels.npy", "latents.npy", "meta.json"]
    assert meta["count"] == 20 and meta["num_images"] == 10 and len(cache) == 20
    assert cache.shape == (4, 4, 4) and meta["dtype"] == "float32" and meta["scaled"] is False
    assert meta["label_map"] == {"0": "user_01", "1": "user_02"}
    assert meta["vae"]["latent_scale"] == meta["latent_scale"]
    assert cache.labels.tolist() == [0] * 5 + [1] * 5 + [0] * 5 + [1] * 5

    # Stored values are the raw latents of the images and of their mirror images.
    vae = VAEInterface(setup["vae"], device="cpu", latent_scale=meta["latent_scale"])
    assert vae.describe()["fingerprint"] == meta["vae"]["fingerprint"]
    data = ImageFolderDataset(setup["images"], 16, channels=1, random_flip=False)
    images = torch.stack([torch.from_numpy(data[i][0]) for i in range(10)])
    torch.testing.assert_close(torch.from_numpy(np.array(cache.latents[:10])), vae.encode_unscaled(images))
    torch.testing.assert_close(torch.from_numpy(np.array(cache.latents[10:])),
                               vae.encode_unscaled(images.flip(3)))

    # Batches are scaled to unit std over the cache ("measured").
    latents, cond = cache.get_batch(np.arange(20))
    assert latents.dtype == torch.float32 and abs(latents.std().item() - 1) < 1e-3
    torch.testing.assert_close(latents, vae.encode_batch(torch.cat([images, images.flip(3)])))
    # Order follows the indices asked for, whatever the read order.
    shuffled, cond2 = cache.get_batch([7, 2, 19])
    torch.testing.assert_close(shuffled, latents[[7, 2, 19]])
    assert cond2["y"].tolist() == [1, 0, 1]


def test_rerun_of_a_complete_cache_is_a_no_op_and_other_settings_are_refused(setup, flipped_cache):
    stamp = os.path.getmtime(flipped_cache / "latents.npy")
    _build(setup, flipped_cache, random_flip=True, chunk_size=7)
    assert os.path.getmtime(flipped_cache / "latents.npy") == stamp
    with pytest.raises(UserError, match="random_flip=True .now False"):
        _build(setup, flipped_cache, random_flip=False)


def test_resume_after_interruption(setup, flipped_cache, monkeypatch):
    out = setup["root"] / "cache_resume"
    real_store, calls = ld._store_latents, []

    def crash_on_fifth(*args):
        calls.append(args[:2])
        if len(calls) == 5:
            raise KeyboardInterrupt  # a kill between two batches
        real_store(*args)

    monkeypatch.setattr(ld, "_store_latents", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        _build(setup, out, random_flip=True)
    # Nothing looks complete; one chunk (4 images) was finished and marked.
    assert not (out / "meta.json").exists() and not (out / "latents.npy").exists()
    assert sorted(os.listdir(out / ".progress")) == ["chunk_000000"]
    with pytest.raises(UserError, match="interrupted build"):
        ld.LatentCache(str(out))
    # Another setting is refused rather than mixed into the partial cache.
    monkeypatch.setattr(ld, "_store_latents", real_store)
    with pytest.raises(UserError, match="unfinished latent cache made with input_range='-1,1'"):
        _build(setup, out, random_flip=True, input_range="0,1")

    calls.clear()

    def count(*args):
        calls.append(args[2] - args[1])
        real_store(*args)

    monkeypatch.setattr(ld, "_store_latents", count)
    _build(setup, out, random_flip=True)
    assert sum(calls) == 2 * 6  # only the 6 images of the unfinished chunks, both orientations
    assert sorted(os.listdir(out)) == ["labels.npy", "latents.npy", "meta.json"]
    done, whole = ld.LatentCache(str(out)), ld.LatentCache(str(flipped_cache))
    np.testing.assert_array_equal(np.asarray(done.latents), np.asarray(whole.latents))
    assert done.latent_scale == whole.latent_scale


def test_check_cache_matches_names_field_and_values(setup, flipped_cache):
    cache = ld.LatentCache(str(flipped_cache))
    vae = VAEInterface(setup["vae"], device="cpu", latent_scale=cache.latent_scale)
    ld.check_cache_matches(cache.meta, vae.describe(), {"image_size": 16, "label_map": {0: "user_01", 1: "user_02"},
                                                        "latent_scale": "measured", "input_range": "-1,1"})
    other = dict(vae.describe(), fingerprint="0123456789abcdef")
    with pytest.raises(UserError, match=r"vae fingerprint is '[0-9a-f]{16}' in the cache but '0123456789abcdef'"):
        ld.check_cache_matches(cache.meta, other)
    with pytest.raises(UserError, match=r"image_size is 16 in the cache but 32 in the configuration"):
        ld.check_cache_matches(cache.meta, None, {"image_size": 32})
    with pytest.raises(UserError, match=r"label_map is .*user_02.* in the cache but .*user_03"):
        ld.check_cache_matches(cache.meta, None, {"label_map": {"0": "user_01", "1": "user_03"}})
    with pytest.raises(UserError, match=r"latent_scale is [0-9.]+ in the cache but 0.18215"):
        ld.check_cache_matches(cache.meta, dict(vae.describe(), latent_scale=0.18215))
    with pytest.raises(UserError, match=r"input_range is '-1,1' in the cache but '0,1'"):
        ld.check_cache_matches(cache.meta, None, {"input_range": "0,1"})


def test_cached_and_on_the_fly_batches_are_identical(setup):
    out = setup["root"] / "cache_plain"
    meta = _build(setup, out, random_flip=False, latent_scale="1.7")
    assert meta["latent_scale"] == 1.7 and meta["count"] == 10
    cached = ld.load_latent_data(cache_dir=str(out), batch_size=4, shard=0, num_shards=1, deterministic=True, seed=5)
    vae = VAEInterface(setup["vae"], device="cpu", latent_scale=1.7)
    images = load_data(data_dir=setup["images"], batch_size=4, image_size=16, class_cond=True, deterministic=True,
                       random_flip=False, channels=1, num_workers=0, shard=0, num_shards=1)
    live = ld.EncodedBatches(images, vae)
    assert cached.label_map == {"0": "user_01", "1": "user_02"}
    for _ in range(4):  # two epochs of two whole batches
        (a, ca), (b, cb) = next(cached), next(live)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert ca["y"].tolist() == cb["y"].tolist()


def test_sharded_shuffled_stream_resumes(flipped_cache):
    streams = [ld.load_latent_data(cache_dir=str(flipped_cache), batch_size=3, shard=s, num_shards=2, seed=1)
               for s in (0, 1)]
    first = [next(streams[s])[0] for s in (0, 1)]
    # Ranks take disjoint entries of the same permutation.
    keys = [{tuple(row.flatten()[:4].tolist()) for row in batch} for batch in first]
    assert not keys[0] & keys[1]
    state = streams[0].state_dict()
    expected = next(streams[0])[0]
    again = ld.load_latent_data(cache_dir=str(flipped_cache), batch_size=3, shard=0, num_shards=2, seed=1)
    again.load_state_dict(state)
    torch.testing.assert_close(next(again)[0], expected)
    with pytest.raises(UserError, match="fewer than one batch"):
        ld.load_latent_data(cache_dir=str(flipped_cache), batch_size=64, shard=0, num_shards=1)


def test_script_errors_and_no_scale_default(setup, tmp_path, capsys):
    # The script exits 2 with one line naming the culprit.
    spec = importlib.util.spec_from_file_location("encode_latents", os.path.join(ROOT, "scripts", "encode_latents.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--data_dir", setup["images"], "--vae_path", str(tmp_path), "--output_dir", str(tmp_path / "c"),
            "--image_size", "16"]
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: script.main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and f"{tmp_path}' holds no VAE" in err
    assert err.count("\n") == 1
    with pytest.raises(UserError, match=r"image size 18 is not divisible by the VAE's downsampling factor 4"):
        _build(setup, tmp_path / "c", image_size=18)
    with pytest.raises(UserError, match=r"data has 3 channels .*expects 1"):
        _build(setup, tmp_path / "c", channels=3)
    with pytest.raises(UserError, match="latent_scale 'stored'"):
        _build(setup, tmp_path / "c", latent_scale="stored")


def test_a_read_only_cache_goes_to_the_device_without_a_torch_warning():
    """The on-GPU cache path copies a read-only memmap: torch's 'not writable'
    warning used to reach the training log. Torch warns once per process, so
    each case runs in a fresh one; the first shows the warning is real."""
    import subprocess
    import sys

    body = ("import numpy as np, torch\n"
            "from guided_diffusion_vae.latent.latent_datasets import _to_device\n"
            "a = np.arange(12, dtype=np.float32).reshape(3, 4); a.flags.writeable = False\n")
    plain = subprocess.run([sys.executable, "-c", body + "torch.from_numpy(a).to('cpu')"],
                           capture_output=True, text=True, timeout=120)
    assert "not writable" in plain.stderr
    ours = subprocess.run([sys.executable, "-W", "error", "-c", body +
                           "t = _to_device(a, np.float32, 'cpu')\n"
                           "assert t.dtype == torch.float32 and t.tolist() == a.tolist()\n"],
                          capture_output=True, text=True, timeout=120)
    assert ours.returncode == 0, ours.stderr
    assert "not writable" not in ours.stderr
