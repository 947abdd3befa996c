"""The diffusion training loop.

What guided-diffusion's ``TrainLoop`` does (EMA at several rates,
microbatches, learning-rate annealing, weight decay, uniform or loss-aware
timestep sampling, periodic logs and checkpoints, resume), plus bf16
autocast, gradient clipping, self-describing atomic checkpoints, graceful
SIGTERM/SIGINT, and skipping of non-finite steps.

The step is kept free of host-device synchronisation: losses and grad norms
accumulate on the device and are read once per ``log_interval``; a
non-finite loss skips the optimizer update on the device (the fused AdamW
``found_inf`` path) instead of being tested on the host.
"""

import contextlib
import copy
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from ..runtime import dist_util, logger
from ..data.array_datasets import data_folder_defaults
from .augment import augment_defaults
from .ema import ema_decay
from ..runtime.errors import UserError, check_number, shown
from .monitor_flags import monitor_defaults
from ..runtime.files import lock_folder, undone_on_failure
from ..core.fp16_util import MixedPrecisionTrainer
from ..core.nn import build_norm_kernels_ahead, to_fast_layout, update_ema
from ..core.resample import SCHEDULE_SAMPLERS, LossAwareSampler, UniformSampler
from ..runtime.cuda_graphs import ReplayedStep, graphs_usable
from .training_parts import autocast, compile_module, train_until, wrap_for_processes


def training_defaults():
    """Training flags: the original ``image_train.py`` flags and ours."""
    return {
        "data_dir": "",
        "schedule_sampler": "uniform",
        "lr": 1e-4,
        "weight_decay": 0.0,
        "lr_anneal_steps": 0,
        "batch_size": 1,
        "microbatch": -1,
        "ema_rate": "0.9999",
        "ema_warmup": True,
        "log_interval": 10,
        "save_interval": 10000,
        "resume_checkpoint": "",
        "use_fp16": False,
        "fp16_scale_growth": 1e-3,
        # ours
        "log_dir": "",
        "seed": 0,
        "precision": "auto",
        "grad_clip": 0.0,
        "max_nonfinite_steps": 5,
        "sample_interval": 0,
        "num_preview_samples": 16,
        "compile": False,
        "cuda_graph": True,
        "num_workers": 2,
        "random_flip": True,
        "tensorboard": True,
        "class_dropout_prob": 0.0,
        "keep_checkpoints": 3,
        **augment_defaults(),
        # data_dir: how labels are read, how .npy/.npz values map to [-1, 1]
        **data_folder_defaults(),
        **dist_util.threads_defaults(),
        # training-time evaluation (evaluation.monitor)
        **monitor_defaults(),
    }


# use_fp16, shared with the model flags, is described in script_util.
FLAG_HELP = {
    "data_dir": "folder of training images (with --class_cond True: one sub-folder per class)",
    "schedule_sampler": "how training timesteps are drawn: uniformly, or more often where the loss is large "
                        "and uncertain (loss-second-moment)",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "lr_anneal_steps": "train this many steps while the learning rate falls linearly to 0 (0: a constant rate, "
                       "until stopped)",
    "batch_size": "images per optimizer step on each process",
    "microbatch": "run each batch in parts of this size, same gradient, less memory (-1 or 0: whole batches)",
    "ema_rate": "comma-separated rates of the weight averages kept and saved, e.g. 0.999,0.9999",
    "ema_warmup": "ramp each average's decay up as min(rate, (1 + n) / (10 + n)) so that early averages are not "
                  "mostly the random start (False: the original's fixed rate)",
    "log_interval": "steps between log lines and progress.csv rows",
    "save_interval": "steps between checkpoints (0: only at the end; a stop signal also saves)",
    "resume_checkpoint": "continue from this modelNNNNNN file (EMA and optimizer files beside it), or auto: the "
                         "newest in --log_dir ('' = start afresh)",
    "fp16_scale_growth": "with --use_fp16: growth of the log2 loss scale per step",
    "log_dir": "folder of logs, checkpoints and previews ('' = $OPENAI_LOGDIR, else a new temporary folder)",
    "seed": "seed of the weights, the data order and the noise",
    "precision": "arithmetic of the training step: auto is bf16 autocast on GPUs that support it, else fp32",
    "grad_clip": "clip the gradient norm to this value (0: no clipping)",
    "max_nonfinite_steps": "stop after this many steps in a row with a non-finite loss, each skipped (0: never "
                           "stop)",
    "sample_interval": "steps between preview grids written to log_dir/samples (0: no previews)",
    "num_preview_samples": "images in each preview grid",
    "compile": "torch.compile the network: faster steps after a slow first one, worth it on a GPU",
    "cuda_graph": "on one CUDA GPU, capture the whole training step once and replay it (no Python work per "
                  "step); ignored with several processes, --use_fp16 or loss-second-moment",
    "num_workers": "image-loading processes per training process (0: load in the training process)",
    "random_flip": "mirror training images left-right at random (set False for spectrograms: a time-reversed "
                   "walk is not a walk)",
    "tensorboard": "also write TensorBoard events to log_dir/tb",
    "class_dropout_prob": "share of labels replaced by a null class, for classifier-free guidance "
                          "(--guidance_scale when sampling; 0: none)",
    "keep_checkpoints": "keep the newest N checkpoints (model, EMA and optimizer files of a step together) "
                        "and delete older ones after each save; 0 keeps all",
}
# The values resolve_precision accepts.
PRECISIONS = ("auto", "bf16", "fp32")
FLAG_CHOICES = {"schedule_sampler": tuple(SCHEDULE_SAMPLERS), "precision": PRECISIONS}


