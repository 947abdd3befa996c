"""Writing samples where people look at them: one PNG per sample in a folder
per class, a grid, and the original's ``.npz`` of uint8 NHWC images."""

import io
import json
import os
import re

import numpy as np
from PIL import Image

from .checkpoint import atomic_write, atomic_write_bytes


def image_grid(images, columns=None, pad=2, background=255):
    """(N, H, W, C) uint8 -> one (rows*H', cols*W', C) uint8 picture."""
    n, h, w, c = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), background, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = img
    return grid


def to_pil(image):
    """(H, W, C) uint8 with C in 1, 3, 4 -> PIL image."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def save_png(path, image):
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


_SAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_folder_name(name):
    """``name`` made into one harmless path component: characters other than
    letters, digits and ``._+-`` become ``_``, and a name that is empty or
    starts with a dot (``..``, hidden files) gets a ``class_`` prefix. Names
    come from checkpoints other people send; none may leave the output folder."""
    safe = _SAFE.sub("_", str(name)).strip("_")[:100]
    if not safe or safe.startswith("."):
        safe = "class_" + safe
    return safe


def class_name(label, label_map):
    """The readable name of class ``label`` (from the label map)."""
    if label_map is None:
        return f"class_{int(label):03d}"
    return str(label_map[str(int(label))] if str(int(label)) in label_map else label_map[int(label)])


def class_folder_name(label, label_map):
    """The folder of class ``label``: its name from the label map, made safe."""
    return safe_folder_name(class_name(label, label_map))


def save_samples(output_dir, images, labels=None, label_map=None, grid_columns=None):
    """Write every sample and a grid; returns the paths written.

    ``labels`` (one class index per image) sorts samples into one folder per
    class, named from ``label_map`` (``{"0": "user_01", ...}``); without labels
    they go to ``output_dir/samples``.
    """
    os.makedirs(output_dir, exist_ok=True)
    counters, paths = {}, {"images": []}
    folders = {}  # safe folder name -> readable class name; two names never share a folder
    if labels is not None:
        for label in sorted(set(int(v) for v in labels)):
            name, folder = class_name(label, label_map), class_folder_name(label, label_map)
            while folder in folders and folders[folder] != name:
                folder += "_"
            folders[folder] = name
        folder_of = {name: folder for folder, name in folders.items()}
    for i, image in enumerate(images):
        folder = folder_of[class_name(labels[i], label_map)] if labels is not None else "samples"
        k = counters.get(folder, 0)
        counters[folder] = k + 1
        path = os.path.join(output_dir, folder, f"generated_{k:03d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_png(path, image)
        paths["images"].append(path)
    order = np.argsort(labels, kind="stable") if labels is not None else np.arange(len(images))
    if labels is not None and grid_columns is None:
        grid_columns = max(counters.values())
    paths["grid"] = os.path.join(output_dir, "grid.png")
    save_png(paths["grid"], image_grid(images[order], columns=grid_columns))
    shape = "x".join(str(s) for s in images.shape)
    paths["npz"] = os.path.join(output_dir, f"samples_{shape}.npz")
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels)

    def write_npz(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(paths["npz"], write_npz)
    if folders:  # the readable names, where a folder name had to differ
        paths["classes"] = os.path.join(output_dir, "classes.json")
        atomic_write_bytes(paths["classes"], json.dumps(folders, indent=1, sort_keys=True).encode())
    return paths
