"""The Triton kernels of :mod:`.triton_norm` (imported only when one is
first launched: this module needs Triton, the package does not).

Two layouts. NCHW (``forward``, ``backward``): x is (N, C, *spatial)
contiguous, so the values of one (sample, group) are one run of
``C/G * positions``; each program handles one such group as (channels,
positions) tiles. Channels-last (``forward_last``, ``backward_last``): see
the section below. Loops are while loops because
Triton's CPU interpreter mishandles ``range()`` with runtime bounds.
"""

import triton
import triton.language as tl


@triton.jit
def group_of(channels, positions, groups, BLOCK_C: tl.constexpr):
    """This program's (sample, first channel, values in the group, channel
    lanes, live lanes, flat offset of the group)."""
    pid = tl.program_id(0)  # = sample * groups + group
    per_group = channels // groups
    c = tl.arange(0, BLOCK_C)
    return (pid // groups, (pid % groups) * per_group, per_group * positions, c, c < per_group,
            pid.to(tl.int64) * per_group * positions)


@triton.jit
def tile(start, c, c_in, p0, positions, BLOCK_P: tl.constexpr):
    """Offsets and mask of the (channels, positions) tile from position p0."""
    p = p0 + tl.arange(0, BLOCK_P)
    return start + c[:, None] * positions + p[None, :], c_in[:, None] & (p < positions)[None, :]


@triton.jit
def channel_terms(w_ptr, b_ptr, scale_ptr, shift_ptr, n, first, c, c_in, mod_stride_n, mod_stride_c,
                  BLOCK_C: tl.constexpr, MODULATE: tl.constexpr):
    """Per channel: weight, bias, 1 + scale and shift, in float32."""
    w = tl.load(w_ptr + first + c, mask=c_in, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + first + c, mask=c_in, other=0.0).to(tl.float32)
    s = tl.full([BLOCK_C], 1.0, tl.float32)
    shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    if MODULATE:
        mod = n * mod_stride_n + (first + c) * mod_stride_c
        s = 1.0 + tl.load(scale_ptr + mod, mask=c_in, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + mod, mask=c_in, other=0.0).to(tl.float32)
    return w, b, s, shift


@triton.jit
def through_silu(du, u):
    """The gradient du of silu(u), taken back to u."""
    gate = tl.sigmoid(u)
    return du * gate * (1.0 + u * (1.0 - gate))


@triton.jit
def grad_terms(x_ptr, dy_ptr, offsets, inside, mean, rstd, w, b, s, shift, ACT: tl.constexpr):
    """One tile of either backward pass, the per-channel terms already
    broadcast to its shape: (xhat, h = xhat * w + b, du), du taken back
    through SiLU to u = h * s + shift and zero outside the tile. Both layouts
    share it."""
    xhat = (tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32) - mean) * rstd
    du = tl.load(dy_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    h = xhat * w + b
    if ACT:
        du = through_silu(du, h * s + shift)
    return xhat, h, tl.where(inside, du, 0.0)


@triton.jit
def add_grad_sums(x_ptr, dy_ptr, offsets, inside, mean, rstd, w, b, s, shift, sum_du, sum_du_h, sum_du_xhat,
                  ACT: tl.constexpr):
    """The first backward pass over one tile: du, du * h and du * xhat added
    to their running (tile-shaped) sums."""
    xhat, h, du = grad_terms(x_ptr, dy_ptr, offsets, inside, mean, rstd, w, b, s, shift, ACT)
    return sum_du + du, sum_du_h + du * h, sum_du_xhat + du * xhat


@triton.jit
def write_dx(x_ptr, dy_ptr, dx_ptr, offsets, inside, mean, rstd, w, b, s, shift, mean_dxhat, mean_dxhat_xhat,
             ACT: tl.constexpr):
    """The second backward pass over one tile: dxhat = dh * w, and
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) stored."""
    xhat, _, du = grad_terms(x_ptr, dy_ptr, offsets, inside, mean, rstd, w, b, s, shift, ACT)
    dx = (du * (s * w) - mean_dxhat - xhat * mean_dxhat_xhat) * rstd
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=inside)


