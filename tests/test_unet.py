"""Behaviour of the UNet family, the nn helpers and the fp16 trainer beyond the golden cases.

Models here are tiny (8x8 or 16x16 inputs, 32 channels) so the file runs in
seconds on a couple of CPU cores. The zero-initialised output layers are
filled with small random values first, otherwise every output would be 0 and
most comparisons would pass trivially.
"""

import math

import pytest
import torch

from guided_diffusion_vae.core import fp16_util
from guided_diffusion_vae.core import nn as gd_nn
from guided_diffusion_vae.core.nn import checkpoint, fused_norm, mean_flat, timestep_embedding, update_ema
from guided_diffusion_vae.core.unet import (
    AttentionBlock,
    EncoderUNetModel,
    QKVAttention,
    QKVAttentionLegacy,
    SuperResModel,
    UNetModel,
    Upsample,
)

BASE = dict(
    image_size=8,
    in_channels=4,
    model_channels=32,
    out_channels=4,
    num_res_blocks=1,
    attention_resolutions=(2,),
    channel_mult=(1, 2),
    num_heads=2,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscribing shared CPU cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _wake(model, seed=0):
    """Give the all-zero (zero_module) parameters small random values, in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model


def _unet(seed=0, **overrides):
    torch.manual_seed(seed)
    return _wake(UNetModel(**{**BASE, **overrides}), seed).eval()


def _inputs(batch=2, channels=4, size=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen)
    t = torch.tensor([3, 917][:batch] + [500] * max(0, batch - 2))
    return x, t


def _max_abs(a, b):
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------
# nn helpers
# ---------------------------------------------------------------------------


def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0, 1]), 6)
    assert emb.shape == (2, 6) and emb.dtype == torch.float32
    # t = 0: cos(0) = 1 in the first half, sin(0) = 0 in the second.
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    freqs = [10000 ** (-i / 3) for i in range(3)]
    expected = [math.cos(f) for f in freqs] + [math.sin(f) for f in freqs]
    torch.testing.assert_close(emb[1], torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_timestep_embedding_int_float_odd_and_autocast():
    ints = timestep_embedding(torch.tensor([5, 250]), 8)
    floats = timestep_embedding(torch.tensor([5.0, 250.0], dtype=torch.float64), 8)
    torch.testing.assert_close(ints, floats, rtol=0, atol=0)
    odd = timestep_embedding(torch.tensor([7.5]), 7)
    assert odd.shape == (1, 7) and odd[0, -1] == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = timestep_embedding(torch.tensor([5, 250]), 8)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, ints, rtol=0, atol=0)


def test_update_ema_matches_formula():
    gen = torch.Generator().manual_seed(0)
    targets = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    sources = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    expected = [0.9 * t + 0.1 * s for t, s in zip(targets, sources)]
    update_ema(targets, sources, rate=0.9)
    for got, want in zip(targets, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_mean_flat_and_checkpoint_helper():
    x = torch.arange(24.0).reshape(2, 3, 4)
    torch.testing.assert_close(mean_flat(x), torch.tensor([5.5, 17.5]))
    w = torch.tensor(2.0, requires_grad=True)
    out = checkpoint(lambda a: (a * w).sum(), (torch.ones(3),), [w], True)
    out.backward()
    assert w.grad.item() == 3.0


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------


def _einsum_attention(q, k, v):
    """Reference: q, k, v (B, ch, T) with q and k each scaled by ch ** -0.25."""
    ch = q.shape[1]
    s = ch**-0.25
    weights = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s), dim=-1)
    return torch.einsum("bts,bcs->bct", weights, v)


@pytest.mark.parametrize("legacy", [True, False])
def test_qkv_attention_head_layouts(legacy):
    heads, ch, length, batch = 3, 8, 10, 2
    qkv = torch.randn(batch, 3 * heads * ch, length, generator=torch.Generator().manual_seed(0))
    if legacy:  # per head: [q k v] blocks
        q, k, v = qkv.reshape(batch * heads, 3 * ch, length).split(ch, dim=1)
        want = _einsum_attention(q, k, v).reshape(batch, heads * ch, length)
        got = QKVAttentionLegacy(heads)(qkv)
    else:  # per role: [q of all heads, k, v]
        q, k, v = (part.reshape(batch * heads, ch, length) for part in qkv.chunk(3, dim=1))
        want = _einsum_attention(q, k, v).reshape(batch, heads * ch, length)
        got = QKVAttention(heads)(qkv)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The two layouts really differ (otherwise the test above proves little).
    other = (QKVAttention if legacy else QKVAttentionLegacy)(heads)(qkv)
    assert _max_abs(other, got) > 1e-3


def test_attention_block_heads_from_head_channels():
    block = AttentionBlock(64, num_heads=1, num_head_channels=16)
    assert block.attention.n_heads == 4
    assert isinstance(block.attention, QKVAttentionLegacy)
    with pytest.raises(ValueError):
        AttentionBlock(64, num_head_channels=24)


# ---------------------------------------------------------------------------
# UNet variants
# ---------------------------------------------------------------------------


def test_channels_last_matches_contiguous():
    model = _unet(num_classes=3, use_scale_shift_norm=True, resblock_updown=True)
    x, t = _inputs()
    y = torch.tensor([0, 2])
    with torch.no_grad():
        ref = model(x, t, y=y)
        cl_input = model(x.to(memory_format=torch.channels_last), t, y=y)
        model = model.to(memory_format=torch.channels_last)
        cl_all = model(x.to(memory_format=torch.channels_last), t, y=y)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(cl_input, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cl_all, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("new_order", [False, True])
def test_bf16_autocast_close_to_fp32(new_order):
    model = _unet(use_new_attention_order=new_order)
    x, t = _inputs()
    with torch.no_grad():
        ref = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x.to(memory_format=torch.channels_last), t)
    assert torch.isfinite(low).all()
    # bf16 keeps ~3 significant digits; allow a few percent of the output scale.
    assert _max_abs(low, ref) <= 0.05 * ref.abs().max().item()


def test_bf16_autocast_backward():
    model = _unet(num_classes=3).train()
    x, t = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x.to(memory_format=torch.channels_last), t, y=torch.tensor([1, 2]))
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_upsampling_keeps_the_dtype_autocast_would_widen(monkeypatch):
    """CUDA autocast casts nearest upsampling's input to float32 (the CPU's
    does not), so a fake interpolate that widens whenever autocast is on
    stands in for the GPU here: Upsample must still give bf16 out for bf16 in,
    bit for bit the plain upsampling, and nothing but its own interpolation
    may be affected."""
    real = torch.nn.functional.interpolate

    def widening_interpolate(x, *args, **kwargs):
        if torch.is_autocast_enabled(x.device.type):
            x = x.float()
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "interpolate", widening_interpolate)
    up = Upsample(8, use_conv=False)
    x = torch.randn(2, 8, 4, 4).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = up(x)
        assert torch.is_autocast_enabled("cpu")  # switched back on afterwards
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    # With a conv, the conv still runs under autocast (bf16 out for float32 in).
    up_conv = Upsample(8, use_conv=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert up_conv(x.float()).dtype == torch.bfloat16


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_use_checkpoint_same_gradients_and_recomputes():
    plain = _unet(num_classes=3, dropout=0.0).train()
    ckpt = UNetModel(**{**BASE, "num_classes": 3, "use_checkpoint": True}).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t = _inputs()
    y = torch.tensor([2, 0])
    calls = {}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        res_conv = model.input_blocks[1][0].in_layers[2]
        attn_norm = model.middle_block[1].norm
        calls[name] = (_count_calls(res_conv), _count_calls(attn_norm))
        model(x, t, y=y).square().mean().backward()
    # Without checkpointing nothing runs twice (the original always recomputed attention).
    assert [len(c) for c in calls["plain"]] == [1, 1]
    assert [len(c) for c in calls["ckpt"]] == [2, 2]
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_convert_to_fp16_dtype_and_state_dict():
    model = _unet(num_classes=3)
    names = {k: v.shape for k, v in model.state_dict().items()}
    x, t = _inputs()
    y = torch.tensor([0, 1])
    with torch.no_grad():
        ref = model(x, t, y=y)
    model.convert_to_fp16()
    assert model.dtype == torch.float16
    assert model.input_blocks[1][0].in_layers[2].weight.dtype == torch.float16
    assert model.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32  # norms stay fp32
    assert model.out[2].weight.dtype == torch.float32  # the output head stays fp32
    assert {k: v.shape for k, v in model.state_dict().items()} == names
    fresh = UNetModel(**{**BASE, "num_classes": 3, "use_fp16": True})
    assert fresh.dtype == torch.float16
    fresh.convert_to_fp16()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        half = fresh(x, t, y=y)
    assert half.dtype == torch.float32  # cast back to the input's dtype
    assert _max_abs(half, ref) <= 0.02 * ref.abs().max().item()
    model.convert_to_fp32()
    assert model.dtype == torch.float32
    assert model.input_blocks[1][0].in_layers[2].weight.dtype == torch.float32


@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial", "spatial_v2"])
def test_encoder_pools_output_shape(pool):
    torch.manual_seed(0)
    model = EncoderUNetModel(
        image_size=8,
        in_channels=4,
        model_channels=32,
        out_channels=5,
        num_res_blocks=1,
        attention_resolutions=(2,),
        channel_mult=(1, 2),
        num_head_channels=16,
        pool=pool,
    )
    _wake(model).eval()
    x, t = _inputs(batch=3)
    with torch.no_grad():
        logits = model(x, t)
    assert logits.shape == (3, 5)
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_superres_output_shape_and_uses_low_res():
    torch.manual_seed(0)
    model = _wake(SuperResModel(**{**BASE, "image_size": 16})).eval()
    assert model.input_blocks[0][0].in_channels == 8
    x, t = _inputs(size=16)
    low = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out = model(x, t, low_res=low)
        other = model(x, t, low_res=low + 1)
    assert out.shape == (2, 4, 16, 16)
    assert _max_abs(out, other) > 1e-4


def test_dims_1_unet():
    torch.manual_seed(0)
    model = _wake(UNetModel(**{**BASE, "dims": 1, "resblock_updown": True})).eval()
    x = torch.randn(2, 4, 16)
    with torch.no_grad():
        out = model(x, torch.tensor([1.5, 20.0]))
    assert out.shape == (2, 4, 16) and out.abs().max() > 0


def test_float_and_scalar_timesteps():
    model = _unet()
    x, _ = _inputs()
    with torch.no_grad():
        ints = model(x, torch.tensor([10, 10]))
        floats = model(x, torch.tensor([10.0, 10.0]))
        scalar = model(x, 10)
    torch.testing.assert_close(floats, ints, rtol=0, atol=0)
    torch.testing.assert_close(scalar, ints, rtol=0, atol=0)


def test_label_required_exactly_when_class_conditional():
    x, t = _inputs()
    with pytest.raises(ValueError):
        _unet(num_classes=3)(x, t)
    with pytest.raises(ValueError):
        _unet()(x, t, y=torch.tensor([0, 1]))


def _output_and_grads(model, x, t, y):
    model.zero_grad()
    out = model(x, t, y=y)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def test_fused_norm_computes_what_the_eager_ops_compute():
    """The GroupNorm + scale-shift + SiLU compiled into fused kernels
    (``benchmark --modes fast+fused``) gives the eager numbers, forward and
    backward; by default, and on the CPU unless forced, it runs eagerly."""
    assert not gd_nn._fused_norm_usable(torch.zeros(1))  # the default: eager on the CPU
    with fused_norm(None, "compile"):
        assert not gd_nn._fused_norm_usable(torch.zeros(1))  # auto: CUDA only
    model = _unet(num_classes=3, use_scale_shift_norm=True, resblock_updown=True)
    x, t = _inputs()
    y = torch.tensor([0, 2])
    ref, ref_grads = _output_and_grads(model, x, t, y)
    gd_nn._FUSED["fn"] = None
    with fused_norm(True, "compile"):
        out, grads = _output_and_grads(model, x, t, y)
    assert gd_nn._FUSED["fn"] is not None and gd_nn._FUSED["enabled"] is None  # it ran; the default is back
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fused_norm_that_fails_to_build_says_so_and_runs_eagerly(monkeypatch):
    def broken(*args):
        raise RuntimeError("no Triton here\nmore detail")

    monkeypatch.setattr(gd_nn, "_FUSED", {"enabled": None, "kernels": "compile", "fn": broken})
    monkeypatch.setattr(gd_nn, "_fused_norm_usable", lambda x: gd_nn._FUSED["enabled"] is not False)
    norm = gd_nn.normalization(64)
    x = torch.randn(2, 64, 4, 4)
    with pytest.warns(UserWarning, match=r"fused GroupNorm\+SiLU kernels failed to build \(RuntimeError: no Triton here\)"):
        out = gd_nn.norm_act(norm, x)
    torch.testing.assert_close(out, torch.nn.functional.silu(torch.nn.functional.group_norm(x, 32, norm.weight, norm.bias)))
    assert gd_nn._FUSED["enabled"] is False  # once: later calls go straight to the eager ops


def test_compiles_without_graph_breaks():
    model = _unet(num_classes=3)
    x, t = _inputs()
    y = torch.tensor([0, 2])
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(x.to(memory_format=torch.channels_last), t, y=y)
        ref = model(x, t, y=y)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Mixed-precision trainer
# ---------------------------------------------------------------------------


def test_trainer_fp32_is_plain_optimizer_step():
    model, twin = _unet(), _unet()
    logged = []
    trainer = fp16_util.MixedPrecisionTrainer(model=model, log_fn=lambda k, v: logged.append(k))
    opt = torch.optim.SGD(trainer.master_params, lr=0.1)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    x, t = _inputs()
    trainer.zero_grad()
    trainer.backward(model(x, t).square().mean())
    assert trainer.optimize(opt) is True
    twin(x, t).square().mean().backward()

    def global_norm(tensors):  # float64 reference
        flat = torch.cat([v.detach().double().flatten() for v in tensors])
        return torch.linalg.vector_norm(flat).float()

    # Norms are measured before the step, on the same weights and grads as the twin's.
    want_param = global_norm(twin.parameters())
    want_grad = global_norm(p.grad for p in twin.parameters())
    twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert logged == ["grad_norm", "param_norm"]
    torch.testing.assert_close(trainer.last_norms["param_norm"], want_param, rtol=1e-5, atol=0)
    torch.testing.assert_close(trainer.last_norms["grad_norm"], want_grad, rtol=1e-5, atol=0)


def test_trainer_fp16_step_skip_and_state_dict():
    model = _unet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = fp16_util.MixedPrecisionTrainer(model=model, use_fp16=True, initial_lg_loss_scale=10.0)
    assert model.dtype == torch.float16 and len(trainer.master_params) == 2
    # Round trip: masters -> state_dict (float32, same names) -> masters.
    state = trainer.master_params_to_state_dict(trainer.master_params)
    assert state.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    again = trainer.state_dict_to_master_params(state)
    for a, b in zip(again, trainer.master_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    opt = torch.optim.SGD(trainer.master_params, lr=0.1)
    x, t = _inputs()
    trainer.zero_grad()
    trainer.backward(model(x, t).square().mean())
    masters_before = [m.detach().clone() for m in trainer.master_params]
    assert trainer.optimize(opt) is True
    assert trainer.lg_loss_scale == pytest.approx(10.0 + 1e-3)
    assert any(not torch.equal(a, b) for a, b in zip(masters_before, trainer.master_params))
    # The fp16 model now holds the (rounded) updated master values.
    state = trainer.master_params_to_state_dict(trainer.master_params)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.float(), state[name].to(param.dtype).float())

    # An overflowing gradient skips the step and halves the loss scale.
    trainer.zero_grad()
    trainer.backward(model(x, t).square().mean())
    next(model.parameters()).grad.fill_(float("inf"))
    masters_before = [m.detach().clone() for m in trainer.master_params]
    assert trainer.optimize(opt) is False
    assert trainer.lg_loss_scale == pytest.approx(9.0 + 1e-3)
    for a, b in zip(masters_before, trainer.master_params):
        assert torch.equal(a, b)
