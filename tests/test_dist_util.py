"""dist_util: single-process behaviour in this process, and real 2-process jobs
started with mpiexec and with torchrun (tests/helpers/dist_check.py)."""

import os
import subprocess
import sys

import pytest
import torch

from guided_diffusion_vae.runtime import dist_util
from guided_diffusion_vae.runtime.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(REPO, "tests", "helpers", "dist_check.py")

LAUNCH_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
    "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
    "PMI_SIZE", "PMI_RANK", "PMIX_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS",
)


@pytest.fixture
def single(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    dist_util.cleanup()
    yield
    dist_util.cleanup()


def test_single_process_helpers(single, tmp_path):
    had_mpi = "mpi4py" in sys.modules
    device = dist_util.setup_dist()
    assert dist_util.setup_dist() == device  # idempotent
    if not had_mpi:
        assert "mpi4py" not in sys.modules, "setup_dist imported mpi4py without an MPI launcher"
    assert not torch.distributed.is_initialized()
    assert dist_util.launcher() == "single"
    assert (dist_util.rank(), dist_util.world_size(), dist_util.local_rank()) == (0, 1, 0)
    assert dist_util.is_main() and not dist_util.is_distributed()
    assert device == dist_util.dev() == torch.device("cpu")
    dist_util.barrier()

    params = [torch.randn(3, 2), torch.arange(4)]
    before = [p.clone() for p in params]
    dist_util.sync_params(params)
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    obj = {"a": [1, 2]}
    assert dist_util.broadcast_object(obj) is obj

    path = tmp_path / "blob.bin"
    payload = os.urandom(1000) + b"\x00end"
    path.write_bytes(payload)
    assert dist_util.read_file_once(path) == payload
    assert dist_util.read_file_once(str(path)) == payload

    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError, match="nope.pt") as info:
        dist_util.read_file_once(missing)
    assert str(missing) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError, match="directory"):
        dist_util.read_file_once(tmp_path)


def test_rank_from_env_before_setup(single, monkeypatch):
    # Before setup_dist (e.g. the logger configured early) the launcher's env answers.
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    assert (dist_util.rank(), dist_util.world_size(), dist_util.local_rank()) == (3, 4, 1)
    assert dist_util.launcher() == "mpi" and not dist_util.is_main()
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert (dist_util.rank(), dist_util.world_size(), dist_util.local_rank()) == (5, 8, 2)
    assert dist_util.launcher() == "torchrun"


def test_torchrun_env_without_master_is_an_error(single, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="MASTER_ADDR"):
        dist_util.setup_dist()


def _check_two_ranks(result, launcher):
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for r in (0, 1):
        assert f"DIST_OK rank={r} world=2 launcher={launcher}" in result.stdout, output[-4000:]


@pytest.fixture(scope="module")
def payload_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "weights.bin"
    path.write_bytes(os.urandom(300_000))
    return str(path)


def test_mpiexec_two_ranks(payload_file, mpiexec, launch_env):
    cmd = [*mpiexec, "-n", "2", sys.executable, HELPER, "mpi", payload_file]
    result = subprocess.run(cmd, env=launch_env, capture_output=True, text=True, timeout=180, cwd=REPO)
    _check_two_ranks(result, "mpi")


def test_torchrun_two_ranks(payload_file, launch_env):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        HELPER, "torchrun", payload_file,
    ]
    result = subprocess.run(cmd, env=launch_env, capture_output=True, text=True, timeout=180, cwd=REPO)
    _check_two_ranks(result, "torchrun")


def test_convolutions_are_autotuned_on_cuda_devices_only():
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        dist_util.autotune_convolutions(torch.device("cpu"))
        assert torch.backends.cudnn.benchmark is False
        dist_util.autotune_convolutions(torch.device("cuda", 0))  # a device name needs no GPU
        assert torch.backends.cudnn.benchmark is True
        dist_util.autotune_convolutions(torch.device("cuda", 0), False)  # the diffusion trainer's choice
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before
