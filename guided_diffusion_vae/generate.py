"""Sampling from a checkpoint: what ``image_sample.py`` and
``image_sample_vae.py`` run.

A checkpoint of ours describes its model, diffusion, classes and VAE, so
``--model_path`` is all it needs; the original's bare ``.pt`` files are built
from the model flags instead.
"""

import math
import os
import re

import numpy as np

from . import checkpoint as ckpt
from . import logger, script_util
from .dist_util import pick_device  # noqa: F401  (also this module's public name)
from .errors import UserError
from .sample_io import save_samples
from .sampling import DenoisedClipper, NonFiniteSamples, generate_samples
from .training import split_flags


def sample_defaults():
    """Sampling flags; the model flags only matter for bare ``.pt`` files."""
    return {
        **script_util.model_and_diffusion_defaults(),
        "model_path": "",
        "output_dir": "",
        "use_ema": True,
        "num_samples": 16,
        "user_ids": [],
        "num_images_per_user": 5,
        "batch_size": 16,
        "use_ddim": False,
        "eta": 0.0,
        "clip_denoised": "auto",
        "clip_range": 3.0,
        "dynamic_threshold_percentile": 0.995,
        "seed": 0,
        "device": "auto",
        "precision": "fp32",
        "vae_path": "",
        "classifier_path": "",
        "classifier_scale": 1.0,
        "keep_going": False,
    }


def resolve_weights_file(model_path, use_ema):
    """The weights file to sample from: a run folder means its newest
    checkpoint; with ``use_ema`` the EMA file of that step is taken."""
    if os.path.isdir(model_path):
        found = [n for n in os.listdir(model_path) if re.fullmatch(r"model\d+\.safetensors", n)]
        if not found:
            raise UserError(f"{model_path} holds no modelNNNNNN.safetensors checkpoint")
        model_path = os.path.join(model_path, max(found, key=ckpt.parse_step))
    if not os.path.isfile(model_path):
        raise UserError(f"checkpoint not found: {model_path}")
    name = os.path.basename(model_path)
    if not use_ema or name.startswith("ema_"):
        return model_path
    folder, step = os.path.dirname(model_path), ckpt.parse_step(model_path)
    suffix = ".safetensors" if name.endswith(".safetensors") else ".pt"
    pattern = re.compile(rf"ema_([0-9.]+)_{step:06d}{re.escape(suffix)}")
    emas = sorted(n for n in os.listdir(folder or ".") if pattern.fullmatch(n))
    if not emas:
        raise UserError(
            f"no EMA weights beside {model_path} (looked for ema_<rate>_{step:06d}{suffix}); "
            f"pass --use_ema False to sample from the raw weights"
        )
    # The slowest average (largest rate) is the one guided-diffusion samples from.
    emas.sort(key=lambda n: float(pattern.fullmatch(n).group(1)), reverse=True)
    return os.path.join(folder, emas[0])


def resolve_user_ids(user_ids, label_map):
    """Class indices for ``--user_ids`` tokens: a class name (``user_05``) or a
    number matching the number in a class name (``5``)."""
    names = {int(k): v for k, v in label_map.items()}
    by_name = {v: k for k, v in names.items()}
    by_number = {}
    for index, name in names.items():
        digits = re.search(r"(\d+)$", str(name))
        if digits:
            by_number.setdefault(int(digits.group(1)), index)
    chosen = []
    for token in user_ids:
        token = str(token)
        if token in by_name:
            chosen.append(by_name[token])
        elif token.isdigit() and int(token) in by_number:
            chosen.append(by_number[int(token)])
        elif token.isdigit() and not by_number and int(token) in names:
            chosen.append(int(token))
        else:
            valid = sorted(by_number) if by_number else sorted(names)
            shown = ", ".join(str(v) for v in valid)
            raise UserError(f"unknown user id {token!r}; valid ids: {shown} (or the names {names[min(names)]}..)")
    return chosen


