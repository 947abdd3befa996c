"""The hand-written Triton GroupNorm -> scale-shift -> SiLU kernels
(core/triton_norm.py), run on the CPU by Triton's interpreter, against the
eager ops they replace: outputs and every gradient."""

import pytest
import torch

from guided_diffusion_vae.core import nn as gd_nn
from guided_diffusion_vae.core import triton_norm
from guided_diffusion_vae.core.unet import UNetModel

pytest.importorskip("triton", reason="Triton is in the test extra (pip install -e '.[test]')")


def test_the_suite_runs_the_kernels_in_the_interpreter():
    assert triton_norm.interpreting()  # tests/conftest.py


def _norm(channels, seed=0):
    gen = torch.Generator().manual_seed(seed)
    norm = gd_nn.normalization(channels)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(channels, generator=gen))
        norm.bias.copy_(torch.randn(channels, generator=gen))
    return norm


def _channels_last(x):
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def _both(x, norm, modulate, act, dtype=torch.float32, inputs=None):
    """Outputs and gradients (x, weight, bias, emb) of the kernels and of the
    eager ops, computed in ``dtype`` from inputs rounded to ``inputs``."""
    gen = torch.Generator().manual_seed(1)
    inputs_dtype = inputs or dtype
    x = x.to(inputs_dtype).to(dtype).requires_grad_()
    n, c = x.shape[:2]
    spatial = (1,) * (x.dim() - 2)
    emb = (torch.randn(n, 2 * c, *spatial, generator=gen) * 0.5).to(inputs_dtype).to(dtype).requires_grad_()
    # chunk() gives strided views, as the ResBlock's scale-shift does
    scale, shift = emb.chunk(2, dim=1) if modulate else (None, None)
    upstream = torch.randn(x.shape, generator=gen).to(inputs_dtype).to(dtype)
    inputs = [x, norm.weight, norm.bias] + ([emb] if modulate else [])
    results = []
    for run in (triton_norm.group_norm_act, lambda *a: gd_nn._norm_act_math(
            a[0], a[1].weight, a[1].bias, a[1].num_groups, a[1].eps, *a[2:])):
        out = run(x, norm, scale, shift, act)
        grads = torch.autograd.grad((out.float() * upstream.float()).sum(), inputs)
        results.append((out.detach(), grads))
    return results


