""""Why are my samples noise?": checks of a checkpoint, its VAE and its data.

What ``scripts/diagnose.py`` runs. Each check gives a status and one line:

- ``sampling``: a short DDIM run (``sampling_steps`` steps, ``num_samples``
  samples, eta 0, clipped as sampling would clip) recording per step the
  min/max/std of x_t and of the predicted x0. Diffusion works on unit-std
  values (scaled latents, or pixels in [-1, 1]), so FAIL when x_t's std
  exceeds ``STD_BLOWUP`` (3x unit std) at any step, when the final sample
  reaches ``|x| > X0_BLOWUP`` (10), or when x0 does so in the low-noise half
  of the steps (t < T/2, where x0 is nearly the sample); ``|x0| > 10`` only at
  high noise (where an eps model divides by a tiny sqrt(alpha_bar)) is a WARN.
- ``clipping``: the share of predicted x0 values each mode of
  :class:`~.sample_loop.DenoisedClipper` (none/pixel/fixed/dynamic) would
  change; WARN above ``CLIP_WARN`` for the mode sampling uses (``fixed`` when
  it uses none).
- ``nan_inf``: NaN or Inf in the weights (which tensors) or during sampling
  (the first step and whether x0 or x_t).
- ``ema``: the EMA's age and its distance from the raw weights. An EMA
  started from the initial weights still holds ``prod(decay_k)`` of them
  after n updates (:func:`init_share`): ``rate**n`` without warm-up, almost
  nothing after a few dozen steps with it (``ema.ema_decay``). FAIL when more
  than ``EMA_INIT_FAIL`` (half) is the start, WARN above ``EMA_INIT_WARN``
  (5%): without warm-up that is n < 0.69 H and n < 3 H for the horizon
  H = 1/(1 - rate) (a 0.9999 EMA fails before step ~6900 and warns before
  ~30000). The relative L2 distance ``|ema - raw| / |raw|`` is reported;
  above ``EMA_DISTANCE_WARN`` it is a WARN.
- ``vae_match``: the VAE found (``--vae_path`` or the path stored in the
  checkpoint) has the fingerprint, latent channels and downsampling the
  checkpoint records.
- ``vae_roundtrip``: RMS of decode(encode(x)) - x on a few real images as the
  VAE sees them (centre-cropped to the training size, [-1, 1]); WARN above
  ``ROUNDTRIP_WARN`` (0.15), FAIL above ``ROUNDTRIP_FAIL`` (0.3).
- ``latent_scale``: the std of the real images' latents times the stored
  scale; OK within ``SCALE_OK``, WARN within ``SCALE_WARN`` ([0.5, 2]), else FAIL.

A check that cannot run says ``skipped: why``. :func:`diagnosis_text` turns
the results into words, the most likely cause first.
"""

import math
import os
import re

import numpy as np
import torch

from ..training import checkpoint as ckpt
from ..core import script_util
from ..runtime.dist_util import pick_device
from ..runtime.errors import UserError
from ..runtime.files import atomic_write_json, check_writable_file
from ..data.image_datasets import ImageDataset, list_image_files
from ..data.labels import default_label_map, people
from ..sampling import sample_from_checkpoint as sampling
from ..sampling.sample_from_checkpoint import clip_mode_of, load_sampling_model, sample_defaults
from ..core.sample_loop import CLIP_MODES, DenoisedClipper
from ..core.samplers import ddim_respacing
from ..training.train_util import parse_ema_rates
from ..latent.vae_wrapper import VAEInterface

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
CHECKS = ("sampling", "clipping", "nan_inf", "ema", "vae_match", "vae_roundtrip", "latent_scale")
# A check that failed: the script's exit code (a UserError, i.e. the
# diagnosis could not run, exits 2 through errors.run_main).
EXIT_FAILED = 3

STD_BLOWUP = 3.0          # x_t std beyond 3x the unit std of the diffusion's values
X0_BLOWUP = 10.0          # |x0| or |final sample| beyond this is a blow-up
FINAL_STD_WARN = 2.0      # final sample std beyond 2x unit std: a WARN
CLIP_WARN = 0.05          # share of x0 values clipped
EMA_INIT_FAIL = 0.5       # share of the EMA that is still its starting weights
EMA_INIT_WARN = 0.05
EMA_DISTANCE_WARN = 0.5   # relative L2 distance EMA vs raw weights
ROUNDTRIP_WARN = 0.15     # RMS in [-1, 1] units
ROUNDTRIP_FAIL = 0.3
SCALE_OK = (0.67, 1.5)    # std of the scaled latents of real images
SCALE_WARN = (0.5, 2.0)

