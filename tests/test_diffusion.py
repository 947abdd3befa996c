"""Behaviour of the diffusion core beyond the golden numbers: samplers,
validation, the noise extension, timestep mapping and the training path."""

import numpy as np
import pytest
import torch

from guided_diffusion_vae.core import gaussian_diffusion as gd
from guided_diffusion_vae.runtime.errors import UserError
from guided_diffusion_vae.core.resample import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)
from guided_diffusion_vae.core.respace import SpacedDiffusion, space_timesteps


def make_diffusion(
    steps=8,
    *,
    learn_sigma=False,
    mean_type=gd.ModelMeanType.EPSILON,
    loss_type=gd.LossType.MSE,
    schedule="cosine",  # the linear schedule needs at least ~20 steps
    spacing=None,
    rescale=False,
):
    kwargs = dict(
        betas=gd.get_named_beta_schedule(schedule, steps),
        model_mean_type=mean_type,
        model_var_type=gd.ModelVarType.LEARNED_RANGE if learn_sigma else gd.ModelVarType.FIXED_LARGE,
        loss_type=loss_type,
        rescale_timesteps=rescale,
    )
    if spacing is None:
        return gd.GaussianDiffusion(**kwargs)
    return SpacedDiffusion(space_timesteps(steps, spacing), **kwargs)


class ToyModel(torch.nn.Module):
    """eps = a * tanh(x) + 0.001 t; with learn_sigma a second half b * sin(x).

    Records the timesteps it is called with.
    """

    def __init__(self, learn_sigma=False):
        super().__init__()
        self.learn_sigma = learn_sigma
        self.a = torch.nn.Parameter(torch.tensor(0.5))
        self.b = torch.nn.Parameter(torch.tensor(0.8))
        self.seen = []

    def forward(self, x, t, **kwargs):
        self.seen.append(t.detach().clone())
        eps = self.a * torch.tanh(x) + 0.001 * t.float().view(-1, *([1] * (x.dim() - 1)))
        if self.learn_sigma:
            return torch.cat([eps, self.b * torch.sin(x)], dim=1)
        return eps


def _one_line(err):
    message = str(err.value)
    assert "\n" not in message
    return message


# -- validation ------------------------------------------------------------


def test_unknown_noise_schedule_names_value_and_valid_ones():
    with pytest.raises(UserError) as err:
        gd.get_named_beta_schedule("sigmoid", 100)
    message = _one_line(err)
    assert "'sigmoid'" in message and "linear" in message and "cosine" in message
    assert isinstance(err.value, ValueError)
    with pytest.raises(UserError, match="more than 20"):
        gd.get_named_beta_schedule("linear", 20)  # its last beta would be 1


@pytest.mark.parametrize(
    "steps, spec, why",
    [
        (1000, "ddim37", "stride"),  # 1000 steps: strides give 34, 35, 36, 38, ... but never 37
        (1000, "ddim1", "stride"),
        (100, "10,60", "fewer than the 60"),  # each of the two sections has 50 steps
        (1000, "fast", "malformed"),
        (1000, "ddim", "malformed"),
        (1000, "10,,5", "malformed"),
        (1000, "-5", "malformed"),
        (1000, "0", "no steps"),
    ],
)
def test_unmeetable_respacing_names_spec_and_reason(steps, spec, why):
    with pytest.raises(UserError) as err:
        space_timesteps(steps, spec)
    message = _one_line(err)
    assert repr(spec) in message and why in message


def test_space_timesteps_picks_original_steps():
    assert sorted(space_timesteps(1000, "ddim7")) == list(range(0, 1000, 143))
    assert space_timesteps(100, [100]) == set(range(100))
    sections = sorted(space_timesteps(300, "10,15,20"))
    assert len(sections) == 45
    assert sections[0] == 0 and sections[9] == 99  # both ends of the first section
    assert sections[10] == 100 and sections[-1] == 299
    assert sorted(space_timesteps(10, "1")) == [0]


def test_unknown_schedule_sampler():
    with pytest.raises(UserError) as err:
        create_named_schedule_sampler("importance", make_diffusion())
    assert "'importance'" in _one_line(err) and "loss-second-moment" in str(err.value)
    diffusion = make_diffusion()
    assert isinstance(create_named_schedule_sampler("uniform", diffusion), UniformSampler)
    assert isinstance(create_named_schedule_sampler("loss-second-moment", diffusion), LossSecondMomentResampler)


