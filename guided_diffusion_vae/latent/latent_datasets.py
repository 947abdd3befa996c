"""Latents for diffusion training: a pre-encoded cache, or encoding on the fly.

Cache layout (``CACHE_DIR``), format version 1
    ``latents.npy``  ``(count, C, h, w)`` float32 (or float16) UNSCALED posterior
                     latents (``VAEInterface.encode_unscaled``). The scale lives
                     in ``meta.json`` and is applied when batches are read, so
                     the stored numbers never depend on it and "measured" can be
                     computed from the stored latents without a second pass.
    ``labels.npy``   ``(count,)`` int64 class indices (0 without classes).
    ``meta.json``    written LAST; its presence means the cache is complete.
                     Holds the VAE description (fingerprint, scale, range, ...),
                     image size, flip, label map ``{"0": "user_01", ...}``,
                     the dB range of ``.npy``/``.npz`` data (``db_range``),
                     counts, dtype, format version and the data files' digest.

With ``random_flip`` the cache holds both orientations: entries ``[0, N)`` are
the images as they are, entries ``[N, 2N)`` their left-right mirror images
(encoded from mirrored pixels: a VAE is not mirror-equivariant). Sampling
uniformly over all entries then sees each orientation half of the time.

Building is resumable and can be split over ranks: images are grouped in
chunks of ``chunk_size``; latents go into ``latents.partial.npy`` (a
memory-mapped .npy that every rank writes its own chunks into) and each
finished chunk leaves a marker file in ``.progress/``. A rerun skips marked
chunks. Rank 0 finishes: labels, scale, rename to ``latents.npy``, then
``meta.json`` (every file through a temporary name and a rename), so an
interrupted build never looks complete.
"""

import hashlib
import json
import math
import os
import shutil
import warnings

import numpy as np
import torch

from ..runtime import dist_util, logger
from ..data.batching import BatchStream, ShardedBatchSampler
from ..runtime.files import atomic_write_json, atomic_write_npy, check_outside, fsync_path, undone_on_failure
from ..runtime.errors import UserError, check_number, shown
from ..data.labels import normalize_label_map
from .vae_wrapper import DTYPES as VAE_DTYPES
from .vae_wrapper import (
    INPUT_RANGES, LATENT_SCALE_WORDS, VAEInterface, check_input_range, parse_latent_scale, scale_from_moments,
)
from ..data.array_datasets import data_folder_defaults, parse_db_range, same_range
from ..data.image_datasets import open_data_folder, pixel_batches
from ..runtime.progress import progress as progress_bar

FORMAT_VERSION = 1
LATENTS_FILE = "latents.npy"
LABELS_FILE = "labels.npy"
META_FILE = "meta.json"
PARTIAL_FILE = "latents.partial.npy"
PLAN_FILE = "plan.json"
PROGRESS_DIR = ".progress"
CACHE_DTYPES = ("float32", "float16")


# --------------------------------------------------------------------------- #
# small file helpers
# --------------------------------------------------------------------------- #


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _chunk_marker(cache_dir, index):
    return os.path.join(cache_dir, PROGRESS_DIR, f"chunk_{index:06d}")


def _done_chunks(cache_dir):
    folder = os.path.join(cache_dir, PROGRESS_DIR)
    if not os.path.isdir(folder):
        return set()
    names = [name[len("chunk_"):] for name in os.listdir(folder) if name.startswith("chunk_")]
    return {int(n) for n in names if n.isdigit()}


def _files_digest(paths, data_dir, labels, files=None):
    """Identity of the data set: relative paths, sizes and labels (not pixel
    bytes: cheap). ``files``: the file each entry came from, where entries are
    not files themselves (spectrograms of an array file)."""
    digest = hashlib.sha256()
    for path, file, label in zip(paths, files or paths, labels):
        size = os.path.getsize(file) if os.path.exists(file) else -1
        digest.update(f"{os.path.relpath(path, data_dir)}\t{size}\t{label}\n".encode())
    return digest.hexdigest()[:16]


