"""Likelihood terms used by the variational bound of the diffusion process.

All functions are elementwise: they broadcast their arguments and return a
tensor of the broadcast shape, in nats.  The arithmetic is ordered exactly as
in guided-diffusion so that float32 results agree with it to the last bits
that matter (the KL term suffers from cancellation when both Gaussians are
close, so a different summation order is visible at tight tolerances).
"""

import math

import torch

# sqrt(2 / pi), the constant of the tanh approximation of the normal CDF.
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
# Half the width of one 8-bit bin once pixel values are mapped to [-1, 1].
_HALF_BIN = 1.0 / 255.0
_LOG_FLOOR = 1e-12


def _rounded_once(fn, x):
    """``fn(x)`` (tanh, exp, log) computed in float64 and rounded once to
    ``x``'s dtype: the correctly rounded value, the same on every machine.
    float32 kernels differ by an ulp between CPUs (AVX2, AVX-512, NEON) and
    libraries, and the bin probability below subtracts two CDFs near 1: one
    ulp of tanh there moved a golden case's loss by 2e3 (at t=0 the bound is
    that log-likelihood times the number of steps). MPS has no float64."""
    if x.dtype == torch.float64 or x.device.type == "mps":
        return fn(x)
    return fn(x.double()).to(x.dtype)


def _as_tensor_like(value, reference):
    """``value`` as a tensor with ``reference``'s dtype and device (no-op for tensors)."""
    if torch.is_tensor(value):
        return value
    return torch.tensor(value).to(reference)


def normal_kl(
    mean1, logvar1, mean2, logvar2
):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Any argument may be a Python number as long as one of them is a tensor;
    the log-variances are turned into tensors so that ``exp`` applies to them.
    """
    reference = next(
        (arg for arg in (mean1, logvar1, mean2, logvar2) if torch.is_tensor(arg)), None
    )
    if reference is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1 = _as_tensor_like(logvar1, reference)
    logvar2 = _as_tensor_like(logvar2, reference)

    # 0.5 * (-1 + log s2 - log s1 + s1/s2 + (m1 - m2)^2 / s2), summed left to right.
    acc = -1.0 + logvar2
    acc = acc - logvar1
    acc = acc + _rounded_once(torch.exp, logvar1 - logvar2)
    squared_gap = (mean1 - mean2) ** 2
    acc = acc + squared_gap * _rounded_once(torch.exp, -logvar2)
    return 0.5 * acc


def approx_standard_normal_cdf(x):
    """Phi(x) for the standard normal, via the tanh approximation (as used by GELU)."""
    cubic = x + 0.044715 * torch.pow(x, 3)
    return 0.5 * (1.0 + _rounded_once(torch.tanh, _SQRT_2_OVER_PI * cubic))


def discretized_gaussian_log_likelihood(
    x, *, means, log_scales
):
    """Log-probability of 8-bit data ``x`` (scaled to [-1, 1]) under a Gaussian.

    Each value owns the bin [x - 1/255, x + 1/255]; the two outermost bins
    extend to -inf and +inf.  ``x``, ``means`` and ``log_scales`` (log of the
    standard deviation) share one shape, which is also the result's.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, "
            f"log_scales {tuple(log_scales.shape)}"
        )
    offset = x - means
    precision = _rounded_once(torch.exp, -log_scales)
    upper_cdf = approx_standard_normal_cdf(precision * (offset + _HALF_BIN))
    lower_cdf = approx_standard_normal_cdf(precision * (offset - _HALF_BIN))

    log_below_upper = _rounded_once(torch.log, upper_cdf.clamp(min=_LOG_FLOOR))
    log_above_lower = _rounded_once(torch.log, (1.0 - lower_cdf).clamp(min=_LOG_FLOOR))
    log_in_bin = _rounded_once(torch.log, (upper_cdf - lower_cdf).clamp(min=_LOG_FLOOR))

    interior_or_top = torch.where(x > 0.999, log_above_lower, log_in_bin)
    return torch.where(x < -0.999, log_below_upper, interior_or_top)
