"""Gaussian diffusion: forward noising, the learned reverse process, losses.

This reimplements the diffusion maths of openai/guided-diffusion (itself
after Ho et al. 2020, Nichol & Dhariwal 2021 and Song et al. 2020 for DDIM)
with the same public names, keyword arguments and numbers.

Notation used in the docstrings: ``N`` is the batch size, ``x`` tensors have
shape ``(N, C, ...)``, ``t`` is an integer tensor of shape ``(N,)`` holding
indices into the schedule (0 = least noisy), and ``abar_t`` is the cumulative
product of ``1 - beta`` up to and including step ``t``.

Precision: the schedules are computed in float64 with numpy.  Per step values
are looked up in float32 copies kept on the device of ``t`` (built once per
device), which gives the very same numbers as gathering the float64 value and
casting it afterwards.  Nothing on the training path leaves the device.
"""

import enum
import math

import numpy as np
import torch

from ..runtime.errors import UserError
from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import mean_flat
from ..runtime.progress import progress as progress_bar

_LN2 = math.log(2.0)


# --------------------------------------------------------------------------
# Beta schedules
# --------------------------------------------------------------------------


def _linear_schedule(num_diffusion_timesteps):
    # Ho et al.'s 1e-4 .. 0.02 over 1000 steps, stretched for other lengths so
    # that the total amount of noise stays comparable.
    scale = 1000 / num_diffusion_timesteps
    first, last = scale * 0.0001, scale * 0.02
    return np.linspace(first, last, num_diffusion_timesteps, dtype=np.float64)


def _cosine_alpha_bar(progress):
    """abar as a function of progress in [0, 1] (Nichol & Dhariwal, offset s=0.008)."""
    angle = (progress + 0.008) / 1.008 * math.pi / 2
    return math.cos(angle) ** 2


def _cosine_schedule(num_diffusion_timesteps):
    return betas_for_alpha_bar(num_diffusion_timesteps, _cosine_alpha_bar)


BETA_SCHEDULES = {"linear": _linear_schedule, "cosine": _cosine_schedule}


def get_named_beta_schedule(
    schedule_name, num_diffusion_timesteps
):
    """The float64 betas, shape ``(num_diffusion_timesteps,)``, of a named schedule.

    Known names are the keys of ``BETA_SCHEDULES`` ("linear", "cosine"); the
    linear schedule is scaled by ``1000 / num_diffusion_timesteps``.
    """
    make = BETA_SCHEDULES.get(schedule_name)
    if make is None:
        valid = ", ".join(BETA_SCHEDULES)
        raise UserError(f"unknown noise_schedule {schedule_name!r} (valid: {valid})")
    if not isinstance(num_diffusion_timesteps, (int, np.integer)) or num_diffusion_timesteps < 1:
        raise UserError(
            f"diffusion steps must be a positive integer, got {num_diffusion_timesteps!r}"
        )
    if schedule_name == "linear" and num_diffusion_timesteps <= 20:
        # Its last beta is 20 / steps: 1 or more leaves no signal at all.
        raise UserError(
            f"the linear noise_schedule needs more than 20 diffusion steps, got {num_diffusion_timesteps}"
        )
    return make(int(num_diffusion_timesteps))


def betas_for_alpha_bar(
    num_diffusion_timesteps, alpha_bar, max_beta=0.999
):
    """Discretise a continuous ``alpha_bar(progress)`` into betas.

    Step ``i`` covers progress ``[i/T, (i+1)/T]`` and gets
    ``beta_i = 1 - alpha_bar(end) / alpha_bar(start)``, capped at ``max_beta``
    (the cap keeps the last steps from being pure noise with beta = 1).
    """
    steps = num_diffusion_timesteps
    betas = [
        min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta)
        for i in range(steps)
    ]
    return np.array(betas)


# --------------------------------------------------------------------------
# What the model predicts and how it is trained
# --------------------------------------------------------------------------


class ModelMeanType(enum.Enum):
    """The quantity the network's (first half of the) output stands for."""

    PREVIOUS_X = enum.auto()  # the posterior mean of x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise that was added


