"""The samplers, as a table: one small function per sampler, as in k-diffusion.

Each sampler is ``sampler(denoiser, x, plan) -> x_0``: it takes pure noise
``x`` (N, C, H, W) and denoises it with the model in ``denoiser`` over the
steps in ``plan``. ``SAMPLERS`` maps the names ``--sampler`` accepts to them.

- ``ddpm`` (ancestral) and ``ddim`` (with ``eta``) are the diffusion core's
  own steps over ``plan.diffusion``, respaced as ``--timestep_respacing``
  says (``"250"``, ``"ddim50"``, ``"10,20,30"``: the original's strings).
- ``dpmpp_2m``, ``unipc``, ``euler``, ``euler_a`` and ``heun`` are diffusers'
  schedulers, built from the model's own beta schedule, over ``plan.steps``
  steps spaced as ``plan.timestep_spacing`` says: "trailing" starts at the
  noisiest step t = T-1, "leading" about T - T/steps like the core's ``ddimN``
  (``sample_from_checkpoint.resolve_timestep_spacing`` picks one).
  The model's epsilon comes from the core (every mean type, clipping of the
  predicted x0 and classifier guidance apply as for DDIM).

Noise: every sample has its own generator (``plan.generators``), so a sample
does not depend on the batch it was drawn in.
"""

import dataclasses
import inspect
import re
from typing import Callable, Optional

import torch

from ..runtime.errors import UserError, shown
from ..runtime.progress import progress as progress_bar

CORE_SAMPLERS = ("ddpm", "ddim")
DIFFUSERS_SAMPLERS = ("dpmpp_2m", "unipc", "euler", "euler_a", "heun")
SAMPLER_NAMES = CORE_SAMPLERS + DIFFUSERS_SAMPLERS
# diffusers' names for where the steps of its schedulers lie.
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclasses.dataclass
class Denoiser:
    """The model as the samplers see it.

    model: ``model(x, t, **model_kwargs)`` (the network, or a guidance wrapper).
    model_kwargs: e.g. ``{"y": labels}``.
    denoised_fn: applied to each predicted x0 (clipping), or None.
    cond_fn: classifier guidance ``cond_fn(x, t, y=...)`` -> grad log p(y|x), or None.
    """

    model: Callable
    model_kwargs: dict
    denoised_fn: Optional[Callable] = None
    cond_fn: Optional[Callable] = None


@dataclasses.dataclass
class SamplingPlan:
    """Where the steps come from.

    diffusion: the core diffusion; respaced for ``ddpm``/``ddim``, the full
        T-step process for the diffusers samplers.
    steps: number of sampler steps (= ``diffusion.num_timesteps`` for the core ones).
    generators: one ``torch.Generator`` per sample of the batch.
    eta: DDIM's noise scale (``ddim`` only).
    progress: show a progress bar over the steps.
    timestep_spacing: where the diffusers samplers' steps lie (TIMESTEP_SPACINGS).
    graphs: None, or ``graphs(name, fn) -> fn`` replayed from CUDA graphs
        (``runtime.cuda_graphs.GraphCache``, kept across a call's batches):
        the core samplers replay their whole step where nothing in it keeps
        count on the host (no ``cond_fn``, no ``denoised_fn``), else the
        model call, as the diffusers samplers do.
    """

    diffusion: object
    steps: int
    generators: list
    eta: float = 0.0
    progress: bool = False
    timestep_spacing: str = "trailing"
    graphs: Optional[Callable] = None


def per_sample_normal(generators, shape, device):
    """(N, *shape) standard normal noise, sample ``i`` drawn from ``generators[i]``."""
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])


def _step_bar(plan, count):
    return progress_bar(range(count), desc="denoising", leave=False, disable=not plan.progress)


def _graphed_model(den, plan):
    """``den`` with its model call replayed from CUDA graphs where ``plan`` has them."""
    if plan.graphs is None:
        return den
    return dataclasses.replace(den, model=plan.graphs("model", den.model))


# ---- the diffusion core's samplers -------------------------------------------


