"""Sampling from a checkpoint: what ``image_sample.py`` and
``image_sample_vae.py`` run.

A checkpoint of ours describes its model, diffusion, classes and VAE, so
``--model_path`` is all it needs; the original's bare ``.pt`` files are built
from the model flags instead, as the original's script does.

Which weights: a file given as ``--model_path`` is sampled exactly as named;
a run folder means its newest step, from the EMA with the largest rate
(``--use_ema False``: the raw weights), and the log says which file it took.

Which classes: ``--num_images_per_user N`` draws N samples for each selected
person (``--user_ids``, default all); ``--num_images_per_user 0`` draws
``--num_samples`` samples with classes drawn at random from them (the
original's ``image_sample.py``). Under ``mpiexec -n N`` every rank draws a
contiguous share of the samples and rank 0 writes them all; the images are
the same as from one process.
"""

import dataclasses
import math

import numpy as np
import torch

from ..training import checkpoint as ckpt
from ..runtime import dist_util, logger
from ..core import script_util
from ..core.nn import to_fast_layout
from ..runtime.dist_util import pick_device
from ..runtime.errors import UserError, shown
from ..data.array_datasets import parse_db_range, to_db
from ..runtime.files import check_outside, check_writable_target, undone_on_failure
from .guidance import (
    autoguided_model,
    check_classifier_fits,
    check_guide_fits,
    check_guidance_scale,
    classifier_cond_fn,
    classifier_free_model,
    load_classifier,
    parse_guidance_interval,
)
from ..data.labels import default_label_map, normalize_label_map, null_class_index, people, resolve_user_ids
from ..runtime.images import to_uint8_images
from .sample_io import check_sample_folder, save_samples, save_samples_whole
from ..core.sample_loop import (CLIP_MODES, SAMPLING_PRECISIONS, DenoisedClipper, NonFiniteSamples, generate_samples,
                                 resolve_sampling_precision)
from ..core.samplers import CORE_SAMPLERS, SAMPLER_NAMES, TIMESTEP_SPACINGS, build_scheduler, resolve_sampler, sampler_steps
from ..latent.vae_wrapper import latent_shape_of, vae_from_description

# The original's boolean --clip_denoised, as our clipping modes.
CLIP_ALIASES = {"true": "pixel", "false": "none"}


def sample_defaults():
    """Sampling flags; the model flags only matter for bare ``.pt`` files."""
    return {
        **script_util.model_and_diffusion_defaults(),
        "model_path": "",
        "output_dir": "",
        "use_ema": True,
        "num_samples": 16,
        "user_ids": [],
        "num_images_per_user": 0,
        "batch_size": 16,
        "sampler": "",
        "use_ddim": False,
        "eta": 0.0,
        "clip_denoised": "auto",
        "clip_range": 3.0,
        "dynamic_threshold_percentile": 0.995,
        "seed": 0,
        "device": "auto",
        "precision": "auto",
        "vae_path": "",
        "classifier_path": "",
        "classifier_scale": 1.0,
        "guidance_scale": 1.0,
        "guidance_interval": "",
        "guide_model_path": "",
        "keep_going": False,
        "save_npy": False,
        "timestep_spacing": "auto",
        **dist_util.threads_defaults(),
    }