# -- forward process ---------------------------------------------------------


def test_q_sample_statistics_match_q_mean_variance():
    torch.manual_seed(0)
    diffusion = make_diffusion(50)
    n = 20000
    x_start = torch.full((n, 1, 2, 2), 0.7)
    t = torch.full((n,), 30, dtype=torch.long)
    x_t = diffusion.q_sample(x_start, t)
    mean, var, log_var = diffusion.q_mean_variance(x_start, t)
    abar = diffusion.alphas_cumprod[30]
    assert mean.shape == var.shape == log_var.shape == x_start.shape
    assert torch.allclose(mean, torch.full_like(mean, 0.7 * abar**0.5))
    assert torch.allclose(var, torch.full_like(var, 1 - abar))
    assert torch.allclose(log_var.exp(), var, rtol=1e-5)
    std = (1 - abar) ** 0.5
    assert abs(x_t.mean().item() - 0.7 * abar**0.5) < 4 * std / (4 * n) ** 0.5
    assert abs(x_t.var().item() / (1 - abar) - 1) < 0.03
    # Explicit noise gives exactly sqrt(abar) x0 + sqrt(1 - abar) noise.
    noise = torch.randn_like(x_start)
    expected = abar**0.5 * x_start + std * noise
    assert torch.allclose(diffusion.q_sample(x_start, t, noise=noise), expected, atol=1e-6)


def test_coefficients_equal_float64_gather_then_cast():
    diffusion = make_diffusion(1000, schedule="cosine")
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    for name in ("sqrt_recipm1_alphas_cumprod", "posterior_log_variance_clipped", "alphas_cumprod"):
        expected = torch.from_numpy(getattr(diffusion, name))[t].float().view(-1, 1, 1)
        assert torch.equal(diffusion._coef(name, t, 3), expected), name


# -- sampling ----------------------------------------------------------------


@pytest.mark.parametrize("method, extra", [("p_sample", {}), ("ddim_sample", {"eta": 0.7})])
def test_explicit_noise_equals_the_randn_path(method, extra):
    diffusion = make_diffusion(10, learn_sigma=True)
    model = ToyModel(learn_sigma=True)
    x = torch.randn(3, 2, 4, 4)
    t = torch.tensor([5, 0, 9])
    step = getattr(diffusion, method)
    with torch.no_grad():
        torch.manual_seed(123)
        drawn = step(model, x, t, **extra)
        torch.manual_seed(123)
        noise = torch.randn_like(x)
        given = step(model, x, t, noise=noise, **extra)
        silent = step(model, x, t, noise=torch.zeros_like(x), **extra)
    assert torch.equal(drawn["sample"], given["sample"])
    assert torch.equal(drawn["pred_xstart"], given["pred_xstart"])
    # The noise matters except at t == 0 (sample 1), where none is added.
    assert not torch.equal(silent["sample"][0], given["sample"][0])
    assert torch.equal(silent["sample"][1], given["sample"][1])


def test_spaced_model_and_cond_fn_see_original_timesteps():
    diffusion = make_diffusion(100, spacing="ddim10")
    assert diffusion.timestep_map == list(range(0, 100, 10))
    model, cond_seen = ToyModel(), []

    def cond_fn(x, t, **kwargs):
        cond_seen.append(t.clone())
        return torch.zeros_like(x)

    x, t = torch.randn(2, 1, 4, 4), torch.tensor([3, 9])
    with torch.no_grad():
        diffusion.p_sample(model, x, t, cond_fn=cond_fn)
        diffusion.ddim_sample(model, x, t, cond_fn=cond_fn)
    diffusion.training_losses(model, x, t)
    for seen in model.seen + cond_seen:
        assert seen.tolist() == [30, 90]
    assert len(cond_seen) == 2

    rescaled = make_diffusion(100, spacing="ddim10", rescale=True)
    model = ToyModel()
    with torch.no_grad():
        rescaled.p_sample(model, x, t)
    assert model.seen[-1].dtype == torch.float32 and model.seen[-1].tolist() == [300.0, 900.0]
    plain = make_diffusion(100, rescale=True)
    with torch.no_grad():
        plain.p_sample(model, x, t)
    assert model.seen[-1].tolist() == [30.0, 90.0]