_EMA_NAME = re.compile(r"ema_([0-9.]+)_(\d+)\.(safetensors|pt)")
_MODEL_NAME = re.compile(r"model(\d+)\.(safetensors|pt)")


def diagnose_defaults():
    return {
        "model_path": "",
        "vae_path": "",
        "data_dir": "",
        "output_json": "",
        "use_ema": True,
        "num_samples": 4,
        "sampling_steps": 25,
        "num_images": 8,
        "clip_denoised": "auto",
        "clip_range": 3.0,
        "dynamic_threshold_percentile": 0.995,
        "seed": 0,
        "device": "auto",
    }


FLAG_HELP = {
    **{flag: sampling.FLAG_HELP[flag] for flag in ("model_path", "clip_range", "dynamic_threshold_percentile",
                                                   "device")},
    "vae_path": "the VAE folder to check ('' = the path stored in the checkpoint)",
    "data_dir": "folder of real training images (a few are read) for the VAE round-trip and latent-scale checks; "
                "'' skips them",
    "output_json": "write every result and the per-step statistics to this JSON file ('' = none)",
    "use_ema": "for a run folder: diagnose its EMA weights (True) or its raw weights (False)",
    "num_samples": "samples drawn for the sampling checks",
    "sampling_steps": "DDIM steps of the sampling checks",
    "num_images": "real images read from --data_dir",
    "clip_denoised": "clipping applied while sampling, as image_sample_vae.py would (auto: none for latents, "
                     "pixel for pixels); every mode is counted anyway",
    "seed": "seed of the starting noise",
}
FLAG_CHOICES = {"clip_denoised": sampling.FLAG_CHOICES["clip_denoised"]}


def check(status, message, **numbers):
    return {"status": status, "message": message, **numbers}


def skipped(why):
    return check(SKIP, f"skipped: {why}")


# --------------------------------------------------------------------------- #
# numbers
# --------------------------------------------------------------------------- #


def tensor_stats(x):
    """min/max/std/absmax of the finite values of ``x`` and how many are not."""
    x = x.detach().float()
    finite = torch.isfinite(x)
    values = x[finite]
    bad = int((~finite).sum())
    if values.numel() == 0:
        return {"min": None, "max": None, "std": None, "absmax": None, "nonfinite": bad}
    return {"min": float(values.min()), "max": float(values.max()),
            "std": float(values.std()) if values.numel() > 1 else 0.0,
            "absmax": float(values.abs().max()), "nonfinite": bad}


def init_share(rate, updates, warmup):
    """Share of an EMA that is still its starting weights after ``updates``
    updates with ``ema.ema_decay``: the product of the decays."""
    rate, updates = float(rate), int(updates)
    if updates <= 0:
        return 1.0
    if not warmup:
        return math.exp(updates * math.log(rate))
    # decay_k = (1 + k) / (10 + k) while that is below rate, i.e. k < (10 rate - 1) / (1 - rate)
    early = min(updates, max(0, math.ceil((10 * rate - 1) / (1 - rate))))
    log = math.lgamma(early + 1) + math.lgamma(10) - math.lgamma(early + 10) + (updates - early) * math.log(rate)
    return math.exp(log)


def relative_distance(state, reference):
    """``|state - reference| / |reference|`` over their common float tensors
    (None when non-finite or empty)."""
    num = den = 0.0
    for name, ref in reference.items():
        other = state.get(name)
        if other is None or not ref.is_floating_point() or other.shape != ref.shape:
            continue
        ref, other = ref.double(), other.double()
        num += float(((other - ref) ** 2).sum())
        den += float((ref ** 2).sum())
    if not (den > 0 and math.isfinite(num) and math.isfinite(den)):
        return None
    return math.sqrt(num / den)


def nonfinite_tensors(state):
    return sorted(name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))


def _fmt(value, spec=".3g"):
    return "n/a" if value is None else format(value, spec)


# --------------------------------------------------------------------------- #
# sampling trajectory
# --------------------------------------------------------------------------- #