def check_label_map(label_map, source):
    """Refuse a label map that is not ``{"0": name, ...}`` (or None)."""
    if label_map is None:
        return
    if not isinstance(label_map, dict):
        raise UserError(f"{source}: label_map must be an object {{\"0\": name, ...}}, got {type(label_map).__name__}")
    for key, name in label_map.items():
        if not (isinstance(key, str) and key.isdigit() and isinstance(name, str)):
            raise UserError(f"{source}: label_map entry {key!r}: {name!r} is not an index string and a name")


def check_sampling_metadata(meta, source):
    """The parts of a checkpoint's metadata that sampling reads, checked
    before anything is built: one line naming the file and the key."""
    for key in ("model", "diffusion"):
        if key not in meta:
            raise UserError(f"{source}: metadata lacks the key '{key}'")
    ckpt.check_build_kwargs(script_util.create_model, meta["model"], source, "model")
    ckpt.check_build_kwargs(script_util.create_gaussian_diffusion, meta["diffusion"], source, "diffusion")
    data = meta.get("data")
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{source}: metadata 'data' must be an object, got {type(data).__name__}")
    check_label_map((data or {}).get("label_map"), source)


def load_sampling_model(config, device):
    """``(model, diffusion_config, meta)`` for the checkpoint in ``config``."""
    path = resolve_weights_file(config["model_path"], config["use_ema"])
    state, meta = ckpt.load_weights(path)
    if meta is None:
        logger.log(f"{path} is a bare state dict: building the model from the flags")
        flags = {k: config[k] for k in script_util.model_and_diffusion_defaults()}
        model_config, diffusion_config = split_flags(flags)
        diffusion_config["timestep_respacing"] = ""
        model = script_util.create_model(**model_config)
        meta = {"model": model_config, "diffusion": diffusion_config, "data": {}, "vae": None}
        ckpt.load_state_strict(model, state, path)
    else:
        check_sampling_metadata(meta, path)
        model = ckpt.build_from_metadata(script_util.create_model, meta["model"], state, path, "model")
        diffusion_config = dict(meta["diffusion"])
    logger.log(f"sampling from {path} (step {meta.get('step', ckpt.parse_step(path))})")
    if config.get("use_fp16"):
        model.convert_to_fp16()
    return model.to(device).eval(), diffusion_config, meta


def load_decoder(meta, config, device):
    """The VAE decoder for a latent checkpoint (None for pixel models)."""
    vae_meta = meta.get("vae")
    if not vae_meta:
        if config["vae_path"]:
            raise UserError("vae_path given, but this checkpoint is a pixel-space model (it has no VAE)")
        return None
    from .latent_model import vae_from_description

    vae = vae_from_description(vae_meta, path=config["vae_path"] or None, device=device)
    return vae.decode_batch


def load_guidance(config, meta, device):
    """``cond_fn`` of the noisy classifier in ``classifier_path`` (None
    without one), after checking it was trained for this model's inputs."""
    if not config["classifier_path"]:
        return None, None
    from .classifier_training import classifier_cond_fn, load_classifier

    path = config["classifier_path"]
    classifier, cmeta = load_classifier(path, device)
    checks = [
        ("input channels", cmeta["classifier"]["in_channels"], meta["model"].get("in_channels", 3)),
        ("input size", cmeta["classifier"]["image_size"], meta["model"]["image_size"]),
        ("noise_schedule", cmeta["diffusion"]["noise_schedule"], meta["diffusion"]["noise_schedule"]),
        ("diffusion steps", cmeta["diffusion"]["steps"], meta["diffusion"]["steps"]),
    ]
    model_labels = (meta.get("data") or {}).get("label_map")
    classifier_labels = (cmeta.get("data") or {}).get("label_map")
    if model_labels and classifier_labels:
        checks.append(("label map", classifier_labels, model_labels))
    for what, theirs, ours in checks:
        if theirs != ours:
            raise UserError(f"classifier {path} does not fit the model: {what} {theirs!r} there, {ours!r} here")
    logger.log(f"classifier guidance from {path}, scale {config['classifier_scale']}")
    return classifier_cond_fn(classifier, config["classifier_scale"]), classifier_labels


