"""Drawing samples: one function used by the sampling scripts and by the
training loop's previews.

Every sample owns a random stream seeded from ``(seed, sample index)``: its
starting noise and every step's noise come from it, so a sample does not
depend on the batch it was drawn in, and the same seed gives the same images
whatever the batch size.
"""

import contextlib
import weakref

import numpy as np
import torch

from ..runtime.cuda_graphs import GraphCache, graphs_usable
from ..runtime.errors import UserError
from ..runtime.images import to_uint8_images
from .nn import build_norm_kernels_ahead, weights_cast_for_autocast
from .samplers import SAMPLERS, Denoiser, SamplingPlan, per_sample_normal, resolve_sampler
from ..runtime.progress import progress as progress_bar

CLIP_MODES = ("none", "pixel", "fixed", "dynamic")
# The arithmetic of the denoising steps: plain float32, bf16 autocast, or
# auto: bf16 on a GPU that has it, else float32.
SAMPLING_PRECISIONS = ("auto", "fp32", "bf16")


def resolve_sampling_precision(precision, device):
    """``precision`` ("auto", "fp32" or "bf16") as run on ``device``. Auto is
    bf16 on CUDA, where DDIM-50 ran 29% faster than in float32 and the
    quickstart's A/B found the same quality (docs/BENCHMARKS.md); the CPU's
    bf16 is slow, so float32 there."""
    if precision not in SAMPLING_PRECISIONS:
        raise ValueError(f"precision must be one of {SAMPLING_PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def sample_generator(seed, index, device):
    """The random stream of sample ``index`` for ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed((int(seed) * 1_000_003 + int(index)) % (2**63 - 1))
    return gen


class DenoisedClipper:
    """The ``denoised_fn`` applied to each predicted ``x_0``.

    Modes: ``none``; ``pixel`` (clamp to [-1, 1], the original's
    ``clip_denoised=True``, right for pixels only); ``fixed`` (clamp to
    ``+-clip_range``, for unit-variance latents e.g. 3); ``dynamic`` (per
    sample, clamp to the ``percentile`` of ``|x_0|``, never tighter than
    ``clip_range``). Counts the values it changes, on the device.
    """

    def __init__(self, mode="none", clip_range=3.0, percentile=0.995):
        if mode not in CLIP_MODES:
            raise UserError(f"clip_denoised {mode!r} must be one of {', '.join(CLIP_MODES)}")
        if mode in ("fixed", "dynamic") and not clip_range > 0:
            raise UserError(f"clip_range must be positive, got {clip_range}")
        if not 0.0 < percentile <= 1.0:
            raise UserError(f"dynamic_threshold_percentile must lie in (0, 1], got {percentile}")
        self.mode, self.clip_range, self.percentile = mode, float(clip_range), float(percentile)
        self.clipped = None
        self.seen = 0

    def __call__(self, x0):
        if self.mode == "none":
            return x0
        if self.mode == "pixel":
            limit = torch.ones((), device=x0.device, dtype=x0.dtype)
        elif self.mode == "fixed":
            limit = torch.full((), self.clip_range, device=x0.device, dtype=x0.dtype)
        else:
            flat = x0.detach().abs().flatten(1).float()
            q = torch.quantile(flat, self.percentile, dim=1)
            limit = q.clamp(min=self.clip_range).to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        changed = (x0.abs() > limit).sum()
        self.clipped = changed if self.clipped is None else self.clipped + changed
        self.seen += x0.numel()
        return torch.maximum(torch.minimum(x0, limit), -limit)

    def fraction(self):
        """Share of predicted values clipped so far (synchronises once)."""
        if self.clipped is None or not self.seen:
            return 0.0
        return float(self.clipped.item()) / self.seen


class NonFiniteSamples(UserError):
    """Samples became NaN or Inf; nothing was written for them."""

    def __init__(self, indices, where):
        self.indices = list(indices)
        shown = ", ".join(str(i) for i in self.indices[:5]) + (", ..." if len(self.indices) > 5 else "")
        super().__init__(f"{len(self.indices)} sample(s) ({shown}) hold NaN or Inf in {where}")


# The calls whose kernels are built already, per model: a later call (the
# next share, a training preview) skips the recording forward pass.
_KERNELS_BUILT = weakref.WeakKeyDictionary()


def _build_norm_kernels(model, sample_shape, labels, n, device, precision, autocast):
    """The fused norms' kernels of one model call, built at once before the
    first (``nn.build_norm_kernels_ahead``; nothing where they do not run,
    or when an earlier call built them)."""
    call = (tuple(sample_shape), labels is not None, str(device), precision)
    try:
        built = _KERNELS_BUILT.setdefault(model, set())
    except TypeError:  # a model that cannot be weakly referenced: built on every call
        built = set()
    if call in built:
        return
    built.add(call)
    kwargs = {"y": labels[:n].to(device)} if labels is not None else {}

    def forward():
        with autocast:
            model(torch.zeros((n, *sample_shape), device=device), torch.zeros(n, dtype=torch.long, device=device),
                  **kwargs)
    build_norm_kernels_ahead(forward, device, backward=False)


def _finished_images(x, decode_fn, as_float, on_nonfinite, first):
    """The diffusion output ``x`` of samples ``first, first + 1, ...``
    decoded (``decode_fn``) and made images (uint8 NHWC, or float32 NHWC in
    [-1, 1] ``as_float``), without the samples that hold NaN or Inf; returns
    ``(images, kept mask)``. See :func:`generate_samples` for ``on_nonfinite``."""
    x = x.float()
    finite = torch.isfinite(x).flatten(1).all(dim=1)
    where = "the diffusion output"
    if decode_fn is not None:
        with torch.no_grad():
            x = decode_fn(torch.where(finite.view(-1, *[1] * (x.dim() - 1)), x, torch.zeros_like(x)))
        decoded_ok = torch.isfinite(x).flatten(1).all(dim=1)
        if bool(finite.all()) and not bool(decoded_ok.all()):
            where = "the decoded images"
        finite = finite & decoded_ok
    keep = finite.cpu().numpy()
    if not keep.all():
        bad = [first + int(i) for i in np.flatnonzero(~keep)]
        if on_nonfinite is None:
            raise NonFiniteSamples(bad, where)
        on_nonfinite(bad)
    kept = x[torch.from_numpy(keep).to(x.device)]
    images = kept.float().clamp(-1, 1).permute(0, 2, 3, 1).cpu().numpy() if as_float else to_uint8_images(kept)
    return images, keep


def networks_of(model):
    """The ``nn.Module``s that the model function ``model`` runs: itself, or
    the ``networks`` a wrapper (guidance, a counter) names; () if neither."""
    if isinstance(model, torch.nn.Module):
        return (model,)
    return tuple(getattr(model, "networks", ()))


def generate_samples(
    *,
    model,
    diffusion,
    sample_shape,
    num_samples,
    batch_size,
    first_index=0,
    labels=None,
    sampler=None,
    steps=None,
    use_ddim=False,
    eta=0.0,
    clipper=None,
    cond_fn=None,
    decode_fn=None,
    seed=0,
    device="cpu",
    precision="auto",
    progress=True,
    on_nonfinite=None,
    cuda_graphs=True,
    as_float=False,
    timestep_spacing="trailing",
):
    """Draw ``num_samples`` samples and return ``(uint8 NHWC images, labels,
    clip fraction)``; with ``as_float`` the images are float32 NHWC in
    [-1, 1] instead (for values finer than 8 bits, e.g. spectrograms in dB).

    A sample whose latents or decoded pixels hold NaN or Inf is never turned
    into an image: by default :class:`NonFiniteSamples` is raised at the first
    such batch; with ``on_nonfinite`` (a callable) the bad samples are left
    out and their indices passed to it.

    Args:
        sample_shape: (C, H, W) of what the diffusion produces (latents or pixels).
        first_index: the index of the first sample (its noise stream), for
            drawing a share of a larger set.
        labels: class index per sample (length ``num_samples``) for
            class-conditional models, else None.
        sampler: a name of ``samplers.SAMPLERS``; None: ``ddim`` with ``use_ddim``, else ``ddpm``.
            ``ddpm``/``ddim`` walk ``diffusion`` as respaced; the diffusers
            samplers take ``steps`` steps over the full ``diffusion``.
        clipper: a :class:`DenoisedClipper` (default: no clipping).
        cond_fn: classifier guidance, ``cond_fn(x, t, y=...)`` -> grad of log p(y|x).
        decode_fn: latents -> images in [-1, 1] (the VAE's decoder), or None
            for pixel models.
        cuda_graphs: on a CUDA device, replay each denoising step (or, with
            guidance by ``cond_fn`` or clipping, the model call) from CUDA
            graphs: the same numbers, far fewer kernel launches.
        timestep_spacing: where the diffusers samplers' steps lie
            (``samplers.TIMESTEP_SPACINGS``).
    """
    device = torch.device(device)
    sampler = resolve_sampler(sampler, use_ddim)
    if steps is None:
        steps = diffusion.num_timesteps
    sample_fn = SAMPLERS[sampler]
    clipper = clipper or DenoisedClipper("none")
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if len(labels) != num_samples:
            raise ValueError(f"{len(labels)} labels for {num_samples} samples")
    precision = resolve_sampling_precision(precision, device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if precision == "bf16" else contextlib.nullcontext()
    )
    _build_norm_kernels(model, sample_shape, labels, min(2, batch_size, num_samples), device, precision, autocast)
    low_precision_weights = (weights_cast_for_autocast(networks_of(model), torch.bfloat16) if precision == "bf16"
                             else contextlib.nullcontext())
    # Kept across the batches, so that each replays the first batch's graphs.
    graphs = GraphCache() if cuda_graphs and graphs_usable(device) else None
    with low_precision_weights:
        images, kept_labels = [], []
        starts = range(0, num_samples, batch_size)
        for start in progress_bar(starts, desc="sampling", disable=not progress or len(starts) == 1):
            stop = min(start + batch_size, num_samples)
            generators = [sample_generator(seed, first_index + i, device) for i in range(start, stop)]
            x = per_sample_normal(generators, tuple(sample_shape), device)
            kwargs = {}
            if labels is not None:
                kwargs["y"] = labels[start:stop].to(device)
            denoiser = Denoiser(model=model, model_kwargs=kwargs, cond_fn=cond_fn,
                                denoised_fn=None if clipper.mode == "none" else clipper)
            plan = SamplingPlan(diffusion=diffusion, steps=steps, generators=generators, eta=eta, progress=progress,
                                timestep_spacing=timestep_spacing, graphs=graphs)
            with autocast:
                x = sample_fn(denoiser, x, plan)
            batch_images, keep = _finished_images(x, decode_fn, as_float, on_nonfinite, first_index + start)
            images.append(batch_images)
            if labels is not None:
                kept_labels.append(labels[start:stop].numpy()[keep])
    all_labels = np.concatenate(kept_labels) if kept_labels else None
    return np.concatenate(images), all_labels, clipper.fraction()