FLAG_HELP = {
    # A checkpoint of ours describes its model; the original's bare .pt files need the model flags.
    **{flag: f"{text} (read for a bare .pt state dict only)"
       for flag, text in script_util.FLAG_HELP.items() if flag in script_util.model_and_diffusion_defaults()},
    "timestep_respacing": "sampling steps: ddpm/ddim walk the model's steps respaced as the original does ('' = "
                          "all, N, N1,N2,... or ddimN); the diffusers samplers take one count (20 or ddim20)",
    "model_path": "a checkpoint file (sampled exactly as named) or a run folder (its newest step; the EMA of "
                  "the largest rate unless --use_ema False)",
    "output_dir": "folder for PERSON/generated_NNN.png, grid.png and the .npz ('' = the logger's folder: "
                  "$OPENAI_LOGDIR, else a new temporary one)",
    "use_ema": "for a run folder: its EMA weights (True) or its raw weights (False)",
    "num_samples": "samples drawn with random classes when --num_images_per_user is 0",
    "user_ids": "people to sample: class names, or numbers that end a name (5 and 05 select user_05); "
                "none = everyone",
    "num_images_per_user": "samples per selected person (0: --num_samples with random classes, as the original)",
    "batch_size": "samples denoised together (the images do not depend on it)",
    "sampler": "how to denoise ('' = ddpm, or ddim with --use_ddim True); the diffusers samplers are built "
               "from the model's own noise schedule",
    "use_ddim": "the original's switch: True means --sampler ddim",
    "eta": "ddim's noise: 0 is deterministic, 1 as random as ddpm",
    "clip_denoised": "clipping of each predicted x_0: auto is pixel ([-1, 1]) for pixel models and none for "
                     "latents; fixed clamps to +-clip_range, dynamic to a percentile of |x_0|; True and False "
                     "mean pixel and none",
    "clip_range": "bound of fixed clipping and least bound of dynamic clipping (latents have unit std)",
    "dynamic_threshold_percentile": "percentile of |x_0| per sample that dynamic clipping clamps to",
    "seed": "seed of the starting noise: sample i of a seed is the same whatever the batch size or process count",
    "device": dist_util.DEVICE_HELP,
    "precision": "arithmetic of the denoising steps: auto is bf16 autocast on a GPU (29% faster than fp32 "
                 "there, the same quality in the quickstart's A/B) and float32 on the CPU",
    "vae_path": "the VAE of a latent checkpoint, if it has moved from where the checkpoint says",
    "classifier_path": "a noisy-latent classifier (scripts/classifier_train.py) that guides the samples to "
                       "their person",
    "classifier_scale": "strength of classifier guidance",
    "guidance_scale": "classifier-free guidance (1: none); needs a model trained with --class_dropout_prob",
    "guide_model_path": "autoguidance (Karras et al. 2024) instead of classifier-free guidance: a weaker "
                        "checkpoint of the same data (an early step of the run, or a smaller network), file or "
                        "run folder; the samples are pushed --guidance_scale times away from its predictions",
    "guidance_interval": "LOW,HIGH: apply classifier-free guidance or autoguidance only at timesteps in this "
                         "range (original numbering, e.g. 100,600; '' = every step), as Kynkaanniemi et al. 2024",
    "keep_going": "when some samples come out NaN/Inf, write the finite ones and count the others instead of "
                  "stopping",
    "timestep_spacing": "where the steps of dpmpp_2m, unipc, euler, euler_a and heun lie: trailing starts at the "
                        "noisiest step t=T-1, leading about T-T/N as ddimN does; auto is leading for latent "
                        "epsilon-prediction models (a start at t=T-1 turned their samples to noise) and trailing "
                        "otherwise",
    "save_npy": "also write each sample as a float32 .npy in dB beside its PNG (models trained on .npy/.npz "
                "data: mapped back with the db_range their checkpoint stores)",
}
FLAG_CHOICES = {"timestep_spacing": ("auto", *TIMESTEP_SPACINGS), "sampler": SAMPLER_NAMES, "clip_denoised": ("auto", *CLIP_MODES), "precision": SAMPLING_PRECISIONS}


def latent_sample_defaults():
    """``image_sample_vae.py``: images per person by default."""
    # Batches of 256 keep a GPU busy where the original's 16 leaves it mostly
    # idle (latent models are small); the images do not depend on the batch.
    return {**sample_defaults(), "num_images_per_user": 5, "batch_size": 256}


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
    label_map = normalize_label_map((data or {}).get("label_map"), source)
    check_class_count(meta["model"], label_map, source)
    check_sample_geometry(meta["model"], data or {}, meta.get("vae"), source)
    if (data or {}).get("db_range") is not None:
        try:
            parse_db_range(data["db_range"])
        except UserError as err:
            raise UserError(f"{source}: metadata 'data.db_range': {err}") from None


# The largest side (pixels, or latents for a VAE model) a checkpoint may ask
# us to sample: metadata is not trusted to pick the cost of a run. 512 is the
# original's largest pixel model; a 1024 side once ran > 120 s and 3.2 GB on CPU.
MAX_SAMPLE_SIDE = 512


