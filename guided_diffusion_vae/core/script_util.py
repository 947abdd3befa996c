"""Flag defaults and factories that turn flat flag dictionaries into models.

The flag names and default values are guided-diffusion's, so its command lines
and configuration files keep working. Two things the original hard-codes are
parameters here: ``in_channels`` (3 for pixels, the VAE's latent channels for
latents) and ``num_classes`` (taken from the data's label map).
"""

import argparse
import inspect

from . import gaussian_diffusion as gd
from ..runtime.errors import UserError, check_number, shown
from ..runtime.config import str2bool
from ..runtime.flag_help import help_lines
from .respace import SpacedDiffusion, space_timesteps
from .unet import POOLS, EncoderUNetModel, SuperResModel, UNetModel

NUM_CLASSES = 1000  # ImageNet's, the original's only choice; a flag here.

# channel_mult="" picks one of these by the network's input resolution. The
# pixel sizes are the original's; 8, 16 and 32 serve VAE latents.
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 3, 4),
    16: (1, 2, 3),
    8: (1, 2),
}


def diffusion_defaults():
    """Flags that shape the Gaussian diffusion process."""
    return {
        "learn_sigma": False,
        "diffusion_steps": 1000,
        "noise_schedule": "linear",
        "timestep_respacing": "",
        "use_kl": False,
        "predict_xstart": False,
        "rescale_timesteps": False,
        "rescale_learned_sigmas": False,
    }


def classifier_defaults():
    """Flags of the noisy-image classifier used for guidance."""
    return {
        "image_size": 64,
        "classifier_use_fp16": False,
        "classifier_width": 128,
        "classifier_depth": 2,
        "classifier_attention_resolutions": "32,16,8",
        "classifier_use_scale_shift_norm": True,
        "classifier_resblock_updown": True,
        "classifier_pool": "attention",
    }


def model_and_diffusion_defaults():
    """Flags of the denoising UNet together with those of the diffusion."""
    unet_flags = {
        "image_size": 64,
        "num_channels": 128,
        "num_res_blocks": 2,
        "num_heads": 4,
        "num_heads_upsample": -1,
        "num_head_channels": -1,
        "attention_resolutions": "16,8",
        "channel_mult": "",
        "dropout": 0.0,
        "class_cond": False,
        "use_checkpoint": False,
        "use_scale_shift_norm": True,
        "resblock_updown": False,
        "use_fp16": False,
        "use_new_attention_order": False,
        "in_channels": 3,
        "num_classes": NUM_CLASSES,
    }
    return {**unet_flags, **diffusion_defaults()}


def classifier_and_diffusion_defaults():
    return {**classifier_defaults(), **diffusion_defaults()}


# The flags of the functions above (and the two sizes of
# sr_model_and_diffusion_defaults below), for --help.
FLAG_HELP = {
    # diffusion
    "learn_sigma": "the network also predicts the variance of each reverse step (twice the output channels)",
    "diffusion_steps": "number of noising steps T of the forward process",
    "noise_schedule": "how the noise variance grows over the steps",
    "timestep_respacing": "run on a subset of the steps: '' = all of them; N or N1,N2,... = that many evenly "
                          "spaced steps per equal section; ddimN = N steps at a fixed stride",
    "use_kl": "train on the variational bound (KL terms) instead of the noise MSE",
    "predict_xstart": "the network predicts the clean x_0 instead of the noise",
    "rescale_timesteps": "give the network t * 1000 / T instead of t, whatever the number of steps",
    "rescale_learned_sigmas": "with learn_sigma, weight the variance term of the loss by T / 1000 (rescaled MSE)",
    # the UNet
    "image_size": "side of the square images in pixels: the network's input size for pixel models",
    "num_channels": "channel width of the UNet's first level",
    "num_res_blocks": "residual blocks per resolution level",
    "num_heads": "attention heads per attention layer (when num_head_channels is -1)",
    "num_heads_upsample": "attention heads in the upsampling half (-1: num_heads)",
    "num_head_channels": "channels per attention head, so the head count follows the width (-1: use num_heads)",
    "attention_resolutions": "comma-separated resolutions at which self-attention layers sit (read at the "
                             "network's input resolution)",
    "channel_mult": "comma-separated width multiplier of each resolution level, e.g. 1,2,4 ('' = the default "
                    "for the input size)",
    "dropout": "dropout rate inside the residual blocks",
    "class_cond": "condition the model on class labels (one class per person / image sub-folder)",
    "use_checkpoint": "recompute activations in the backward pass instead of storing them (less memory, slower)",
    "use_scale_shift_norm": "the timestep embedding scales and shifts the normalised activations instead of "
                            "being added to them",
    "resblock_updown": "change resolution inside residual blocks instead of with plain up/down layers",
    "use_fp16": "the original's fp16 scheme: fp16 weights, an fp32 master copy and loss scaling",
    "use_new_attention_order": "split the attention input into q, k, v before the heads rather than after "
                               "(the original's two layouts)",
    "in_channels": "channels of the network's input (training takes them from the data: the images', or "
                   "the VAE's latent channels)",
    "num_classes": "classes of a class-conditional network (training takes the count from the data)",
    # the noisy classifier (classifier guidance)
    "classifier_use_fp16": "the classifier in the original's fp16 scheme",
    "classifier_width": "channel width of the classifier's first level",
    "classifier_depth": "residual blocks per resolution level of the classifier",
    "classifier_attention_resolutions": "comma-separated resolutions of the classifier's attention layers",
    "classifier_use_scale_shift_norm": "the classifier's timestep embedding scales and shifts its activations",
    "classifier_resblock_updown": "the classifier downsamples inside residual blocks",
    "classifier_pool": "how the classifier turns its last feature map into class scores",
    # super-resolution
    "large_size": "output side of the super-resolution model in pixels",
    "small_size": "side of the low-resolution input it upsamples",
}
FLAG_CHOICES = {"noise_schedule": tuple(gd.BETA_SCHEDULES), "classifier_pool": POOLS}


