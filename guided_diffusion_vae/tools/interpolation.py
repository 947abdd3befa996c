"""Walking between two samples: what ``scripts/interpolate.py`` runs.

The starting noises of two seeds are joined by a spherical path (slerp): a
straight line between two Gaussian draws passes through vectors of smaller
norm than the model ever saw as noise, which decode to washed-out pictures;
the great circle keeps the norm. For class-conditional models the two
people's class embeddings are mixed linearly along the way (the embedding is
added to the timestep embedding, so a linear mix is what the network can
take). Every frame is denoised with DDIM at eta 0, a deterministic map from
noise to image, so the frames change smoothly.

The endpoints are the plain samples: frame 0 is exactly sample 0 of
``--seed seed_a`` for ``user_a`` as the sampling scripts draw it with
``--sampler ddim`` and the same ``--timestep_respacing`` (same noise stream,
same label embedding, and denoised alone, in a batch of one, as they are),
and the last frame likewise for ``seed_b`` and ``user_b``.
"""

import contextlib
import io
import math
import os

import numpy as np
import torch
from torch import nn

from ..runtime import logger
from ..core import script_util
from ..runtime.dist_util import pick_device
from ..runtime.errors import UserError
from ..runtime.files import atomic_write_bytes, check_writable_target
from ..runtime.images import image_grid, save_png, to_pil, to_uint8_images
from ..data.labels import class_name, default_label_map, people, resolve_user_ids
from ..sampling import sample_from_checkpoint as sampling
from ..sampling.sample_from_checkpoint import clip_mode_of, load_decoder, load_sampling_model
from ..core.sample_loop import SAMPLING_PRECISIONS, DenoisedClipper, sample_generator
from ..core.samplers import SAMPLERS, Denoiser, SamplingPlan, ddim_respacing

DEFAULT_RESPACING = "ddim25"


def interpolate_defaults():
    """The script's flags; the model flags only matter for bare ``.pt`` files."""
    return {
        **script_util.model_and_diffusion_defaults(),
        "model_path": "",
        "output_dir": "",
        "use_ema": True,
        "seed_a": 0,
        "seed_b": 1,
        "user_a": "",
        "user_b": "",
        "steps": 16,
        "timestep_respacing": DEFAULT_RESPACING,
        "batch_size": 16,
        "clip_denoised": "auto",
        "clip_range": 3.0,
        "dynamic_threshold_percentile": 0.995,
        "device": "auto",
        "precision": "fp32",
        "vae_path": "",
        "gif_ms": 120,
    }


# Flags that mean here what they mean to the sampling scripts (the model flags among them).
_AS_IN_SAMPLING = (*script_util.model_and_diffusion_defaults(), "model_path", "use_ema", "clip_denoised",
                   "clip_range", "dynamic_threshold_percentile", "device", "precision", "vae_path")
FLAG_HELP = {
    **{flag: sampling.FLAG_HELP[flag] for flag in _AS_IN_SAMPLING},
    "output_dir": "folder for frame_NNN.png, strip.png and interpolation.gif",
    "seed_a": "seed of the first frame (the noise of sample 0 of this --seed)",
    "seed_b": "seed of the last frame",
    "user_a": "conditional models: the person of the first frame, a name or the number in it ('' = the first "
              "person)",
    "user_b": "conditional models: the person of the last frame ('' = --user_a)",
    "steps": "number of frames, both endpoints included (>= 2)",
    "timestep_respacing": "DDIM steps, as the sampling scripts take it (ddim25 becomes 25 when the "
                          "checkpoint's diffusion steps are no multiple of 25)",
    "batch_size": "frames denoised together (the two endpoints are always denoised alone)",
    "gif_ms": "milliseconds per GIF frame",
}
FLAG_CHOICES = {flag: sampling.FLAG_CHOICES[flag] for flag in ("clip_denoised", "precision")}


