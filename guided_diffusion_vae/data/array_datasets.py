"""Spectrograms stored as NumPy arrays (``.npy``/``.npz``), read like an image folder.

Radar people keep spectrograms as float arrays in dB rather than as pictures.
A data folder may hold such files instead of images (not both); everything
downstream (VAE training, latent caches, diffusion training, sampling) then
works on them as on one-channel images.

What is accepted
    Every ``.npy`` and ``.npz`` file under the data folder (recursive; hidden
    files and folders are ignored, as for images).

    - a ``.npy`` holds one spectrogram, a 2-D array ``(H, W)``, or a stack of
      them, a 3-D array ``(N, H, W)``;
    - a ``.npz`` holds any number of such arrays (2-D or 3-D), taken in the
      sorted order of their names.

    Values are real numbers (any integer or float type; bool, complex and
    text are refused), finite (NaN or Inf is an error naming the file and the
    position), and every spectrogram of a folder has the same ``(H, W)``.
    Row 0 is drawn at the top and columns run left to right, as a PNG of the
    array would show it (time along the columns: ``random_flip`` reverses
    time, as for images). Files holding Python objects are never unpickled
    (``allow_pickle=False``): they are refused. Every array's ``.npy`` header
    (each member's, in a ``.npz``) is checked before its data are read or
    decompressed: more than ``MAX_ARRAY_BYTES`` (2 GiB), a wrong number of
    dimensions or another spectrogram shape is refused unread (a zip bomb).

    A spectrogram is named ``FILE`` (a 2-D ``.npy``), ``FILE[i]`` (entry i of
    a stack), ``FILE[key]`` or ``FILE[key][i]`` (a ``.npz``); its class comes
    from ``FILE`` (``label_source``, see :mod:`guided_diffusion_vae.data.labels`),
    so all spectrograms of a file share one label.

From dB to the model's [-1, 1] (``--db_range``)
    ``LOW,HIGH`` clips every value to [LOW, HIGH] and maps that interval
    linearly onto [-1, 1] (LOW -> -1, HIGH -> 1). ``auto`` (the default) takes
    the range a VAE was trained with when one is in use and stores one (its
    ``latent_stats.json``), else the data folder's own minimum and maximum.
    The range used is logged and stored wherever the mapping must be undone
    or repeated: the VAE's ``latent_stats.json``, the latent cache's
    ``meta.json``, every checkpoint's ``data.db_range``. Sampling with
    ``--save_npy True`` maps samples back to dB with it. An explicit range
    that differs from the VAE's or the cache's is refused (their latents were
    made with the other one). A fixed range (e.g. ``-60,0`` for spectrograms
    normalised to a 0 dB peak) is the safer choice: one outlier moves a
    measured one.

Geometry
    As for images: the short side is brought to ``image_size`` (2x box
    reductions, then bicubic, in float), the centre square is cut out and
    values are clipped to [-1, 1] again (bicubic overshoots).

Memory
    A folder is read, checked, mapped and resized once, when it is opened
    (twice read with a measured range), and held as float32 ``(N, S, S)``:
    every bad file is reported before any training starts.
"""

import math
import zipfile

import numpy as np
import torch
from PIL import Image

from ..runtime.errors import UserError, shown
from ..runtime.images import resize_short_side
from .labels import LABEL_SOURCES, class_names_from_paths

ARRAY_EXTENSIONS = ("npy", "npz")


def data_folder_defaults():
    """Flags of every program that reads a data folder: how class labels are
    read and how array values map to [-1, 1]."""
    return {"label_source": "auto", "labels_csv": "", "db_range": "auto"}


FLAG_HELP = {
    "label_source": "where class labels come from: auto (labels_csv if given, else sub-folders when every file "
                    "has one, else file-name prefixes), folder, prefix (name up to the first _) or csv",
    "labels_csv": "a CSV table 'file,label' (file relative to data_dir) giving each data file's class",
    "db_range": "for .npy/.npz data: LOW,HIGH clips values to that range and maps it to [-1, 1]; auto takes "
                "the VAE's stored range, else the data's min and max",
}
FLAG_CHOICES = {"label_source": LABEL_SOURCES}


# --------------------------------------------------------------------------- #
# the value range
# --------------------------------------------------------------------------- #


