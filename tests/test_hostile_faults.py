"""Hostile input and faults (issue 21, part C): a full disk, temporaries left
by SIGKILL, a sampling run stopped while it writes, SIGTERM and SIGUSR1 to
mpiexec, read-only output folders as a non-root user. Each fault ends in one
``error:`` line (or a clean save) and leaves nothing half-written. See
docs/RELIABILITY.md, "Hostile input and faults (issue 21, part C)"."""

import errno
import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from guided_diffusion_vae.training import checkpoint as ckpt
from guided_diffusion_vae.runtime import files, logger
from guided_diffusion_vae.core import script_util
from guided_diffusion_vae.runtime.errors import UserError, run_main
from guided_diffusion_vae.core.script_util import split_flags
from helpers.vae_helpers import REPO, SCRIPTS, make_image_folder, one_torch_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

TINY = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
        "--attention_resolutions", "4", "--diffusion_steps", "40"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


def _temporaries(folder):
    return sorted(n for n in os.listdir(folder) if files.is_temporary(n))


def _age(path, seconds=3600):
    """Make ``path`` (and what lies directly in it) look untouched for ``seconds``."""
    old = time.time() - seconds
    if os.path.isdir(path):
        for name in os.listdir(path):
            os.utime(os.path.join(path, name), (old, old))
    os.utime(path, (old, old))


def _pixel_folder(root):
    make_image_folder(root, classes=("user_01", "user_02"), per_class=4, size=8, channels=3)
    return root


def _tiny_flags(**overrides):
    flags = script_util.model_and_diffusion_defaults()
    flags.update(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
                 diffusion_steps=40, learn_sigma=True, **overrides)
    return flags


def _save_step(folder, step, model_config, diffusion_config, state, ema_rates=("0.9999",), training_state=True):
    """What ``TrainLoop.save`` writes for ``step``: model, EMAs, then (with
    ``training_state``) the optimizer file that completes the step."""
    meta = {"step": step, "model": model_config, "diffusion": diffusion_config, "vae": None,
            "data": {"image_size": 8, "label_map": None}, "train": {}}
    ckpt.save_weights(ckpt.model_path(folder, step), state, {**meta, "weights": "model"})
    for rate in ema_rates:
        ckpt.save_weights(ckpt.ema_path(folder, rate, step), state, {**meta, "weights": f"ema_{rate}"})
    if training_state:
        ckpt.save_training_state(ckpt.state_path(folder, step), {"step": step})


# --------------------------------------------------------------------------- #
# 13. a full disk during a save
# --------------------------------------------------------------------------- #


class _FullDisk(io.BufferedWriter):
    """A file whose writes fail as on a full disk."""

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import contextlib

    from guided_diffusion_vae.training.diffusion_training import pixel_train_defaults, pixel_training_data, run_training

    data = _pixel_folder(tmp_path / "images")
    run = tmp_path / "run"
    config = {**pixel_train_defaults(), **_tiny_flags(class_cond=True), "data_dir": str(data), "batch_size": 2,
              "num_workers": 0, "tensorboard": False, "save_interval": 2, "lr_anneal_steps": 4,
              "precision": "fp32", "log_interval": 1, "log_dir": str(run)}
    real_open = open

    def open_on_a_filling_disk(path, mode="r", *args, **kwargs):
        # The first checkpoint (step 2) fits; the disk is full by step 4.
        if "w" in mode and "000004" in os.fspath(path):
            return _FullDisk(io.FileIO(path, "w"))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(files, "open", open_on_a_filling_disk, raising=False)
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as stop, contextlib.redirect_stderr(stderr):
        run_main(lambda: run_training(config, pixel_training_data))
    logger.reset()
    assert stop.value.code != 0
    err = stderr.getvalue().strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "disk full" in err[0] and "model000004.safetensors" in err[0], err[0]
    assert "Traceback" not in "".join(err)
    # The previous checkpoint is whole and is what a resume takes; no temporary is left.
    newest = ckpt.latest_model_checkpoint(str(run))
    assert newest == ckpt.model_path(str(run), 2)
    ckpt.load_weights(newest)
    assert not os.path.exists(ckpt.model_path(str(run), 4))
    assert _temporaries(run) == []


