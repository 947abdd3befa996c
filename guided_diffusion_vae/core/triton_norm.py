"""GroupNorm -> scale-shift -> SiLU as two hand-written Triton kernels.

The UNet's ``norm_act`` (:mod:`.nn`) as separate ops reads and writes the
activation six times forward (upcast, normalise, downcast, scale, shift,
SiLU) and more backward. Here one program per (sample, group) reads its
group, which is one contiguous run of ``C/G * H * W`` values in an NCHW
tensor, three times (mean, variance, output) and writes it once; the
backward pass reads x and the incoming gradient twice and writes dx once.
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


@functools.lru_cache(maxsize=None)
def _kernels():
    """(forward, backward) Triton kernels, imported on first use."""
    from . import triton_kernels

    return triton_kernels.forward, triton_kernels.backward


def interpreting():
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_power_of_2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _launch_shape(channels, groups, positions):
    block_c = _next_power_of_2(channels // groups)
    block_p = max(1, min(_next_power_of_2(positions), _TILE // block_c))
    warps = 4 if block_c * block_p <= 1024 else 8
    return block_c, block_p, warps


def supported(x, norm, scale, shift):
    """Whether the kernels take this call: a contiguous (NCHW-ordered) tensor
    of at least one spatial dimension, an affine norm whose groups divide the
    channels, and scale and shift both given or both absent. The device is
    :func:`nn.norm_act`'s choice."""
    return (x.dim() >= 3 and x.is_contiguous() and norm.weight is not None and norm.bias is not None
            and (scale is None) == (shift is None) and x.shape[1] % norm.num_groups == 0)


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


class GroupNormAct(torch.autograd.Function):
    """``silu(group_norm(x) * (1 + scale) + shift)`` (scale/shift and SiLU
    optional); x: (N, C, *spatial) contiguous; scale, shift: (N, C, 1, ...) or
    None; returns x's shape and dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, groups, eps, act):
        n, c = x.shape[:2]
        positions = x[0, 0].numel()
        mod_scale, mod_shift, stride_n, stride_c = _modulation(scale, shift, n, c)
        y = torch.empty_like(x)
        mean = torch.empty(n * groups, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        block_c, block_p, warps = _launch_shape(c, groups, positions)
        forward_kernel, _ = _kernels()
        modulate = mod_scale is not None
        forward_kernel[(n * groups,)](
            x, weight, bias, mod_scale if modulate else weight, mod_shift if modulate else bias, y, mean, rstd,
            c, positions, groups, stride_n, stride_c, float(eps),
            BLOCK_C=block_c, BLOCK_P=block_p, MODULATE=modulate, ACT=bool(act), num_warps=warps)
        ctx.save_for_backward(x, weight, bias, mod_scale, mod_shift, mean, rstd)
        ctx.launch = (groups, act, stride_n, stride_c, scale.shape if modulate else None,
                      scale.dtype if modulate else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mod_scale, mod_shift, mean, rstd = ctx.saved_tensors
        groups, act, stride_n, stride_c, mod_shape, mod_dtype = ctx.launch
        n, c = x.shape[:2]
        positions = x[0, 0].numel()
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        partial = torch.empty((4, n, c), device=x.device, dtype=torch.float32)
        modulate = mod_scale is not None
        block_c, block_p, warps = _launch_shape(c, groups, positions)
        _, backward_kernel = _kernels()
        backward_kernel[(n * groups,)](
            x, dy, weight, bias, mod_scale if modulate else weight, mod_shift if modulate else bias, mean, rstd,
            dx, partial[0], partial[1], partial[2], partial[3], c, positions, groups, stride_n, stride_c,
            BLOCK_C=block_c, BLOCK_P=block_p, MODULATE=modulate, ACT=bool(act), num_warps=warps)
        dweight = partial[0].sum(0).to(weight.dtype)
        dbias = partial[1].sum(0).to(bias.dtype)
        dscale = partial[2].to(mod_dtype).reshape(mod_shape) if modulate and ctx.needs_input_grad[3] else None
        dshift = partial[3].to(mod_dtype).reshape(mod_shape) if modulate and ctx.needs_input_grad[4] else None
        return dx, dweight, dbias, dscale, dshift, None, None, None


def group_norm_act(x, norm, scale=None, shift=None, act=True):
    """The fused ``norm_act``: see :class:`GroupNormAct`."""
    return GroupNormAct.apply(x, norm.weight, norm.bias, scale, shift, norm.num_groups, norm.eps, act)
