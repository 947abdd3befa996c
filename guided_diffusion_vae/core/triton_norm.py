"""GroupNorm -> scale-shift -> SiLU as two hand-written Triton kernels.

The UNet's ``norm_act`` (:mod:`.nn`) as separate ops reads and writes the
activation six times forward (upcast, normalise, downcast, scale, shift,
SiLU) and more backward. Here one program per (sample, group) reads its
group, which is one contiguous run of ``C/G * H * W`` values in an NCHW
tensor, three times (mean, variance, output) and writes it once; the
backward pass reads x and the incoming gradient twice and writes dx once.
Channels-last tensors (``nn.to_fast_layout``) get kernels of their own, in
which a program takes about 64 adjacent channels (several groups) at a
time, so that its reads stay whole memory sectors.
Arithmetic is float32 throughout, rounded once to x's dtype at the end.

Why by hand: Triton builds a kernel of this size in about a second on
first use and caches it on disk, where ``torch.compile`` of the same
function took 25 s on the CPU (a cold start counts). On an H200 the
benchmark's latent16 training built all 30 of them within its 12 s
warm-up. The kernels live in :mod:`.triton_kernels`, imported only when
one is first launched, so CPU-only installs never need Triton;
``TRITON_INTERPRET=1`` runs the kernels on the CPU (the tests do).
"""

import functools
import os

import torch

# Values a program holds in registers per tile: a (channels, positions) tile.
_TILE = 2048


# Channels a channels-last program takes: 64 bf16 values are one 128-byte
# row of memory, so every read of a row is whole sectors.
_CHANNELS_PER_PROGRAM = 64


@functools.lru_cache(maxsize=None)
def _kernels(channels_last):
    """(forward, backward) Triton kernels for one layout, imported on first use."""
    from . import triton_kernels

    if channels_last:
        return triton_kernels.forward_last, triton_kernels.backward_last
    return triton_kernels.forward, triton_kernels.backward


