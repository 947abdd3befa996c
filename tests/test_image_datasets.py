"""image_datasets: listing, labels, pixel formats, geometry, sharding, bad files."""

import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion_vae.data import image_datasets as ids
from guided_diffusion_vae.runtime import logger
from guided_diffusion_vae.runtime.errors import UserError


def _save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)  # uint16 2-D arrays become 16-bit grayscale
    return str(path)


@pytest.fixture
def class_folders(tmp_path):
    """Two classes in sub-folders: class "dark" images are black, "light" white;
    each in a different pixel format / size."""
    root = tmp_path / "data"
    _save(root / "light" / "a.png", np.full((20, 30, 3), 255, np.uint8))             # RGB, wide
    _save(root / "light" / "b.jpg", np.full((40, 24, 3), 255, np.uint8))             # RGB jpeg, tall
    _save(root / "light" / "deep" / "c.png", np.full((16, 16), 255, np.uint8))       # grayscale L, nested
    _save(root / "dark" / "d.png", np.array([0, 0, 0, 255], np.uint8) * np.ones((18, 18, 1), np.uint8))  # opaque RGBA
    _save(root / "dark" / "e.bmp", np.zeros((33, 17), np.uint8))                     # grayscale BMP
    _save(root / "dark" / "f.PNG", np.zeros((64, 64), np.uint16))      # 16-bit gray
    (root / "dark" / "notes.txt").write_text("not an image")
    (root / "dark" / ".hidden.png").write_bytes(b"junk")
    return root


def test_list_image_files(class_folders):
    files = ids.list_image_files(class_folders)
    rel = [os.path.relpath(f, class_folders) for f in files]
    assert rel == sorted(rel)
    assert set(rel) == {
        "light/a.png", "light/b.jpg", "light/deep/c.png", "dark/d.png", "dark/e.bmp", "dark/f.PNG",
    }


def test_load_data_shapes_range_and_labels(class_folders):
    data = ids.load_data(
        data_dir=str(class_folders), batch_size=6, image_size=8, class_cond=True,
        deterministic=True, random_flip=False, num_workers=0,
    )
    assert data.label_map == {0: "dark", 1: "light"}
    assert data.dataset.class_to_idx == {"dark": 0, "light": 1}
    images, cond = next(data)
    assert images.shape == (6, 3, 8, 8) and images.dtype == torch.float32
    assert cond["y"].dtype == torch.int64 and cond["y"].shape == (6,)
    assert images.min() >= -1.0 and images.max() <= 1.0
    # black images are class 0, white ones class 1 (checks label <-> file pairing)
    means = images.mean(dim=(1, 2, 3))
    for mean, label in zip(means.tolist(), cond["y"].tolist()):
        assert mean == pytest.approx(-1.0 if label == 0 else 1.0, abs=0.02)
    # endless: more batches than one epoch
    for _ in range(3):
        more, _ = next(data)
        assert more.shape == (6, 3, 8, 8)


def test_prefix_labels_and_single_channel(tmp_path):
    root = tmp_path / "flat"
    for name, value in (("cat_1.png", 10), ("cat_2.png", 20), ("dog_1.png", 200), ("ant_7.png", 90)):
        _save(root / name, np.full((12, 12, 3), value, np.uint8))
    ds = ids.ImageFolderDataset(root, 4, class_cond=True, channels=1, random_flip=False)
    assert ds.label_map == {0: "ant", 1: "cat", 2: "dog"}
    assert [os.path.basename(p) for p in ds.paths] == ["ant_7.png", "cat_1.png", "cat_2.png", "dog_1.png"]
    assert ds.labels == [0, 1, 1, 2]
    pixels, cond = ds[3]
    assert pixels.shape == (1, 4, 4) and int(cond["y"]) == 2
    assert np.allclose(pixels, 200 / 127.5 - 1, atol=1e-5)
    # unconditional: no labels, no label map
    plain = ids.ImageFolderDataset(root, 4)
    assert plain.label_map is None and plain[0][1] == {}
    # a file name without a label prefix is named in the error
    _save(root / "nolabel.png", np.zeros((12, 12), np.uint8))
    with pytest.raises(UserError, match="nolabel.png"):
        ids.ImageFolderDataset(root, 4, class_cond=True)
    # the prefix option works inside class folders too
    _save(tmp_path / "nested" / "x" / "a_1.png", np.zeros((8, 8), np.uint8))
    _save(tmp_path / "nested" / "y" / "b_1.png", np.zeros((8, 8), np.uint8))
    nested = ids.ImageFolderDataset(tmp_path / "nested", 4, class_cond=True, label_source="prefix")
    assert nested.label_map == {0: "a", 1: "b"}


def test_grayscale_rgb_rgba_conversion(tmp_path):
    root = tmp_path / "modes"
    gray = _save(root / "gray.png", np.full((10, 10), 64, np.uint8))
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 255          # red ...
    rgba[:, :5, 3] = 255        # ... opaque on the left, fully transparent on the right
    rgba_path = _save(root / "rgba.png", rgba)
    deep = _save(root / "deep.png", np.full((10, 10), 128 * 257, np.uint16))
    assert Image.open(deep).mode.startswith("I")

    white = ids.ImageDataset(10, [gray, rgba_path, deep], random_flip=False)
    g, _ = white[0]
    assert g.shape == (3, 10, 10) and np.allclose(g, 64 / 127.5 - 1)  # replicated to 3 channels
    c, _ = white[1]
    assert np.allclose(c[:, :, :5], [[[1.0]], [[-1.0]], [[-1.0]]])  # red where opaque
    assert np.allclose(c[:, :, 5:], 1.0)  # white where transparent
    assert np.allclose(white[2][0], 128 / 127.5 - 1, atol=1e-5)  # 16-bit scaled to 8 bits, not clipped

    dropped = ids.ImageDataset(10, [rgba_path], random_flip=False, alpha="drop")
    assert np.allclose(dropped[0][0], [[[1.0]], [[-1.0]], [[-1.0]]])  # red everywhere

    mono = ids.ImageDataset(10, [rgba_path], random_flip=False, channels=1)
    m, _ = mono[0]
    assert m.shape == (1, 10, 10)
    assert np.allclose(m[:, :, 5:], 1.0) and m[0, 0, 0] < -0.3  # luma of red is dark


