"""The whole job on the built-in micro-Doppler simulator, in one command.

simulate a data set (a training and a held-out split of the same people) ->
train the VAE -> encode latents -> train the class-conditional latent
diffusion model -> sample every person -> evaluate (does each sample show its
person?) -> write an HTML report with pictures. Each stage writes into one run
directory and marks itself done; a rerun skips finished stages and resumes an
interrupted one.

Each stage also records the settings its results depend on
(:func:`stage_settings`; not thread counts, log or save intervals). A rerun whose settings differ
from those a stage was started or finished with is refused before anything is
written, naming the first stage and setting that changed, so results made with
two presets are never mixed; ``--overwrite`` removes that stage's outputs and
those of every later stage, and redoes them.

Run directory: ``data/train``, ``data/test`` (PERSON/NNN.png), ``vae/``,
``latents/``, ``diffusion/`` (the training run), ``samples/``, ``eval/``
(metrics.json, nearest_pairs.png, the reference classifier), ``report.html``.

A preset whose diffusion stage sets ``eval_interval`` evaluates the model
during training on ``data/train`` and ``data/test`` (``diffusion/eval/``);
with ``keep_best`` the samples stage draws from the best evaluated weights
(``diffusion/best/``) rather than the last ones.
"""

import json
import os
import shutil
import time

from ..runtime import logger
from ..runtime.dist_util import set_threads, threads_defaults
from ..runtime.errors import UserError
from ..runtime.files import atomic_write_json, check_writable_target, read_json_object
from ..simulate import simulate_dataset
from ..training.vae_training import train_vae, vae_train_defaults
from ..latent.latent_datasets import build_latent_cache, encode_latents_defaults
from ..runtime.config import load_yaml_config
from ..training.latent_training import latent_train_defaults, latent_training_data
from ..training.checkpoint import model_path, parse_step
from ..training.diffusion_training import run_training
from ..sampling.sample_from_checkpoint import run_sampling, sample_defaults
from ..evaluation.evaluate import evaluate_defaults, run_evaluation
from ..evaluation.monitor import BEST_DIR, build_monitor
from ..report.html import write_report
from ..report.verdict import verdict_text

# The stages in order: what each does, and where it writes (under the run directory).
STAGES = {
    "data": "simulate a training and a held-out split of the same people (data/)",
    "vae": "train the VAE (vae/, its logs in vae_train/)",
    "latents": "encode the training images into a latent cache (latents/)",
    "diffusion": "train the class-conditional latent diffusion model (diffusion/), then the small network that "
                 "autoguidance steers away from (diffusion/guide/) if the preset has one",
    "samples": "sample every person (samples/)",
    "evaluate": "does each sample show its person? (eval/)",
    "report": "one HTML page with every picture (report.html)",
}
STAGE_NAMES = list(STAGES)
# The autoguidance guide's run folder, inside the diffusion stage's.
GUIDE_DIR = "guide"
# stages.json of an older layout (one data folder, no held-out split) cannot be resumed.
LAYOUT = 2