@triton.jit
def store_channel_grads(dw_ptr, db_ptr, dscale_ptr, dshift_ptr, row, c_in, du_c, du_h_c, du_xhat_c, s,
                        MODULATE: tl.constexpr):
    """Store this program's per-channel gradient sums (one row of each
    (N, C) partial); return (db, dw) per channel. dh = du * s, so the w and
    b grads are s times du's sums."""
    db_c = du_c * s
    dw_c = du_xhat_c * s
    tl.store(dw_ptr + row, dw_c, mask=c_in)
    tl.store(db_ptr + row, db_c, mask=c_in)
    if MODULATE:
        tl.store(dscale_ptr + row, du_h_c, mask=c_in)
        tl.store(dshift_ptr + row, du_c, mask=c_in)
    return db_c, dw_c


@triton.jit
def load_input(x_ptr, offsets, inside, input_bias, INPUT_BIAS: tl.constexpr):
    """The norm's input over one tile in float32, zero outside it: x, or with
    INPUT_BIAS x + input_bias (per channel, broadcast to the tile) rounded to
    x's dtype, as a convolution's own bias add would have stored it."""
    v = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    if INPUT_BIAS:
        v = tl.where(inside, (v + input_bias).to(x_ptr.dtype.element_ty).to(tl.float32), 0.0)
    return v


@triton.jit
def write_tile(x_ptr, y_ptr, offsets, inside, gain, offset, input_bias, ACT: tl.constexpr,
               INPUT_BIAS: tl.constexpr):
    """y = x * gain + offset (then SiLU) over one tile, per-channel terms
    already broadcast to it, rounded once to y's dtype."""
    u = load_input(x_ptr, offsets, inside, input_bias, INPUT_BIAS) * gain + offset
    if ACT:
        u = u * tl.sigmoid(u)
    tl.store(y_ptr + offsets, u.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def forward(x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, ib_ptr, y_ptr, mean_ptr, rstd_ptr,
            channels, positions, groups, mod_stride_n, mod_stride_c, eps,
            BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, MODULATE: tl.constexpr, ACT: tl.constexpr,
            INPUT_BIAS: tl.constexpr):
    n, first, count, c, c_in, start = group_of(channels, positions, groups, BLOCK_C)
    input_bias = 0.0
    if INPUT_BIAS:
        input_bias = tl.load(ib_ptr + first + c, mask=c_in, other=0.0).to(tl.float32)[:, None]
    # Mean, then the variance about it (two passes: no cancellation).
    total = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    p0 = 0
    while p0 < positions:
        offsets, inside = tile(start, c, c_in, p0, positions, BLOCK_P)
        total += load_input(x_ptr, offsets, inside, input_bias, INPUT_BIAS)
        p0 += BLOCK_P
    mean = tl.sum(tl.sum(total, axis=1), axis=0) / count
    total = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    p0 = 0
    while p0 < positions:
        offsets, inside = tile(start, c, c_in, p0, positions, BLOCK_P)
        d = tl.where(inside, load_input(x_ptr, offsets, inside, input_bias, INPUT_BIAS) - mean, 0.0)
        total += d * d
        p0 += BLOCK_P
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(total, axis=1), axis=0) / count + eps)
    tl.store(mean_ptr + tl.program_id(0), mean)
    tl.store(rstd_ptr + tl.program_id(0), rstd)
    # Per channel, the whole chain before SiLU is x * gain + offset.
    w, b, s, shift = channel_terms(w_ptr, b_ptr, scale_ptr, shift_ptr, n, first, c, c_in, mod_stride_n,
                                   mod_stride_c, BLOCK_C, MODULATE)
    gain = w * rstd * s
    offset = (b - mean * w * rstd) * s + shift
    p0 = 0
    while p0 < positions:
        offsets, inside = tile(start, c, c_in, p0, positions, BLOCK_P)
        write_tile(x_ptr, y_ptr, offsets, inside, gain[:, None], offset[:, None], input_bias, ACT, INPUT_BIAS)
        p0 += BLOCK_P


