"""The guided-diffusion UNet, its super-resolution variant and the encoder classifier.

Constructor arguments, state_dict names/shapes and float32 outputs match
openai/guided-diffusion, so its checkpoints load with ``strict=True``. The
implementation differs where it buys speed without changing the numbers:

* attention runs through ``F.scaled_dot_product_attention`` (flash / memory
  efficient kernels on GPU) in a token-major layout, which is free to obtain
  from channels_last activations;
* activation checkpointing happens only when ``use_checkpoint=True`` (the
  original always checkpointed attention);
* nothing branches on tensor values, so the model traces under ``torch.compile``
  and runs under ``torch.autocast`` (bf16) as well as with the original fp16
  weight conversion (``use_fp16`` / ``convert_to_fp16``).

Shapes use N = batch, C = channels, T = number of spatial positions.
"""

from abc import abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fp16_util import convert_module_to_f16, convert_module_to_f32
from .nn import (
    avg_pool_nd,
    biased_residual,
    checkpoint,
    conv_nd,
    conv_without_bias,
    folds_conv_bias,
    linear,
    norm_act,
    normalization,
    timestep_embedding,
    zero_module,
)


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------


def _pointwise_conv_as_linear(conv, tokens):
    """Apply a kernel-size-1 Conv1d to token-major input.

    :param conv: ``nn.Conv1d`` with kernel size 1 (its weight is (out, in, 1)).
    :param tokens: (N, T, in).
    :return: (N, T, out), the same numbers as ``conv(tokens.transpose(1, 2))``
        transposed back, without materialising the channel-major layout.
    """
    return F.linear(tokens, conv.weight.squeeze(-1), conv.bias)


class _MultiHeadSDPA(nn.Module):
    """Shared scaled-dot-product attention; subclasses say how heads sit in the qkv channels.

    The softmax scale is 1/sqrt(head width), the same as the reference, which
    multiplies q and k each by head_width ** -0.25 before the product.
    """

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def split_heads(self, qkv_tokens):
        """(N, T, 3 * H * ch) -> q, k, v, each (N, H, T, ch)."""
        raise NotImplementedError

    def attend_tokens(self, qkv_tokens, n_queries=None):
        """Attention on token-major input.

        :param qkv_tokens: (N, T, 3 * H * ch) queries, keys and values.
        :param n_queries: if given, only the first ``n_queries`` positions are
            used as queries (all T positions are still keys/values).
        :return: (N, Tq, H * ch) with Tq = T or ``n_queries``.
        """
        q, k, v = self.split_heads(qkv_tokens)
        if n_queries is not None:
            q = q[:, :, :n_queries]
        head_width = q.shape[-1]
        out = F.scaled_dot_product_attention(q, k, v, scale=head_width**-0.5)
        return out.transpose(1, 2).flatten(2)

    def forward(self, qkv):
        """Channel-major interface of the original: (N, 3 * H * ch, T) -> (N, H * ch, T)."""
        return self.attend_tokens(qkv.transpose(1, 2)).transpose(1, 2)

    @staticmethod
    def count_flops(model, _x, y):
        """Hook for ``thop`` profiling: add the two attention matmuls' multiply-adds."""
        return count_attention_flops(model, _x, y)


class QKVAttentionLegacy(_MultiHeadSDPA):
    """Multi-head attention whose qkv channels are grouped per head: [h0: q k v, h1: q k v, ...]."""

    def split_heads(self, qkv_tokens):
        head_width = qkv_tokens.shape[-1] // (3 * self.n_heads)
        per_head = qkv_tokens.unflatten(-1, (self.n_heads, 3, head_width))
        # (N, T, H, 3, ch) -> (3, N, H, T, ch)
        return per_head.permute(3, 0, 2, 1, 4).unbind(0)


class QKVAttention(_MultiHeadSDPA):
    """Multi-head attention whose qkv channels are grouped by role: [q (all heads), k, v]."""

    def split_heads(self, qkv_tokens):
        head_width = qkv_tokens.shape[-1] // (3 * self.n_heads)
        per_role = qkv_tokens.unflatten(-1, (3, self.n_heads, head_width))
        # (N, T, 3, H, ch) -> (3, N, H, T, ch)
        return per_role.permute(2, 0, 3, 1, 4).unbind(0)