def check_class_count(model_meta, label_map, source):
    """A class-conditional model's label map names exactly its classes (a
    longer one once sampled labels past the embedding: an IndexError)."""
    if not model_meta.get("class_cond") or label_map is None:
        return
    count = model_meta.get("num_classes")
    if isinstance(count, bool) or not isinstance(count, int) or len(label_map) != count:
        raise UserError(f"{source}: metadata 'data.label_map' names {len(label_map)} classes, but the model has "
                        f"num_classes={count!r}")


def check_sample_geometry(model_meta, data_meta, vae_meta, source):
    """The side the model samples at is within :data:`MAX_SAMPLE_SIDE` and is
    what its training data made of ``data.image_size`` (the pixel side;
    through the VAE's downsampling factor for a latent model)."""
    side = model_meta.get("image_size")
    if isinstance(side, bool) or not isinstance(side, int) or not 1 <= side <= MAX_SAMPLE_SIDE:
        raise UserError(f"{source}: metadata 'model.image_size' must be an integer 1..{MAX_SAMPLE_SIDE}, "
                        f"got {side!r}")
    pixels = data_meta.get("image_size")
    if pixels is None:
        return
    if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 1:
        raise UserError(f"{source}: metadata 'data.image_size' must be a positive integer, got {pixels!r}")
    if vae_meta:
        try:
            channels, expected, _ = latent_shape_of(vae_meta, pixels)
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{source}: metadata 'vae' does not describe a VAE ({err})") from None
        made_of = f"{pixels}-pixel images through a VAE that downsamples by {vae_meta['downsample_factor']}"
        if model_meta.get("in_channels") != channels:
            raise UserError(f"{source}: metadata 'model.in_channels' is {model_meta.get('in_channels')!r}, but "
                            f"the VAE makes {channels}-channel latents")
    else:
        expected, made_of = pixels, f"{pixels}-pixel images"
    if side != expected:
        raise UserError(f"{source}: metadata 'model.image_size' is {side}, but the model was trained on {made_of} "
                        f"(side {expected})")


def load_sampling_model(config, device):
    """``(model, diffusion_config, meta, path)`` for ``config["model_path"]``.

    A checkpoint trained with ``use_fp16`` is converted to fp16 as it was
    trained, whatever ``--use_fp16`` says."""
    path = ckpt.resolve_weights_file(config["model_path"], config["use_ema"])
    state, meta = ckpt.load_weights(path)
    if meta is None:
        logger.log(f"{path} is a bare state dict: building the model from the flags")
        flags = {k: config[k] for k in script_util.model_and_diffusion_defaults()}
        model_config, diffusion_config = script_util.split_flags(flags)
        diffusion_config["timestep_respacing"] = ""
        model = script_util.create_model(**model_config)
        meta = {"model": model_config, "diffusion": diffusion_config, "data": {}, "vae": None}
        ckpt.load_state_strict(model, state, path)
        model = _ready(model, meta, device)
    else:
        check_sampling_metadata(meta, path)
        model = _built_from(meta, state, path, device)
        diffusion_config = dict(meta["diffusion"])
    logger.log(f"sampling from {path} (step {step_of(meta, path)})")
    return model, diffusion_config, meta, path


def step_of(meta, path):
    """The training step of a weights file: its metadata's, else its name's."""
    return meta.get("step", ckpt.parse_step(path))


def _built_from(meta, state, path, device):
    """The network a checkpoint of ours describes (its metadata checked by
    :func:`check_sampling_metadata`), with ``state`` loaded, ready to sample."""
    model = ckpt.build_from_metadata(script_util.create_model, meta["model"], state, path, "model")
    return _ready(model, meta, device)


def _ready(model, meta, device):
    """``model`` in fp16 if it was trained so, on ``device``, in eval mode,
    in the faster memory layout there (``nn.to_fast_layout``)."""
    if meta["model"].get("use_fp16"):
        model.convert_to_fp16()
    return to_fast_layout(model.to(device).eval(), device)