class ModelVarType(enum.Enum):
    """Where the variance of p(x_{t-1} | x_t) comes from.

    LEARNED_RANGE reads a second half of the output, v in [-1, 1], and
    interpolates the log-variance between the posterior's (v = -1) and beta_t
    (v = 1). LEARNED reads the log-variance directly.
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()  # the posterior variance beta~_t
    FIXED_LARGE = enum.auto()  # beta_t (with beta~_1 at the first step)
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # plain MSE; the VB term is added when variances are learned
    RESCALED_MSE = enum.auto()  # the same, the VB term scaled as in the original runs
    KL = enum.auto()  # the variational bound
    RESCALED_KL = enum.auto()  # the bound times the number of steps (as the MSE scale)

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


# --------------------------------------------------------------------------
# Schedule tables
# --------------------------------------------------------------------------


def schedule_tables(betas):
    """Every per-step quantity the process needs, as float64 arrays of shape (T,).

    The names are guided-diffusion's attribute names, plus derived tables that
    the original built on the fly (``log_betas``, ``one_minus_alphas_cumprod``,
    ``xprev_*`` for inverting the posterior mean, ``fixed_large_*``).
    """
    alphas = 1.0 - betas
    abar = np.cumprod(alphas, axis=0)
    abar_prev = np.append(1.0, abar[:-1])
    tab = {
        "betas": betas,
        "log_betas": np.log(betas),
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "alphas_cumprod_next": np.append(abar[1:], 0.0),
        "sqrt_alphas_cumprod": np.sqrt(abar),
        "one_minus_alphas_cumprod": 1.0 - abar,
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
        "log_one_minus_alphas_cumprod": np.log(1.0 - abar),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1),
    }
    # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, posterior_variance)
    posterior_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    tab["posterior_variance"] = posterior_var
    # The variance is 0 at t = 0; its log is clipped by reusing step 1's value.
    tab["posterior_log_variance_clipped"] = np.log(np.append(posterior_var[1], posterior_var[1:]))
    coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
    coef2 = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)
    tab["posterior_mean_coef1"] = coef1
    tab["posterior_mean_coef2"] = coef2
    tab["xprev_recip_coef1"] = 1.0 / coef1
    tab["xprev_coef2_over_coef1"] = coef2 / coef1
    # FIXED_LARGE uses beta_t, except at t = 0 where the posterior's step-1
    # variance gives a better decoder likelihood.
    large = np.append(posterior_var[1], betas[1:])
    tab["fixed_large_variance"] = large
    tab["fixed_large_log_variance"] = np.log(large)
    return tab


class _DeviceTables:
    """float32 torch copies of ``schedule_tables`` output, one set per device."""

    def __init__(self, tables):
        self._host = tables
        self._by_device = {}

    def on(self, device):
        cached = self._by_device.get(device)
        if cached is None:
            cached = {
                name: torch.from_numpy(values).to(device=device, dtype=torch.float32)
                for name, values in self._host.items()
            }
            self._by_device[device] = cached
        return cached


def _per_sample(values, ndim):
    """(N,) -> (N, 1, ..., 1) with ``ndim`` dimensions, for broadcasting over x."""
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


def _nonzero_step_mask(t, ndim):
    """1.0 where t != 0 else 0.0, shape (N, 1, ..., 1): the last step adds no noise."""
    return _per_sample((t != 0).float(), ndim)


# --------------------------------------------------------------------------
# Pure maths on gathered coefficients (all broadcast over x's shape)
# --------------------------------------------------------------------------


def learned_range_log_variance(var_output, min_log, max_log):
    """Log-variance from a [-1, 1] model output interpolating min_log..max_log."""
    frac = (var_output + 1) / 2
    return frac * max_log + (1 - frac) * min_log


def gaussian_step(mean, log_variance, noise, mask):
    """mean + mask * std * noise: one ancestral sampling step."""
    return mean + mask * torch.exp(0.5 * log_variance) * noise


def ddim_sigma(eta, abar, abar_prev):
    """DDIM's sigma_t (eq. 16 of Song et al.): eta = 0 is the deterministic ODE."""
    return eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)


def ddim_mean(pred_xstart, eps, abar_target, sigma=0.0):
    """sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps: DDIM's eq. 12 without noise."""
    direction = torch.sqrt(1 - abar_target - sigma**2) * eps
    return pred_xstart * torch.sqrt(abar_target) + direction


def _frozen_mean(model_output, channels):
    """Detach the mean half of a learned-variance output, keep the variance half."""
    mean_part, var_part = torch.split(model_output, channels, dim=1)
    return torch.cat([mean_part.detach(), var_part], dim=1)


def _default_device(model, noise, device):
    if device is not None:
        return device
    params = getattr(model, "parameters", None)
    if callable(params):
        first = next(iter(params()), None)
        if first is not None:
            return first.device
    if noise is not None:
        return noise.device
    return torch.device("cpu")