def slerp(a, b, t, parallel_dot=0.9995):
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1).

    ``a``, ``b``: tensors of one shape (any), treated as flat vectors; ``t``: a
    float. Returns a tensor of that shape and dtype: the endpoints exactly,
    unit vectors stay unit vectors, and for vectors of different norms the
    norm moves smoothly between theirs. Nearly parallel (or antiparallel)
    vectors, whose angle is too small for a stable ``sin``, fall back to the
    straight line.
    """
    t = float(t)
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone()
    work = torch.float32 if a.device.type == "mps" else torch.float64  # MPS has no float64
    a64, b64 = a.to(work), b.to(work)
    cos = torch.sum(a64 * b64) / (a64.norm() * b64.norm()).clamp_min(1e-30)
    if abs(float(cos)) > parallel_dot:
        return ((1.0 - t) * a64 + t * b64).to(a.dtype)
    theta = math.acos(max(-1.0, min(1.0, float(cos))))
    wa = math.sin((1.0 - t) * theta) / math.sin(theta)
    wb = math.sin(t * theta) / math.sin(theta)
    return (wa * a64 + wb * b64).to(a.dtype)


def interpolation_weights(steps):
    """``steps`` floats from exactly 0.0 to exactly 1.0, evenly spaced."""
    return [i / (steps - 1) for i in range(steps)]


def interpolated_noise(seed_a, seed_b, weights, shape, device):
    """(K, C, H, W) starting noises along the slerp between sample 0 of
    ``seed_a`` and of ``seed_b`` (the sampling scripts' noise streams),
    K = len(weights)."""
    a = torch.randn(tuple(shape), generator=sample_generator(seed_a, 0, device), device=device)
    b = torch.randn(tuple(shape), generator=sample_generator(seed_b, 0, device), device=device)
    return torch.stack([slerp(a, b, w) for w in weights])


def mixed_embeddings(table, index_a, index_b, weights):
    """(K, D) rows ``(1 - w) E[a] + w E[b]`` of the (classes, D) embedding
    ``table``; rows at w = 0 and w = 1 are exactly ``E[a]`` and ``E[b]``."""
    ea, eb = table[index_a].float(), table[index_b].float()
    rows = [ea if w == 0.0 else eb if w == 1.0 else (1.0 - w) * ea + w * eb for w in weights]
    return torch.stack(rows).to(table.dtype)


@contextlib.contextmanager
def label_embedding_rows(model, rows):
    """Within the block, ``model(x, t, y=arange(K))`` sees class embedding
    ``rows[k]`` (K, D) for label k; the model's own table comes back after."""
    own = model.label_emb
    model.label_emb = nn.Embedding.from_pretrained(rows.detach().to(own.weight.device), freeze=True)
    try:
        yield
    finally:
        model.label_emb = own


def frame_batches(count, batch_size):
    """Index ranges to denoise together: each endpoint alone (as the sampling
    scripts draw a single sample), the frames between in ``batch_size`` chunks."""
    inner = [range(s, min(s + batch_size, count - 1)) for s in range(1, count - 1, batch_size)]
    return [range(0, 1), *inner, range(count - 1, count)]


def denoise_frames(model, diffusion, noise, rows, clipper, decode_fn, precision, source="the checkpoint"):
    """Frames (K, H, W, C) uint8 from starting noises (K, C, H', W') with DDIM
    (eta 0) over the respaced ``diffusion``; ``rows`` (K, D) class embeddings,
    or None for unconditional models. Raises UserError (naming ``source``) on
    NaN or Inf."""
    device = noise.device
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                if precision == "bf16" else contextlib.nullcontext())
    x = noise
    with contextlib.nullcontext() if rows is None else label_embedding_rows(model, rows):
        kwargs = {} if rows is None else {"y": torch.arange(len(noise), device=device)}
        denoiser = Denoiser(model=model, model_kwargs=kwargs, denoised_fn=clipper)
        # eta 0 draws no noise: the plan needs no generators.
        plan = SamplingPlan(diffusion=diffusion, steps=diffusion.num_timesteps, generators=[], eta=0.0)
        with autocast:
            x = SAMPLERS["ddim"](denoiser, x, plan)
    x = x.float()
    if decode_fn is not None and bool(torch.isfinite(x).all()):
        with torch.no_grad():
            x = decode_fn(x)
    if not bool(torch.isfinite(x).all()):
        raise UserError(f"interpolation frames hold NaN or Inf: look at the weights of {source}; nothing was written")
    return to_uint8_images(x)


def effective_respacing(respacing, num_timesteps):
    """``--timestep_respacing`` for a process of ``num_timesteps`` steps: the
    default ``ddim25`` needs a multiple of 25 steps, so otherwise it becomes
    25 (at most ``num_timesteps``) steps by :func:`ddim_respacing`."""
    text = str(respacing).strip()
    return ddim_respacing(25, num_timesteps) if text == DEFAULT_RESPACING else text


def resolve_user(token, label_map, flag):
    """The class index ``--user_a``/``--user_b`` names (labels' rule)."""
    try:
        return resolve_user_ids([token], label_map)[0]
    except UserError as err:
        raise UserError(f"--{flag}: {err}") from None