class _Recorder:
    """``denoised_fn`` that keeps the raw x0, counts what every clipping mode
    would change, and applies the mode sampling uses."""

    def __init__(self, active, clip_range, percentile):
        self.clippers = {mode: DenoisedClipper(mode, clip_range, percentile) for mode in CLIP_MODES}
        self.active = DenoisedClipper(active, clip_range, percentile)
        self.raw = None

    def __call__(self, x0):
        self.raw = x0.detach()
        if bool(torch.isfinite(self.raw).all()):
            for clipper in self.clippers.values():
                clipper(self.raw)
        return self.active(x0)


@torch.no_grad()
def sampling_trajectory(model, diffusion_config, shape, labels, *, steps, clip_mode, clip_range, percentile,
                        seed, device):
    """DDIM (eta 0) from seeded noise; per step the stats of x_t and raw x0."""
    spacing = ddim_respacing(steps, int(diffusion_config["steps"]))
    diffusion = script_util.create_gaussian_diffusion(**{**diffusion_config, "timestep_respacing": spacing})
    generator = torch.Generator().manual_seed(int(seed))
    x = torch.randn(shape, generator=generator).to(device)
    kwargs = {} if labels is None else {"y": torch.as_tensor(labels, dtype=torch.long, device=device)}
    recorder = _Recorder(clip_mode, clip_range, percentile)
    records, first_bad = [], None
    indices = list(range(diffusion.num_timesteps))[::-1]
    for i, index in enumerate(indices):
        t = torch.full((shape[0],), index, dtype=torch.long, device=device)
        out = diffusion.ddim_sample(model, x, t, clip_denoised=False, denoised_fn=recorder,
                                    model_kwargs=kwargs, eta=0.0, noise=torch.zeros_like(x))
        record = {"step": i, "t": int(diffusion.timestep_map[index]), "x_t": tensor_stats(x),
                  "x0": tensor_stats(recorder.raw)}
        records.append(record)
        x = out["sample"].float()
        if first_bad is None:
            for where in ("x_t", "x0"):
                if record[where]["nonfinite"]:
                    first_bad = {"step": i, "t": record["t"], "where": where}
                    break
        if first_bad is None and not bool(torch.isfinite(x).all()):
            first_bad = {"step": i, "t": record["t"], "where": "x_t-1"}
        if first_bad is not None:
            break
    return {"spacing": spacing, "num_steps": len(indices), "original_steps": int(diffusion_config["steps"]),
            "steps": records, "final": tensor_stats(x), "first_nonfinite": first_bad,
            "clip_fraction": {mode: c.fraction() for mode, c in recorder.clippers.items()},
            "clip_values_counted": recorder.clippers["fixed"].seen, "clip_mode": clip_mode}


def judge_sampling(traj):
    steps, final = traj["steps"], traj["final"]
    if not steps:
        return skipped("no sampling steps ran")
    half = traj["original_steps"] / 2
    max_xt_std = max((s["x_t"]["std"] or 0.0) for s in steps)
    low_noise = [s for s in steps if s["t"] < half]
    x0_max = max((s["x0"]["absmax"] or 0.0) for s in steps)
    x0_max_low = max(((s["x0"]["absmax"] or 0.0) for s in low_noise), default=0.0)
    worst = max(steps, key=lambda s: s["x0"]["absmax"] or 0.0)
    numbers = dict(max_x_t_std=max_xt_std, max_abs_x0=x0_max, max_abs_x0_low_noise=x0_max_low,
                   final_std=final["std"], final_absmax=final["absmax"])
    line = (f"{traj['num_steps']} DDIM steps ({traj['spacing']}): x_t std {_fmt(steps[0]['x_t']['std'])} -> "
            f"{_fmt(final['std'])} (max {_fmt(max_xt_std)}), |x0| max {_fmt(x0_max)} "
            f"(step {worst['step']}, t={worst['t']}), final |x| max {_fmt(final['absmax'])}")
    if traj["first_nonfinite"] is not None:
        bad = traj["first_nonfinite"]
        return check(FAIL, f"{traj['num_steps']} DDIM steps ({traj['spacing']}): NaN/Inf in {bad['where']} at step "
                           f"{bad['step']} (t={bad['t']}), sampling stopped there", **numbers)
    problems = []
    if max_xt_std > STD_BLOWUP:
        problems.append(f"x_t std {max_xt_std:.3g} > {STD_BLOWUP:g}")
    if (final["absmax"] or 0.0) > X0_BLOWUP:
        problems.append(f"final |x| {final['absmax']:.3g} > {X0_BLOWUP:g}")
    if x0_max_low > X0_BLOWUP:
        problems.append(f"|x0| {x0_max_low:.3g} > {X0_BLOWUP:g} at low noise")
    if problems:
        return check(FAIL, f"{line}: blow-up ({'; '.join(problems)})", blowup=True, **numbers)
    warns = []
    if x0_max > X0_BLOWUP:
        warns.append(f"|x0| {x0_max:.3g} > {X0_BLOWUP:g} at high noise only")
    if (final["std"] or 0.0) > FINAL_STD_WARN:
        warns.append(f"final std {final['std']:.3g} > {FINAL_STD_WARN:g}")
    if warns:
        return check(WARN, f"{line}: {'; '.join(warns)}", **numbers)
    return check(OK, line, **numbers)


