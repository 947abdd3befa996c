"""The one place where images cross into latent space and back.

``VAEInterface`` wraps a diffusers ``AutoencoderKL`` saved with
``save_pretrained`` in a local directory. Conventions it enforces:

- Images handed in and returned are float tensors ``(N, C, H, W)`` in the
  DATA's range ``[-1, 1]`` (our datasets' convention). If the VAE was trained
  on ``[0, 1]`` (``input_range="0,1"``) the conversion happens here, both ways.
- Latents handed to diffusion are ``(N, latent_channels, H/f, W/f)`` float32
  with unit standard deviation: raw posterior latents times ``latent_scale``.
  The scale is applied exactly once in ``encode_batch`` and undone exactly once
  in ``decode_batch``.
- The scale is either given or measured (``measure_latent_scale``: 1/std over
  training latents). diffusers' ``config.scaling_factor`` (0.18215 by default)
  describes some other model's latents and is never used; with no scale,
  encoding and decoding refuse to run.
"""

import hashlib
import json
import math
import os
from contextlib import nullcontext

import torch

from ..runtime.errors import UserError, shown
from ..runtime import dist_util
from ..runtime.files import read_json_object

INPUT_RANGES = ("-1,1", "0,1")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The words a latent-scale setting may be instead of a number (parse_latent_scale).
LATENT_SCALE_WORDS = ("stored", "measured")
LATENT_STATS_FILE = "latent_stats.json"
# diffusers writes one of these (a sharded checkpoint has an index file).
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json",
)


def check_input_range(value):
    """Return ``value`` if it is a known input range, else raise UserError."""
    if value not in INPUT_RANGES:
        raise UserError(f"input_range must be one of {', '.join(INPUT_RANGES)}, got {shown(value)}")
    return value


def _weight_paths(path):
    """The files that hold the weights of the VAE in ``path`` (sorted, existing)."""
    for name in WEIGHT_FILES:
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        if name.endswith(".index.json"):
            with open(full) as f:
                shards = sorted(set(json.load(f).get("weight_map", {}).values()))
            return [os.path.join(path, s) for s in shards]
        return [full]
    return []


def check_vae_dir(path):
    """Raise UserError unless ``path`` holds a saved AutoencoderKL; return its config dict."""
    expected = f"config.json and {WEIGHT_FILES[0]} (a diffusers AutoencoderKL saved with save_pretrained)"
    if not os.path.isdir(path):
        raise UserError(f"VAE path {path!r} is not a directory; expected a folder holding {expected}")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path) or not _weight_paths(path):
        hint = ""
        if os.path.isfile(os.path.join(path, "vae", "config.json")):
            hint = f" (it has a 'vae' subfolder: pass {os.path.join(path, 'vae')!r})"
        raise UserError(f"VAE path {path!r} holds no VAE: expected {expected}{hint}")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"VAE config {config_path!r} is unreadable: {err}") from err
    class_name = config.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL" or "block_out_channels" not in config:
        raise UserError(f"VAE path {path!r} holds a {class_name}, expected an AutoencoderKL")
    return config


def vae_fingerprint(path):
    """Short hash of the VAE's config.json and weight-file bytes (identity for caches)."""
    digest = hashlib.sha256()
    for file in [os.path.join(path, "config.json")] + _weight_paths(path):
        digest.update(os.path.basename(file).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def read_latent_stats(path):
    """The ``latent_stats.json`` that vae_training stores beside the VAE, or None."""
    stats_path = os.path.join(path, LATENT_STATS_FILE)
    if not os.path.isfile(stats_path):
        return None
    return read_json_object(stats_path)


def _read_vae_weights(path):
    """Every tensor of the VAE's weight files (safetensors, or a ``.bin`` read
    with ``weights_only``: nothing loaded here can execute code)."""
    from safetensors.torch import load_file

    state = {}
    for file in _weight_paths(path):
        if not os.path.isfile(file):
            raise UserError(f"VAE weight file {file!r} is missing (named by the index in {path!r})")
        try:
            if file.endswith(".safetensors"):
                part = load_file(file)
            else:
                part = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # safetensors and torch raise their own types
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"VAE weight file {file!r} is unreadable: {first}") from None
        state.update(part)
    return state


