"""A classifier of noisy latents, for classifier guidance per person.

The classifier sees latents from a latent cache, noised by the same forward
process as the diffusion model it will guide (``--model_path`` takes that
model's noise schedule; without it the schedule flags must match it, and
sampling refuses a classifier whose schedule differs), and learns to name the
person at every timestep. At
sampling time ``guidance.classifier_cond_fn`` turns it into the gradient of
``log p(y | x_t)`` that the samplers add to the model's mean (or score).

Checkpoints are self-describing safetensors files (``kind: classifier``):
``guidance.load_classifier`` rebuilds the network from the stored
``create_classifier`` arguments alone.
"""

import os

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from ..runtime import dist_util, logger
from ..core import script_util
from . import train_util
from ..runtime.errors import UserError
from ..data.labels import normalize_label_map
from .latent_training import latent_classifier_kwargs
from ..latent.vae_wrapper import latent_shape_of
from ..core.resample import UniformSampler
from .training_parts import autocast, load_latest_state, save_state, settings_text, train_until, wrap_for_processes
from .train_util import TRAINING_LIMITS, DeviceMeans, check_training_numbers, resolve_precision, starting_in
from ..latent.latent_datasets import load_latent_data



def classifier_train_defaults():
    """Flags of ``scripts/classifier_train.py``. ``image_size`` is in pixels;
    the network is built for the VAE's latent size."""
    return {
        **script_util.classifier_defaults(),
        # The original's 32,16,8 suits pixels; latents are 4-8x smaller.
        "classifier_attention_resolutions": "auto",
        **script_util.diffusion_defaults(),
        "latent_cache": "",
        "model_path": "",
        "lr": 3e-4,
        "weight_decay": 0.05,
        "batch_size": 64,
        "iterations": 2000,
        "noised": True,
        "log_interval": 50,
        "save_interval": 1000,
        "log_dir": "",
        "seed": 0,
        "precision": "auto",
        "resume": True,
        **dist_util.threads_defaults(),
    }


FLAG_HELP = {
    **{flag: train_util.FLAG_HELP[flag] for flag in ("lr", "weight_decay", "log_interval", "precision")},
    "image_size": "side of the cache's images in pixels; the network is built for the VAE's latent size",
    "latent_cache": "the latent cache the diffusion model trains on (scripts/encode_latents.py)",
    "model_path": "the diffusion model to guide (a checkpoint or run folder): the classifier learns its noise "
                  "schedule ('' = the schedule flags)",
    "classifier_attention_resolutions": "comma-separated resolutions of the classifier's attention layers, read "
                                        "at the latent size; auto: half, a quarter and an eighth of the latent "
                                        "side, those the network reaches",
    "batch_size": "latents per optimizer step on each process",
    "iterations": "optimizer steps",
    "noised": "train on latents noised at random timesteps as the guided sampler will show them (False: clean "
              "latents only)",
    "save_interval": "steps between checkpoints (0: only the last step, which is always saved)",
    "log_dir": "folder of logs and classifierNNNNNN.safetensors ('' = $OPENAI_LOGDIR, else a new temporary "
               "folder)",
    "seed": "seed of the weights, the batches and the noise",
    "resume": "continue from the newest classifier_state_NNNNNN.pt in --log_dir",
}
FLAG_CHOICES = {"precision": train_util.PRECISIONS}


# The numeric flags checked before any work (train_util.check_number's terms).
CLASSIFIER_LIMITS = {
    **{k: TRAINING_LIMITS[k] for k in ("batch_size", "lr", "weight_decay", "log_interval", "save_interval", "seed")},
    "iterations": (1, True, False, ""),
}


def _classifier_flag_names():
    return [key for key in script_util.classifier_defaults() if key != "image_size"]


def classifier_path(folder, step):
    return os.path.join(folder, f"classifier{step:06d}.safetensors")


def _label_map(stream):
    label_map = stream.label_map or stream.cache.label_map
    if not label_map:
        raise UserError(f"latent cache {stream.cache.cache_dir!r} has no label map: a classifier needs classes")
    return normalize_label_map(label_map, stream.cache.cache_dir)


def _save(folder, step, model, metadata):
    path = classifier_path(folder, step)
    ckpt.save_weights(path, model.state_dict(), {**metadata, "step": step})
    logger.log(f"saved {path}")
    return path