def judge_clipping(traj):
    fractions = traj["clip_fraction"]
    used = traj["clip_mode"]
    reference = used if used != "none" else "fixed"
    shown = ", ".join(f"{mode} {100 * f:.2f}%" for mode, f in fractions.items())
    line = f"predicted x0 values each mode would clip: {shown} (sampling uses {used})"
    if not traj["clip_values_counted"]:
        return skipped("no finite predicted x0 to count (NaN/Inf from the first step)")
    if traj["first_nonfinite"] is not None:
        line += f"; counted on the {traj['first_nonfinite']['step']} finite step(s) only"
    if fractions[reference] > CLIP_WARN:
        return check(WARN, f"{line}: {reference} clips more than {100 * CLIP_WARN:g}%",
                     fractions=fractions, reference=reference)
    return check(OK, line, fractions=fractions, reference=reference)


# --------------------------------------------------------------------------- #
# weights and EMA
# --------------------------------------------------------------------------- #


def weights_family(path, meta):
    """``(rate or None, raw weights path or None, {rate: ema path})`` of the
    checkpoint ``path``: which EMA it is, and its siblings of the same step."""
    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    ema = _EMA_NAME.fullmatch(name)
    model = _MODEL_NAME.fullmatch(name)
    rate = None
    if ema:
        rate, step, suffix = ema.group(1), int(ema.group(2)), ema.group(3)
    elif model:
        step, suffix = int(model.group(1)), model.group(2)
    else:
        weights = str((meta or {}).get("weights", ""))
        if weights.startswith("ema_"):
            rate = weights[len("ema_"):]
        return rate, None, {}
    raw = os.path.join(folder, f"model{step:06d}.{suffix}")
    emas = {}
    for other in sorted(os.listdir(folder)):
        found = _EMA_NAME.fullmatch(other)
        if found and int(found.group(2)) == step and found.group(3) == suffix:
            emas[found.group(1)] = os.path.join(folder, other)
    return rate, (raw if os.path.isfile(raw) else None), emas


def ema_report(rate, step, warmup, ema_state, raw_state):
    share = init_share(float(rate), step, warmup)
    horizon = 1.0 / (1.0 - float(rate))
    distance = None if raw_state is None or ema_state is None else relative_distance(ema_state, raw_state)
    return {"rate": str(rate), "step": int(step), "warmup": bool(warmup), "horizon": horizon,
            "init_share": share, "distance": distance}