def test_sample_loops_shapes_and_determinism():
    diffusion = make_diffusion(20, learn_sigma=True, spacing="5")
    model = ToyModel(learn_sigma=True)
    noise = torch.randn(2, 2, 4, 4)
    steps = list(diffusion.ddim_sample_loop_progressive(model, (2, 2, 4, 4), noise=noise))
    assert len(steps) == 5
    final = diffusion.ddim_sample_loop(model, (2, 2, 4, 4), noise=noise)
    assert torch.equal(final, steps[-1]["sample"])
    torch.manual_seed(1)
    ancestral = diffusion.p_sample_loop(model, (2, 2, 4, 4))
    assert ancestral.shape == (2, 2, 4, 4) and torch.isfinite(ancestral).all()
    # Reverse DDIM from x0 followed by forward DDIM is (nearly) an identity.
    x0 = torch.rand(2, 2, 4, 4) * 0.5
    with torch.no_grad():
        up = diffusion.ddim_reverse_sample(model, x0, torch.tensor([0, 0]), clip_denoised=False)
        down = diffusion.ddim_sample(model, up["sample"], torch.tensor([1, 1]), clip_denoised=False)
    assert down["sample"].shape == x0.shape
    with pytest.raises(ValueError):
        diffusion.ddim_reverse_sample(model, x0, torch.tensor([0, 0]), eta=0.5)


# -- training losses -----------------------------------------------------------


