"""Noisy-latent classifier: training from a latent cache, self-describing
checkpoints, and classifier guidance that steers samples toward a person."""

import csv
import json
import os
import runpy
import sys

import numpy as np
import pytest
import torch

from guided_diffusion_vae.training import checkpoint as ckpt
from guided_diffusion_vae.runtime import logger
from guided_diffusion_vae.core import script_util
from guided_diffusion_vae.training.classifier_training import classifier_train_defaults, train_classifier
from guided_diffusion_vae.runtime.errors import UserError
from guided_diffusion_vae.sampling.guidance import classifier_cond_fn, load_classifier
from guided_diffusion_vae.latent.latent_datasets import FORMAT_VERSION, LatentCache

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
from vae_helpers import SCRIPTS, build_latent_chain  # noqa: E402

# 32 px images -> 8x8 latents (channel_mult (1, 2)); attention at latent 4x4
# where the width is 64, a multiple of the classifier's 64 head channels.
TINY_CLASSIFIER = {
    "image_size": 32, "classifier_width": 32, "classifier_depth": 1, "classifier_attention_resolutions": "4",
    "diffusion_steps": 50, "batch_size": 12,
}


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    """Three users' images -> a tiny VAE -> its latent cache (the real chain)."""
    return build_latent_chain(tmp_path_factory.mktemp("cls_chain"), size=32, per_class=6)


def _toy_cache(folder, per_class=24, seed=0):
    """A latent cache written directly: 3 classes of 4x8x8 latents whose means
    differ strongly (class k has mean +2 on channel k, -1 elsewhere)."""
    rng = np.random.default_rng(seed)
    latents, labels = [], []
    for k in range(3):
        mean = np.full((4, 1, 1), -1.0, dtype=np.float32)
        mean[k] = 2.0
        latents.append(mean + 0.3 * rng.standard_normal((per_class, 4, 8, 8)).astype(np.float32))
        labels.append(np.full(per_class, k, dtype=np.int64))
    latents, labels = np.concatenate(latents), np.concatenate(labels)
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, "latents.npy"), latents)
    np.save(os.path.join(folder, "labels.npy"), labels)
    meta = {
        "format": FORMAT_VERSION, "scaled": False, "latent_scale": 1.0, "image_size": 32, "channels": 1,
        "input_range": "-1,1", "label_map": {"0": "user_01", "1": "user_02", "2": "user_03"},
        "count": len(labels), "shape": [4, 8, 8], "dtype": "float32",
        "vae": {"downsample_factor": 4, "latent_channels": 4, "in_channels": 1, "input_range": "-1,1",
                "path": os.path.join(str(folder), "no_vae")},
    }
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)
    return str(folder)


def _train(cache, log_dir, **overrides):
    config = {**classifier_train_defaults(), **TINY_CLASSIFIER, "latent_cache": str(cache), "log_dir": str(log_dir),
              "log_interval": 10, **overrides}
    try:
        return train_classifier(config)
    finally:
        logger.reset()


def _clean_accuracy(model, cache_dir):
    cache = LatentCache(cache_dir)
    x, cond = cache.get_batch(np.arange(len(cache)))
    with torch.no_grad():
        logits = model(x, torch.zeros(len(x), dtype=torch.long))
    return (logits.argmax(-1) == cond["y"]).float().mean().item()