def _first_difference(expected, found, keys):
    for key in keys:
        if expected.get(key) != found.get(key):
            return key, found.get(key), expected.get(key)
    return None


# --------------------------------------------------------------------------- #
# building
# --------------------------------------------------------------------------- #


def encode_latents_defaults():
    """Flags of ``scripts/encode_latents.py`` (keys of ``build_latent_cache``)."""
    return {
        "data_dir": "",
        "vae_path": "",
        "output_dir": "",
        "image_size": 64,
        "batch_size": 64,
        "random_flip": True,
        "latent_scale": "measured",
        "sample_posterior": False,
        "input_range": "-1,1",
        "channels": 0,
        "class_cond": True,
        **data_folder_defaults(),
        "cache_dtype": "float32",
        "vae_dtype": "float32",
        "chunk_size": 1024,
        "num_workers": 2,
        "seed": 0,
        "progress": True,
        **dist_util.threads_defaults(),
    }


FLAG_HELP = {
    "data_dir": "folder of images to encode (one sub-folder per person with --class_cond True)",
    "vae_path": "the VAE: a diffusers AutoencoderKL folder, e.g. written by scripts/vae_train.py",
    "output_dir": "the cache folder; a rerun continues an interrupted build there",
    "image_size": "images are resized and centre-cropped to this square side in pixels",
    "batch_size": "images per VAE forward pass",
    "random_flip": "also store each image's left-right mirror image (set False for spectrograms: a "
                   "time-reversed walk is not a walk)",
    "latent_scale": "factor that brings latents to unit std: a number, stored (the VAE folder's "
                    "latent_stats.json) or measured (1/std of these latents)",
    "sample_posterior": "encode each image to a draw from the VAE's posterior instead of its mean",
    "input_range": "the pixel range the VAE was trained on",
    "channels": "image channels fed to the VAE: 1 or 3 (0: the VAE's own)",
    "class_cond": "store a class label per image (the person), as --label_source says",
    "cache_dtype": "number format of the stored latents (float16 halves the file)",
    "vae_dtype": "number format the VAE computes in",
    "chunk_size": "images per resumable unit of work (a rerun redoes at most one per rank)",
    "num_workers": "image-loading processes (0: load in this process)",
    "seed": "seed of the posterior draws (with --sample_posterior True)",
    "progress": "show progress (a bar on a terminal, a line every 30 s in a log)",
}
FLAG_CHOICES = {
    "latent_scale": LATENT_SCALE_WORDS, "input_range": INPUT_RANGES,
    "cache_dtype": CACHE_DTYPES, "vae_dtype": tuple(VAE_DTYPES),
}


def _gather_errors(message):
    """Every rank's error message (None for success), so all ranks stop together."""
    if not dist_util.is_distributed():
        return [message]
    found = [None] * dist_util.world_size()
    torch.distributed.all_gather_object(found, message)
    return found