# A preset fixes the size of every stage; "about" is its line in --help, with
# the time measured in docs/BENCHMARKS.md and docs/QUALITY.md.
PRESETS = {
    "tiny": {
        "about": "a 2-core CPU, 32x32 spectrograms, modest quality (8.8 min on 2 cores)",
        # 32x32 spectrograms (8x8x4 latents): a 64x64 VAE alone would take
        # longer than this whole preset on a 2-core CPU.
        "num_users": 31, "train_per_user": 40, "test_per_user": 16, "image_size": 32,
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
        "sampling": {"num_images_per_user": 16, "timestep_respacing": "ddim25", "batch_size": 128},
        # One classifier seed: three would triple the CPU time of this stage.
        "evaluate": {"classifier_steps": 600, "classifier_embed_dim": 64, "augment_k": "8,all",
                     "augment_generated": 16, "classifier_seeds": 1},
    },
    "gpu": {
        "about": "one GPU, 64x64, the configs/microdoppler_small.yaml network with augmentation, sampled "
                 "with autoguidance from a small guide network (6.4 min end to end on an H100, "
                 "docs/BENCHMARKS.md)",
        "num_users": 31, "train_per_user": 96, "test_per_user": 32, "image_size": 64,
        # Measured on an H100 (docs/QUALITY.md): the small VAE with 8 latent
        # channels at lr 1e-3 keeps identity (rCAS 0.98 x TRTR after 5,000
        # steps, 3.6 min); 4 channels at lr 1e-4 kept half of it.
        "vae": {"vae_size": "small", "latent_channels": 8, "lr_anneal_steps": 5000, "batch_size": 64, "lr": 1e-3,
                "log_interval": 500, "save_interval": 1000},
        # The network of configs/microdoppler_small.yaml, trained for the
        # preset's time budget; eager (a compile per resumed piece costs more
        # than it saves in a run this short).
        # Non-leaking augmentation (docs/QUALITY.md, H200 sweep of 2026-12-03):
        # copied training walks 69 -> 4 of 3,100, within-person variety 0.86 ->
        # 0.91 x real, gain with all real data -3.7 -> -2.6 points; CAS fell
        # 0.97 -> 0.92 x TRTR and FD rose 4.3 -> 5.5 x floor.
        # class_dropout_prob: the model sampled in the guidance comparison had
        # it (a null class, unused by autoguidance).
        "diffusion": {"config": "configs/microdoppler_small.yaml", "lr_anneal_steps": 5000, "compile": False,
                      "augment": "time_shift,doppler_scale", "class_dropout_prob": 0.1},
        # Autoguidance (Karras et al. 2024) at 2.0 from a 64-channel network
        # trained 1,000 steps, against classifier-free guidance 1.5 in
        # 170..880 (H200, 2026-12-03, docs/QUALITY.md): within-person variety
        # 0.89 -> 0.98 x real, copies 4 -> 1 of 3,100, gain at 32 real per
        # person -1.1 -> +0.8 and with all real -2.5 -> -1.9 points; CAS fell
        # 1.01 -> 0.95 x TRTR, TSTR 0.84 -> 0.77 x and FD rose 3.7 -> 4.5 x floor.
        "guide": {"num_channels": 64, "lr_anneal_steps": 1000, "class_dropout_prob": 0.0, "save_interval": 1000,
                  "keep_checkpoints": 1},
        "sampling": {"num_images_per_user": 100, "timestep_respacing": "ddim50", "batch_size": 256,
                     "guidance_scale": 2.0},
        "evaluate": {"classifier_steps": 1500, "augment_k": "32,all", "augment_generated": 100,
                     "classifier_seeds": 3},
    },
}


def quickstart_defaults():
    return {"preset": "tiny", "run_dir": "runs/quickstart", "seed": 0, "workers": 0, "until": "report",
            "overwrite": False, **threads_defaults()}


FLAG_HELP = {
    "preset": "the size of every stage: " + "; ".join(f"{name}, {p['about']}" for name, p in PRESETS.items()),
    "run_dir": "the run folder: every stage writes here, and a rerun resumes here",
    "seed": "seed of the simulated people, their walks and every training stage",
    "workers": "simulator processes (0 = one per CPU core)",
    "until": "stop after this stage: " + "; ".join(f"{name}: {what}" for name, what in STAGES.items()),
    "overwrite": "when a setting differs from the one a stage of run_dir was made with, delete that stage's "
                 "results and those of every later stage and redo them (without it such a rerun is refused)",
}
FLAG_CHOICES = {"preset": tuple(PRESETS), "until": tuple(STAGES)}

# What each stage writes in the run directory (removed by --overwrite).
STAGE_OUTPUTS = {
    "data": ("data",), "vae": ("vae", "vae_train"), "latents": ("latents",), "diffusion": ("diffusion",),
    "samples": ("samples",), "evaluate": ("eval",), "report": ("report.html", "report_files"),
}

