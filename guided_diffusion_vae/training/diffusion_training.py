"""From a resolved configuration to a trained, checkpointed model.

Pixel and latent training share everything here; they differ only in the
:class:`TrainingData` they build (where batches come from, what shape the
diffusion sees, and how samples become images again).
"""

import dataclasses
import os
from typing import Callable, Optional

import torch

from ..runtime import dist_util, logger
from ..core import script_util
from ..runtime.config import write_resolved_config
from ..runtime.errors import UserError
from .augment import Augmenter, augment_dim, check_augment_config
from .monitor_flags import check_monitor_flags
from ..data.labels import normalize_label_map, null_class_index, people, with_null_class
from ..core.resample import create_named_schedule_sampler
from ..data.image_datasets import image_batch_stream
from ..runtime.images import image_grid, save_png
from ..core.sample_loop import DenoisedClipper, generate_samples
from ..core.samplers import ddim_respacing
from .train_util import (
    TrainLoop,
    check_training_numbers,
    resolve_precision,
    starting_in,
    training_defaults,
)


@dataclasses.dataclass
class TrainingData:
    """What the training loop needs from a data source.

    batches: endless iterator of (tensor, {"y": labels}) for this rank.
    label_map: {"0": "user_01", ...} or None for unlabelled data.
    image_size, image_channels: the pixel images (what people look at).
    sample_shape: (C, H, W) the diffusion model works on.
    batch_transform: runs on the device before the loss (e.g. VAE encoding).
    decode_fn: turns diffusion samples into images in [-1, 1] (None for pixels).
    data_meta, vae_meta: stored in checkpoints.
    """

    batches: object
    label_map: Optional[dict]
    image_size: int
    image_channels: int
    sample_shape: tuple
    batch_transform: Optional[Callable] = None
    decode_fn: Optional[Callable] = None
    data_meta: dict = dataclasses.field(default_factory=dict)
    vae_meta: Optional[dict] = None


def pixel_training_data(config):
    """Batches of images from ``data_dir`` (pixel-space diffusion)."""

    if not config["data_dir"]:
        raise UserError("data_dir is required: a folder of images (class sub-folders for class_cond)")
    channels = config["in_channels"]
    stream, dataset = image_batch_stream(
        data_dir=config["data_dir"],
        batch_size=config["batch_size"],
        image_size=config["image_size"],
        channels=channels,
        class_cond=config["class_cond"],
        random_flip=config["random_flip"],
        seed=config["seed"],
        num_workers=config["num_workers"],
        label_source=config["label_source"],
        labels_csv=config["labels_csv"],
        db_range=config["db_range"],
    )
    return TrainingData(
        batches=stream,
        label_map=normalize_label_map(dataset.label_map, config["data_dir"]),
        image_size=config["image_size"],
        image_channels=channels,
        sample_shape=(channels, config["image_size"], config["image_size"]),
        data_meta={"data_dir": os.path.abspath(config["data_dir"]), "num_images": len(dataset),
                   **data_range_meta(dataset.db_range)},
    )


def data_range_meta(db_range):
    """The checkpoint's record of how array data were mapped to [-1, 1]
    (``data.db_range``, which sampling's ``--save_npy`` maps back with);
    nothing for images."""
    return {} if db_range is None else {"db_range": [float(v) for v in db_range]}


def model_flags(config, data):
    """The ``create_model_and_diffusion`` flags for this data: the network is
    built at the resolution and channel count the diffusion sees, and the
    class count comes from the data's label map."""
    flags = {k: config[k] for k in script_util.model_and_diffusion_defaults()}
    channels, height, width = data.sample_shape
    if height != width:
        raise UserError(f"only square inputs are supported, got {height}x{width}")
    flags["image_size"] = height
    flags["in_channels"] = channels
    flags["augment_dim"] = augment_dim(config.get("augment", "none"))
    if flags["class_cond"]:
        if not data.label_map:
            raise UserError(
                "class_cond is set but the data has no classes: put each class's images in "
                "its own sub-folder of data_dir (e.g. user_01/), or set class_cond false"
            )
        flags["num_classes"] = len(data.label_map)
    elif float(config.get("class_dropout_prob", 0.0)) > 0:
        raise UserError("class_dropout_prob needs a class-conditional model: set class_cond true")
    return flags


