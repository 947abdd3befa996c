"""The 4-channel model: built from the VAE's latent shape, pixels in the flags."""

import pytest
import torch

from guided_diffusion_vae.core import script_util
from guided_diffusion_vae.runtime.errors import UserError
from guided_diffusion_vae.training.latent_training import create_latent_classifier, create_latent_model_and_diffusion

VAE = {"downsample_factor": 4, "latent_channels": 4}


def test_latent_unet_is_built_at_the_latent_size():
    flags = script_util.model_and_diffusion_defaults()
    flags.update(num_channels=32, num_res_blocks=1, attention_resolutions="8,4", class_cond=True,
                 num_classes=31, learn_sigma=True)
    flags.pop("image_size")
    model, diffusion = create_latent_model_and_diffusion(vae_description=VAE, image_size=64, **flags)
    assert model.image_size == 16 and model.in_channels == 4 and model.out_channels == 8
    assert tuple(model.channel_mult) == script_util.DEFAULT_CHANNEL_MULT[16]
    out = model(torch.randn(2, 4, 16, 16), torch.tensor([0, 999]), y=torch.tensor([0, 30]))
    assert out.shape == (2, 8, 16, 16)
    # attention at latent resolutions 8 and 4, i.e. downsampling 2 and 4
    assert set(model.attention_resolutions) == {2, 4}
    with pytest.raises(UserError, match="image size 66 is not divisible"):
        create_latent_model_and_diffusion(vae_description=VAE, image_size=66, **flags)


def test_latent_classifier():
    flags = {k: v for k, v in script_util.classifier_defaults().items() if k != "image_size"}
    flags.update(classifier_width=64, classifier_depth=1, classifier_attention_resolutions="8")
    clf = create_latent_classifier(vae_description=VAE, image_size=64, num_classes=31, **flags)
    assert clf(torch.randn(3, 4, 16, 16), torch.tensor([1, 2, 3])).shape == (3, 31)