def build_latent_cache(
    *,
    data_dir,
    vae_path,
    output_dir,
    image_size=64,
    batch_size=64,
    random_flip=True,
    latent_scale="measured",
    sample_posterior=False,
    input_range="-1,1",
    channels=0,
    class_cond=True,
    label_source="auto",
    labels_csv="",
    db_range="auto",
    cache_dtype="float32",
    vae_dtype="float32",
    chunk_size=1024,
    num_workers=2,
    seed=0,
    progress=True,
    threads=0,
    device=None,
):
    """Encode the images of ``data_dir`` once into a latent cache in ``output_dir``.

    Safe to rerun: a complete cache with the same settings is left alone, an
    interrupted one is continued, one made with other settings is refused.
    Runs on every rank of an MPI/torchrun job (each encodes its share).

    ``device`` (not a flag) overrides where the VAE runs (default: this rank's).

    :return: the cache's metadata dict (as in ``meta.json``).
    """
    _check_cache_settings(data_dir, vae_path, output_dir, batch_size, chunk_size, image_size, cache_dtype,
                          input_range, num_workers, seed, channels)
    parse_db_range(db_range)
    scale_spec = parse_latent_scale(latent_scale)
    check_outside(output_dir, "output_dir", data_dir, "data_dir")
    dist_util.setup_dist()
    dist_util.set_threads(threads, logger.log)
    device = dist_util.dev() if device is None else torch.device(device)
    dist_util.autotune_convolutions(device)
    vae = VAEInterface(
        vae_path, device=device, dtype=vae_dtype, max_batch=batch_size, input_range=input_range,
        sample_posterior=sample_posterior, latent_scale="stored" if scale_spec == "stored" else None, seed=seed,
    )
    channels = int(channels) or vae.in_channels
    vae.check_channels(channels)
    dataset = open_data_folder(
        data_dir, int(image_size), class_cond=class_cond, label_source=label_source, labels_csv=labels_csv,
        channels=channels, db_range=db_range, stored_range=vae.db_range, stored_in=f"the VAE {vae_path}",
    )
    labels = np.asarray(dataset.labels if class_cond else [0] * len(dataset.all_paths), dtype=np.int64)
    plan = _cache_plan(vae, dataset, labels, image_size=image_size, random_flip=random_flip, input_range=input_range,
                       sample_posterior=sample_posterior, scale_spec=scale_spec, channels=channels,
                       cache_dtype=cache_dtype, vae_dtype=vae_dtype, seed=seed, chunk_size=chunk_size)
    finished = _finished_cache(output_dir, plan)
    if finished is not None:
        return finished
    # A fresh build that stops on bad input (an unreadable image) leaves
    # nothing, so the same command runs once the input is fixed (a kept plan
    # would refuse the changed file); what an earlier run left stays.
    with undone_on_failure(output_dir if dist_util.rank() == 0 else None, errors=UserError):
        mine = _claim_chunks(output_dir, plan, cache_dtype)
        _encode_my_chunks(vae, dataset, output_dir, plan, mine, batch_size=batch_size, random_flip=random_flip,
                          seed=seed, num_workers=num_workers, progress=progress)
    meta = None
    if dist_util.rank() == 0:
        num_chunks = math.ceil(plan["num_images"] / plan["chunk_size"])
        meta = _finish_cache(output_dir, plan, vae, scale_spec, labels, num_chunks)
    return dist_util.broadcast_object(meta)


def _check_cache_settings(data_dir, vae_path, output_dir, batch_size, chunk_size, image_size, cache_dtype,
                          input_range, num_workers, seed, channels):
    """Refuse missing paths and impossible numbers before anything is loaded."""
    for name, value in (("data_dir", data_dir), ("vae_path", vae_path), ("output_dir", output_dir)):
        if not value:
            raise UserError(f"{name} is required")
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size), ("image_size", image_size)):
        check_number(name, value, 1, integer=True)
    check_number("num_workers", num_workers, 0, integer=True)
    check_number("seed", seed, 0, integer=True)
    if channels not in (0, 1, 3):
        raise UserError(f"channels must be 0 (the VAE's), 1 or 3, got {shown(channels)}")
    if cache_dtype not in CACHE_DTYPES:
        raise UserError(f"cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {shown(cache_dtype)}")
    check_input_range(input_range)


def _cache_plan(vae, dataset, labels, *, image_size, random_flip, input_range, sample_posterior, scale_spec,
                channels, cache_dtype, vae_dtype, seed, chunk_size):
    """Everything that decides what the cache holds. Settings first, derived
    values last, so that a refusal names the cause."""
    paths = dataset.all_paths
    return {
        "vae_fingerprint": vae.fingerprint,
        "image_size": int(image_size),
        "random_flip": bool(random_flip),
        "input_range": input_range,
        "sample_posterior": bool(sample_posterior),
        "latent_scale_spec": scale_spec,
        "channels": channels,
        "dtype": cache_dtype,
        "vae_dtype": vae_dtype,
        "seed": int(seed),
        "label_map": normalize_label_map(dataset.label_map, dataset.data_dir),
        "db_range": None if dataset.db_range is None else list(dataset.db_range),
        "files_digest": _files_digest(paths, dataset.data_dir, labels.tolist(), getattr(dataset, "files", None)),
        "num_images": len(paths),
        "count": len(paths) * (2 if random_flip else 1),
        "shape": list(vae.latent_shape(int(image_size))),
        "format": FORMAT_VERSION,
        "chunk_size": int(chunk_size),
    }