# Preset keys that change how a stage runs but not what it produces.
NOT_RESULT_SETTINGS = {"log_interval", "save_interval", "sample_interval", "progress", "num_workers", "compile",
                       "tensorboard", "keep_checkpoints", "keep_states", "num_preview_samples", "batch_size"}


def stage_settings(config, preset):
    """``{stage: {setting: value}}``: what each stage's results depend on.
    The preset's name heads every stage; then the values it fixes. A
    diffusion config file counts by its contents. Sampling's batch size is
    left out (samples do not depend on it), training batch sizes are not."""

    def kept(values, keep_batch_size=False):
        return {k: v for k, v in values.items()
                if k not in NOT_RESULT_SETTINGS or (keep_batch_size and k == "batch_size")}

    diffusion = dict(preset["diffusion"])
    yaml_path = diffusion.pop("config", None)
    if yaml_path:
        diffusion = {**load_yaml_config(packaged_config(yaml_path), latent_train_defaults()), **diffusion}
    common = {"preset": config["preset"], "seed": config["seed"], "image_size": preset["image_size"]}
    settings = {
        "data": {**common, **{k: preset[k] for k in ("num_users", "train_per_user", "test_per_user")}},
        "vae": {**common, **kept(preset["vae"], keep_batch_size=True)},
        "latents": dict(common),
        # the preset's size wins, as in training
        "diffusion": {**kept(diffusion, keep_batch_size=True), **common,
                      **({"guide": kept(preset["guide"], keep_batch_size=True)} if preset.get("guide") else {})},
        "samples": {**common, **kept(preset["sampling"])},
        "evaluate": {**common, **kept(preset.get("evaluate", {}))},
        "report": {"preset": config["preset"]},
    }
    # JSON's view of the values (tuples become lists), as stages.json will hold them.
    return json.loads(json.dumps(settings))


def _first_change(recorded, current):
    """``(setting, old, new)`` of the first difference (the preset first), or None."""
    for key in sorted(set(recorded) | set(current), key=lambda k: (k != "preset", k)):
        if recorded.get(key) != current.get(key):
            return key, recorded.get(key), current.get(key)
    return None


class Stages:
    """Markers of finished stages and the settings of each (``run_dir/stages.json``).

    ``done``: ``{stage: {"seconds", "settings"}}``; ``started``: the settings
    of stages begun but not finished; ``partial``: seconds spent in runs of a
    stage that were stopped early (added when it finishes); ``clearing``:
    stages whose outputs ``--overwrite`` is removing (finished on the next
    start if a run died in the middle).
    """

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, "stages.json")
        self.done = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.done = json.load(f)
            if self.done and self.done.pop("layout", None) != LAYOUT:
                raise UserError(f"{run_dir} was made by an older quickstart (no held-out split); "
                                "use a new --run_dir")
        self.partial = self.done.pop("partial", {})
        self.started = self.done.pop("started", {})
        self.clearing = [name for name in self.done.pop("clearing", []) if name in STAGE_OUTPUTS]

    def finished(self, name):
        return name in self.done

    def first_missing(self):
        """The first stage recorded as done whose results are no longer in the
        run folder (deleted by hand), or None."""
        for name in STAGE_NAMES:
            if name in self.done and not os.path.exists(os.path.join(self.run_dir, STAGE_OUTPUTS[name][0])):
                return name
        return None

    def recorded_settings(self, name):
        """The settings stage ``name`` was finished or started with (None: never run)."""
        if name in self.done:
            return self.done[name].get("settings")
        return self.started.get(name)

    def first_change(self, settings, until):
        """``(stage, setting, old, new)`` for the first stage up to ``until``
        whose recorded settings differ from ``settings``, or None."""
        for name in STAGE_NAMES[: STAGE_NAMES.index(until) + 1]:
            recorded, current = self.recorded_settings(name), settings[name]
            if recorded is None and name in self.done:
                # A marker from before settings were recorded holds the preset's name only.
                recorded, current = {"preset": self.done[name].get("preset")}, {"preset": current["preset"]}
            change = None if recorded is None else _first_change(recorded, current)
            if change:
                return (name, *change)
        return None

    def start(self, name, settings):
        if self.started.get(name) != settings:
            self.started[name] = settings
            self._write()

    def mark(self, name, seconds, settings):
        self.started.pop(name, None)
        self.done[name] = {"seconds": round(seconds + self.partial.pop(name, 0.0), 1), "settings": settings}
        self._write()

    def mark_partial(self, name, seconds):
        self.partial[name] = round(self.partial.get(name, 0.0) + seconds, 1)
        self._write()

    def clear_from(self, name):
        """Forget stage ``name`` and every later one, then remove their outputs.
        The intent is written first, so a run killed while deleting finishes
        the job on its next start instead of resuming from half-deleted results."""
        later = STAGE_NAMES[STAGE_NAMES.index(name):]
        for stage in later:
            self.done.pop(stage, None)
            self.started.pop(stage, None)
            self.partial.pop(stage, None)
        self.clearing = sorted(set(self.clearing) | set(later), key=STAGE_NAMES.index)
        self._write()
        self.finish_clearing()

    def finish_clearing(self):
        if not self.clearing:
            return
        for stage in self.clearing:
            for entry in STAGE_OUTPUTS[stage]:  # fixed names: nothing read from the file becomes a path
                path = os.path.join(self.run_dir, entry)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                elif os.path.lexists(path):
                    os.remove(path)
        self.clearing = []
        self._write()

    def _write(self):
        extra = {key: value for key, value in (("partial", self.partial), ("started", self.started),
                                               ("clearing", self.clearing)) if value}
        state = {"layout": LAYOUT, **self.done, **extra}
        atomic_write_json(self.path, state, sort_keys=False)