def _few(items, limit=3):
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def load_vae_strict(path, config):
    """The AutoencoderKL of ``config`` (config.json) with exactly the tensors
    stored in ``path``: a missing, extra or mis-shaped tensor is a UserError.

    diffusers' ``from_pretrained`` leaves a missing tensor as uninitialised
    memory and reports a config/weights disagreement as a traceback, so the
    model is built from the config and the names and shapes compared here.
    """
    from diffusers import AutoencoderKL

    try:
        model = AutoencoderKL.from_config(config)
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"VAE config in {path!r} does not describe an AutoencoderKL: {first}") from None
    state = _read_vae_weights(path)
    if hasattr(model, "_fix_state_dict_keys_on_load"):
        # Older diffusers saved attention as query/key/value/proj_attn
        # (e.g. downloaded Stable Diffusion VAEs); renamed in place as
        # from_pretrained would.
        model._fix_state_dict_keys_on_load(state)
    own = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{n} stored {list(state[n].shape)} vs config {list(own[n])}"
             for n in sorted(set(own) & set(state)) if tuple(state[n].shape) != own[n]]
    problems = [f"{len(items)} {what}: {_few(items)}"
                for what, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)) if items]
    if problems:
        raise UserError(f"the VAE weights in {path!r} do not fit its config.json: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
    return model


def parse_latent_scale(value):
    """A latent-scale setting: a positive number, ``"stored"`` (the value
    ``vae_training`` wrote to ``VAE_DIR/latent_stats.json``) or
    ``"measured"`` (1/std over the data, measured before training or caching).
    The one place these three spellings are understood."""
    if isinstance(value, str) and value.strip() in LATENT_SCALE_WORDS:
        return value.strip()
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"latent_scale must be a number, 'measured' or 'stored', got {shown(value)}") from None
    if isinstance(value, bool) or not (math.isfinite(number) and number > 0):
        raise UserError(f"latent_scale must be a positive finite number, 'measured' or 'stored', got {shown(value)}")
    return number