def count_attention_flops(model, _x, y):
    """Multiply-adds of one attention call, in the form ``thop`` expects (``model.total_ops``).

    ``y[0].shape`` is read as (batch, channels, *spatial), as in the original hook.
    Only calls that go through the module's ``forward`` are seen by such hooks.
    """
    batch, channels, *spatial = y[0].shape
    positions = 1
    for size in spatial:
        positions *= size
    # q @ k^T and weights @ v each cost T * T * C per sample.
    model.total_ops += torch.DoubleTensor([2 * batch * positions**2 * channels])


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, with a residual connection.

    :param channels: C, channels of the input.
    :param num_heads: number of heads, used when ``num_head_channels`` is -1.
    :param num_head_channels: if not -1, fixed head width (heads = C // width).
    :param use_checkpoint: recompute the block in backward to save memory.
    :param use_new_attention_order: split qkv by role first (``QKVAttention``)
        instead of by head first (``QKVAttentionLegacy``).
    """

    def __init__(
        self,
        channels,
        num_heads=1,
        num_head_channels=-1,
        use_checkpoint=False,
        use_new_attention_order=False,
    ):
        super().__init__()
        if num_head_channels == -1:
            heads = num_heads
        elif channels % num_head_channels:
            raise ValueError(
                f"channels ({channels}) not divisible by num_head_channels ({num_head_channels})"
            )
        else:
            heads = channels // num_head_channels
        self.channels = channels
        self.num_heads = heads
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, 3 * channels, kernel_size=1)
        attention_cls = QKVAttention if use_new_attention_order else QKVAttentionLegacy
        self.attention = attention_cls(heads)
        # Zero-initialised so the block starts as the identity.
        self.proj_out = zero_module(conv_nd(1, channels, channels, kernel_size=1))

    def forward(self, x):
        """x: (N, C, *spatial) -> same shape."""
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x):
        n, c = x.shape[:2]
        # GroupNorm on the unflattened tensor gives the same statistics and keeps
        # a channels_last layout, whose (N, T, C) token view is then free.
        tokens = self.norm(x).reshape(n, c, -1).transpose(1, 2)
        qkv = _pointwise_conv_as_linear(self.qkv, tokens)
        attended = self.attention.attend_tokens(qkv)
        update = _pointwise_conv_as_linear(self.proj_out, attended)
        return x + update.transpose(1, 2).reshape(x.shape)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the mean token attends over all positions.

    :param spacial_dim: side length S of the (S, S) input grid (name kept from the original API).
    :param embed_dim: C, input channels.
    :param num_heads_channels: width of each attention head.
    :param output_dim: output features (defaults to ``embed_dim``).
    """

    def __init__(self, spacial_dim, embed_dim, num_heads_channels, output_dim=None):
        super().__init__()
        n_positions = spacial_dim**2 + 1  # every grid cell plus the mean token
        n_out = output_dim or embed_dim
        heads = embed_dim // num_heads_channels
        pos = torch.randn(embed_dim, n_positions) / embed_dim**0.5
        self.positional_embedding = nn.Parameter(pos)
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, kernel_size=1)
        self.c_proj = conv_nd(1, embed_dim, n_out, kernel_size=1)
        self.num_heads = heads
        self.attention = QKVAttention(heads)

    def forward(self, x):
        """x: (N, C, S, S) -> (N, output_dim)."""
        n, c = x.shape[:2]
        tokens = x.reshape(n, c, -1).transpose(1, 2)  # (N, T, C)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        tokens = tokens + self.positional_embedding.t().to(tokens.dtype)
        qkv = _pointwise_conv_as_linear(self.qkv_proj, tokens)
        # Only the mean token's output is returned, so only it is used as a query.
        pooled = self.attention.attend_tokens(qkv, n_queries=1)
        return _pointwise_conv_as_linear(self.c_proj, pooled)[:, 0]


# ---------------------------------------------------------------------------
# Timestep-conditioned building blocks
# ---------------------------------------------------------------------------


class TimestepBlock(nn.Module):
    """A module whose ``forward`` also takes the timestep embedding."""

    @abstractmethod
    def forward(self, x, emb):
        """x: activations (N, C, ...); emb: timestep embedding (N, E)."""