@pytest.fixture(scope="module")
def noised_classifier(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    cache = _toy_cache(root / "cache")
    path = _train(cache, root / "run", iterations=60, save_interval=0)
    return cache, path


def test_script_trains_on_a_real_cache_and_checkpoint_reproduces_logits(real_cache, tmp_path, monkeypatch):
    run = tmp_path / "run"
    flags = [f"--{k}={v}" for k, v in TINY_CLASSIFIER.items()]
    # The script in this process (a subprocess would spend most of its time importing torch).
    monkeypatch.setattr(sys, "argv", [
        "classifier_train.py", "--latent_cache", str(real_cache / "cache"), *flags, "--iterations", "6",
        "--save_interval", "3", "--log_interval", "3", "--log_dir", str(run)])
    try:
        with pytest.raises(SystemExit) as finished:  # the script's sys.exit(run_main(main))
            runpy.run_path(os.path.join(SCRIPTS, "classifier_train.py"), run_name="__main__")
    finally:
        logger.reset()
    assert finished.value.code is None
    rows = list(csv.DictReader(open(run / "progress.csv")))
    assert [int(r["step"]) for r in rows] == [3, 6] and "acc@1" in rows[-1]
    assert (run / "classifier000003.safetensors").exists()
    path = run / "classifier000006.safetensors"
    model, meta = load_classifier(str(path), "cpu")
    assert not model.training
    assert meta["kind"] == "classifier" and meta["step"] == 6
    assert meta["classifier"]["image_size"] == 8 and meta["classifier"]["in_channels"] == 4  # 32 px / 4
    assert meta["classifier"]["num_classes"] == 3 and meta["classifier"]["classifier_width"] == 32
    assert meta["data"] == {**meta["data"], "image_size": 32,
                            "label_map": {"0": "user_01", "1": "user_02", "2": "user_03"}}
    assert meta["diffusion"]["steps"] == 50 and meta["diffusion"]["noise_schedule"] == "linear"
    stats = json.loads((real_cache / "vae" / "latent_stats.json").read_text())
    assert meta["vae"]["latent_scale"] == pytest.approx(stats["latent_scale"])

    # The stored weights are what the rebuilt network computes with.
    state, _ = ckpt.load_weights(str(path))
    rebuilt = script_util.create_classifier(**meta["classifier"])
    rebuilt.load_state_dict(state)
    rebuilt.eval()
    x = torch.randn(5, 4, 8, 8)
    t = torch.tensor([0, 10, 20, 30, 49])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), rebuilt(x, t))
        assert not torch.allclose(model(x, t), script_util.create_classifier(**meta["classifier"]).eval()(x, t))


