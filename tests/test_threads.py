"""--threads: how many CPU threads torch gets, chosen once per process."""

import os

import pytest
import torch

from guided_diffusion_vae.runtime import dist_util
from guided_diffusion_vae.runtime.config import parse_with_config
from guided_diffusion_vae.runtime.errors import UserError
from guided_diffusion_vae.tools.quickstart import PRESETS, quickstart_defaults, run_quickstart

LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "LOCAL_WORLD_SIZE")


@pytest.fixture
def fresh_process(monkeypatch):
    """As if nothing had set the thread count yet; torch's count restored after."""
    before = torch.get_num_threads()
    monkeypatch.setattr(dist_util._Threads, "applied", None)
    for name in LOCAL_SIZE_VARS:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    torch.set_num_threads(before)


def machine(monkeypatch, cpus, load):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))


def test_automatic_choice_leaves_the_busy_cpus_alone(fresh_process):
    machine(fresh_process, cpus=8, load=2.6)
    assert dist_util.automatic_threads() == (5, "automatic: 8 CPUs available, load 3")
    machine(fresh_process, cpus=8, load=0.4)
    assert dist_util.automatic_threads()[0] == 8
    machine(fresh_process, cpus=2, load=7.0)  # overloaded: still one thread
    assert dist_util.automatic_threads()[0] == 1
    machine(fresh_process, cpus=16, load=0.0)
    fresh_process.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun, 4 ranks on this machine share the CPUs
    assert dist_util.automatic_threads() == (4, "automatic: 16 CPUs available, load 0, 4 ranks on this machine")


def test_omp_num_threads_wins_over_the_automatic_choice(fresh_process):
    machine(fresh_process, cpus=8, load=0.0)
    fresh_process.setenv("OMP_NUM_THREADS", "3")
    assert dist_util.automatic_threads() == (3, "OMP_NUM_THREADS")
    assert dist_util.set_threads(0) == "threads: 3 (OMP_NUM_THREADS)"
    assert torch.get_num_threads() == 3


def test_a_count_is_applied_and_logged_once(fresh_process):
    machine(fresh_process, cpus=4, load=1.0)
    lines = []
    assert dist_util.set_threads(0, lines.append) == "threads: 3 (automatic: 4 CPUs available, load 1)"
    assert torch.get_num_threads() == 3
    # Later automatic calls (a pipeline's stages) keep it, even when the load has grown.
    machine(fresh_process, cpus=4, load=3.0)
    assert dist_util.set_threads(0, lines.append) is None and torch.get_num_threads() == 3
    assert dist_util.set_threads(2, lines.append) == "threads: 2 (--threads)"
    assert dist_util.set_threads(2, lines.append) is None
    assert lines == ["threads: 3 (automatic: 4 CPUs available, load 1)", "threads: 2 (--threads)"]
    with pytest.raises(UserError, match=r"threads must be an integer >= 0 \(0: automatic\), got -1"):
        dist_util.set_threads(-1)


def test_threads_flag_sets_torchs_thread_count(fresh_process, tmp_path):
    """--threads N of the quickstart holds for every stage (here the first)."""
    preset = {**PRESETS["tiny"], "num_users": 2, "train_per_user": 2, "test_per_user": 1, "image_size": 32}
    config = parse_with_config(quickstart_defaults(), ["--threads", "2", "--run_dir", str(tmp_path / "qs"),
                                                       "--workers", "1", "--until", "data"])
    run_quickstart(config, preset=preset)
    assert torch.get_num_threads() == 2
    log = (tmp_path / "qs" / "logs" / "log.txt").read_text()
    assert log.count("threads: 2 (--threads)") == 1