def judge_ema(path, meta, state):
    rate, raw_path, emas = weights_family(path, meta)
    step = int(meta.get("step", ckpt.parse_step(path)))
    train = meta.get("train") or {}
    recorded = "ema_warmup" in train
    warmup = bool(train.get("ema_warmup", False))
    configured = []
    if train.get("ema_rate") not in (None, ""):
        try:
            configured = [str(r) for r in parse_ema_rates(train["ema_rate"])]
        except UserError:
            configured = []
    note = "" if recorded else " (ema_warmup not recorded: assumed off, the original's rule)"
    raw_state = ckpt.load_weights(raw_path)[0] if raw_path and raw_path != os.path.abspath(path) else None
    if rate is None:
        # The raw weights are sampled: the EMAs beside them are only reported.
        if not emas:
            why = "no EMA weights beside it" if configured or not train else "training kept no EMA"
            return check(OK, f"sampling the raw weights of step {step}; {why}", sampled="raw")
        parts = []
        for r, p in emas.items():
            rep = ema_report(r, step, warmup, ckpt.load_weights(p)[0], state)
            parts.append(f"ema {r}: {100 * rep['init_share']:.1f}% start weights, distance {_fmt(rep['distance'])}")
        return check(OK, f"sampling the raw weights of step {step} (--use_ema False); " + "; ".join(parts),
                     sampled="raw")
    rep = ema_report(rate, step, warmup, state, raw_state)
    dist_text = (f"distance to the raw weights {_fmt(rep['distance'])}" if raw_state is not None
                 else "no raw weights beside it to compare")
    age = (f"EMA {rate} at step {step}, {'with' if warmup else 'without'} warm-up{note}: "
           f"{100 * rep['init_share']:.1f}% of it is still the starting weights "
           f"(horizon 1/(1-rate) = {rep['horizon']:.0f} steps); {dist_text}")
    numbers = {k: rep[k] for k in ("rate", "step", "warmup", "horizon", "init_share", "distance")}
    if rep["init_share"] > EMA_INIT_FAIL:
        return check(FAIL, f"{age}: too young", young=True, **numbers)
    if rep["init_share"] > EMA_INIT_WARN:
        return check(WARN, f"{age}: young", young=True, **numbers)
    if rep["distance"] is not None and rep["distance"] > EMA_DISTANCE_WARN:
        return check(WARN, f"{age}: far from the raw weights", **numbers)
    return check(OK, age, **numbers)


def judge_nonfinite(path, state, traj):
    bad = nonfinite_tensors(state)
    name = os.path.basename(path)
    few = ", ".join(bad[:4]) + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else "")
    first = traj["first_nonfinite"] if traj else None
    where = ("" if first is None else
             f"; sampling turns NaN/Inf at step {first['step']} (t={first['t']}, in {first['where']})")
    numbers = {"nonfinite_tensors": bad, "first_nonfinite": first}
    if bad:
        return check(FAIL, f"{len(bad)} tensor(s) of {name} hold NaN/Inf: {few}{where}", **numbers)
    if first is not None:
        return check(FAIL, f"the weights are finite{where}", **numbers)
    return check(OK, f"weights finite, no NaN/Inf in {len(traj['steps']) if traj else 0} sampling steps", **numbers)


# --------------------------------------------------------------------------- #
# VAE
# --------------------------------------------------------------------------- #


def load_real_images(data_dir, image_size, channels, count):
    """``count`` images of ``data_dir`` spread over its sorted files, as
    training sees them: centre-cropped to ``image_size``, in [-1, 1]."""
    paths = list_image_files(data_dir)
    if not paths:
        raise UserError(f"{data_dir} holds no images")
    picked = sorted({int(i) for i in np.linspace(0, len(paths) - 1, min(int(count), len(paths))).round()})
    data = ImageDataset(image_size, [paths[i] for i in picked], random_flip=False, channels=channels)
    return torch.stack([torch.from_numpy(data[i][0]) for i in range(len(data))])


def open_vae(meta, config, device):
    """``(VAEInterface or None, vae_match check)``."""
    vae_meta = meta["vae"]
    path = config["vae_path"] or vae_meta.get("path") or ""
    if not path or not os.path.isdir(path):
        where = f"at {path}" if path else "(no path stored)"
        return None, check(FAIL, f"the VAE was expected {where} and is not there; pass --vae_path", missing=True)
    scale = vae_meta.get("latent_scale")
    try:
        vae = VAEInterface(path, device=device, input_range=vae_meta.get("input_range", "-1,1"),
                           latent_scale=scale if scale is not None else None)
    except UserError as err:
        return None, check(FAIL, f"cannot load the VAE in {path}: {err}", missing=True)
    expected = vae_meta.get("fingerprint")
    problems = []
    if expected and vae.fingerprint != expected:
        problems.append(f"fingerprint {vae.fingerprint}, the checkpoint expects {expected}")
    model_channels = int(meta["model"].get("in_channels", 3))
    if vae.latent_channels != model_channels:
        problems.append(f"{vae.latent_channels} latent channels, the model takes {model_channels}")
    if vae_meta.get("downsample_factor") and int(vae_meta["downsample_factor"]) != vae.downsample_factor:
        problems.append(f"downsamples {vae.downsample_factor}x, the checkpoint's VAE {vae_meta['downsample_factor']}x")
    numbers = {"path": vae.path, "fingerprint": vae.fingerprint, "expected": expected}
    if problems:
        return vae, check(FAIL, f"the VAE in {path} is not the model's: {'; '.join(problems)}", swapped=True, **numbers)
    if not expected:
        return vae, check(WARN, f"the checkpoint records no VAE fingerprint; {path} not verified", **numbers)
    return vae, check(OK, f"{path} has the checkpoint's fingerprint {expected}", **numbers)