@pytest.mark.parametrize("shape, modulate, act", [
    ((2, 64, 4, 4), True, True),       # the ResBlock's scale-shift norm
    ((2, 64, 4, 4), False, True),      # norm + SiLU
    ((2, 64, 4, 4), False, False),     # GroupNorm32 alone
    ((3, 96, 5, 7), True, True),       # 3 channels a group, 35 positions: masked tiles
    ((2, 32, 48, 48), False, True),    # 2,304 positions: several tiles a group
    ((2, 64, 9), True, True),          # 1D
    ((1, 64, 2, 3, 4), False, True),   # 3D
    ((2, 256, 3, 3), True, True),      # channels-last: 8 channels a group, 8 groups a program
    ((2, 96, 3, 3), True, True),       # channels-last: 3 channels a group, a partial last program
    ((1, 4096, 2, 2), False, True),    # channels-last: 128 channels a group, one group a program
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_kernels_compute_what_the_eager_ops_compute(shape, modulate, act, channels_last):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 3 + 1
    if channels_last:  # (N, *spatial, C) in memory, as a channels_last UNet's activations
        x = _channels_last(x)
        assert triton_norm.is_channels_last(x)
    (out, grads), (ref, ref_grads) = _both(x, _norm(shape[1]), modulate, act)
    assert out.stride() == x.stride() and grads[0].stride() == x.stride()  # the layout is kept
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("x", "weight", "bias", "emb"), grads, ref_grads):
        assert want.abs().max() > 1e-3, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_bf16_stays_within_one_bf16_step_of_float32():
    """In bf16 the kernels compute in float32 and convert once at the end
    (Triton's interpreter truncates there, a GPU rounds to nearest); the
    eager ops round after each op. Both stay within a bf16 step or two of
    the float32 result from the same bf16 inputs."""
    x = torch.randn(2, 64, 4, 4, generator=torch.Generator().manual_seed(3)) * 3 + 1
    norm = _norm(64)
    (exact, exact_grads), _ = _both(x, norm, True, True, torch.float32, inputs=torch.bfloat16)
    (out, grads), (ref, ref_grads) = _both(x, norm, True, True, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and all(g.dtype == w.dtype for g, w in zip(grads, ref_grads))
    # one bf16 step of the value: 2**-7 relative
    assert ((out.float() - exact).abs() <= exact.abs() * 2 ** -7 + 1e-6).all()
    assert ((ref.float() - exact).abs() <= exact.abs() * 2 ** -6 + 2 ** -8).all()
    for got, want in zip(grads, exact_grads):
        torch.testing.assert_close(got.float(), want, rtol=2 ** -6, atol=2 ** -6 * want.abs().max().item())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_unet_with_the_kernels_matches_eager_forward_and_backward(layout):
    """The whole network through the kernels, in NCHW or with channels-last
    weights (nn.to_fast_layout), whose activations then all run in that
    layout through the channels-last kernels."""
    torch.manual_seed(0)
    model = UNetModel(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                      attention_resolutions=(2,), channel_mult=(1, 2), num_classes=3, num_head_channels=16,
                      use_scale_shift_norm=True)
    for p in model.parameters():  # zero-initialised output layers would hide gradients
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    if layout == "channels_last":
        with gd_nn.channels_last(True):
            gd_nn.to_fast_layout(model, "cpu")
    x = torch.randn(1, 4, 8, 8)  # one sample: the interpreter runs each (sample, group) program in Python
    t = torch.tensor([700])
    y = torch.tensor([2])

    def run():
        model.zero_grad()
        out = model(x, t, y=y)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    calls = []
    real = triton_norm.group_norm_act
    ref, ref_grads = run()
    with gd_nn.fused_norm(True, "triton"):
        triton_norm.group_norm_act = lambda x, *a, **k: calls.append(triton_norm.is_channels_last(x)) or real(x, *a, **k)
        try:
            out, grads = run()
        finally:
            triton_norm.group_norm_act = real
    # every norm of the network went through the kernels, once a call
    assert len(calls) == sum(isinstance(m, gd_nn.GroupNorm32) for m in model.modules()) == 21
    assert all(calls) if layout == "channels_last" else not any(calls)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_layouts_the_kernels_do_not_take_run_eagerly():
    norm = _norm(64)
    x = torch.randn(2, 64, 4, 4)
    assert triton_norm.supported(x, norm, None, None)
    assert triton_norm.supported(x.to(memory_format=torch.channels_last), norm, None, None)
    assert not triton_norm.supported(x[:, :, :, ::2], norm, None, None)  # strided: neither layout
    assert not triton_norm.supported(torch.randn(2, 64), norm, None, None)  # no spatial dimension
    assert not triton_norm.supported(x, norm, torch.zeros(2, 64, 1, 1), None)  # scale without shift
    with gd_nn.fused_norm(True, "triton"):
        strided = torch.randn(2, 64, 4, 8)[:, :, :, ::2]
        torch.testing.assert_close(gd_nn.norm_act(norm, strided), gd_nn.norm_act(norm, strided.contiguous()))


def test_kernels_that_fail_to_build_say_so_once_and_run_eagerly(monkeypatch):
    def broken(*args):
        raise RuntimeError("PTX assembly failed\nmore detail")

    monkeypatch.setattr(triton_norm, "group_norm_act", broken)
    # None (automatic) as on a GPU: a build failure warns; True (forced) would raise
    monkeypatch.setattr(gd_nn, "_fused_norm_usable", lambda x: gd_nn._FUSED["enabled"] is not False)
    norm = _norm(64)
    x = torch.randn(2, 64, 4, 4)
    with gd_nn.fused_norm(None, "triton"):
        with pytest.warns(UserWarning, match=r"failed to build \(RuntimeError: PTX assembly failed\)"):
            out = gd_nn.norm_act(norm, x)
        assert gd_nn._FUSED["enabled"] is False  # later calls go straight to the eager ops
    torch.testing.assert_close(out, torch.nn.functional.silu(torch.nn.functional.group_norm(x, 32, norm.weight, norm.bias)))


def test_an_unknown_kind_of_fused_kernels_is_refused():
    with pytest.raises(ValueError, match=r"fused norm kernels must be one of \('triton', 'compile'\), got 'cuda'"):
        gd_nn.set_fused_norm(None, "cuda")
    assert gd_nn._FUSED["enabled"] is None and gd_nn._FUSED["kernels"] == "triton"


def test_by_default_the_kernels_run_on_cuda_tensors_only():
    """The default (None): Triton's kernels for a tensor on a GPU, the eager
    ops on the CPU; False turns them off everywhere."""
    import types

    on_gpu = types.SimpleNamespace(is_cuda=True)
    assert gd_nn._FUSED["enabled"] is None
    assert gd_nn._fused_norm_usable(on_gpu)
    assert not gd_nn._fused_norm_usable(torch.zeros(1))
    with gd_nn.fused_norm(False):
        assert not gd_nn._fused_norm_usable(on_gpu)


def test_kernels_compile_for_an_h100_without_one(tmp_path):
    """The kernels build into sm_90 machine code (Triton's own ptxas, no
    GPU needed): the interpreter alone would not catch what only the
    compiler refuses. Eight kernels, each in a second or two on the CPU."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # built here, not taken from an earlier run
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, os.path.join(root, "tests", "helpers", "compile_triton_kernels.py")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    built = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(built) == sorted([f"{k}/{m}/{a}" for k in ("forward", "backward")
                                    for m, a in ((True, True), (False, True), (False, False))]
                                   + ["forward_last/True/True", "backward_last/True/True",
                                      "forward/True/True/input_bias", "forward_last/True/True/input_bias",
                                      "biased_residual/nchw", "biased_residual/last"])
    for name, (cubin_bytes, seconds, hopper) in built.items():
        assert cubin_bytes > 10_000 and hopper, name


def test_the_fast_layout_follows_the_fused_norms():
    """nn.to_fast_layout stores 4-D weights channels-last only where the
    Triton kernels run (by default a GPU), since the eager GroupNorm is slow
    in that layout; set_channels_last overrides it either way."""
    def layout_after(**settings):
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Conv1d(8, 8, 1))
        with gd_nn.fused_norm(*settings.get("fused", (None,))), gd_nn.channels_last(settings.get("last")):
            gd_nn.to_fast_layout(model, "cpu")
        assert model[1].weight.is_contiguous()  # only 4-D weights have a channels-last layout
        return "last" if not model[0].weight.is_contiguous() else "plain"

    assert layout_after() == "plain"  # the CPU: eager norms
    assert layout_after(fused=(True, "triton")) == "last"
    assert layout_after(fused=(True, "compile")) == "plain"
    assert layout_after(fused=(True, "triton"), last=False) == "plain"
    assert layout_after(last=True) == "last"
    assert gd_nn._CHANNELS_LAST["enabled"] is None


def _small_unet():
    torch.manual_seed(0)
    return UNetModel(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                     attention_resolutions=(2,), channel_mult=(1, 2), num_classes=3, num_head_channels=16,
                     use_scale_shift_norm=True, dropout=0.1)


def test_build_ahead_finds_every_kernel_a_training_step_launches(monkeypatch):
    """record_launches, from one eager forward pass, names each distinct
    kernel that a real forward and backward launch; build_ahead builds each
    of them once, in threads. (Channels-last: the same recording as NCHW,
    and 15x faster in the interpreter.)"""
    import threading

    model = _small_unet().to(memory_format=torch.channels_last)
    # one sample: the interpreter runs each program in Python
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([600]), torch.tensor([2])
    launched = {}
    real_run = triton_norm._run
    monkeypatch.setattr(triton_norm, "_run", lambda launch: launched.setdefault(
        triton_norm._build_key(launch), launch) and None or real_run(launch))
    with gd_nn.fused_norm(True, "triton"):
        model(x, t, y=y).square().mean().backward()
        assert launched  # the real step went through the kernels
        launched_now = dict(launched)
        launched.clear()
        recorded = triton_norm.record_launches(lambda: model(x, t, y=y))
        assert not launched  # recording launched nothing
        built, threads = [], set()

        def build(launch, device):
            threads.add(threading.get_ident())
            built.append(triton_norm._build_key(launch))
        count, seconds = triton_norm.build_ahead(lambda: model(x, t, y=y), threads=4, build=build)
        forward_only = triton_norm.record_launches(lambda: model(x, t, y=y), backward=False)
    assert set(recorded) == set(launched_now)
    kernels = {key[0] for key in recorded}
    assert len(kernels) == 2  # the forward and the backward kernel of this layout
    assert sorted(built, key=repr) == sorted(recorded, key=repr) and count == len(recorded) and seconds >= 0
    assert len(threads) > 1 or len(recorded) == 1
    assert set(forward_only) == {k for k in recorded if k[0] is triton_norm._kernels(True)[0]}
    assert not triton_norm.recording()


def test_building_ahead_leaves_the_random_stream_alone():
    """The build-ahead forward pass runs dropout, which draws random
    numbers; the run's own stream must not notice."""
    model = _small_unet().train()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 600])
    assert gd_nn.build_norm_kernels_ahead(lambda: model(x, t, y=torch.tensor([0, 1])), "cpu") is None  # CPU: eager
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    with gd_nn.fused_norm(True, "triton"):
        assert gd_nn.build_norm_kernels_ahead(lambda: model(x, t, y=torch.tensor([0, 1])), "cpu") == (0, 0.0)
    assert torch.equal(torch.rand(3), expected)