def _pick(flags, fn):
    """The entries of ``flags`` that are keyword parameters of ``fn``."""
    names = inspect.signature(fn).parameters
    return {key: value for key, value in flags.items() if key in names}


def diffusion_kwargs(flags):
    """``create_gaussian_diffusion`` keyword arguments from a flag dict (the
    flags call the step count ``diffusion_steps``)."""
    kwargs = {"steps": flags["diffusion_steps"]}
    for key in diffusion_defaults():
        if key != "diffusion_steps":
            kwargs[key] = flags[key]
    if "sigma_small" in flags:
        kwargs["sigma_small"] = flags["sigma_small"]
    return kwargs


def _split_model_and_diffusion(flags, model_fn):
    model_flags = _pick(flags, model_fn)
    unknown = set(flags) - set(model_flags) - set(diffusion_defaults()) - {"sigma_small"}
    if unknown:
        raise TypeError(f"unexpected model/diffusion flags: {sorted(unknown)}")
    return model_flags, diffusion_kwargs(flags)


def create_model_and_diffusion(**flags):
    """Build ``(UNetModel, SpacedDiffusion)`` from the flags of
    :func:`model_and_diffusion_defaults` (all of them must be given)."""
    model_flags, diffusion_flags = _split_model_and_diffusion(flags, create_model)
    return create_model(**model_flags), create_gaussian_diffusion(**diffusion_flags)


def parse_channel_mult(channel_mult, image_size):
    """``"1,2,4"`` -> ``(1, 2, 4)``; ``""`` -> the default for ``image_size``."""
    if isinstance(channel_mult, (tuple, list)):
        return tuple(channel_mult)
    if channel_mult == "":
        if image_size not in DEFAULT_CHANNEL_MULT:
            sizes = ", ".join(str(s) for s in sorted(DEFAULT_CHANNEL_MULT))
            raise UserError(
                f"no default channel_mult for image_size {image_size} (defaults exist for "
                f"{sizes}); set channel_mult, e.g. channel_mult: \"1,2,2\""
            )
        return DEFAULT_CHANNEL_MULT[image_size]
    try:
        return tuple(float(part) if "." in part else int(part) for part in channel_mult.split(","))
    except ValueError:
        raise UserError(f"channel_mult {shown(channel_mult)} is not a comma-separated list of numbers")