def judge_roundtrip(vae, images):
    recon = vae.decode_unscaled(vae.encode_unscaled(images))
    diff = (recon - images).double()
    rms = float(diff.pow(2).mean().sqrt())
    line = f"RMS reconstruction error {_fmt(rms)} on {len(images)} real images ([-1, 1] units)"
    if not math.isfinite(rms) or rms > ROUNDTRIP_FAIL:
        return check(FAIL, f"{line} > {ROUNDTRIP_FAIL:g}", rms=rms if math.isfinite(rms) else None)
    if rms > ROUNDTRIP_WARN:
        return check(WARN, f"{line} > {ROUNDTRIP_WARN:g}", rms=rms)
    return check(OK, line, rms=rms)


def judge_scale(vae, images):
    if vae.latent_scale is None:
        return check(FAIL, "the checkpoint stores no latent scale", std=None)
    z = vae.encode_unscaled(images).double()
    raw_std = float(z.std())
    if not (raw_std > 0 and math.isfinite(raw_std)):
        return check(FAIL, f"the latents of the real images have std {raw_std}", std=None)
    std = raw_std * vae.latent_scale
    measured = 1.0 / raw_std
    line = (f"stored scale {vae.latent_scale:.4g} gives latent std {std:.3g} on {len(images)} real images "
            f"(unit std wants scale ~{measured:.4g})")
    numbers = dict(std=std, stored_scale=vae.latent_scale, measured_scale=measured)
    if not SCALE_WARN[0] <= std <= SCALE_WARN[1]:
        return check(FAIL, f"{line}: outside [{SCALE_WARN[0]:g}, {SCALE_WARN[1]:g}]", **numbers)
    if not SCALE_OK[0] <= std <= SCALE_OK[1]:
        return check(WARN, f"{line}: outside [{SCALE_OK[0]:g}, {SCALE_OK[1]:g}]", **numbers)
    return check(OK, line, **numbers)


def vae_checks(meta, config, device):
    """The three VAE checks, each a result or a skip."""
    if not meta.get("vae"):
        why = "pixel-space model: it has no VAE" + (" (--vae_path ignored)" if config["vae_path"] else "")
        return {"vae_match": skipped(why), "vae_roundtrip": skipped(why), "latent_scale": skipped(why)}
    vae, match = open_vae(meta, config, device)
    results = {"vae_match": match}
    if vae is None:
        why = "no VAE to load"
        results.update(vae_roundtrip=skipped(why), latent_scale=skipped(why))
        return results
    if not config["data_dir"]:
        why = "no --data_dir given (a few real images are needed)"
        results.update(vae_roundtrip=skipped(why), latent_scale=skipped(why))
        return results
    data = meta.get("data") or {}
    size = int(data.get("image_size") or int(meta["model"]["image_size"]) * vae.downsample_factor)
    images = load_real_images(config["data_dir"], size, vae.in_channels, config["num_images"]).to(vae.device)
    results["vae_roundtrip"] = judge_roundtrip(vae, images)
    results["latent_scale"] = judge_scale(vae, images)
    return results


# --------------------------------------------------------------------------- #
# the whole diagnosis
# --------------------------------------------------------------------------- #


def _sample_labels(meta, count):
    if not meta["model"].get("class_cond"):
        return None
    label_map = (meta.get("data") or {}).get("label_map") or default_label_map(meta["model"]["num_classes"])
    classes = sorted(int(k) for k in people(label_map))
    return [classes[i % len(classes)] for i in range(count)]