def load_decoder(meta, config, device):
    """The VAE decoder for a latent checkpoint (None for pixel models)."""
    vae_meta = meta.get("vae")
    if not vae_meta:
        if config["vae_path"]:
            raise UserError("vae_path given, but this checkpoint is a pixel-space model (it has no VAE)")
        return None
    vae = vae_from_description(vae_meta, path=config["vae_path"] or None, device=device)
    return vae.decode_batch


def load_classifier_guidance(config, meta, device):
    """``(cond_fn, classifier label map)`` of ``--classifier_path`` (None,
    None without one), after checking it fits the model."""
    if not config["classifier_path"]:
        return None, None
    path = config["classifier_path"]
    classifier, cmeta = load_classifier(path, device)
    check_classifier_fits(cmeta, meta, path)
    logger.log(f"classifier guidance from {path}, scale {config['classifier_scale']}")
    return classifier_cond_fn(classifier, config["classifier_scale"]), (cmeta.get("data") or {}).get("label_map")


def _drop_labels(model):
    """An unconditional model called with the classifier's labels ignores them."""

    def call(x, t, y=None, **kwargs):
        return model(x, t, **kwargs)

    return call


def choose_labels(config, label_map):
    """Class index per sample: ``num_images_per_user`` for each selected
    person, or ``num_samples`` drawn at random (seeded) from them."""
    selectable = people(label_map)
    if config["user_ids"]:
        classes = resolve_user_ids(config["user_ids"], label_map)
    else:
        classes = sorted(int(k) for k in selectable)
    if int(config["num_images_per_user"]) > 0:
        return np.repeat(np.array(classes, dtype=np.int64), int(config["num_images_per_user"]))
    rng = np.random.default_rng(int(config["seed"]))
    return rng.choice(np.array(classes, dtype=np.int64), size=int(config["num_samples"]))


def clip_mode_of(config, meta):
    """``--clip_denoised`` as a clipping mode: ``auto`` is the original's
    [-1, 1] clip for pixel models and none for latents; ``True``/``False``
    are the original's spellings of ``pixel``/``none``."""
    mode = str(config["clip_denoised"]).strip()
    mode = CLIP_ALIASES.get(mode.lower(), mode)
    if mode == "auto":
        mode = "none" if meta.get("vae") else "pixel"
    return mode


def _nonfinite_causes(config, path):
    causes = [f"the weights of {path} (NaN or diverged)"]
    if config["classifier_path"]:
        causes.append(f"classifier_scale={config['classifier_scale']} (too large?)")
    if float(config["guidance_scale"]) != 1.0:
        causes.append(f"guidance_scale={config['guidance_scale']} (too large?)")
    if config["guide_model_path"]:
        causes.append(f"the guide model {config['guide_model_path']}")
    return "look at " + " or ".join(causes)


def check_sampling_config(config):
    """Settings refused before anything is loaded."""
    if not config["model_path"]:
        raise UserError("model_path is required: a checkpoint file or a run folder")
    for key in ("classifier_scale", "guidance_scale", "eta"):
        if not math.isfinite(float(config[key])):
            raise UserError(f"{key} must be a finite number, got {config[key]}")
    for key in ("batch_size", "num_samples"):
        if int(config[key]) < 1:
            raise UserError(f"{key} must be >= 1, got {config[key]}")
    if int(config["num_images_per_user"]) < 0:
        raise UserError(f"num_images_per_user must be >= 0 (0: --num_samples with random classes), "
                        f"got {config['num_images_per_user']}")
    resolve_sampler(config["sampler"], config["use_ddim"])
    parse_guidance_interval(config["guidance_interval"])
    if config["guidance_interval"] and float(config["guidance_scale"]) == 1.0:
        raise UserError("--guidance_interval needs --guidance_scale other than 1")
    if config["guide_model_path"] and float(config["guidance_scale"]) == 1.0:
        raise UserError("--guide_model_path needs --guidance_scale other than 1 (1 means no guidance)")
    resolve_timestep_spacing(config["timestep_spacing"], {})
    if config["precision"] not in SAMPLING_PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(SAMPLING_PRECISIONS)}, got {shown(config['precision'])}")
    if config["output_dir"]:
        check_writable_target(config["output_dir"], "output_dir")
        check_sample_folder(config["output_dir"])