def test_a_failed_build_ahead_warns_and_leaves_the_kernels_to_the_first_launch(monkeypatch):
    """By default (fused where possible) a build-ahead failure costs only
    the head start: a warning, and None; forced on, it raises."""
    def broken(*args, **kwargs):
        raise RuntimeError("warmup() got an unexpected keyword argument 'grid'\nmore")

    monkeypatch.setattr(triton_norm, "build_ahead", broken)
    monkeypatch.setattr(gd_nn, "_fused_norm_usable", lambda x: gd_nn._FUSED["enabled"] is not False)
    with gd_nn.fused_norm(None, "triton"):
        with pytest.warns(UserWarning, match=r"building the fused GroupNorm\+SiLU kernels ahead failed "
                                             r"\(RuntimeError: warmup\(\) got an unexpected keyword"):
            assert gd_nn.build_norm_kernels_ahead(lambda: None, "cpu") is None
        assert gd_nn._FUSED["enabled"] is None  # the kernels themselves stay on
    with gd_nn.fused_norm(True, "triton"), pytest.raises(RuntimeError, match="unexpected keyword"):
        gd_nn.build_norm_kernels_ahead(lambda: None, "cpu")


def _rounded_as_the_kernels_round(values, dtype):
    """float32 ``values`` in ``dtype`` as the kernels round them: to nearest
    on a GPU, but Triton's CPU interpreter truncates float32 -> bf16."""
    if dtype == torch.bfloat16 and triton_norm.interpreting():
        return (values.float().view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
    return values.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_folded_convolution_bias_gives_the_same_numbers(dtype, channels_last):
    """Without gradients (sampling), a convolution may leave its bias to the
    norm after it (norm_act's input_bias) and to the residual add
    (biased_residual): the kernels round x + bias to x's dtype as the
    convolution's own add does, so the results are the same bit for bit
    (bf16 here rounded as the interpreter rounds; .exp GPU check: as torch)."""
    gen = torch.Generator().manual_seed(3)
    norm = _norm(64)
    x = torch.randn(2, 64, 5, 6, generator=gen).to(dtype)
    skip = torch.randn(2, 64, 5, 6, generator=gen)  # float32: the residual stream may be wider than h
    bias = torch.randn(64, generator=gen).to(dtype)
    emb = torch.randn(2, 128, 1, 1, generator=gen).to(dtype)
    scale, shift = emb.chunk(2, dim=1)
    if channels_last:
        x, skip = _channels_last(x), _channels_last(skip)
    biased = _rounded_as_the_kernels_round(x.float() + bias.float().view(1, -1, 1, 1), dtype)
    launched = []
    real = triton_norm._run
    with torch.no_grad(), gd_nn.fused_norm(True, "triton"):
        triton_norm._run = lambda launch: launched.append(launch[0].__name__) or real(launch)
        try:
            assert gd_nn.folds_conv_bias(x)
            folded = gd_nn.norm_act(norm, x, scale, shift, input_bias=bias)
            separate = gd_nn.norm_act(norm, biased, scale, shift)
            residual = gd_nn.biased_residual(skip, x, bias)
        finally:
            triton_norm._run = real
    kind = "_last" if channels_last else ""
    assert launched == [f"forward{kind}", f"forward{kind}", "biased_residual"]
    assert torch.equal(folded, separate) and folded.dtype == dtype
    assert triton_norm.is_channels_last(folded) == channels_last
    want = skip + biased
    assert torch.equal(residual, want) and residual.dtype == torch.float32 and residual.stride() == want.stride()
    with gd_nn.fused_norm(True, "triton"):
        assert not gd_nn.folds_conv_bias(x)  # gradients on: the kernels that fold have no backward pass
        with torch.no_grad():
            assert gd_nn.folds_conv_bias(x)
    with torch.no_grad():
        assert not gd_nn.folds_conv_bias(x)  # the CPU by default: eager ops, the convolution adds its bias


def test_sampling_folds_the_resblock_biases_and_builds_those_kernels_ahead(monkeypatch):
    """The UNet without gradients, through the kernels: every scale-shift
    ResBlock folds its two convolution biases (one norm with input_bias and
    one biased residual each), the output matches the unfolded network, and
    the build-ahead's recording without gradients finds exactly the kernels
    the sampling pass launches."""
    from guided_diffusion_vae.core import unet as unet_module

    model = _small_unet().eval().to(memory_format=torch.channels_last)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else torch.nn.init.normal_(p, std=0.5)
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([600]), torch.tensor([2])
    launched = {}
    real_run = triton_norm._run
    monkeypatch.setattr(triton_norm, "_run", lambda launch: launched.setdefault(
        triton_norm._build_key(launch), []).append(launch) or real_run(launch))
    resblocks = sum(isinstance(m, unet_module.ResBlock) for m in model.modules())
    with torch.no_grad(), gd_nn.fused_norm(True, "triton"):
        folded = model(x, t, y=y)
        calls = [launch for launches in launched.values() for launch in launches]
        assert sum(launch[3].get("INPUT_BIAS", False) for launch in calls) == resblocks
        assert sum(launch[0] is triton_norm._residual_kernel() for launch in calls) == resblocks
        recorded = triton_norm.record_launches(lambda: model(x, t, y=y), backward=False)
        assert set(recorded) == set(launched)
        monkeypatch.setattr(unet_module, "folds_conv_bias", lambda h: False)
        unfolded = model(x, t, y=y)
    torch.testing.assert_close(folded, unfolded, rtol=1e-5, atol=1e-6)


def test_training_convolutions_take_their_bias_gradient_from_one_product():
    """Where the kernels run, a bf16 training convolution adds its own bias
    (nn.Conv2d, as conv_nd builds it) so that the bias gradient is one
    ``ones @ grad`` product over the channels-last rows: the same output and
    input/weight gradients as torch's convolution, and the bias gradient the
    float32 sum rounded once. Without gradients, in float32, or where the
    kernels do not run, it is torch's own convolution."""
    gen = torch.Generator().manual_seed(0)
    conv = gd_nn.conv_nd(2, 8, 16, kernel_size=3, padding=1)
    assert isinstance(conv, torch.nn.Conv2d)
    plain = torch.nn.Conv2d(8, 16, kernel_size=3, padding=1)
    plain.load_state_dict(conv.state_dict())  # the same parameter names
    for layer in (conv, plain):
        layer.to(memory_format=torch.channels_last)
    x = _channels_last(torch.randn(4, 8, 12, 12, generator=gen))
    grad = torch.randn(4, 16, 12, 12, generator=gen).to(torch.bfloat16)
    results = {}
    for name, layer, fused in (("product", conv, True), ("torch", plain, True)):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        with gd_nn.fused_norm(fused), torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(xi)
        results[name] = (out, xi, layer)
        out.backward(_channels_last(grad))
    out, xi, _ = results["product"]
    ref, xr, _ = results["torch"]
    assert "ChannelBiasAdd" in type(out.grad_fn).__name__ and out.dtype == torch.bfloat16
    assert "ChannelBiasAdd" not in type(ref.grad_fn).__name__
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=2 * 2.0 ** -8 * ref.abs().max().item())
    torch.testing.assert_close(xi.grad, xr.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(conv.weight.grad, plain.weight.grad, rtol=1e-2, atol=1e-2)
    exact = grad.float().sum(dim=(0, 2, 3))
    assert conv.bias.grad.dtype == torch.float32
    assert (conv.bias.grad - exact).abs().max() <= 2.0 ** -8 * exact.abs().max()  # one bf16 rounding
    # a gradient in the other layout takes torch's reduction: the same sum
    conv.zero_grad()
    xi = x.clone().requires_grad_()
    with gd_nn.fused_norm(True), torch.autocast("cpu", dtype=torch.bfloat16):
        conv(xi).backward(grad.contiguous())
    assert (conv.bias.grad - exact).abs().max() <= 2.0 ** -8 * exact.abs().max()

    def kind(fused=True, grad_on=True, autocast=True):
        with gd_nn.fused_norm(fused), torch.set_grad_enabled(grad_on), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = conv(x)
        return "product" if out.grad_fn is not None and "ChannelBiasAdd" in type(out.grad_fn).__name__ else "torch"

    assert kind() == "product"
    assert kind(grad_on=False) == "torch"
    assert kind(autocast=False) == "torch"  # float32
    assert kind(fused=False) == "torch"
    with gd_nn.fused_norm(True):
        assert not gd_nn.bias_grad_by_product(torch.zeros(2, 8, 4, requires_grad=True))  # not 2-D
