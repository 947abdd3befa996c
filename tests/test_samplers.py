"""The sampler table: every sampler reaches the data distribution of a model
whose epsilon is exact, the diffusers DDIM agrees with the core's DDIM, noise
is per sample, and the step counts follow --timestep_respacing."""

import numpy as np
import pytest
import torch

from guided_diffusion_vae.core import script_util
from guided_diffusion_vae.core.respace import space_timesteps
from guided_diffusion_vae.runtime.errors import UserError
from guided_diffusion_vae.core.sample_loop import generate_samples, sample_generator
from guided_diffusion_vae.core.samplers import (
    SAMPLER_NAMES,
    SAMPLERS,
    Denoiser,
    SamplingPlan,
    ddim_respacing,
    diffusers_loop,
    resolve_sampler,
    sampler_steps,
)

DATA_STD = 0.5  # the toy data: x0 ~ N(mean_y, DATA_STD^2) per pixel, mean_y = +1 or -1 by class


def _diffusion(respacing=""):
    return script_util.create_gaussian_diffusion(steps=1000, noise_schedule="linear", timestep_respacing=respacing)


class ExactEps(torch.nn.Module):
    """The optimal epsilon for Gaussian data N(m_y, s^2): with x_t = sqrt(a) x0 +
    sqrt(1-a) eps, E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) m) / (a s^2 + 1 - a)."""

    def __init__(self, diffusion):
        super().__init__()
        self.abar = torch.tensor(diffusion.alphas_cumprod, dtype=torch.float64)
        self.calls = 0

    def forward(self, x, t, y=None):
        self.calls += 1
        a = self.abar.to(x.device)[t.long()].float().view(-1, 1, 1, 1)
        mean = torch.ones_like(x) if y is None else (2.0 * y.float() - 1.0).view(-1, 1, 1, 1).expand_as(x)
        return (1 - a).sqrt() * (x - a.sqrt() * mean) / (a * DATA_STD**2 + 1 - a)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_reaches_the_data_distribution(name):
    # First-order solvers lose variance with few steps (measured here at 20
    # steps: euler 0.43, euler_a 0.39; at 200 both 0.49), so they get more.
    steps = 60 if name in ("euler", "euler_a", "ddpm") else 20
    base = _diffusion()
    diffusion = _diffusion(f"ddim{steps}" if name == "ddim" else str(steps)) if name in ("ddpm", "ddim") else base
    model = ExactEps(base)
    n = 64
    labels = torch.arange(n) % 2
    x = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    plan = SamplingPlan(diffusion=diffusion, steps=steps, generators=[sample_generator(0, i, "cpu") for i in range(n)])
    out = SAMPLERS[name](Denoiser(model=model, model_kwargs={"y": labels}), x, plan)
    assert torch.isfinite(out).all()
    means = torch.stack([out[labels == c].mean() for c in (0, 1)])
    assert torch.allclose(means, torch.tensor([-1.0, 1.0]), atol=0.1), (name, means)
    std = torch.cat([out[labels == c] - means[c] for c in (0, 1)]).std()
    # Deterministic solvers land close to 0.5; ancestral ones sample it too.
    assert abs(float(std) - DATA_STD) < 0.08, (name, float(std))


def test_diffusers_ddim_agrees_with_the_core_ddim():
    """The same model and noise through the core's DDIM over "ddim25" and
    through diffusers' DDIMScheduler with the matching ("leading") spacing."""
    torch.manual_seed(0)
    flags = script_util.model_and_diffusion_defaults()
    flags.update(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
                 diffusion_steps=100, in_channels=3, learn_sigma=True)
    model_config, diffusion_config = script_util.split_flags(flags)
    model = script_util.create_model(**model_config).eval()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    gens = [sample_generator(0, i, "cpu") for i in range(3)]
    core = script_util.create_gaussian_diffusion(**{**diffusion_config, "timestep_respacing": "ddim25"})
    base = script_util.create_gaussian_diffusion(**{**diffusion_config, "timestep_respacing": ""})
    denoiser = Denoiser(model=model, model_kwargs={})
    ours = SAMPLERS["ddim"](denoiser, x.clone(), SamplingPlan(diffusion=core, steps=25, generators=gens))
    theirs = diffusers_loop("ddim", denoiser, x.clone(), SamplingPlan(diffusion=base, steps=25, generators=gens,
                                                                        timestep_spacing="leading"))
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m", "ddpm"])
def test_samples_do_not_depend_on_the_batch(name):
    base = _diffusion()
    diffusion = _diffusion("10") if name == "ddpm" else base
    model = ExactEps(base)
    kwargs = dict(model=model, diffusion=diffusion, sample_shape=(1, 4, 4), num_samples=6, labels=np.arange(6) % 2,
                  sampler=name, steps=10, seed=3, progress=False)
    whole, _, _ = generate_samples(batch_size=6, **kwargs)
    pieces, _, _ = generate_samples(batch_size=4, **kwargs)
    np.testing.assert_array_equal(whole, pieces)
    shifted, _, _ = generate_samples(**{**kwargs, "seed": 4}, batch_size=6)
    assert not np.array_equal(whole, shifted)