@triton.jit
def backward(x_ptr, dy_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, dx_ptr,
             dw_ptr, db_ptr, dscale_ptr, dshift_ptr, channels, positions, groups, mod_stride_n,
             mod_stride_c, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, MODULATE: tl.constexpr,
             ACT: tl.constexpr):
    n, first, count, c, c_in, start = group_of(channels, positions, groups, BLOCK_C)
    mean = tl.load(mean_ptr + tl.program_id(0))
    rstd = tl.load(rstd_ptr + tl.program_id(0))
    w, b, s, shift = channel_terms(w_ptr, b_ptr, scale_ptr, shift_ptr, n, first, c, c_in, mod_stride_n,
                                   mod_stride_c, BLOCK_C, MODULATE)
    # h = xhat * w + b (the normalised, affine value); u = h * s + shift.
    # Per channel: du and du*h (scale, shift grads), dh*xhat and dh (w, b).
    sum_du = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    sum_du_h = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    sum_du_xhat = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    p0 = 0
    while p0 < positions:
        offsets, inside = tile(start, c, c_in, p0, positions, BLOCK_P)
        sum_du, sum_du_h, sum_du_xhat = add_grad_sums(x_ptr, dy_ptr, offsets, inside, mean, rstd, w[:, None],
                                                      b[:, None], s[:, None], shift[:, None], sum_du, sum_du_h,
                                                      sum_du_xhat, ACT)
        p0 += BLOCK_P
    db_c, dw_c = store_channel_grads(dw_ptr, db_ptr, dscale_ptr, dshift_ptr, n * channels + first + c, c_in,
                                     tl.sum(sum_du, axis=1), tl.sum(sum_du_h, axis=1),
                                     tl.sum(sum_du_xhat, axis=1), s, MODULATE)
    mean_dxhat = tl.sum(db_c * w, axis=0) / count
    mean_dxhat_xhat = tl.sum(dw_c * w, axis=0) / count
    p0 = 0
    while p0 < positions:
        offsets, inside = tile(start, c, c_in, p0, positions, BLOCK_P)
        write_dx(x_ptr, dy_ptr, dx_ptr, offsets, inside, mean, rstd, w[:, None], b[:, None], s[:, None],
                 shift[:, None], mean_dxhat, mean_dxhat_xhat, ACT)
        p0 += BLOCK_P


# ---------------------------------------------------------------------------
# Channels-last: x is (N, *spatial, C) in memory (``channels_last``), so one
# group is C/G adjacent values at every position, C apart. A program takes
# GROUPS_PER_PROGRAM adjacent groups (about 64 channels, so each row it reads
# is whole memory sectors) as (positions, channels) tiles; per-group sums are
# per-channel sums folded by a (groups, channels) membership mask.
# ---------------------------------------------------------------------------


@triton.jit
def lanes_of(channels, groups, groups_per_program, BLOCK_CH: tl.constexpr):
    """This program's (sample, first group, first channel, channels a group,
    channel lanes, each lane's group, live lanes)."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(groups, groups_per_program)
    n = pid // blocks
    g0 = (pid % blocks) * groups_per_program
    per_group = channels // groups
    first = g0 * per_group
    c = tl.arange(0, BLOCK_CH)
    return n, g0, first, per_group, c, c // per_group, (c < groups_per_program * per_group) & (first + c < channels)


@triton.jit
def to_groups(per_lane, lane_group, BLOCK_G: tl.constexpr):
    """(BLOCK_CH,) per-channel values -> (BLOCK_G,) sums over each group's channels."""
    g = tl.arange(0, BLOCK_G)
    return tl.sum(tl.where(lane_group[None, :] == g[:, None], per_lane[None, :], 0.0), axis=1)


