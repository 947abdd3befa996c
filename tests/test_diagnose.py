"""scripts/diagnose.py: each planted fault is named, a healthy checkpoint passes."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from guided_diffusion_vae.core import script_util
from guided_diffusion_vae.training.checkpoint import ema_path, model_path, save_weights
from guided_diffusion_vae.tools.diagnosis import EXIT_FAILED, init_share
from guided_diffusion_vae.core.script_util import split_flags
from guided_diffusion_vae.latent.vae_wrapper import VAEInterface
from tests.helpers.vae_helpers import REPO, load_raw_vae, make_image_folder, make_tiny_vae

SIZE = 16  # pixels; latents are 4x4x4
LABELS = {"0": "user_01", "1": "user_02"}


def _load_script():
    spec = importlib.util.spec_from_file_location("diagnose_script", os.path.join(REPO, "scripts", "diagnose.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_vae(path, images, steps=120):
    """A tiny VAE that reconstructs the test images (RMS ~0.05)."""
    vae = load_raw_vae(path).train()
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = (vae.decode(vae.encode(images).latent_dist.mean).sample - images).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval().save_pretrained(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("diagnose")
    images_dir = root / "images"
    make_image_folder(images_dir, classes=tuple(LABELS.values()), per_class=4, size=SIZE)
    from guided_diffusion_vae.tools.diagnosis import load_real_images

    images = load_real_images(str(images_dir), SIZE, 1, 8)
    vae_dir = make_tiny_vae(root / "vae", seed=0)
    _train_vae(vae_dir, images)
    other_vae = make_tiny_vae(root / "vae_other", seed=1)
    vae = VAEInterface(vae_dir, device="cpu")
    vae.measure_latent_scale([images])
    flags = script_util.model_and_diffusion_defaults()
    flags.update(image_size=SIZE // 4, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                 attention_resolutions="", diffusion_steps=100, in_channels=vae.latent_channels,
                 class_cond=True, num_classes=2, predict_xstart=True)
    model_config, diffusion_config = split_flags(flags)

    def weights(seed, trained=True):
        torch.manual_seed(seed)
        model = script_util.create_model(**model_config)
        if trained:  # zero-initialised outputs predict x0 = 0: give it a graded output
            with torch.no_grad():
                for p in model.out.parameters():
                    p.normal_(0, 0.05)
        return model.state_dict()

    def make(folder, *, step=1000, scale=1.0, ema=None, warmup=True, nan=False):
        """A latent checkpoint in ``folder``: model<step> and, with ``ema``
        ("healthy" or "young"), ema_0.9999_<step>. Returns the model file."""
        os.makedirs(folder, exist_ok=True)
        description = vae.describe()
        description["latent_scale"] = vae.latent_scale * scale
        meta = {"step": step, "weights": "model", "model": model_config, "diffusion": diffusion_config,
                "vae": description, "data": {"image_size": SIZE, "label_map": LABELS},
                "train": {"ema_rate": "0.9999", "ema_warmup": warmup}}
        raw = weights(0)
        if nan:
            raw["out.2.weight"][0, 0, 0, 0] = float("nan")
        save_weights(model_path(str(folder), step), raw, meta)
        if ema == "healthy":
            averaged = {k: v + 1e-3 * torch.randn_like(v) if v.is_floating_point() else v for k, v in raw.items()}
        elif ema == "young":  # still the random initialisation: zero output layer
            averaged = weights(1, trained=False)
        if ema:
            save_weights(ema_path(str(folder), "0.9999", step), averaged, {**meta, "weights": "ema_0.9999"})
        return model_path(str(folder), step)

    return {"root": root, "images": str(images_dir), "vae": vae_dir, "other_vae": other_vae, "make": make,
            "script": _load_script()}


@pytest.fixture(autouse=True)
def _log_to_file(tmp_path):
    """The package logger writes to a file here, not to a stdout capsys closes."""
    from guided_diffusion_vae.runtime import logger

    with logger.scoped_configure(dir=str(tmp_path / "log"), format_strs="log"):
        yield


def _run(env, capsys, *args):
    code = env["script"].main(["--device", "cpu", *map(str, args)])
    out = capsys.readouterr().out
    return code, out


def _line(out, name):
    return next(line for line in out.splitlines() if line.split()[1:2] == [name])


def test_healthy_checkpoint_passes_and_writes_json(env, capsys):
    run = env["root"] / "healthy"
    env["make"](run, step=1000, ema="healthy", warmup=True)
    report = env["root"] / "healthy.json"
    code, out = _run(env, capsys, "--model_path", run, "--data_dir", env["images"], "--output_json", report)
    assert code == 0, out
    for name in ("sampling", "clipping", "nan_inf", "ema", "vae_match", "vae_roundtrip", "latent_scale"):
        assert _line(out, name).startswith("OK"), out
    assert "ema_0.9999_001000" in out and "diagnosis (OK): No fault found" in out
    data = json.loads(report.read_text())
    assert data["weights_file"].endswith("ema_0.9999_001000.safetensors")
    steps = data["trajectory"]["steps"]
    assert len(steps) == 25 and data["trajectory"]["spacing"] == "ddim25"
    assert set(steps[0]["x_t"]) >= {"min", "max", "std"} and set(steps[0]["x0"]) >= {"min", "max", "std"}
    assert set(data["trajectory"]["clip_fraction"]) == {"none", "pixel", "fixed", "dynamic"}
    assert data["checks"]["latent_scale"]["std"] == pytest.approx(1.0, abs=0.05)
    assert data["checks"]["ema"]["distance"] < 0.05


def test_wrong_scale_is_named_and_exits_nonzero(env):
    """Through the script itself: exit code and printed lines."""
    ckpt = env["make"](env["root"] / "scale", scale=100.0)
    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "diagnose.py"), "--model_path", ckpt,
                             "--data_dir", env["images"], "--device", "cpu"],
                            capture_output=True, text=True, timeout=120, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO})
    out = result.stdout
    assert result.returncode == EXIT_FAILED, out + result.stderr
    assert _line(out, "latent_scale").startswith("FAIL") and "latent std 100" in _line(out, "latent_scale")
    assert _line(out, "vae_match").startswith("OK") and _line(out, "sampling").startswith("OK")
    assert "diagnosis (FAIL): The stored latent scale is wrong" in out


def test_young_ema_is_named(env, capsys):
    run = env["root"] / "young"
    env["make"](run, step=50, ema="young", warmup=False)
    code, out = _run(env, capsys, "--model_path", run)
    assert code == EXIT_FAILED
    line = _line(out, "ema")
    assert line.startswith("FAIL") and "without warm-up" in line and "99.5% of it is still the starting" in line
    distance = float(line.split("distance to the raw weights ")[1].split(":")[0])
    assert distance > 0.5
    assert "diagnosis (FAIL): The EMA is too young" in out and "--use_ema False" in out
    assert "skipped: no --data_dir given" in _line(out, "vae_roundtrip")
    # The same run's raw weights are fine: the EMA is then only reported.
    code, out = _run(env, capsys, "--model_path", run, "--use_ema", "False")
    assert code == 0 and _line(out, "ema").startswith("OK  ") and "sampling the raw weights" in out
    # The rule: without warm-up a 0.9999 EMA warns until ~3/(1-rate) steps; warm-up makes it usable early.
    assert init_share(0.9999, 6000, False) > 0.5 > init_share(0.9999, 8000, False) > 0.05
    assert init_share(0.9999, 31000, False) < 0.05
    assert init_share(0.9999, 100, True) < 1e-6


def test_swapped_vae_is_named(env, capsys):
    ckpt = env["make"](env["root"] / "swapped")
    code, out = _run(env, capsys, "--model_path", ckpt, "--vae_path", env["other_vae"], "--data_dir", env["images"])
    assert code == EXIT_FAILED
    assert _line(out, "vae_match").startswith("FAIL") and "fingerprint" in _line(out, "vae_match")
    assert "diagnosis (FAIL): The VAE is not the one the model was trained with" in out


def test_nan_weight_is_named_with_its_first_step(env, capsys):
    ckpt = env["make"](env["root"] / "nan", nan=True)
    code, out = _run(env, capsys, "--model_path", ckpt, "--output_json", env["root"] / "nan.json")
    assert code == EXIT_FAILED
    line = _line(out, "nan_inf")
    assert line.startswith("FAIL") and "out.2.weight" in line and "at step 0" in line
    assert _line(out, "sampling").startswith("FAIL")
    assert "diagnosis (FAIL): The weights hold NaN/Inf (out.2.weight)" in out
    data = json.loads((env["root"] / "nan.json").read_text())  # valid JSON: NaN written as null
    assert data["checks"]["nan_inf"]["first_nonfinite"]["step"] == 0


def test_pixel_model_skips_the_vae_checks(tmp_path, capsys, env):
    flags = script_util.model_and_diffusion_defaults()
    flags.update(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="",
                 diffusion_steps=30, in_channels=3, predict_xstart=True)
    torch.manual_seed(0)
    model_config, diffusion_config = split_flags(flags)
    state = script_util.create_model(**model_config).state_dict()
    path = str(tmp_path / "model000010.safetensors")
    save_weights(path, state, {"step": 10, "weights": "model", "model": model_config,
                               "diffusion": diffusion_config, "vae": None, "data": {"image_size": 8}, "train": {}})
    code, out = _run(env, capsys, "--model_path", path, "--data_dir", env["images"])
    assert code == 0, out
    for name in ("vae_match", "vae_roundtrip", "latent_scale"):
        assert _line(out, name).startswith("SKIP") and "skipped: pixel-space model" in _line(out, name)
    assert "25 DDIM steps (25)" in _line(out, "sampling")  # 30 steps: evenly spaced, not ddim25
