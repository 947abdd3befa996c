"""The whole job on the built-in micro-Doppler simulator, in one command.

simulate a data set -> train the VAE -> encode latents -> train the
class-conditional latent diffusion model -> sample every person -> write an
HTML report with pictures. Each stage writes into one run directory and marks
itself done; a rerun skips finished stages and resumes an interrupted one.
"""

import html
import json
import os
import time

from . import logger
from .errors import UserError

STAGES = ("data", "vae", "latents", "diffusion", "samples", "report")

# A preset fixes the size of every stage. "tiny" is meant for a 2-core CPU in
# under 15 minutes; "gpu" is configs/microdoppler_small.yaml on one GPU.
PRESETS = {
    "tiny": {
        # 32x32 spectrograms (8x8x4 latents): a 64x64 VAE alone would take the
        # whole 15 minutes of a 2-core CPU.
        "num_users": 31, "samples_per_user": 40, "image_size": 32,
        "vae": {"vae_size": "tiny", "lr_anneal_steps": 1200, "batch_size": 16, "lr": 1e-3,
                "log_interval": 100, "save_interval": 400},
        "diffusion": {"num_channels": 32, "num_res_blocks": 2, "channel_mult": "1,2",
                      "attention_resolutions": "4", "num_head_channels": 32, "batch_size": 32,
                      "lr": 5e-4, "lr_anneal_steps": 2500, "dropout": 0.0, "ema_rate": "0.999",
                      # Predicting x_0 learns the global layout within a CPU's few
                      # thousand steps; an eps model that short is still poor at
                      # high noise, and its samples are blobs.
                      "predict_xstart": True,
                      "log_interval": 100, "save_interval": 500, "sample_interval": 0, "compile": False,
                      "num_workers": 0, "grad_clip": 1.0},
        "sampling": {"num_images_per_user": 4, "timestep_respacing": "ddim25", "batch_size": 64},
    },
    "gpu": {
        "num_users": 31, "samples_per_user": 300, "image_size": 64,
        "vae": {"vae_size": "base", "lr_anneal_steps": 20000, "batch_size": 64, "lr": 1e-4,
                "log_interval": 200, "save_interval": 2000},
        "diffusion": {"config": "configs/microdoppler_small.yaml"},
        "sampling": {"num_images_per_user": 16, "timestep_respacing": "ddim50", "batch_size": 256},
    },
}


def quickstart_defaults():
    return {"preset": "tiny", "run_dir": "runs/quickstart", "seed": 0, "workers": 2, "until": "report"}


class Stages:
    """Markers of finished stages (``run_dir/stages.json``)."""

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, "stages.json")
        self.done = json.load(open(self.path)) if os.path.exists(self.path) else {}

    def finished(self, name):
        return name in self.done

    def mark(self, name, seconds, **info):
        from .checkpoint import atomic_write_bytes

        self.done[name] = {"seconds": round(seconds, 1), **info}
        atomic_write_bytes(self.path, json.dumps(self.done, indent=2).encode())


def _banner(text):
    logger.log(f"\n=== {text} ===")


def _repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _simulate(run_dir, preset, seed, workers):
    import sys

    root = _repo_root()
    if root not in sys.path:
        sys.path.insert(0, root)
    from datasets.microdoppler import simulate_dataset

    out = os.path.join(run_dir, "data")
    simulate_dataset(out, num_users=preset["num_users"], samples_per_user=preset["samples_per_user"],
                     image_size=preset["image_size"], seed=seed, workers=workers, overwrite=True, progress=True)
    return out


def _train_vae(run_dir, preset, seed):
    from .vae_training import train_vae, vae_train_defaults

    config = {**vae_train_defaults(), **preset["vae"], "data_dir": os.path.join(run_dir, "data"),
              "output_dir": os.path.join(run_dir, "vae"), "checkpoint_dir": os.path.join(run_dir, "vae_train"),
              "image_size": preset["image_size"], "seed": seed, "num_workers": 0}
    train_vae(config)