# --------------------------------------------------------------------------
# The process
# --------------------------------------------------------------------------


class GaussianDiffusion:
    """Training and sampling for a diffusion with the given betas.

    :param betas: 1-D float64 array of per-step betas, each in (0, 1].
    :param model_mean_type: a :class:`ModelMeanType`.
    :param model_var_type: a :class:`ModelVarType`.
    :param loss_type: a :class:`LossType`.
    :param rescale_timesteps: give the model ``t * 1000 / T`` as floats, so
        that a model sees the same range of timesteps whatever T is.

    The float64 numpy schedules are available under the original attribute
    names (``betas``, ``alphas_cumprod``, ``posterior_variance``, ...).
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type, rescale_timesteps=False):
        self.model_mean_type, self.model_var_type = model_mean_type, model_var_type
        self.loss_type, self.rescale_timesteps = loss_type, rescale_timesteps

        betas = np.array(betas, np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("every beta must lie in (0, 1]")
        self.num_timesteps = len(betas)

        tables = schedule_tables(betas)
        for name in (
            "betas",
            "alphas_cumprod",
            "alphas_cumprod_prev",
            "alphas_cumprod_next",
            "sqrt_alphas_cumprod",
            "sqrt_one_minus_alphas_cumprod",
            "log_one_minus_alphas_cumprod",
            "sqrt_recip_alphas_cumprod",
            "sqrt_recipm1_alphas_cumprod",
            "posterior_variance",
            "posterior_log_variance_clipped",
            "posterior_mean_coef1",
            "posterior_mean_coef2",
        ):
            setattr(self, name, tables[name])
        self._tables = _DeviceTables(tables)

    # -- lookups ----------------------------------------------------------

    def _coef(self, name, t, ndim):
        """Table ``name`` at steps ``t``, as float32 of shape (N, 1, ..., 1)."""
        return _per_sample(self._tables.on(t.device)[name][t], ndim)

    def _coef_full(self, name, t, shape):
        """Table ``name`` at steps ``t``, expanded to ``shape``."""
        return self._coef(name, t, len(shape)).expand(*shape)

    def _scale_timesteps(self, t):
        """The timesteps the model (and cond_fn) receive for schedule indices ``t``."""
        if self.rescale_timesteps:
            per_step = 1000.0 / self.num_timesteps
            return t.float() * per_step
        return t

    def _run_model(self, model, x, t, model_kwargs):
        return model(x, self._scale_timesteps(t), **(model_kwargs or {}))

    # -- forward process --------------------------------------------------

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0); each shaped like x_start."""
        shape, ndim = x_start.shape, x_start.dim()
        mean = self._coef("sqrt_alphas_cumprod", t, ndim) * x_start
        variance = self._coef_full("one_minus_alphas_cumprod", t, shape)
        log_variance = self._coef_full("log_one_minus_alphas_cumprod", t, shape)
        return mean, variance, log_variance

    def q_sample(
        self, x_start, t, noise=None
    ):
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

        ``noise`` (shaped like x_start) replaces the standard normal draw.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise {tuple(noise.shape)} does not match x_start {tuple(x_start.shape)}")
        ndim = x_start.dim()
        signal = self._coef("sqrt_alphas_cumprod", t, ndim) * x_start
        return signal + self._coef("sqrt_one_minus_alphas_cumprod", t, ndim) * noise

    def q_posterior_mean_variance(
        self, x_start, x_t, t
    ):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0).

        All three have x_t's shape.
        """
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start {tuple(x_start.shape)} and x_t {tuple(x_t.shape)} differ")
        shape, ndim = x_t.shape, x_t.dim()
        from_start = self._coef("posterior_mean_coef1", t, ndim) * x_start
        mean = from_start + self._coef("posterior_mean_coef2", t, ndim) * x_t
        variance = self._coef_full("posterior_variance", t, shape)
        log_variance = self._coef_full("posterior_log_variance_clipped", t, shape)
        return mean, variance, log_variance

    # -- conversions between parameterisations ------------------------------

    def _predict_xstart_from_eps(
        self, x_t, t, eps
    ):
        """x_0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps."""
        ndim = x_t.dim()
        scaled_x = self._coef("sqrt_recip_alphas_cumprod", t, ndim) * x_t
        return scaled_x - self._coef("sqrt_recipm1_alphas_cumprod", t, ndim) * eps

    def _predict_xstart_from_xprev(
        self, x_t, t, xprev
    ):
        """Invert the posterior mean: x_0 = (x_{t-1} - coef2 x_t) / coef1."""
        ndim = x_t.dim()
        scaled_prev = self._coef("xprev_recip_coef1", t, ndim) * xprev
        return scaled_prev - self._coef("xprev_coef2_over_coef1", t, ndim) * x_t

    def _predict_eps_from_xstart(
        self, x_t, t, pred_xstart
    ):
        """eps = (sqrt(1/abar) x_t - x_0) / sqrt(1/abar - 1)."""
        ndim = x_t.dim()
        numerator = self._coef("sqrt_recip_alphas_cumprod", t, ndim) * x_t - pred_xstart
        return numerator / self._coef("sqrt_recipm1_alphas_cumprod", t, ndim)

    # -- reverse process ----------------------------------------------------

    def _output_variance(self, var_output, x, t):
        """(variance, log_variance) of p(x_{t-1} | x_t), both shaped like x.

        ``var_output`` is the variance half of the model output, or None for
        the fixed variance types.
        """
        kind = self.model_var_type
        if kind == ModelVarType.LEARNED:
            return torch.exp(var_output), var_output
        if kind == ModelVarType.LEARNED_RANGE:
            ndim = x.dim()
            log_var = learned_range_log_variance(
                var_output,
                self._coef("posterior_log_variance_clipped", t, ndim),
                self._coef("log_betas", t, ndim),
            )
            return torch.exp(log_var), log_var
        if kind == ModelVarType.FIXED_LARGE:
            names = ("fixed_large_variance", "fixed_large_log_variance")
        elif kind == ModelVarType.FIXED_SMALL:
            names = ("posterior_variance", "posterior_log_variance_clipped")
        else:
            raise NotImplementedError(kind)
        return tuple(self._coef_full(name, t, x.shape) for name in names)

    def _interpret_output(self, model_output, x, t, clip_denoised=True, denoised_fn=None):
        """Turn raw model output at (x, t) into p(x_{t-1} | x_t) and an x_0 estimate.

        Returns the dict of :meth:`p_mean_variance`.
        """
        n, channels = x.shape[:2]
        if t.shape != (n,):
            raise ValueError(f"t must have shape ({n},), got {tuple(t.shape)}")
        var_output = None
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            expected = (n, channels * 2, *x.shape[2:])
            if model_output.shape != expected:
                raise ValueError(
                    f"a learned-variance model must output {expected}, got {tuple(model_output.shape)}"
                )
            model_output, var_output = torch.split(model_output, channels, dim=1)
        variance, log_variance = self._output_variance(var_output, x, t)

        def finish(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        kind = self.model_mean_type
        if kind == ModelMeanType.PREVIOUS_X:
            pred_xstart = finish(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output))
            mean = model_output
        elif kind == ModelMeanType.START_X:
            pred_xstart = finish(model_output)
            mean = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)[0]
        elif kind == ModelMeanType.EPSILON:
            pred_xstart = finish(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
            mean = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)[0]
        else:
            raise NotImplementedError(kind)
        if not (mean.shape == log_variance.shape == pred_xstart.shape == x.shape):
            raise ValueError(f"model output of shape {tuple(model_output.shape)} does not fit x {tuple(x.shape)}")
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Run the model at (x_t, t) and describe p(x_{t-1} | x_t).

        :param model: called as ``model(x, timesteps, **model_kwargs)``.
        :param clip_denoised: clamp the x_0 estimate to [-1, 1].
        :param denoised_fn: applied to the x_0 estimate before clamping.
        :return: dict with ``mean``, ``variance``, ``log_variance`` and
            ``pred_xstart``, each shaped like x.
        """
        output = self._run_model(model, x, t, model_kwargs)
        return self._interpret_output(output, x, t, clip_denoised, denoised_fn)

    # -- guidance -----------------------------------------------------------

    def condition_mean(
        self, cond_fn, p_mean_var, x, t, model_kwargs=None
    ):
        """Shift the mean by variance * grad log p(y | x_t) (Sohl-Dickstein et al.).

        ``cond_fn(x, timesteps, **model_kwargs)`` returns that gradient.
        """
        gradient = self._run_model(cond_fn, x, t, model_kwargs)
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(
        self, cond_fn, p_mean_var, x, t, model_kwargs=None
    ):
        """``p_mean_var`` with the score shifted by cond_fn's gradient (Song et al.).

        eps' = eps - sqrt(1 - abar_t) * grad; x_0 and the mean follow from eps'.
        """
        abar = self._coef("alphas_cumprod", t, x.dim())
        start = p_mean_var["pred_xstart"]
        eps = self._predict_eps_from_xstart(x, t, start)
        gradient = self._run_model(cond_fn, x, t, model_kwargs)
        eps = eps - (1 - abar).sqrt() * gradient

        shifted = dict(p_mean_var)
        shifted["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        shifted["mean"] = self.q_posterior_mean_variance(x_start=shifted["pred_xstart"], x_t=x, t=t)[0]
        return shifted

    # -- ancestral sampling -------------------------------------------------

    def p_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        *,
        noise=None,
    ):
        """One ancestral step x_t -> x_{t-1}.

        ``noise`` (shaped like x), when given, is used instead of a fresh
        ``torch.randn_like(x)`` draw.  Returns ``{"sample", "pred_xstart"}``.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if noise is None:
            noise = torch.randn_like(x)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        mask = _nonzero_step_mask(t, x.dim())
        sample = gaussian_step(out["mean"], out["log_variance"], noise, mask)
        return {"pred_xstart": out["pred_xstart"], "sample": sample}

    def _loop(self, step, model, shape, noise, device, progress, **step_kwargs):
        """Yield ``step(model, x, t, **step_kwargs)`` for t = T-1 .. 0, feeding samples back."""
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape must be a tuple or list, got {type(shape).__name__}")
        device = _default_device(model, noise, device)
        img = noise if noise is not None else torch.randn(*shape, device=device)
        steps = range(self.num_timesteps - 1, -1, -1)
        if progress:
            steps = progress_bar(steps, desc="denoising", unit="step")
        for i in steps:
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = step(model, img, t, **step_kwargs)
                yield out
                img = out["sample"]

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
    ):
        """Generator over :meth:`p_sample` outputs from t = T-1 down to 0.

        ``noise`` is the starting x_T (else drawn on ``device``, which defaults
        to the model's parameters' device).
        """
        yield from self._loop(
            self.p_sample, model, shape, noise, device, progress,
            clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs,
        )

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
    ):
        """Ancestral sampling; returns the final x_0 batch of shape ``shape``."""
        final = None
        for final in self.p_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress,
        ):
            pass
        return final["sample"]

    # -- DDIM ---------------------------------------------------------------

    def ddim_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        eta=0.0,
        *,
        noise=None,
    ):
        """One DDIM step x_t -> x_{t-1}; ``eta`` scales the injected noise.

        eps is re-derived from the x_0 estimate, so every mean type works.
        ``noise`` (shaped like x), when given, replaces the fresh draw.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs)
        pred_xstart = out["pred_xstart"]
        eps = self._predict_eps_from_xstart(x, t, pred_xstart)

        ndim = x.dim()
        abar = self._coef("alphas_cumprod", t, ndim)
        abar_prev = self._coef("alphas_cumprod_prev", t, ndim)
        sigma = ddim_sigma(eta, abar, abar_prev)
        if noise is None:
            noise = torch.randn_like(x)
        mean = ddim_mean(pred_xstart, eps, abar_prev, sigma)
        sample = mean + _nonzero_step_mask(t, ndim) * sigma * noise
        return {"sample": sample, "pred_xstart": pred_xstart}

    def ddim_reverse_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        eta=0.0,
    ):
        """One deterministic DDIM step the other way, x_t -> x_{t+1} (eta must be 0)."""
        if eta != 0.0:
            raise ValueError("the reverse DDIM ODE is deterministic: eta must be 0")
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        pred_xstart = out["pred_xstart"]
        eps = self._predict_eps_from_xstart(x, t, pred_xstart)
        abar_next = self._coef("alphas_cumprod_next", t, x.dim())
        return {"sample": ddim_mean(pred_xstart, eps, abar_next), "pred_xstart": pred_xstart}

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
    ):
        """Generator over :meth:`ddim_sample` outputs from t = T-1 down to 0."""
        yield from self._loop(
            self.ddim_sample, model, shape, noise, device, progress,
            clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta,
        )

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
    ):
        """DDIM sampling; returns the final x_0 batch of shape ``shape``."""
        final = None
        for final in self.ddim_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress, eta=eta,
        ):
            pass
        return final["sample"]

    # -- variational bound --------------------------------------------------

    def _vb_from_output(self, model_output, x_start, x_t, t, clip_denoised):
        """The VB term in bits per dimension for a given model output, shape (N,).

        KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and the discretised
        decoder NLL of x_0 at t = 0.  Also returns the x_0 estimate.
        """
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self._interpret_output(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])
        kl_bits = mean_flat(kl) / _LN2
        half_log_var = 0.5 * out["log_variance"]
        log_lik = discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=half_log_var)
        nll_bits = mean_flat(-log_lik) / _LN2
        return torch.where(t == 0, nll_bits, kl_bits), out["pred_xstart"]

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """Run the model and return ``{"output": VB term (N,), "pred_xstart"}``."""
        output = self._run_model(model, x_t, t, model_kwargs)
        vb, pred_xstart = self._vb_from_output(output, x_start, x_t, t, clip_denoised)
        return {"output": vb, "pred_xstart": pred_xstart}

    def training_losses(
        self, model, x_start, t, model_kwargs=None, noise=None
    ):
        """Per-sample training losses at steps ``t``, each of shape (N,).

        Keys: ``loss`` always; with MSE losses also ``mse``, and ``vb`` when
        the variance is learned (the VB term sees the mean output detached,
        so it trains only the variance; RESCALED_MSE scales it by T/1000).
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        output = self._run_model(model, x_t, t, model_kwargs)

        if self.loss_type in (LossType.KL, LossType.RESCALED_KL):
            vb, _ = self._vb_from_output(output, x_start, x_t, t, clip_denoised=False)
            scale = self.num_timesteps if self.loss_type == LossType.RESCALED_KL else 1
            return {"loss": vb * scale}
        if self.loss_type not in (LossType.MSE, LossType.RESCALED_MSE):
            raise NotImplementedError(f"loss type {self.loss_type}")

        terms = {}
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            channels = x_t.shape[1]
            expected = (x_t.shape[0], channels * 2, *x_t.shape[2:])
            if output.shape != expected:
                raise ValueError(
                    f"a learned-variance model must output {expected}, got {tuple(output.shape)}"
                )
            vb, _ = self._vb_from_output(_frozen_mean(output, channels), x_start, x_t, t, clip_denoised=False)
            if self.loss_type is LossType.RESCALED_MSE:
                # The VB term was once summed rather than averaged over the
                # 1000 steps; T/1000 keeps the original balance with the MSE.
                vb = vb * (self.num_timesteps / 1000.0)
            terms["vb"] = vb
            output = output[:, :channels]

        target = self._mse_target(x_start, x_t, t, noise)
        if not (output.shape == target.shape == x_start.shape):
            raise ValueError(f"model output {tuple(output.shape)} does not match x_start {tuple(x_start.shape)}")
        terms["mse"] = mean_flat((target - output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _mse_target(self, x_start, x_t, t, noise):
        kind = self.model_mean_type
        if kind == ModelMeanType.EPSILON:
            return noise
        if kind == ModelMeanType.START_X:
            return x_start
        if kind == ModelMeanType.PREVIOUS_X:
            return self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
        raise NotImplementedError(kind)

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, shape (N,).

        Not trainable; it only depends on the schedule's final noise level.
        """
        last = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        mean, _, log_var = self.q_mean_variance(x_start, last)
        return mean_flat(normal_kl(mean1=mean, logvar1=log_var, mean2=0.0, logvar2=0.0)) / _LN2

    def calc_bpd_loop(
        self, model, x_start, clip_denoised=True, model_kwargs=None
    ):
        """The full variational bound of ``x_start``, one model call per step.

        :return: dict with ``total_bpd`` and ``prior_bpd`` of shape (N,), and
            ``vb``, ``xstart_mse``, ``mse`` (eps error) of shape (N, T).  As in
            guided-diffusion the columns run from step T-1 (column 0) down to
            step 0 (column T-1).
        """
        n = x_start.shape[0]
        vb, xstart_mse, eps_mse = [], [], []
        for step in range(self.num_timesteps - 1, -1, -1):
            t = torch.full((n,), step, device=x_start.device, dtype=torch.long)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(
                    model, x_start=x_start, x_t=x_t, t=t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
                )
            vb.append(out["output"])
            pred_xstart = out["pred_xstart"]
            xstart_mse.append(mean_flat((pred_xstart - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, pred_xstart)
            eps_mse.append(mean_flat((eps - noise) ** 2))

        vb = torch.stack(vb, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(eps_mse, dim=1),
        }


def _extract_into_tensor(
    arr, timesteps, broadcast_shape
):
    """Compatibility helper: numpy ``arr`` at ``timesteps`` as float32 of ``broadcast_shape``."""
    values = torch.from_numpy(np.asarray(arr)).to(device=timesteps.device)[timesteps].float()
    return _per_sample(values, len(broadcast_shape)).expand(*broadcast_shape)
