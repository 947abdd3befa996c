"""Training-time evaluation: how good is the model now, and is it the best yet?

``--eval_interval N`` (flags: :mod:`.monitor_flags`) makes the training loop
call a :class:`TrainingMonitor` every N steps and at the last one, on rank 0
with the EMA weights the sampling scripts would pick. It draws
``eval_samples_per_class`` samples of every class with the same noise each
time (so two evaluations differ only by the weights) and measures them with
the evaluation's reference classifier and metrics:

    cas           share of samples the classifier gives to their own class
    fd            Frechet distance of their embeddings to the real held-out ones
    memorised     samples much closer to a training image than fresh walks are
    memorised_gu  samples whose nearest training image is < 1/3 of the 2nd's distance
    variety       within-class nearest-neighbour spread vs the real held-out images

The values go to progress.csv and TensorBoard (``eval/<name>``) and to
``log_dir/eval/metrics.csv``. With ``keep_best`` the weights of the best
evaluation so far are kept in ``log_dir/best/`` (checkpoint files as the
run's own, plus ``best.json``): outside the run folder's top level, so
``--keep_checkpoints`` never prunes them and ``--resume_checkpoint auto``
never resumes from them.

The numbers are for comparing steps of one run: with few samples the
Frechet distance is biased upwards, and more so than evaluate.py's.
"""

import csv
import json
import os
import re
import time

import numpy as np

from ..runtime import dist_util, logger
from ..core import script_util
from ..training.diffusion_training import draw_images
from ..runtime.errors import UserError
from ..runtime.files import atomic_write_json
from ..data.labels import people
from ..training import person_classifier as clf
from . import metrics
from .evaluate import Evaluation, evaluate_defaults, load_sets, reference_classifier
from ..training.monitor_flags import HIGHER_IS_BETTER

METRICS = tuple(HIGHER_IS_BETTER)
EVAL_DIR, BEST_DIR = "eval", "best"
CLASSIFIER_FILE, METRICS_FILE, BEST_FILE = "reference_classifier.safetensors", "metrics.csv", "best.json"
# The evaluation's thresholds (evaluate.py's defaults), so the counts mean the same.
MEMORISATION_THRESHOLD = evaluate_defaults()["memorisation_threshold"]
COPY_RATIO_THRESHOLD = evaluate_defaults()["copy_ratio_threshold"]


def build_monitor(*, config, data, diffusion_config, precision):
    """The ``eval_fn`` of ``run_training``: a :class:`TrainingMonitor` on
    rank 0, None elsewhere. A failure on rank 0 (e.g. unreadable real images)
    is raised on every rank, so none is left waiting for the others."""
    monitor, failure = None, None
    if dist_util.is_main():
        try:
            monitor = TrainingMonitor(config=config, data=data, diffusion_config=diffusion_config,
                                      precision=precision, log_dir=logger.get_dir() or ".")
        except UserError as err:
            failure = err
    message = dist_util.broadcast_object(str(failure) if failure else None)
    if failure is not None:
        raise failure
    if message is not None:
        raise UserError(message)
    return monitor


def is_better(metric, value, best):
    """Whether ``value`` of ``metric`` beats ``best`` (None: nothing yet)."""
    if value is None:
        return False
    if best is None:
        return True
    return value > best if HIGHER_IS_BETTER[metric] else value < best


