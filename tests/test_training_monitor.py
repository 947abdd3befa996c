"""Training-time evaluation (--eval_interval, --keep_best): the rows it logs,
the best checkpoint it keeps, and the flags it refuses before any work."""

import copy
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from guided_diffusion_vae.training import checkpoint as ckpt
from guided_diffusion_vae.training.diffusion_training import pixel_train_defaults, pixel_training_data, run_training
from guided_diffusion_vae.runtime.errors import UserError
from guided_diffusion_vae.training import person_classifier as clf
from guided_diffusion_vae.evaluation import monitor
from guided_diffusion_vae.evaluation.monitor import TrainingMonitor, build_monitor, is_better

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {"num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2", "attention_resolutions": "8",
        "diffusion_steps": 100, "batch_size": 4, "save_interval": 0, "log_interval": 1, "num_workers": 0,
        "tensorboard": False, "class_cond": True, "image_size": 16, "in_channels": 1, "random_flip": False,
        "ema_rate": "0.99", "eval_respacing": "ddim4", "eval_samples_per_class": 3}


def _walks(folder, per_class, seed):
    """Two people: stripes along time at different heights, with noise."""
    rng = np.random.default_rng(seed)
    for person, row in (("alice", 3), ("bob", 11)):
        os.makedirs(folder / person, exist_ok=True)
        for i in range(per_class):
            image = rng.integers(0, 60, (16, 16)).astype(np.uint8)
            image[row:row + 3] = 220
            Image.fromarray(image, "L").save(folder / person / f"{i:03d}.png")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Real training and held-out folders, and a small reference classifier
    (embedding of 4, so six samples give a Frechet distance)."""
    root = tmp_path_factory.mktemp("real")
    _walks(root / "train", 6, seed=0)
    _walks(root / "test", 6, seed=1)
    from guided_diffusion_vae.evaluation.data import load_folder

    train = load_folder(str(root / "train"), image_size=16, channels=1)
    model = clf.train_classifier(train.images, train.labels, 2, device="cpu", steps=5, batch_size=8, embed_dim=4)
    path = root / "classifier.safetensors"
    clf.save_classifier(str(path), model, {"class_names": train.class_names, "image_size": 16})
    return root, path


def _config(real, log_dir, **changes):
    root, classifier = real
    return {**pixel_train_defaults(), **TINY, "data_dir": str(root / "train"), "log_dir": str(log_dir),
            "eval_real_train": str(root / "train"), "eval_real_test": str(root / "test"),
            "eval_classifier": str(classifier), **changes}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluations_reach_progress_csv_and_metrics_csv_at_their_steps(real, tmp_path):
    run = tmp_path / "run"
    run_training(_config(real, run, lr_anneal_steps=5, eval_interval=2), pixel_training_data, build_monitor)

    evaluated = [row for row in _rows(run / "eval" / "metrics.csv")]
    assert [int(row["step"]) for row in evaluated] == [2, 4, 5]  # every 2 steps, and the last one
    for row in evaluated:
        assert 0.0 <= float(row["cas"]) <= 1.0 and float(row["fd"]) >= 0.0
        assert int(row["memorised"]) >= 0 and int(row["memorised_gu"]) >= 0 and float(row["variety"]) > 0
    progress = [row for row in _rows(run / "progress.csv") if row.get("eval/cas")]
    assert [int(float(row["step"])) for row in progress] == [2, 4, 5]
    assert [row["eval/fd"] for row in progress] == [row["fd"] for row in evaluated]
    log = (run / "log.txt").read_text()
    assert "evaluation at step 4: cas" in log
    assert not (run / "best").exists()  # no keep_best


def test_without_enough_samples_the_frechet_distance_is_absent_with_one_note(real, tmp_path):
    run = tmp_path / "run"
    # One sample per class: 2 samples for an embedding of 4.
    run_training(_config(real, run, lr_anneal_steps=2, eval_interval=1, eval_samples_per_class=1),
                 pixel_training_data, build_monitor)
    rows = _rows(run / "eval" / "metrics.csv")
    assert [row["fd"] for row in rows] == ["", ""] and all(row["cas"] for row in rows)
    assert (run / "log.txt").read_text().count("fd not computed") == 1
    with pytest.raises(UserError, match=r"^keep_best fd: needs more than 4 images per set"):
        run_training(_config(real, tmp_path / "refused", lr_anneal_steps=2, eval_interval=1,
                             eval_samples_per_class=1, keep_best="fd"), pixel_training_data, build_monitor)
    assert not (tmp_path / "refused").exists()


def test_keep_best_keeps_the_weights_of_the_best_step(real, tmp_path, monkeypatch):
    fds = iter([5.0, 2.0, 3.0, 4.0])  # steps 2, 4, 6, 8: the best is step 4
    real_measure = TrainingMonitor.measure

    def measure(self, model):
        values = real_measure(self, model)
        return {**values, "fd": next(fds)}

    monkeypatch.setattr(TrainingMonitor, "measure", measure)
    run = tmp_path / "run"
    config = _config(real, run, lr_anneal_steps=6, eval_interval=2, keep_best="fd", save_interval=2,
                     keep_checkpoints=1)
    run_training(config, pixel_training_data, build_monitor)

    best = run / "best"
    assert sorted(os.listdir(best)) == ["best.json", "ema_0.99_000004.safetensors", "model000004.safetensors"]
    record = json.loads((best / "best.json").read_text())
    assert record["step"] == 4 and record["metric"] == "fd" and record["value"] == 2.0
    assert set(record["metrics"]) == {"cas", "fd", "memorised", "memorised_gu", "variety"}
    # The same files as the run's own checkpoints: sampling takes the folder.
    from guided_diffusion_vae.training.checkpoint import resolve_weights_file

    chosen = resolve_weights_file(str(best))
    assert chosen == str(best / "ema_0.99_000004.safetensors")
    state, meta = ckpt.load_weights(chosen)
    assert meta["step"] == 4 and meta["weights"] == "ema_0.99" and meta["data"]["label_map"]
    # Pruning (keep_checkpoints 1) left it alone, and resuming takes the newest step of the run.
    assert ckpt.latest_model_checkpoint(str(run)) == str(run / "model000006.safetensors")

    # Resumed: the recorded best (2.0) still counts; 4.0 at step 8 does not replace it.
    run_training({**config, "lr_anneal_steps": 8, "resume_checkpoint": "auto"}, pixel_training_data, build_monitor)
    assert json.loads((best / "best.json").read_text())["step"] == 4
    assert [int(r["step"]) for r in _rows(run / "eval" / "metrics.csv")] == [2, 4, 6, 8]


def test_higher_is_better_for_cas_and_variety_only():
    assert is_better("cas", 0.6, 0.5) and not is_better("cas", 0.4, 0.5)
    assert is_better("variety", 0.9, 0.8)
    assert is_better("fd", 1.0, 2.0) and not is_better("fd", 3.0, 2.0)
    assert is_better("memorised", 0, 1) and not is_better("memorised_gu", 1, 1)
    assert is_better("fd", 7.0, None) and not is_better("fd", None, 2.0)


def _never_build(config):
    raise AssertionError("the data was built although a flag was bad")


@pytest.mark.parametrize("changes, message", [
    ({"eval_real_train": ""}, r"^--eval_interval needs --eval_real_train: "),
    ({"eval_real_test": "/nonexistent/test"}, r"^--eval_real_test /nonexistent/test: no such folder$"),
    ({"keep_best": "loss"}, r"^keep_best 'loss' must be one of fd, cas, memorised, memorised_gu, variety"),
    ({"eval_interval": 0, "keep_best": "fd"}, r"^keep_best needs evaluations: set --eval_interval"),
    ({"eval_interval": -1}, r"^eval_interval must be an integer >= 0"),
    ({"eval_samples_per_class": 0}, r"^eval_samples_per_class must be an integer >= 1"),
    ({"eval_classifier": "/nonexistent/c.safetensors"}, r"^--eval_classifier /nonexistent/c.safetensors: no such"),
    ({"eval_respacing": "ddim40"}, r"^eval_respacing 'ddim40' cannot be met"),
    ({"class_cond": False}, r"^--eval_interval needs a class-conditional model"),
])
def test_bad_eval_flags_are_refused_before_any_work(real, tmp_path, changes, message):
    run = tmp_path / "run"
    config = _config(real, run, **{"lr_anneal_steps": 2, "eval_interval": 2, **changes})
    with pytest.raises(UserError, match=message) as err:
        run_training(config, _never_build, build_monitor)
    assert "\n" not in str(err.value)
    assert not run.exists()


def test_a_program_without_a_monitor_refuses_eval_interval(real, tmp_path):
    with pytest.raises(UserError, match="not available in this program"):
        run_training(_config(real, tmp_path / "run", eval_interval=2), _never_build)
    assert not (tmp_path / "run").exists()


def test_image_train_vae_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "image_train_vae.py"), "--latent_cache", str(tmp_path),
         "--class_cond", "True", "--eval_interval", "100", "--log_dir", str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --eval_interval needs --eval_real_train: a folder of real images with one sub-folder per class"]
    assert not (tmp_path / "run").exists()


def test_the_classifier_is_trained_once_and_saved_in_the_run(real, tmp_path, monkeypatch):
    """eval_classifier '': trained at the start (evaluate.py's recipe, here
    shortened) and saved in log_dir/eval/, where a resumed run loads it."""
    recipe = monitor.evaluate_defaults

    def short_recipe():
        return {**recipe(), "classifier_steps": 3, "classifier_embed_dim": 4}

    monkeypatch.setattr(monitor, "evaluate_defaults", short_recipe)
    trained = []
    original = clf.train_classifier
    monkeypatch.setattr(clf, "train_classifier", lambda *a, **k: trained.append(1) or original(*a, **k))
    run = tmp_path / "run"
    config = _config(real, run, lr_anneal_steps=1, eval_interval=1, eval_classifier="", save_interval=1)
    run_training(config, pixel_training_data, build_monitor)
    saved = run / "eval" / "reference_classifier.safetensors"
    _, info = clf.load_classifier(str(saved), "cpu")
    assert info["class_names"] == ["alice", "bob"] and trained == [1]
    run_training({**config, "lr_anneal_steps": 2, "resume_checkpoint": "auto"}, pixel_training_data, build_monitor)
    assert trained == [1]


def test_two_processes_evaluate_on_rank_0_only_and_finish(real, tmp_path, mpiexec, launch_env):
    """Rank 0 evaluates while rank 1 goes on (no collective of rank 0 alone):
    the run ends, with one row per evaluation."""
    root, classifier = real
    run = tmp_path / "run"
    flags = {**TINY, "tensorboard": True, "batch_size": 2, "lr_anneal_steps": 4, "eval_interval": 2,
             "keep_best": "cas", "data_dir": root / "train", "eval_real_train": root / "train",
             "eval_real_test": root / "test", "eval_classifier": classifier, "log_dir": run}
    cmd = [*mpiexec, "-n", "2", sys.executable, os.path.join(REPO, "scripts", "image_train.py"),
           *(part for key, value in flags.items() for part in (f"--{key}", str(value)))]
    result = subprocess.run(cmd, env=launch_env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert [int(row["step"]) for row in _rows(run / "eval" / "metrics.csv")] == [2, 4]
    assert (run / "best" / "best.json").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [event.step for event in events.Scalars("eval/cas")] == [2, 4]


def test_the_gpu_quickstart_evaluates_and_samples_the_best_weights(tmp_path):
    from guided_diffusion_vae.tools import quickstart
    from guided_diffusion_vae.training.monitor_flags import check_monitor_flags

    tiny = quickstart.PRESETS["tiny"]
    # The shipped gpu preset does not evaluate yet (not measured on a GPU); a preset that asks for it:
    assert not quickstart._diffusion_config(str(tmp_path), quickstart.PRESETS["gpu"], 0)["eval_interval"]
    gpu = copy.deepcopy(quickstart.PRESETS["gpu"])
    gpu["diffusion"].update(eval_interval=1000, eval_samples_per_class=10, keep_best="fd")
    config = quickstart._diffusion_config(str(tmp_path), gpu, 0)
    assert (config["eval_interval"], config["keep_best"]) == (1000, "fd")
    assert (config["eval_real_train"], config["eval_real_test"]) == (str(tmp_path / "data" / "train"),
                                                                      str(tmp_path / "data" / "test"))
    for split in ("train", "test"):
        (tmp_path / "data" / split).mkdir(parents=True)
    check_monitor_flags(config)
    # 31 people x 10 samples: more than the reference classifier's embedding, so FD is defined.
    assert gpu["num_users"] * config["eval_samples_per_class"] > clf.classifier_defaults()["classifier_embed_dim"]
    assert not quickstart._diffusion_config(str(tmp_path), tiny, 0)["eval_interval"]  # CPU time

    run = tmp_path / "diffusion"
    assert quickstart.sampled_weights(str(tmp_path), gpu) == str(run)  # nothing kept: the last weights
    (run / "best").mkdir(parents=True)
    (run / "best" / "model001000.safetensors").write_bytes(b"")
    assert quickstart.sampled_weights(str(tmp_path), gpu) == str(run / "best")
    assert quickstart.sampled_weights(str(tmp_path), tiny) == str(run)


def test_a_latent_run_evaluates_decoded_samples(real, tmp_path):
    """Latent diffusion: samples are decoded by the VAE before they are measured."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from helpers.vae_helpers import make_tiny_vae
    from guided_diffusion_vae.training.latent_training import latent_train_defaults, latent_training_data

    vae = make_tiny_vae(tmp_path / "vae", in_channels=1)
    run = tmp_path / "run"
    config = {**latent_train_defaults(), **_config(real, run, lr_anneal_steps=2, eval_interval=2, keep_best="cas"),
              "vae_path": vae, "latent_scale": "1.0", "attention_resolutions": "2", "in_channels": 4}
    run_training(config, latent_training_data, build_monitor)
    rows = _rows(run / "eval" / "metrics.csv")
    assert [int(row["step"]) for row in rows] == [2] and float(rows[0]["fd"]) >= 0.0
    _, meta = ckpt.load_weights(str(run / "best" / "ema_0.99_000002.safetensors"))
    assert meta["vae"] and meta["step"] == 2


def test_a_class_missing_from_the_real_images_is_refused_before_training(real, tmp_path):
    root, _ = real
    data = tmp_path / "data"
    _walks(data, 2, seed=3)
    os.rename(data / "bob", data / "carol")
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"^--eval_real_train .* lacks the class\(es\) carol of the training data$"):
        run_training(_config(real, run, data_dir=str(data), lr_anneal_steps=2, eval_interval=1),
                     pixel_training_data, build_monitor)
    assert not run.exists()
