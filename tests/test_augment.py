"""Non-leaking augmentation: the transforms do what they say and the network
is told about them (a model trained with them and sampled without them:
tests/test_latent_pipeline.py)."""

import math
import pytest
import torch

from guided_diffusion_vae.core import script_util
from guided_diffusion_vae.training.augment import Augmenter, augment_dim, circular_time_shift, doppler_scale, parse_augment
from guided_diffusion_vae.runtime.errors import UserError


def test_time_shift_rolls_each_sample_by_its_own_amount():
    x = torch.randn(3, 2, 4, 8)
    shift = torch.tensor([0, 3, 7])
    out = circular_time_shift(x, shift)
    for i, s in enumerate(shift.tolist()):
        assert torch.equal(out[i], torch.roll(x[i], s, dims=-1))


def test_doppler_scale_moves_a_row_away_from_zero_velocity():
    x = torch.zeros(2, 1, 32, 4)
    x[:, :, 20] = 1.0  # 4 rows above the zero-velocity row (24 = 0.75 of 32)
    out = doppler_scale(x, torch.tensor([1.0, 2.0]), zero_row=0.75)
    assert torch.allclose(out[0], x[0], atol=1e-6)  # scale 1: unchanged
    rows = out[1, 0, :, 0]
    assert int(rows.argmax()) in (15, 16)  # 8 rows above now, 0.5-pixel centre rounding
    assert rows[24:].abs().max() < 1e-6  # the zero-velocity side stays empty


def test_labels_describe_what_was_done_and_are_zero_when_nothing_was():
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 16)
    aug = Augmenter(("time_shift",), prob=1.0)
    out, labels = aug(x)
    assert labels.shape == (64, 2)
    for i in range(64):
        shift = round(math.atan2(labels[i, 0].item(), labels[i, 1].item() + 1) / (2 * math.pi) * 16) % 16
        assert torch.equal(out[i], torch.roll(x[i], shift, dims=-1))
    never = Augmenter(("time_shift", "doppler_scale"), prob=1e-9)
    out, labels = never(x)
    assert labels.shape == (64, 3) and not labels.any()
    assert torch.allclose(out, x, atol=1e-5)
    half = Augmenter(("doppler_scale",), prob=0.5, doppler_max=0.1)
    _, labels = half(torch.randn(2000, 1, 8, 8))
    assert 0.4 < (labels != 0).float().mean() < 0.6 and labels.abs().max() <= 1


def test_flags_are_checked():
    assert parse_augment("none") == () and augment_dim("none") == 0
    assert augment_dim("time_shift,doppler_scale") == 3
    for bad in ("flip", "time_shift,time_shift"):
        with pytest.raises(UserError, match="--augment"):
            parse_augment(bad)
    with pytest.raises(UserError, match="augment_prob"):
        Augmenter.from_config({"augment": "time_shift", "augment_prob": 0, "augment_doppler_max": 0.1,
                               "augment_zero_doppler": 0.5})


def test_network_names_unchanged_without_augmentation_and_condition_only_when_asked():
    flags = script_util.model_and_diffusion_defaults()
    flags.update(image_size=8, num_channels=32, num_res_blocks=1, attention_resolutions="4", channel_mult="1,2",
                 class_cond=True, num_classes=3, in_channels=4)
    plain, _ = script_util.create_model_and_diffusion(**flags)
    model, _ = script_util.create_model_and_diffusion(**flags, augment_dim=3)
    assert set(model.state_dict()) - set(plain.state_dict()) == {"augment_emb.weight"}
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 500]), torch.tensor([0, 2])
    # Zero-initialised output layers would hide every condition: weights as if trained.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.eval()
    none = model(x, t, y=y)
    assert torch.allclose(none, model(x, t, y=y, augment=torch.zeros(2, 3)))
    assert not torch.allclose(model(x, t, y=y), model(x, t, y=y, augment=torch.ones(2, 3)))
    with pytest.raises(ValueError, match="augment"):
        plain(x, t, y=y, augment=torch.zeros(2, 3))