def _shown(value):
    """A setting as the refusal prints it: plain words and numbers bare."""
    return "unset" if value is None else value if isinstance(value, (str, int, float)) else json.dumps(value)


def packaged_config(name):
    """A config shipped with the package (``configs/NAME`` of a checkout links there)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(package, "configs", os.path.basename(name))


def _simulate(run_dir, preset, seed, workers):
    workers = workers or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())

    # The held-out split: the same people (people_seed), other walks (seed + 1).
    os.makedirs(os.path.join(run_dir, "data"), exist_ok=True)
    for split, count, walk_seed in (("train", preset["train_per_user"], seed), ("test", preset["test_per_user"], seed + 1)):
        simulate_dataset(os.path.join(run_dir, "data", split), num_users=preset["num_users"], samples_per_user=count,
                         image_size=preset["image_size"], seed=walk_seed, people_seed=seed, workers=workers,
                         overwrite=True, progress=True)


def _train_vae(run_dir, preset, seed):
    config = {**vae_train_defaults(), **preset["vae"], "data_dir": os.path.join(run_dir, "data", "train"),
              "output_dir": os.path.join(run_dir, "vae"), "checkpoint_dir": os.path.join(run_dir, "vae_train"),
              "image_size": preset["image_size"], "seed": seed, "num_workers": 0}
    return train_vae(config) is not None  # None: a stop signal ended it early (saved)


def _encode(run_dir, preset):
    config = {**encode_latents_defaults(), "data_dir": os.path.join(run_dir, "data", "train"),
              "vae_path": os.path.join(run_dir, "vae"), "output_dir": os.path.join(run_dir, "latents"),
              "image_size": preset["image_size"], "latent_scale": "stored", "random_flip": False,
              "num_workers": 0}
    build_latent_cache(**config)


def _diffusion_config(run_dir, preset, seed):
    defaults = latent_train_defaults()
    settings = dict(preset["diffusion"])
    config = dict(defaults)
    yaml_path = settings.pop("config", None)
    if yaml_path:
        config.update(load_yaml_config(packaged_config(yaml_path), defaults))
    config.update(settings)
    config.update(
        latent_cache=os.path.join(run_dir, "latents"), log_dir=os.path.join(run_dir, "diffusion"),
        image_size=preset["image_size"], class_cond=True, seed=seed, resume_checkpoint="auto",
        learn_sigma=True, noise_schedule="cosine",
    )
    if config["eval_interval"]:
        config.update(eval_real_train=os.path.join(run_dir, "data", "train"),
                      eval_real_test=os.path.join(run_dir, "data", "test"))
    return config


def _guide_config(run_dir, preset, seed):
    """The autoguidance guide: the diffusion run's settings with the preset's
    ``guide`` changes (smaller, shorter), in ``diffusion/guide/``, unmonitored."""
    config = _diffusion_config(run_dir, {**preset, "diffusion": {**preset["diffusion"], **preset["guide"]}}, seed)
    config.update(log_dir=guide_dir(run_dir), eval_interval=0, keep_best="", eval_real_train="", eval_real_test="",
                  sample_interval=0)
    return config


def guide_dir(run_dir):
    return os.path.join(run_dir, "diffusion", GUIDE_DIR)


def _train_diffusion(run_dir, preset, seed):
    """Train the model, then the guide if the preset has one; False when a
    stop signal ended either early (saved, not finished)."""
    config = _diffusion_config(run_dir, preset, seed)
    steps = int(config["lr_anneal_steps"])
    if not os.path.exists(model_path(config["log_dir"], steps)):  # else it finished before the guide was stopped
        if parse_step(run_training(config, latent_training_data, build_monitor)) < steps:
            return False
    if not preset.get("guide"):
        return True
    config = _guide_config(run_dir, preset, seed)
    return parse_step(run_training(config, latent_training_data)) >= int(config["lr_anneal_steps"])


def sampled_weights(run_dir, preset):
    """The folder the samples stage draws from: the best evaluated weights
    when the diffusion stage keeps them, else the training run's last."""
    run = os.path.join(run_dir, "diffusion")
    if preset["diffusion"].get("keep_best"):
        best = os.path.join(run, BEST_DIR)
        if os.path.isdir(best) and any(name.startswith("model") for name in os.listdir(best)):
            return best
        logger.log(f"no best weights in {best} (no evaluation gave a value): sampling the last ones")
    return run