def _encode(run_dir, preset):
    from .latent_datasets import build_latent_cache, encode_latents_defaults

    config = {**encode_latents_defaults(), "data_dir": os.path.join(run_dir, "data"),
              "vae_path": os.path.join(run_dir, "vae"), "output_dir": os.path.join(run_dir, "latents"),
              "image_size": preset["image_size"], "latent_scale": "stored", "random_flip": False,
              "num_workers": 0}
    build_latent_cache(**config)


def _diffusion_config(run_dir, preset, seed):
    from .config import load_yaml_config
    from .latent_model import latent_train_defaults

    defaults = latent_train_defaults()
    settings = dict(preset["diffusion"])
    config = dict(defaults)
    yaml_path = settings.pop("config", None)
    if yaml_path:
        config.update(load_yaml_config(os.path.join(_repo_root(), yaml_path), defaults))
    config.update(settings)
    config.update(
        latent_cache=os.path.join(run_dir, "latents"), log_dir=os.path.join(run_dir, "diffusion"),
        image_size=preset["image_size"], class_cond=True, seed=seed, resume_checkpoint="auto",
        learn_sigma=True, noise_schedule="cosine",
    )
    return config


def _train_diffusion(run_dir, preset, seed):
    from .latent_model import latent_training_data
    from .training import run_training

    run_training(_diffusion_config(run_dir, preset, seed), latent_training_data)


def _sample(run_dir, preset, seed):
    from .generate import run_sampling, sample_defaults

    config = {**sample_defaults(), **preset["sampling"], "model_path": os.path.join(run_dir, "diffusion"),
              "output_dir": os.path.join(run_dir, "samples"), "use_ddim": True, "seed": seed,
              "clip_denoised": "none"}
    run_sampling(config)


def run_quickstart(config, preset=None):
    """Run (or resume) every stage up to ``config["until"]``; returns the report
    path. ``preset`` (a dict shaped like ``PRESETS["tiny"]``) replaces the named one."""
    if preset is None and config["preset"] not in PRESETS:
        raise UserError(f"preset {config['preset']!r} must be one of {', '.join(PRESETS)}")
    if config["until"] not in STAGES:
        raise UserError(f"until {config['until']!r} must be one of {', '.join(STAGES)}")
    preset = preset or PRESETS[config["preset"]]
    run_dir = os.path.abspath(config["run_dir"])
    os.makedirs(run_dir, exist_ok=True)
    logger.configure(dir=os.path.join(run_dir, "logs"), format_strs="stdout,log")
    stages = Stages(run_dir)
    seed = config["seed"]
    steps = {
        "data": lambda: _simulate(run_dir, preset, seed, config["workers"]),
        "vae": lambda: _train_vae(run_dir, preset, seed),
        "latents": lambda: _encode(run_dir, preset),
        "diffusion": lambda: _train_diffusion(run_dir, preset, seed),
        "samples": lambda: _sample(run_dir, preset, seed),
        "report": lambda: write_report(run_dir),
    }
    for number, name in enumerate(STAGES, start=1):
        if stages.finished(name):
            logger.log(f"[{number}/{len(STAGES)}] {name}: done earlier ({stages.done[name]['seconds']} s), skipped")
        else:
            _banner(f"[{number}/{len(STAGES)}] {name}")
            start = time.time()
            steps[name]()
            stages.mark(name, time.time() - start, preset=config["preset"])
            # Each stage configures its own log; come back to the run's.
            logger.configure(dir=os.path.join(run_dir, "logs"), format_strs="stdout,log")
            logger.log(f"[{number}/{len(STAGES)}] {name}: {time.time() - start:.0f} s")
        if name == config["until"]:
            break
    report = os.path.join(run_dir, "report.html")
    total = sum(v["seconds"] for v in stages.done.values())
    times = ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in stages.done.items())
    logger.log(f"stage times: {times} (total {total / 60:.1f} min)")
    if os.path.exists(report):
        logger.log(f"report: {report}")
    return report


# ----------------------------------------------------------------------------- report