def latent_shape_of(vae_description, image_size):
    """``(latent_channels, h, w)`` the VAE described by ``vae_description``
    (``latent_channels``, ``downsample_factor``; see ``VAEInterface.describe``)
    makes of square ``image_size`` or an ``(H, W)`` pair. The one place pixel
    sizes become latent sizes."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    factor = int(vae_description["downsample_factor"])
    for side in (height, width):
        if int(side) % factor:
            raise UserError(f"image size {side} is not divisible by the VAE's downsampling factor {factor}")
    return (int(vae_description["latent_channels"]), int(height) // factor, int(width) // factor)


def scale_from_moments(total, total_sq, count):
    """``1/std`` of values given their sum, sum of squares and count (float64 maths)."""
    if count < 2:
        raise UserError("cannot measure the latent scale from fewer than 2 values")
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    if not var > 0.0:
        raise UserError("cannot measure the latent scale: the latents are constant (std 0)")
    return 1.0 / math.sqrt(var)


class VAEInterface:
    """A saved AutoencoderKL with our range, scale and batching conventions.

    :param path: directory written by ``AutoencoderKL.save_pretrained``.
    :param device: where the VAE runs (default: ``dist_util.dev()``).
    :param dtype: ``"float32"`` or ``"bfloat16"`` (compute under autocast;
        weights stay float32, results are returned as float32). On an H100
        bf16 was ~12% faster than float32 for encode+decode, with latents
        differing by up to ~0.04 (unit-std scale); float32 is the default.
        For speed on CUDA also call ``dist_util.autotune_convolutions``
        (the scripts do; a library class does not change global state).
    :param max_batch: images (or latents) per forward pass, to bound memory.
    :param input_range: the VAE's own pixel range, ``"-1,1"`` or ``"0,1"``.
    :param sample_posterior: encode to a posterior sample (True) or its mean.
    :param latent_scale: a float, ``None`` (measure it before encoding) or
        ``"stored"`` (the value ``vae_training`` saved in ``latent_stats.json``).
    :param seed: seed of the generator used for posterior samples.
    """

    def __init__(
        self,
        path,
        *,
        device=None,
        dtype="float32",
        max_batch=64,
        input_range="-1,1",
        sample_posterior=False,
        latent_scale=None,
        seed=0,
    ):
        self.config = check_vae_dir(path)
        self.path = os.path.abspath(path)
        self.input_range = check_input_range(input_range)
        if dtype not in DTYPES:
            raise UserError(f"VAE dtype must be one of {', '.join(DTYPES)}, got {shown(dtype)}")
        self.dtype = DTYPES[dtype]
        if int(max_batch) < 1:
            raise UserError(f"VAE max_batch must be >= 1, got {max_batch}")
        self.max_batch = int(max_batch)
        self.sample_posterior = bool(sample_posterior)
        if device is None:

            device = dist_util.dev()
        self.device = torch.device(device)
        self.in_channels = int(self.config.get("in_channels", 3))
        self.out_channels = int(self.config.get("out_channels", self.in_channels))
        self.latent_channels = int(self.config.get("latent_channels", 4))
        self.downsample_factor = 2 ** (len(self.config["block_out_channels"]) - 1)
        self.fingerprint = vae_fingerprint(path)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.latent_scale = None
        stats = read_latent_stats(path)
        # The dB range of the .npy/.npz data the VAE was trained on: data it
        # encodes must be mapped the same way (None: trained on images).
        self.db_range = None
        if stats and stats.get("fingerprint") in (None, self.fingerprint):
            self.db_range = stats.get("db_range")
        if latent_scale is not None:
            latent_scale = parse_latent_scale(latent_scale)
        if latent_scale == "measured":
            latent_scale = None
        if latent_scale == "stored":
            if stats is None:
                raise UserError(
                    f"latent_scale 'stored' but {os.path.join(path, LATENT_STATS_FILE)!r} does not exist; "
                    "pass a number or measure it"
                )
            if stats.get("fingerprint") not in (None, self.fingerprint):
                raise UserError(
                    f"{LATENT_STATS_FILE} in {path!r} belongs to another VAE "
                    f"(fingerprint {stats.get('fingerprint')} vs {self.fingerprint}); re-measure the scale"
                )
            if stats.get("input_range", self.input_range) != self.input_range:
                raise UserError(
                    f"{LATENT_STATS_FILE} in {path!r} was measured with input_range {stats['input_range']}, "
                    f"not {self.input_range}; re-measure the scale"
                )
            self.set_latent_scale(stats["latent_scale"])
        elif latent_scale is not None:
            self.set_latent_scale(latent_scale)

        model = load_vae_strict(path, self.config)
        # Kept in NCHW: measured on an H100 (base VAE, 64px, batch 256), NHWC
        # (channels_last) made encode+decode 25-40% slower, because the many
        # GroupNorms of these VAEs are slow in that layout.
        self.model = model.to(self.device).eval().requires_grad_(False)

    # ---- shapes and checks ---------------------------------------------------

    def set_latent_scale(self, value):
        """Fix the factor that makes latents unit-std (a positive finite float)."""
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise UserError(f"latent_scale must be a number, got {shown(value)}") from None
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"latent_scale must be a positive finite number, got {value}")
        self.latent_scale = value

    def latent_shape(self, image_size):
        """``(latent_channels, h, w)`` for square ``image_size`` or an ``(H, W)`` pair."""
        return latent_shape_of(
            {"latent_channels": self.latent_channels, "downsample_factor": self.downsample_factor}, image_size
        )

    def check_channels(self, data_channels):
        """Raise UserError if the data's channel count differs from the VAE's input."""
        if int(data_channels) != self.in_channels:
            raise UserError(
                f"the data has {data_channels} channels but the VAE in {self.path!r} "
                f"expects {self.in_channels} (in_channels)"
            )

    def _check_images(self, images):
        if images.dim() != 4:
            raise UserError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        self.check_channels(images.shape[1])
        self.latent_shape(tuple(images.shape[2:]))

    def _require_scale(self):
        if self.latent_scale is None:
            raise UserError(
                f"no latent scale for the VAE in {self.path!r}: measure it "
                "(measure_latent_scale / --latent_scale measured) or pass one (--latent_scale X); "
                "the VAE config's scaling_factor is deliberately not used"
            )
        return self.latent_scale

    def _autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _to_model(self, x):
        return x.to(self.device, torch.float32, non_blocking=True).contiguous()

    # ---- encode / decode -----------------------------------------------------

    def encode_unscaled(self, images, generator=None):
        """Raw posterior latents (mean or sample) of ``images`` in [-1, 1].

        :param images: ``(N, in_channels, H, W)`` float, data range [-1, 1].
        :param generator: CPU ``torch.Generator`` for posterior noise
            (default: this interface's own, seeded with ``seed``).
        :return: ``(N, latent_channels, H/f, W/f)`` float32 on ``images.device``,
            NOT scaled.
        """
        self._check_images(images)
        noise = None
        if self.sample_posterior:
            # All noise is drawn up front on the CPU, so the result does not
            # depend on max_batch or on the device.
            shape = (images.shape[0],) + self.latent_shape(tuple(images.shape[2:]))
            noise = torch.randn(shape, generator=generator if generator is not None else self.generator)
        out = []
        with torch.inference_mode(), self._autocast():
            for start in range(0, images.shape[0], self.max_batch):
                x = self._to_model(images[start:start + self.max_batch])
                if self.input_range == "0,1":
                    x = (x + 1) / 2
                moments = self.model.encode(x).latent_dist
                z = moments.mean.float()
                if noise is not None:
                    eps = noise[start:start + self.max_batch].to(z.device)
                    z = z + moments.std.float() * eps
                out.append(z.to(images.device))
        if not out:
            return torch.zeros((0,) + self.latent_shape(tuple(images.shape[2:])), device=images.device)
        # Concatenating outside inference mode gives an ordinary tensor, which
        # a training loss may save for backward (inference tensors may not be).
        return torch.cat(out).contiguous()

    def encode_batch(self, images, generator=None):
        """Latents for diffusion: ``encode_unscaled(images) * latent_scale``.

        :param images: ``(N, in_channels, H, W)`` float in [-1, 1].
        :return: ``(N, latent_channels, H/f, W/f)`` float32, unit std, on
            ``images.device``.
        """
        scale = self._require_scale()
        return self.encode_unscaled(images, generator) * scale

    def decode_unscaled(self, latents, clamp=True):
        """Images from raw (unscaled) latents, in [-1, 1] (clamped unless told not to)."""
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise UserError(
                f"latents must be (N, {self.latent_channels}, h, w) for this VAE, "
                f"got shape {tuple(latents.shape)}"
            )
        out = []
        with torch.inference_mode(), self._autocast():
            for start in range(0, latents.shape[0], self.max_batch):
                z = self._to_model(latents[start:start + self.max_batch])
                x = self.model.decode(z).sample.float()
                if self.input_range == "0,1":
                    x = x * 2 - 1
                if clamp:
                    x = x.clamp(-1, 1)
                out.append(x.to(latents.device))
        return torch.cat(out).contiguous()  # outside inference mode: an ordinary tensor

    def decode_batch(self, latents, clamp=True):
        """Images from diffusion latents: ``decode_unscaled(latents / latent_scale)``.

        :param latents: ``(N, latent_channels, h, w)`` float, unit-std scale.
        :return: ``(N, out_channels, h*f, w*f)`` float32 in [-1, 1] on
            ``latents.device``.
        """
        scale = self._require_scale()
        return self.decode_unscaled(latents / scale, clamp=clamp)

    # ---- the latent scale ----------------------------------------------------

    def measure_latent_scale(self, batches, max_images=None):
        """Measure and store ``latent_scale = 1/std`` of the unscaled latents of ``batches``.

        :param batches: iterable of image tensors ``(N, C, H, W)`` in [-1, 1],
            or of ``(images, cond)`` pairs as the data loaders yield them.
            Must be finite (stop an infinite loader with ``max_images``).
        :param max_images: stop after this many images (None: exhaust ``batches``).
        :return: the scale (also stored on this interface).
        """
        total = total_sq = 0.0
        count = seen = 0
        for batch in batches:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            if max_images is not None:
                images = images[: max_images - seen]
            z = self.encode_unscaled(images).double()
            total += z.sum().item()
            total_sq += (z * z).sum().item()
            count += z.numel()
            seen += images.shape[0]
            if max_images is not None and seen >= max_images:
                break
        self.set_latent_scale(scale_from_moments(total, total_sq, count))
        return self.latent_scale

    # ---- identity --------------------------------------------------------------

    def describe(self):
        """What checkpoints and caches record about this VAE (JSON-ready)."""
        return {
            "path": self.path,
            "latent_scale": self.latent_scale,
            "latent_channels": self.latent_channels,
            "downsample_factor": self.downsample_factor,
            "input_range": self.input_range,
            "sample_posterior": self.sample_posterior,
            "in_channels": self.in_channels,
            "fingerprint": self.fingerprint,
        }


def _vae_dtype(name, device):
    device = torch.device(device)
    if name == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return name


def load_vae(path, *, device, dtype="auto", input_range="-1,1", sample_posterior=False,
             latent_scale=None, max_batch=64):
    """A :class:`VAEInterface` on ``device`` (errors name the path)."""
    if not path:
        raise UserError("vae_path is required: a folder written by AutoencoderKL.save_pretrained")
    return VAEInterface(
        path, device=device, dtype=_vae_dtype(dtype, device), max_batch=max_batch,
        input_range=input_range, sample_posterior=sample_posterior, latent_scale=latent_scale,
    )


def vae_from_description(vae_meta, *, path=None, device, dtype="auto"):
    """The VAE a checkpoint or cache was made with, with its stored scale and
    input range; ``path`` overrides where it is looked for."""
    path = path or vae_meta["path"]
    if not os.path.isdir(path):
        raise UserError(
            f"the VAE was expected at {vae_meta['path']} and is not there; pass --vae_path DIR to point to it"
        )
    vae = load_vae(
        path, device=device, dtype=dtype, input_range=vae_meta["input_range"],
        sample_posterior=vae_meta.get("sample_posterior", False), latent_scale=vae_meta["latent_scale"],
    )
    if vae_meta.get("fingerprint") and vae.fingerprint != vae_meta["fingerprint"]:
        raise UserError(
            f"the VAE in {path} is not the one this model was trained with "
            f"(fingerprint {vae.fingerprint}, expected {vae_meta['fingerprint']})"
        )
    return vae