def _sample(run_dir, preset, seed):
    config = {**sample_defaults(), **preset["sampling"], "model_path": sampled_weights(run_dir, preset),
              "output_dir": os.path.join(run_dir, "samples"), "use_ddim": True, "seed": seed,
              "clip_denoised": "none", "guide_model_path": guide_dir(run_dir) if preset.get("guide") else ""}
    run_sampling(config)


def _evaluate(run_dir, preset, seed):
    config = {**evaluate_defaults(), **preset.get("evaluate", {}), "seed": seed,
              "real_train": os.path.join(run_dir, "data", "train"), "real_test": os.path.join(run_dir, "data", "test"),
              "generated": os.path.join(run_dir, "samples"), "vae_path": os.path.join(run_dir, "vae"),
              "output_json": os.path.join(run_dir, "eval", "metrics.json")}
    run_evaluation(config)


def _report(run_dir, stages):
    return write_report(os.path.join(run_dir, "report.html"), eval_json=os.path.join(run_dir, "eval", "metrics.json"),
                        run_dir=os.path.join(run_dir, "diffusion"), vae_dir=os.path.join(run_dir, "vae"),
                        stage_times={k: v["seconds"] for k, v in stages.done.items()},
                        title="guided-diffusion-vae quickstart report", read_dirs=[run_dir])


def _check_guidance(preset):
    """Classifier-free guidance needs a model trained with a null class, and
    a guide network is only worth training for a guidance scale: refused
    before the minutes of training that would end in a refused samples stage."""
    scale = float(preset["sampling"].get("guidance_scale", 1.0))
    dropout = float(preset["diffusion"].get("class_dropout_prob", 0.0))
    if preset.get("guide"):
        if scale == 1.0:
            raise UserError("preset guide: autoguidance needs sampling guidance_scale other than 1")
        return
    if scale != 1.0 and dropout <= 0.0:
        raise UserError(f"preset sampling guidance_scale {scale} needs diffusion class_dropout_prob > 0 "
                        f"(got {dropout})")