def parse_db_range(value):
    """``"auto"``, or ``(low, high)`` from ``"LOW,HIGH"`` (or a pair, as
    metadata stores it): finite numbers with LOW < HIGH."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    parts = value.split(",") if isinstance(value, str) else value
    try:
        low, high = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise UserError(f"db_range must be auto or LOW,HIGH (e.g. -60,0), got {shown(value)}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise UserError(f"db_range must be two finite numbers LOW,HIGH with LOW < HIGH, got {shown(value)}")
    return low, high


def same_range(a, b):
    """Two stored ranges (pairs or None) are the same mapping."""
    if a is None or b is None:
        return a is None and b is None
    return all(math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-9) for x, y in zip(a, b))


def resolve_db_range(value, stored=None, stored_in=""):
    """The range to map with: an explicit ``value``; for ``auto`` the
    ``stored`` one (a VAE's or a cache's), else ``"measure"``. An explicit
    range that differs from ``stored`` is refused."""
    value = parse_db_range(value)
    if stored is not None:
        stored = parse_db_range(stored)
        if value == "auto":
            return stored
        if not same_range(value, stored):
            raise UserError(f"db_range {value[0]:g},{value[1]:g} differs from {stored[0]:g},{stored[1]:g}, the range "
                            f"{stored_in} was made with; leave db_range auto to use it")
    return "measure" if value == "auto" else value


def to_unit_range(values, db_range):
    """Values in dB -> float32 in [-1, 1] (clipped to the range first)."""
    low, high = db_range
    clipped = np.clip(np.asarray(values, dtype=np.float64), low, high)
    return ((clipped - low) * (2.0 / (high - low)) - 1.0).astype(np.float32)


def to_db(images, db_range):
    """Model-range values in [-1, 1] -> float32 dB (the inverse of :func:`to_unit_range`)."""
    low, high = db_range
    unit = np.clip(np.asarray(images, dtype=np.float64), -1.0, 1.0)
    return (low + (unit + 1.0) * (0.5 * (high - low))).astype(np.float32)


# --------------------------------------------------------------------------- #
# reading and checking
# --------------------------------------------------------------------------- #


# One array may hold at most this many bytes once decompressed: a .npz
# member's header can claim any shape, and a few MB of zeros inflate to GBs.
MAX_ARRAY_BYTES = 2 << 30

_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _read_header(handle, name):
    """``(shape, dtype)`` from the ``.npy`` header at ``handle``, read without
    touching the data."""
    try:
        version = np.lib.format.read_magic(handle)
        reader = _HEADER_READERS.get(version)
        if reader is None:
            raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported")
        shape, _, dtype = reader(handle)
    except ValueError as err:
        raise UserError(f"{name} is no readable NumPy array: {str(err).splitlines()[0]}") from None
    return tuple(shape), dtype


def _check_header(name, shape, dtype, folder_shape):
    """Refuse, before any data is read or decompressed, an array whose
    header claims what the folder cannot take: object values (pickles), a
    wrong number of dimensions, too many bytes, or spectrograms of another
    shape than the folder's first."""
    if dtype.hasobject:
        raise UserError(f"{name} holds pickled Python objects; pickles are never loaded (allow_pickle=False): "
                        "store plain numeric arrays")
    if len(shape) not in (2, 3):
        raise UserError(f"{name} is {len(shape)}-D {shape}; expected one spectrogram (H, W) or a stack (N, H, W)")
    size = math.prod(shape) * dtype.itemsize
    if size > MAX_ARRAY_BYTES:
        raise UserError(f"{name} claims shape {shape} of {dtype}, {size / 2**30:.1f} GiB once read (the limit is "
                        f"{MAX_ARRAY_BYTES / 2**30:g} GiB per array): split it into smaller files")
    folder_shape.check(name, shape[-2:])


def _members(path, folder_shape):
    """Yield ``(key, array)`` of one file ("" for a ``.npy``), each header
    checked (:func:`_check_header`) before its data are read."""
    if path.lower().endswith(".npy"):
        with open(path, "rb") as handle:
            _check_header(path, *_read_header(handle, path), folder_shape)
        yield "", np.load(path, allow_pickle=False)
        return
    with np.load(path, allow_pickle=False) as archive:
        members = set(archive.zip.namelist())
        for key in sorted(archive.files):
            name = f"{path}[{key}]"
            with archive.zip.open(key + ".npy" if key + ".npy" in members else key) as handle:
                _check_header(name, *_read_header(handle, name), folder_shape)
            yield key, archive[key]


