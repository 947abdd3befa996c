"""Writing samples where people look at them: one PNG per sample in a folder
per class, a grid, and the original's ``.npz`` of uint8 NHWC images; for
models of spectrogram arrays optionally one float32 ``.npy`` per sample in dB."""

import json
import os

import numpy as np

from .files import atomic_write, atomic_write_bytes, atomic_write_npy
from .images import image_grid, save_png
from .labels import class_name, folder_names


def save_samples(output_dir, images, labels=None, label_map=None, grid_columns=None, db_values=None):
    """Write every sample and a grid; returns the paths written.

    ``labels`` (one class index per image) sorts samples into one folder per
    class, named from ``label_map`` (``{"0": "user_01", ...}``); without labels
    they go to ``output_dir/samples``. ``db_values`` (float32 ``(N, H, W)``,
    e.g. dB) are written beside each PNG as ``generated_NNN.npy``.
    """
    os.makedirs(output_dir, exist_ok=True)
    counters, paths = {}, {"images": [], "arrays": []}
    folder_of = folder_names(labels, label_map) if labels is not None else {}
    for i, image in enumerate(images):
        folder = folder_of[int(labels[i])] if labels is not None else "samples"
        k = counters.get(folder, 0)
        counters[folder] = k + 1
        path = os.path.join(output_dir, folder, f"generated_{k:03d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_png(path, image)
        paths["images"].append(path)
        if db_values is not None:
            npy = path[: -len(".png")] + ".npy"
            paths["arrays"].append(atomic_write_npy(npy, np.asarray(db_values[i], dtype=np.float32)))
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
    if folder_of:  # folder -> readable name (a folder name may differ from its class name)
        folders = {folder: class_name(label, label_map) for label, folder in folder_of.items()}
        paths["classes"] = os.path.join(output_dir, "classes.json")
        atomic_write_bytes(paths["classes"], json.dumps(folders, indent=1, sort_keys=True).encode())
    return paths