def run_diagnosis(config):
    """Run every check; returns the report (see :func:`write_json`)."""
    if not config["model_path"]:
        raise UserError("model_path is required: a checkpoint file or a run folder")
    for key in ("num_samples", "sampling_steps", "num_images"):
        if int(config[key]) < 1:
            raise UserError(f"{key} must be >= 1, got {config[key]}")
    if config.get("output_json"):  # before the work, not after it
        check_writable_file(config["output_json"], "output_json")
    path = ckpt.resolve_weights_file(config["model_path"], config["use_ema"])
    if ckpt.read_metadata(path) is None:
        raise UserError(f"{path} is a bare state dict: it records no model, VAE or training settings to check; "
                        "diagnose a .safetensors checkpoint written by our training")
    device = pick_device(config["device"])
    load_config = {**sample_defaults(), "model_path": path, "use_ema": config["use_ema"]}
    model, diffusion_config, meta, path = load_sampling_model(load_config, device)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    channels = int(meta["model"].get("in_channels", 3))
    size = int(meta["model"]["image_size"])
    clip_mode = clip_mode_of(config, meta)
    DenoisedClipper(clip_mode, config["clip_range"], config["dynamic_threshold_percentile"])  # checks the flags
    num = int(config["num_samples"])
    traj = sampling_trajectory(
        model, diffusion_config, (num, channels, size, size), _sample_labels(meta, num),
        steps=int(config["sampling_steps"]), clip_mode=clip_mode, clip_range=float(config["clip_range"]),
        percentile=float(config["dynamic_threshold_percentile"]), seed=config["seed"], device=device)
    results = {
        "sampling": judge_sampling(traj),
        "clipping": judge_clipping(traj),
        "nan_inf": judge_nonfinite(path, state, traj),
        "ema": judge_ema(path, meta, state),
        **vae_checks(meta, config, device),
    }
    checks = {name: results[name] for name in CHECKS}
    failed = any(c["status"] == FAIL for c in checks.values())
    report = {
        "model_path": config["model_path"],
        "weights_file": path,
        "step": meta.get("step", ckpt.parse_step(path)),
        "space": "latent" if meta.get("vae") else "pixel",
        "checks": checks,
        "trajectory": traj,
        "verdict": FAIL if failed else (WARN if any(c["status"] == WARN for c in checks.values()) else OK),
    }
    report["diagnosis"] = diagnosis_text(report)
    report["exit_code"] = EXIT_FAILED if failed else 0
    return report


