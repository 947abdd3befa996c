"""Spectrogram arrays (.npy/.npz) as data: what is accepted and how it is
named, labelled, mapped from dB to [-1, 1] and resized; the range travels
with the VAE, the cache and the checkpoint; a one-channel run goes from a
folder of .npy files to samples written as PNG and as .npy in dB."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion_vae.training import checkpoint as ckpt
from guided_diffusion_vae.data.array_datasets import parse_db_range, resolve_db_range, to_db, to_unit_range
from guided_diffusion_vae.runtime.errors import UserError
from guided_diffusion_vae.data.image_datasets import image_batch_stream, open_data_folder
from helpers.vae_helpers import make_image_folder, one_torch_thread, spectrogram_like

_threads = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def _walk(rng, size=16):
    """A spectrogram in dB: a few Doppler tracks over a -60 dB floor, 0 dB peak."""
    return spectrogram_like(rng, size, 1)[:, :, 0].astype(np.float32) / 255.0 * 60.0 - 60.0


def test_npy_and_npz_layouts_become_named_labelled_spectrograms(tmp_path):
    rng = np.random.default_rng(0)
    one, stack, first, second = _walk(rng), np.stack([_walk(rng) for _ in range(3)]), \
        np.stack([_walk(rng) for _ in range(2)]), _walk(rng)
    np.save(tmp_path / "alice_one.npy", one)
    np.save(tmp_path / "alice_stack.npy", stack)
    np.savez(tmp_path / "bob_walks.npz", second=second, first=first)
    data = open_data_folder(tmp_path, 16, class_cond=True, channels=1, db_range="-60,0")  # prefixes
    d = str(tmp_path)
    assert data.all_paths == [f"{d}/alice_one.npy", *(f"{d}/alice_stack.npy[{i}]" for i in range(3)),
                              f"{d}/bob_walks.npz[first][0]", f"{d}/bob_walks.npz[first][1]", f"{d}/bob_walks.npz[second]"]
    assert data.label_map == {0: "alice", 1: "bob"} and data.labels == [0, 0, 0, 0, 1, 1, 1]
    originals = [one, *stack, *first, second]
    for i, original in enumerate(originals):
        pixels, cond = data[i]
        assert pixels.shape == (1, 16, 16) and pixels.dtype == np.float32 and int(cond["y"]) == data.labels[i]
        np.testing.assert_allclose(pixels[0], (original + 60.0) / 30.0 - 1.0, atol=1e-6)
    # The training stream serves them like images, three channels on request.
    stream, _ = image_batch_stream(data_dir=tmp_path, batch_size=7, image_size=16, channels=3, class_cond=True,
                                   random_flip=False, num_workers=0, shuffle=False, db_range="-60,0")
    batch, cond = next(stream)
    assert batch.shape == (7, 3, 16, 16) and torch.equal(batch[:, 0], batch[:, 2])
    assert cond["y"].tolist() == data.labels


def test_arrays_are_resized_and_cropped_like_images(tmp_path):
    wide = np.arange(16 * 32, dtype=np.float32).reshape(16, 32)
    np.save(tmp_path / "wide.npy", wide)
    data = open_data_folder(tmp_path, 16, channels=1, db_range=f"0,{wide.max()}")
    # The short side is already 16: the centre square is cut out, values untouched.
    np.testing.assert_allclose(data[0][0][0], to_unit_range(wide[:, 8:24], (0.0, wide.max())), atol=1e-6)
    np.save(tmp_path / "wide.npy", np.kron(wide[:, 8:24], np.ones((2, 2), np.float32)))  # 32x32
    halved = open_data_folder(tmp_path, 16, channels=1, db_range=f"0,{wide.max()}")
    np.testing.assert_allclose(halved[0][0][0], data[0][0][0], atol=1e-5)  # a 2x box reduction


def test_the_db_mapping_clips_inverts_and_is_resolved_against_a_stored_range():
    values = np.array([-90.0, -60.0, -30.0, 0.0, 12.0])
    unit = to_unit_range(values, (-60.0, 0.0))
    np.testing.assert_allclose(unit, [-1.0, -1.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(to_db(unit, (-60.0, 0.0)), [-60.0, -60.0, -30.0, 0.0, 0.0])
    assert parse_db_range(" -60, 0 ") == (-60.0, 0.0) and parse_db_range("AUTO") == "auto"
    for bad in ("0,-60", "-60", "a,b", "nan,0", "-60,0,5"):
        with pytest.raises(UserError, match="db_range"):
            parse_db_range(bad)
    assert resolve_db_range("auto") == "measure"
    assert resolve_db_range("auto", [-80.0, 0.0], "the VAE v") == (-80.0, 0.0)
    assert resolve_db_range("-80,0", [-80.0, 0.0], "the VAE v") == (-80.0, 0.0)
    with pytest.raises(UserError, match=r"db_range -60,0 differs from -80,0, the range the VAE v was made with"):
        resolve_db_range("-60,0", [-80.0, 0.0], "the VAE v")


def test_a_measured_range_is_the_data_min_and_max(tmp_path):
    np.save(tmp_path / "a_1.npy", np.full((16, 16), -42.0))
    np.save(tmp_path / "a_2.npy", np.full((16, 16), 7.0))
    data = open_data_folder(tmp_path, 16)
    assert data.db_range == (-42.0, 7.0) and data.measured
    np.save(tmp_path / "a_2.npy", np.full((16, 16), -42.0))
    with pytest.raises(UserError, match="no range to map; give --db_range"):
        open_data_folder(tmp_path, 16)


def test_labels_from_a_csv_table(tmp_path):
    rng = np.random.default_rng(1)
    for rel in ("day1/w0.npy", "day1/w1.npy", "day2/w0.npy"):
        os.makedirs(tmp_path / "data" / os.path.dirname(rel), exist_ok=True)
        np.save(tmp_path / "data" / rel, _walk(rng))
    table = tmp_path / "labels.csv"
    table.write_text("file,label\nday1/w0.npy,carol\nday1\\w1.npy,dave\n./day2/w0.npy,carol\nday9/x.npy,erin\n")
    data = open_data_folder(tmp_path / "data", 16, class_cond=True, labels_csv=str(table))  # auto: the table
    assert data.label_map == {0: "carol", 1: "dave"} and data.labels == [0, 1, 0]
    assert open_data_folder(tmp_path / "data", 16, class_cond=True).label_map == {0: "day1", 1: "day2"}

    table.write_text("day1/w0.npy,carol\nday1/w1.npy,dave\n")
    with pytest.raises(UserError, match=r"has no row for day2/w0.npy \(1 of 3 files"):
        open_data_folder(tmp_path / "data", 16, class_cond=True, labels_csv=str(table))
    table.write_text("day1/w0.npy,carol\nday1/w0.npy,dave\n")
    with pytest.raises(UserError, match="line 2: 'day1/w0.npy' has two labels"):
        open_data_folder(tmp_path / "data", 16, class_cond=True, labels_csv=str(table))
    table.write_text("day1/w0.npy;carol\n")
    with pytest.raises(UserError, match="line 1: expected 'file,label'"):
        open_data_folder(tmp_path / "data", 16, class_cond=True, labels_csv=str(table))
    with pytest.raises(UserError, match="label_source is 'folder'"):
        open_data_folder(tmp_path / "data", 16, class_cond=True, label_source="folder", labels_csv=str(table))
    with pytest.raises(UserError, match="label_source csv needs --labels_csv"):
        open_data_folder(tmp_path / "data", 16, class_cond=True, label_source="csv")

    # The same table works for image folders.
    images = make_image_folder(tmp_path / "images", classes=("a", "b"), per_class=1, size=8)
    table.write_text("".join(f"{os.path.relpath(p, tmp_path / 'images')},{name}\n"
                             for p, name in zip(images, ("zed", "amy"))))
    assert open_data_folder(tmp_path / "images", 8, class_cond=True, labels_csv=str(table)).labels == [1, 0]


def test_a_folder_of_one_kind_only_and_db_range_for_arrays_only(tmp_path):
    make_image_folder(tmp_path / "images", per_class=1, size=8)
    with pytest.raises(UserError, match="db_range applies to .npy/.npz data"):
        open_data_folder(tmp_path / "images", 8, db_range="-60,0")
    np.save(tmp_path / "images" / "user_01" / "extra.npy", np.zeros((8, 8)))
    with pytest.raises(UserError, match="holds both images .* and arrays"):
        open_data_folder(tmp_path / "images", 8)


# --------------------------------------------------------------------------- #
# end to end: a folder of .npy files -> VAE -> cache -> diffusion -> samples
# --------------------------------------------------------------------------- #

TINY_DIFFUSION = {"num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2", "attention_resolutions": "2",
                  "diffusion_steps": 100, "batch_size": 4, "lr_anneal_steps": 2, "save_interval": 1, "log_interval": 1,
                  "num_workers": 0, "tensorboard": False, "class_cond": True, "image_size": 16}


def test_npy_folder_trains_end_to_end_in_one_channel(tmp_path):
    from guided_diffusion_vae.training.diffusion_training import pixel_train_defaults, pixel_training_data, run_training
    from guided_diffusion_vae.latent.latent_datasets import LatentCache, build_latent_cache, encode_latents_defaults
    from guided_diffusion_vae.training.latent_training import latent_train_defaults, latent_training_data
    from guided_diffusion_vae.sampling.sample_from_checkpoint import latent_sample_defaults, run_sampling
    from guided_diffusion_vae.training.vae_training import train_vae, vae_train_defaults

    rng = np.random.default_rng(0)
    data = tmp_path / "arrays"
    for person in ("alice", "bob"):
        (data / person).mkdir(parents=True)
        for i in range(6):
            np.save(data / person / f"walk_{i}.npy", _walk(rng))
    low = min(float(np.load(p).min()) for p in data.rglob("*.npy"))
    high = max(float(np.load(p).max()) for p in data.rglob("*.npy"))

    vae_dir = tmp_path / "vae"
    train_vae({**vae_train_defaults(), "data_dir": str(data), "output_dir": str(vae_dir), "image_size": 16,
               "vae_size": "tiny", "batch_size": 4, "lr_anneal_steps": 2, "save_interval": 2, "log_interval": 1,
               "identity_steps": 2, "holdout_fraction": 0.2, "num_workers": 0, "progress": False})
    assert json.loads((vae_dir / "config.json").read_text())["in_channels"] == 1
    assert json.loads((vae_dir / "latent_stats.json").read_text())["db_range"] == [low, high]  # measured

    # Encoding with another range than the VAE's is refused before anything is written.
    encode = {**encode_latents_defaults(), "data_dir": str(data), "vae_path": str(vae_dir), "image_size": 16,
              "batch_size": 4, "latent_scale": "stored", "random_flip": False, "num_workers": 0, "progress": False}
    with pytest.raises(UserError, match="differs from"):
        build_latent_cache(**{**encode, "output_dir": str(tmp_path / "refused"), "db_range": "-50,0"})
    assert not (tmp_path / "refused").exists()
    meta = build_latent_cache(**{**encode, "output_dir": str(tmp_path / "cache")})  # auto: the VAE's range
    assert meta["db_range"] == [low, high] and meta["channels"] == 1 and meta["label_map"] == {"0": "alice", "1": "bob"}
    assert len(LatentCache(str(tmp_path / "cache"))) == 12

    run_training({**latent_train_defaults(), **TINY_DIFFUSION, "latent_cache": str(tmp_path / "cache"),
                  "log_dir": str(tmp_path / "run")}, latent_training_data)
    stored = ckpt.read_metadata(str(tmp_path / "run" / "model000002.safetensors"))
    assert stored["data"]["db_range"] == [low, high] and stored["vae"]["in_channels"] == 1

    paths = run_sampling({**latent_sample_defaults(), "model_path": str(tmp_path / "run"),
                          "output_dir": str(tmp_path / "out"), "num_images_per_user": 2,
                          "timestep_respacing": "ddim4", "use_ddim": True, "save_npy": True})
    assert sorted(os.path.relpath(p, tmp_path / "out") for p in paths["arrays"]) == [
        f"{who}/generated_00{i}.npy" for who in ("alice", "bob") for i in (0, 1)]
    for png, npy in zip(paths["images"], paths["arrays"]):
        values = np.load(npy)
        assert values.shape == (16, 16) and values.dtype == np.float32
        assert low <= values.min() and values.max() <= high
        with Image.open(png) as img:
            assert img.mode == "L" and img.size == (16, 16)  # one channel end to end
            pixels = np.asarray(img).astype(np.float64)
        # The PNG is the same sample, rounded to 8 bits of the same range.
        assert np.abs(pixels - (values - low) / (high - low) * 255.0).max() <= 0.51

    # Evaluation reads the real arrays with the VAE's range and the generated PNGs.
    from guided_diffusion_vae.evaluation.evaluate import evaluate_defaults, run_evaluation

    result = run_evaluation({**evaluate_defaults(), "real_train": str(data), "real_test": str(data),
                             "generated": str(tmp_path / "out"), "vae_path": str(vae_dir),
                             "output_json": str(tmp_path / "eval" / "metrics.json"), "classifier_steps": 5,
                             "classifier_embed_dim": 8, "augment_k": "2", "augment_generated": 2})
    assert result["counts"] == {"real_train": 12, "real_test": 12, "generated": 4}
    assert 0.0 <= result["cas"] <= 1.0 and 0.0 <= result["rcas"] <= 1.0

    # Encoding on the fly from the folder (the VAE's range again) and pixel-space training work too.
    run_training({**latent_train_defaults(), **TINY_DIFFUSION, "data_dir": str(data), "vae_path": str(vae_dir),
                  "log_dir": str(tmp_path / "on_the_fly")}, latent_training_data)
    assert ckpt.read_metadata(str(tmp_path / "on_the_fly" / "model000002.safetensors"))["data"]["db_range"] == [low, high]
    run_training({**pixel_train_defaults(), **TINY_DIFFUSION, "data_dir": str(data), "in_channels": 1,
                  "attention_resolutions": "8", "db_range": "-60,0", "log_dir": str(tmp_path / "pixels")}, pixel_training_data)
    pixel_meta = ckpt.read_metadata(str(tmp_path / "pixels" / "model000002.safetensors"))
    assert pixel_meta["data"]["db_range"] == [-60.0, 0.0] and pixel_meta["model"]["in_channels"] == 1


def _npz_claiming(path, shape, payload=b"\0" * 64):
    """A .npz whose member ``x`` has a header claiming ``shape`` (float64) but
    holds only ``payload``: what a zip bomb's headers look like, without the GBs."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", header.getvalue() + payload)


def test_npz_headers_are_checked_before_anything_is_decompressed(tmp_path):
    np.save(tmp_path / "a_1.npy", np.zeros((16, 16), np.float32))
    _npz_claiming(tmp_path / "a_2.npz", (1, 40000, 40000))  # 12 GB once read
    with pytest.raises(UserError, match=r"a_2.npz\[x\] claims shape \(1, 40000, 40000\) of float64, 11.9 GiB"):
        open_data_folder(tmp_path, 16, channels=1, db_range="-60,0")
    # A small member of another shape is refused from its header too, not read.
    _npz_claiming(tmp_path / "a_2.npz", (16, 20))
    with pytest.raises(UserError, match=r"a_2.npz\[x\] is 16x20, but .*a_1.npy is 16x16"):
        open_data_folder(tmp_path, 16, channels=1, db_range="-60,0")
