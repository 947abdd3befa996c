"""Guidance: steering a sampler towards one person.

Two kinds, both optional and both applied by every sampler:

- **classifier guidance** (the original's): a noisy-latent classifier
  (``scripts/classifier_train.py``) adds ``scale * grad log p(y | x_t)``
  through ``cond_fn``;
- **classifier-free guidance**: a model trained with ``--class_dropout_prob``
  also knows a null class; :func:`classifier_free_model` runs the
  conditional and the null prediction in one batched forward pass and
  returns ``eps_null + scale * (eps_cond - eps_null)``, optionally only
  inside a band of noise levels (Kynkaanniemi et al. 2024: guidance at high
  noise collapses variety, at low noise it does little).
"""

import torch
import torch.nn.functional as F

from ..training import checkpoint as ckpt
from ..core import script_util
from ..runtime.errors import UserError
from ..data.labels import null_class_index, people

def load_classifier(path, device="cpu"):
    """``(classifier in eval mode on device, metadata)`` from a checkpoint of
    ``classifier_training.train_classifier``."""
    state, meta = ckpt.load_weights(str(path))
    if not meta or meta.get("kind") != ckpt.CLASSIFIER_KIND or "classifier" not in meta:
        raise UserError(f"{path} is not a classifier checkpoint (written by scripts/classifier_train.py)")
    kwargs = meta["classifier"]
    model = ckpt.build_from_metadata(script_util.create_classifier, kwargs, state, str(path), "classifier")
    if kwargs.get("classifier_use_fp16"):
        model.convert_to_fp16()
    return model.to(device).eval(), meta


def classifier_cond_fn(classifier, scale):
    """Guidance for ``generate_samples(cond_fn=...)`` and the diffusion's loops:
    ``cond_fn(x, t, y)`` -> ``scale * d/dx log p_classifier(y | x, t)``.

    ``t`` must be the diffusion's original timesteps (what a respaced
    diffusion passes to cond_fn), as the classifier was trained on them.
    """
    scale = float(scale)

    def cond_fn(x, t, y=None, **_):
        if y is None:
            raise ValueError("classifier guidance needs the target labels y")
        with torch.enable_grad():
            x_in = x.detach().float().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t).float(), dim=-1)
            picked = log_probs[torch.arange(len(y), device=log_probs.device), y.to(log_probs.device)]
            gradient = torch.autograd.grad(picked.sum(), x_in)[0]
        return gradient * scale

    return cond_fn


def check_classifier_fits(classifier_meta, model_meta, path):
    """Refuse a classifier trained for other inputs, another noise schedule
    or other classes than the model it is to guide."""
    checks = [
        ("input channels", classifier_meta["classifier"]["in_channels"], model_meta["model"].get("in_channels", 3)),
        ("input size", classifier_meta["classifier"]["image_size"], model_meta["model"]["image_size"]),
        ("noise_schedule", classifier_meta["diffusion"]["noise_schedule"], model_meta["diffusion"]["noise_schedule"]),
        ("diffusion steps", classifier_meta["diffusion"]["steps"], model_meta["diffusion"]["steps"]),
        # the timesteps the classifier was shown: 0..T-1, or rescaled to 0..1000
        ("rescale_timesteps", bool(classifier_meta["diffusion"].get("rescale_timesteps")),
         bool(model_meta["diffusion"].get("rescale_timesteps"))),
    ]
    model_labels = people((model_meta.get("data") or {}).get("label_map"))
    classifier_labels = (classifier_meta.get("data") or {}).get("label_map")
    if model_labels and classifier_labels:
        checks.append(("label map", classifier_labels, model_labels))
    for what, theirs, ours in checks:
        if theirs != ours:
            raise UserError(f"classifier {path} does not fit the model: {what} {theirs!r} there, {ours!r} here")


def parse_guidance_interval(text, num_timesteps=None):
    """``"LOW,HIGH"`` (original timesteps, inclusive) -> ``(low, high)``;
    ``""`` -> None (guide at every step)."""
    if not str(text).strip():
        return None
    try:
        low, high = (int(v) for v in str(text).split(","))
    except ValueError:
        raise UserError(f"--guidance_interval must be LOW,HIGH (timesteps), got {text!r}") from None
    top = num_timesteps - 1 if num_timesteps else None
    if low < 0 or high < low or (top is not None and high > top):
        raise UserError(f"--guidance_interval {text!r}: need 0 <= LOW <= HIGH" + (f" <= {top}" if top else ""))
    return low, high