PREVIEW_STEPS = 25


def scripts_clip_mode(data):
    """The sampling scripts' ``--clip_denoised auto`` for this data: clamp
    pixels to [-1, 1], leave latents alone."""
    return "none" if data.vae_meta else "pixel"


def draw_images(*, model, diffusion, data, labels, num_samples, precision, seed=0, on_nonfinite=None):
    """uint8 NHWC images of ``model`` drawn as the sampling scripts draw them
    (DDIM on the respaced ``diffusion``, their clipping default, decoded by
    ``data.decode_fn``); the previews and the training-time evaluation use it.
    Returns the images and the labels of the samples kept."""
    images, kept_labels, _ = generate_samples(
        model=model, diffusion=diffusion, sample_shape=data.sample_shape,
        num_samples=num_samples, batch_size=min(num_samples, 256), labels=labels, sampler="ddim",
        clipper=DenoisedClipper(scripts_clip_mode(data)), decode_fn=data.decode_fn, seed=seed,
        device=dist_util.dev(), precision=precision, progress=False, on_nonfinite=on_nonfinite,
    )
    return images, kept_labels


def preview_sampler(*, diffusion_config, data, num_samples, precision):
    """A ``sample_fn(model, step)`` that draws a grid with the same function
    and the same defaults as the sampling scripts (EMA of the largest rate,
    seed 0, clipping ``auto``), with DDIM over 25 steps, and writes it to the
    log directory. It logs the ``image_sample_vae.py`` flags that redraw it
    from the checkpoint of that step."""
    respacing = ddim_respacing(PREVIEW_STEPS, diffusion_config["steps"])
    preview_diffusion = script_util.create_gaussian_diffusion(**{**diffusion_config, "timestep_respacing": respacing})
    labels, selection = None, f"--num_samples {num_samples}"
    persons = people(data.label_map)
    if persons:
        labels = [i % len(persons) for i in range(num_samples)]
        selection = (f"--user_ids {','.join(persons[str(i)] for i in labels)} --num_images_per_user 1"
                     if num_samples <= len(persons) else "")
    again = (f"--sampler ddim --timestep_respacing {respacing} --precision {precision} --seed 0 "
             f"--clip_denoised {scripts_clip_mode(data)} {selection}") if selection else None

    def sample_fn(model, step):
        if not dist_util.is_main():
            return
        images, _ = draw_images(model=model, diffusion=preview_diffusion, data=data, labels=labels,
                                num_samples=num_samples, precision=precision)
        grid = image_grid(images)
        path = os.path.join(logger.get_dir() or ".", "samples", f"preview_{step:06d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_png(path, grid)
        logger.log_image("samples", grid, step=step)
        logger.log(f"preview samples at step {step}: {path}"
                   + (f" (the same images: image_sample_vae.py --model_path {logger.get_dir()} {again})"
                      if again else ""))

    return sample_fn


def run_training(config, build_data, build_monitor=None):
    """Train with ``config`` (resolved flags) on the data ``build_data(config)``
    returns; returns the path of the last model checkpoint.

    ``build_monitor(config=, data=, diffusion_config=, precision=)`` makes
    the ``eval_fn`` of ``--eval_interval`` (``evaluation.monitor.build_monitor``,
    passed in by the programs: the evaluation sits above this module)."""
    # Bad numbers and an unusable log folder are refused before any work.
    check_training_numbers(config)
    check_augment_config({**training_defaults(), **config})
    check_monitor_flags(config)
    if config.get("eval_interval") and build_monitor is None:
        raise UserError("--eval_interval is not available in this program (it cannot evaluate during training)")
    script_util.check_model_geometry(config)  # the rest once the data give the input side
    log_dir, named = logger.choose_dir(config.get("log_dir"))
    main = dist_util.is_main()
    # Data, model and resume are checked before the first step; if one fails,
    # the log folder keeps nothing of this start.
    with starting_in(log_dir, named, given=bool(config.get("log_dir"))):
        dist_util.setup_dist()
        logger.configure(dir=log_dir, format_strs="stdout,log,csv")
        dist_util.set_threads(config["threads"], logger.log)
        loop, sample_fn = _prepare_training(config, build_data, build_monitor)
        # Only an accepted start (its data, model and resume checked) replaces
        # the folder's config.yaml and opens TensorBoard: a refused resume
        # once left its rejected settings there and an event file.
        if main:
            write_resolved_config(config, log_dir)
        if config.get("tensorboard", True):
            logger.add_outputs("tensorboard")
    path = loop.run_loop()
    if sample_fn is not None and loop.step % config["sample_interval"]:
        sample_fn(loop.ema_model_for_sampling(), loop.step)
    # The final weights are evaluated too, unless a stop signal ended the run
    # early: then exiting soon matters more, and resuming evaluates later.
    finished = bool(config["lr_anneal_steps"]) and loop.step >= config["lr_anneal_steps"]
    if loop.eval_fn is not None and loop.step % loop.eval_interval and finished:
        loop.evaluate()
    logger.log(f"done: {path}")
    return path


def _prepare_training(config, build_data, build_monitor=None):
    """The data, model and :class:`TrainLoop` of ``config`` (resumed if asked),
    and the preview sampler (or None)."""
    torch.manual_seed(config["seed"])

    data = build_data(config)
    null_label = None
    if float(config.get("class_dropout_prob", 0.0)) > 0 and data.label_map:
        data.label_map = with_null_class(data.label_map)
        null_label = null_class_index(data.label_map)
    flags = model_flags(config, data)
    model, diffusion = script_util.create_model_and_diffusion(**flags)
    model_config, diffusion_config = script_util.split_flags(flags)
    train_keys = set(training_defaults())
    metadata = {
        "model": model_config,
        "diffusion": diffusion_config,
        "data": {
            "image_size": data.image_size,
            "image_channels": data.image_channels,
            "label_map": data.label_map,
            **data.data_meta,
        },
        "vae": data.vae_meta,
        "train": {k: v for k, v in config.items() if k in train_keys},
    }
    n_params = sum(p.numel() for p in model.parameters())
    logger.log(
        f"model: {n_params / 1e6:.2f}M parameters, input {tuple(data.sample_shape)}, "
        f"{len(data.label_map) if data.label_map else 0} classes; {dist_util.world_size()} process(es)"
    )
    device = dist_util.dev()
    precision = resolve_precision(config["precision"], device)
    sample_fn = None
    if config["sample_interval"]:
        sample_fn = preview_sampler(
            diffusion_config=diffusion_config, data=data,
            num_samples=config["num_preview_samples"], precision=precision,
        )
    eval_fn = None
    if config.get("eval_interval"):
        eval_fn = build_monitor(config=config, data=data, diffusion_config=diffusion_config, precision=precision)
    loop = TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data.batches,
        batch_size=config["batch_size"],
        microbatch=config["microbatch"],
        lr=config["lr"],
        ema_rate=config["ema_rate"],
        ema_warmup=config["ema_warmup"],
        log_interval=config["log_interval"],
        save_interval=config["save_interval"],
        resume_checkpoint=config["resume_checkpoint"],
        use_fp16=config["use_fp16"],
        fp16_scale_growth=config["fp16_scale_growth"],
        schedule_sampler=create_named_schedule_sampler(config["schedule_sampler"], diffusion),
        weight_decay=config["weight_decay"],
        lr_anneal_steps=config["lr_anneal_steps"],
        checkpoint_dir=logger.get_dir(),
        metadata=metadata,
        batch_transform=data.batch_transform,
        class_dropout_prob=config.get("class_dropout_prob", 0.0),
        null_label=null_label,
        precision=config["precision"],
        grad_clip=config["grad_clip"],
        max_nonfinite_steps=config["max_nonfinite_steps"],
        sample_interval=config["sample_interval"],
        sample_fn=sample_fn,
        compile=config["compile"],
        cuda_graph=config["cuda_graph"],
        seed=config["seed"],
        keep_checkpoints=config["keep_checkpoints"],
        augment=Augmenter.from_config(config),
        eval_interval=config.get("eval_interval", 0),
        eval_fn=eval_fn,
    )
    return loop, sample_fn


def pixel_train_defaults():
    return {**script_util.model_and_diffusion_defaults(), **training_defaults()}