def attention_downsample_rates(attention_resolutions, image_size, channel_mult, flag="attention_resolutions"):
    """Turn resolutions (``"16,8"``, read at the network's input resolution)
    into the downsampling rates at which the UNet places attention.

    Each resolution must be reached by the network: ``image_size / res`` must be
    a power of two no larger than the deepest downsampling ``2**(levels-1)``.
    """
    if isinstance(attention_resolutions, (tuple, list)):
        resolutions = [int(r) for r in attention_resolutions]
    else:
        text = str(attention_resolutions).strip()
        try:
            resolutions = [int(r) for r in text.split(",")] if text else []
        except ValueError:
            raise UserError(f"{flag} {shown(attention_resolutions)} is not a comma-separated list of integers")
    deepest = 2 ** (len(channel_mult) - 1)
    reachable = [image_size // 2**level for level in range(len(channel_mult))]
    rates = []
    for res in resolutions:
        rate = image_size // res if res > 0 else 0
        if res <= 0 or image_size % res or rate & (rate - 1) or rate > deepest:
            raise UserError(
                f"{flag} {attention_resolutions!r}: resolution {res} is not one the network "
                f"passes through for image_size {image_size} with {len(channel_mult)} levels "
                f"(it passes through {reachable})"
            )
        rates.append(rate)
    return tuple(rates)


# nn.normalization is a 32-group GroupNorm: every width it sees must be a
# multiple of this.
NORM_GROUPS = 32


def check_model_geometry(flags, image_size=None):
    """Refuse UNet flags (``create_model``'s names) that cannot build a
    network, naming the flag: counts below their minimum, a dropout outside
    [0, 1), a width GroupNorm cannot split into 32 groups, heads that do not
    divide an attention layer's width, an image side the levels cannot halve.
    With ``image_size`` (the network's input side) the default channel_mult
    and the attention resolutions are checked too; without it (a latent run
    before its data is opened) what does not depend on it. Training calls it
    before anything is written, ``create_model`` (and so checkpoint loading)
    before anything is built."""
    for flag, minimum in (("num_channels", 1), ("num_res_blocks", 0), ("num_heads", 1)):
        check_number(flag, flags[flag], minimum, integer=True)
    check_number("dropout", flags["dropout"], 0.0, note=" and below 1")
    if flags["dropout"] >= 1:
        raise UserError(f"dropout must be a finite number >= 0.0 and below 1, got {shown(flags['dropout'])}")
    for flag in ("num_head_channels", "num_heads_upsample"):
        if flags[flag] != -1:
            check_number(flag, flags[flag], 1, integer=True, note=" (or -1)")
    if image_size is None and flags["channel_mult"] in ("", None):
        return  # the default channel_mult depends on the input side
    mult = parse_channel_mult(flags["channel_mult"], image_size)
    widths = []
    for m in mult:
        width = int(flags["num_channels"] * m) if isinstance(m, (int, float)) and m > 0 else 0
        if width < 1:
            raise UserError(f"channel_mult {shown(flags['channel_mult'])}: every factor must give at least one "
                            f"channel, got {m} (num_channels {flags['num_channels']})")
        if width % NORM_GROUPS:
            flag = "num_channels" if m == 1 else "channel_mult"
            raise UserError(f"{flag} {shown(flags[flag])}: a level of num_channels {flags['num_channels']} x "
                            f"{m} = {width} channels; GroupNorm needs a multiple of {NORM_GROUPS}")
        widths.append(width)
    attended = {widths[-1]}  # the middle block always attends
    if image_size is not None:
        check_number("image_size", image_size, 1, integer=True)
        if image_size % 2 ** (len(mult) - 1):
            raise UserError(f"image_size {image_size} (the network's input side) cannot be halved "
                            f"{len(mult) - 1} times for {len(mult)} channel_mult levels")
        rates = attention_downsample_rates(flags["attention_resolutions"], image_size, mult)
        attended |= {widths[rate.bit_length() - 1] for rate in rates}
    _check_heads(flags, sorted(attended))


def _check_heads(flags, widths):
    """Each attention layer splits its width into heads: ``num_head_channels``
    wide, else ``num_heads`` of them (``num_heads_upsample`` on the way up)."""
    if flags["num_head_channels"] != -1:
        flags_used = ("num_head_channels",)
    else:
        flags_used = ("num_heads",) + (("num_heads_upsample",) if flags["num_heads_upsample"] != -1 else ())
    for flag in flags_used:
        for width in widths:
            if width % flags[flag]:
                raise UserError(f"{flag} {shown(flags[flag])} does not divide the {width} channels of an "
                                "attention layer")


# create_model flags handed to UNetModel under the same name.
_UNET_PASSTHROUGH = (
    "image_size", "in_channels", "num_res_blocks", "dropout", "use_checkpoint", "use_fp16",
    "num_heads", "num_head_channels", "num_heads_upsample", "use_scale_shift_norm",
    "resblock_updown", "use_new_attention_order", "augment_dim",
)


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    in_channels=3,
    num_classes=NUM_CLASSES,
    augment_dim=0,
):
    """A :class:`UNetModel` predicting ``in_channels`` values per pixel (twice
    that with ``learn_sigma``: the second half parameterises the variance)."""
    check_model_geometry(dict(locals()), image_size)
    mult = parse_channel_mult(channel_mult, image_size)
    if class_cond and (num_classes is None or int(num_classes) < 1):
        raise UserError(f"class_cond needs num_classes >= 1, got {shown(num_classes)}")
    settings = {k: v for k, v in locals().items() if k in _UNET_PASSTHROUGH}
    return UNetModel(
        **settings,
        model_channels=num_channels,
        out_channels=in_channels * (2 if learn_sigma else 1),
        attention_resolutions=attention_downsample_rates(attention_resolutions, image_size, mult),
        channel_mult=mult,
        num_classes=int(num_classes) if class_cond else None,
    )