def _load(path, folder_shape):
    """:func:`_members` of ``path``, read errors as one line naming it."""
    try:
        yield from _members(path, folder_shape)
    except UserError:
        raise
    except ValueError as err:
        if "pickle" in str(err).lower():
            # numpy says "pickle" for object arrays and for files without the .npy header alike
            raise UserError(f"{path} holds pickled Python objects or is no NumPy file; pickles are never loaded "
                            "(allow_pickle=False): store plain numeric arrays") from None
        raise UserError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(f"cannot read {path}: {err}") from None


def _spectrograms(path, folder_shape):
    """Yield ``(name, 2-D array)`` for every spectrogram of ``path``, checked
    for dimensions, type, finiteness and the folder's shape (one-line errors
    naming it)."""
    for key, array in _load(path, folder_shape):
        name = f"{path}[{key}]" if key else path
        if array.dtype.kind not in "iuf":
            raise UserError(f"{name} holds {array.dtype} values; spectrograms must be real numbers (e.g. float32 dB)")
        if 0 in array.shape:
            raise UserError(f"{name} is empty {tuple(array.shape)}")
        stack = array[None] if array.ndim == 2 else array
        finite = np.isfinite(stack)
        if not finite.all():
            where = tuple(int(i) for i in np.argwhere(~finite)[0])
            entry = f"{name}[{where[0]}]" if array.ndim == 3 else name
            raise UserError(f"{entry} holds NaN or Inf at row {where[1]}, column {where[2]}")
        for i, spectrogram in enumerate(stack):
            yield (f"{name}[{i}]" if array.ndim == 3 else name), spectrogram


def _square(values, size):
    """A float32 ``(size, size)`` centre square of ``values`` (in [-1, 1]) after
    bringing its short side to ``size``, as images are."""
    img = resize_short_side(Image.fromarray(np.ascontiguousarray(values, dtype=np.float32)), size)
    arr = np.asarray(img, dtype=np.float32)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return np.clip(arr[top:top + size, left:left + size], -1.0, 1.0)


def measure_range(files):
    """``(min, max)`` over every value of every spectrogram of ``files``
    (which are checked on the way)."""
    folder_shape = _FolderShape()
    low, high = math.inf, -math.inf
    for path in files:
        for _, spectrogram in _spectrograms(path, folder_shape):
            low, high = min(low, float(spectrogram.min())), max(high, float(spectrogram.max()))
    if folder_shape.first is None:
        raise UserError(f"no spectrograms in {', '.join(files[:3])}")
    if not low < high:
        raise UserError(f"every value of {folder_shape.first} and the other arrays is {low:g}: there is no range to map; "
                        "give --db_range LOW,HIGH")
    return low, high


def read_arrays(files, image_size, db_range="measure"):
    """Every spectrogram of ``files``: ``(names, file of each, values float32
    (N, S, S) in [-1, 1], (low, high), (H, W))``. ``db_range`` "measure" takes
    the files' own minimum and maximum (a first pass)."""
    if db_range == "measure":
        db_range = measure_range(files)
    folder_shape = _FolderShape()
    names, sources, values = [], [], []
    for path in files:
        for name, spectrogram in _spectrograms(path, folder_shape):
            names.append(name)
            sources.append(path)
            values.append(_square(to_unit_range(spectrogram, db_range), int(image_size)))
    if not values:
        raise UserError(f"no spectrograms in {', '.join(files[:3])}")
    return names, sources, np.stack(values), (float(db_range[0]), float(db_range[1])), folder_shape.shape


class _FolderShape:
    """The ``(H, W)`` of a folder's first spectrogram, which every other must share."""

    def __init__(self):
        self.shape, self.first = None, None

    def check(self, name, found):
        if self.shape is None:
            self.shape, self.first = tuple(found), name
        elif tuple(found) != self.shape:
            raise UserError(f"{name} is {found[0]}x{found[1]}, but {self.first} is {self.shape[0]}x{self.shape[1]}: "
                            "every spectrogram of a folder must have the same shape")


