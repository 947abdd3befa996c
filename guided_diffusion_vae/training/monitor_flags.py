"""The flags of training-time evaluation, and their checks.

The monitor itself (:mod:`guided_diffusion_vae.evaluation.monitor`) sits on
top of the evaluation; its flags live here, low enough for ``train_util``'s
``training_defaults()`` to include them, so every training program has them
and refuses bad values before any work.
"""

import os

from ..runtime.errors import UserError, check_number
from ..core.respace import space_timesteps

# The metrics ``keep_best`` can choose from: True where higher is better.
HIGHER_IS_BETTER = {"fd": False, "cas": True, "memorised": False, "memorised_gu": False, "variety": True}


def monitor_defaults():
    """Flags of training-time evaluation (``eval_interval`` 0: off)."""
    return {
        "eval_interval": 0,
        "eval_real_train": "",
        "eval_real_test": "",
        "eval_classifier": "",
        "eval_samples_per_class": 10,
        "eval_respacing": "ddim25",
        "keep_best": "",
    }


FLAG_HELP = {
    "eval_interval": "steps between evaluations of the EMA model during training: CAS, Frechet distance, "
                     "memorised samples, variety, logged to progress.csv, TensorBoard and log_dir/eval/metrics.csv "
                     "(0: none)",
    "eval_real_train": "with --eval_interval: the real training images, one sub-folder per class, as evaluate.py's "
                       "--real_train (the memorisation tests compare samples with them)",
    "eval_real_test": "with --eval_interval: real held-out images of the same classes, as evaluate.py's --real_test "
                      "(the Frechet distance and variety compare samples with them)",
    "eval_classifier": "with --eval_interval: a reference classifier .safetensors written by evaluate.py ('' = train "
                       "one on --eval_real_train at the start and save it in log_dir/eval/)",
    "eval_samples_per_class": "samples per class drawn at each evaluation (the same noise every time); the Frechet "
                              "distance needs more samples in all than the classifier's embedding size",
    "eval_respacing": "timestep respacing of the DDIM sampler used by the evaluations (as the previews')",
    "keep_best": "with --eval_interval: keep the weights of the best evaluation so far in log_dir/best/ (sample with "
                 "--model_path LOG_DIR/best), by fd, cas, memorised, memorised_gu or variety ('' = off)",
}
FLAG_CHOICES = {"keep_best": tuple(HIGHER_IS_BETTER)}

# flag: (minimum, what the bound means), integers.
MONITOR_LIMITS = {"eval_interval": (0, " (0: no evaluation)"), "eval_samples_per_class": (1, "")}


def check_monitor_flags(config):
    """Refuse bad training-time evaluation flags of ``config`` with one line,
    before any work; nothing is checked for absent keys."""
    for name, (minimum, note) in MONITOR_LIMITS.items():
        if name in config:
            check_number(name, config[name], minimum, integer=True, note=note)
    keep_best = config.get("keep_best", "")
    if keep_best and keep_best not in HIGHER_IS_BETTER:
        raise UserError(f"keep_best {keep_best!r} must be one of {', '.join(HIGHER_IS_BETTER)} ('' = off)")
    if not config.get("eval_interval"):
        if keep_best:
            raise UserError("keep_best needs evaluations: set --eval_interval (steps between them)")
        return
    if not config.get("class_cond", True):
        raise UserError("--eval_interval needs a class-conditional model (--class_cond True): every metric is "
                        "read per class")
    for key in ("eval_real_train", "eval_real_test"):
        if not config.get(key):
            raise UserError(f"--eval_interval needs --{key}: a folder of real images with one sub-folder per class")
        if not os.path.isdir(config[key]):
            raise UserError(f"--{key} {config[key]}: no such folder")
    if config.get("eval_classifier") and not os.path.isfile(config["eval_classifier"]):
        raise UserError(f"--eval_classifier {config['eval_classifier']}: no such file (a .safetensors written by "
                        "evaluate.py, or '' to train one)")
    if "diffusion_steps" in config:
        try:
            space_timesteps(int(config["diffusion_steps"]), config.get("eval_respacing", "ddim25"))
        except UserError as err:  # it names timestep_respacing, the sampling flag
            raise UserError(str(err).replace("timestep_respacing", "eval_respacing", 1)) from None