def _blind_start_risk(meta):
    """True for a latent epsilon-prediction model: its first x_0 estimate is
    its error divided by sqrt(alpha_bar) of the first step, ~5e-5 at the
    cosine schedule's last step. Pixels survive that by the [-1, 1] clip;
    latents did not (docs/QUALITY.md)."""
    return bool(meta.get("vae")) and not meta["diffusion"].get("predict_xstart")


def resolve_timestep_spacing(spacing, meta):
    """``--timestep_spacing``: ``auto`` is ``leading`` where a start at t=T-1
    is a risk (:func:`_blind_start_risk`), else ``trailing``."""
    if spacing not in ("auto", *TIMESTEP_SPACINGS):
        raise UserError(f"timestep_spacing must be one of auto, {', '.join(TIMESTEP_SPACINGS)}, got {shown(spacing)}")
    if spacing == "auto":
        return "leading" if _blind_start_risk(meta) else "trailing"
    return spacing


def _warn_if_the_first_step_is_blind(meta, diffusion, sampler, steps, spacing):
    """Warn when a risky model (:func:`_blind_start_risk`) starts where
    sqrt(alpha_bar) < 1e-3: the original's ``--timestep_respacing N``, or a
    diffusers sampler spaced ``trailing``/``linspace``."""
    if not _blind_start_risk(meta):
        return
    if sampler in CORE_SAMPLERS:
        alpha_bar = float(diffusion.alphas_cumprod[-1])
    else:
        first = int(round(float(build_scheduler(sampler, diffusion, steps, timestep_spacing=spacing).timesteps[0])))
        alpha_bar = float(diffusion.alphas_cumprod[first])
    root = alpha_bar ** 0.5
    if root < 1e-3:
        logger.warn(f"the first sampling step has sqrt(alpha_bar) = {root:.1e}: this epsilon model's first x_0 "
                    f"estimate is its error times {1 / root:.0f}, and latent samples have come out as noise from "
                    "such a start; prefer --timestep_respacing ddimN for ddim/ddpm, --timestep_spacing leading "
                    "for the others (docs/QUALITY.md)")


def run_sampling(config):
    """Draw samples as configured and write them (rank 0); returns the paths
    written (None on other ranks)."""
    check_sampling_config(config)
    sampler = resolve_sampler(config["sampler"], config["use_ddim"])
    dist_util.setup_dist()
    dist_util.set_threads(config["threads"], logger.log)
    if config["output_dir"]:
        return _draw_and_save(config, sampler, into_log_dir=False)
    # The original writes into the logger's folder ($OPENAI_LOGDIR, else a
    # new temporary one); a run that fails leaves nothing there, not even the
    # folder or its log.
    log_dir, named = logger.choose_dir(None)
    check_writable_target(log_dir, named)
    with undone_on_failure(log_dir if dist_util.is_main() else None, before_undo=logger.close):
        logger.configure(dir=log_dir)
        return _draw_and_save({**config, "output_dir": log_dir}, sampler, into_log_dir=True)


def _check_data_fits(config, meta, path):
    """The training data's ``db_range`` (None without one), after refusing an
    output folder inside the training data and ``--save_npy`` without dB."""
    check_outside(config["output_dir"], "output_dir", (meta.get("data") or {}).get("data_dir"),
                  f"data_dir (the training data of {path})")
    db_range = (meta.get("data") or {}).get("db_range")
    if config["save_npy"] and db_range is None:
        raise UserError(f"save_npy writes samples in dB, but {path} was not trained on .npy/.npz data "
                        "(its metadata has no data.db_range)")
    return db_range