def _finished_cache(output_dir, plan):
    """The metadata of a complete cache made with ``plan`` (None when there is
    none yet); a complete cache made otherwise is refused."""
    meta_path = os.path.join(output_dir, META_FILE)
    if not os.path.isfile(meta_path):
        return None
    meta = _read_json(meta_path)
    # How the work was split does not change what a finished cache holds.
    diff = _first_difference(plan, meta.get("plan", {}), [k for k in plan if k != "chunk_size"])
    if diff is None:
        logger.log(f"latent cache {output_dir} is complete already ({meta['count']} latents)")
        return meta
    key, old, new = diff
    raise UserError(f"{output_dir} already holds a latent cache made with {key}={shown(old)} (now {shown(new)}); "
                    "choose another output_dir or delete it")


def _claim_chunks(output_dir, plan, cache_dtype):
    """Rank 0 prepares (or checks) the partial files; every rank gets its
    share of the chunks still to encode."""
    rank, world = dist_util.rank(), dist_util.world_size()
    num_chunks = math.ceil(plan["num_images"] / plan["chunk_size"])
    answer = None
    if rank == 0:
        try:
            done = _prepare_partial(output_dir, plan, list(plan), plan["shape"], plan["count"], cache_dtype)
            answer = ("ok", sorted(done))
        except UserError as err:
            answer = ("error", str(err))
    status, payload = dist_util.broadcast_object(answer)
    if status == "error":
        raise UserError(payload)
    done = set(payload)
    pending = [c for c in range(num_chunks) if c not in done]
    if rank == 0 and done:
        logger.log(f"resuming latent cache {output_dir}: {len(done)} of {num_chunks} chunks were done")
    return pending[rank * len(pending) // world:(rank + 1) * len(pending) // world]


def _encode_my_chunks(vae, dataset, output_dir, plan, mine, *, batch_size, random_flip, seed, num_workers, progress):
    """Encode this rank's chunks into the partial array; all ranks stop with
    the first rank's error."""
    num_images, chunk_size = plan["num_images"], plan["chunk_size"]
    count = sum(min(chunk_size, num_images - c * chunk_size) for c in mine)
    if dist_util.is_main():
        logger.log(f"encoding {count} images ({len(mine)} chunks of up to {chunk_size}) into {output_dir}")
    message = None
    try:
        store = np.load(os.path.join(output_dir, PARTIAL_FILE), mmap_mode="r+")
        _encode_chunks(
            vae, dataset, store, mine, num_images=num_images, chunk_size=chunk_size,
            batch_size=int(batch_size), random_flip=random_flip, seed=int(seed),
            num_workers=int(num_workers), cache_dir=output_dir,
            bar=progress_bar(total=count, desc=f"encoding (rank {dist_util.rank()})", unit="img",
                             disable=not (progress and dist_util.rank() == 0)),
        )
        del store
    except UserError as err:
        message = str(err)
    problems = [m for m in _gather_errors(message) if m]
    if problems:
        raise UserError(problems[0])


def _prepare_partial(cache_dir, plan, plan_keys, latent_shape, count, cache_dtype):
    """Create or check the partial cache; return the set of finished chunks."""
    os.makedirs(os.path.join(cache_dir, PROGRESS_DIR), exist_ok=True)
    plan_path = os.path.join(cache_dir, PLAN_FILE)
    partial = os.path.join(cache_dir, PARTIAL_FILE)
    final = os.path.join(cache_dir, LATENTS_FILE)
    if os.path.isfile(plan_path):
        diff = _first_difference(plan, _read_json(plan_path), plan_keys)
        if diff is not None:
            key, old, new = diff
            raise UserError(
                f"{cache_dir} holds an unfinished latent cache made with {key}={old!r} (now {new!r}); "
                "rerun with the same settings to finish it, or delete the folder"
            )
        # A crash between the final rename and meta.json: take the file back.
        if not os.path.isfile(partial) and os.path.isfile(final):
            os.replace(final, partial)
        if os.path.isfile(partial):
            return _done_chunks(cache_dir)
    # Fresh start: forget stale markers, then the array, then the plan.
    shutil.rmtree(os.path.join(cache_dir, PROGRESS_DIR))
    os.makedirs(os.path.join(cache_dir, PROGRESS_DIR))
    for name in (LATENTS_FILE, LABELS_FILE):
        if os.path.exists(os.path.join(cache_dir, name)):
            os.remove(os.path.join(cache_dir, name))
    shape = (count,) + tuple(latent_shape)
    store = np.lib.format.open_memmap(partial, mode="w+", dtype=np.dtype(cache_dtype), shape=shape)
    store.flush()
    del store
    atomic_write_json(plan_path, plan)
    return set()


def _encode_chunks(vae, dataset, store, chunks, *, num_images, chunk_size, batch_size,
                   random_flip, seed, num_workers, cache_dir, bar):
    """Encode ``chunks`` (image index ranges of ``dataset``) into ``store``; mark each when flushed."""
    batches = []
    for chunk in chunks:
        start, stop = chunk * chunk_size, min((chunk + 1) * chunk_size, num_images)
        batches.extend(list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size))
    if not batches:
        bar.close()
        return
    loader = pixel_batches(dataset, batch_sampler=batches, num_workers=num_workers,
                           pin_memory=vae.device.type == "cuda")
    generators = {}
    for indices, images in zip(batches, loader):
        chunk = indices[0] // chunk_size
        if chunk not in generators:
            # Posterior noise depends on the chunk only: a resumed or
            # differently split build stores the same numbers.
            generators = {chunk: [torch.Generator().manual_seed(seed * 1_000_003 + 2 * chunk + k) for k in (0, 1)]}
        first, last = indices[0], indices[-1] + 1
        images = images.to(vae.device, non_blocking=True)
        _store_latents(store, first, last, vae.encode_unscaled(images, generators[chunk][0]))
        if random_flip:
            mirrored = vae.encode_unscaled(torch.flip(images, dims=[3]), generators[chunk][1])
            _store_latents(store, num_images + first, num_images + last, mirrored)
        bar.update(len(indices))
        chunk_stop = min((chunk + 1) * chunk_size, num_images)
        if last == chunk_stop:
            store.flush()
            with open(_chunk_marker(cache_dir, chunk), "w") as f:
                f.write("done\n")
    bar.close()


