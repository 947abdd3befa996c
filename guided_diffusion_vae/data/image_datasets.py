"""Image folders as endless training batches (the guided-diffusion data loader, extended).

``load_data(data_dir=..., batch_size=..., image_size=...)`` returns an iterator
of ``(images, cond)``: ``images`` a float32 tensor ``(N, C, S, S)`` in [-1, 1],
``cond`` ``{"y": int64 tensor (N,)}`` with ``class_cond=True``, else ``{}``.
It never ends (epochs follow each other); its ``label_map`` attribute is
``{class_index: class_name}`` (or None), the map checkpoints store.

Files
    ``list_image_files`` walks ``data_dir`` recursively and keeps
    ``.jpg .jpeg .png .gif .bmp .webp`` (any letter case), sorted by path.
    Hidden files and folders (names starting with ".") are ignored.

Class labels (``class_cond=True``), ``label_source``: ``folder`` (the first
    sub-folder), ``prefix`` (the file name up to the first "_", as in
    guided-diffusion), ``csv`` (``labels_csv``, a ``file,label`` table) or
    ``auto`` (the default: csv when a table is given, else folder when every
    image sits in a sub-folder, else prefix); the rules live in
    :mod:`guided_diffusion_vae.data.labels`. Class indices follow the sorted class
    names; they are computed from all files before sharding, so every rank agrees.

Arrays
    A folder of ``.npy``/``.npz`` spectrograms instead of images is read by
    :mod:`guided_diffusion_vae.data.array_datasets`; :func:`open_data_folder` and
    :func:`image_batch_stream` (the training stream) take either kind.

Pixels
    ``channels=3``: RGB; grayscale sources are replicated to 3 channels.
    ``channels=1``: luminance (ITU-R 601-2 luma of colour sources).
    Transparency (RGBA, LA, palette with transparency) is composited on a white
    background by default (``alpha="white"``); ``alpha="drop"`` discards the
    alpha channel instead (the original's behaviour). 16-bit grayscale
    (PIL modes ``I;16``/``I``) is scaled by 255/65535. GIFs use their first frame.

Geometry
    The short side is brought to the target size (repeated 2x box-filter
    halving while the image is at least twice too large, then one bicubic
    resize), then the centre square is cut out. ``random_crop=True`` instead
    resizes the short side to a random size in ``[S, ceil(S / 0.8)]`` and cuts
    a random square, as in guided-diffusion. ``random_flip`` mirrors left-right
    with probability 1/2.

Errors
    A missing or empty folder, or a folder without images, raises
    :class:`~guided_diffusion_vae.runtime.errors.UserError` naming it. A file that cannot
    be decoded raises a UserError naming the file; with ``skip_bad_files=True``
    it is replaced by the next readable file of the shard, and ``load_data``
    logs how many distinct files were skipped (``skipped_files`` attribute).

Speed
    A ``torch.utils.data.DataLoader`` with worker processes (persistent),
    ``pin_memory`` when CUDA is available, ``drop_last=True``; each rank
    reads only its shard (``shard=rank``, ``num_shards=world_size``).
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import os
import signal
import random
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from ..runtime import dist_util, logger
from ..runtime.errors import UserError
from .batching import BatchStream, ShardedBatchSampler
from .array_datasets import ARRAY_EXTENSIONS, ArrayFolderDataset, parse_db_range, resolve_db_range
from ..runtime.images import resize_short_side
from .labels import class_names_from_paths

__all__ = [
    "IMAGE_EXTENSIONS",
    "list_image_files",
    "class_names_from_paths",
    "data_files",
    "open_data_folder",
    "ImageDataset",
    "ImageFolderDataset",
    "ImageBatches",
    "load_data",
]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "bmp", "webp")
_ALPHA_MODES = ("white", "drop")


# --------------------------------------------------------------------------- #
# files and labels
# --------------------------------------------------------------------------- #


def _is_remote(path: str) -> bool:
    return "://" in path


def _has_extension(name: str, extensions: Sequence[str]) -> bool:
    stem, dot, ext = name.rpartition(".")
    return bool(dot) and bool(stem) and ext.lower() in extensions


def _has_image_extension(name: str) -> bool:
    return _has_extension(name, IMAGE_EXTENSIONS)


def _check_folder(data_dir: Any) -> str:
    if data_dir is None or str(data_dir) == "":
        raise UserError("no data directory given (data_dir is empty)")
    data_dir = os.fspath(data_dir)
    if _is_remote(data_dir):
        import blobfile

        if not blobfile.isdir(data_dir):
            raise UserError(f"data directory not found: {data_dir}")
        return data_dir
    if not os.path.exists(data_dir):
        raise UserError(f"data directory not found: {data_dir}")
    if not os.path.isdir(data_dir):
        raise UserError(f"data directory is not a folder: {data_dir}")
    return data_dir


def list_image_files(data_dir: str | os.PathLike) -> list[str]:
    """All image files under ``data_dir`` (recursive), sorted; may be empty."""
    data_dir = _check_folder(data_dir)
    found: list[str] = []
    if _is_remote(data_dir):
        import blobfile

        for root, dirs, files in blobfile.walk(data_dir):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found.extend(blobfile.join(root, f) for f in files
                         if not f.startswith(".") and _has_image_extension(f))
    else:
        found = _walk_local_files(data_dir, IMAGE_EXTENSIONS)
    return sorted(found)


def _walk_local_files(data_dir: str, extensions: Sequence[str]) -> list[str]:
    """Files with ``extensions`` under a local ``data_dir``, following symlinked
    folders but entering each real folder once: a link back to an ancestor (a
    loop) would otherwise list files twice or, with two loops, never end."""
    found: list[str] = []
    visited = {_dir_identity(data_dir)}
    skipped = []
    for root, dirs, files in os.walk(data_dir, followlinks=True):
        kept = []
        for d in sorted(dirs):  # sorted: which of two paths to a folder wins is stable
            if d.startswith("."):
                continue
            identity = _dir_identity(os.path.join(root, d))
            if identity in visited:
                skipped.append(os.path.join(root, d))
                continue
            visited.add(identity)
            kept.append(d)
        dirs[:] = kept
        found.extend(os.path.join(root, f) for f in files
                     if not f.startswith(".") and _has_extension(f, extensions))
    if skipped:
        logger.warn(f"{data_dir}: skipped {len(skipped)} folder(s) already listed through another path "
                    f"(symlink loops or duplicate links), e.g. {skipped[0]}")
    return found


def _dir_identity(path: str) -> tuple:
    """(device, inode) of the folder ``path`` resolves to."""
    try:
        st = os.stat(path)
    except OSError:  # a dangling link: os.walk will not enter it either
        return ("unreadable", os.path.realpath(path))
    return (st.st_dev, st.st_ino)


def data_files(data_dir: str | os.PathLike) -> tuple[str, list[str]]:
    """``("images", files)`` or ``("arrays", files)``: what a data folder holds
    (image files, or ``.npy``/``.npz`` spectrograms; see
    :mod:`guided_diffusion_vae.data.array_datasets`). A folder with neither, or
    with both, is refused."""
    data_dir = _check_folder(data_dir)
    if _is_remote(data_dir):  # arrays are read from local files only
        images, arrays = list_image_files(data_dir), []
    else:
        found = sorted(_walk_local_files(data_dir, IMAGE_EXTENSIONS + ARRAY_EXTENSIONS))
        images = [f for f in found if _has_image_extension(f)]
        arrays = [f for f in found if not _has_image_extension(f)]
    if images and arrays:
        raise UserError(f"{data_dir} holds both images ({images[0]}) and arrays ({arrays[0]}); "
                        "keep one kind per data folder")
    if not images and not arrays:
        raise UserError(
            f"no image files ({', '.join(IMAGE_EXTENSIONS)}) or arrays (.npy, .npz) found in {data_dir}"
        )
    return ("arrays", arrays) if arrays else ("images", images)


def open_data_folder(
    data_dir: str | os.PathLike,
    image_size: int,
    *,
    class_cond: bool = False,
    label_source: str = "auto",
    labels_csv: str = "",
    channels: int = 3,
    db_range: Any = "auto",
    stored_range: Any = None,
    stored_in: str = "",
    shard: int = 0,
    num_shards: int = 1,
    skip_bad_files: bool = False,
):
    """The dataset of a data folder: an :class:`ImageFolderDataset` for images
    (unflipped, centre crops), an ``ArrayFolderDataset`` for spectrogram
    arrays, whose ``db_range`` flag is resolved against ``stored_range`` (the
    range ``stored_in``, a VAE or a cache, was made with). Both have
    ``data_dir``, ``all_paths``, ``label_map``, ``labels``, ``fetch`` and
    ``db_range`` (None for images)."""
    kind, files = data_files(data_dir)
    if kind == "arrays":
        explicit = parse_db_range(db_range) != "auto"
        dataset = ArrayFolderDataset(
            os.fspath(data_dir), files, image_size, db_range=resolve_db_range(db_range, stored_range, stored_in),
            range_from="db_range" if explicit else f"the range {stored_in} was made with",
            class_cond=class_cond, label_source=label_source, labels_csv=labels_csv, channels=channels,
            shard=shard, num_shards=num_shards,
        )
        logger.log(dataset.describe())
        return dataset
    if parse_db_range(db_range) != "auto":
        raise UserError(f"db_range applies to .npy/.npz data; {data_dir} holds images")
    if stored_range is not None:
        raise UserError(f"{stored_in} was made from .npy/.npz data (db_range {stored_range}); "
                        f"{data_dir} holds images")
    return ImageFolderDataset(
        data_dir, image_size, class_cond=class_cond, label_source=label_source, labels_csv=labels_csv,
        channels=channels, random_flip=False, random_crop=False, shard=shard, num_shards=num_shards,
        skip_bad_files=skip_bad_files,
    )


def detect_channels(paths, max_files=16):
    """1 if the first ``max_files`` images are all gray (R == G == B), else 3."""
    for path in paths[:max_files]:
        try:
            with Image.open(path) as img:
                if img.mode in ("L", "I", "I;16", "F", "1"):
                    continue
                rgb = np.asarray(img.convert("RGB"))
        except Exception as err:  # whatever Pillow or the file system throws: the file is bad
            raise UserError(f"cannot read image {path}: {_one_line(err)}") from None
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])):
            return 3
    return 1


# --------------------------------------------------------------------------- #
# decoding and geometry
# --------------------------------------------------------------------------- #


def _open_bytes(path: str):
    if _is_remote(path):
        import blobfile

        return blobfile.BlobFile(path, "rb")
    return open(path, "rb")


def _flatten_alpha(img: Image.Image, alpha: str) -> Image.Image:
    """An image without transparency: composited on white, or alpha dropped."""
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("LA", "La", "PA", "RGBa", "RGBA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        if alpha == "drop":
            return rgba.convert("RGB")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img


def _decode(path: str, channels: int, alpha: str, min_side: Optional[int] = None) -> Image.Image:
    """Read ``path`` fully into an 8-bit ``L`` (channels=1) or ``RGB`` image.

    With ``min_side``, big JPEGs are decoded at a reduced DCT scale whose sides
    stay at least ``min_side`` (much faster, and the image is shrunk anyway).
    """
    with _open_bytes(path) as handle:
        img = Image.open(handle)
        if min_side and img.format == "JPEG" and min(img.size) >= 2 * min_side:
            img.draft(img.mode, (min_side, min_side))
        img.load()
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        values = np.asarray(img, dtype=np.float64)
        if img.mode != "F":
            values = values * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    elif img.mode == "1":
        img = img.convert("L")
    img = _flatten_alpha(img, alpha)
    target = "L" if channels == 1 else "RGB"
    if img.mode != target:
        img = img.convert(target)
    return img


def _square_crop(img: Image.Image, size: int, rng: Optional[random.Random], max_enlarge: float = 1.25) -> np.ndarray:
    """HWC uint8 square of side ``size`` (centre, or random with ``rng``)."""
    if rng is None:
        img = resize_short_side(img, size)
    else:
        img = resize_short_side(img, rng.randint(size, math.ceil(size * max_enlarge)))
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    h, w = arr.shape[:2]
    if rng is None:
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = rng.randint(0, h - size), rng.randint(0, w - size)
    return arr[top : top + size, left : left + size]


def _one_line(err: BaseException) -> str:
    text = str(err).strip().replace("\n", " ") or "unreadable"
    return f"{type(err).__name__}: {text}"


# --------------------------------------------------------------------------- #
# datasets
# --------------------------------------------------------------------------- #


class ImageDataset(Dataset):
    """Images from an explicit file list (guided-diffusion's ``ImageDataset`` signature).

    Item ``i``: ``(float32 CHW array in [-1, 1], {"y": int64}``, or ``{}`` without
    classes). ``shard``/``num_shards`` keep every ``num_shards``-th file starting
    at ``shard``.
    """

    def __init__(
        self,
        resolution: int,
        image_paths: Sequence[str],
        classes: Optional[Sequence[int]] = None,
        shard: int = 0,
        num_shards: int = 1,
        random_crop: bool = False,
        random_flip: bool = True,
        *,
        channels: int = 3,
        alpha: str = "white",
        skip_bad_files: bool = False,
        label_map: Optional[dict[int, str]] = None,
    ) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise UserError(f"channels must be 1 or 3, got {channels!r}")
        if alpha not in _ALPHA_MODES:
            raise UserError(f"alpha must be one of {', '.join(_ALPHA_MODES)}, got {alpha!r}")
        if int(resolution) < 1:
            raise UserError(f"image_size must be positive, got {resolution!r}")
        if num_shards < 1 or not 0 <= shard < num_shards:
            raise ValueError(f"bad shard {shard} of {num_shards}")
        if classes is not None and len(classes) != len(image_paths):
            raise ValueError("classes and image_paths differ in length")
        self.resolution = int(resolution)
        self.channels = channels
        self.alpha = alpha
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.skip_bad_files = skip_bad_files
        self.shard, self.num_shards = shard, num_shards
        self.label_map = dict(label_map) if label_map is not None else None
        self.local_images = list(image_paths)[shard::num_shards]
        self.local_classes = None if classes is None else list(classes)[shard::num_shards]
        self.skipped_files: set[str] = set()  # seen by this process only
        # JPEG draft decoding keeps twice the largest side the crop may need
        self._decode_side = 2 * math.ceil(self.resolution * (1.25 if random_crop else 1.0))

    # names used by other code
    @property
    def paths(self) -> list[str]:
        return self.local_images

    @property
    def labels(self) -> Optional[list[int]]:
        return self.local_classes

    def __len__(self) -> int:
        return len(self.local_images)

    def _cond(self, index: int) -> dict:
        if self.local_classes is None:
            return {}
        return {"y": np.array(self.local_classes[index], dtype=np.int64)}

    def _pixels(self, img: Image.Image) -> np.ndarray:
        # Python's ``random`` is reseeded in each DataLoader worker by torch.
        rng = random if self.random_crop else None
        arr = _square_crop(img, self.resolution, rng)
        mirror = self.random_flip and random.random() < 0.5
        if mirror:
            arr = arr[:, ::-1]
        arr = arr.astype(np.float32) / 127.5 - 1.0
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def fetch(self, index: int) -> tuple[Optional[np.ndarray], Optional[dict], list[str], Optional[str]]:
        """``(pixels, cond, skipped_paths, error_message)`` without raising for bad files."""
        n = len(self)
        skipped: list[str] = []
        for attempt in range(n if self.skip_bad_files else 1):
            j = (index + attempt) % n
            path = self.local_images[j]
            try:
                img = _decode(path, self.channels, self.alpha, self._decode_side)
            except Exception as err:  # anything the decoder throws means "bad file"
                message = f"cannot read image {path}: {_one_line(err)}"
                if not self.skip_bad_files:
                    return None, None, skipped, message
                skipped.append(path)
                self.skipped_files.add(path)
                continue
            return self._pixels(img), self._cond(j), skipped, None
        return None, None, skipped, (
            f"none of the {n} image files of this shard can be read (e.g. {self.local_images[index % n]})"
        )

    def __getitem__(self, index: int):
        pixels, cond, _, problem = self.fetch(index)
        if problem is not None:
            raise UserError(problem)
        return pixels, cond


class ImageFolderDataset(ImageDataset):
    """The images of a folder (recursive), optionally labelled; see the module docstring.

    Attributes: ``data_dir``, ``all_paths`` (every file, before sharding),
    ``paths``/``labels`` (this shard), ``class_names`` (sorted), ``label_map``
    ``{index: name}`` and ``class_to_idx`` ``{name: index}`` (None without
    ``class_cond``), ``skipped_files``.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        image_size: int,
        *,
        class_cond: bool = False,
        label_source: str = "auto",
        channels: int = 3,
        alpha: str = "white",
        random_crop: bool = False,
        random_flip: bool = True,
        shard: int = 0,
        num_shards: int = 1,
        skip_bad_files: bool = False,
        labels_csv: str = "",
    ) -> None:
        data_dir = _check_folder(data_dir)
        paths = list_image_files(data_dir)
        if not paths:
            raise UserError(
                f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {data_dir}"
            )
        classes = label_map = None
        self.class_names: Optional[list[str]] = None
        self.class_to_idx: Optional[dict[str, int]] = None
        if class_cond:
            names = class_names_from_paths(paths, data_dir, label_source, labels_csv)
            self.class_names = sorted(set(names))
            self.class_to_idx = {name: i for i, name in enumerate(self.class_names)}
            label_map = dict(enumerate(self.class_names))
            classes = [self.class_to_idx[name] for name in names]
        self.data_dir = data_dir
        self.all_paths = paths
        self.db_range = None  # images need no value mapping (arrays do)
        super().__init__(
            image_size,
            paths,
            classes=classes,
            shard=shard,
            num_shards=num_shards,
            random_crop=random_crop,
            random_flip=random_flip,
            channels=channels,
            alpha=alpha,
            skip_bad_files=skip_bad_files,
            label_map=label_map,
        )