def test_classifier_learns_a_separable_cache(tmp_path):
    cache = _toy_cache(tmp_path / "cache")
    path = _train(cache, tmp_path / "run", iterations=30, noised=False, save_interval=0)
    model, _ = load_classifier(path)
    assert _clean_accuracy(model, cache) > 0.9  # chance is 1/3
    with open(tmp_path / "run" / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [10, 20, 30]
    assert float(rows[-1]["acc@1"]) > 0.9 and float(rows[-1]["loss"]) < float(rows[0]["loss"])
    # noised=False: every example is at t=0, the first quarter
    assert float(rows[-1]["acc@1_q0"]) == pytest.approx(float(rows[-1]["acc@1"]))


def test_noised_training_logs_accuracy_by_quarter(noised_classifier, tmp_path):
    cache, path = noised_classifier
    rows = list(csv.DictReader(open(os.path.join(os.path.dirname(path), "progress.csv"))))
    assert {"loss", "acc@1", "acc@1_q0", "acc@1_q3", "loss_q0", "loss_q3"} <= set(rows[-1])
    model, meta = load_classifier(path)
    assert meta["diffusion"]["steps"] == 50
    assert _clean_accuracy(model, cache) > 0.9


def test_not_a_classifier_checkpoint_is_refused(tmp_path):
    path = str(tmp_path / "model000001.safetensors")
    ckpt.save_weights(path, {"w": torch.zeros(2)}, {"model": {}})
    with pytest.raises(UserError, match="model000001.safetensors"):
        load_classifier(path)


def test_respacing_is_refused_for_training(tmp_path):
    cache = _toy_cache(tmp_path / "cache", per_class=4)
    with pytest.raises(UserError, match="timestep_respacing"):
        _train(cache, tmp_path / "run", iterations=1, timestep_respacing="ddim10")


def test_guidance_steers_ddim_samples_toward_the_target(noised_classifier):
    _, path = noised_classifier
    classifier, meta = load_classifier(path)
    torch.manual_seed(0)
    unet = script_util.create_model(
        image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="",
        in_channels=4, class_cond=True, num_classes=3,
    ).eval()
    diffusion = script_util.create_gaussian_diffusion(**{**meta["diffusion"], "timestep_respacing": "ddim10"})
    y = torch.tensor([0, 1, 2] * 4)
    noise = torch.randn(len(y), 4, 8, 8, generator=torch.Generator().manual_seed(1))
    seen_t = set()

    def target_log_prob(scale):
        guide = classifier_cond_fn(classifier, scale)

        def cond_fn(x, t, y=None):
            seen_t.update(t.tolist())
            return guide(x, t, y=y)

        x = diffusion.ddim_sample_loop(unet, noise.shape, noise=noise.clone(), cond_fn=cond_fn,
                                       model_kwargs={"y": y}, progress=False)
        with torch.no_grad():
            log_probs = torch.log_softmax(classifier(x, torch.zeros(len(y), dtype=torch.long)), -1)
        return log_probs[torch.arange(len(y)), y].mean().item(), x

    unguided, x0 = target_log_prob(0.0)
    guided, x1 = target_log_prob(10.0)
    assert max(seen_t) == 45 and max(seen_t) > 9  # original timesteps, not respaced indices
    assert guided > unguided + 0.5, (guided, unguided)
    assert guided > np.log(0.6)  # measured: -1.08 unguided -> -0.32 guided
    assert not torch.allclose(x0, x1)


def test_image_sample_vae_guides_with_a_trained_classifier(real_cache, tmp_path):
    from guided_diffusion_vae.sampling.sample_from_checkpoint import run_sampling, sample_defaults
    from guided_diffusion_vae.training.latent_training import latent_train_defaults, latent_training_data
    from guided_diffusion_vae.training.diffusion_training import run_training

    clf_path = _train(str(real_cache / "cache"), str(tmp_path / "clf"), iterations=4)
    config = {**latent_train_defaults(), "latent_cache": str(real_cache / "cache"), "image_size": 32,
              "num_channels": 32, "channel_mult": "1,2", "attention_resolutions": "4", "num_head_channels": 16,
              "class_cond": False, "diffusion_steps": 50, "batch_size": 4, "lr_anneal_steps": 2,
              "log_dir": str(tmp_path / "diff"), "compile": False, "num_workers": 0, "tensorboard": False}
    try:
        run_training(config, latent_training_data)
        sample = {**sample_defaults(), "model_path": str(tmp_path / "diff"), "output_dir": str(tmp_path / "out"),
                  "classifier_path": clf_path, "classifier_scale": 3.0, "user_ids": ["2"],
                  "num_images_per_user": 2, "use_ddim": True, "timestep_respacing": "ddim5"}
        paths = run_sampling(sample)
        # An unconditional model, made person-specific by the classifier alone.
        assert sorted(os.listdir(tmp_path / "out" / "user_02")) == ["generated_000.png", "generated_001.png"]
        assert len(paths["images"]) == 2
        run_training({**config, "diffusion_steps": 100, "log_dir": str(tmp_path / "diff100")}, latent_training_data)
        with pytest.raises(UserError, match="does not fit the model: diffusion steps 50 there, 100 here"):
            run_sampling({**sample, "model_path": str(tmp_path / "diff100")})
    finally:
        logger.reset()


def test_an_interrupted_classifier_run_resumes_exactly(real_cache, tmp_path):
    cache = real_cache / "cache"
    whole = _train(cache, tmp_path / "whole", iterations=4, save_interval=2)
    _train(cache, tmp_path / "parts", iterations=2, save_interval=2)  # "cut off" after step 2
    assert [os.path.basename(p) for p in sorted((tmp_path / "parts").glob("classifier_state_*.pt"))] == [
        "classifier_state_000002.pt"]
    resumed = _train(cache, tmp_path / "parts", iterations=4, save_interval=2)
    assert "resumed from" in (tmp_path / "parts" / "log.txt").read_text()
    a, _ = ckpt.load_weights(whole)
    b, _ = ckpt.load_weights(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    with pytest.raises(UserError, match="classifier_state_000004.pt was written with batch_size=12, now 4"):
        _train(cache, tmp_path / "parts", iterations=6, batch_size=4)


def test_sigterm_saves_the_classifier_and_a_rerun_resumes(real_cache, tmp_path):
    import signal
    import subprocess
    import time

    log_dir = tmp_path / "clf"
    flags = [f"--{k}={v}" for k, v in TINY_CLASSIFIER.items()]
    cmd = [sys.executable, os.path.join(SCRIPTS, "classifier_train.py"), "--latent_cache", str(real_cache / "cache"),
           "--log_dir", str(log_dir), "--log_interval", "1", "--save_interval", "0", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(SCRIPTS)}
    proc = subprocess.Popen([*cmd, "--iterations", "100000"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, deadline = [], time.time() + 120
    for line in proc.stdout:
        lines.append(line)
        if "acc@1" in line or time.time() > deadline:
            break
    os.killpg(proc.pid, signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM received: saved at step" in out
    states = sorted(p.name for p in log_dir.glob("classifier_state_*.pt"))
    step = int(states[-1][17:23])
    rerun = subprocess.run([*cmd, "--iterations", str(step + 2)], env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {log_dir / states[-1]} at step {step}" in rerun.stdout + rerun.stderr
    assert (log_dir / f"classifier{step + 2:06d}.safetensors").exists()


def _run_script(name, argv, monkeypatch):
    """A script's ``main`` in this process, as its command line would run it."""
    monkeypatch.setattr(sys, "argv", [name, *argv])
    try:
        with pytest.raises(SystemExit) as finished:  # the script's sys.exit(run_main(main))
            runpy.run_path(os.path.join(SCRIPTS, name), run_name="__main__")
    finally:
        logger.reset()
    assert finished.value.code is None, name


def test_the_readme_classifier_guidance_commands_run(real_cache, tmp_path, monkeypatch):
    """Issue 21: README's two commands failed as written: the default
    classifier_attention_resolutions (32,16,8) exceed the latent side, and the
    classifier learned the default linear schedule beside a cosine model. Here
    they run as written, with tiny sizes and step counts added."""
    from guided_diffusion_vae.training.diffusion_training import run_training
    from guided_diffusion_vae.training.latent_training import latent_train_defaults, latent_training_data

    cache, run, clf = str(real_cache / "cache"), str(tmp_path / "run"), str(tmp_path / "clf")
    config = {**latent_train_defaults(), "latent_cache": cache, "image_size": 32, "num_channels": 32,
              "channel_mult": "1,2", "attention_resolutions": "4", "num_head_channels": 16, "class_cond": True,
              "noise_schedule": "cosine", "learn_sigma": True, "diffusion_steps": 50, "batch_size": 4,
              "lr_anneal_steps": 2, "log_dir": run, "compile": False, "num_workers": 0, "tensorboard": False}
    try:
        run_training(config, latent_training_data)
    finally:
        logger.reset()
    _run_script("classifier_train.py", ["--latent_cache", cache, "--image_size", "32", "--model_path", run,
                                        "--log_dir", clf,
                                        "--classifier_width", "32", "--classifier_depth", "1", "--iterations", "2",
                                        "--batch_size", "6"], monkeypatch)
    _, meta = load_classifier(os.path.join(clf, "classifier000002.safetensors"), "cpu")
    assert meta["diffusion"]["noise_schedule"] == "cosine" and meta["diffusion"]["steps"] == 50
    assert meta["classifier"]["classifier_attention_resolutions"] == "4"  # auto at the 8x8 latents
    _run_script("image_sample_vae.py", ["--model_path", run, "--classifier_path",
                                        os.path.join(clf, "classifier000002.safetensors"),
                                        "--classifier_scale", "2.0", "--user_ids", "1", "2", "--output_dir",
                                        str(tmp_path / "out_guided"), "--use_ddim", "True",
                                        "--timestep_respacing", "ddim10"], monkeypatch)
    assert len(os.listdir(tmp_path / "out_guided" / "user_02")) == 5
    # A schedule flag that contradicts the model is refused, naming both.
    with pytest.raises(UserError, match=r"diffusion_steps 100 differs from 50, the noise schedule of .*run"):
        _train(cache, tmp_path / "clf2", model_path=run, diffusion_steps=100)


def test_sampling_refuses_a_classifier_of_another_schedule():
    from guided_diffusion_vae.sampling.guidance import check_classifier_fits

    model = {"model": {"in_channels": 4, "image_size": 8},
             "diffusion": {"noise_schedule": "cosine", "steps": 50, "rescale_timesteps": False}}
    classifier = {"classifier": {"in_channels": 4, "image_size": 8}, "diffusion": dict(model["diffusion"])}
    check_classifier_fits(classifier, model, "c.safetensors")
    for key, other in (("noise_schedule", "linear"), ("steps", 100), ("rescale_timesteps", True)):
        bad = {**classifier, "diffusion": {**model["diffusion"], key: other}}
        with pytest.raises(UserError, match=r"classifier c.safetensors does not fit the model: .* there, .* here"):
            check_classifier_fits(bad, model, "c.safetensors")
