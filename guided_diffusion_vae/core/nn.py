"""Small neural-network helpers shared by the UNet, the diffusion code and training.

Behaviour follows openai/guided-diffusion's ``nn`` module (same names, same
numbers); the implementations favour fused/foreach kernels and avoid
host-device synchronisation so that they stay cheap on a GPU and trace cleanly
under ``torch.compile``.
"""

import contextlib
import functools
import math
import warnings

import torch
import torch.nn as nn
import torch.utils.checkpoint as torch_checkpoint

_AVG_POOL_BY_DIMS = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


class SiLU(nn.SiLU):
    """Alias kept for code written against the original module (``nn.SiLU`` is built in)."""


def _norm_act_math(x, weight, bias, groups, eps, scale, shift, act):
    # The original's order: statistics in float32, the rest in x's dtype.
    h = torch.nn.functional.group_norm(x.float(), groups, weight, bias, eps).to(x.dtype)
    if scale is not None:
        h = h * (1 + scale) + shift
    return torch.nn.functional.silu(h) if act else h


# How norm_act runs (set_fused_norm). "compile": torch.compile of the eager
# function with dynamic=True, one compile per call kind (with or without
# scale-shift, with or without SiLU) whatever the shapes, where compiling the
# whole UNet takes minutes. "triton": core/triton_norm's hand-written kernels.
_FUSED = {"enabled": None, "kernels": "triton", "fn": None}
FUSED_KERNELS = ("triton", "compile")


def set_fused_norm(enabled, kernels="triton"):
    """How :func:`norm_act` runs. ``enabled``: None (the default) fused on
    CUDA where Triton is installed, eagerly elsewhere; False as separate eager
    ops; True fused on every device (Triton's kernels on the CPU only through
    its interpreter, ``TRITON_INTERPRET=1``). ``kernels``: "triton", two
    hand-written kernels (:mod:`.triton_norm`), or "compile", the eager ops
    compiled by ``torch.compile``. The Triton default trained latent16 at
    10,880 img/s against 8,039 eagerly on an H200, with the same loss curve
    (docs/BENCHMARKS.md)."""
    if kernels not in FUSED_KERNELS:
        raise ValueError(f"fused norm kernels must be one of {FUSED_KERNELS}, got {kernels!r}")
    _FUSED["enabled"] = enabled
    _FUSED["kernels"] = kernels


@contextlib.contextmanager
def fused_norm(enabled, kernels="triton"):
    """:func:`set_fused_norm` for a ``with`` block, restored after it."""
    before = (_FUSED["enabled"], _FUSED["kernels"])
    set_fused_norm(enabled, kernels)
    try:
        yield
    finally:
        set_fused_norm(*before)


def _fused_norm_usable(x):
    if torch.compiler.is_compiling():  # inside a compiled model: traced as plain ops
        return False
    wanted = _FUSED["enabled"]
    if wanted is None:
        return x.is_cuda and _triton_installed()
    return wanted


@functools.lru_cache(maxsize=None)
def _triton_installed():
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _per_channel(values, like):
    """(C,) -> (1, C, 1, ...): broadcast over ``like``'s (N, C, ...)."""
    return values.reshape(1, -1, *([1] * (like.dim() - 2)))


def norm_act(norm, x, scale=None, shift=None, act=True, input_bias=None):
    """``silu(norm(x) * (1 + scale) + shift)``, statistics in float32, in x's dtype.

    norm: a :class:`GroupNorm32`; x: (N, C, ...); scale, shift: (N, C, 1, ...)
    or None (no modulation); act: apply SiLU. Fused (:func:`set_fused_norm`),
    this is one pass over x instead of six (upcast, normalise, downcast,
    scale, shift, SiLU). input_bias: (C,) or None, added to x first (the
    bias of the convolution that made x, which :func:`folds_conv_bias` says
    to fold in); the sum is x's dtype, as the convolution's own add makes it.
    """
    if input_bias is not None:
        input_bias = input_bias.to(x.dtype)
        if folds_conv_bias(x):
            from . import triton_norm

            if triton_norm.supported(x, norm, scale, shift):
                return _norm_act_folded(norm, x, scale, shift, act, input_bias)
        x = x + _per_channel(input_bias, x)
    args = (x, norm.weight, norm.bias, norm.num_groups, norm.eps, scale, shift, act)
    if not _fused_norm_usable(x):
        return _norm_act_math(*args)
    if _FUSED["kernels"] == "triton":
        from . import triton_norm

        if not triton_norm.supported(x, norm, scale, shift):
            return _norm_act_math(*args)
        if triton_norm.recording():  # triton_norm.build_ahead: note the launch, compute eagerly
            triton_norm.record(x, norm, scale, shift, act)
            return _norm_act_math(*args)
        return _fused_or_eager(triton_norm.group_norm_act, (x, norm, scale, shift, act),
                               lambda: _norm_act_math(*args))
    if _FUSED["fn"] is None:
        _FUSED["fn"] = torch.compile(_norm_act_math, dynamic=True, fullgraph=True)
    return _fused_or_eager(_FUSED["fn"], args, lambda: _norm_act_math(*args))