def _core_loop(den, x, plan, ddim):
    diffusion = plan.diffusion
    needs_noise = not ddim or plan.eta > 0
    whole_step = plan.graphs is not None and den.cond_fn is None and den.denoised_fn is None
    if not whole_step:
        den = _graphed_model(den, plan)
    names = tuple(sorted(den.model_kwargs))

    def step(x, t, noise, *values):
        """x_t -> x_{t-1}, a function of its tensors alone (so it can be replayed)."""
        common = dict(clip_denoised=False, denoised_fn=den.denoised_fn, cond_fn=den.cond_fn,
                      model_kwargs=dict(zip(names, values)), noise=noise)
        if ddim:
            return diffusion.ddim_sample(den.model, x, t, eta=plan.eta, **common)["sample"]
        return diffusion.p_sample(den.model, x, t, **common)["sample"]

    if whole_step:
        step = plan.graphs("ddim" if ddim else "ddpm", step)
    # Deterministic DDIM adds sigma * noise with sigma = 0: a zero, not a draw.
    no_noise = torch.zeros((), device=x.device, dtype=x.dtype)
    values = [den.model_kwargs[k] for k in names]
    for k in _step_bar(plan, diffusion.num_timesteps):
        i = diffusion.num_timesteps - 1 - k
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        noise = per_sample_normal(plan.generators, x.shape[1:], x.device) if needs_noise else no_noise
        with torch.no_grad():
            x = step(x, t, noise, *values)
    return x


def ddpm(den, x, plan):
    """Ancestral sampling, the original's ``p_sample_loop``."""
    return _core_loop(den, x, plan, ddim=False)


def ddim(den, x, plan):
    """DDIM (Song et al. 2021), the original's ``ddim_sample_loop``; ``eta`` 0 is deterministic."""
    return _core_loop(den, x, plan, ddim=True)


# ---- diffusers' solvers ---------------------------------------------------------


def model_epsilon(diffusion, den, x_t, t):
    """The model's epsilon at integer timesteps ``t`` of the full process, via
    the core: predicted x0 (clipped by ``denoised_fn``, shifted by classifier
    guidance) turned back into epsilon, as DDIM does. float32."""
    with torch.no_grad():
        out = diffusion.p_mean_variance(den.model, x_t, t, clip_denoised=False, denoised_fn=den.denoised_fn,
                                        model_kwargs=den.model_kwargs)
        if den.cond_fn is not None:
            out = diffusion.condition_score(den.cond_fn, out, x_t, t, den.model_kwargs)
        return diffusion._predict_eps_from_xstart(x_t, t, out["pred_xstart"]).float()


def build_scheduler(name, diffusion, steps, eta=0.0, timestep_spacing="trailing"):
    """A diffusers scheduler for ``name`` with ``diffusion``'s betas, set to ``steps`` steps."""
    import diffusers

    classes = {
        "ddim": (diffusers.DDIMScheduler, {"set_alpha_to_one": True, "clip_sample": False, "steps_offset": 0}),
        "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        "unipc": (diffusers.UniPCMultistepScheduler, {}),
        "euler": (diffusers.EulerDiscreteScheduler, {}),
        "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
        "heun": (diffusers.HeunDiscreteScheduler, {}),
    }
    cls, options = classes[name]
    betas = [float(b) for b in diffusion.betas]
    scheduler = cls(num_train_timesteps=len(betas), trained_betas=betas, prediction_type="epsilon",
                    timestep_spacing=timestep_spacing, **options)
    scheduler.set_timesteps(int(steps))
    return scheduler