def diagnosis_text(report):
    """Sentences, the most likely cause first."""
    c = report["checks"]
    found = []

    def bad(name, *statuses):
        return c[name]["status"] in (statuses or (FAIL,))

    nan = c["nan_inf"]
    if nan["nonfinite_tensors"]:
        found.append(f"The weights hold NaN/Inf ({', '.join(nan['nonfinite_tensors'][:3])}): training diverged "
                     "before this checkpoint was saved. Sample an earlier checkpoint and retrain from before the "
                     "divergence with a lower --lr, --grad_clip, or fp32/bf16 instead of fp16.")
    wrong_vae = bad("vae_match")
    if wrong_vae:
        found.append("The VAE is not the one the model was trained with (or is missing): its decoder reads the "
                     f"model's latents as noise ({c['vae_match']['message']}). Pass --vae_path to the VAE the "
                     "latents were encoded with.")
        if bad("latent_scale", FAIL, WARN) or bad("vae_roundtrip", FAIL, WARN):
            found.append("The latent_scale and vae_roundtrip results were measured with that other VAE: run "
                         "again with the right --vae_path before acting on them.")
    if bad("latent_scale") and not wrong_vae:
        s = c["latent_scale"]
        found.append(f"The stored latent scale is wrong for this VAE and data: real images' latents come out with "
                     f"std {_fmt(s.get('std'))} instead of ~1 (unit std wants scale "
                     f"~{_fmt(s.get('measured_scale'), '.4g')}, "
                     f"stored {_fmt(s.get('stored_scale'), '.4g')}), so samples are decoded at the wrong amplitude. "
                     "The VAE or the data changed after the latents were encoded, or the scale was set by hand: "
                     "re-encode the latents with --latent_scale measured (or stored) and retrain.")
    if bad("ema", FAIL, WARN) and c["ema"].get("young"):
        e = c["ema"]
        cure = "train with --ema_warmup True or a smaller --ema_rate such as 0.999" if not e["warmup"] else \
            "use a smaller --ema_rate such as 0.999"
        found.append(f"The EMA is too young: at step {e['step']} a {e['rate']} average "
                     f"{'with' if e['warmup'] else 'without'} warm-up is still {100 * e['init_share']:.1f}% its "
                     f"starting (random) weights; it averages over ~{e['horizon']:.0f} steps and needs about three "
                     f"times that. Sample the raw weights (--use_ema False), train far longer, or {cure}.")
    if nan["first_nonfinite"] is not None and not nan["nonfinite_tensors"]:
        f = nan["first_nonfinite"]
        found.append(f"Sampling overflows to NaN/Inf at step {f['step']} (t={f['t']}) with finite weights: the "
                     "model's outputs explode; check --precision (fp32) and the checkpoint's training loss.")
    if bad("sampling") and c["sampling"].get("blowup"):
        found.append(f"The {'latents' if report['space'] == 'latent' else 'pixels'} blow up during sampling (see "
                     "the sampling line): the model itself is unstable, "
                     "undertrained or diverged. Check the training loss and an earlier checkpoint; as a stopgap "
                     "sample with --clip_denoised dynamic (or fixed with --clip_range 3).")
    if bad("vae_roundtrip", FAIL, WARN) and not wrong_vae:
        found.append(f"The VAE reconstructs real images poorly (RMS {_fmt(c['vae_roundtrip'].get('rms'))}): even "
                     "perfect latents decode to blurred or noisy images. Train the VAE longer or larger.")
    if bad("ema", WARN) and not c["ema"].get("young"):
        found.append("The EMA is far from the raw weights: the weights still move fast; compare samples with "
                     "--use_ema False.")
    if bad("clipping", WARN):
        found.append("Predicted x0 often leaves the clipping range: the model predicts beyond the data's range; "
                     "--clip_denoised dynamic limits the damage.")
    if bad("sampling", WARN):
        found.append("The sampling trajectory is on the edge (see the sampling line): watch for the model "
                     "becoming unstable.")
    if bad("vae_match", WARN) or bad("latent_scale", WARN):
        found.append("Minor VAE doubts: see the vae_match and latent_scale lines.")
    if not found:
        checked = [n for n, r in c.items() if r["status"] != SKIP]
        skipped_names = [n for n, r in c.items() if r["status"] == SKIP]
        text = (f"No fault found ({', '.join(checked)} passed): the weights are finite and sampling stays in "
                "range. If samples still look like noise, the model may just be undertrained: compare "
                "checkpoints and sample with more steps.")
        if skipped_names:
            text += f" Not checked: {', '.join(skipped_names)} (see the skipped lines)."
        found.append(text)
    return found


# --------------------------------------------------------------------------- #
# output
# --------------------------------------------------------------------------- #


def trajectory_table(traj):
    lines = [f"{'step':>4} {'t':>5}  {'x_t min':>9} {'x_t max':>9} {'x_t std':>8}  "
             f"{'x0 min':>9} {'x0 max':>9} {'x0 std':>8}"]
    for s in traj["steps"]:
        a, b = s["x_t"], s["x0"]
        lines.append(f"{s['step']:>4} {s['t']:>5}  {_fmt(a['min'], '9.3g')} {_fmt(a['max'], '9.3g')} "
                     f"{_fmt(a['std'], '8.3g')}  {_fmt(b['min'], '9.3g')} {_fmt(b['max'], '9.3g')} "
                     f"{_fmt(b['std'], '8.3g')}" + ("  NaN/Inf" if a["nonfinite"] or b["nonfinite"] else ""))
    return "\n".join(lines)


def format_report(report):
    lines = [f"diagnosing {report['weights_file']} (step {report['step']}, {report['space']}-space model)",
             trajectory_table(report["trajectory"]), ""]
    for name, result in report["checks"].items():
        lines.append(f"{result['status']:<4}  {name:<13} {result['message']}")
    lines.append("")
    lines.append(f"diagnosis ({report['verdict']}): {report['diagnosis'][0]}")
    lines.extend(f"also: {text}" for text in report["diagnosis"][1:])
    return "\n".join(lines)


def _json_ready(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def write_json(report, path):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return atomic_write_json(path, _json_ready(report), allow_nan=False)


def diagnose_and_print(config):
    """``scripts/diagnose.py``: run the checks, print the report (and write its
    JSON with ``--output_json``); returns the exit code (0 or EXIT_FAILED)."""
    report = run_diagnosis({key: config[key] for key in diagnose_defaults()})
    print(format_report(report), flush=True)
    if config["output_json"]:
        write_json(report, config["output_json"])
        print(f"wrote {config['output_json']}")
    return report["exit_code"]
