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
function took 25 s on the CPU (a cold start counts; neither is timed on a
GPU yet). Triton is imported only when a kernel is first built, so CPU-only
installs never need it; ``TRITON_INTERPRET=1`` runs the kernels on the CPU
(the tests do).
"""

import functools
import os

import torch

# Values a program holds in registers per tile: a (channels, positions) tile.
_TILE = 2048


@functools.lru_cache(maxsize=None)
def _kernels():
    """(forward, backward) Triton kernels, defined on first use."""
    import triton
    import triton.language as tl

    @triton.jit
    def forward(x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, y_ptr, mean_ptr, rstd_ptr,
                channels, positions, groups, mod_stride_n, mod_stride_c, eps,
                BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, MODULATE: tl.constexpr, ACT: tl.constexpr):
        pid = tl.program_id(0)  # = sample * groups + group
        n = pid // groups
        per_group = channels // groups
        count = per_group * positions
        first_channel = (pid % groups) * per_group
        c = tl.arange(0, BLOCK_C)
        c_in = c < per_group
        start = pid.to(tl.int64) * count
        # Mean, then the variance about it (two passes: no cancellation).
        total = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        p0 = 0
        while p0 < positions:  # a while loop: Triton's CPU interpreter mishandles range() bounds
            p = p0 + tl.arange(0, BLOCK_P)
            inside = c_in[:, None] & (p < positions)[None, :]
            offsets = start + c[:, None] * positions + p[None, :]
            total += tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            p0 += BLOCK_P
        mean = tl.sum(tl.sum(total, axis=1), axis=0) / count
        total = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        p0 = 0
        while p0 < positions:  # a while loop: Triton's CPU interpreter mishandles range() bounds
            p = p0 + tl.arange(0, BLOCK_P)
            inside = c_in[:, None] & (p < positions)[None, :]
            offsets = start + c[:, None] * positions + p[None, :]
            d = tl.where(inside, tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32) - mean, 0.0)
            total += d * d
            p0 += BLOCK_P
        rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(total, axis=1), axis=0) / count + eps)
        tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, rstd)
        # Per channel, the whole chain is y = x * gain + offset before SiLU.
        w = tl.load(w_ptr + first_channel + c, mask=c_in, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + first_channel + c, mask=c_in, other=0.0).to(tl.float32)
        gain = w * rstd
        offset = b - mean * gain
        if MODULATE:
            mod = n * mod_stride_n + (first_channel + c) * mod_stride_c
            s = 1.0 + tl.load(scale_ptr + mod, mask=c_in, other=0.0).to(tl.float32)
            gain = gain * s
            offset = offset * s + tl.load(shift_ptr + mod, mask=c_in, other=0.0).to(tl.float32)
        p0 = 0
        while p0 < positions:  # a while loop: Triton's CPU interpreter mishandles range() bounds
            p = p0 + tl.arange(0, BLOCK_P)
            inside = c_in[:, None] & (p < positions)[None, :]
            offsets = start + c[:, None] * positions + p[None, :]
            u = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32) * gain[:, None] + offset[:, None]
            if ACT:
                u = u * tl.sigmoid(u)
            tl.store(y_ptr + offsets, u.to(y_ptr.dtype.element_ty), mask=inside)
            p0 += BLOCK_P

    @triton.jit
    def backward(x_ptr, dy_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, dx_ptr,
                 dw_ptr, db_ptr, dscale_ptr, dshift_ptr, channels, positions, groups, mod_stride_n,
                 mod_stride_c, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, MODULATE: tl.constexpr,
                 ACT: tl.constexpr):
        pid = tl.program_id(0)
        n = pid // groups
        per_group = channels // groups
        count = per_group * positions
        first_channel = (pid % groups) * per_group
        c = tl.arange(0, BLOCK_C)
        c_in = c < per_group
        start = pid.to(tl.int64) * count
        mean = tl.load(mean_ptr + pid)
        rstd = tl.load(rstd_ptr + pid)
        w = tl.load(w_ptr + first_channel + c, mask=c_in, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + first_channel + c, mask=c_in, other=0.0).to(tl.float32)
        s = tl.full([BLOCK_C], 1.0, tl.float32)
        shift = tl.zeros([BLOCK_C], dtype=tl.float32)
        if MODULATE:
            mod = n * mod_stride_n + (first_channel + c) * mod_stride_c
            s = 1.0 + tl.load(scale_ptr + mod, mask=c_in, other=0.0).to(tl.float32)
            shift = tl.load(shift_ptr + mod, mask=c_in, other=0.0).to(tl.float32)
        # h = xhat * w + b (the normalised, affine value); u = h * s + shift.
        # Per channel: du and du*h (scale, shift grads), dh*xhat and dh (w, b).
        sum_du = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        sum_du_h = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        sum_du_xhat = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        p0 = 0
        while p0 < positions:  # a while loop: Triton's CPU interpreter mishandles range() bounds
            p = p0 + tl.arange(0, BLOCK_P)
            inside = c_in[:, None] & (p < positions)[None, :]
            offsets = start + c[:, None] * positions + p[None, :]
            xhat = (tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32) - mean) * rstd
            du = tl.load(dy_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            h = xhat * w[:, None] + b[:, None]
            if ACT:
                u = h * s[:, None] + shift[:, None]
                gate = tl.sigmoid(u)
                du = du * gate * (1.0 + u * (1.0 - gate))
            du = tl.where(inside, du, 0.0)
            sum_du += du
            sum_du_h += du * h
            sum_du_xhat += du * xhat
            p0 += BLOCK_P
        du_c = tl.sum(sum_du, axis=1)
        du_h_c = tl.sum(sum_du_h, axis=1)
        # dh = du * s, so the w and b grads are s times du's sums.
        db_c = du_c * s
        dw_c = tl.sum(sum_du_xhat, axis=1) * s
        tl.store(dw_ptr + n * channels + first_channel + c, dw_c, mask=c_in)
        tl.store(db_ptr + n * channels + first_channel + c, db_c, mask=c_in)
        if MODULATE:
            tl.store(dscale_ptr + n * channels + first_channel + c, du_h_c, mask=c_in)
            tl.store(dshift_ptr + n * channels + first_channel + c, du_c, mask=c_in)
        # dxhat = dh * w; dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
        mean_dxhat = tl.sum(db_c * w, axis=0) / count
        mean_dxhat_xhat = tl.sum(dw_c * w, axis=0) / count
        p0 = 0
        while p0 < positions:  # a while loop: Triton's CPU interpreter mishandles range() bounds
            p = p0 + tl.arange(0, BLOCK_P)
            inside = c_in[:, None] & (p < positions)[None, :]
            offsets = start + c[:, None] * positions + p[None, :]
            xhat = (tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32) - mean) * rstd
            du = tl.load(dy_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            if ACT:
                u = (xhat * w[:, None] + b[:, None]) * s[:, None] + shift[:, None]
                gate = tl.sigmoid(u)
                du = du * gate * (1.0 + u * (1.0 - gate))
            dxhat = du * (s * w)[:, None]
            dx = (dxhat - mean_dxhat - xhat * mean_dxhat_xhat) * rstd
            tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=inside)
            p0 += BLOCK_P

    return forward, backward


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