def check_interpolate_config(config):
    """Settings refused before anything is loaded."""
    if not config["model_path"]:
        raise UserError("model_path is required: a checkpoint file or a run folder")
    if not config["output_dir"]:
        raise UserError("output_dir is required: the folder for the frames, strip.png and interpolation.gif")
    check_writable_target(config["output_dir"], "output_dir")
    if int(config["steps"]) < 2:
        raise UserError(f"steps must be >= 2 (the frames, both endpoints included), got {config['steps']}")
    if int(config["batch_size"]) < 1:
        raise UserError(f"batch_size must be >= 1, got {config['batch_size']}")
    if int(config["gif_ms"]) < 1:
        raise UserError(f"gif_ms must be >= 1 (milliseconds per GIF frame), got {config['gif_ms']}")
    if config["precision"] not in SAMPLING_PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(SAMPLING_PRECISIONS)}, got {config['precision']!r}")


def choose_users(config, meta):
    """``(index_a, index_b, label_map)`` for a class-conditional model, or
    ``(None, None, None)`` for an unconditional one. ``user_a`` defaults to
    the first person, ``user_b`` to ``user_a``."""
    if not meta["model"].get("class_cond"):
        for flag in ("user_a", "user_b"):
            if str(config[flag]).strip():
                raise UserError(f"{flag} given, but this model is unconditional: give only the seeds")
        return None, None, None
    label_map = (meta.get("data") or {}).get("label_map") or default_label_map(meta["model"]["num_classes"])
    token_a = str(config["user_a"]).strip() or class_name(min(int(k) for k in people(label_map)), label_map)
    token_b = str(config["user_b"]).strip() or token_a
    return resolve_user(token_a, label_map, "user_a"), resolve_user(token_b, label_map, "user_b"), label_map


def save_interpolation(output_dir, frames, gif_ms):
    """Write ``frame_000.png``..., ``strip.png`` (one row) and
    ``interpolation.gif`` (looping); frames (K, H, W, C) uint8."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {"frames": []}
    for i, frame in enumerate(frames):
        paths["frames"].append(os.path.join(output_dir, f"frame_{i:03d}.png"))
        save_png(paths["frames"][-1], frame)
    paths["strip"] = os.path.join(output_dir, "strip.png")
    save_png(paths["strip"], image_grid(frames, columns=len(frames)))
    pictures = [to_pil(frame) for frame in frames]
    buf = io.BytesIO()
    pictures[0].save(buf, format="GIF", save_all=True, append_images=pictures[1:], duration=int(gif_ms), loop=0)
    paths["gif"] = atomic_write_bytes(os.path.join(output_dir, "interpolation.gif"), buf.getvalue())
    return paths


def run_interpolation(config):
    """Interpolate as configured and write the files; returns their paths."""
    check_interpolate_config(config)
    device = pick_device(config["device"])
    model, diffusion_config, meta, path = load_sampling_model(config, device)
    index_a, index_b, label_map = choose_users(config, meta)
    respacing = effective_respacing(config["timestep_respacing"], diffusion_config["steps"])
    diffusion, _, _ = sampling.build_sampling_diffusion({"timestep_respacing": respacing}, "ddim", meta,
                                                         diffusion_config)
    clipper = DenoisedClipper(clip_mode_of(config, meta), config["clip_range"], config["dynamic_threshold_percentile"])
    decode_fn = load_decoder(meta, config, device)
    shape = (meta["model"].get("in_channels", 3), meta["model"]["image_size"], meta["model"]["image_size"])
    weights = interpolation_weights(int(config["steps"]))
    noise = interpolated_noise(config["seed_a"], config["seed_b"], weights, shape, device)
    rows = None
    if index_a is not None:
        rows = mixed_embeddings(model.label_emb.weight.detach(), index_a, index_b, weights)
        logger.log(f"from {class_name(index_a, label_map)} to {class_name(index_b, label_map)}")
    logger.log(f"{len(weights)} frames from seed {config['seed_a']} to seed {config['seed_b']}, "
               f"DDIM over timestep_respacing {respacing!r} ({diffusion.num_timesteps} steps)")
    frames = []
    for batch in frame_batches(len(weights), int(config["batch_size"])):
        sel = slice(batch.start, batch.stop)
        frames.append(denoise_frames(model, diffusion, noise[sel], None if rows is None else rows[sel],
                                     clipper, decode_fn, config["precision"], path))
    frames = np.concatenate(frames)
    paths = save_interpolation(config["output_dir"], frames, config["gif_ms"])
    logger.log(f"wrote {len(frames)} frames, {paths['strip']} and {paths['gif']}")
    return paths