def _drop_labels(model):
    """An unconditional model called with the classifier's labels ignores them."""

    def call(x, t, y=None, **kwargs):
        return model(x, t, **kwargs)

    return call


def _nonfinite_causes(config):
    causes = [f"the weights of {config['model_path']} (NaN or diverged)"]
    if config["classifier_path"]:
        causes.append(f"classifier_scale={config['classifier_scale']} (too large?)")
    return "look at " + " or ".join(causes)


def run_sampling(config):
    """Draw samples as configured and write them; returns the paths written."""
    if not config["model_path"]:
        raise UserError("model_path is required: a checkpoint file or a run folder")
    if not config["output_dir"]:
        raise UserError("output_dir is required")
    if not math.isfinite(config["classifier_scale"]):
        raise UserError(f"classifier_scale must be a finite number, got {config['classifier_scale']}")
    for key in ("batch_size", "num_images_per_user", "num_samples"):
        if int(config[key]) < 1:
            raise UserError(f"{key} must be >= 1, got {config[key]}")
    device = pick_device(config["device"])
    model, diffusion_config, meta = load_sampling_model(config, device)
    if config["timestep_respacing"]:
        diffusion_config["timestep_respacing"] = config["timestep_respacing"]
    diffusion = script_util.create_gaussian_diffusion(**diffusion_config)
    label_map = (meta.get("data") or {}).get("label_map")
    class_cond = bool(meta["model"].get("class_cond"))
    cond_fn, classifier_labels = load_guidance(config, meta, device)
    if cond_fn is not None and not class_cond:
        # Guidance alone makes an unconditional model class-specific.
        label_map = classifier_labels
        class_cond = True
        model = _drop_labels(model)
    if class_cond:
        if not label_map:
            label_map = {str(i): f"class_{i:03d}" for i in range(int(meta["model"]["num_classes"]))}
        classes = resolve_user_ids(config["user_ids"], label_map) if config["user_ids"] else sorted(int(k) for k in label_map)
        labels = np.repeat(np.array(classes, dtype=np.int64), config["num_images_per_user"])
    else:
        if config["user_ids"]:
            raise UserError("user_ids given, but this model is unconditional: use --num_samples")
        labels = None
    num_samples = len(labels) if labels is not None else config["num_samples"]
    clip_mode = config["clip_denoised"]
    if clip_mode == "auto":  # pixels keep the original's [-1, 1] clip; latents get none
        clip_mode = "none" if meta.get("vae") else "pixel"
    clipper = DenoisedClipper(clip_mode, config["clip_range"], config["dynamic_threshold_percentile"])
    decode_fn = load_decoder(meta, config, device)
    channels = meta["model"].get("in_channels", 3)
    size = meta["model"]["image_size"]
    dropped = []
    try:
        images, labels_out, clipped = generate_samples(
            model=model, diffusion=diffusion, sample_shape=(channels, size, size),
            num_samples=num_samples, batch_size=config["batch_size"], labels=labels,
            use_ddim=config["use_ddim"], eta=config["eta"], clipper=clipper, decode_fn=decode_fn, cond_fn=cond_fn,
            seed=config["seed"], device=device, precision=config["precision"],
            on_nonfinite=dropped.extend if config["keep_going"] else None,
        )
    except NonFiniteSamples as err:
        raise UserError(f"{err}: {_nonfinite_causes(config)}; nothing was written "
                        "(--keep_going True writes the finite samples and counts the others)") from None
    if dropped:
        logger.warn(f"{len(dropped)} of {num_samples} samples held NaN or Inf and were not written "
                    f"(indices {dropped[:10]}{' ...' if len(dropped) > 10 else ''}); {_nonfinite_causes(config)}")
    if not len(images):
        raise UserError(f"every sample held NaN or Inf: {_nonfinite_causes(config)}")
    if clip_mode != "none":
        logger.log(f"clip_denoised={clip_mode}: {100 * clipped:.3f}% of predicted x0 values were clipped")
    paths = save_samples(config["output_dir"], images, labels_out, label_map if class_cond else None)
    logger.log(f"wrote {len(images)} samples to {config['output_dir']} (grid: {paths['grid']})")
    return paths
