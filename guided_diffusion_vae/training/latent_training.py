"""Diffusion in a VAE's latent space: where the VAE meets the training loop.

The diffusion core never learns it runs on latents: the data arrive encoded
and scaled (from a latent cache, or encoded whole batches on the device), the
network is built for the latent shape, and samples are unscaled and decoded on
the way out. ``image_size`` stays in pixels everywhere a user writes it.
"""

import os


from ..runtime import dist_util, logger
from ..core import script_util
from ..runtime.errors import UserError
from .train_util import training_defaults
from .diffusion_training import TrainingData, data_range_meta
from ..data.labels import normalize_label_map
from ..latent.vae_wrapper import DTYPES as VAE_DTYPES
from ..latent.vae_wrapper import (
    INPUT_RANGES, LATENT_SCALE_WORDS, latent_shape_of, load_vae, parse_latent_scale, vae_from_description,
)
from ..data.image_datasets import image_batch_stream
from ..latent.latent_datasets import check_cache_matches, load_latent_data


def latent_train_defaults():
    """Flags of ``scripts/image_train_vae.py``: guided-diffusion's model,
    diffusion and training flags plus where the latents come from."""
    return {
        **script_util.model_and_diffusion_defaults(),
        **training_defaults(),
        "latent_cache": "",
        "vae_path": "",
        "latent_scale": "stored",
        "sample_posterior": False,
        "input_range": "-1,1",
        "vae_batch_size": 64,
        "vae_dtype": "auto",
        "measure_scale_batches": 20,
    }


# Where latent training reads a flag differently from pixel training, it is described again here.
FLAG_HELP = {
    "image_size": "side of the square training images in pixels; the network is built for the VAE's latent size",
    "data_dir": "images to encode batch by batch with --vae_path while training (instead of --latent_cache)",
    "latent_cache": "a latent cache written by scripts/encode_latents.py (the faster way to train)",
    "vae_path": "the VAE (a diffusers AutoencoderKL folder): encodes --data_dir, decodes previews; with a cache, "
                "where the VAE has moved ('' = the path the cache names)",
    "latent_scale": "with --data_dir, the factor that brings latents to unit std: a number, stored (the VAE "
                    "folder's latent_stats.json) or measured (1/std over --measure_scale_batches batches); a cache "
                    "brings its own, which a number must match",
    "sample_posterior": "with --data_dir, encode to a draw from the VAE's posterior instead of its mean",
    "input_range": "the pixel range the VAE was trained on",
    "vae_batch_size": "with --data_dir, images per VAE forward pass",
    "vae_dtype": "number format the VAE computes in (auto: bfloat16 on a GPU, else float32)",
    "measure_scale_batches": "batches read to measure --latent_scale measured",
}
FLAG_CHOICES = {"latent_scale": LATENT_SCALE_WORDS, "input_range": INPUT_RANGES,
                "vae_dtype": ("auto", *VAE_DTYPES)}


def create_latent_model_and_diffusion(*, vae_description, image_size, **flags):
    """``create_model_and_diffusion`` for latents: ``image_size`` in pixels, the
    network built for ``image_size / factor`` with the VAE's latent channels.
    ``attention_resolutions`` are read at the latent resolution."""
    channels, size, _ = latent_shape_of(vae_description, image_size)
    flags = {**flags, "image_size": size, "in_channels": channels}
    return script_util.create_model_and_diffusion(**flags)


def create_latent_classifier(*, vae_description, image_size, num_classes, **classifier_flags):
    """``create_classifier`` for noisy latents: built for ``image_size / factor``
    with the VAE's latent channels; ``classifier_attention_resolutions`` are
    read at the latent resolution."""
    return script_util.create_classifier(**latent_classifier_kwargs(vae_description, image_size, num_classes,
                                                                     classifier_flags))


def latent_classifier_kwargs(vae_description, image_size, num_classes, classifier_flags):
    """The ``create_classifier`` arguments of a latent classifier (what its checkpoint stores)."""
    channels, size, _ = latent_shape_of(vae_description, image_size)
    return {"image_size": size, "in_channels": channels, "num_classes": num_classes, **classifier_flags}


def _checked_in_channels(config, latent_channels):
    default = script_util.model_and_diffusion_defaults()["in_channels"]
    if config["in_channels"] not in (default, latent_channels):
        raise UserError(
            f"in_channels {config['in_channels']} does not match the VAE's {latent_channels} latent "
            f"channels (it is taken from the VAE; leave it unset)"
        )