def run_quickstart(config, preset=None):
    """Run (or resume) every stage up to ``config["until"]``; returns the report
    path. ``preset`` (a dict shaped like ``PRESETS["tiny"]``) replaces the named one."""
    if preset is None and config["preset"] not in PRESETS:
        raise UserError(f"preset {config['preset']!r} must be one of {', '.join(PRESETS)}")
    if config["until"] not in STAGES:
        raise UserError(f"until {config['until']!r} must be one of {', '.join(STAGES)}")
    preset = preset or PRESETS[config["preset"]]
    _check_guidance(preset)
    threads = set_threads(config["threads"])  # before anything is written; the stages keep this choice
    run_dir = os.path.abspath(config["run_dir"])
    settings = stage_settings(config, preset)
    # Checked before anything is written: a refused rerun leaves the run folder as it was.
    check_writable_target(run_dir, "run_dir")
    stages = Stages(run_dir)
    change = stages.first_change(settings, config["until"])
    if change and not config.get("overwrite"):
        name, key, old, new = change
        raise UserError(f"stage '{name}': setting '{key}' was {_shown(old)}, now {_shown(new)}; rerun with "
                        f"--overwrite to redo '{name}' and the stages after it, or use a new --run_dir")
    os.makedirs(run_dir, exist_ok=True)
    logs = os.path.join(run_dir, "logs")
    logger.configure(dir=logs, format_strs="stdout,log")
    if threads:
        logger.log(threads)
    stages.finish_clearing()
    missing = stages.first_missing()
    if missing and not (change and STAGE_NAMES.index(change[0]) <= STAGE_NAMES.index(missing)):
        # Nothing is lost by redoing it: its results are gone already.
        logger.log(f"stage '{missing}' is recorded as done but {STAGE_OUTPUTS[missing][0]} is missing from "
                   f"{run_dir}; redoing '{missing}' and every later stage")
        stages.clear_from(missing)
    if change:
        logger.log(f"--overwrite: stage '{change[0]}' setting '{change[1]}' changed; removing the results of "
                   f"'{change[0]}' and every later stage")
        stages.clear_from(change[0])
    seed = config["seed"]
    steps = {
        "data": lambda: _simulate(run_dir, preset, seed, config["workers"]),
        "vae": lambda: _train_vae(run_dir, preset, seed),
        "latents": lambda: _encode(run_dir, preset),
        "diffusion": lambda: _train_diffusion(run_dir, preset, seed),
        "samples": lambda: _sample(run_dir, preset, seed),
        "evaluate": lambda: _evaluate(run_dir, preset, seed),
        "report": lambda: _report(run_dir, stages),
    }
    # Each stage logs into its own folder, which its header names.
    with logger.quiet_configure():
        for number, name in enumerate(STAGES, start=1):
            tag = f"[{number}/{len(STAGES)}] {name}"
            if stages.finished(name):
                logger.log(f"=== {tag}: done earlier ({stages.done[name]['seconds']} s), skipped")
            else:
                logger.log(f"=== {tag}: {STAGES[name]}")
                stages.start(name, settings[name])
                start = time.time()
                finished = steps[name]() is not False
                logger.configure(dir=logs, format_strs="stdout,log")  # back from the stage's own log
                if not finished:
                    stages.mark_partial(name, time.time() - start)
                    logger.log(f"{tag}: stopped early and saved; rerun the same command to continue")
                    return None
                stages.mark(name, time.time() - start, settings[name])
            if name == config["until"]:
                break
    report = os.path.join(run_dir, "report.html")
    total = sum(v["seconds"] for v in stages.done.values())
    times = ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in stages.done.items())
    logger.log(f"stage times: {times} (total {total / 60:.1f} min)")
    if os.path.exists(report):
        logger.log(f"report: {report}")
    metrics = os.path.join(run_dir, "eval", "metrics.json")
    if stages.finished("evaluate") and os.path.isfile(metrics):
        logger.log(verdict_text(read_json_object(metrics)))
    return report