# --------------------------------------------------------------------------- #
# datasets
# --------------------------------------------------------------------------- #


class ArrayDataset(torch.utils.data.Dataset):
    """Spectrograms held in memory, served like ``ImageDataset`` items:
    ``(float32 (channels, S, S) in [-1, 1], {"y": int64} or {})``; one-channel
    values are repeated for ``channels=3``. ``shard``/``num_shards`` keep every
    ``num_shards``-th spectrogram from ``shard`` on."""

    def __init__(self, values, names, classes=None, *, channels=1, shard=0, num_shards=1, label_map=None):
        super().__init__()
        if channels not in (1, 3):
            raise UserError(f"channels must be 1 or 3, got {shown(channels)}")
        self.values = values
        self.channels = channels
        self.label_map = dict(label_map) if label_map is not None else None
        self.local_index = list(range(len(names)))[shard::num_shards]
        self.local_images = [names[i] for i in self.local_index]
        self.local_classes = None if classes is None else [classes[i] for i in self.local_index]
        self.skipped_files = set()  # nothing is skipped: arrays are checked when read

    @property
    def paths(self):
        return self.local_images

    @property
    def labels(self):
        return self.local_classes

    def __len__(self):
        return len(self.local_index)

    def pixels(self, indices):
        """``(n, channels, S, S)`` float32 of spectrograms ``indices`` (of the whole folder)."""
        chosen = self.values[np.asarray(indices, dtype=np.int64)][:, None]
        return np.repeat(chosen, self.channels, axis=1) if self.channels == 3 else chosen

    def fetch(self, index):
        """``(pixels, cond, skipped_paths, error_message)``, as ``ImageDataset.fetch``."""
        cond = {} if self.local_classes is None else {"y": np.array(self.local_classes[index], dtype=np.int64)}
        return self.pixels([self.local_index[index]])[0], cond, [], None

    def __getitem__(self, index):
        pixels, cond, _, _ = self.fetch(index)
        return pixels, cond


class ArrayFolderDataset(ArrayDataset):
    """The spectrograms of the array ``files`` of ``data_dir``; attributes as
    ``ImageFolderDataset``'s (``data_dir``, ``all_paths``: every spectrogram's
    name, ``class_names``, ``class_to_idx``, ``label_map``) plus ``files``
    (the file of each spectrogram), ``db_range`` (the range used),
    ``measured`` (whether it was the data's own) and ``source_shape`` (H, W).

    ``db_range`` is what :func:`resolve_db_range` returns: a pair or "measure";
    ``range_from`` says where a pair came from (for the log).
    """

    def __init__(self, data_dir, files, image_size, *, db_range="measure", range_from="db_range", class_cond=False,
                 label_source="auto", labels_csv="", channels=1, shard=0, num_shards=1):
        names, sources, values, used, shape = read_arrays(files, image_size, db_range)
        classes = label_map = None
        self.class_names = self.class_to_idx = None
        if class_cond:
            by_file = dict(zip(files, class_names_from_paths(files, data_dir, label_source, labels_csv)))
            self.class_names = sorted(set(by_file.values()))
            self.class_to_idx = {name: i for i, name in enumerate(self.class_names)}
            label_map = dict(enumerate(self.class_names))
            classes = [self.class_to_idx[by_file[source]] for source in sources]
        self.data_dir = data_dir
        self.all_paths = names
        self.files = sources
        self.db_range = used
        self.measured = db_range == "measure"
        self.range_from = "the data's own minimum and maximum" if self.measured else range_from
        self.source_shape = shape
        super().__init__(values, names, classes, channels=channels, shard=shard, num_shards=num_shards,
                         label_map=label_map)

    def describe(self):
        """One line for the log: what was read and how it was mapped."""
        return (f"{self.data_dir}: {len(self.all_paths)} spectrograms of {self.source_shape[0]}x{self.source_shape[1]} "
                f"from {len(set(self.files))} array file(s), values {self.db_range[0]:g}..{self.db_range[1]:g} "
                f"({self.range_from}) mapped to [-1, 1], resized to {self.values.shape[-1]}x{self.values.shape[-1]}")