def build_sampling_diffusion(config, sampler, meta, diffusion_config):
    """``(diffusion, steps, spacing)``: where ``--timestep_respacing`` and
    ``--timestep_spacing`` are resolved for ``sampler``. ddpm/ddim respace
    the diffusion itself (steps None); the diffusers samplers take a step
    count and the full diffusion. Warns when the first step would see almost
    no signal (:func:`_warn_if_the_first_step_is_blind`)."""
    diffusion_config = dict(diffusion_config)
    if sampler in CORE_SAMPLERS:
        if config["timestep_respacing"]:
            diffusion_config["timestep_respacing"] = config["timestep_respacing"]
        steps = None
    else:
        steps = sampler_steps(sampler, config["timestep_respacing"], diffusion_config["steps"])
        diffusion_config["timestep_respacing"] = ""
    diffusion = script_util.create_gaussian_diffusion(**diffusion_config)
    spacing = resolve_timestep_spacing(config.get("timestep_spacing", "auto"), meta)
    _warn_if_the_first_step_is_blind(meta, diffusion, sampler, steps, spacing)
    return diffusion, steps, spacing


def load_guide_model(config, meta, device):
    """``(guide, {"path", "step"})``: the autoguidance model of
    ``--guide_model_path``, after checking that it predicts what the sampled
    model (``meta``) predicts."""
    path = ckpt.resolve_weights_file(config["guide_model_path"], use_ema=True)
    state, guide_meta = ckpt.load_weights(path)
    if guide_meta is None:
        raise UserError(f"guide model {path} is a bare state dict: autoguidance needs a checkpoint of ours "
                        "(it must be checked against the model)")
    check_sampling_metadata(guide_meta, path)
    check_guide_fits(guide_meta, meta, path)
    guide = _built_from(guide_meta, state, path, device)
    step = step_of(guide_meta, path)
    logger.log(f"autoguidance from {path} (step {step})")
    # Classifier guidance may pass labels to an unconditional pair of models.
    return (guide if guide_meta["model"].get("class_cond") else _drop_labels(guide)), {"path": path, "step": step}


def _guided_model(config, meta, model, path, device):
    """``(model, label_map, class_cond, cond_fn, guidance)`` with the guidance
    asked for: classifier guidance (which makes an unconditional model
    class-specific) and classifier-free guidance or autoguidance wrapped
    around the model; ``guidance`` describes it for the sampling record."""
    label_map = (meta.get("data") or {}).get("label_map")
    class_cond = bool(meta["model"].get("class_cond"))
    if class_cond and not label_map:
        label_map = default_label_map(meta["model"]["num_classes"])
    autoguided = bool(config["guide_model_path"])
    if not autoguided:
        check_guidance_scale(config["guidance_scale"], label_map if class_cond else None, path)
    cond_fn, classifier_labels = load_classifier_guidance(config, meta, device)
    guidance = {"kind": "none"}
    if cond_fn is not None:
        guidance["classifier"] = {"path": config["classifier_path"], "scale": float(config["classifier_scale"])}
    if cond_fn is not None and not class_cond:
        # Guidance alone makes an unconditional model class-specific.
        label_map, class_cond, model = classifier_labels, True, _drop_labels(model)
    if float(config["guidance_scale"]) != 1.0:
        interval = parse_guidance_interval(config["guidance_interval"], meta["diffusion"]["steps"])
        kind = "autoguidance" if autoguided else "classifier-free guidance"
        logger.log(f"{kind}, scale {config['guidance_scale']}"
                   + (f", at timesteps {interval[0]}..{interval[1]}" if interval else ""))
        out_channels = meta["model"].get("in_channels", 3)
        guidance.update(kind=kind, scale=float(config["guidance_scale"]), interval=list(interval) if interval else None)
        if autoguided:
            guide, guidance["guide"] = load_guide_model(config, meta, device)
            model = autoguided_model(model, guide, scale=config["guidance_scale"], out_channels=out_channels,
                                     interval=interval)
        else:
            model = classifier_free_model(model, null_label=null_class_index(label_map),
                                          scale=config["guidance_scale"], out_channels=out_channels,
                                          interval=interval)
    return model, label_map, class_cond, cond_fn, guidance


def _labels_to_draw(config, class_cond, label_map):
    """Class index per sample (None for an unconditional model, which refuses
    ``--user_ids``)."""
    if class_cond:
        return choose_labels(config, label_map)
    if config["user_ids"]:
        raise UserError("user_ids given, but this model is unconditional: use --num_samples")
    return None