def _extrapolate(strong, weak, scale, out_channels, t, interval):
    """``weak + scale * (strong - weak)`` on the first ``out_channels``
    channels (epsilon, or x0 of ``predict_xstart`` models), ``strong`` alone
    for samples whose timestep lies outside ``interval``; any further
    (learned variance) channels are ``strong``'s."""
    mean = weak[:, :out_channels] + scale * (strong[:, :out_channels] - weak[:, :out_channels])
    if interval is not None:
        inside = (t >= interval[0]) & (t <= interval[1])
        mean = torch.where(inside.view(-1, *[1] * (mean.ndim - 1)), mean, strong[:, :out_channels])
    return torch.cat([mean, strong[:, out_channels:]], dim=1)


def classifier_free_model(model, *, null_label, scale, out_channels, interval=None):
    """A model function for classifier-free guidance at ``scale`` (1: none).

    ``model(x, t, y)`` is called once on the doubled batch ``[x, x]`` with
    labels ``[y, null_label]``. The first ``out_channels`` output channels
    (epsilon, or the predicted x0 of ``predict_xstart`` models) are guided;
    learned variance channels, if any, are the conditional ones. With
    ``interval=(low, high)`` only samples whose timestep (original numbering)
    lies in it are guided; the others get the plain conditional prediction.
    """
    scale = float(scale)

    def guided(x, t, y=None, **kwargs):
        if y is None:
            raise ValueError("classifier-free guidance needs the target labels y")
        null = torch.full_like(y, int(null_label))
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]), **kwargs).chunk(2)
        return _extrapolate(cond, uncond, scale, out_channels, t, interval)

    guided.networks = (model,)  # what sample_loop.networks_of finds
    return guided


def autoguided_model(model, guide, *, scale, out_channels, interval=None):
    """A model function for autoguidance at ``scale`` (1: none): ``model``
    and the weaker ``guide`` each predict from the same ``(x, t, labels)``,
    and the result is ``guide + scale * (model - guide)`` on the first
    ``out_channels`` channels (variance channels are ``model``'s). With
    ``interval=(low, high)`` only timesteps inside it are guided."""
    scale = float(scale)

    def guided(x, t, **kwargs):
        return _extrapolate(model(x, t, **kwargs), guide(x, t, **kwargs), scale, out_channels, t, interval)

    guided.networks = (model, guide)  # what sample_loop.networks_of finds
    return guided


def check_guide_fits(guide_meta, model_meta, path):
    """Refuse an autoguidance model that does not predict the same thing as
    the model it guides: other inputs, outputs, noise schedule, classes or
    VAE. Its width and depth may differ (a smaller network is the point)."""
    # num_classes may differ by the null class of --class_dropout_prob: the label maps are compared instead.
    model_keys = ("in_channels", "image_size", "learn_sigma", "class_cond")
    diffusion_keys = ("steps", "noise_schedule", "predict_xstart", "rescale_timesteps", "learn_sigma")
    checks = [(f"model.{k}", guide_meta["model"].get(k), model_meta["model"].get(k)) for k in model_keys]
    checks += [(f"diffusion.{k}", guide_meta["diffusion"].get(k), model_meta["diffusion"].get(k))
               for k in diffusion_keys]
    if model_meta["model"].get("class_cond"):
        checks.append(("label map", people((guide_meta.get("data") or {}).get("label_map")),
                       people((model_meta.get("data") or {}).get("label_map"))))
    guide_vae, model_vae = guide_meta.get("vae") or {}, model_meta.get("vae") or {}
    checks += [(f"vae.{k}", guide_vae.get(k), model_vae.get(k)) for k in ("fingerprint", "latent_scale")]
    for what, theirs, ours in checks:
        if theirs != ours:
            raise UserError(f"guide model {path} does not fit the model: {what} {theirs!r} there, {ours!r} here")


def check_guidance_scale(scale, label_map, source):
    """Refuse a guidance scale the checkpoint cannot honour: anything but 1
    needs a model trained with a null class (``--class_dropout_prob``).
    Finiteness is checked with the other sampling flags, before loading."""
    scale = float(scale)
    if scale != 1.0 and null_class_index(label_map) is None:
        raise UserError(
            f"guidance_scale {scale} needs a model trained with --class_dropout_prob > 0 (it learns the null "
            f"class); {source} was trained without it: use --guidance_scale 1"
        )