def diffusers_loop(name, den, x, plan):
    """Run diffusers' scheduler ``name`` from noise ``x`` (unit variance)."""
    diffusion = plan.diffusion
    den = _graphed_model(den, plan)
    scheduler = build_scheduler(name, diffusion, plan.steps, timestep_spacing=plan.timestep_spacing)
    x = x * scheduler.init_noise_sigma
    extra = {"eta": plan.eta} if name == "ddim" else {}
    if "generator" in inspect.signature(scheduler.step).parameters:  # the stochastic ones
        extra["generator"] = plan.generators if len(plan.generators) > 1 else plan.generators[0]
    timesteps = scheduler.timesteps
    for k in _step_bar(plan, len(timesteps)):
        t_value = timesteps[k]
        t_int = int(round(float(t_value)))
        if abs(float(t_value) - t_int) > 1e-3:
            raise RuntimeError(f"{name}: scheduler timestep {float(t_value)} is not an integer step")
        t = torch.full((x.shape[0],), t_int, device=x.device, dtype=torch.long)
        x_t = scheduler.scale_model_input(x, t_value)
        eps = model_epsilon(diffusion, den, x_t.float(), t)
        x = scheduler.step(eps, t_value, x, return_dict=False, **extra)[0]
    return x


def dpmpp_2m(den, x, plan):
    """DPM-Solver++(2M) (Lu et al. 2022), diffusers' ``DPMSolverMultistepScheduler``."""
    return diffusers_loop("dpmpp_2m", den, x, plan)


def unipc(den, x, plan):
    """UniPC (Zhao et al. 2023), diffusers' ``UniPCMultistepScheduler``."""
    return diffusers_loop("unipc", den, x, plan)


def euler(den, x, plan):
    """Euler's method on the probability-flow ODE (Karras et al. 2022), diffusers' ``EulerDiscreteScheduler``."""
    return diffusers_loop("euler", den, x, plan)


def euler_a(den, x, plan):
    """Euler ancestral, diffusers' ``EulerAncestralDiscreteScheduler``."""
    return diffusers_loop("euler_a", den, x, plan)


def heun(den, x, plan):
    """Heun's second-order method (Karras et al. 2022), diffusers'
    ``HeunDiscreteScheduler``; two model calls per step."""
    return diffusers_loop("heun", den, x, plan)


SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "dpmpp_2m": dpmpp_2m, "unipc": unipc,
            "euler": euler, "euler_a": euler_a, "heun": heun}


def resolve_sampler(sampler, use_ddim=False):
    """The sampler name for ``--sampler`` and the original's ``--use_ddim``
    (``""`` means ``ddim`` with ``use_ddim`` and ``ddpm`` without)."""
    sampler = (sampler or "").strip()
    if not sampler:
        return "ddim" if use_ddim else "ddpm"
    if sampler not in SAMPLERS:
        raise UserError(f"sampler {shown(sampler)} must be one of {', '.join(SAMPLER_NAMES)}")
    if use_ddim and sampler != "ddim":
        raise UserError(f"--use_ddim True contradicts --sampler {sampler}; give one of them")
    return sampler


def ddim_respacing(count, num_timesteps):
    """``--timestep_respacing`` for ``count`` DDIM steps (at most
    ``num_timesteps``): ``"ddimN"``, DDIM's fixed stride from t=0, where N
    divides ``num_timesteps``, else ``"N"`` steps spread evenly (also for
    N = 1, which no stride below the step count gives)."""
    n = max(1, min(int(count), int(num_timesteps)))
    return f"ddim{n}" if n > 1 and int(num_timesteps) % n == 0 else str(n)


def sampler_steps(sampler, timestep_respacing, num_timesteps):
    """How many steps ``sampler`` takes for ``--timestep_respacing``: the core
    samplers respace the diffusion (any of the original's strings); the
    diffusers ones need one number (``"25"`` or ``"ddim25"``), or take all
    ``num_timesteps`` steps for ``""``."""
    text = str(timestep_respacing or "").strip()
    if sampler in CORE_SAMPLERS or not text:
        return None if text else int(num_timesteps)
    match = re.fullmatch(r"(?:ddim)?(\d+)", text)
    if not match or not 0 < int(match.group(1)) <= int(num_timesteps):
        raise UserError(f"--sampler {sampler} takes one step count 1..{num_timesteps} in --timestep_respacing "
                        f"(e.g. 25), got {timestep_respacing!r}")
    return int(match.group(1))