def _store_latents(store, start, stop, latents):
    values = latents.float().cpu().numpy().astype(store.dtype)
    if not np.isfinite(values).all():
        hint = " (too large for float16: use cache_dtype float32)" if store.dtype == np.float16 else ""
        raise UserError(f"the VAE produced non-finite latents for entries {start}..{stop - 1}{hint}")
    store[start:stop] = values


def check_finite_rows(array, path, rows_per_read=4096):
    """Refuse a (memory-mapped) array holding NaN or Inf, naming ``path`` and
    the first bad row; read in pieces, one vectorised test per piece."""
    for start in range(0, array.shape[0], rows_per_read):
        block = np.asarray(array[start:start + rows_per_read])
        finite = np.isfinite(block).reshape(block.shape[0], -1).all(axis=1)
        if not finite.all():
            index = start + int(np.argmin(finite))
            raise UserError(f"latent cache file {path!r} holds NaN or Inf at index {index}; rebuild the cache")


def measure_array_scale(array, rows_per_read=4096):
    """``1/std`` over all values of a (memory-mapped) array, read in pieces."""
    total = total_sq = 0.0
    for start in range(0, array.shape[0], rows_per_read):
        block = np.asarray(array[start:start + rows_per_read], dtype=np.float64)
        total += float(block.sum())
        total_sq += float(np.square(block).sum())
    return scale_from_moments(total, total_sq, array.size)


