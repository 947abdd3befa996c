"""Writing samples where people look at them: one PNG per sample in a folder
per class, a grid, and the original's ``.npz`` of uint8 NHWC images; for
models of spectrogram arrays optionally one float32 ``.npy`` per sample in dB."""

import os
import re

import numpy as np

from ..runtime.errors import UserError
from ..runtime.files import (
    atomic_write, atomic_write_bytes, atomic_write_json, folder_written_whole, npy_bytes, write_staged,
)
from ..runtime.images import image_grid, png_bytes, save_png
from ..data.labels import class_name, folder_names


# What save_samples writes: a sample folder holds these and nothing else.
_SAMPLE_FILE = re.compile(r"generated_\d+\.(png|npy)")
_RUN_FILE = re.compile(r"grid\.png|classes\.json|sampling\.json|samples_[0-9x]+\.npz")
# How the samples were drawn (model, sampler, guidance), beside them.
RECORD_FILE = "sampling.json"


def _is_sample_entry(folder, name):
    full = os.path.join(folder, name)
    if os.path.isdir(full) and not os.path.islink(full):
        return all(_SAMPLE_FILE.fullmatch(n) for n in os.listdir(full))
    return bool(_RUN_FILE.fullmatch(name))


def check_sample_folder(output_dir, flag="output_dir"):
    """Refuse an existing ``output_dir`` that holds anything but an earlier
    sampling run's files: :func:`save_samples_whole` replaces it whole."""
    if not os.path.isdir(output_dir):
        return
    foreign = sorted(n for n in os.listdir(output_dir) if not _is_sample_entry(output_dir, n))
    if foreign:
        raise UserError(f"{flag} {output_dir!r} holds files that are not samples (e.g. {foreign[0]!r}), and a "
                        "sampling run replaces its folder whole: choose a new or empty folder")


def save_samples_whole(output_dir, images, labels=None, label_map=None, db_values=None, record=None):
    """:func:`save_samples` into a staging folder that then replaces
    ``output_dir`` whole (``files.folder_written_whole``): a run stopped while
    writing leaves the previous run's samples, and a rerun never mixes its
    samples with older ones (``evaluate.py`` counts every file it finds).
    Returns the paths as they lie in ``output_dir``."""
    check_sample_folder(output_dir)
    with folder_written_whole(output_dir) as staging:
        paths = save_samples(staging, images, labels, label_map, db_values=db_values, record=record, staged=True)

    def moved(path):
        return os.path.join(output_dir, os.path.relpath(path, staging))

    return {key: [moved(p) for p in value] if isinstance(value, list) else moved(value)
            for key, value in paths.items()}


def save_samples(output_dir, images, labels=None, label_map=None, grid_columns=None, db_values=None, record=None,
                 staged=False):
    """Write every sample and a grid; returns the paths written.

    ``labels`` (one class index per image) sorts samples into one folder per
    class, named from ``label_map`` (``{"0": "user_01", ...}``); without labels
    they go to ``output_dir/samples``. ``db_values`` (float32 ``(N, H, W)``,
    e.g. dB) are written beside each PNG as ``generated_NNN.npy``.
    ``record`` (JSON-able: how the samples were drawn) becomes ``sampling.json``.
    ``staged``: ``output_dir`` is a ``folder_written_whole`` staging folder,
    so each sample is written plainly rather than atomically.
    """
    os.makedirs(output_dir, exist_ok=True)
    put = write_staged if staged else atomic_write_bytes
    counters, paths = {}, {"images": [], "arrays": []}
    folder_of = folder_names(labels, label_map) if labels is not None else {}
    for i, image in enumerate(images):
        folder = folder_of[int(labels[i])] if labels is not None else "samples"
        k = counters.get(folder, 0)
        counters[folder] = k + 1
        path = os.path.join(output_dir, folder, f"generated_{k:03d}.png")  # both writers make its folder
        paths["images"].append(put(path, png_bytes(image)))
        if db_values is not None:
            npy = path[: -len(".png")] + ".npy"
            paths["arrays"].append(put(npy, npy_bytes(np.asarray(db_values[i], dtype=np.float32))))
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
        atomic_write_json(paths["classes"], folders, indent=1)
    if record is not None:
        paths["record"] = os.path.join(output_dir, RECORD_FILE)
        atomic_write_json(paths["record"], record, indent=1)
    return paths