def _norm_act_folded(norm, x, scale, shift, act, input_bias):
    """:func:`norm_act` of x + input_bias, the add done by the Triton kernel
    as it reads x (recorded instead while the kernels are built ahead)."""
    from . import triton_norm

    def eager():
        return _norm_act_math(x + _per_channel(input_bias, x), norm.weight, norm.bias, norm.num_groups, norm.eps,
                              scale, shift, act)
    if triton_norm.recording():
        triton_norm.record(x, norm, scale, shift, act, input_bias)
        return eager()
    return _fused_or_eager(triton_norm.group_norm_act, (x, norm, scale, shift, act, input_bias), eager)


def _fused_or_eager(fused, args, eager):
    """``fused(*args)``; if it fails to build, say so once and from then on
    run the eager ops (the same arithmetic) unless the fused kernels were
    forced on."""
    try:
        return fused(*args)
    except Exception as err:  # a broken Triton or compiler
        if _FUSED["enabled"] is True:
            raise
        warnings.warn(f"fused GroupNorm+SiLU kernels failed to build ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}); running them as separate ops "
                      "(slower; the same arithmetic)")
        _FUSED["enabled"] = False
    return eager()


def folds_conv_bias(x):
    """Whether a convolution whose output is x should leave its bias to what
    follows (:func:`norm_act`'s ``input_bias``, :func:`biased_residual`):
    where the Triton kernels run and no gradient is taken (the folded
    kernels have no backward pass), which saves a read and a write of x. The
    numbers are the same either way."""
    return not torch.is_grad_enabled() and _triton_runs_for(x)


def conv_without_bias(conv, x):
    """``conv(x)`` without its bias (folded elsewhere: :func:`folds_conv_bias`)."""
    return conv._conv_forward(x, conv.weight, None)


def biased_residual(skip, h, bias):
    """``skip + (h + bias)``: the residual add after a convolution whose bias
    (C,) was left out (:func:`folds_conv_bias`), in one Triton pass where it
    runs; rounded as the convolution's own add and then the residual add
    would round."""
    bias = bias.to(h.dtype)
    if folds_conv_bias(h):
        from . import triton_norm

        if triton_norm.residual_supported(skip, h, bias):
            if triton_norm.recording():
                triton_norm.record_residual(skip, h, bias)
            else:
                return _fused_or_eager(triton_norm.biased_residual, (skip, h, bias),
                                       lambda: skip + (h + _per_channel(bias, h)))
    return skip + (h + _per_channel(bias, h))


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def bias_grad_by_product(x):
    """Whether a 2-D convolution of x should add its bias itself
    (:func:`add_channel_bias`): when training where the Triton kernels run,
    in a low-precision dtype (bf16/fp16 autocast or weights). There torch's
    per-convolution reductions of the bias gradients took 2.22 ms of a
    latent16 training step on an H100, one product each 0.86 ms
    (docs/BENCHMARKS.md)."""
    if not (torch.is_grad_enabled() and x.dim() == 4 and _triton_runs_for(x)):
        return False
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind) in _LOW_PRECISION
    return x.dtype in _LOW_PRECISION


class _ChannelBiasAdd(torch.autograd.Function):
    """h + bias per channel; the bias gradient is ``ones @ grad`` over the
    (N*H*W, C) view of a channels-last gradient (the same sum in float32
    accumulators, rounded once to grad's dtype, as torch's reduction)."""

    @staticmethod
    def forward(ctx, h, bias):
        ctx.bias_dtype = bias.dtype
        return h + _per_channel(bias.to(h.dtype), h)

    @staticmethod
    def backward(ctx, grad):
        grad_bias = None
        if ctx.needs_input_grad[1]:
            if grad.dtype in _LOW_PRECISION and grad.is_contiguous(memory_format=torch.channels_last):
                rows = grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1])  # a view: no copy
                grad_bias = (rows.new_ones(1, rows.shape[0]) @ rows).reshape(-1)
            else:  # float32 (a product would run in TF32 where that is on) or another layout
                grad_bias = grad.sum(dim=(0, 2, 3))
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad, grad_bias