def test_non_square_centre_crop_and_random_crop(tmp_path):
    # 60x20, white band in the middle third: the centre crop keeps only white.
    wide = np.zeros((20, 60), np.uint8)
    wide[:, 20:40] = 255
    path = _save(tmp_path / "wide.png", wide)
    ds = ids.ImageDataset(10, [path], random_flip=False, channels=1)
    out, _ = ds[0]
    assert out.shape == (1, 10, 10)
    assert out[:, :, 2:8].min() > 0.9  # interior: white (bicubic edges may ring)
    tall = np.zeros((90, 30, 3), np.uint8)
    tall[30:60] = 255
    out_tall, _ = ids.ImageDataset(10, [_save(tmp_path / "tall.png", tall)], random_flip=False)[0]
    assert out_tall.shape == (3, 10, 10) and out_tall[:, 2:8].min() > 0.9
    random.seed(0)
    cropped = ids.ImageDataset(16, [path], random_crop=True, random_flip=False)
    shapes = {cropped[0][0].shape for _ in range(5)}
    assert shapes == {(3, 16, 16)}


def test_random_flip(tmp_path):
    half = np.zeros((8, 8), np.uint8)
    half[:, 4:] = 255  # dark left, bright right
    path = _save(tmp_path / "half.png", half)
    random.seed(1)
    flipping = ids.ImageDataset(8, [path], random_flip=True, channels=1)
    lefts = [flipping[0][0][0, :, 0].mean() for _ in range(30)]
    assert any(v < -0.9 for v in lefts) and any(v > 0.9 for v in lefts)
    fixed = ids.ImageDataset(8, [path], random_flip=False, channels=1)
    assert all(fixed[0][0][0, :, 0].mean() < -0.9 for _ in range(10))


def test_sharding_is_disjoint_and_covering(tmp_path):
    root = tmp_path / "many"
    for i in range(7):
        _save(root / f"img{i}.png", np.full((6, 6), i * 30, np.uint8))
    shards = [ids.ImageFolderDataset(root, 4, shard=k, num_shards=3).paths for k in range(3)]
    assert [len(s) for s in shards] == [3, 2, 2]
    flat = [p for s in shards for p in s]
    assert len(set(flat)) == len(flat) == 7 and set(flat) == set(ids.list_image_files(root))
    data = ids.load_data(data_dir=str(root), batch_size=2, image_size=4, shard=1, num_shards=3,
                         num_workers=0)
    assert data.dataset.paths == shards[1]
    with pytest.raises(UserError, match="fewer than batch_size"):
        ids.load_data(data_dir=str(root), batch_size=3, image_size=4, shard=2, num_shards=3)


def test_missing_empty_and_imageless_folders(tmp_path):
    with pytest.raises(UserError, match="not found") as info:
        ids.load_data(data_dir=str(tmp_path / "nowhere"), batch_size=1, image_size=8)
    assert str(tmp_path / "nowhere") in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as info:
        ids.load_data(data_dir=str(empty), batch_size=1, image_size=8)
    assert str(empty) in str(info.value)
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="no image files") as info:
        ids.ImageFolderDataset(empty, 8)
    assert str(empty) in str(info.value)


@pytest.fixture
def with_corrupt(tmp_path):
    root = tmp_path / "bad"
    for i in range(4):
        _save(root / f"ok{i}.png", np.full((8, 8, 3), 100, np.uint8))
    bad = root / "ok2_corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return root, str(bad)


def test_corrupt_file_stops_with_its_path(with_corrupt):
    root, bad = with_corrupt
    ds = ids.ImageFolderDataset(root, 8)
    index = ds.paths.index(bad)
    with pytest.raises(UserError) as info:
        ds[index]
    assert bad in str(info.value) and "\n" not in str(info.value)
    # through a worker process too: a clean one-line UserError, not a traceback dump
    data = ids.load_data(data_dir=str(root), batch_size=5, image_size=8, deterministic=True,
                         num_workers=1)
    with pytest.raises(UserError) as info:
        next(data)
    assert bad in str(info.value) and "\n" not in str(info.value)


def test_skip_bad_files_counts_and_logs(with_corrupt, tmp_path):
    root, bad = with_corrupt
    logger.configure(dir=str(tmp_path / "logs"), format_strs=["log"])
    try:
        data = ids.load_data(data_dir=str(root), batch_size=5, image_size=8, deterministic=True,
                             skip_bad_files=True, num_workers=1)
        for _ in range(3):
            images, _ = next(data)
            assert images.shape == (5, 3, 8, 8)
            assert torch.allclose(images, torch.tensor(100 / 127.5 - 1))  # no zeros slipped in
        assert data.skipped_files == {bad} and data.num_skipped == 1
        text = (tmp_path / "logs" / "log.txt").read_text()
        assert "skipped 1 unreadable image file(s)" in text and bad in text
    finally:
        logger.get_current().close()
        logger.Logger.CURRENT = logger.Logger.DEFAULT = None
