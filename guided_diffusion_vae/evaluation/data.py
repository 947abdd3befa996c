"""Labelled image sets for evaluation: real folders, generated folders, ``.npz``.

Every set becomes a :class:`LabelledImages`: uint8 images ``(N, C, S, S)``,
int64 labels ``(N,)`` indexing ``class_names``, and the file each image came
from (for the report). All sets of one evaluation share the class names of
the real training set (sorted folder names, the order training uses), so a
label means the same person everywhere.

Folders hold one sub-folder per class (``user_01/*.png``), as the simulator
writes real data and the sampling scripts write samples; images directly in
the top folder (the sampling scripts' ``grid.png``) are not samples and are
skipped. A ``.npz`` from the sampling scripts holds ``arr_0`` (N, H, W, C)
uint8 and ``arr_1`` the class indices, in the sorted class order above.

A real set may also be a folder of ``.npy``/``.npz`` spectrograms in class
sub-folders (see :mod:`guided_diffusion_vae.data.array_datasets`), mapped to
images with one dB range for the training and the held-out set.
"""

import dataclasses
import json
import os

import numpy as np
import torch
from PIL import Image

from ..data.array_datasets import ArrayFolderDataset
from ..runtime.errors import UserError
from ..training.person_classifier import match_channels, to_uint8
from ..data.image_datasets import data_files
from ..data.image_datasets import detect_channels as detect_image_channels
from ..data.image_datasets import list_image_files
from ..latent.latent_datasets import LatentCache
from ..latent.vae_wrapper import VAEInterface


@dataclasses.dataclass
class LabelledImages:
    images: np.ndarray  # uint8 (N, C, S, S)
    labels: np.ndarray  # int64 (N,)
    class_names: list
    source: str
    files: list = dataclasses.field(default_factory=list)  # one per image, "" for arrays

    def __len__(self):
        return len(self.labels)

    def counts(self):
        """Images per class, ``(num_classes,)``."""
        return np.bincount(self.labels, minlength=len(self.class_names))

    def subset(self, index):
        index = np.asarray(index, dtype=np.int64)
        files = [self.files[i] for i in index] if self.files else []
        return LabelledImages(self.images[index], self.labels[index], self.class_names, self.source, files)


def _decode(path, image_size, channels):
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.BICUBIC)
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read image {path}: {err}") from None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _class_files(folder):
    """``{class_name: [files]}`` of the images in class sub-folders of ``folder``."""
    if not os.path.isdir(folder):
        raise UserError(f"image folder not found: {folder}")
    found = {}
    for path in list_image_files(folder):
        parts = os.path.relpath(path, folder).split(os.sep)
        if len(parts) >= 2:
            found.setdefault(parts[0], []).append(path)
    if not found:
        raise UserError(f"{folder} has no images in class sub-folders (expected {folder}/<person>/*.png)")
    return found


def detect_channels(folder, max_files=16):
    """1 when the first images of ``folder`` are grayscale (R == G == B), else 3."""
    return detect_image_channels([f for group in _class_files(folder).values() for f in group], max_files)


def image_size_of(folder):
    """Side of the first image of ``folder`` (the size evaluation runs at)."""
    first = next(iter(sorted(_class_files(folder).items())))[1][0]
    with Image.open(first) as img:
        if img.size[0] != img.size[1]:
            raise UserError(f"{first} is {img.size[0]}x{img.size[1]}: evaluation needs square images")
        return img.size[0]


def load_folder(folder, *, image_size, channels, class_names=None, max_per_class=None):
    """Images of ``folder``'s class sub-folders.

    :param class_names: the evaluation's classes; None takes the folder's own
        (sorted). A sub-folder not among them is an error naming it.
    :param max_per_class: keep the first (sorted) files of each class.
    """
    found = _class_files(folder)
    renamed = os.path.join(folder, "classes.json")  # the sampling scripts' safe folder -> class name
    if os.path.isfile(renamed):
        with open(renamed) as f:
            names = json.load(f)
        found = {str(names.get(k, k)): v for k, v in found.items()}
    if class_names is None:
        class_names = sorted(found)
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise UserError(f"{folder}: class folder(s) {', '.join(unknown[:5])} are not classes of the real "
                        f"training data ({', '.join(class_names[:5])}{', ...' if len(class_names) > 5 else ''})")
    index = {name: i for i, name in enumerate(class_names)}
    images, labels, files = [], [], []
    for name in sorted(found):
        chosen = found[name][:max_per_class] if max_per_class else found[name]
        for path in chosen:
            images.append(_decode(path, image_size, channels))
            labels.append(index[name])
            files.append(path)
    return LabelledImages(np.stack(images), np.asarray(labels, dtype=np.int64), list(class_names), folder, files)


def is_array_folder(path):
    """True for a folder of ``.npy``/``.npz`` spectrograms (and no images)."""
    if not os.path.isdir(path) or is_latent_cache(path):
        return False
    try:
        return data_files(path)[0] == "arrays"
    except UserError:
        return False