def _measure_scale(vae, stream, num_batches):
    def images():
        for _ in range(num_batches):
            yield next(stream)[0]


    scale = vae.measure_latent_scale(images())
    # Every rank measured its own shard; all must scale by the same factor.
    scale = dist_util.broadcast_object(scale)
    stream.load_state_dict({"consumed": 0, "seed": stream.sampler.seed})  # measuring read no training batch
    logger.log(f"measured latent scale 1/std = {scale:.6g} over {num_batches} batches of rank 0")
    return scale


def latent_training_data(config):
    """Scaled latents from ``latent_cache``, or images from ``data_dir``
    encoded batch by batch on the device by the VAE in ``vae_path``."""

    device = dist_util.dev()
    if config["latent_cache"]:
        return _cached_latents(config, device)
    if not (config["data_dir"] and config["vae_path"]):
        raise UserError("give --latent_cache CACHE_DIR, or --data_dir IMAGES with --vae_path VAE_DIR")

    scale = parse_latent_scale(config["latent_scale"])
    vae = load_vae(
        config["vae_path"], device=device, dtype=config["vae_dtype"], input_range=config["input_range"],
        sample_posterior=config["sample_posterior"], max_batch=config["vae_batch_size"],
        latent_scale=scale,
    )
    sample_shape = vae.latent_shape(config["image_size"])
    _checked_in_channels(config, vae.latent_channels)
    stream, dataset = image_batch_stream(
        data_dir=config["data_dir"], batch_size=config["batch_size"], image_size=config["image_size"],
        channels=vae.in_channels, class_cond=config["class_cond"], random_flip=config["random_flip"],
        seed=config["seed"], num_workers=config["num_workers"], label_source=config["label_source"],
        labels_csv=config["labels_csv"], db_range=config["db_range"], stored_range=vae.db_range,
        stored_in=f"the VAE {config['vae_path']}",
    )
    if vae.latent_scale is None:
        vae.set_latent_scale(_measure_scale(vae, stream, config["measure_scale_batches"]))
    return TrainingData(
        batches=stream,
        label_map=normalize_label_map(dataset.label_map, config["data_dir"]),
        image_size=config["image_size"],
        image_channels=vae.in_channels,
        sample_shape=sample_shape,
        batch_transform=vae.encode_batch,
        decode_fn=vae.decode_batch,
        data_meta={"data_dir": os.path.abspath(config["data_dir"]), "num_images": len(dataset),
                   "source": "images" if dataset.db_range is None else "arrays", **data_range_meta(dataset.db_range)},
        vae_meta=vae.describe(),
    )


def _cached_latents(config, device):
    stream = load_latent_data(
        cache_dir=config["latent_cache"], batch_size=config["batch_size"], seed=config["seed"],
        class_cond=config["class_cond"], device=device,
    )
    cache = stream.cache
    meta = cache.meta
    scale = parse_latent_scale(config["latent_scale"])
    check_cache_matches(
        meta, config={"image_size": config["image_size"], "input_range": config["input_range"],
                      "latent_scale": scale if isinstance(scale, float) else None, "db_range": config["db_range"]},
        cache_dir=config["latent_cache"],
    )
    vae_meta = {**cache.vae_description, "latent_scale": cache.latent_scale}
    decode_fn = None
    vae_path = config["vae_path"] or vae_meta["path"]
    if os.path.isdir(vae_path):
        vae = vae_from_description(vae_meta, path=vae_path, device=device, dtype=config["vae_dtype"])
        check_cache_matches(meta, vae.describe(), cache_dir=config["latent_cache"])
        decode_fn = vae.decode_batch
        vae_meta = vae.describe()
    elif config["sample_interval"]:
        raise UserError(
            f"preview samples need the cache's VAE, expected at {vae_meta['path']}: pass --vae_path DIR "
            f"or --sample_interval 0"
        )
    _checked_in_channels(config, cache.shape[0])
    return TrainingData(
        batches=stream,
        label_map=normalize_label_map(cache.label_map, config["latent_cache"]),
        image_size=int(meta["image_size"]),
        image_channels=int(vae_meta.get("in_channels", 3)),
        sample_shape=tuple(cache.shape),
        decode_fn=decode_fn,
        data_meta={"latent_cache": os.path.abspath(config["latent_cache"]), "num_latents": len(cache),
                   "source": "latent_cache", **data_range_meta(meta.get("db_range"))},
        vae_meta=vae_meta,
    )