def auto_attention_resolutions(side):
    """``classifier_attention_resolutions auto`` for a latent ``side``: the
    original's choice for its pixel sizes (32,16,8 at 64 px: half, a quarter,
    an eighth of the side), keeping those the network reaches."""
    levels = len(script_util.parse_channel_mult("", side))
    reached = {side // 2**level for level in range(levels) if side % 2**level == 0}
    return ",".join(str(side // k) for k in (2, 4, 8) if side % k == 0 and side // k in reached)


def _classifier_flags(config, vae_meta, pixel_size):
    flags = {key: config[key] for key in _classifier_flag_names()}
    if flags["classifier_attention_resolutions"] == "auto":
        side = latent_shape_of(vae_meta, pixel_size)[1]
        flags["classifier_attention_resolutions"] = auto_attention_resolutions(side)
    return flags


def classifier_diffusion(config):
    """The ``create_gaussian_diffusion`` arguments the classifier is trained
    with: those of the model at ``model_path`` (a schedule flag set to
    something else is refused), else the flags'."""
    flags = script_util.diffusion_kwargs(config)
    if not config.get("model_path"):
        return flags
    path = ckpt.resolve_weights_file(config["model_path"], use_ema=False)
    meta = ckpt.read_metadata(path)
    if not meta or not isinstance(meta.get("diffusion"), dict):
        raise UserError(f"{path} is no checkpoint of ours: its noise schedule is unknown; leave model_path empty "
                        "and give the schedule flags")
    ckpt.check_build_kwargs(script_util.create_gaussian_diffusion, meta["diffusion"], path, "diffusion")
    model = {**meta["diffusion"], "timestep_respacing": ""}
    defaults = script_util.diffusion_kwargs(script_util.diffusion_defaults())
    for key, value in flags.items():
        if value != defaults.get(key) and value != model.get(key):
            flag = "diffusion_steps" if key == "steps" else key
            raise UserError(f"{flag} {value!r} differs from {model.get(key)!r}, the noise schedule of {path}, "
                            "which the classifier must learn: leave it unset")
    logger.log(f"noise schedule of {path}: {model['noise_schedule']}, {model['steps']} steps")
    return model


def train_classifier(config):
    """Train a noisy-latent classifier on ``config["latent_cache"]``; returns
    the path of the last checkpoint (on every rank), or None when a stop
    signal ended it early (saved; a rerun resumes)."""

    if not config.get("latent_cache"):
        raise UserError("latent_cache is required: a folder written by scripts/encode_latents.py")
    check_training_numbers(config, CLASSIFIER_LIMITS)
    dist_util.setup_dist()
    dist_util.set_threads(config["threads"], logger.log)  # before the log folder exists
    log_dir, named = logger.choose_dir(config.get("log_dir"))
    # The cache, the network and a resume state are checked before the first
    # step; a start that fails leaves nothing in the log folder, not even the log.
    with starting_in(log_dir, named, given=bool(config.get("log_dir"))):
        logger.configure(dir=log_dir, format_strs="stdout,log,csv")
        torch.manual_seed(int(config["seed"]))
        run = _ClassifierRun(config)
        run.resume()
    # DDP copies rank 0's weights to the others when it wraps the model.
    run.net = wrap_for_processes(run.model, run.device)
    return run.train()


class _ClassifierRun:
    """The parts of one ``train_classifier`` run: the latent stream, the
    network, the noise process it learns, the optimizer, and what checkpoints
    and resume states hold. Built in the seeded order of a fresh start (the
    network's initial weights depend on it), inside the start block, so a
    refused start writes nothing."""

    def __init__(self, config):
        self.config = config
        self.device = dist_util.dev()
        self._load_cache()
        self._build_classifier()
        self._build_diffusion()
        self.model.to(self.device)
        if self.classifier_kwargs["classifier_use_fp16"]:
            self.model.convert_to_fp16()

        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config["lr"],
                                           weight_decay=config["weight_decay"])
        self.precision = resolve_precision(config["precision"], self.device)
        self.metadata = self._metadata()
        logger.log(
            f"classifier: {sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters, input "
            f"{tuple(self.cache.shape)}, {len(self.label_map)} classes, {len(self.cache)} latents; "
            f"{dist_util.world_size()} process(es), {self.precision}"
        )

        self.means = DeviceMeans()
        self.folder = logger.get_dir()
        self.iterations = int(self.config["iterations"])
        self.settings = self._resume_settings()
        self.net = None  # the model as the processes train it: wrapped once the start has succeeded

    def _load_cache(self):
        """The latent stream and its classes; a cache of another image size is refused."""
        config = self.config
        self.stream = load_latent_data(
            cache_dir=config["latent_cache"], batch_size=config["batch_size"], seed=config["seed"],
            class_cond=True, device=self.device,
        )
        self.cache = self.stream.cache
        self.label_map = _label_map(self.stream)
        self.pixel_size = int(config["image_size"])
        cached_size = self.cache.meta.get("image_size")
        if cached_size is not None and int(cached_size) != self.pixel_size:
            raise UserError(
                f"{config['latent_cache']}: image_size is {cached_size} in the cache but {self.pixel_size} in the "
                "configuration"
            )
        self.vae_meta = {**self.cache.vae_description, "latent_scale": self.cache.latent_scale}

    def _build_classifier(self):
        """The network for the VAE's latent size; the cache's latents must fit it."""
        flags = _classifier_flags(self.config, self.vae_meta, self.pixel_size)
        kwargs = latent_classifier_kwargs(self.vae_meta, self.pixel_size, len(self.label_map), flags)
        self.classifier_kwargs = kwargs
        self.model = script_util.create_classifier(**kwargs)
        if tuple(self.cache.shape) != (kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"]):
            raise UserError(f"{self.config['latent_cache']}: latents of shape {self.cache.shape} do not fit {kwargs}")

    def _build_diffusion(self):
        """The forward process the classifier learns, at every original timestep."""
        if self.config["timestep_respacing"]:
            raise UserError(
                "timestep_respacing must be empty for classifier training: the classifier learns every "
                "original timestep (respaced samplers pass original timesteps to it)"
            )
        self.diffusion_kwargs = classifier_diffusion(self.config)
        self.diffusion = script_util.create_gaussian_diffusion(**self.diffusion_kwargs)
        self.sampler = UniformSampler(self.diffusion)

    def _metadata(self):
        """What every checkpoint stores, enough for ``guidance.load_classifier`` to rebuild it."""
        config = self.config
        return {
            "kind": ckpt.CLASSIFIER_KIND,
            "classifier": self.classifier_kwargs,
            "diffusion": self.diffusion_kwargs,
            "data": {"label_map": self.label_map, "image_size": self.pixel_size,
                     "latent_cache": os.path.abspath(config["latent_cache"])},
            "vae": self.vae_meta,
            "train": {k: config[k] for k in ("lr", "weight_decay", "batch_size", "iterations", "noised", "seed")},
        }

    def _resume_settings(self):
        """The settings a resume state must have been written with to be continued."""
        config = self.config
        return {"classifier": self.classifier_kwargs, "diffusion": self.diffusion_kwargs,
                "batch_size": config["batch_size"], "seed": config["seed"], "noised": config["noised"],
                "latent_cache": os.path.abspath(config["latent_cache"])}

    def resume(self):
        """Load the newest resume state in the log folder (with ``resume``);
        sets ``step`` to the steps it had done (0 without one)."""
        self.step = 0
        found = load_latest_state(self.folder, "classifier", self.settings) if self.config["resume"] else None
        if not found:
            return
        state, path = found
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["data"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.step = int(state["step"])
        logger.log(f"resumed from {path} at step {self.step}")

    def train(self):
        """Steps after ``step`` up to ``iterations``, saving every
        ``save_interval`` and at the end; returns the last checkpoint, or None
        when a stop signal ended it early (saved first)."""
        self.model.train()
        if not train_until(self, self.iterations, self.config["log_interval"]):
            return None
        return classifier_path(self.folder, self.step)

    def advance(self):
        """One step, then a save at save steps and the last one."""
        self.step += 1
        self.train_step(self.step)
        if self._save_step() or self.step == self.iterations:
            self.save(self.step)

    def save_now(self):
        """Saving at a stop: the step's checkpoint and state, unless a save step just wrote them."""
        if not self._save_step():
            self.save(self.step)

    def _save_step(self):
        interval = self.config["save_interval"]
        return bool(interval) and self.step % interval == 0

    def save(self, step):
        """The classifier checkpoint and the resume state of ``step`` (rank 0 writes)."""
        if dist_util.is_main():
            _save(self.folder, step, self.model, self.metadata)
            state = {"settings": settings_text(self.settings), "model": self.model.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "data": self.stream.state_dict(),
                     "torch_rng": torch.get_rng_state()}
            if self.device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
            save_state(self.folder, "classifier", step, state, keep=2)
        dist_util.barrier()
        return classifier_path(self.folder, step)

    def train_step(self, step):
        """One optimizer step; the metrics are kept on the device and logged every ``log_interval``."""
        x, t, y = self._next_batch()
        # The timesteps a sampler's cond_fn will see (rescaled if so configured).
        with autocast(self.precision, self.device):
            logits = self.net(x, self.diffusion._scale_timesteps(t))
        losses = F.cross_entropy(logits.float(), y, reduction="none")
        self.optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        self.optimizer.step()
        correct = (logits.detach().argmax(dim=-1) == y).float()
        self.means.add("loss", losses)
        self.means.add("acc@1", correct)
        self.means.add_by_quarter("acc@1", correct, t, self.diffusion.num_timesteps)
        self.means.add_by_quarter("loss", losses, t, self.diffusion.num_timesteps)
        if step % self.config["log_interval"] == 0 or step == self.iterations:
            self._log(step)

    def _next_batch(self):
        """Latents noised at random timesteps as the guided sampler shows them
        (clean, at t = 0, without ``noised``), their timesteps and labels."""
        x0, cond = next(self.stream)
        x0 = x0.to(self.device, non_blocking=True)
        y = cond["y"].to(self.device, non_blocking=True)
        if self.config["noised"]:
            t, _ = self.sampler.sample(x0.shape[0], self.device)
            x = self.diffusion.q_sample(x0, t)
        else:
            t = torch.zeros(x0.shape[0], dtype=torch.long, device=self.device)
            x = x0
        return x, t, y

    def _log(self, step):
        """Write the means since the last log (one device read) as the row of ``step``."""
        for key, value in self.means.pop().items():
            logger.logkv_mean(key, value)
        logger.logkv("step", step)
        logger.logkv("samples", step * self.config["batch_size"] * dist_util.world_size())
        logger.dumpkvs(step)