@pytest.mark.parametrize("writer", ["torch", "safetensors"])
def test_every_writer_reports_a_full_disk_as_one_line_naming_the_file(writer, tmp_path, monkeypatch):
    """``torch.save`` to a path reports a full disk as a RuntimeError without
    errno, and safetensors' ``save_file`` as its own error: we write both."""
    target = tmp_path / ("state.pt" if writer == "torch" else "w.safetensors")
    real_open = open
    monkeypatch.setattr(files, "open", lambda path, mode="r", *a, **k: _FullDisk(io.FileIO(path, "w"))
                        if "w" in mode else real_open(path, mode, *a, **k), raising=False)
    with pytest.raises(UserError) as err:
        if writer == "torch":
            ckpt.save_training_state(str(target), {"step": 1})
        else:
            ckpt.save_weights(str(target), {"w": torch.ones(3)}, {"step": 1})
    assert "\n" not in str(err.value) and "disk full" in str(err.value) and str(target) in str(err.value)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- #
# 12. temporaries left by SIGKILL
# --------------------------------------------------------------------------- #


def test_stale_temporaries_of_any_file_are_cleared_at_the_next_write(tmp_path):
    """Left by killed writers: another step's training state, safetensors' own
    ``.tmpXXXXXX`` (older versions), a temporary folder holding one. The next
    write into the folder removes every old one; a young one, an old folder
    whose file is still being written (a live writer, e.g. another rank) and
    the user's files stay."""
    stale_state = tmp_path / ".opt000010.pt.k2j4h5g6.tmp"
    stale_safetensors = tmp_path / ".tmpAbC123"
    stale_folder = tmp_path / ".model000010.safetensors.q1w2e3r4.tmp"
    stale_folder.mkdir()
    (stale_folder / ".tmpQwErTy").write_bytes(b"x" * 100)
    young = tmp_path / ".opt000020.pt.z9y8x7w6.tmp"
    busy = tmp_path / ".latents.npy.a1b2c3d4.tmp"  # made long ago, its file written to now
    busy.mkdir()
    (busy / "latents.npy").write_bytes(b"x")
    _age(busy)
    os.utime(busy / "latents.npy")  # appended to just now: the folder's own time stays old
    users = [tmp_path / ".notes", tmp_path / "draft.tmp", tmp_path / "model000001.safetensors"]
    for path in (stale_state, stale_safetensors, young, *users):
        path.write_bytes(b"x")
    for path in (stale_state, stale_safetensors, stale_folder):
        _age(path)
    ckpt.save_training_state(str(tmp_path / "opt000030.pt"), {"step": 30})
    left = sorted(os.listdir(tmp_path))
    assert left == sorted([young.name, busy.name, "opt000030.pt", *(p.name for p in users)]), left


_KILLED_SAVER = """
import sys, torch
from guided_diffusion_vae import checkpoint as ckpt
folder, = sys.argv[1:]
big = {"w": torch.randn(6_000_000)}
for step in range(1, 10_000):
    ckpt.save_weights(ckpt.model_path(folder, step), big, {"step": step})
    ckpt.save_training_state(ckpt.state_path(folder, step), {"step": step, "w": big["w"]})
    print("saved", step, flush=True)
"""


def test_everything_a_killed_save_leaves_is_a_temporary_of_ours_and_swept(tmp_path):
    """SIGKILL at random moments of model and training-state saves: what is
    left beside the complete files is named as ours (``files.is_temporary``),
    and the next start's first write removes it once it is old."""
    import random

    rng = random.Random(0)
    run = tmp_path / "run"
    run.mkdir()
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVER, str(run)], env=_env(), stdout=subprocess.PIPE,
                                text=True, cwd=REPO)
        assert proc.stdout.readline().startswith("saved")
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        proc.wait(timeout=30)
    newest = ckpt.latest_model_checkpoint(str(run))
    leftovers = [n for n in os.listdir(run) if not n.startswith(("model", "opt"))]
    assert all(files.is_temporary(n) for n in leftovers), leftovers
    for name in leftovers:
        _age(run / name)
    files._swept_at.clear()  # a new process
    ckpt.save_training_state(str(run / "opt999999.pt"), {"step": 0})
    assert _temporaries(run) == []
    ckpt.load_weights(newest)  # the complete files are untouched