class TimestepEmbedSequential(TimestepBlock, nn.Sequential):
    """``nn.Sequential`` that hands the timestep embedding to the children that take one."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution.

    :param channels: input channels.
    :param use_conv: apply a convolution after upsampling.
    :param dims: 1, 2 or 3; with 3, only the last two axes are upsampled.
    :param out_channels: output channels (defaults to ``channels``; needs ``use_conv``
        to differ).
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels=None):
        super().__init__()
        n_out = out_channels if out_channels else channels
        self.channels = channels
        self.out_channels = n_out
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, n_out, kernel_size=3, padding=1)

    def forward(self, x):
        if x.shape[1] != self.channels:
            raise ValueError(f"Upsample expects {self.channels} channels, got {x.shape[1]}")
        size = [2 * side for side in x.shape[2:]]
        if self.dims == 3:
            size[0] = x.shape[2]  # 3D signals keep their depth (first axis)
        # CUDA autocast runs nearest upsampling in float32; copying values
        # needs no extra precision, and a float32 result would make the rest
        # of the up path float32 (twice the bytes, casts back before each conv).
        with torch.autocast(x.device.type, enabled=False):
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 convolution or by average pooling.

    :param channels: input channels.
    :param use_conv: strided convolution if True, average pooling otherwise.
    :param dims: 1, 2 or 3; with 3, only the last two axes are downsampled.
    :param out_channels: output channels (must equal ``channels`` without a conv).
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels=None):
        super().__init__()
        n_out = out_channels if out_channels else channels
        self.channels = channels
        self.out_channels = n_out
        self.use_conv = use_conv
        self.dims = dims
        factor = (1, 2, 2) if dims == 3 else 2  # 3D signals keep their depth
        if use_conv:
            self.op = conv_nd(dims, channels, n_out, kernel_size=3, stride=factor, padding=1)
        elif channels != n_out:
            raise ValueError("Downsample without a conv cannot change the channel count")
        else:
            self.op = avg_pool_nd(dims, kernel_size=factor, stride=factor)

    def forward(self, x):
        if x.shape[1] != self.channels:
            raise ValueError(f"Downsample expects {self.channels} channels, got {x.shape[1]}")
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding.

    in_layers (norm, SiLU, conv) -> add or scale-shift by the embedding ->
    out_layers (norm, SiLU, dropout, zero-initialised conv), plus a skip
    connection that matches the channel count.

    :param channels: input channels.
    :param emb_channels: width of the timestep embedding.
    :param dropout: dropout probability inside the block.
    :param out_channels: output channels (defaults to ``channels``).
    :param use_conv: when the channel count changes, use a 3x3 conv on the skip
        path instead of a 1x1 conv.
    :param use_scale_shift_norm: condition with ``norm(h) * (1 + scale) + shift``
        (FiLM) instead of adding the embedding before the norm.
    :param dims: 1, 2 or 3.
    :param use_checkpoint: recompute the block in backward to save memory.
    :param up: upsample 2x inside the block.
    :param down: downsample 2x inside the block.
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        dims=2,
        use_checkpoint=False,
        up=False,
        down=False,
    ):
        super().__init__()
        out_ch = out_channels if out_channels else channels
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_ch
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = bool(use_scale_shift_norm)

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, out_ch, kernel_size=3, padding=1),
        )

        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, use_conv=False, dims=dims)
            self.x_upd = Upsample(channels, use_conv=False, dims=dims)
        elif down:
            self.h_upd = Downsample(channels, use_conv=False, dims=dims)
            self.x_upd = Downsample(channels, use_conv=False, dims=dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        emb_out_width = 2 * out_ch if use_scale_shift_norm else out_ch
        self.emb_layers = nn.Sequential(nn.SiLU(), linear(emb_channels, emb_out_width))
        self.out_layers = nn.Sequential(
            normalization(out_ch),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, out_ch, out_ch, kernel_size=3, padding=1)),
        )

        if out_ch == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, out_ch, kernel_size=3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, out_ch, kernel_size=1)

    def forward(self, x, emb):
        """x: (N, C, ...), emb: (N, emb_channels) -> (N, out_channels, ...)."""
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x, emb):
        in_norm, _, in_conv = self.in_layers
        h = norm_act(in_norm, x)
        if self.updown:
            # Resample between the activation and the conv of in_layers.
            h, x = self.h_upd(h), self.x_upd(x)
        out_norm, _, dropout, out_conv = self.out_layers
        # Sampling on the GPU: the convolutions' biases ride along with the
        # norm and the residual add that follow (one pass less over h each).
        fold = self.use_scale_shift_norm and in_conv.bias is not None and out_conv.bias is not None \
            and folds_conv_bias(h)
        h = conv_without_bias(in_conv, h) if fold else in_conv(h)

        emb_out = self.emb_layers(emb).to(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.ndim - 2)))

        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = norm_act(out_norm, h, scale, shift, input_bias=in_conv.bias if fold else None)
        else:
            h = norm_act(out_norm, h + emb_out)
        if fold:
            return biased_residual(self.skip_connection(x), conv_without_bias(out_conv, dropout(h)), out_conv.bias)
        h = out_conv(dropout(h))
        return self.skip_connection(x) + h


# ---------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------


def _constructor_settings(frame_locals):
    """The constructor arguments out of ``locals()`` (minus ``self`` and the super() cell)."""
    return {k: v for k, v in frame_locals.items() if k not in ("self", "__class__")}


class _EncoderBody(nn.Module):
    """Timestep embedding, downsampling path and middle block shared by the UNet and encoder.

    The constructor arguments become attributes of the same names (as in the
    original), and the module gets ``time_embed``, ``input_blocks`` and
    ``middle_block`` plus the bookkeeping the subclasses need:
    ``_skip_channels`` (channels of each input block's output),
    ``_final_channels``, ``_final_ds`` (total downsampling factor) and
    ``_feature_size`` (sum of all block widths, used by spatial pooling).
    """

    def __init__(self, settings):
        super().__init__()
        if settings["num_heads_upsample"] == -1:
            settings["num_heads_upsample"] = settings["num_heads"]
        for name, value in settings.items():
            setattr(self, name, value)
        # What every residual / attention block of the network shares.
        self._block_settings = {
            "emb_dim": 4 * settings["model_channels"],
            "dropout": settings["dropout"],
            "dims": settings["dims"],
            "use_checkpoint": settings["use_checkpoint"],
            "use_scale_shift_norm": settings["use_scale_shift_norm"],
            "num_head_channels": settings["num_head_channels"],
            "use_new_attention_order": settings["use_new_attention_order"],
        }
        self._build_encoder(**settings)

    def _res_block(self, ch_in, ch_out=None, **resample):
        """A ResBlock with the network's shared settings (``resample``: up/down flags)."""
        cfg = self._block_settings
        return ResBlock(
            ch_in,
            cfg["emb_dim"],
            cfg["dropout"],
            out_channels=ch_out,
            dims=cfg["dims"],
            use_checkpoint=cfg["use_checkpoint"],
            use_scale_shift_norm=cfg["use_scale_shift_norm"],
            **resample,
        )

    def _attention(self, ch, heads):
        """An AttentionBlock with the network's shared settings."""
        cfg = self._block_settings
        return AttentionBlock(
            ch,
            num_heads=heads,
            num_head_channels=cfg["num_head_channels"],
            use_checkpoint=cfg["use_checkpoint"],
            use_new_attention_order=cfg["use_new_attention_order"],
        )

    def _build_encoder(
        self,
        *,
        in_channels,
        model_channels,
        num_res_blocks,
        attention_resolutions,
        channel_mult,
        conv_resample,
        dims,
        num_heads,
        resblock_updown,
        **_shared,
    ):
        emb_dim = self._block_settings["emb_dim"]
        self.time_embed = nn.Sequential(
            linear(model_channels, emb_dim),
            nn.SiLU(),
            linear(emb_dim, emb_dim),
        )

        widths = [int(mult * model_channels) for mult in channel_mult]
        ch = widths[0]
        self._first_channels = ch
        blocks = [TimestepEmbedSequential(conv_nd(dims, in_channels, ch, kernel_size=3, padding=1))]
        skip_channels = [ch]
        ds = 1  # downsampling factor reached so far
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers = [self._res_block(ch, width)]
                ch = width
                if ds in attention_resolutions:
                    layers.append(self._attention(ch, num_heads))
                blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level < len(widths) - 1:
                if resblock_updown:
                    resample = self._res_block(ch, ch, down=True)
                else:
                    resample = Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                blocks.append(TimestepEmbedSequential(resample))
                skip_channels.append(ch)
                ds *= 2
        self.input_blocks = nn.ModuleList(blocks)

        middle = [self._res_block(ch), self._attention(ch, num_heads), self._res_block(ch)]
        self.middle_block = TimestepEmbedSequential(*middle)

        self._skip_channels = skip_channels
        self._final_channels = ch
        self._final_ds = ds
        # Width of the concatenated per-block spatial means ("spatial" pooling).
        self._feature_size = sum(skip_channels) + ch

    def _embed_time(self, x, timesteps):
        """Timesteps (N,) or a scalar -> embedding (N, 4 * model_channels)."""
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        return self.time_embed(timestep_embedding(timesteps, self.model_channels))

    @property
    def dtype(self):
        """dtype the trunk runs in: float16 after ``convert_to_fp16`` / with ``use_fp16``."""
        return torch.float16 if self.use_fp16 else torch.float32

    def _trunk_modules(self):
        return [self.input_blocks, self.middle_block]

    def convert_to_fp16(self):
        """Cast the trunk's convolutions to float16 (the original's fp16 scheme)."""
        for module in self._trunk_modules():
            module.apply(convert_module_to_f16)
        self.use_fp16 = True

    def convert_to_fp32(self):
        """Undo ``convert_to_fp16``."""
        for module in self._trunk_modules():
            module.apply(convert_module_to_f32)
        self.use_fp16 = False


class UNetModel(_EncoderBody):
    """The full UNet with attention and timestep (and optional class) conditioning.

    :param image_size: side of the input (only stored; the net is size agnostic).
    :param in_channels: channels of x.
    :param model_channels: base width.
    :param out_channels: channels of the output.
    :param num_res_blocks: residual blocks per resolution level.
    :param attention_resolutions: downsampling factors (1, 2, 4, ...) at which
        attention blocks are inserted.
    :param dropout: dropout probability in the residual blocks.
    :param channel_mult: width multiplier per level.
    :param conv_resample: learned (conv) up/downsampling instead of fixed.
    :param dims: 1, 2 or 3 dimensional signal.
    :param num_classes: if set, class-conditional with ``y`` of this many classes.
    :param use_checkpoint: gradient checkpointing to save memory.
    :param use_fp16: run the trunk in float16 (after ``convert_to_fp16``).
    :param num_heads: attention heads (when ``num_head_channels`` is -1).
    :param num_head_channels: fixed head width, overriding ``num_heads``.
    :param num_heads_upsample: heads on the upsampling path (-1: ``num_heads``).
    :param use_scale_shift_norm: FiLM-like timestep conditioning.
    :param resblock_updown: resample with residual blocks instead of plain layers.
    :param use_new_attention_order: ``QKVAttention`` head layout instead of legacy.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        augment_dim=0,
    ):
        super().__init__(_constructor_settings(locals()))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, self._block_settings["emb_dim"])
        if augment_dim:
            # What was done to a training sample (augment.py); absent when sampling.
            self.augment_emb = nn.Linear(augment_dim, self._block_settings["emb_dim"], bias=False)

        # Decoder: mirror the encoder, consuming its skip connections last-in first-out.
        skips = list(self._skip_channels)
        ch = self._final_channels
        ds = self._final_ds
        blocks = []
        for level in reversed(range(len(channel_mult))):
            width = int(channel_mult[level] * model_channels)
            for i in range(num_res_blocks + 1):
                layers = [self._res_block(ch + skips.pop(), width)]
                ch = width
                if ds in attention_resolutions:
                    layers.append(self._attention(ch, self.num_heads_upsample))
                if level > 0 and i == num_res_blocks:
                    if resblock_updown:
                        layers.append(self._res_block(ch, ch, up=True))
                    else:
                        layers.append(Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                blocks.append(TimestepEmbedSequential(*layers))
        self.output_blocks = nn.ModuleList(blocks)

        final_conv = conv_nd(dims, self._first_channels, out_channels, kernel_size=3, padding=1)
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), zero_module(final_conv))

    def _trunk_modules(self):
        return [self.input_blocks, self.middle_block, self.output_blocks]

    def forward(self, x: torch.Tensor, timesteps, y=None, augment=None):
        """Predict from a noisy batch.

        :param x: (N, in_channels, *spatial) input (any memory format).
        :param timesteps: (N,) timesteps, integer or float (a scalar is broadcast).
        :param y: (N,) integer labels, required iff the model is class-conditional.
        :param augment: (N, augment_dim) description of the augmentation each
            training sample went through; None (sampling) means none.
        :return: (N, out_channels, *spatial).
        """
        if (y is None) != (self.num_classes is None):
            raise ValueError("pass y exactly when the model is class-conditional")
        emb = self._embed_time(x, timesteps)
        if self.num_classes is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)
        if augment is not None:
            if not self.augment_dim:
                raise ValueError("this model takes no augment condition (built with augment_dim=0)")
            emb = emb + self.augment_emb(augment.to(emb.dtype))

        h = x.to(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        out_norm, _, out_conv = self.out
        return out_conv(norm_act(out_norm, h.to(x.dtype)))


class SuperResModel(UNetModel):
    """UNet conditioned on a low-resolution image, upsampled bilinearly and stacked on x.

    Takes the same arguments as ``UNetModel``; ``in_channels`` is the channel
    count of x (the network itself sees twice as many).
    """

    def __init__(self, image_size, in_channels: int, *args, **kwargs):
        # The low-resolution image is stacked on x along the channels.
        super().__init__(image_size, 2 * in_channels, *args, **kwargs)

    def forward(self, x: torch.Tensor, timesteps, low_res=None, **kwargs):
        """x: (N, C, H, W); low_res: (N, C, h, w) -> (N, out_channels, H, W)."""
        upsampled = F.interpolate(low_res, size=tuple(x.shape[2:]), mode="bilinear")
        return super().forward(torch.cat([x, upsampled], dim=1), timesteps, **kwargs)


# The output heads EncoderUNetModel builds (``pool``), also the flag's choices.
POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


class EncoderUNetModel(_EncoderBody):
    """The UNet's downsampling half plus a pooling head (the noisy-image classifier).

    Arguments as in ``UNetModel`` (``num_heads_upsample`` is accepted and ignored),
    plus:

    :param pool: output head, one of
        ``"adaptive"`` (norm, SiLU, global average pool, zero-init 1x1 conv),
        ``"attention"`` (norm, SiLU, ``AttentionPool2d``; needs ``num_head_channels``),
        ``"spatial"`` (MLP on the spatial means of every block's output),
        ``"spatial_v2"`` (the same MLP with a norm and SiLU in between).
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        pool="adaptive",
    ):
        super().__init__(_constructor_settings(locals()))
        self.out = self._build_head(pool, dims=dims)

    def _build_head(self, pool, *, dims):
        ch = self._final_channels
        n_out = self.out_channels
        if pool == "adaptive":
            global_pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
            return nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                global_pool[dims](1),
                zero_module(conv_nd(dims, ch, n_out, kernel_size=1)),
                nn.Flatten(),
            )
        if pool == "attention":
            if self.num_head_channels == -1:
                raise ValueError("pool='attention' needs num_head_channels")
            grid_side = self.image_size // self._final_ds
            return nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                AttentionPool2d(grid_side, ch, self.num_head_channels, output_dim=n_out),
            )
        hidden = 2048
        if pool == "spatial":
            return nn.Sequential(
                nn.Linear(self._feature_size, hidden),
                nn.ReLU(),
                nn.Linear(hidden, n_out),
            )
        if pool == "spatial_v2":
            return nn.Sequential(
                nn.Linear(self._feature_size, hidden),
                normalization(hidden),
                nn.SiLU(),
                nn.Linear(hidden, n_out),
            )
        raise NotImplementedError(f"unknown pool type {pool!r} (valid: {', '.join(POOLS)})")

    def forward(self, x, timesteps):
        """Classify a noisy batch.

        :param x: (N, in_channels, *spatial).
        :param timesteps: (N,) timesteps, integer or float (a scalar is broadcast).
        :return: (N, out_channels) logits.
        """
        emb = self._embed_time(x, timesteps)
        spatial_pool = self.pool.startswith("spatial")
        means = []

        def spatial_mean(h):
            return h.to(x.dtype).mean(dim=tuple(range(2, h.ndim)))

        h = x.to(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            if spatial_pool:
                means.append(spatial_mean(h))
        h = self.middle_block(h, emb)
        if spatial_pool:
            means.append(spatial_mean(h))
            return self.out(torch.cat(means, dim=-1))
        return self.out(h.to(x.dtype))