class TrainingMonitor:
    """Built once before training (real images, classifier, real features);
    ``monitor(model, step, write_weights)`` evaluates ``model`` and, with
    ``keep_best``, calls ``write_weights(folder)`` when it is the best yet."""

    def __init__(self, *, config, data, diffusion_config, precision, log_dir):
        self.device = dist_util.dev()
        self.precision, self.data, self.seed = precision, data, int(config["seed"])
        self.eval_dir, self.best_dir = os.path.join(log_dir, EVAL_DIR), os.path.join(log_dir, BEST_DIR)
        self.keep_best = config.get("keep_best", "")
        self.diffusion = script_util.create_gaussian_diffusion(
            **{**diffusion_config, "timestep_respacing": config["eval_respacing"]})
        os.makedirs(self.eval_dir, exist_ok=True)
        eval_config = self._evaluation_config(config, data)
        self.train, self.test, _, self.image_size, self.channels = load_sets(eval_config, self.device)
        self.labels, self.eval_labels = self._sample_labels(data.label_map, int(config["eval_samples_per_class"]))
        self.classifier, _ = reference_classifier(Evaluation(eval_config, self.device), self.train,
                                                  self.image_size, self.channels)
        self.real_features = clf.embed(self.classifier, self.test.images, self.device)
        self._fd_note = self._fd_unavailable(len(self.labels))
        if self.keep_best == "fd" and self._fd_note:
            raise UserError(f"keep_best fd: {self._fd_note}")
        self.best = self._recorded_best(config)
        logger.log(f"evaluation every {config['eval_interval']} steps: {len(self.labels)} samples "
                   f"({config['eval_samples_per_class']} per class, {config['eval_respacing']}) against "
                   f"{len(self.train)} real training and {len(self.test)} held-out images"
                   + (f"; the best by {self.keep_best} is kept in {self.best_dir}" if self.keep_best else ""))

    # ------------------------------------------------------------------ set-up

    def _evaluation_config(self, config, data):
        """evaluate.py's settings for these real sets, at the training images'
        size; the reference classifier is loaded, or trained (evaluate.py's
        default recipe) and saved in log_dir/eval/, where a resumed run finds it."""
        saved = os.path.join(self.eval_dir, CLASSIFIER_FILE)
        classifier = config.get("eval_classifier") or (saved if os.path.isfile(saved) else "")
        return {**evaluate_defaults(), "real_train": config["eval_real_train"], "real_test": config["eval_real_test"],
                "classifier_path": classifier, "save_classifier": saved, "image_size": data.image_size,
                "vae_path": config.get("vae_path", ""), "db_range": config.get("db_range", "auto"),
                "seed": self.seed}

    def _sample_labels(self, label_map, per_class):
        """The model's class of each sample, and the same class in the
        evaluation's (real folder) order, matched by name."""
        persons = people(label_map)
        missing = sorted(name for name in persons.values() if name not in self.train.class_names)
        if missing:
            raise UserError(f"--eval_real_train {self.train.source} lacks the class(es) "
                            f"{', '.join(missing[:5])} of the training data")
        model_labels = [int(k) for k in sorted(persons, key=int) for _ in range(per_class)]
        eval_labels = [self.train.class_names.index(persons[str(k)]) for k in model_labels]
        return model_labels, np.asarray(eval_labels, dtype=np.int64)

    def _fd_unavailable(self, num_samples):
        """Why the Frechet distance cannot be measured, or None: each set
        needs more images than the embedding has dimensions."""
        dim = self.real_features.shape[1]
        if num_samples <= dim or len(self.test) <= dim:
            return (f"needs more than {dim} images per set (the classifier's embedding size), got {num_samples} "
                    f"samples and {len(self.test)} held-out images: raise --eval_samples_per_class")
        return None

    def _recorded_best(self, config):
        """The best value of an interrupted run being resumed (None when
        starting afresh or when it was chosen by another metric)."""
        path = os.path.join(self.best_dir, BEST_FILE)
        if not (self.keep_best and config.get("resume_checkpoint") and os.path.isfile(path)):
            return None
        with open(path) as f:
            record = json.load(f)
        return record.get("value") if record.get("metric") == self.keep_best else None

    # -------------------------------------------------------------- evaluation

    def __call__(self, model, step, write_weights):
        started = time.time()
        values = self.measure(model)
        self._report(step, values, time.time() - started)
        if self.keep_best and is_better(self.keep_best, values[self.keep_best], self.best):
            self._keep(step, values, write_weights)

    def measure(self, model):
        """``{metric: value or None}`` of samples of ``model``."""
        dropped = []
        images, kept = draw_images(model=model, diffusion=self.diffusion, data=self.data, labels=self.labels,
                                   num_samples=len(self.labels), precision=self.precision, seed=self.seed,
                                   on_nonfinite=dropped.extend)
        if dropped:
            logger.log(f"evaluation: {len(dropped)} sample(s) held NaN or Inf and were left out")
        keep = np.isin(np.arange(len(self.labels)), dropped, invert=True)
        labels = self.eval_labels[keep]
        generated = self._as_evaluated(images)
        if not len(generated):
            return dict.fromkeys(METRICS)
        return self._metrics(generated, labels)

    def _as_evaluated(self, images_nhwc):
        """uint8 NHWC samples -> uint8 NCHW with the evaluation's channels."""
        x = clf.to_input(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)), "cpu")
        return clf.to_uint8(clf.match_channels(x, self.channels))

    def _metrics(self, generated, labels):
        gen_features = clf.embed(self.classifier, generated, self.device)
        fd = None
        if self._fd_unavailable(len(generated)) is None:
            fd = metrics.frechet_distance(gen_features, self.real_features)
        elif self._fd_note:
            logger.log(f"evaluation: fd not computed: {self._fd_note}")
            self._fd_note = None  # said once
        memo = metrics.memorisation(generated, self.train.images, self.test.images, MEMORISATION_THRESHOLD)
        gu = None
        if len(self.train) >= 2:
            gu = len(metrics.memorisation_by_second_nearest(generated, self.train.images,
                                                            COPY_RATIO_THRESHOLD)["flagged"])
        variety = metrics.within_class_variety(generated, labels, self.test.images, self.test.labels,
                                               np.random.default_rng(self.seed))
        return {"cas": clf.accuracy(clf.predict(self.classifier, generated, self.device), labels), "fd": fd,
                "memorised": int(len(memo["flagged"])), "memorised_gu": gu,
                "variety": variety["ratio"] if variety else None}

    def _report(self, step, values, seconds):
        """One line; ``eval/<metric>`` to progress.csv and TensorBoard (a row
        of its own at ``step``); a row of log_dir/eval/metrics.csv."""
        shown = ", ".join(f"{k} {'-' if v is None else f'{v:.4g}'}" for k, v in values.items())
        logger.log(f"evaluation at step {step}: {shown} ({len(self.labels)} samples, {seconds:.1f} s)")
        # The logger here gathers nothing over ranks (run_training sets no
        # comm), so this dump on rank 0 alone waits for no one.
        logger.logkv("step", step)
        for key, value in values.items():
            if value is not None:
                logger.logkv(f"eval/{key}", value)
        logger.dumpkvs(step=step)
        path = os.path.join(self.eval_dir, METRICS_FILE)
        fresh = not os.path.isfile(path)
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if fresh:
                writer.writerow(["step", *METRICS])
            writer.writerow([step, *("" if values[k] is None else values[k] for k in METRICS)])

    def _keep(self, step, values, write_weights):
        """Write this step's weights into log_dir/best/, then best.json, then
        remove the previous best's files (a crash in between leaves the new
        files and possibly old ones; sampling picks the newest step)."""
        os.makedirs(self.best_dir, exist_ok=True)
        written = {os.path.basename(p) for p in write_weights(self.best_dir)}
        record = {"step": step, "metric": self.keep_best, "value": values[self.keep_best], "metrics": values}
        atomic_write_json(os.path.join(self.best_dir, BEST_FILE), record, sort_keys=False)
        for name in os.listdir(self.best_dir):
            if re.fullmatch(r"(model|ema_.+_)\d+\.safetensors", name) and name not in written:
                os.remove(os.path.join(self.best_dir, name))
        self.best = values[self.keep_best]
        logger.log(f"best {self.keep_best} so far ({self.best:.4g}) at step {step}: weights in {self.best_dir}")