# flag: (minimum, integer, exclusive minimum, what the bound means).
TRAINING_LIMITS = {
    "batch_size": (1, True, False, ""),
    "microbatch": (-1, True, False, " (-1 or 0: whole batches)"),
    "lr": (0.0, False, True, ""),
    "weight_decay": (0.0, False, False, ""),
    "lr_anneal_steps": (0, True, False, " (0: train until stopped)"),
    "log_interval": (1, True, False, ""),
    "save_interval": (0, True, False, " (0: save only at the end)"),
    "fp16_scale_growth": (0.0, False, False, ""),
    "grad_clip": (0.0, False, False, " (0: no clipping)"),
    "max_nonfinite_steps": (0, True, False, " (0: never stop)"),
    "sample_interval": (0, True, False, " (0: no previews)"),
    "num_preview_samples": (1, True, False, ""),
    "num_workers": (0, True, False, ""),
    "seed": (0, True, False, ""),
    "class_dropout_prob": (0.0, False, False, " (and below 1)"),
    "keep_checkpoints": (0, True, False, " (0: keep all)"),
}


def check_training_numbers(config, limits=None):
    """Check every numeric flag of ``config`` that ``limits`` (default:
    ``TRAINING_LIMITS``) knows, before any work is done; keys it lacks are
    skipped. Also parses ``ema_rate`` if present."""
    for name, (minimum, integer, exclusive, note) in (limits or TRAINING_LIMITS).items():
        if name in config:
            check_number(name, config[name], minimum, integer=integer, exclusive=exclusive, note=note)
    if "ema_rate" in config:
        parse_ema_rates(config["ema_rate"])
    if float(config.get("class_dropout_prob", 0.0)) >= 1.0:
        raise UserError(f"class_dropout_prob must be below 1 (1 would never train a class), "
                        f"got {config['class_dropout_prob']}")


def check_output_dir(path, flag="log_dir"):
    """Create the folder ``path`` if needed and prove it writable (a probe
    file), so a file in the way or a read-only folder is a one-line error
    now rather than a traceback from the logger or the first checkpoint."""
    import tempfile

    if not path:
        return path
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path!r} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UserError(f"{flag} {path!r} is not a writable folder: {err.strerror or err}") from None
    return path


@contextlib.contextmanager
def starting_in(log_dir, named, given):
    """The start of a training job in ``log_dir`` (``named``: the flag or
    variable that chose it; ``given``: the user named it): rank 0 checks the
    folder is writable and locks it for the process's life; if the block
    raises, what it created there is removed (the lock file too), so a
    refused start leaves nothing behind."""
    main = dist_util.is_main()
    with undone_on_failure(log_dir if main else None, before_undo=logger.close):
        if main or given:  # a new temporary folder is rank 0's alone
            check_output_dir(log_dir, named)
        if main:
            lock_folder(log_dir, named)
        yield


def parse_ema_rates(ema_rate):
    """``"0.9999,0.999"`` -> ``[0.9999, 0.999]`` (rates must lie in (0, 1))."""
    text = str(ema_rate).strip()
    try:
        rates = [float(r) for r in text.split(",")] if text else []
    except ValueError:
        raise UserError(f"ema_rate {shown(ema_rate)} is not a comma-separated list of numbers")
    for rate in rates:
        if not 0.0 < rate < 1.0:
            raise UserError(f"ema_rate {rate} must lie strictly between 0 and 1")
    return rates