def load_array_folder(folder, *, image_size, db_range, class_names=None):
    """The spectrograms of ``folder``'s class sub-folders as one-channel uint8
    images, mapped from dB with ``db_range`` (a pair, or "measure": the
    folder's own minimum and maximum). Returns the set and the range used."""
    _, files = data_files(folder)
    arrays = ArrayFolderDataset(folder, files, image_size, db_range=db_range, class_cond=True, label_source="folder",
                                channels=1)
    class_names = class_names or arrays.class_names
    unknown = sorted(set(arrays.class_names) - set(class_names))
    if unknown:
        raise UserError(f"{folder}: class folder(s) {', '.join(unknown[:5])} are not classes of the real "
                        f"training data ({', '.join(class_names[:5])}{', ...' if len(class_names) > 5 else ''})")
    remap = np.array([class_names.index(n) for n in arrays.class_names], dtype=np.int64)
    images = to_uint8(torch.from_numpy(arrays.values[:, None]))
    return (LabelledImages(images, remap[np.asarray(arrays.labels, dtype=np.int64)], list(class_names), folder,
                           list(arrays.all_paths)), arrays.db_range)


def load_npz(path, *, image_size, channels, class_names):
    """Samples from a ``.npz`` written by the sampling scripts (see module docstring)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            images = data["arr_0"]
            labels = data["arr_1"] if "arr_1" in data.files else None
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot read samples from {path}: {err}") from None
    if labels is None:
        raise UserError(f"{path} holds no class labels (arr_1): identity metrics need conditional samples")
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
        raise UserError(f"{path}: arr_0 must be uint8 (N, H, W, C) with C 1 or 3, got {images.dtype} {images.shape}")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(images) or (len(labels) and not 0 <= labels.min() <= labels.max() < len(class_names)):
        raise UserError(f"{path}: arr_1 must hold one class index in [0, {len(class_names)}) per image")
    out = []
    for image in images:
        img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.BICUBIC)
        array = np.asarray(img, dtype=np.uint8)
        out.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
    stacked = np.stack(out) if out else np.zeros((0, channels, image_size, image_size), np.uint8)
    return LabelledImages(stacked, labels, list(class_names), path, [""] * len(labels))


def load_generated(path, *, image_size, channels, class_names):
    """Generated samples from a folder or a ``.npz`` (see the module docstring)."""
    if os.path.isfile(path) and path.endswith(".npz"):
        return load_npz(path, image_size=image_size, channels=channels, class_names=class_names)
    if os.path.isdir(path):
        return load_folder(path, image_size=image_size, channels=channels, class_names=class_names)
    raise UserError(f"generated samples not found: {path} (a folder of class sub-folders or a .npz)")


def per_class_first(data, k):
    """Indices of the first ``k`` images of every class (fewer where a class has fewer)."""
    keep = []
    for c in range(len(data.class_names)):
        keep.extend(np.flatnonzero(data.labels == c)[:k].tolist())
    return np.asarray(keep, dtype=np.int64)


def is_latent_cache(path):
    """True for a folder written by ``encode_latents.py``."""
    return os.path.isfile(os.path.join(path, "meta.json")) and os.path.isfile(os.path.join(path, "latents.npy"))


def load_latent_cache(path, *, vae_path, device, image_size, channels, class_names=None):
    """Images decoded from a latent cache (its unflipped entries) with its VAE.

    :param vae_path: the VAE to decode with ("" = the path the cache records).
    Note that such "real" images are VAE reconstructions, not the originals.
    """
    import torch


    cache = LatentCache(path)
    vae_path = vae_path or cache.vae_description.get("path", "")
    if not vae_path:
        raise UserError(f"latent cache {path} records no VAE path: pass --vae_path to decode it")
    vae = VAEInterface(vae_path, device=device)
    if vae.fingerprint != cache.vae_description.get("fingerprint", vae.fingerprint):
        raise UserError(f"latent cache {path} was encoded with another VAE than {vae_path} (fingerprints differ)")
    count = cache.meta["num_images"]  # entries past it are the mirrored copies
    names = [cache.label_map[str(i)] for i in range(len(cache.label_map))] if cache.label_map else None
    if names is None:
        raise UserError(f"latent cache {path} has no label map: identity metrics need classes")
    class_names = class_names or sorted(names)
    unknown = sorted(set(names) - set(class_names))
    if unknown:
        raise UserError(f"latent cache {path}: classes {', '.join(unknown[:5])} are not classes of the real "
                        "training data")
    remap = np.array([class_names.index(n) for n in names], dtype=np.int64)
    images = []
    for start in range(0, count, 256):
        z = torch.from_numpy(np.array(cache.latents[start:min(count, start + 256)], dtype=np.float32)).to(device)
        x = match_channels(vae.decode_unscaled(z).float().clamp(-1, 1), channels)
        if x.shape[-1] != image_size:
            x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bicubic")
        images.append(to_uint8(x))
    return LabelledImages(np.concatenate(images), remap[np.asarray(cache.labels[:count])], list(class_names),
                          f"latent cache {path}", [""] * count)