def test_sampler_names_and_step_counts():
    assert resolve_sampler("", use_ddim=True) == "ddim"
    assert resolve_sampler("", use_ddim=False) == "ddpm"
    assert resolve_sampler("unipc") == "unipc"
    with pytest.raises(UserError, match="must be one of"):
        resolve_sampler("plms")
    with pytest.raises(UserError, match="contradicts"):
        resolve_sampler("euler", use_ddim=True)
    assert sampler_steps("dpmpp_2m", "ddim20", 1000) == 20
    assert sampler_steps("heun", "", 1000) == 1000
    assert sampler_steps("ddim", "10,20", 1000) is None  # the core respaces itself
    with pytest.raises(UserError, match="one step count"):
        sampler_steps("euler", "10,20", 1000)
    with pytest.raises(UserError, match="one step count"):
        sampler_steps("euler", "2000", 1000)


def test_ddim_respacing_takes_the_asked_steps_of_any_process():
    """The one rule for "about N DDIM steps" (previews, interpolation,
    diagnosis): DDIM's stride where N divides the process, else N evenly
    spaced steps, and never more steps than the process has (the previews'
    old rule asked 20-step processes for 25)."""
    assert ddim_respacing(25, 1000) == "ddim25" and ddim_respacing(25, 40) == "25"
    assert ddim_respacing(25, 20) == "ddim20" and ddim_respacing(0, 50) == "1"
    for steps in (10, 20, 40, 50, 999, 1000):
        for count in (1, 10, 25):
            kept = space_timesteps(steps, ddim_respacing(count, steps))
            assert len(kept) == min(count, steps) and 0 in kept


class FirstStep(torch.nn.Module):
    """Records the timesteps it is called at (and predicts zero noise)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t, y=None):
        self.seen.append(int(t[0]))
        return torch.zeros_like(x)


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc", "euler"])
def test_timestep_spacing_sets_where_the_diffusers_samplers_start(name):
    """"trailing" starts at t=T-1 (blind for an epsilon model: sqrt(alpha_bar)
    ~5e-5 on the cosine schedule), "leading" about T-T/N like the core's ddimN
    (diffusers' multistep solvers leave one step more: T-T/(N+1))."""
    base = _diffusion()
    starts = {}
    for spacing in ("trailing", "leading"):
        model = FirstStep()
        plan = SamplingPlan(diffusion=base, steps=25, generators=[sample_generator(0, 0, "cpu")],
                            timestep_spacing=spacing)
        SAMPLERS[name](Denoiser(model=model, model_kwargs={}), torch.randn(1, 1, 2, 2), plan)
        starts[spacing] = model.seen[0]
    assert starts["trailing"] == 999
    assert starts["leading"] == (960 if name == "euler" else 950)
    assert int(_diffusion("ddim25").timestep_map[-1]) == 960


def test_auto_spacing_is_leading_only_for_latent_epsilon_models():
    from guided_diffusion_vae.sampling.sample_from_checkpoint import resolve_timestep_spacing

    latent_eps = {"vae": {"path": "v"}, "diffusion": {"predict_xstart": False}}
    latent_x0 = {"vae": {"path": "v"}, "diffusion": {"predict_xstart": True}}
    pixel_eps = {"vae": None, "diffusion": {"predict_xstart": False}}
    assert resolve_timestep_spacing("auto", latent_eps) == "leading"
    assert resolve_timestep_spacing("auto", latent_x0) == "trailing"
    assert resolve_timestep_spacing("auto", pixel_eps) == "trailing"
    assert resolve_timestep_spacing("trailing", latent_eps) == "trailing"
    with pytest.raises(UserError, match="timestep_spacing must be one of auto, leading, trailing, linspace"):
        resolve_timestep_spacing("middle", latent_eps)