def test_training_loss_terms_and_frozen_mean():
    torch.manual_seed(0)
    x0 = torch.rand(4, 2, 4, 4) * 2 - 1
    t = torch.tensor([0, 3, 7, 9])
    noise = torch.randn_like(x0)
    model = ToyModel(learn_sigma=True)
    plain = make_diffusion(10, learn_sigma=True).training_losses(model, x0, t, noise=noise)
    assert set(plain) == {"loss", "mse", "vb"}
    assert all(v.shape == (4,) for v in plain.values())
    assert torch.allclose(plain["loss"], plain["mse"] + plain["vb"])
    rescaled = make_diffusion(10, learn_sigma=True, loss_type=gd.LossType.RESCALED_MSE)
    terms = rescaled.training_losses(model, x0, t, noise=noise)
    assert torch.allclose(terms["vb"], plain["vb"] * 10 / 1000)
    # The VB term trains the variance only: no gradient reaches the mean half.
    terms["vb"].sum().backward()
    assert model.a.grad is None or model.a.grad.abs().item() == 0
    assert model.b.grad is not None and model.b.grad.abs().item() > 0

    fixed = ToyModel()
    kl = make_diffusion(10, loss_type=gd.LossType.KL).training_losses(fixed, x0, t, noise=noise)
    rkl = make_diffusion(10, loss_type=gd.LossType.RESCALED_KL).training_losses(fixed, x0, t, noise=noise)
    assert set(kl) == {"loss"} and torch.allclose(rkl["loss"], kl["loss"] * 10)
    mse = make_diffusion(10).training_losses(fixed, x0, t, noise=noise)
    assert set(mse) == {"loss", "mse"}
    expected = ((fixed(make_diffusion(10).q_sample(x0, t, noise), t) - noise) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(mse["mse"], expected)


def test_training_path_never_needs_the_host():
    # Tensors on the meta device have no values: .item(), .cpu(), numpy
    # round trips or data-dependent control flow would raise here.
    for diffusion, learn_sigma in [
        (make_diffusion(10, learn_sigma=True, loss_type=gd.LossType.RESCALED_MSE), True),
        (make_diffusion(100, spacing="ddim10", learn_sigma=True), True),
        (make_diffusion(10, loss_type=gd.LossType.RESCALED_KL), False),
    ]:
        x0 = torch.empty(4, 2, 4, 4, device="meta")
        t, weights = UniformSampler(diffusion).sample(4, torch.device("meta"))
        model = ToyModel(learn_sigma).to("meta")
        terms = diffusion.training_losses(model, x0, t)
        assert terms["loss"].device.type == "meta" and terms["loss"].shape == (4,)
        assert (terms["loss"] * weights).mean().shape == ()


def test_calc_bpd_loop_shapes_and_finiteness():
    torch.manual_seed(0)
    steps = 5
    diffusion = make_diffusion(steps, learn_sigma=True)
    x0 = torch.rand(3, 2, 4, 4) * 2 - 1
    out = diffusion.calc_bpd_loop(ToyModel(learn_sigma=True), x0)
    assert out["total_bpd"].shape == out["prior_bpd"].shape == (3,)
    for key in ("vb", "xstart_mse", "mse"):
        assert out[key].shape == (3, steps), key
    for key, value in out.items():
        assert torch.isfinite(value).all(), key
    assert torch.allclose(out["total_bpd"], out["vb"].sum(dim=1) + out["prior_bpd"])
    assert (out["prior_bpd"] >= 0).all()
    assert (out["vb"][:, :-1] >= -1e-6).all()  # KL terms (t = T-1 .. 1) are non-negative


# -- schedule samplers ---------------------------------------------------------


def test_uniform_sampler_draws_with_torch_on_the_device():
    diffusion = make_diffusion(50)
    sampler = UniformSampler(diffusion)
    assert np.array_equal(sampler.weights(), np.ones(50))
    numpy_state = np.random.get_state()[1].copy()
    torch.manual_seed(7)
    t, w = sampler.sample(64, torch.device("cpu"))
    torch.manual_seed(7)
    t_again, _ = sampler.sample(64, torch.device("cpu"))
    assert np.array_equal(np.random.get_state()[1], numpy_state)  # numpy untouched
    assert torch.equal(t, t_again)  # reproducible from torch's generator
    assert t.dtype == torch.long and t.shape == (64,) and 0 <= t.min() and t.max() < 50
    assert w.dtype == torch.float32 and torch.equal(w, torch.ones(64))
    t_meta, w_meta = sampler.sample(8, torch.device("meta"))
    assert t_meta.device.type == "meta" and w_meta.device.type == "meta"


def test_loss_second_moment_warm_up_and_weights():
    steps, history, uniform = 4, 3, 0.1
    sampler = LossSecondMomentResampler(make_diffusion(steps), history_per_term=history, uniform_prob=uniform)
    losses = {t: [1.0 + t, 2.0 + 2 * t, 0.5 * (t + 1)] for t in range(steps)}
    for k in range(history - 1):
        sampler.update_with_all_losses(list(range(steps)), [losses[t][k] for t in range(steps)])
    assert np.array_equal(sampler.weights(), np.ones(steps))
    # Every step but the last reaches a full history: still uniform.
    sampler.update_with_all_losses([0, 1, 2], [losses[t][2] for t in range(3)])
    assert np.array_equal(sampler.weights(), np.ones(steps))
    # The tensor entry point (no process group) completes the warm-up.
    sampler.update_with_local_losses(torch.tensor([3]), torch.tensor([losses[3][2]], dtype=torch.float64))

    def expected_weights():
        rms = np.array([np.sqrt(np.mean(np.square(losses[t]))) for t in range(steps)])
        return rms / rms.sum() * (1 - uniform) + uniform / steps

    assert np.allclose(sampler.weights(), expected_weights())
    assert np.isclose(sampler.weights().sum(), 1.0)
    # A full history drops its oldest loss.
    sampler.update_with_all_losses([0], [10.0])
    losses[0] = losses[0][1:] + [10.0]
    assert np.allclose(sampler.weights(), expected_weights())

    # Importance weights undo the non-uniform draw: w = 1 / (T p(t)).
    np.random.seed(0)
    t, w = sampler.sample(4000, torch.device("cpu"))
    p = expected_weights()
    assert torch.allclose(w, torch.from_numpy(1.0 / (steps * p[t.numpy()])).float())
    freq = np.bincount(t.numpy(), minlength=steps) / 4000
    assert np.allclose(freq, p, atol=0.03)
    assert abs(w.mean().item() - 1.0) < 0.05


def test_loss_second_moment_state_round_trip(tmp_path):
    diffusion = make_diffusion(4)
    sampler = LossSecondMomentResampler(diffusion, history_per_term=2)
    sampler.update_with_all_losses([0, 1, 2, 3, 0, 1, 2, 3, 2], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    torch.save(sampler.state_dict(), tmp_path / "sampler.pt")
    restored = LossSecondMomentResampler(diffusion, history_per_term=2)
    restored.load_state_dict(torch.load(tmp_path / "sampler.pt", weights_only=True))
    assert np.array_equal(restored.weights(), sampler.weights())
    assert not np.array_equal(restored.weights(), np.ones(4))
    with pytest.raises(ValueError):
        LossSecondMomentResampler(diffusion, history_per_term=3).load_state_dict(sampler.state_dict())
