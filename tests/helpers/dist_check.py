"""Launched by tests/test_dist_util.py under mpiexec or torchrun (2 processes).

Checks the collectives of guided_diffusion_vae.runtime.dist_util across real processes
and prints one ``DIST_OK`` line per rank; any failure exits non-zero.
usage: dist_check.py EXPECTED_LAUNCHER DATA_FILE
"""

import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from guided_diffusion_vae.runtime import dist_util, logger
from guided_diffusion_vae.runtime.errors import UserError


def main() -> None:
    expected_launcher, data_file = sys.argv[1], sys.argv[2]
    env_local = None
    if expected_launcher == "mpi":
        # Hide the launcher's local rank: setup_dist must find it with an MPI
        # shared-memory split instead.
        env_local = int(os.environ.pop("OMPI_COMM_WORLD_LOCAL_RANK"))
    device = dist_util.setup_dist()
    r, w = dist_util.rank(), dist_util.world_size()
    assert dist_util.launcher() == expected_launcher, dist_util.launcher()
    if expected_launcher == "torchrun":
        assert "mpi4py" not in sys.modules, "mpi4py imported under torchrun"
    assert w == 2, w
    assert dist.is_initialized() and dist.get_rank() == r and dist.get_world_size() == w
    assert dist_util.is_main() == (r == 0)
    assert dist_util.local_rank() == r, (dist_util.local_rank(), r)  # one host
    if env_local is not None:
        assert dist_util.local_rank() == env_local
    assert device == torch.device("cpu") and dist.get_backend() == "gloo"

    # all-reduce
    t = torch.tensor([float(r + 1), 10.0 * (r + 1)])
    dist.all_reduce(t)
    assert t.tolist() == [3.0, 30.0], t

    # sync_params: different random init per rank, equal (rank 0's) afterwards
    torch.manual_seed(1234 + r)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
    model[1].running_mean.normal_()
    before = [p.detach().clone() for p in model.state_dict().values()]
    ref = dist_util.broadcast_object(before)  # rank 0's initial values
    if r == 1:
        assert not all(torch.equal(a, b) for a, b in zip(before, ref)), "inits were equal already"
    dist_util.sync_params(model.state_dict().values())
    after = [p.detach().clone() for p in model.state_dict().values()]
    for a, b in zip(after, ref):
        assert torch.equal(a, b), "sync_params did not copy rank 0's values"
    flat = torch.cat([a.float().reshape(-1) for a in after])
    gathered = [torch.empty_like(flat) for _ in range(w)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1])

    # broadcast_object
    got = dist_util.broadcast_object({"from": r, "list": [r] * 3})
    assert got == {"from": 0, "list": [0, 0, 0]}, got

    # read_file_once: same bytes everywhere, equal to the file
    data = dist_util.read_file_once(data_file)
    with open(data_file, "rb") as fh:
        assert data == fh.read()
    digests = [None] * w
    dist.all_gather_object(digests, hashlib.sha256(data).hexdigest())
    assert digests[0] == digests[1]

    # a missing file raises on every rank (no hang)
    missing = data_file + ".does-not-exist"
    try:
        dist_util.read_file_once(missing)
    except UserError as err:
        assert missing in str(err), err
    else:
        raise AssertionError("no UserError for a missing file")

    # logger across ranks: count-weighted means gathered to rank 0, which alone writes
    if expected_launcher == "mpi":
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    else:
        comm = "torch"
    logdir = os.path.join(os.path.dirname(data_file), f"logs_{expected_launcher}")
    logger.configure(dir=logdir, format_strs=["csv"], comm=comm)
    for _ in range(r + 1):  # rank 0 logs 1.0 once, rank 1 logs 2.0 twice
        logger.logkv_mean("x", torch.tensor(float(r + 1)))
    logger.logkv("from_rank", r)
    dumped = logger.dumpkvs()
    if r == 0:
        assert abs(dumped["x"] - 5.0 / 3.0) < 1e-9, dumped
        assert dumped["from_rank"] == 0.5, dumped  # plain values: equal weights
    else:
        assert dumped == {}, dumped
    dist_util.barrier()
    assert sorted(os.listdir(logdir)) == ["progress.csv"], os.listdir(logdir)
    logger.get_current().close()

    dist_util.barrier()
    print(f"DIST_OK rank={r} world={w} launcher={dist_util.launcher()} bytes={len(data)}", flush=True)
    dist_util.cleanup()
    assert not dist.is_initialized()


if __name__ == "__main__":
    main()