@triton.jit
def to_lanes(per_group, lane_group, BLOCK_G: tl.constexpr):
    """(BLOCK_G,) per-group values -> (BLOCK_CH,) each channel's group's value."""
    g = tl.arange(0, BLOCK_G)
    return tl.sum(tl.where(lane_group[None, :] == g[:, None], per_group[:, None], 0.0), axis=0)


@triton.jit
def tile_last(start, c, c_in, p0, positions, channels, BLOCK_P: tl.constexpr):
    """Offsets and mask of the (positions, channels) tile from position p0."""
    p = p0 + tl.arange(0, BLOCK_P)
    return start + p[:, None] * channels + c[None, :], (p < positions)[:, None] & c_in[None, :]


@triton.jit
def forward_last(x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, ib_ptr, y_ptr, mean_ptr, rstd_ptr,
                 channels, positions, groups, groups_per_program, mod_stride_n, mod_stride_c, eps,
                 BLOCK_CH: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr,
                 MODULATE: tl.constexpr, ACT: tl.constexpr, INPUT_BIAS: tl.constexpr):
    n, g0, first, per_group, c, lane_group, c_in = lanes_of(channels, groups, groups_per_program, BLOCK_CH)
    input_bias = 0.0
    if INPUT_BIAS:
        input_bias = tl.load(ib_ptr + first + c, mask=c_in, other=0.0).to(tl.float32)[None, :]
    start = n.to(tl.int64) * positions * channels + first
    count = (per_group * positions).to(tl.float32)
    total = tl.zeros([BLOCK_P, BLOCK_CH], dtype=tl.float32)
    p0 = 0
    while p0 < positions:
        offsets, inside = tile_last(start, c, c_in, p0, positions, channels, BLOCK_P)
        total += load_input(x_ptr, offsets, inside, input_bias, INPUT_BIAS)
        p0 += BLOCK_P
    mean_g = to_groups(tl.sum(total, axis=0), lane_group, BLOCK_G) / count
    mean = to_lanes(mean_g, lane_group, BLOCK_G)
    total = tl.zeros([BLOCK_P, BLOCK_CH], dtype=tl.float32)
    p0 = 0
    while p0 < positions:
        offsets, inside = tile_last(start, c, c_in, p0, positions, channels, BLOCK_P)
        d = tl.where(inside, load_input(x_ptr, offsets, inside, input_bias, INPUT_BIAS) - mean[None, :], 0.0)
        total += d * d
        p0 += BLOCK_P
    rstd_g = 1.0 / tl.sqrt(to_groups(tl.sum(total, axis=0), lane_group, BLOCK_G) / count + eps)
    rstd = to_lanes(rstd_g, lane_group, BLOCK_G)
    g = tl.arange(0, BLOCK_G)
    g_in = (g < groups_per_program) & (g0 + g < groups)
    tl.store(mean_ptr + n * groups + g0 + g, mean_g, mask=g_in)
    tl.store(rstd_ptr + n * groups + g0 + g, rstd_g, mask=g_in)
    w, b, s, shift = channel_terms(w_ptr, b_ptr, scale_ptr, shift_ptr, n, first, c, c_in, mod_stride_n,
                                   mod_stride_c, BLOCK_CH, MODULATE)
    gain = w * rstd * s
    offset = (b - mean * w * rstd) * s + shift
    p0 = 0
    while p0 < positions:
        offsets, inside = tile_last(start, c, c_in, p0, positions, channels, BLOCK_P)
        write_tile(x_ptr, y_ptr, offsets, inside, gain[None, :], offset[None, :], input_bias, ACT, INPUT_BIAS)
        p0 += BLOCK_P


