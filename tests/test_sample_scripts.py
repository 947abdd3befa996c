"""The sampling scripts as guided-diffusion users type them, the --user_ids
rule, classifier-free guidance, and previews that the script reproduces."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion_vae.training import checkpoint as ckpt
from guided_diffusion_vae.runtime import logger
from guided_diffusion_vae.core import script_util
from guided_diffusion_vae.runtime.errors import UserError
from guided_diffusion_vae.data.labels import folder_names, resolve_user_ids, with_null_class
from guided_diffusion_vae.sampling.sample_from_checkpoint import run_sampling, sample_defaults
from guided_diffusion_vae.core.samplers import SAMPLER_NAMES
from guided_diffusion_vae.core.script_util import split_flags
from helpers.vae_helpers import make_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "scripts", "image_sample.py")
# The original's flag style: MODEL_FLAGS as its README writes them.
MODEL_FLAGS = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
               "--attention_resolutions", "4", "--diffusion_steps", "40", "--learn_sigma", "True"]


def _flags(**overrides):
    flags = script_util.model_and_diffusion_defaults()
    flags.update(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
                 diffusion_steps=40, learn_sigma=True)
    flags.update(overrides)
    return flags


def _checkpoint(path, label_map=None, noise=0.0, **overrides):
    """A checkpoint of ours with ``label_map`` (class-conditional when given);
    ``noise`` > 0 adds that much Gaussian noise to every weight (a fresh
    model's last layer is zero, so it predicts nothing)."""
    flags = _flags(class_cond=label_map is not None, num_classes=len(label_map or {}) or 1000, **overrides)
    torch.manual_seed(0)
    model_config, diffusion_config = split_flags(flags)
    model = script_util.create_model(**model_config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(noise * torch.randn_like(parameter))
    ckpt.save_weights(str(path), model.state_dict(), {
        "step": 7, "weights": "model", "model": model_config, "diffusion": diffusion_config, "vae": None,
        "data": {"image_size": 8, "label_map": label_map}, "train": {}})
    return str(path)


def _config(model_path, output_dir, **kw):
    return {**sample_defaults(), "model_path": model_path, "output_dir": str(output_dir), "batch_size": 4,
            "timestep_respacing": "4", "device": "cpu", **kw}


def _images(folder):
    return {os.path.relpath(os.path.join(d, f), folder): np.asarray(Image.open(os.path.join(d, f)))
            for d, _, files in os.walk(folder) for f in files if f.startswith("generated_")}


def _run(args, env_extra=None, cwd=REPO):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           **(env_extra or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


# ---- 1. image_sample.py as a guided-diffusion user runs it --------------------------


def test_the_originals_command_writes_num_samples_to_the_logger_folder(tmp_path):
    """``OPENAI_LOGDIR=out python scripts/image_sample.py --model_path model.pt $MODEL_FLAGS
    --num_samples 4 --batch_size 4 --timestep_respacing 10`` on a bare .pt of a
    class-conditional model: 4 samples of random classes, written to OPENAI_LOGDIR."""
    flags = _flags(class_cond=True, num_classes=10)
    torch.manual_seed(0)
    torch.save(script_util.create_model(**split_flags(flags)[0]).state_dict(), tmp_path / "model.pt")
    out = tmp_path / "out"
    result = _run([SAMPLE, "--model_path", str(tmp_path / "model.pt"), *MODEL_FLAGS, "--class_cond", "True",
                   "--num_classes", "10", "--num_samples", "4", "--batch_size", "4", "--timestep_respacing", "10"],
                  env_extra={"OPENAI_LOGDIR": str(out)})
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(out / "samples_4x8x8x3.npz") as data:
        assert data["arr_0"].shape == (4, 8, 8, 3)
        assert data["arr_1"].shape == (4,) and set(data["arr_1"]) <= set(range(10))
    assert len(_images(out)) == 4
    assert "model.pt" in (out / "log.txt").read_text()


def test_a_file_is_sampled_as_named_and_a_folder_means_its_newest_ema(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    labels = {"0": "user_01", "1": "user_02"}
    raw = _checkpoint(run / "model000010.safetensors", labels)
    ema = _checkpoint(run / "ema_0.9999_000010.safetensors", labels)
    _checkpoint(run / "ema_0.99_000010.safetensors", labels)
    _checkpoint(run / "model000005.safetensors", labels)
    seen = []
    logger.configure(dir=str(tmp_path / "log"), format_strs="log")
    try:
        for path in (raw, str(run)):
            run_sampling(_config(path, tmp_path / f"o{len(seen)}", num_images_per_user=1))
            seen.append(open(tmp_path / "log" / "log.txt").read())
    finally:
        logger.reset()
    assert f"sampling from {raw}" in seen[0]  # use_ema True, but a file is taken as named
    assert f"sampling from {ema}" in seen[1]  # the folder: newest step, largest EMA rate


def test_clip_denoised_accepts_the_originals_booleans(tmp_path):
    path = _checkpoint(tmp_path / "m.safetensors")
    outputs = {}
    for value in ("True", "pixel", "False", "none"):
        run_sampling(_config(path, tmp_path / value, num_samples=2, clip_denoised=value))
        outputs[value] = _images(tmp_path / value)
    for a, b in (("True", "pixel"), ("False", "none")):
        assert outputs[a].keys() == outputs[b].keys()
        assert all(np.array_equal(outputs[a][k], outputs[b][k]) for k in outputs[a])


def test_a_use_fp16_checkpoint_samples_from_its_path_alone(tmp_path):
    path = _checkpoint(tmp_path / "m.safetensors", use_fp16=True)
    try:
        paths = run_sampling(_config(path, tmp_path / "o", num_samples=2, use_fp16=False))
    except RuntimeError as err:  # only a CPU without half convolutions may refuse
        pytest.fail(f"fp16 checkpoint did not sample: {err}")
    assert len(paths["images"]) == 2


def test_mpiexec_splits_the_samples_and_gives_the_same_images(tmp_path, mpiexec, launch_env):
    path = _checkpoint(tmp_path / "m.safetensors", {"0": "user_01", "1": "user_02", "2": "user_03"})
    common = ["--model_path", path, "--num_images_per_user", "3", "--batch_size", "2", "--timestep_respacing", "4",
              "--device", "cpu"]
    one = _run([SAMPLE, *common, "--output_dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([*mpiexec, "-n", "2", sys.executable, SAMPLE, *common, "--output_dir", str(tmp_path / "two")],
                         env=launch_env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    assert "(0..4 on rank 0)" in two.stdout + two.stderr
    a, b = _images(tmp_path / "one"), _images(tmp_path / "two")
    assert len(a) == 9 and a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


# ---- 2. --user_ids means one thing ------------------------------------------------------


def test_user_ids_rule():
    numbered = {str(i): f"user_{i + 1:02d}" for i in range(31)}
    assert resolve_user_ids(["1", "05", "user_31"], numbered) == [0, 4, 30]
    names = {"0": "alice", "1": "bob"}
    assert resolve_user_ids(["bob"], names) == [1]
    with pytest.raises(UserError, match="no class name ends in the number 1; the classes are alice, bob"):
        resolve_user_ids(["1"], names)  # never a silent position
    mixed = {"0": "guest_01", "1": "user_01", "2": "user_02"}
    with pytest.raises(UserError, match="ambiguous: it matches guest_01, user_01"):
        resolve_user_ids(["1"], mixed)
    assert resolve_user_ids(["2", "user_01"], mixed) == [2, 1]
    with pytest.raises(UserError, match="unknown user id 'carol'"):
        resolve_user_ids(["carol"], names)
    with pytest.raises(UserError):  # the null class of a guided model is nobody
        resolve_user_ids(["<null>"], with_null_class(names))
    assert folder_names([0, 1], {"0": "../x", "1": "/abs"}) == {0: "class_.._x", 1: "abs"}  # one component each


def test_output_folders_follow_class_names(tmp_path):
    path = _checkpoint(tmp_path / "m.safetensors", {"0": "alice", "1": "bob_7"})
    run_sampling(_config(path, tmp_path / "o", user_ids=["7"], num_images_per_user=2))
    assert sorted(_images(tmp_path / "o")) == ["bob_7/generated_000.png", "bob_7/generated_001.png"]
    with pytest.raises(UserError, match="no class name ends in the number 0"):
        run_sampling(_config(path, tmp_path / "bad", user_ids=["0"], num_images_per_user=2))
    assert not (tmp_path / "bad").exists()


# ---- 3. previews and the script agree ----------------------------------------------------


def test_preview_at_step_n_equals_the_script_at_step_n(tmp_path):
    from guided_diffusion_vae.training.diffusion_training import pixel_train_defaults, pixel_training_data, run_training

    data = tmp_path / "images"
    make_image_folder(data, classes=("user_01", "user_02"), per_class=4, size=8, channels=3)
    config = {**pixel_train_defaults(), **_flags(class_cond=True), "data_dir": str(data), "batch_size": 2,
              "lr_anneal_steps": 3, "log_dir": str(tmp_path / "run"), "sample_interval": 3,
              "num_preview_samples": 2, "ema_rate": "0.5,0.9", "num_workers": 0, "tensorboard": False,
              "precision": "fp32", "log_interval": 1}
    run_training(config, pixel_training_data)
    log = (tmp_path / "run" / "log.txt").read_text()
    flags = log.split("(the same images: image_sample_vae.py --model_path ")[1].split(")")[0].split()[1:]
    kv = dict(zip(flags[::2], flags[1::2]))
    out = tmp_path / "again"
    run_sampling(_config(str(tmp_path / "run"), out, sampler=kv["--sampler"],
                         timestep_respacing=kv["--timestep_respacing"], precision=kv["--precision"],
                         seed=int(kv["--seed"]), clip_denoised=kv["--clip_denoised"],
                         user_ids=kv["--user_ids"].split(","), num_images_per_user=1))
    preview = np.asarray(Image.open(tmp_path / "run" / "samples" / "preview_000003.png"))
    # image_grid: 2 px padding, ceil(sqrt(2)) = 2 columns.
    tiles = [preview[2:10, 2:10], preview[2:10, 12:20]]
    again = _images(out)
    assert np.array_equal(tiles[0], again["user_01/generated_000.png"])
    assert np.array_equal(tiles[1], again["user_02/generated_000.png"])


# ---- 4. classifier-free guidance ---------------------------------------------------------


def test_class_dropout_trains_a_null_class_and_guidance_needs_it(tmp_path):
    from guided_diffusion_vae.training.diffusion_training import pixel_train_defaults, pixel_training_data, run_training

    data = tmp_path / "images"
    for name, value in (("user_01", 30), ("user_02", 220)):
        (data / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(data / name / f"{i}.png")
    config = {**pixel_train_defaults(), **_flags(class_cond=True), "data_dir": str(data), "batch_size": 2,
              "lr_anneal_steps": 2, "log_dir": str(tmp_path / "run"), "num_workers": 0, "tensorboard": False,
              "class_dropout_prob": 0.2}
    path = run_training(config, pixel_training_data)
    meta = ckpt.read_metadata(path)
    assert meta["data"]["label_map"] == {"0": "user_01", "1": "user_02", "2": "<null>"}
    assert meta["model"]["num_classes"] == 3
    for sampler in SAMPLER_NAMES:
        paths = run_sampling(_config(path, tmp_path / sampler, sampler=sampler, guidance_scale=3.0,
                                     num_images_per_user=1, use_ema=False))
        assert sorted(os.path.basename(os.path.dirname(p)) for p in paths["images"]) == ["user_01", "user_02"]
    plain = _checkpoint(tmp_path / "plain.safetensors", {"0": "user_01", "1": "user_02"})
    with pytest.raises(UserError, match="trained without it: use --guidance_scale 1"):
        run_sampling(_config(plain, tmp_path / "refused", guidance_scale=2.0, num_images_per_user=1))
    assert not (tmp_path / "refused").exists()


def test_guidance_is_one_batched_forward_and_guides_only_epsilon():
    from guided_diffusion_vae.sampling.guidance import classifier_free_model

    calls = []

    def model(x, t, y=None):
        calls.append(len(x))
        eps = y.float().view(-1, 1, 1, 1).expand(-1, 2, 2, 2)  # eps = label value
        variance = torch.full_like(eps, 7.0) + y.float().view(-1, 1, 1, 1)
        return torch.cat([eps, variance], dim=1)

    guided = classifier_free_model(model, null_label=0, scale=3.0, out_channels=2)
    x, t, y = torch.zeros(5, 2, 2, 2), torch.zeros(5, dtype=torch.long), torch.full((5,), 2)
    out = guided(x, t, y=y)
    assert calls == [10]
    assert torch.allclose(out[:, :2], torch.full_like(out[:, :2], 0 + 3.0 * (2 - 0)))
    assert torch.allclose(out[:, 2:], torch.full_like(out[:, 2:], 9.0))  # the conditional variance
    assert torch.allclose(classifier_free_model(model, null_label=0, scale=1.0, out_channels=2)(x, t, y=y),
                          model(x, t, y=y))


def test_guidance_interval_guides_only_the_timesteps_inside_it():
    from guided_diffusion_vae.sampling.guidance import classifier_free_model, parse_guidance_interval

    def model(x, t, y=None):
        return y.float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()  # eps = label value

    guided = classifier_free_model(model, null_label=0, scale=3.0, out_channels=1,
                                   interval=parse_guidance_interval("100,600", 1000))
    t = torch.tensor([0, 99, 100, 350, 600, 601, 999])
    out = guided(torch.zeros(7, 1, 2, 2), t, y=torch.full((7,), 2))[:, 0, 0, 0]
    assert out.tolist() == [2.0, 2.0, 6.0, 6.0, 6.0, 2.0, 2.0]  # 0 + 3 * (2 - 0) inside, the label outside
    assert parse_guidance_interval("") is None
    for bad in ("600,100", "a,b", "-1,5", "0,1000"):
        with pytest.raises(UserError, match="guidance_interval"):
            parse_guidance_interval(bad, 1000)


def test_sampling_flags_are_checked_before_loading(tmp_path):
    path = _checkpoint(tmp_path / "m.safetensors", {"0": "a"})
    for kw, message in (({"sampler": "plms"}, "must be one of"), ({"guidance_scale": float("nan")}, "finite"),
                        ({"num_images_per_user": -1}, "num_images_per_user"),
                        ({"sampler": "euler", "timestep_respacing": "5,5"}, "one step count")):
        with pytest.raises(UserError, match=message):
            run_sampling(_config(path, tmp_path / "o", **kw))
    assert not (tmp_path / "o").exists()
    (tmp_path / "a_file").write_text("x")
    for target in (tmp_path / "a_file", tmp_path / "a_file" / "below"):
        with pytest.raises(UserError, match="output_dir"):  # refused before the model is loaded
            run_sampling(_config(str(tmp_path / "missing.safetensors"), target))
    json.dumps(sample_defaults())  # every default is plain data (YAML/JSON configs)


def test_autoguidance_extrapolates_away_from_the_guide():
    from guided_diffusion_vae.sampling.guidance import autoguided_model, parse_guidance_interval

    def constant(eps, variance):
        def model(x, t, y=None):
            return torch.cat([torch.full_like(x, eps), torch.full_like(x, variance)], dim=1)
        return model

    x, y = torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long)
    t = torch.tensor([0, 100, 600, 999])
    guided = autoguided_model(constant(2.0, 7.0), constant(0.5, -1.0), scale=3.0, out_channels=1,
                              interval=parse_guidance_interval("100,600", 1000))
    out = guided(x, t, y=y)
    assert out[:, 0, 0, 0].tolist() == [2.0, 5.0, 5.0, 2.0]  # 0.5 + 3 * (2 - 0.5) inside, the model outside
    assert torch.all(out[:, 1] == 7.0)  # the model's variance, never the guide's


def test_autoguidance_samples_from_a_smaller_guide_and_refuses_one_that_does_not_fit(tmp_path):
    labels = {"0": "user_01", "1": "user_02"}
    model = _checkpoint(tmp_path / "model.safetensors", labels, noise=0.02, num_res_blocks=2)
    small = _checkpoint(tmp_path / "small.safetensors", labels, noise=0.02)  # one res block per level
    unguided = run_sampling(_config(model, tmp_path / "plain", num_images_per_user=1))
    plain = _images(os.path.dirname(unguided["grid"]))
    with open(unguided["record"]) as f:
        assert json.load(f)["guidance"] == {"kind": "none"}
    paths = run_sampling(_config(model, tmp_path / "auto", num_images_per_user=1, guidance_scale=2.0,
                                 guide_model_path=small))
    guided = _images(os.path.dirname(paths["grid"]))
    with open(paths["record"]) as f:
        record = json.load(f)
    assert record["guidance"] == {"kind": "autoguidance", "scale": 2.0, "interval": None,
                                  "guide": {"path": small, "step": 7}}
    assert (record["model"], record["sampler"], record["steps"], record["seed"], record["samples"]) == \
        (model, "ddpm", 4, 0, 2)
    assert sorted(guided) == sorted(plain) == ["user_01/generated_000.png", "user_02/generated_000.png"]
    assert any(not np.array_equal(guided[k], plain[k]) for k in plain)  # the guide changed the samples
    # Guiding with the model itself is no guidance: g + s * (m - g) = m.
    same = _images(os.path.dirname(run_sampling(_config(model, tmp_path / "self", num_images_per_user=1,
                                                        guidance_scale=2.0, guide_model_path=model))["grid"]))
    assert all(np.abs(same[k].astype(int) - plain[k].astype(int)).max() <= 1 for k in plain)

    other = _checkpoint(tmp_path / "other.safetensors", {"0": "user_01", "1": "user_09"})
    no_sigma = _checkpoint(tmp_path / "no_sigma.safetensors", labels, learn_sigma=False)
    bare = tmp_path / "bare.pt"
    torch.save(torch.nn.Linear(1, 1).state_dict(), bare)
    for guide, scale, message in ((other, 2.0, r"guide model .*other.safetensors does not fit the model: label map"),
                                  (no_sigma, 2.0, r"does not fit the model: model.learn_sigma False there, True here"),
                                  (str(bare), 2.0, r"bare.pt is a bare state dict"),
                                  (small, 1.0, r"^--guide_model_path needs --guidance_scale other than 1")):
        with pytest.raises(UserError, match=message):
            run_sampling(_config(model, tmp_path / "refused", num_images_per_user=1, guidance_scale=scale,
                                 guide_model_path=guide))
        assert not (tmp_path / "refused").exists()
