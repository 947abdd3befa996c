"""Flag validation and the parameters the original hard-coded."""

import pytest
import torch

from guided_diffusion_vae.core import script_util
from guided_diffusion_vae.runtime.errors import UserError


def test_unknown_noise_schedule_is_named():
    with pytest.raises(UserError, match="squared"):
        script_util.create_gaussian_diffusion(steps=100, noise_schedule="squared")


def test_unmeetable_respacing_is_named():
    with pytest.raises(UserError, match="ddim999"):
        script_util.create_gaussian_diffusion(steps=1000, timestep_respacing="ddim999")
    with pytest.raises(UserError, match="300"):
        script_util.create_gaussian_diffusion(steps=100, timestep_respacing="300")


def test_attention_resolution_must_be_reachable():
    with pytest.raises(UserError, match=r"attention_resolutions '12'.*image_size 64"):
        script_util.create_model(64, 32, 1, attention_resolutions="12")
    with pytest.raises(UserError, match=r"resolution 2 is not one the network passes through"):
        script_util.create_model(64, 32, 1, channel_mult="1,2", attention_resolutions="2")
    with pytest.raises(UserError, match="not a comma-separated list"):
        script_util.create_model(64, 32, 1, attention_resolutions="16;8")


def test_latent_sizes_have_default_channel_mult_and_no_default_for_odd_sizes():
    for size in (8, 16, 32):
        model = script_util.create_model(size, 32, 1, attention_resolutions="4", in_channels=4)
        assert model.in_channels == 4
    with pytest.raises(UserError, match="no default channel_mult for image_size 48"):
        script_util.create_model(48, 32, 1)


def test_in_channels_and_num_classes_are_parameters(tiny_model_flags):
    model, diffusion = script_util.create_model_and_diffusion(**tiny_model_flags)
    x = torch.randn(2, 4, 8, 8)
    out = model(x, torch.tensor([1, 7]), y=torch.tensor([0, 2]))
    assert out.shape == (2, 8, 8, 8)  # learn_sigma doubles the 4 latent channels
    assert model.label_emb.num_embeddings == 3
    assert diffusion.num_timesteps == 50


def test_output_layer_starts_at_zero(tiny_model_flags):
    model, _ = script_util.create_model_and_diffusion(**tiny_model_flags)
    last = model.out[-1]
    assert torch.count_nonzero(last.weight) == 0 and torch.count_nonzero(last.bias) == 0


def test_argparser_round_trip():
    import argparse

    parser = argparse.ArgumentParser()
    script_util.add_dict_to_argparser(parser, script_util.model_and_diffusion_defaults())
    args = parser.parse_args(["--class_cond", "True", "--num_channels", "64", "--in_channels", "4"])
    flags = script_util.args_to_dict(args, script_util.model_and_diffusion_defaults().keys())
    assert flags["class_cond"] is True and flags["num_channels"] == 64 and flags["in_channels"] == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["--class_cond", "maybe"])