# --------------------------------------------------------------------------- #
# the endless loader
# --------------------------------------------------------------------------- #


class _Reporting(Dataset):
    """Wraps a dataset so that worker processes return bad-file news instead of raising."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset.fetch(index)


def _collate(samples):
    skipped = [path for sample in samples for path in sample[2]]
    problems = [sample[3] for sample in samples if sample[3] is not None]
    if problems:
        return None, None, skipped, problems[0]
    pixels = torch.from_numpy(np.stack([sample[0] for sample in samples]))
    cond = default_collate([sample[1] for sample in samples])
    return pixels, cond, skipped, None


def pixel_batches(dataset, **loader_kwargs):
    """Yield the pixel batches (float32 tensors) a DataLoader over ``dataset``
    (anything with ``fetch``) reads with ``loader_kwargs``. A file that cannot
    be read is a one-line UserError naming it, raised here: raised in a
    loader worker it came back as the worker's whole traceback."""
    workers = loader_kwargs.get("num_workers", 0)
    loader = DataLoader(_Reporting(dataset), collate_fn=_collate,
                        worker_init_fn=ignore_stop_signals if workers > 0 else None, **loader_kwargs)
    for pixels, _, _, problem in loader:
        if problem is not None:
            raise UserError(problem)
        yield pixels


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    per_node = 1
    for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if os.environ.get(name, "").isdigit():
            per_node = max(1, int(os.environ[name]))
            break
    return max(1, min(4, cpus // per_node))


class ImageBatches:
    """Endless iterator of ``(images, cond)`` returned by :func:`load_data`.

    Attributes: ``dataset``, ``loader`` (the DataLoader), ``label_map``,
    ``skipped_files`` (distinct files skipped so far, with ``skip_bad_files``).
    """

    def __init__(self, dataset: ImageDataset, loader: DataLoader) -> None:
        self.dataset = dataset
        self.loader = loader
        self.label_map = dataset.label_map
        self.skipped_files: set[str] = set()
        self._iterator = None
        self._batches_this_epoch = 0

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_files)

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self._iterator is None:
                self._iterator = iter(self.loader)
                self._batches_this_epoch = 0
            try:
                pixels, cond, skipped, problem = next(self._iterator)
            except StopIteration:
                self._iterator = None
                if self._batches_this_epoch == 0:
                    raise UserError(
                        f"no batch could be made from {getattr(self.dataset, 'data_dir', 'the data set')}"
                    ) from None
                continue
            self._batches_this_epoch += 1
            fresh = [p for p in skipped if p not in self.skipped_files]
            if fresh:
                self.skipped_files.update(fresh)
                logger.warn(
                    f"skipped {len(self.skipped_files)} unreadable image file(s) so far "
                    f"(latest: {fresh[-1]})"
                )
            if problem is not None:
                raise UserError(problem)
            return pixels, cond


def load_data(
    *,
    data_dir: str | os.PathLike,
    batch_size: int,
    image_size: int,
    class_cond: bool = False,
    deterministic: bool = False,
    random_crop: bool = False,
    random_flip: bool = True,
    channels: int = 3,
    label_source: str = "auto",
    alpha: str = "white",
    skip_bad_files: bool = False,
    num_workers: Optional[int] = None,
    shard: Optional[int] = None,
    num_shards: Optional[int] = None,
    pin_memory: Optional[bool] = None,
) -> ImageBatches:
    """Endless ``(images NCHW float32 in [-1, 1], {"y": int64 labels} or {})`` batches.

    ``deterministic=True`` keeps file order (no shuffling). The shard defaults
    to this process's rank among ``dist_util.world_size()``. ``num_workers``
    defaults to up to 4 per rank (0 loads in this process).
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    shard = dist_util.rank() if shard is None else shard
    num_shards = dist_util.world_size() if num_shards is None else num_shards
    dataset = ImageFolderDataset(
        data_dir,
        image_size,
        class_cond=class_cond,
        label_source=label_source,
        channels=channels,
        alpha=alpha,
        random_crop=random_crop,
        random_flip=random_flip,
        shard=shard,
        num_shards=num_shards,
        skip_bad_files=skip_bad_files,
    )
    if len(dataset) < batch_size:
        raise UserError(
            f"{dataset.data_dir}: shard {shard} of {num_shards} holds {len(dataset)} image(s) "
            f"(of {len(dataset.all_paths)}), fewer than batch_size={batch_size}"
        )
    workers = _default_workers() if num_workers is None else int(num_workers)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    loader = DataLoader(
        _Reporting(dataset),
        batch_size=batch_size,
        shuffle=not deterministic,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=ignore_stop_signals if workers > 0 else None,
    )
    return ImageBatches(dataset, loader)


# ---------------------------------------------------------------------------
# Resumable batches for the training loop
# ---------------------------------------------------------------------------


def ignore_stop_signals(_worker_id=None):
    """In data-loader workers: SLURM, docker, Kubernetes and mpiexec signal the
    whole process group; the workers must live on while the trainer saves."""
    for sig in dist_util.STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _kill_loader_workers_at_exit():
    """At exit, multiprocessing stops daemonic children with SIGTERM and then
    waits for them. Workers that ignore SIGTERM (above) and are still alive
    then (a loader kept alive by a traceback, say) would make that wait
    endless, so kill them first: they hold nothing worth saving."""
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if children:
        # torch's SIGCHLD handler would report the kill as a worker failure.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()


# atexit runs last-registered first: this precedes multiprocessing's own
# exit handler, which was registered when torch imported it.
atexit.register(_kill_loader_workers_at_exit)


def flip_batch(images: torch.Tensor, seed: int, batch_number: int) -> torch.Tensor:
    """Mirror about half of a batch left-right; which ones is a function of
    ``(seed, batch_number)`` so a resumed run flips the same images."""
    gen = torch.Generator().manual_seed(seed * 7_919 + batch_number)
    mask = torch.rand(images.shape[0], generator=gen) < 0.5
    return torch.where(mask.view(-1, *([1] * (images.dim() - 1))), images.flip(-1), images)


def image_batch_stream(
    *,
    data_dir,
    batch_size: int,
    image_size: int,
    channels: int = 3,
    class_cond: bool = False,
    random_flip: bool = True,
    seed: int = 0,
    num_workers: Optional[int] = None,
    shuffle: bool = True,
    label_source: str = "auto",
    skip_bad_files: bool = False,
    labels_csv: str = "",
    db_range: Any = "auto",
    stored_range: Any = None,
    stored_in: str = "",
):
    """An endless, resumable stream of ``(images NCHW in [-1, 1], {"y": labels})``
    for this rank (see :mod:`guided_diffusion_vae.data.batching`), and the dataset
    (images or spectrogram arrays: :func:`open_data_folder`).

    The label map comes back as ``dataset.label_map`` (``{index: name}``).
    """

    dataset = open_data_folder(
        data_dir, image_size, class_cond=class_cond, label_source=label_source, labels_csv=labels_csv,
        channels=channels, db_range=db_range, stored_range=stored_range, stored_in=stored_in,
        skip_bad_files=skip_bad_files,
    )
    try:
        sampler = ShardedBatchSampler(
            len(dataset), batch_size, shard=dist_util.rank(), num_shards=dist_util.world_size(),
            shuffle=shuffle, seed=seed,
        )
    except ValueError as err:
        raise UserError(f"{data_dir}: {err}")
    workers = _default_workers() if num_workers is None else num_workers

    def make_iterator(batch_sampler):
        loader = DataLoader(
            _Reporting(dataset), batch_sampler=batch_sampler, collate_fn=_collate, num_workers=workers,
            pin_memory=torch.cuda.is_available(), persistent_workers=False,
            # Its own generator: starting an epoch then draws nothing from the
            # global RNG, which a resumed run restores (resume stays exact).
            generator=torch.Generator().manual_seed(seed * 1_000_003 + batch_sampler.start),
            worker_init_fn=ignore_stop_signals if workers > 0 else None,
        )
        k = batch_sampler.start
        for pixels, cond, skipped, problem in loader:
            if problem is not None:
                raise UserError(problem)
            if random_flip:
                pixels = flip_batch(pixels, seed, k)
            k += 1
            yield pixels, (cond if class_cond else {})

    return BatchStream(sampler, make_iterator, label_map=dataset.label_map), dataset