def _finish_cache(cache_dir, plan, vae, scale_spec, labels, num_chunks):
    missing = sorted(set(range(num_chunks)) - _done_chunks(cache_dir))
    if missing:
        raise UserError(f"latent cache {cache_dir}: chunks {missing[:5]} were not encoded; rerun to finish")
    partial = os.path.join(cache_dir, PARTIAL_FILE)
    store = np.load(partial, mmap_mode="r")
    if scale_spec == "measured":
        vae.set_latent_scale(measure_array_scale(store))
    elif isinstance(scale_spec, float):
        vae.set_latent_scale(scale_spec)
    raw_std = 1.0 / measure_array_scale(store)
    del store
    atomic_write_npy(os.path.join(cache_dir, LABELS_FILE), np.concatenate([labels] * (2 if plan["random_flip"] else 1)))
    fsync_path(partial)
    os.replace(partial, os.path.join(cache_dir, LATENTS_FILE))
    meta = {
        "format": FORMAT_VERSION,
        "scaled": False,  # latents.npy holds raw latents; multiply by latent_scale
        "latent_scale": vae.latent_scale,
        "raw_std": raw_std,
        "vae": vae.describe(),
        "image_size": plan["image_size"],
        "channels": plan["channels"],
        "input_range": plan["input_range"],
        "sample_posterior": plan["sample_posterior"],
        "random_flip": plan["random_flip"],
        "label_map": plan["label_map"],
        "db_range": plan["db_range"],
        "num_images": plan["num_images"],
        "count": plan["count"],
        "shape": plan["shape"],
        "dtype": plan["dtype"],
        "plan": plan,
    }
    atomic_write_json(os.path.join(cache_dir, META_FILE), meta)
    # Only once meta.json exists may the resume bookkeeping go.
    shutil.rmtree(os.path.join(cache_dir, PROGRESS_DIR), ignore_errors=True)
    os.remove(os.path.join(cache_dir, PLAN_FILE))
    logger.log(
        f"latent cache {cache_dir}: {meta['count']} latents {tuple(meta['shape'])} {meta['dtype']}, "
        f"latent_scale {vae.latent_scale:.6g} (raw std {raw_std:.4g})"
    )
    return meta


# --------------------------------------------------------------------------- #
# reading
# --------------------------------------------------------------------------- #