def _rank_share(num_samples):
    """``(first, last)``: the contiguous share of the samples this rank draws."""
    share = math.ceil(num_samples / dist_util.world_size())
    first = min(dist_util.rank() * share, num_samples)
    return first, min(first + share, num_samples)


def _draw_share(config, pipeline, first, last):
    """Every rank's ``(images, labels, clipped fraction, dropped indices,
    error)``, gathered on all ranks after each drew its share; non-finite
    samples are an error on every rank unless ``--keep_going``."""
    dropped = []
    images, labels_out, clipped, error = None, None, 0.0, None
    try:
        if last > first:
            images, labels_out, clipped = pipeline.draw(
                first, last, batch_size=int(config["batch_size"]), seed=config["seed"],
                on_nonfinite=dropped.extend if config["keep_going"] else None,
                progress=dist_util.is_main(), as_float=bool(config["save_npy"]))
    except NonFiniteSamples as err:
        error = f"{err}: {_nonfinite_causes(config, pipeline.path)}; nothing was written " \
                "(--keep_going True writes the finite samples and counts the others)"
    except torch.cuda.OutOfMemoryError:
        error = (f"batch_size {config['batch_size']}: out of GPU memory while sampling; nothing was written "
                 "(a smaller --batch_size gives the same images)")
    parts = dist_util.all_gather_objects((images, labels_out, clipped, dropped, error))
    errors = [p[4] for p in parts if p[4]]
    if errors:
        raise UserError(errors[0])
    return parts


def _merge_shares(parts, config, path, num_samples, conditional, clip_mode):
    """``(images, labels)`` of the finite samples of every rank, in sample
    order, after logging what was dropped and how much was clipped."""
    kept = [p for p in parts if p[0] is not None and len(p[0])]
    dropped = [i for p in parts for i in p[3]]
    if dropped:
        logger.warn(f"{len(dropped)} of {num_samples} samples held NaN or Inf and were not written "
                    f"(indices {dropped[:10]}{' ...' if len(dropped) > 10 else ''}); {_nonfinite_causes(config, path)}")
    if not kept:
        raise UserError(f"every sample held NaN or Inf: {_nonfinite_causes(config, path)}")
    images = np.concatenate([p[0] for p in kept])
    labels_out = np.concatenate([p[1] for p in kept]) if conditional else None
    if clip_mode != "none":
        fraction = sum(p[2] * len(p[0]) for p in kept) / len(images)
        logger.log(f"clip_denoised={clip_mode}: {100 * fraction:.3f}% of predicted x0 values were clipped")
    return images, labels_out


def _write_samples(config, images, labels_out, label_map, db_range, into_log_dir, record):
    """Write the samples (and their dB values with ``--save_npy``) and the
    sampling ``record``; returns the paths written."""
    db_values = None
    if config["save_npy"]:  # float samples: dB from them, PNGs from their 8-bit rounding
        db_values = to_db(images.mean(axis=-1), parse_db_range(db_range))
        images = to_uint8_images(torch.from_numpy(images).permute(0, 3, 1, 2))
    # A folder of our own is replaced whole; the logger's folder (no
    # --output_dir) also holds the log, so there samples are written beside it.
    write = save_samples if into_log_dir else save_samples_whole
    paths = write(config["output_dir"], images, labels_out, label_map, db_values=db_values, record=record)
    logger.log(f"wrote {len(images)} samples to {config['output_dir']} (grid: {paths['grid']})")
    return paths