# --------------------------------------------------------------------------- #
# 11. a sampling run stopped while it writes
# --------------------------------------------------------------------------- #


def _checkpoint(path):
    flags = _tiny_flags(class_cond=True, num_classes=2)
    torch.manual_seed(0)
    model_config, diffusion_config = split_flags(flags)
    model = script_util.create_model(**model_config)
    ckpt.save_weights(str(path), model.state_dict(), {
        "step": 7, "weights": "model", "model": model_config, "diffusion": diffusion_config, "vae": None,
        "data": {"image_size": 8, "label_map": {"0": "user_01", "1": "user_02"}}, "train": {}})
    return str(path)


_SLOW_SAMPLE_WRITER = """
import runpy, sys, time
from guided_diffusion_vae import sample_io
real = sample_io.png_bytes
count = [0]
def slow_png_bytes(image):  # two samples written, the third being made
    count[0] += 1
    if count[0] == 3:
        print("writing samples", flush=True)
        time.sleep(60)
    return real(image)
sample_io.png_bytes = slow_png_bytes
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _sample_files(folder):
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                found[os.path.relpath(full, folder)] = f.read()
    return found


def test_a_sampling_run_stopped_while_writing_leaves_the_previous_samples_whole(tmp_path):
    from guided_diffusion_vae.sampling.sample_from_checkpoint import latent_sample_defaults, run_sampling

    model = _checkpoint(tmp_path / "model.safetensors")
    out = tmp_path / "samples"
    config = {**latent_sample_defaults(), "model_path": model, "output_dir": str(out), "batch_size": 8,
              "timestep_respacing": "3", "device": "cpu"}
    run_sampling({**config, "num_images_per_user": 3})
    before = _sample_files(out)
    assert len([n for n in before if "generated_" in n]) == 6

    # A rerun with other settings, SIGTERM while it writes its samples.
    args = [f"{SCRIPTS}/image_sample_vae.py", "--model_path", model, "--output_dir", str(out), "--batch_size", "8",
            "--timestep_respacing", "3", "--device", "cpu", "--num_images_per_user", "2", "--seed", "1"]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAMPLE_WRITER, *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO)
    for line in proc.stdout:
        if "writing samples" in line:
            break
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert _sample_files(out) == before  # not one file of the stopped run

    # A complete rerun replaces them all: only its own samples are there.
    run_sampling({**config, "num_images_per_user": 1})
    pngs = sorted(n for n in _sample_files(out) if "generated_" in n)
    assert pngs == ["user_01/generated_000.png", "user_02/generated_000.png"], pngs
    for name in _temporaries(tmp_path):  # the stopped run's staging folder, swept once old
        _age(tmp_path / name)
    files.remove_stale_temporaries(str(tmp_path))
    assert _temporaries(tmp_path) == []


def test_a_sample_folder_is_on_disk_before_it_is_swapped_in(tmp_path, monkeypatch):
    """Samples are written plainly into the staging folder (no temporary and
    fsync per file); every file and folder in it is fsynced before the swap,
    so a crash after it never shows empty or torn samples."""
    from guided_diffusion_vae.sampling.sample_io import save_samples_whole

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "samples"
    images = np.random.default_rng(0).integers(0, 255, (4, 8, 8, 1), dtype=np.uint8)
    save_samples_whole(str(out), images, np.array([0, 1, 0, 1]), {"0": "user_01", "1": "user_02"},
                       db_values=np.zeros((4, 8, 8), np.float32))
    swap = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == os.path.realpath(out))
    staging = events[swap][1]
    synced = {os.path.relpath(e[1], staging) for e in events[:swap]
              if e[0] == "fsync" and (e[1] + os.sep).startswith(staging + os.sep)}
    written = set(_sample_files(out))
    assert len([n for n in written if n.endswith((".png", ".npy"))]) == 9  # 4 samples x 2, the grid
    assert written <= synced, written - synced
    assert {".", "user_01", "user_02"} <= synced  # the folders' entries too
    # Plain writes: no temporary was made (and renamed) for a sample.
    assert not any(e[0] == "replace" and "generated_" in e[2] for e in events)


def test_a_sample_folder_holding_other_files_is_refused_before_any_work(tmp_path):
    from guided_diffusion_vae.sampling.sample_from_checkpoint import check_sampling_config, sample_defaults

    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    with pytest.raises(UserError, match=r"thesis.tex.*replaces its folder whole"):
        check_sampling_config({**sample_defaults(), "model_path": "x", "output_dir": str(out)})
    assert os.listdir(out) == ["thesis.tex"]


# --------------------------------------------------------------------------- #
# 15. a checkpoint step counts only when complete; stop signals through mpiexec
# --------------------------------------------------------------------------- #


def test_a_step_without_its_training_state_is_neither_resumed_nor_sampled(tmp_path):
    """A save cut off after the model and EMA files (mpiexec's SIGKILL 0.5 s
    after its SIGTERM) leaves an orphan step: resume and sampling take the
    newest complete step instead."""
    from guided_diffusion_vae.training.checkpoint import resolve_weights_file

    flags = _tiny_flags()
    model_config, diffusion_config = split_flags(flags)
    state = script_util.create_model(**model_config).state_dict()
    run = str(tmp_path)
    _save_step(run, 2, model_config, diffusion_config, state)
    _save_step(run, 4, model_config, diffusion_config, state, training_state=False)
    assert ckpt.latest_model_checkpoint(run) == ckpt.model_path(run, 2)
    assert resolve_weights_file(run) == ckpt.ema_path(run, "0.9999", 2)
    assert resolve_weights_file(run, use_ema=False) == ckpt.model_path(run, 2)
    # Weights copied alone (no training state anywhere) still stand for their newest step.
    shared = tmp_path / "shared"
    shared.mkdir()
    for name in ("model000004.safetensors", "ema_0.9999_000004.safetensors"):
        os.link(tmp_path / name, shared / name)
    assert resolve_weights_file(str(shared)) == str(shared / "ema_0.9999_000004.safetensors")


def _mpi_training(tmp_path, mpiexec, save_interval):
    data = _pixel_folder(tmp_path / "images")
    return [*mpiexec, "-n", "2", sys.executable, f"{SCRIPTS}/image_train.py", "--data_dir", str(data), *TINY,
            "--batch_size", "2", "--num_workers", "1", "--log_interval", "1", "--save_interval", str(save_interval),
            "--log_dir", str(tmp_path / "run"), "--tensorboard", "False"]


def _signal_launcher_after(cmd, env, marker, sig, timeout=240):
    """Start ``cmd`` (mpiexec), send ``sig`` to mpiexec alone once a line
    holds ``marker``; returns ``(returncode, output)``."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                break
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, "".join(lines) + rest