class LatentCache:
    """A finished cache, memory-mapped. ``get_batch(indices)`` gives training batches.

    Attributes: ``meta`` (meta.json), ``latents`` (the raw memmap,
    ``(count, C, h, w)``), ``labels`` (int64 ``(count,)``), ``latent_scale``,
    ``label_map`` (``{"0": name}`` or None), ``vae_description``.
    """

    def __init__(self, cache_dir):
        meta_path = os.path.join(cache_dir, META_FILE)
        if not os.path.isfile(meta_path):
            hint = " (an interrupted build: rerun encode_latents.py to finish it)" if os.path.isfile(
                os.path.join(cache_dir, PLAN_FILE)) else ""
            raise UserError(f"no complete latent cache in {cache_dir!r}: {META_FILE} is missing{hint}")
        self.cache_dir = cache_dir
        try:
            self.meta = _read_json(meta_path)
        except (OSError, ValueError) as err:
            raise UserError(f"latent cache file {meta_path!r} is not readable JSON: {err}") from None
        if not isinstance(self.meta, dict):
            raise UserError(f"latent cache file {meta_path!r} holds a {type(self.meta).__name__}, not an object")
        if self.meta.get("format") != FORMAT_VERSION:
            raise UserError(
                f"latent cache {cache_dir!r} has format {self.meta.get('format')!r}; "
                f"this code reads format {FORMAT_VERSION}: rebuild it"
            )
        try:
            self.latents = np.load(os.path.join(cache_dir, LATENTS_FILE), mmap_mode="r")
            self.labels = np.load(os.path.join(cache_dir, LABELS_FILE))
        except (OSError, ValueError) as err:
            raise UserError(f"latent cache {cache_dir!r} is damaged: {err}") from err
        try:
            expected = (int(self.meta["count"]),) + tuple(int(n) for n in self.meta["shape"])
            self.latent_scale = float(self.meta["latent_scale"])
            self.vae_description = dict(self.meta["vae"])
        except KeyError as err:
            raise UserError(f"latent cache file {meta_path!r} lacks the key {err}") from None
        except (TypeError, ValueError) as err:
            raise UserError(f"latent cache file {meta_path!r} has a malformed count, shape, latent_scale "
                            f"or vae: {err}") from None
        self._check_latent_dtype()
        if self.latents.shape != expected or self.labels.shape != (expected[0],):
            raise UserError(
                f"latent cache {cache_dir!r} is damaged: latents {self.latents.shape}, "
                f"labels {self.labels.shape}, meta.json says {expected}"
            )
        self.label_map = self.meta.get("label_map")
        self._check_labels(meta_path)
        check_finite_rows(self.latents, os.path.join(cache_dir, LATENTS_FILE))

    def _check_latent_dtype(self):
        """Latents are real floats; a complex or integer array would be cast
        silently (complex loses its imaginary part) and train on garbage."""
        if self.latents.dtype.kind != "f":
            path = os.path.join(self.cache_dir, LATENTS_FILE)
            raise UserError(f"latent cache file {path!r} holds {self.latents.dtype} values; latents must be real "
                            f"floats ({' or '.join(CACHE_DTYPES)}): rebuild the cache")

    def _check_labels(self, meta_path):
        """Labels must be integers naming entries of the label map (0 without one)."""
        labels_path = os.path.join(self.cache_dir, LABELS_FILE)
        if not np.issubdtype(self.labels.dtype, np.integer):
            raise UserError(f"latent cache file {labels_path!r} holds {self.labels.dtype} labels, not integers")
        self.label_map = normalize_label_map(self.label_map, f"latent cache file {meta_path!r}")
        count = len(self.label_map) if self.label_map else 1
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= count))
        if bad.size:
            index = int(bad[0])
            raise UserError(f"latent cache file {labels_path!r}: label {int(self.labels[index])} at index {index} "
                            f"is outside the label map (0..{count - 1})")

    def __len__(self):
        return self.latents.shape[0]

    @property
    def shape(self):
        """``(C, h, w)`` of one latent."""
        return tuple(self.latents.shape[1:])

    def get_batch(self, indices, class_cond=True):
        """``(float32 (B, C, h, w) scaled latents, {"y": int64 (B,)})`` for ``indices``.

        One vectorised read: indices are sorted for the memmap (sequential
        pages) and the rows put back in the order asked for.
        """
        indices = np.asarray(indices, dtype=np.int64)
        order = np.argsort(indices, kind="stable")
        rows = np.empty((len(indices),) + self.shape, dtype=np.float32)
        rows[order] = self.latents[indices[order]]
        latents = torch.from_numpy(rows).mul_(self.latent_scale)
        cond = {"y": torch.from_numpy(self.labels[indices])} if class_cond else {}
        return latents, cond


# Caches up to this size are copied whole to the GPU: batches are then
# gathered there, with no host work and no host-to-device copy per step.
DEVICE_CACHE_BYTES = 8 << 30