def _loss_plot(progress_csv, out_png):
    """Plot training loss by step from a progress.csv (matplotlib, no display)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(progress_csv) as f:
        rows = list(csv.DictReader(f))
    keys = [k for k in ("loss", "mse", "vb", "loss_q0", "loss_q3") if rows and k in rows[0]]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for key in keys:
        pts = [(float(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


def _side_by_side(run_dir, out_png, people=8, per_person=4):
    """Rows of people: real spectrograms on the left, generated on the right."""
    import numpy as np
    from PIL import Image

    from .sample_io import image_grid, save_png

    data, samples = os.path.join(run_dir, "data"), os.path.join(run_dir, "samples")
    users = sorted(d for d in os.listdir(samples) if os.path.isdir(os.path.join(samples, d)))[:people]
    tiles = []
    for user in users:
        real = sorted(os.listdir(os.path.join(data, user)))[:per_person]
        fake = sorted(os.listdir(os.path.join(samples, user)))[:per_person]
        for name in real:
            tiles.append(np.array(Image.open(os.path.join(data, user, name)).convert("RGB")))
        tiles.extend([np.zeros_like(tiles[-1])] * (per_person - len(real)))
        for name in fake:
            tiles.append(np.array(Image.open(os.path.join(samples, user, name)).convert("RGB")))
        tiles.extend([np.zeros_like(tiles[-1])] * (per_person - len(fake)))
    save_png(out_png, image_grid(np.stack(tiles), columns=2 * per_person))
    return users


def write_report(run_dir):
    """``run_dir/report.html``: data, VAE, training and samples, with pictures."""
    from .checkpoint import atomic_write_bytes

    figures = os.path.join(run_dir, "report_files")
    os.makedirs(figures, exist_ok=True)
    stages = Stages(run_dir).done
    parts = ["<h1>guided-diffusion-vae quickstart report</h1>",
             f"<p>Run directory: <code>{html.escape(run_dir)}</code></p>"]
    meta_path = os.path.join(run_dir, "data", "metadata.json")
    if os.path.exists(meta_path):
        meta = json.load(open(meta_path))
        people = meta.get("people", [])
        radar = meta.get("radar", {})
        facts = [f"{len(people)} simulated people"]
        if "carrier_hz" in radar:
            facts.append(f"radar {radar['carrier_hz'] / 1e9:g} GHz")
        if "prf_hz" in radar:
            facts.append(f"PRF {radar['prf_hz']:g} Hz")
        parts.append(f"<h2>1. Data</h2><p>{html.escape(', '.join(facts))}; metadata in "
                     f"<code>data/metadata.json</code>.</p>")
    vae_metrics = os.path.join(run_dir, "vae", "metrics.json")
    if os.path.exists(vae_metrics):
        m = json.load(open(vae_metrics))
        shown = {k: v for k, v in m.items() if isinstance(v, (int, float))}
        parts.append("<h2>2. VAE</h2><p>Held-out reconstruction: "
                     + ", ".join(f"{html.escape(k)} {v:.4g}" for k, v in shown.items())
                     + "</p><p>Real (top) and reconstructed (bottom):</p>"
                     + "<img src='vae/reconstructions.png' style='max-width:100%'>")
    progress = os.path.join(run_dir, "diffusion", "progress.csv")
    if os.path.exists(progress):
        _loss_plot(progress, os.path.join(figures, "loss.png"))
        parts.append("<h2>3. Diffusion training</h2><img src='report_files/loss.png'>")
    if os.path.isdir(os.path.join(run_dir, "samples")):
        users = _side_by_side(run_dir, os.path.join(figures, "real_vs_generated.png"))
        parts.append("<h2>4. Samples</h2><p>Each row one person ("
                     + ", ".join(html.escape(u) for u in users)
                     + "): four real spectrograms, then four generated ones.</p>"
                     "<img src='report_files/real_vs_generated.png' style='image-rendering:pixelated;width:100%'>"
                     "<p>Every person, generated (one row each):</p>"
                     "<img src='samples/grid.png' style='image-rendering:pixelated;width:60%'>")
    if stages:
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v['seconds']:.0f} s</td></tr>" for k, v in stages.items())
        parts.append(f"<h2>Stage times</h2><table>{rows}</table>")
    page = "<!doctype html><meta charset='utf-8'><title>quickstart report</title>" \
           "<body style='font-family:sans-serif;max-width:1100px;margin:auto'>" + "\n".join(parts) + "</body>"
    path = os.path.join(run_dir, "report.html")
    atomic_write_bytes(path, page.encode("utf-8"))
    return path