def test_sigusr1_to_mpiexec_saves_every_rank_and_exits_0(tmp_path, mpiexec, launch_env):
    """Open MPI's mpiexec forwards SIGUSR1 to the ranks (and their loader
    workers) and waits: the ranks agree to stop, save and exit 0."""
    code, out = _signal_launcher_after(_mpi_training(tmp_path, mpiexec, 0), launch_env, "step 2", signal.SIGUSR1)
    assert code == 0, out[-3000:]
    assert "SIGUSR1 received: saved at step" in out
    saved = ckpt.latest_model_checkpoint(str(tmp_path / "run"))
    assert saved is not None and ckpt.parse_step(saved) >= 2
    ckpt.load_weights(saved)


def test_sigterm_to_mpiexec_alone_never_leaves_an_incomplete_step_to_sample(tmp_path, mpiexec, launch_env):
    """mpiexec answers SIGTERM with SIGCONT, SIGTERM and SIGKILL to the ranks
    within 0.5 s: the run stops without its last save, but whatever step
    resume and sampling then take is complete."""
    from guided_diffusion_vae.training.checkpoint import resolve_weights_file

    _, out = _signal_launcher_after(_mpi_training(tmp_path, mpiexec, 1), launch_env, "step 3", signal.SIGTERM)
    run = str(tmp_path / "run")
    chosen = resolve_weights_file(run)
    step = ckpt.parse_step(chosen)
    assert os.path.exists(ckpt.state_path(run, step)) and os.path.exists(ckpt.model_path(run, step))
    assert ckpt.parse_step(ckpt.latest_model_checkpoint(run)) == step
    ckpt.load_weights(chosen)