def _to_device(array, dtype, device):
    """A copy on ``device`` of a (read-only, memory-mapped) cache array. The
    host view is only read, so torch's warning about unwritable arrays, which
    would reach the user's log, is silenced here rather than paid for with a
    host copy."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype)).to(device)


def load_latent_data(*, cache_dir, batch_size, shard=None, num_shards=None, deterministic=False,
                     seed=0, class_cond=True, device=None):
    """Endless ``(latents float32 (B, C, h, w) unit-std, {"y": int64 (B,)})`` batches.

    Each rank (``shard`` of ``num_shards``; default: this rank of the job)
    takes its slice of one permutation per epoch (natural order with
    ``deterministic``); batches are whole, the last partial one of an epoch is
    dropped. The result is a resumable ``batching.BatchStream`` (``state_dict``),
    with ``cache`` and ``label_map`` attributes.
    """
    cache = LatentCache(cache_dir)
    shard = dist_util.rank() if shard is None else shard
    num_shards = dist_util.world_size() if num_shards is None else num_shards
    device = torch.device(device) if device is not None else None
    on_device = device is not None and device.type == "cuda" and cache.latents.nbytes <= DEVICE_CACHE_BYTES
    try:
        sampler = ShardedBatchSampler(len(cache), int(batch_size), shard=shard, num_shards=num_shards,
                                      shuffle=not deterministic, seed=seed, device=device if on_device else None)
    except ValueError as err:
        raise UserError(f"latent cache {cache_dir!r}: {err}") from None

    if on_device:
        all_latents = _to_device(cache.latents, np.float32, device).mul_(cache.latent_scale)
        all_labels = _to_device(cache.labels, np.int64, device)

        def batches(index_sampler):
            for indices in index_sampler:
                cond = {"y": all_labels[indices]} if class_cond else {}
                yield all_latents[indices], cond
    else:

        def batches(index_sampler):
            for indices in index_sampler:
                yield cache.get_batch(indices, class_cond=class_cond)

    stream = BatchStream(sampler, batches, label_map=cache.label_map)
    stream.cache = cache
    return stream


def check_cache_matches(meta, vae_description=None, config=None, cache_dir="latent cache"):
    """Refuse a cache made for another VAE or configuration.

    :param meta: the cache's ``meta.json`` dict (``LatentCache.meta``).
    :param vae_description: ``VAEInterface.describe()`` of the VAE in use, or None.
    :param config: training settings; the keys ``image_size``, ``input_range``,
        ``latent_scale`` (a number; strings like "measured" are not compared),
        ``label_map``, ``sample_posterior``, ``random_flip`` and ``db_range``
        ("auto" is not compared) are compared when present and not None.
    :raises UserError: naming the first differing field and both values.
    """
    checks = []
    if vae_description is not None:
        cached_vae = meta["vae"]
        for key in ("fingerprint", "input_range", "latent_channels", "downsample_factor"):
            checks.append((f"vae {key}", cached_vae.get(key), vae_description.get(key), "the VAE in use"))
        if vae_description.get("latent_scale") is not None:
            checks.append(("latent_scale", meta["latent_scale"], vae_description["latent_scale"], "the VAE in use"))
    for key in ("image_size", "input_range", "latent_scale", "label_map", "sample_posterior", "random_flip",
                "db_range"):
        if config is None or config.get(key) is None:
            continue
        value = config[key]
        if key == "db_range":
            value = parse_db_range(value)
            if value == "auto":
                continue
            value = list(value)
        if key == "latent_scale":
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    continue
        if key == "label_map":
            value = {str(k): v for k, v in value.items()}
        checks.append((key, meta.get(key), value, "the configuration"))
    for field, cached, current, source in checks:
        same = cached == current
        if field == "latent_scale" and cached is not None and current is not None:
            same = math.isclose(float(cached), float(current), rel_tol=1e-6)
        if field == "db_range":
            same = same_range(cached, current)
        if not same:
            raise UserError(f"{cache_dir}: {field} is {cached!r} in the cache but {current!r} in {source}")


# --------------------------------------------------------------------------- #
# on the fly
# --------------------------------------------------------------------------- #


class EncodedBatches:
    """Wrap an endless ``(images, cond)`` iterator; yield ``(vae.encode_batch(images), cond)``.

    Whole batches are moved to ``device`` (default: the VAE's) and encoded
    there in one call, instead of image by image in loader workers. The inner
    iterator's ``state_dict``/``load_state_dict``/``label_map`` pass through.
    For the training loop, ``vae.encode_batch`` can equally be passed as its
    ``batch_transform``.
    """

    def __init__(self, batches, vae, device=None):
        self.batches, self.vae = batches, vae
        self.device = torch.device(device) if device is not None else vae.device
        self.label_map = getattr(batches, "label_map", None)

    def __iter__(self):
        return self

    def __next__(self):
        images, cond = next(self.batches)
        images = images.to(self.device, non_blocking=True)
        return self.vae.encode_batch(images), cond

    def state_dict(self):
        return self.batches.state_dict()

    def load_state_dict(self, state):
        self.batches.load_state_dict(state)