def create_classifier_and_diffusion(**flags):
    """Build ``(EncoderUNetModel, SpacedDiffusion)`` from the flags of
    :func:`classifier_and_diffusion_defaults`."""
    classifier_flags, diffusion_flags = _split_model_and_diffusion(flags, create_classifier)
    return create_classifier(**classifier_flags), create_gaussian_diffusion(**diffusion_flags)


def create_classifier(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    in_channels=3,
    num_classes=NUM_CLASSES,
):
    """A noisy-input classifier (the UNet's encoder half with a pooling head)."""
    mult = parse_channel_mult("", image_size)
    rates = attention_downsample_rates(
        classifier_attention_resolutions, image_size, mult, flag="classifier_attention_resolutions"
    )
    # The classifier flags carry a "classifier_" prefix; the network's do not.
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=classifier_width,
        out_channels=int(num_classes),
        num_res_blocks=classifier_depth,
        attention_resolutions=rates,
        channel_mult=mult,
        use_fp16=classifier_use_fp16,
        num_head_channels=64,
        pool=classifier_pool,
        **{
            name: value
            for name, value in (
                ("use_scale_shift_norm", classifier_use_scale_shift_norm),
                ("resblock_updown", classifier_resblock_updown),
            )
        },
    )


def sr_model_and_diffusion_defaults():
    """Flags of the super-resolution model: the UNet's, with two image sizes."""
    flags = model_and_diffusion_defaults()
    flags["large_size"] = 256
    flags["small_size"] = 64
    model_params = inspect.signature(sr_create_model_and_diffusion).parameters
    return {key: value for key, value in flags.items() if key in model_params}


def sr_create_model_and_diffusion(
    large_size,
    small_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    in_channels=3,
    num_classes=NUM_CLASSES,
):
    flags = dict(locals())
    model = sr_create_model(**_pick(flags, sr_create_model))
    diffusion_flags = dict(flags, steps=diffusion_steps, timestep_respacing=timestep_respacing)
    diffusion = create_gaussian_diffusion(**_pick(diffusion_flags, create_gaussian_diffusion))
    return model, diffusion


def sr_create_model(
    large_size,
    small_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    resblock_updown,
    use_fp16,
    in_channels=3,
    num_classes=NUM_CLASSES,
):
    """A :class:`SuperResModel` that upsamples ``small_size`` inputs to ``large_size``."""
    del small_size  # the low-resolution input is upsampled inside the model
    sr_mult = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}
    if large_size not in sr_mult:
        raise UserError(f"no super-resolution channel_mult for large_size {large_size}")
    mult = sr_mult[large_size]
    settings = {k: v for k, v in locals().items() if k in _UNET_PASSTHROUGH}
    return SuperResModel(
        **settings,
        image_size=large_size,
        model_channels=num_channels,
        out_channels=in_channels * (2 if learn_sigma else 1),
        attention_resolutions=attention_downsample_rates(attention_resolutions, large_size, mult),
        channel_mult=mult,
        num_classes=int(num_classes) if class_cond else None,
    )


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
):
    """A :class:`SpacedDiffusion` configured by guided-diffusion's flags.

    ``timestep_respacing=""`` keeps every one of the ``steps`` timesteps.
    """
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    mean_type = gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON
    spacing = timestep_respacing or [steps]
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, spacing),
        betas=gd.get_named_beta_schedule(noise_schedule, steps),
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


def add_dict_to_argparser(parser, default_dict):
    """Add ``--key`` for every entry, typed after its default value and
    described by the ``FLAG_HELP`` beside its defaults (:mod:`flag_help`)."""
    lines = help_lines(default_dict)
    for key, default in default_dict.items():
        if default is None:
            value_type = str
        elif isinstance(default, bool):
            value_type = str2bool
        else:
            value_type = type(default)
        parser.add_argument(f"--{key}", default=default, type=value_type, help=lines[key])


def args_to_dict(args, keys):
    """``{key: args.key}`` for the given keys."""
    return {key: getattr(args, key) for key in keys}


def split_flags(flags):
    """(create_model kwargs, create_gaussian_diffusion kwargs) of resolved flags:
    the two dicts every checkpoint stores."""
    model_keys = inspect.signature(create_model).parameters
    model = {k: v for k, v in flags.items() if k in model_keys}
    return model, diffusion_kwargs(flags)