# --------------------------------------------------------------------------- #
# 20. read-only output folders, as a user who may not write there
# --------------------------------------------------------------------------- #


def _unprivileged(cmd):
    """``cmd`` run as a user bound by file modes. Root writes anywhere, so as
    root the command loses the capabilities that let it (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH): a root without them obeys a folder's mode like any
    user, while still reading this interpreter and pytest's folders (0700 to
    other users, so ``runuser`` to another account could not even start it)."""
    if os.geteuid() != 0:
        return cmd
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--", *cmd]


READ_ONLY_CASES = [
    # (script, argv, what the line must name); {ro} is a read-only folder.
    ("diagnose.py", ["--model_path", "{model}", "--output_json", "{ro}/diagnosis.json", "--device", "cpu",
                     "--sampling_steps", "2", "--num_samples", "1"], "{ro}/diagnosis.json"),
    ("vae_train.py", ["--data_dir", "{images}", "--image_size", "8", "--output_dir", "{ro}/vae", "--vae_size", "tiny",
                      "--lr_anneal_steps", "1", "--batch_size", "2", "--num_workers", "0"], "{ro}/vae"),
    ("interpolate.py", ["--model_path", "{model}", "--output_dir", "{ro}/frames", "--device", "cpu"], "{ro}/frames"),
    ("image_train.py", ["--data_dir", "{images}", *TINY, "--batch_size", "2", "--lr_anneal_steps", "1",
                        "--num_workers", "0", "--log_dir", "{ro}/run"], "{ro}/run"),
    ("image_sample.py", ["--model_path", "{model}", "--output_dir", "{ro}/samples", "--timestep_respacing", "2"],
     "{ro}/samples"),
    ("benchmark.py", ["--quick", "True", "--device", "cpu", "--output_json", "{ro}/bench.json"], "{ro}/bench.json"),
    ("report.py", ["--run_dir", "{root}", "--output", "{ro}/report.html"], "{ro}/report.html"),
    ("quickstart.py", ["--run_dir", "{ro}/quick"], "{ro}/quick"),
]


def test_read_only_output_folders_are_one_line_before_any_work(tmp_path):
    import json

    root = tmp_path
    model = _checkpoint(root / "model.safetensors")
    images = _pixel_folder(root / "images")
    ro = root / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    fill = {"root": str(root), "model": model, "images": str(images), "ro": str(ro)}
    cases = [{"script": f"{SCRIPTS}/{script}", "argv": [a.format(**fill) for a in argv]}
             for script, argv, _ in READ_ONLY_CASES]
    (root / "cases.json").write_text(json.dumps(cases))
    started = time.time()
    result = subprocess.run(_unprivileged([sys.executable, f"{REPO}/tests/helpers/run_cases.py",
                                           str(root / "cases.json"), str(root / "results.json")]),
                            env=_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((root / "results.json").read_text())
    for (script, _, named), got in zip(READ_ONLY_CASES, results):
        lines = got["stderr"].strip().splitlines()
        assert got["code"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), (script, got)
        assert named.format(**fill) in lines[0] and "writable" in lines[0], (script, lines[0])
    # Refused up front: diagnose printed no report (its sampling ran not once).
    assert "OK" not in results[0]["stdout"] and "FAIL" not in results[0]["stdout"], results[0]["stdout"]
    assert time.time() - started < 120
    assert os.listdir(ro) == []


def test_a_folder_made_read_only_mid_run_is_one_line_too(tmp_path, monkeypatch):
    """What no check up front can see (permissions changed during the run)
    still ends in one line naming the file, not a traceback."""
    import contextlib

    def write_denied():
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "late.json"))

    stderr = io.StringIO()
    with pytest.raises(SystemExit) as stop, contextlib.redirect_stderr(stderr):
        run_main(write_denied)
    assert stop.value.code == 2
    assert stderr.getvalue() == f"error: cannot write {tmp_path / 'late.json'}: permission denied\n"