def interpreting():
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_power_of_2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _launch(channels, groups, positions, channels_last):
    """``(grid, constexpr and int arguments, warps)`` of one kernel launch."""
    if channels_last:
        per_group = channels // groups
        groups_per_program = max(1, min(groups, _CHANNELS_PER_PROGRAM // per_group))
        block_ch = _next_power_of_2(groups_per_program * per_group)
        block_p = max(1, min(_next_power_of_2(positions), _TILE // block_ch))
        grid = -(-groups // groups_per_program)
        shape = {"BLOCK_CH": block_ch, "BLOCK_P": block_p, "BLOCK_G": _next_power_of_2(groups_per_program)}
        extra = (groups_per_program,)
    else:
        block_c = _next_power_of_2(channels // groups)
        block_p = max(1, min(_next_power_of_2(positions), _TILE // block_c))
        grid, shape, extra = groups, {"BLOCK_C": block_c, "BLOCK_P": block_p}, ()
    values = shape["BLOCK_P"] * (shape.get("BLOCK_C") or shape["BLOCK_CH"])
    return grid, shape, extra, 4 if values <= 1024 else 8


def is_channels_last(x):
    """Whether x is (N, C, *spatial) stored channels-last ((N, *spatial, C)
    contiguous) and not also plainly contiguous (as when C or the spatial
    size is 1)."""
    return not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def supported(x, norm, scale, shift):
    """Whether the kernels take this call: a contiguous tensor of at least
    one spatial dimension, in NCHW order or channels-last, an affine norm
    whose groups divide the channels, and scale and shift both given or both
    absent. The device is :func:`nn.norm_act`'s choice."""
    return (x.dim() >= 3 and (x.is_contiguous() or is_channels_last(x)) and norm.weight is not None
            and norm.bias is not None and (scale is None) == (shift is None)
            and x.shape[1] % norm.num_groups == 0)


def _modulation(scale, shift, n, c):
    """``(scale, shift, stride_n, stride_c)``: scale and shift as (N, C) views
    with the same strides (the kernels take one pair), or Nones and zeros."""
    if scale is None:
        return None, None, 0, 0
    scale = scale.reshape(n, c)
    shift = shift.reshape(n, c)
    if scale.stride() != shift.stride():
        shift = shift.contiguous()
        scale = scale.contiguous()
    return scale, shift, scale.stride(0), scale.stride(1)


def _plan(x, groups, modulate, act):
    """``(channels_last, grid, int arguments after groups, options)`` of a
    launch on x, forward or backward alike."""
    last = is_channels_last(x)
    grid, shape, extra, warps = _launch(x.shape[1], groups, x[0, 0].numel(), last)
    return last, (x.shape[0] * grid,), extra, {**shape, "MODULATE": modulate, "ACT": bool(act), "num_warps": warps}


def _forward_launch(x, weight, bias, mod_scale, mod_shift, stride_n, stride_c, groups, eps, act, y, mean, rstd,
                    input_bias=None):
    """``(kernel, grid, args, options)`` of the forward kernel for these tensors."""
    modulate = mod_scale is not None
    last, grid, extra, options = _plan(x, groups, modulate, act)
    args = (x, weight, bias, mod_scale if modulate else weight, mod_shift if modulate else bias,
            weight if input_bias is None else input_bias, y, mean, rstd,
            x.shape[1], x[0, 0].numel(), groups, *extra, stride_n, stride_c, float(eps))
    return _kernels(last)[0], grid, args, {**options, "INPUT_BIAS": input_bias is not None}


def _backward_launch(x, dy, weight, bias, mod_scale, mod_shift, stride_n, stride_c, groups, act, mean, rstd,
                     dx, partial):
    """``(kernel, grid, args, options)`` of the backward kernel; partial: (4, N, C) float32."""
    modulate = mod_scale is not None
    last, grid, extra, options = _plan(x, groups, modulate, act)
    args = (x, dy, weight, bias, mod_scale if modulate else weight, mod_shift if modulate else bias, mean, rstd,
            dx, *partial, x.shape[1], x[0, 0].numel(), groups, *extra, stride_n, stride_c)
    return _kernels(last)[1], grid, args, options


def _run(launch):
    kernel, grid, args, options = launch
    kernel[grid](*args, **options)


def _forward(x, weight, bias, scale, shift, groups, eps, act, input_bias=None):
    """``(y, mean, rstd, modulation)`` of the forward kernel on x."""
    n, c = x.shape[:2]
    modulation = _modulation(scale, shift, n, c)
    y = torch.empty_like(x)  # keeps x's layout
    mean = torch.empty(n * groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    _run(_forward_launch(x, weight, bias, *modulation, groups, eps, act, y, mean, rstd, input_bias))
    return y, mean, rstd, modulation


class GroupNormAct(torch.autograd.Function):
    """``silu(group_norm(x) * (1 + scale) + shift)`` (scale/shift and SiLU
    optional); x: (N, C, *spatial), contiguous or channels-last; scale,
    shift: (N, C, 1, ...) or None; returns x's shape, layout and dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, groups, eps, act):
        y, mean, rstd, (mod_scale, mod_shift, stride_n, stride_c) = _forward(x, weight, bias, scale, shift, groups,
                                                                             eps, act)
        ctx.save_for_backward(x, weight, bias, mod_scale, mod_shift, mean, rstd)
        modulate = mod_scale is not None
        ctx.launch = (groups, act, stride_n, stride_c, scale.shape if modulate else None,
                      scale.dtype if modulate else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mod_scale, mod_shift, mean, rstd = ctx.saved_tensors
        groups, act, stride_n, stride_c, mod_shape, mod_dtype = ctx.launch
        n, c = x.shape[:2]
        # The kernels read dy in x's layout.
        dy = dy.movedim(1, -1).contiguous().movedim(-1, 1) if is_channels_last(x) else dy.contiguous()
        dx = torch.empty_like(x)
        partial = torch.empty((4, n, c), device=x.device, dtype=torch.float32)
        _run(_backward_launch(x, dy, weight, bias, mod_scale, mod_shift, stride_n, stride_c, groups, act,
                              mean, rstd, dx, partial))
        modulate = mod_scale is not None
        dweight = partial[0].sum(0).to(weight.dtype)
        dbias = partial[1].sum(0).to(bias.dtype)
        dscale = partial[2].to(mod_dtype).reshape(mod_shape) if modulate and ctx.needs_input_grad[3] else None
        dshift = partial[3].to(mod_dtype).reshape(mod_shape) if modulate and ctx.needs_input_grad[4] else None
        return dx, dweight, dbias, dscale, dshift, None, None, None


# ---------------------------------------------------------------------------
# Building ahead: a model's first step would build its kernels one after
# another as it meets them (about 0.4 s each on an H200, 30-40 a model);
# building them all at once, in threads, overlaps the compilers.
# ---------------------------------------------------------------------------

# While record_launches() runs: a dict of launches, and whether to note the
# backward kernels too.
_RECORDING = {"launches": None, "backward": True}


def recording():
    """Whether :func:`record_launches` is collecting launches now."""
    return _RECORDING["launches"] is not None


def record(x, norm, scale, shift, act, input_bias=None):
    """Note the forward and backward launches a fused call on ``x`` would
    make (:func:`nn.norm_act` computes the value eagerly meanwhile)."""
    n, c = x.shape[:2]
    mod_scale, mod_shift, stride_n, stride_c = _modulation(scale, shift, n, c)
    mean = torch.empty(n * norm.num_groups, device=x.device, dtype=torch.float32)
    partial = torch.empty((4, n, c), device=x.device, dtype=torch.float32)
    common = (norm.weight, norm.bias, mod_scale, mod_shift, stride_n, stride_c, norm.num_groups)
    launches = [_forward_launch(x, *common, norm.eps, act, torch.empty_like(x), mean, mean, input_bias)]
    if _RECORDING["backward"] and input_bias is None:  # a folded input bias runs without gradients
        launches.append(_backward_launch(x, torch.empty_like(x), *common, act, mean, mean, torch.empty_like(x),
                                         partial))
    _note(launches)


def _note(launches):
    for launch in launches:
        _RECORDING["launches"].setdefault(_build_key(launch), launch)


def _build_key(launch):
    """What Triton builds a kernel for: the tensors' dtypes, each integer's
    specialisation (1, a multiple of 16, other) and the options."""
    kernel, _, args, options = launch

    def kind(a):
        if isinstance(a, torch.Tensor):
            return str(a.dtype)
        if isinstance(a, int):
            return "1" if a == 1 else "16k" if a % 16 == 0 else "i"
        return type(a).__name__
    return kernel, tuple(map(kind, args)), tuple(sorted(options.items()))


def record_launches(run, backward=True):
    """The distinct kernel launches (``{key: (kernel, grid, args, options)}``)
    that ``run()`` would make through the fused norms, forward (and
    backward), found by running it with the norms computed eagerly."""
    _RECORDING["launches"], _RECORDING["backward"] = {}, backward
    try:
        run()
        return _RECORDING["launches"]
    finally:
        _RECORDING["launches"] = None


def _warm(launch, device):
    """Build one kernel without running it (Triton's ``warmup``) for CUDA
    device number ``device`` (None: the CPU)."""
    kernel, grid, args, options = launch
    if device is not None:
        torch.cuda.set_device(device)  # a new thread starts on device 0
    kernel.warmup(*args, grid=grid, **options)


def build_ahead(run, device=None, backward=True, threads=8, build=_warm):
    """Build every kernel ``run()`` would launch (and, with ``backward``, the
    kernels of its backward pass) in ``threads`` threads, so that its first
    real call finds them built. Returns ``(kernels, seconds)``. ``run`` is
    called once, with the norms computed eagerly; under Triton's interpreter
    there is nothing to build."""
    import concurrent.futures
    import time

    start = time.perf_counter()
    launches = list(record_launches(run, backward).values())
    if interpreting() and build is _warm:
        return 0, 0.0
    index = None
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(launches)))) as pool:
        for done in [pool.submit(build, launch, index) for launch in launches]:
            done.result()  # a failure surfaces here, as it would at the first launch
    return len(launches), time.perf_counter() - start


def group_norm_act(x, norm, scale=None, shift=None, act=True, input_bias=None):
    """The fused ``norm_act``: see :class:`GroupNormAct`. ``input_bias``
    ((C,), x's dtype) is added to x first; with it, no gradient flows
    (inference only: the caller checks)."""
    if input_bias is not None:
        return _forward(x, norm.weight, norm.bias, scale, shift, norm.num_groups, norm.eps, act, input_bias)[0]
    return GroupNormAct.apply(x, norm.weight, norm.bias, scale, shift, norm.num_groups, norm.eps, act)


# ---------------------------------------------------------------------------
# skip + (h + bias): a convolution's bias folded into the residual add after
# it (inference only), one pass instead of two.
# ---------------------------------------------------------------------------

_RESIDUAL_BLOCK = 1024


def residual_supported(skip, h, bias):
    """Whether :func:`biased_residual` takes these: skip and h of one shape
    and one dense layout (NCHW or channels-last), bias one value a channel."""
    if skip.shape != h.shape or skip.stride() != h.stride() or h.dim() < 3 or bias.shape != h.shape[1:2]:
        return False
    return h.is_contiguous() or is_channels_last(h)


@functools.lru_cache(maxsize=None)
def _residual_kernel():
    from . import triton_kernels

    return triton_kernels.biased_residual


def _residual_launch(skip, h, bias, out):
    """``(kernel, grid, args, options)`` of :func:`biased_residual` into ``out``."""
    total = h.numel()
    args = (skip, h, bias, out, total, h.shape[1], h[0, 0].numel())
    options = {"CHANNELS_LAST": is_channels_last(h), "BLOCK": _RESIDUAL_BLOCK, "num_warps": 4}
    return _residual_kernel(), (-(-total // _RESIDUAL_BLOCK),), args, options


def biased_residual(skip, h, bias):
    """``skip + (h + bias)`` (bias per channel, in h's dtype), rounded as the
    two separate adds would be; the result has their promoted dtype. No
    gradient flows (inference only: the caller checks)."""
    out = _residual_output(skip, h)
    _run(_residual_launch(skip, h, bias, out))
    return out


def record_residual(skip, h, bias):
    """Note the launch a :func:`biased_residual` call would make."""
    _note([_residual_launch(skip, h, bias, _residual_output(skip, h))])


def _residual_output(skip, h):
    return torch.empty_like(h, dtype=torch.result_type(skip, h))  # keeps h's layout