@dataclasses.dataclass
class SamplingPipeline:
    """A checkpoint made ready to draw from, every choice resolved once: the
    network with its guidance, the diffusion respaced for the sampler, the
    classes to draw, clipping and the VAE decoder. :meth:`draw` makes images;
    :meth:`record` says how they were drawn."""

    path: str
    meta: dict
    model: object
    diffusion: object
    sampler: str
    steps: object  # a step count for diffusers' samplers; None: the respaced core diffusion's own
    spacing: str
    label_map: dict | None  # None for an unconditional model
    labels: object  # class index per sample, or None (unconditional)
    num_samples: int
    cond_fn: object
    guidance: dict
    clipper: DenoisedClipper
    decode_fn: object
    device: object
    options: dict  # eta, precision, respacing as asked for

    @property
    def sample_shape(self):
        channels = self.meta["model"].get("in_channels", 3)
        return (channels, self.meta["model"]["image_size"], self.meta["model"]["image_size"])

    @property
    def total_steps(self):
        return self.steps or self.diffusion.num_timesteps

    def describe(self):
        spaced = "" if self.sampler in CORE_SAMPLERS else f" spaced {self.spacing}"
        return f"sampler {self.sampler}, {self.total_steps} steps{spaced}, {self.num_samples} samples"

    def draw(self, first, last, **kwargs):
        """``generate_samples`` of samples ``first..last-1``: (images, labels, clipped fraction)."""
        return generate_samples(
            model=self.model, diffusion=self.diffusion, sample_shape=self.sample_shape, num_samples=last - first,
            first_index=first, labels=None if self.labels is None else self.labels[first:last],
            sampler=self.sampler, steps=self.steps, eta=self.options["eta"], clipper=self.clipper,
            cond_fn=self.cond_fn, decode_fn=self.decode_fn, device=self.device,
            precision=self.options["precision"], timestep_spacing=self.spacing, **kwargs)

    def record(self, seed, count):
        """What ``sampling.json`` keeps of ``count`` samples drawn with ``seed``."""
        return {"model": self.path, "step": step_of(self.meta, self.path), "sampler": self.sampler,
                "steps": self.total_steps, "timestep_respacing": self.options["timestep_respacing"],
                "timestep_spacing": None if self.sampler in CORE_SAMPLERS else self.spacing,
                "eta": float(self.options["eta"]), "guidance": self.guidance, "clip_denoised": self.clipper.mode,
                "precision": resolve_sampling_precision(self.options["precision"], self.device),
                "seed": int(seed), "samples": int(count)}


def build_pipeline(config, sampler, device):
    """The :class:`SamplingPipeline` of ``config["model_path"]`` and the sampling flags."""
    model, diffusion_config, meta, path = load_sampling_model(config, device)
    diffusion, steps, spacing = build_sampling_diffusion(config, sampler, meta, diffusion_config)
    model, label_map, class_cond, cond_fn, guidance = _guided_model(config, meta, model, path, device)
    labels = _labels_to_draw(config, class_cond, label_map)
    clipper = DenoisedClipper(clip_mode_of(config, meta), config["clip_range"], config["dynamic_threshold_percentile"])
    return SamplingPipeline(
        path=path, meta=meta, model=model, diffusion=diffusion, sampler=sampler, steps=steps, spacing=spacing,
        label_map=label_map if class_cond else None, labels=labels,
        num_samples=len(labels) if labels is not None else int(config["num_samples"]), cond_fn=cond_fn,
        guidance=guidance, clipper=clipper, decode_fn=load_decoder(meta, config, device), device=device,
        options={k: config[k] for k in ("eta", "precision", "timestep_respacing")})


def _draw_and_save(config, sampler, into_log_dir):
    """:func:`run_sampling` once the output folder is settled (``into_log_dir``:
    the logger's folder, which also holds the log)."""
    device = pick_device(config["device"]) if not dist_util.is_distributed() else dist_util.dev()
    dist_util.autotune_convolutions(device)
    pipeline = build_pipeline(config, sampler, device)
    db_range = _check_data_fits(config, pipeline.meta, pipeline.path)
    # Every rank draws a contiguous share; sample i keeps its own noise stream.
    first, last = _rank_share(pipeline.num_samples)
    logger.log(pipeline.describe()
               + (f" ({first}..{last - 1} on rank {dist_util.rank()})" if dist_util.world_size() > 1 else ""))
    parts = _draw_share(config, pipeline, first, last)
    if not dist_util.is_main():
        return None
    images, labels_out = _merge_shares(parts, config, pipeline.path, pipeline.num_samples,
                                       pipeline.labels is not None, pipeline.clipper.mode)
    return _write_samples(config, images, labels_out, pipeline.label_map, db_range, into_log_dir,
                          pipeline.record(config["seed"], len(images)))