def add_channel_bias(h, bias):
    """``h + bias`` for h (N, C, H, W) and bias (C,), added in h's dtype as a
    convolution's own bias add is; see :class:`_ChannelBiasAdd` for the gradient."""
    return _ChannelBiasAdd.apply(h, bias)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same numbers) that adds its own bias
    where :func:`bias_grad_by_product` says so; :func:`conv_nd` builds it."""

    def forward(self, x):
        if self.bias is not None and bias_grad_by_product(x):
            return add_channel_bias(self._conv_forward(x, self.weight, None), self.bias)
        return super().forward(x)


_CONV_BY_DIMS = {1: nn.Conv1d, 2: Conv2d, 3: nn.Conv3d}


def _triton_runs_for(x):
    """Whether norm_act runs the hand-written Triton kernels for tensors like x."""
    return _FUSED["kernels"] == "triton" and _fused_norm_usable(x)


def _triton_norms_run_on(device):
    """Whether norm_act runs the hand-written Triton kernels for tensors on ``device``."""
    return _triton_runs_for(torch.empty(0, device=device))


def build_norm_kernels_ahead(forward, device, backward=True):
    """Build the fused-norm kernels that ``forward()`` meets (and with
    ``backward`` those of its backward pass) all at once, in threads, where
    they run on ``device``, instead of one by one during the first step.
    ``forward`` runs once, its norms computed eagerly, with gradients on only
    for ``backward`` (a pass without them folds convolution biases:
    :func:`folds_conv_bias`): give it a batch of one or two. Returns
    ``(kernels, seconds)``, or None where the kernels do not run or the build
    failed (a warning says why; the first launch then builds them, or falls
    back to the eager ops)."""
    if not _triton_norms_run_on(device):
        return None
    from . import triton_norm

    device = torch.device(device)
    try:
        # fork_rng: a dropout in forward() must not move the run's random stream.
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        with torch.set_grad_enabled(backward), rng:
            return triton_norm.build_ahead(forward, device, backward=backward)
    except Exception as err:  # only a head start is lost: the first launch builds (or says why not)
        if _FUSED["enabled"] is True:
            raise
        warnings.warn(f"building the fused GroupNorm+SiLU kernels ahead failed ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}); the first step builds them instead")
        return None


# Whether convolution weights are stored channels-last (set_channels_last):
# None follows the fused norms, which read either layout.
_CHANNELS_LAST = {"enabled": None}


def set_channels_last(enabled):
    """How :func:`to_fast_layout` stores a model. None (the default):
    channels-last wherever the fused norms run (a CUDA tensor with Triton
    installed), since only they are fast in that layout (the eager GroupNorm
    is not: docs/BENCHMARKS.md); True: always; False: never."""
    _CHANNELS_LAST["enabled"] = enabled


@contextlib.contextmanager
def channels_last(enabled):
    """:func:`set_channels_last` for a ``with`` block, restored after it."""
    before = _CHANNELS_LAST["enabled"]
    set_channels_last(enabled)
    try:
        yield
    finally:
        set_channels_last(before)


def to_fast_layout(model, device):
    """Store ``model``'s 4-D weights channels-last when :func:`set_channels_last`
    says so for ``device``; returns ``model``. The activations then follow:
    a convolution with a channels-last weight gives a channels-last result,
    and every later op keeps it, so inputs need no change. cuDNN then skips
    the NCHW<->NHWC conversions it otherwise runs around each convolution.
    Saved weights are unaffected (they are written contiguous)."""
    wanted = _CHANNELS_LAST["enabled"]
    if wanted is None:
        wanted = _triton_norms_run_on(device)
    return model.to(memory_format=torch.channels_last) if wanted else model


# The layers whose weights autocast casts to its low-precision dtype.
_AUTOCAST_LOW_PRECISION_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@contextlib.contextmanager
def weights_cast_for_autocast(modules, dtype):
    """Hold the convolution and linear float32 weights of ``modules`` in
    ``dtype`` (the running autocast's) for a ``with`` block, restored exactly
    after it (the very same tensors, so graphs captured on them stay valid).

    Autocast casts those weights again at every call; inside a CUDA graph, where
    its cast cache cannot be used, that was 198 cast kernels per latent16
    model call (10% of a DDIM step). The values are the ones autocast makes,
    so the results are the same bit for bit. Other parameters (norms,
    embeddings) stay float32, as autocast uses them. Inference only: the
    held copies do not train."""
    held = []
    try:
        for module in modules:
            for layer in module.modules():
                if isinstance(layer, _AUTOCAST_LOW_PRECISION_LAYERS):
                    for param in layer.parameters(recurse=False):
                        if param.dtype == torch.float32:
                            held.append((param, param.data))
                            param.data = param.data.to(dtype)
        yield
    finally:
        for param, original in held:
            param.data = original


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are always computed in float32.

    The input is upcast, normalised, and the result is returned in the input's
    dtype, so fp16/bf16 activations never accumulate mean/variance in low
    precision.
    """

    def forward(self, x):
        return norm_act(self, x, act=False)


def normalization(channels):
    """The normalisation layer used throughout the UNet: 32-group float32 GroupNorm."""
    return GroupNorm32(num_groups=32, num_channels=channels)


def _pick(table, dims, what):
    if dims not in table:
        raise ValueError(f"unsupported dimensions for {what}: {dims}")
    return table[dims]


def conv_nd(dims, *args, **kwargs):
    """A 1D, 2D or 3D convolution (``nn.Conv{dims}d``; 2D: our :class:`Conv2d`
    subclass of it) built with the given arguments."""
    return _pick(_CONV_BY_DIMS, dims, "conv_nd")(*args, **kwargs)


def linear(*args, **kwargs):
    """A plain ``nn.Linear``; kept as a function for symmetry with ``conv_nd``."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """A 1D, 2D or 3D average pooling layer (``nn.AvgPool{dims}d``)."""
    return _pick(_AVG_POOL_BY_DIMS, dims, "avg_pool_nd")(*args, **kwargs)


def zero_module(module):
    """Set every parameter of ``module`` to zero in place and return the module.

    Used on the last layer of residual branches so that each block starts as
    the identity.
    """
    with torch.no_grad():
        for param in module.parameters():
            param.zero_()
    return module


def scale_module(module, scale):
    """Multiply every parameter of ``module`` by ``scale`` in place; return the module."""
    with torch.no_grad():
        for param in module.parameters():
            param.mul_(scale)
    return module


def mean_flat(tensor):
    """Mean over every dimension except the first: (N, ...) -> (N,)."""
    return tensor.mean(dim=tuple(range(1, tensor.ndim)))


def update_ema(target_params, source_params, rate: float = 0.99):
    """Move ``target_params`` towards ``source_params`` in place.

    Each target becomes ``rate * target + (1 - rate) * source``. Done as one
    foreach ``lerp`` over all tensors: no per-tensor Python loop on the hot path
    and no host-device synchronisation.

    :param target_params: iterable of tensors updated in place (the EMA copy).
    :param source_params: iterable of tensors with the same shapes (the live weights).
    :param rate: the EMA decay, between 0 and 1.
    """
    targets = list(target_params)
    sources = list(source_params)
    if len(targets) != len(sources):
        raise ValueError(f"update_ema: {len(targets)} targets but {len(sources)} sources")
    if not targets:
        return
    weight = 1.0 - rate
    with torch.no_grad():
        targets = [t.detach() for t in targets]
        sources = [s.detach().to(t.dtype) for t, s in zip(targets, sources)]
        torch._foreach_lerp_(targets, sources, weight)


def timestep_embedding(timesteps, dim: int, max_period: float = 10000):
    """Sinusoidal embedding of (possibly fractional) timesteps.

    :param timesteps: 1-D tensor (or scalar) of N timesteps, integer or float.
    :param dim: width of the embedding.
    :param max_period: longest period of the sinusoids.
    :return: float32 tensor (N, dim): ``[cos(t * f_0..f_{h-1}), sin(t * f_0..f_{h-1})]``
        with ``h = dim // 2`` and ``f_i = max_period ** (-i / h)``; an odd ``dim``
        gets one trailing column of zeros.
    """
    t = torch.as_tensor(timesteps).reshape(-1).to(torch.float32)
    half = dim // 2
    # Same operation order as the reference so the float32 frequencies match bit for bit.
    exponents = torch.arange(half, dtype=torch.float32, device=t.device) * -math.log(max_period)
    freqs = torch.exp(exponents / half)
    angles = t[:, None] * freqs[None, :]
    parts = [torch.cos(angles), torch.sin(angles)]
    if dim % 2:
        parts.append(torch.zeros_like(angles[:, :1]))
    return torch.cat(parts, dim=-1)


def checkpoint(func, inputs, params, flag: bool):
    """Call ``func(*inputs)``, recomputing activations in backward when ``flag`` is set.

    Uses PyTorch's non-reentrant activation checkpointing, which tracks the
    parameters ``func`` uses on its own; ``params`` is accepted only for
    signature compatibility with the original code.

    :param func: the function to evaluate.
    :param inputs: sequence of positional arguments for ``func``.
    :param params: unused (the parameters ``func`` depends on).
    :param flag: if False, simply call ``func`` (no memory saving, no recompute).
    """
    del params
    if flag:
        return torch_checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