@triton.jit
def backward_last(x_ptr, dy_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, dx_ptr,
                  dw_ptr, db_ptr, dscale_ptr, dshift_ptr, channels, positions, groups, groups_per_program,
                  mod_stride_n, mod_stride_c, BLOCK_CH: tl.constexpr, BLOCK_P: tl.constexpr,
                  BLOCK_G: tl.constexpr, MODULATE: tl.constexpr, ACT: tl.constexpr):
    n, g0, first, per_group, c, lane_group, c_in = lanes_of(channels, groups, groups_per_program, BLOCK_CH)
    start = n.to(tl.int64) * positions * channels + first
    count = (per_group * positions).to(tl.float32)
    g = tl.arange(0, BLOCK_G)
    g_in = (g < groups_per_program) & (g0 + g < groups)
    mean = to_lanes(tl.load(mean_ptr + n * groups + g0 + g, mask=g_in, other=0.0), lane_group, BLOCK_G)
    rstd = to_lanes(tl.load(rstd_ptr + n * groups + g0 + g, mask=g_in, other=0.0), lane_group, BLOCK_G)
    w, b, s, shift = channel_terms(w_ptr, b_ptr, scale_ptr, shift_ptr, n, first, c, c_in, mod_stride_n,
                                   mod_stride_c, BLOCK_CH, MODULATE)
    # The same sums as backward(), with channels on the second axis.
    sum_du = tl.zeros([BLOCK_P, BLOCK_CH], dtype=tl.float32)
    sum_du_h = tl.zeros([BLOCK_P, BLOCK_CH], dtype=tl.float32)
    sum_du_xhat = tl.zeros([BLOCK_P, BLOCK_CH], dtype=tl.float32)
    p0 = 0
    while p0 < positions:
        offsets, inside = tile_last(start, c, c_in, p0, positions, channels, BLOCK_P)
        sum_du, sum_du_h, sum_du_xhat = add_grad_sums(x_ptr, dy_ptr, offsets, inside, mean[None, :],
                                                      rstd[None, :], w[None, :], b[None, :], s[None, :],
                                                      shift[None, :], sum_du, sum_du_h, sum_du_xhat, ACT)
        p0 += BLOCK_P
    db_c, dw_c = store_channel_grads(dw_ptr, db_ptr, dscale_ptr, dshift_ptr, n * channels + first + c, c_in,
                                     tl.sum(sum_du, axis=0), tl.sum(sum_du_h, axis=0),
                                     tl.sum(sum_du_xhat, axis=0), s, MODULATE)
    mean_dxhat = to_lanes(to_groups(db_c * w, lane_group, BLOCK_G), lane_group, BLOCK_G) / count
    mean_dxhat_xhat = to_lanes(to_groups(dw_c * w, lane_group, BLOCK_G), lane_group, BLOCK_G) / count
    p0 = 0
    while p0 < positions:
        offsets, inside = tile_last(start, c, c_in, p0, positions, channels, BLOCK_P)
        write_dx(x_ptr, dy_ptr, dx_ptr, offsets, inside, mean[None, :], rstd[None, :], w[None, :], b[None, :],
                 s[None, :], shift[None, :], mean_dxhat[None, :], mean_dxhat_xhat[None, :], ACT)
        p0 += BLOCK_P


# ---------------------------------------------------------------------------
# A convolution's bias and the residual add after it, in one pass.
# ---------------------------------------------------------------------------


@triton.jit
def biased_residual(skip_ptr, h_ptr, b_ptr, out_ptr, total, channels, positions,
                    CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """out = skip + (h + b): h + b rounded to h's dtype first (as the
    convolution's own bias add stores it), the sum to out's. skip, h and out
    share one dense layout, NCHW or channels-last; b is per channel."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < total
    c = i % channels if CHANNELS_LAST else (i // positions) % channels
    biased = tl.load(h_ptr + i, mask=inside).to(tl.float32) + tl.load(b_ptr + c, mask=inside).to(tl.float32)
    out = tl.load(skip_ptr + i, mask=inside).to(tl.float32) + biased.to(h_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + i, out.to(out_ptr.dtype.element_ty), mask=inside)