def resolve_precision(precision, device):
    """``auto`` is bf16 autocast on GPUs that support it, else float32."""
    if precision not in PRECISIONS:
        raise UserError(f"precision {shown(precision)} must be one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        cuda = torch.device(device).type == "cuda"
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    return precision


class DeviceMeans:
    """Running sums of metrics kept on the device; read once per log.

    ``add`` takes tensors (any shape, averaged) and never synchronises;
    ``pop`` moves everything to the host in one transfer and resets.
    """

    def __init__(self):
        self._sums, self._counts = {}, {}

    def add(self, name, values, count=None):
        values = values.detach().float()
        total = values.sum()
        if count is None:
            n = torch.full((), float(values.numel()), device=total.device)
        else:  # a device tensor: no host round trip
            n = count.float() if torch.is_tensor(count) else torch.full((), float(count), device=total.device)
        if name in self._sums:
            self._sums[name] += total
            self._counts[name] += n
        else:
            self._sums[name], self._counts[name] = total, n.clone()

    def add_by_quarter(self, name, values, t, num_timesteps):
        """Also average ``values`` per quarter of the timestep range (q0..q3)."""
        quarter = (t * 4 // num_timesteps).clamp(max=3)
        values = values.detach().float()
        sums = torch.zeros(4, device=values.device).index_add_(0, quarter, values)
        counts = torch.zeros(4, device=values.device).index_add_(0, quarter, torch.ones_like(values))
        for q in range(4):
            self.add(f"{name}_q{q}", sums[q], counts[q])

    def pop(self):
        """The means since the last ``pop``; the sums are zeroed in place
        (a captured training step keeps adding into the same tensors)."""
        if not self._sums:
            return {}
        names = sorted(self._sums)
        rows = torch.stack([torch.stack([self._sums[k], self._counts[k]]) for k in names]).tolist()
        for k in names:
            self._sums[k].zero_()
            self._counts[k].zero_()
        return {k: s / c for k, (s, c) in zip(names, rows) if c > 0}


def is_bare_optimizer_state(state):
    """A plain ``optimizer.state_dict()`` (what the original saves as ``optNNNNNN.pt``)."""
    return isinstance(state, dict) and set(state) == {"state", "param_groups"}


# What a checkpoint's metadata says about the data that a resumed run must
# share: other people's classes or another latent scale would silently
# change what the weights mean.
RESUME_DATA_KEYS = (("data", "label_map"), ("data", "db_range"), ("vae", "fingerprint"), ("vae", "latent_scale"),
                    ("vae", "latent_channels"), ("vae", "downsample_factor"))


def check_resume_data(saved, current, path):
    """Refuse to resume from ``path`` (metadata ``saved``) with data whose
    metadata ``current`` differs in a :data:`RESUME_DATA_KEYS` entry. Entries
    an older checkpoint lacks are not compared."""
    for section, key in RESUME_DATA_KEYS:
        old, new = (saved.get(section) or {}).get(key), (current.get(section) or {}).get(key)
        if old is None or _same_value(old, new):
            continue
        raise UserError(f"resume: {path} was trained with {section}.{key} {_difference(old, new)}; resume with "
                        "the same data (cache, VAE, scale), or train in a new log_dir")


def _same_value(old, new):
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        return abs(float(old) - float(new)) <= 1e-6 * max(abs(float(old)), abs(float(new)))
    if isinstance(old, list) and isinstance(new, (list, tuple)) and len(old) == len(new):
        return all(_same_value(a, b) for a, b in zip(old, new))
    return old == new


def _difference(old, new):
    """A short account of how two values differ (label maps by their first difference)."""
    if isinstance(old, dict) and isinstance(new, dict):
        if len(old) != len(new):
            return f"{len(old)} classes, this run's data has {len(new)}"
        key = next(k for k in old if old[k] != new.get(k))
        return f"class {key} = {old[key]!r}, this run's data has {new.get(key)!r}"
    return f"{old!r}, this run's data has {new!r}"


class TrainLoop:
    """Trains ``model`` on ``diffusion`` from an endless iterator ``data`` of
    ``(batch, {"y": labels, ...})``.

    ``batch_transform`` (optional) runs on the device before the loss, e.g. a
    VAE encoding whole image batches on the GPU. ``metadata`` is stored in every
    checkpoint (model, diffusion, data, vae, train configuration: see
    docs/ARCHITECTURE.md). ``sample_fn(model, step)`` draws preview samples;
    ``eval_fn(model, step, write_weights)`` evaluates every ``eval_interval``
    steps (rank 0; see :meth:`evaluate`).
    With ``class_dropout_prob`` > 0 that share of labels becomes
    ``null_label`` (classifier-free guidance training). ``augment`` (an
    :class:`augment.Augmenter`) changes each batch on the device and hands
    the network its description as ``augment``. ``keep_checkpoints``
    N > 0 deletes all but the newest N checkpoints after each save
    (``checkpoint.prune_checkpoints``); 0, the default here, keeps every one
    as the original does (the flag's default is 3).
    """

    def __init__(
        self,
        *,
        model,
        diffusion,
        data,
        batch_size,
        microbatch=-1,
        lr=1e-4,
        ema_rate="0.9999",
        ema_warmup=True,
        log_interval=10,
        save_interval=10000,
        resume_checkpoint="",
        use_fp16=False,
        fp16_scale_growth=1e-3,
        schedule_sampler=None,
        weight_decay=0.0,
        lr_anneal_steps=0,
        checkpoint_dir=None,
        metadata=None,
        batch_transform=None,
        class_dropout_prob=0.0,
        null_label=None,
        precision="auto",
        grad_clip=0.0,
        max_nonfinite_steps=5,
        sample_interval=0,
        sample_fn=None,
        compile=False,
        cuda_graph=False,
        seed=0,
        keep_checkpoints=0,
        augment=None,
        eval_interval=0,
        eval_fn=None,
    ):
        check_training_numbers(dict(
            batch_size=batch_size, microbatch=microbatch, lr=lr, weight_decay=weight_decay,
            lr_anneal_steps=lr_anneal_steps, log_interval=log_interval, save_interval=save_interval,
            fp16_scale_growth=fp16_scale_growth, grad_clip=grad_clip, max_nonfinite_steps=max_nonfinite_steps,
            sample_interval=sample_interval, seed=seed, keep_checkpoints=keep_checkpoints,
        ))
        self.model, self.diffusion, self.data = model, diffusion, data
        self.batch_size = batch_size
        self.microbatch = batch_size if microbatch <= 0 else microbatch
        self.lr, self.weight_decay, self.lr_anneal_steps = lr, weight_decay, lr_anneal_steps
        self.ema_rates = parse_ema_rates(ema_rate)
        self.ema_warmup = ema_warmup
        self.log_interval, self.save_interval = max(1, log_interval), save_interval
        self.schedule_sampler = UniformSampler(diffusion) if schedule_sampler is None else schedule_sampler
        self._loss_aware = isinstance(self.schedule_sampler, LossAwareSampler)
        self.checkpoint_dir = checkpoint_dir or logger.get_dir() or "."
        self.metadata = dict(metadata or {})
        self.batch_transform = batch_transform
        self.augment = augment
        self._set_class_dropout(class_dropout_prob, null_label)
        self.grad_clip, self.max_nonfinite_steps = grad_clip, max_nonfinite_steps
        self.sample_interval, self.sample_fn = sample_interval, sample_fn
        self.eval_interval, self.eval_fn = eval_interval, eval_fn
        self.seed = seed
        self.keep_checkpoints = keep_checkpoints
        self.device = dist_util.dev()
        self.use_fp16 = use_fp16
        self.precision = "fp16-master" if use_fp16 else resolve_precision(precision, self.device)
        self._start_counters()

        training_state = self._load_start_weights(resume_checkpoint)
        self._build_optimizer(lr, weight_decay, fp16_scale_growth, cuda_graph)
        self._start_nonfinite_tracking()
        self._apply_training_state(training_state)
        self._prepare_graph_step()

        self.ddp_model = wrap_for_processes(self.model, self.device, gradient_as_bucket_view=True)
        self.compiled_model = compile_module(self.ddp_model) if compile else self.ddp_model

    # ------------------------------------------------------------------ setup

    def _set_class_dropout(self, class_dropout_prob, null_label):
        """Classifier-free guidance training: dropped labels become ``null_label``,
        so a share above 0 needs one."""
        self.class_dropout_prob = float(class_dropout_prob)
        self.null_label = null_label
        if self.class_dropout_prob > 0 and null_label is None:
            raise ValueError("class_dropout_prob needs the index of the null class (null_label)")

    def _start_counters(self):
        """The step, metrics and throughput clock of a fresh start (a resume moves the step on)."""
        self.step = 0
        self._opt_file = None
        self.metrics = DeviceMeans()
        self._images_seen_at_log = (0, time.time())
        self._norm_kernels_built = False  # run_step builds them before the first step

    def _load_start_weights(self, resume_checkpoint):
        """Move the model to the device (channels-last where the fused norms
        run: ``nn.to_fast_layout``), start the EMA from its weights (or a
        checkpoint's) and give every rank rank 0's; return the training state
        to apply once the optimizer exists (or None). cuDNN's autotuner is
        turned off for the step (``dist_util.autotune_convolutions``)."""
        self.model.to(self.device)
        dist_util.autotune_convolutions(self.device, False)
        if not self.use_fp16:  # the original's fp16 scheme flattens the weights itself
            to_fast_layout(self.model, self.device)
        self.params = list(self.model.parameters())
        self.ema_params = [[p.detach().clone().float() for p in self.params] for _ in self.ema_rates]
        training_state = self._resume(resume_checkpoint) if resume_checkpoint else None
        dist_util.sync_params([*self.model.parameters(), *self.model.buffers()])
        for ema in self.ema_params:
            dist_util.sync_params(ema)
        return training_state

    def _build_optimizer(self, lr, weight_decay, fp16_scale_growth, cuda_graph):
        """The fp16 trainer (if any), whether the step is a CUDA graph, and the
        AdamW optimizer that depends on both."""
        # Built after the weights are final: fp16 master copies start from them.
        self.mp_trainer = (
            MixedPrecisionTrainer(model=self.model, use_fp16=True, fp16_scale_growth=fp16_scale_growth)
            if self.use_fp16 else None
        )
        self._graph_mode = cuda_graph and self._graphs_possible()
        self._lr_tensor = torch.tensor(float(lr), device=self.device) if self._graph_mode else None
        self._step_tensor = torch.zeros((), device=self.device) if self._graph_mode else None
        self.opt = torch.optim.AdamW(
            self.mp_trainer.master_params if self.use_fp16 else self.params,
            lr=self._lr_tensor if self._graph_mode else lr,
            weight_decay=weight_decay,
            **self._fused_kwargs(),
        )
        self._lr_now = lr

    def _start_nonfinite_tracking(self):
        """Device flags of non-finite steps, which the host reads a step late (no sync per step)."""
        self._nonfinite_now = torch.zeros((), dtype=torch.bool, device=self.device)
        self._nonfinite_run = torch.zeros((), device=self.device)
        self._nonfinite_seen = _LaggedReader(self._nonfinite_run)

    def _apply_training_state(self, training_state):
        """Restore a resume's optimizer, random and data states, once the optimizer exists."""
        if training_state is not None:
            self._load_training_state(training_state)
        if self._graph_mode:
            # Loading a state puts its float lr back; the graph reads this tensor.
            for group in self.opt.param_groups:
                group["lr"] = self._lr_tensor

    def _prepare_graph_step(self):
        """The step as one CUDA graph (when possible); cond's keys are fixed by the first batch."""
        self._replayed = ReplayedStep(self._device_step_of_tensors) if self._graph_mode else None
        self._cond_keys = None
        self._graph_mismatch_logged = False

    def _fused_kwargs(self):
        # The fused kernel skips the update on the device when ``found_inf``
        # is set, which is how non-finite steps are dropped without a sync.
        if self.use_fp16:
            return {}
        return {"fused": True, "capturable": True} if self._graph_mode else {"fused": True}

    def _graphs_possible(self):
        """Whether the whole step can be one CUDA graph, logging why not."""
        if not graphs_usable(self.device):
            return False
        reasons = [why for why, bad in (
            ("several processes", dist_util.world_size() > 1),
            ("the original fp16 scheme", self.use_fp16),
            ("a loss-aware schedule sampler", self._loss_aware),
        ) if bad]
        if reasons:
            logger.log(f"cuda_graph: the step runs eagerly ({', '.join(reasons)} read values on the host)")
        return not reasons

    # ------------------------------------------------------------------ resume

    def _resume(self, path):
        """Load weights and EMA now; return the training state to apply once
        the optimizer exists (or None)."""
        if path == "auto":
            path = ckpt.latest_model_checkpoint(self.checkpoint_dir)
            if path is None:
                logger.log(f"no checkpoint in {self.checkpoint_dir} to resume from; starting fresh")
                return None
        if ckpt.is_ema_file(path):
            raise UserError(f"resume_checkpoint {path} is an EMA file; a resume starts from the model file of "
                            "that step (modelNNNNNN.safetensors), which brings its EMA files along")
        data = dist_util.read_file_once(path)
        state, meta = ckpt.load_weights(path, data=data)
        ckpt.load_state_strict(
            self.model, state, path,
            checkpoint_config=(meta or {}).get("model"), model_config=self.metadata.get("model"),
        )
        if meta:
            check_resume_data(meta, self.metadata, path)
        self.step = meta["step"] if meta else ckpt.parse_step(path)
        folder = os.path.dirname(path)
        logger.log(f"resuming from {path} at step {self.step}")
        for i, rate in enumerate(self.ema_rates):
            ema_file = self._find_ema_file(folder, rate, path)
            if ema_file is None and meta is None:
                # The original's bare .pt: its EMA starts from the weights, as the original does.
                logger.warn(f"resume: no EMA weights for rate {rate} beside {path}; the EMA starts from them")
                self.ema_params[i] = [p.detach().clone().float() for p in self.params]
                continue
            if ema_file is None:
                raise UserError(
                    f"resume: no EMA weights for rate {rate} beside {path} "
                    f"(expected {ckpt.ema_path(folder, rate, self.step)})"
                )
            ema_state, _ = ckpt.load_weights(ema_file, data=dist_util.read_file_once(ema_file))
            self.ema_params[i] = [in_layout_of(p, ema_state[n].to(self.device).float())
                                  for n, p in self.model.named_parameters()]
        opt_file = ckpt.state_path(folder, self.step)
        if os.path.exists(opt_file):
            self._opt_file = opt_file
            return ckpt.load_training_state(opt_file)
        logger.warn(f"resume: no optimizer state {opt_file}; the optimizer starts afresh")
        return None

    def _find_ema_file(self, folder, rate, model_file):
        legacy = model_file.endswith(".pt")
        candidate = (
            os.path.join(folder, f"ema_{rate}_{self.step:06d}.pt") if legacy else ckpt.ema_path(folder, rate, self.step)
        )
        return candidate if os.path.exists(candidate) else None

    def _training_state(self):
        state = {
            "step": self.step,
            "optimizer": self.opt.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": _numpy_state_to_tensors(np.random.get_state()),
            "python_rng": random.getstate(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        if self.mp_trainer is not None:
            state["lg_loss_scale"] = float(self.mp_trainer.lg_loss_scale)
        if hasattr(self.data, "state_dict"):
            state["data"] = self.data.state_dict()
        if hasattr(self.schedule_sampler, "state_dict"):
            state["schedule_sampler"] = self.schedule_sampler.state_dict()
        return state

    def _load_training_state(self, state):
        if is_bare_optimizer_state(state):
            # The original's opt file: the optimizer's state dict alone.
            self._load_optimizer(state)
            logger.warn(f"resume: {self._opt_file} is the original guided-diffusion's optimizer state; random "
                        "states and the data order start afresh")
            return
        if not isinstance(state, dict) or "optimizer" not in state:
            raise UserError(f"resume: {self._opt_file} is neither a training state of ours nor an optimizer "
                            "state dict; move it away to resume with a fresh optimizer")
        self._load_optimizer(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(_numpy_state_from_tensors(state["numpy_rng"]))
        random.setstate(_tuples(state["python_rng"]))
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if self.mp_trainer is not None and "lg_loss_scale" in state:
            self.mp_trainer.lg_loss_scale = state["lg_loss_scale"]
        if "data" in state and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(state["data"])
        elif hasattr(self.data, "load_state_dict") or "data" in state:
            logger.warn("resume: the data order could not be restored; batches will differ from the original run")
        if "schedule_sampler" in state and hasattr(self.schedule_sampler, "load_state_dict"):
            self.schedule_sampler.load_state_dict(state["schedule_sampler"])

    def _load_optimizer(self, opt_state):
        try:
            self.opt.load_state_dict(opt_state)
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"resume: the optimizer state in {self._opt_file} does not fit this model: "
                            f"{str(err).splitlines()[0]}") from None
        # The fused AdamW kernel walks each state tensor's memory in its
        # parameter's order: a state saved in the other layout (NCHW against
        # channels-last) would update the wrong elements.
        for param, state in self.opt.state.items():
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape:
                    state[key] = in_layout_of(param, value)

    # -------------------------------------------------------------------- loop

    def run_loop(self):
        """Train until ``lr_anneal_steps`` (if set) or a stop signal; returns
        the path of the last model checkpoint written."""
        self._last_saved = None
        train_until(self, self.lr_anneal_steps, self.log_interval)
        self.save_now()  # the last step, unless a save step or a stop just wrote it
        self.check_ranks_agree()
        return self._last_saved

    def advance(self):
        """One step on the next batch, then logging, saving, previews and
        evaluations at their intervals."""
        batch, cond = next(self.data)
        self.run_step(batch, cond)
        self.step += 1
        if self.step % self.log_interval == 0:
            self._log(self.lr_anneal_steps or None)
        self._stop_if_diverged()
        if self.save_interval and self.step % self.save_interval == 0:
            self._last_saved = self.save()
        if self.sample_interval and self.sample_fn and self.step % self.sample_interval == 0:
            self.sample_fn(self.ema_model_for_sampling(), self.step)
        if self.eval_interval and self.eval_fn and self.step % self.eval_interval == 0:
            self.evaluate()

    def save_now(self):
        """Saving at a stop, unless this step was just saved."""
        if self._last_saved is None or ckpt.parse_step(self._last_saved) != self.step:
            self._last_saved = self.save()

    def run_step(self, batch, cond):
        """One optimizer step on ``batch``: eager, or on CUDA (``cuda_graph``)
        two eager warm-up steps and then one captured graph replayed per batch."""
        batch, cond = self._move(batch, cond)
        if not self._norm_kernels_built:
            self._build_norm_kernels(batch, cond)
        self._set_step_scalars()
        if not self._graph_mode:
            self._device_step(batch, cond)
            return
        if self._cond_keys is None:
            self._cond_keys = tuple(sorted(cond))
        tensors = (batch, *(cond[k] for k in self._cond_keys)) if set(cond) == set(self._cond_keys) else None
        if tensors is None or not self._replayed.fits(*tensors):
            if not self._graph_mismatch_logged:
                logger.log(f"cuda_graph: a batch of shape {tuple(batch.shape)} (conditions {sorted(cond)}) differs "
                           "from the captured one; such batches run eagerly")
                self._graph_mismatch_logged = True
            self._device_step(batch, cond)
            return
        self._replayed(*tensors)

    def _build_norm_kernels(self, batch, cond):
        """Before the first step: build the fused norms' kernels for this
        model at once, in threads (``nn.build_norm_kernels_ahead``)."""
        self._norm_kernels_built = True
        n = min(2, batch.shape[0])
        t = torch.zeros(n, dtype=torch.long, device=batch.device)

        def forward():
            with autocast(self.precision, self.device):
                self.model(batch[:n], t, **{k: v[:n] for k, v in cond.items()})
        built = build_norm_kernels_ahead(forward, self.device)
        if built:
            logger.log(f"fused norms: {built[0]} Triton kernels ready in {built[1]:.1f} s")

    def _device_step_of_tensors(self, batch, *cond_values):
        return self._device_step(batch, dict(zip(self._cond_keys, cond_values)))

    def _device_step(self, batch, cond):
        """Gradients, clipping, optimizer and EMA for one batch already on the
        device, without host reads (so it can be captured)."""
        self._accumulate_gradients(batch, cond)
        self.optimize()

    def _set_step_scalars(self):
        """This step's learning rate (annealed) and step count, set outside
        any captured graph: the graph reads them from device tensors."""
        frac_done = self.step / self.lr_anneal_steps if self.lr_anneal_steps else 0.0
        self._lr_now = self.lr * (1.0 - frac_done)
        if self._graph_mode:
            self._lr_tensor.fill_(self._lr_now)
            self._step_tensor.fill_(float(self.step))
        else:
            for group in self.opt.param_groups:
                group["lr"] = self._lr_now

    def _move(self, batch, cond):
        batch = batch.to(self.device, non_blocking=True)
        cond = {k: v.to(self.device, non_blocking=True) for k, v in cond.items()}
        if self.batch_transform is not None:
            with torch.no_grad():
                batch = self.batch_transform(batch)
        if self.augment is not None:
            batch, labels = self.augment(batch)
            cond = {**cond, "augment": labels}
        if self.class_dropout_prob > 0 and "y" in cond:
            # Classifier-free guidance learns the unconditional model as one more class.
            dropped = torch.rand(cond["y"].shape, device=cond["y"].device) < self.class_dropout_prob
            cond = {**cond, "y": torch.where(dropped, torch.full_like(cond["y"], self.null_label), cond["y"])}
        return batch, cond

    def _accumulate_gradients(self, batch, cond):
        if self.mp_trainer is not None:
            self.mp_trainer.zero_grad()
        else:
            self.opt.zero_grad(set_to_none=True)
        nonfinite = torch.zeros((), device=self.device)
        for start in range(0, batch.shape[0], self.microbatch):
            micro = batch[start : start + self.microbatch]
            micro_cond = {k: v[start : start + self.microbatch] for k, v in cond.items()}
            last = start + self.microbatch >= batch.shape[0]
            t, weights = self.schedule_sampler.sample(micro.shape[0], self.device)
            no_sync = getattr(self.ddp_model, "no_sync", None)
            sync_ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
            with sync_ctx:
                with autocast(self.precision, self.device, cache=not self._graph_mode):
                    losses = self.diffusion.training_losses(self.compiled_model, micro, t, model_kwargs=micro_cond)
                if self._loss_aware:
                    self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
                per_sample = losses["loss"].float() * weights
                finite = torch.isfinite(per_sample)
                nonfinite = nonfinite + (~finite).sum()
                loss = per_sample.mean()
                self._record_losses(losses, t, finite, weights)
                if self.mp_trainer is not None:
                    self.mp_trainer.backward(loss)
                else:
                    loss.backward()
        self._nonfinite_now = nonfinite > 0

    def _record_losses(self, losses, t, finite, weights):
        for name, values in losses.items():
            values = torch.where(finite, values.detach().float() * weights, torch.zeros_like(weights))
            self.metrics.add(name, values, count=finite.sum())
            self.metrics.add_by_quarter(name, values, t, self.diffusion.num_timesteps)

    def optimize(self):
        if self.mp_trainer is not None:
            # The original fp16 scheme checks gradients on the host by design.
            stepped = self.mp_trainer.optimize(self.opt)
            if stepped:
                self._update_ema()
            self.metrics.add("skipped_step", torch.tensor(0.0 if stepped else 1.0, device=self.device))
            return
        params = [p for p in self.params if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        bad = self._nonfinite_now | ~torch.isfinite(grad_norm)
        self.opt.found_inf = bad.float()
        self.opt.grad_scale = None
        self.opt.step()
        self._update_ema(skipped=bad)
        self.metrics.add("grad_norm", torch.where(bad, torch.zeros_like(grad_norm), grad_norm), count=(~bad).float())
        self.metrics.add("skipped_step", bad.float())
        self._nonfinite_run.add_(1).mul_(bad.float())  # in place: a captured graph keeps this tensor

    def _update_ema(self, skipped=None):
        """Move every EMA towards the weights; ``skipped`` (a 0-dim bool on
        the device) freezes them for a skipped step without a host branch."""
        source = [p.detach().float() for p in self.params] if self.mp_trainer is not None else self.params
        for rate, ema in zip(self.ema_rates, self.ema_params):
            if skipped is None:
                update_ema(ema, source, rate=ema_decay(rate, self.step, self.ema_warmup))
                continue
            if self._graph_mode:
                # 1 - decay from the device step count; 9 / (10 + n) is
                # 1 - (1 + n) / (10 + n), the warm-up rule, without cancellation.
                one_minus = 1.0 - rate
                if self.ema_warmup:
                    one_minus = torch.clamp(9.0 / (10.0 + self._step_tensor), min=one_minus)
                weight = one_minus * (~skipped).float()
            else:
                weight = (1.0 - ema_decay(rate, self.step, self.ema_warmup)) * (~skipped).float()
            with torch.no_grad():
                step = torch._foreach_sub([p.detach() for p in source], ema)
                torch._foreach_mul_(step, weight)
                torch._foreach_add_(ema, step)

    # ----------------------------------------------------------------- logging

    def _log(self, total_steps):
        values = self.metrics.pop()
        now = time.time()
        seen_step, seen_time = self._images_seen_at_log
        images = (self.step - seen_step) * self.batch_size * dist_util.world_size()
        rate = images / max(now - seen_time, 1e-9)
        self._images_seen_at_log = (self.step, now)
        for key, value in values.items():
            logger.logkv(key, value)
        logger.logkv("step", self.step)
        logger.logkv("samples", self.step * self.batch_size * dist_util.world_size())
        logger.logkv("images_per_sec", rate)
        logger.logkv("lr", self._lr_now)
        if self.mp_trainer is not None:
            logger.logkv("lg_loss_scale", self.mp_trainer.lg_loss_scale)
        if total_steps:
            steps_per_sec = (self.step - seen_step) / max(now - seen_time, 1e-9)
            eta = (total_steps - self.step) / max(steps_per_sec, 1e-9)
            logger.logkv("eta_min", eta / 60.0)
        logger.dumpkvs(step=self.step)
        line = f"step {self.step}" + (f"/{total_steps}" if total_steps else "")
        if "loss" in values:
            line += f"  loss {values['loss']:.4f}"
        line += f"  {rate:.1f} img/s"
        if total_steps:
            line += f"  ETA {_duration(eta)}"
        logger.log(line)

    def _stop_if_diverged(self):
        """Save and stop once ``max_nonfinite_steps`` steps in a row had a
        non-finite loss or gradient. Checked every step (a check at log steps
        only let a run with log_interval 1000 go on for up to 1000 such
        steps); on a GPU the count is read one step late, so the host never
        waits for the step it has just queued (:class:`_LaggedReader`)."""
        if not self.max_nonfinite_steps or self.mp_trainer is not None:
            return  # the original fp16 scheme skips and rescales on its own
        in_a_row = self._nonfinite_seen.read()
        if in_a_row is not None and in_a_row >= self.max_nonfinite_steps:
            self.save()
            counted_at = self.step - self._nonfinite_seen.lag
            raise UserError(
                f"training stopped: {in_a_row} steps in a row had a non-finite loss or gradient "
                f"(step {counted_at}); try a lower lr (now {self.lr}), grad_clip (e.g. 1.0), "
                f"precision fp32, or check the data/latent scale for NaN or huge values"
            )

    def check_ranks_agree(self):
        """Compare a digest of the weights across ranks; diverged ranks (a
        broken all-reduce, a rank-dependent branch) stop with an error."""
        if dist_util.world_size() == 1:
            return
        with torch.no_grad():
            digest = torch.stack(
                [p.detach().double().sum() * (i + 1) + p.detach().double().abs().sum() for i, p in enumerate(self.params)]
            ).sum().reshape(1)
        gathered = [torch.zeros_like(digest) for _ in range(dist_util.world_size())]
        dist.all_gather(gathered, digest)
        values = [g.item() for g in gathered]
        if len(set(values)) != 1:
            raise RuntimeError(f"ranks hold different weights after step {self.step}: digests {values}")
        logger.log(f"weights identical on all {len(values)} ranks (digest {values[0]:.10g})")

    # ------------------------------------------------------------- checkpoints

    def _meta(self, weights):
        return {**self.metadata, "step": self.step, "weights": weights}

    def ema_state_dict(self, index=0):
        names = [name for name, _ in self.model.named_parameters()]
        state = dict(self.model.state_dict())
        state.update({n: p for n, p in zip(names, self.ema_params[index])})
        return state

    def model_state_dict(self):
        if self.mp_trainer is not None:
            return self.mp_trainer.master_params_to_state_dict(self.mp_trainer.master_params)
        return self.model.state_dict()

    def ema_model_for_sampling(self):
        """A copy of the model holding the slowest EMA's weights (largest
        rate: the file the sampling scripts pick from a run folder), or the
        raw weights when no EMA rate is set; in eval mode."""
        model = copy.deepcopy(self.model)
        if self.ema_rates:
            state = self.ema_state_dict(max(range(len(self.ema_rates)), key=lambda i: self.ema_rates[i]))
            model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()})
        return model.eval()

    def evaluate(self):
        """``eval_fn(ema_model, step, write_weights)`` on rank 0 only; it
        must enter no collective (the other ranks go on to the next step)."""
        if dist_util.is_main():
            self.eval_fn(self.ema_model_for_sampling(), self.step, self.write_weights)

    def write_weights(self, folder):
        """Write the model and EMA weight files of the current step into
        ``folder`` (this rank, no training state); returns their paths."""
        paths = [ckpt.model_path(folder, self.step)]
        ckpt.save_weights(paths[0], self.model_state_dict(), self._meta("model"))
        for i, rate in enumerate(self.ema_rates):
            paths.append(ckpt.ema_path(folder, rate, self.step))
            ckpt.save_weights(paths[-1], self.ema_state_dict(i), self._meta(f"ema_{rate}"))
        return paths

    def save(self):
        """Write model, EMA and training state for the current step (rank 0);
        returns the model checkpoint path."""
        folder = self.checkpoint_dir
        model_file = ckpt.model_path(folder, self.step)
        if dist_util.is_main():
            self.write_weights(folder)
            # The training state goes last: a model file counts as resumable
            # only once its state file exists.
            ckpt.save_training_state(ckpt.state_path(folder, self.step), self._training_state())
            logger.log(f"saved checkpoint {model_file}")
            # Only now is the new checkpoint complete, so older ones may go.
            removed = ckpt.prune_checkpoints(folder, self.keep_checkpoints, self.step)
            if removed:
                logger.log(f"removed the checkpoints of step(s) {', '.join(map(str, removed))} "
                           f"(keep_checkpoints {self.keep_checkpoints})")
        dist_util.barrier()
        return model_file


class _LaggedReader:
    """Reads a 0-dim device tensor on the host without stalling a GPU: each
    ``read()`` returns the value copied at the previous call (None at the
    first) and starts a non-blocking copy of the current one. On the CPU it
    returns the current value. Every rank reads at the same steps, so ranks
    stop together."""

    def __init__(self, tensor):
        self.tensor = tensor
        self.lagged = tensor.device.type == "cuda"
        if self.lagged:
            self.host = torch.zeros((), dtype=tensor.dtype).pin_memory()
            self.copied = None  # the CUDA event of the copy in flight

    @property
    def lag(self):
        """Steps between the value ``read()`` returns and the latest one."""
        return 1 if self.lagged else 0

    def read(self):
        if not self.lagged:
            return int(self.tensor.item())
        value = None
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy: long done, normally
            value = int(self.host.item())
        self.host.copy_(self.tensor, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        return value


def in_layout_of(param, value):
    """``value`` (param's shape) laid out in memory as ``param`` is (NCHW or
    channels-last), in value's dtype; value itself when it already is."""
    if value.stride() == param.stride():
        return value
    return torch.empty_like(param, dtype=value.dtype).copy_(value)


def _duration(seconds):
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _numpy_state_to_tensors(state):
    name, keys, pos, has_gauss, cached = state
    return (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached))


def _numpy_state_from_tensors(state):
    name, keys, pos, has_gauss, cached = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)


def _tuples(value):
    """Lists back to tuples (random.setstate wants the exact nesting)."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value
