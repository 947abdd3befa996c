"""Process groups: one code path for mpiexec, torchrun and a plain single process.

How a script is started decides how :func:`setup_dist` joins the others:

``mpiexec -n N python scripts/train.py ...``
    mpi4py (imported only in this case) tells each process its rank and the
    world size. Rank 0 chooses the rendezvous address and a free TCP port and
    sends both to everybody over MPI; every rank then exports ``MASTER_ADDR`` /
    ``MASTER_PORT`` and calls ``torch.distributed.init_process_group``
    (``env://``). The local rank (which GPU to use) comes from the launcher's
    environment (``OMPI_COMM_WORLD_LOCAL_RANK``, ``MPI_LOCALRANKID``,
    ``MV2_COMM_WORLD_LOCAL_RANK``, ``PMI_LOCAL_RANK``, ``PALS_LOCAL_RANKID``,
    ``SLURM_LOCALID``) or, failing that, from an MPI shared-memory split.
    A ``MASTER_ADDR`` / ``MASTER_PORT`` already in the environment is respected.

``torchrun --nproc_per_node G scripts/train.py ...``
    torchrun exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
    and ``MASTER_PORT``; the group is created from them (``env://``). MPI is
    never touched.

``python scripts/train.py ...``
    No process group is created. ``rank()`` is 0, ``world_size()`` is 1 and every
    helper below (``barrier``, ``sync_params``, ``broadcast_object``,
    ``read_file_once``) works as the trivial single-process case.

Backend: NCCL when CUDA is available (each rank uses ``cuda:<local_rank>``,
made current with ``torch.cuda.set_device`` before the group exists), gloo on
CPU. ``setup_dist(backend="gloo")`` forces a backend.

Several machines work the same way:

* MPI: ``mpiexec -n 16 --hostfile hosts --map-by ppr:8:node python scripts/train.py``
  (a host file lists one machine per line, e.g. ``node1 slots=8``). All ranks on
  one host rendezvous over 127.0.0.1; across hosts rank 0 announces the address
  of the interface that routes to the other nodes. Set ``MASTER_ADDR`` yourself
  if that guess is wrong, and ``NCCL_SOCKET_IFNAME`` / ``GLOO_SOCKET_IFNAME`` when
  the machines have several networks.
* torchrun: on every node
  ``torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d
  --rdzv_endpoint node1:29500 scripts/train.py`` (or ``--node_rank`` with
  ``--master_addr``/``--master_port``).
"""

from __future__ import annotations

import atexit
import io
import os
import signal
import socket
import time
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist

from .errors import UserError, check_number, main_failed, shown

__all__ = [
    "setup_dist",
    "rank",
    "world_size",
    "local_rank",
    "is_main",
    "is_distributed",
    "launcher",
    "dev",
    "barrier",
    "sync_params",
    "broadcast_object",
    "read_file_once",
    "cleanup",
    "threads_defaults",
    "check_threads",
    "set_threads",
]

# Environment variables that different MPI launchers export.
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
_MPI_LOCAL_RANK_VARS = (
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "MV2_COMM_WORLD_LOCAL_RANK",
    "PMI_LOCAL_RANK",
    "PALS_LOCAL_RANKID",
    "SLURM_LOCALID",
)

# Broadcasting big files goes in pieces of this many bytes (bounds the extra
# GPU memory NCCL needs for it).
_CHUNK_BYTES = 256 * 1024 * 1024
# sync_params packs tensors into flat buffers of about this size.
_BUCKET_BYTES = 64 * 1024 * 1024


class _State:
    def __init__(self) -> None:
        self.ready = False  # setup_dist has run
        self.launcher = "single"  # "single" | "mpi" | "torchrun"
        self.rank = 0
        self.world = 1
        self.local_rank = 0
        self.backend: Optional[str] = None
        self.owns_group = False  # we created the process group (so cleanup destroys it)


_state = _State()


# --------------------------------------------------------------------------- #
# launcher detection
# --------------------------------------------------------------------------- #


def _first_int(names: Iterable[str]) -> Optional[int]:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                continue
    return None


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _launched_by_mpi() -> bool:
    return _first_int(_MPI_SIZE_VARS) is not None


def _detect_launcher() -> str:
    if _launched_by_torchrun():
        return "torchrun"
    if _launched_by_mpi():
        return "mpi"
    return "single"


def _env_rank() -> int:
    if _launched_by_torchrun():
        return int(os.environ["RANK"])
    value = _first_int(_MPI_RANK_VARS)
    return 0 if value is None else value


def _env_world() -> int:
    if _launched_by_torchrun():
        return int(os.environ["WORLD_SIZE"])
    value = _first_int(_MPI_SIZE_VARS)
    return 1 if value is None else value


def _env_local_rank() -> Optional[int]:
    if _launched_by_torchrun() and "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return _first_int(_MPI_LOCAL_RANK_VARS)


# --------------------------------------------------------------------------- #
# setup / teardown
# --------------------------------------------------------------------------- #


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _pick_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _routable_address(peer_host: Optional[str]) -> str:
    """This host's address as the other nodes should see it."""
    if peer_host is not None:
        # Ask the kernel which local interface routes to a peer (a UDP
        # "connect" sends no packet).
        try:
            peer_ip = socket.gethostbyname(peer_host)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((peer_ip, 9))
                local_ip = probe.getsockname()[0]
            if not local_ip.startswith("127."):
                return local_ip
        except OSError:
            pass
    try:
        return socket.gethostbyname(socket.getfqdn())
    except OSError:
        return socket.gethostname()


def _mpi_rendezvous(comm) -> tuple[str, str]:
    """Rank 0 decides MASTER_ADDR/MASTER_PORT and tells the rest over MPI."""
    host = socket.gethostname()
    hosts = comm.allgather(host)
    answer = None
    if comm.Get_rank() == 0:
        addr = os.environ.get("MASTER_ADDR")
        if not addr:
            others = [h for h in hosts if h != host]
            addr = "127.0.0.1" if not others else _routable_address(others[0])
        port = os.environ.get("MASTER_PORT") or str(_pick_free_port())
        answer = (addr, port)
    return comm.bcast(answer, root=0)


def _mpi_local_rank(comm) -> int:
    value = _env_local_rank()
    if value is not None:
        return value
    from mpi4py import MPI

    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return node_comm.Get_rank()
    finally:
        node_comm.Free()


def setup_dist(backend: Optional[str] = None) -> torch.device:
    """Join the other processes (see the module docstring); returns :func:`dev`.

    Safe to call more than once. Under a single process nothing is started.
    """
    if _state.ready:
        return dev()

    launcher = _detect_launcher()
    if launcher == "mpi":
        try:
            from mpi4py import MPI
        except ImportError as err:
            if _env_world() > 1:
                raise UserError(
                    f"started by an MPI launcher with {_env_world()} processes but mpi4py "
                    f"cannot be imported ({err}); pip install mpi4py, or launch with torchrun"
                ) from err
            launcher = "single"
        else:
            comm = MPI.COMM_WORLD
            _state.rank = comm.Get_rank()
            _state.world = comm.Get_size()
            _state.local_rank = _mpi_local_rank(comm)
            if _state.world == 1:
                launcher = "single"
            else:
                addr, port = _mpi_rendezvous(comm)
                os.environ["MASTER_ADDR"] = addr
                os.environ["MASTER_PORT"] = port
                os.environ["RANK"] = str(_state.rank)
                os.environ["WORLD_SIZE"] = str(_state.world)
                os.environ["LOCAL_RANK"] = str(_state.local_rank)
    elif launcher == "torchrun":
        _state.rank = int(os.environ["RANK"])
        _state.world = int(os.environ["WORLD_SIZE"])
        _state.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            if _state.world == 1:
                launcher = "single"
            else:
                raise UserError(
                    "RANK and WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not; "
                    "start the job with torchrun (or export them)"
                )

    if launcher == "single":
        _state.rank, _state.world = 0, 1
        _state.local_rank = _state.local_rank if torch.cuda.is_available() else 0

    _state.launcher = launcher
    _state.backend = backend or _default_backend()

    if torch.cuda.is_available():
        torch.cuda.set_device(dev())

    if launcher != "single":
        if dist.is_initialized():
            # Somebody (a test harness, an outer framework) already did it.
            _state.backend = dist.get_backend()
            _state.owns_group = False
        else:
            dist.init_process_group(
                backend=_state.backend,
                init_method="env://",
                rank=_state.rank,
                world_size=_state.world,
            )
            _state.owns_group = True
            atexit.unregister(_leave_group_at_exit)
            atexit.register(_leave_group_at_exit)
    _state.ready = True
    return dev()


# Signals that ask a run to save and stop. SIGTERM: what SLURM, docker and
# Kubernetes send the whole process group. SIGINT: Ctrl-C. SIGUSR1: what to
# send Open MPI's mpiexec, which forwards it to every rank and waits; mpiexec
# answers SIGTERM itself by signalling the ranks SIGCONT, SIGTERM 0.25 s later
# and SIGKILL 0.25 s after that (PRRTE 3, no setting changes it), too soon
# for a save. SLURM's ``--signal=USR1@SECONDS`` sends it before a time limit.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def threads_defaults() -> dict:
    """The ``threads`` flag of every script that computes."""
    return {"threads": 0}


FLAG_HELP = {
    "threads": "CPU threads of torch's operations (0: OMP_NUM_THREADS if set, else the CPUs this process may "
               "use minus the load already on them, shared among this machine's ranks)",
}


class _Threads:
    # (count, reason) that set_threads applied last in this process; None: not yet.
    applied: Optional[tuple] = None


def automatic_threads() -> tuple:
    """``(count, reason)`` of ``--threads 0``. OpenMP threads that outnumber
    the free cores spin against each other and make small ops many times
    slower, so the cores other programs keep busy are left to them."""
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        load = round(os.getloadavg()[0])
    except (AttributeError, OSError):
        load = 0
    ranks = max(1, _first_int(("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "LOCAL_WORLD_SIZE")) or _state.world)
    reason = f"automatic: {cpus} CPUs available, load {load}"
    if ranks > 1:
        reason += f", {ranks} ranks on this machine"
    return max(1, (cpus - load) // ranks), reason


def check_threads(requested) -> int:
    """``--threads`` if it is a count (0: automatic), else a UserError; for
    programs that write something before :func:`set_threads` runs."""
    return int(check_number("threads", requested, 0, integer=True, note=" (0: automatic)"))


def set_threads(requested: int = 0, log=None) -> Optional[str]:
    """Set torch's CPU thread count for ``--threads requested`` and pass the
    one-line account of it to ``log``; returns that line, or None when the
    count already in force stays.

    0 keeps a count this process chose earlier (a pipeline's stages then share
    its choice; measured later, the load would include this process's own
    work), else takes :func:`automatic_threads`.
    """
    if check_threads(requested) > 0:
        choice = (int(requested), "--threads")
    elif _Threads.applied is not None:
        return None
    else:
        choice = automatic_threads()
    if choice == _Threads.applied and torch.get_num_threads() == choice[0]:
        return None
    torch.set_num_threads(choice[0])
    _Threads.applied = choice
    line = f"threads: {choice[0]} ({choice[1]})"
    if log is not None:
        log(line)
    return line


def _leave_group_at_exit() -> None:
    """Destroy our process group while the interpreter is still whole. Left
    to interpreter shutdown, gloo's worker threads may release Python tensors
    after Python is gone and abort the process (exit 134 after a good run).
    Skipped after a failure: peers may be gone and the teardown could wait."""
    if not main_failed():
        # Once a model is wrapped in DDP the group outlives its destruction, so
        # gloo's threads live on. One that is still waiting for the GIL to
        # release the last collective's tensors (the closing weight check)
        # aborts the process when shutdown begins (exit 134; seen once in CI).
        # Sleeping releases the GIL, so such a thread finishes first.
        time.sleep(0.05)
        cleanup()


def cleanup() -> None:
    """Leave the process group (if this module made one) and forget the setup."""
    if _state.owns_group and dist.is_initialized():
        dist.destroy_process_group()
    _state.__init__()


# --------------------------------------------------------------------------- #
# queries
# --------------------------------------------------------------------------- #


def _group_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """True when a process group with more than one member is running."""
    return _group_active() and dist.get_world_size() > 1


def launcher() -> str:
    """How this process was started: ``"mpi"``, ``"torchrun"`` or ``"single"``."""
    return _state.launcher if _state.ready else _detect_launcher()


def rank() -> int:
    """This process's global rank (0 when single). Before setup_dist: from the launcher's env."""
    if _group_active():
        return dist.get_rank()
    if _state.ready:
        return _state.rank
    return _env_rank()


def world_size() -> int:
    """Number of processes in the job (1 when single)."""
    if _group_active():
        return dist.get_world_size()
    if _state.ready:
        return _state.world
    return _env_world()


def local_rank() -> int:
    """Rank among the processes on this machine (selects the GPU)."""
    if _state.ready:
        return _state.local_rank
    value = _env_local_rank()
    return 0 if value is None else value


def is_main() -> bool:
    """True on rank 0."""
    return rank() == 0


def dev() -> torch.device:
    """This rank's device: ``cuda:<local_rank>`` when CUDA is available, else cpu."""
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return torch.device("cuda", local_rank() % max(count, 1))
    return torch.device("cpu")


def autotune_convolutions(device: torch.device, enabled: bool = True) -> None:
    """On a CUDA ``device``, whether cuDNN times its convolution algorithms
    once per shape and keeps the fastest. It pays where every batch has the
    same shape and the timing is soon repaid: sampling, VAE training and
    encoding turn it on. The diffusion trainer turns it off: its step gained
    nothing (docs/BENCHMARKS.md) and the timing added 5 s to its first step.
    A process-wide setting, so each stage of a quickstart sets its own."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(enabled)


def _comm_device() -> torch.device:
    """Where tensors must live for the active backend's collectives."""
    if _group_active() and dist.get_backend() == "nccl":
        return dev()
    return torch.device("cpu")


# --------------------------------------------------------------------------- #
# collectives
# --------------------------------------------------------------------------- #


def barrier() -> None:
    """Wait for every rank (no-op when single)."""
    if not _group_active():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[dev().index])
    else:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (any picklable object)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_gather_objects(obj: Any) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` alone)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def sync_params(params: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite every tensor in ``params`` with rank ``src``'s values, in place.

    Accepts parameters or buffers (``model.parameters()``, ``model.state_dict().values()``).
    Tensors are packed into flat buckets per (device, dtype), so a large model
    costs a few broadcasts rather than one per tensor. No-op when single.
    """
    if not is_distributed():
        return
    tensors = [p.data if isinstance(p, torch.nn.Parameter) else p for p in params]
    comm_dev = _comm_device()
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    # Fixed order on every rank (dicts keep insertion order; the input order is
    # the same everywhere).
    for (_, _), members in groups.items():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in members:
            bucket.append(t)
            size += t.numel() * t.element_size()
            if size >= _BUCKET_BYTES:
                _broadcast_bucket(bucket, src, comm_dev)
                bucket, size = [], 0
        if bucket:
            _broadcast_bucket(bucket, src, comm_dev)


def _broadcast_bucket(bucket: list[torch.Tensor], src: int, comm_dev: torch.device) -> None:
    flat = torch.cat([t.reshape(-1) for t in bucket]).to(comm_dev)
    dist.broadcast(flat, src=src)
    offset = 0
    for t in bucket:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view(t.shape))
        offset += n


def _read_local(path: str) -> bytes:
    if "://" in str(path):
        import blobfile

        with blobfile.BlobFile(str(path), "rb") as handle:
            return handle.read()
    with open(path, "rb") as handle:
        return handle.read()


def _read_error(path: str, err: BaseException) -> str:
    if isinstance(err, FileNotFoundError):
        return f"file not found: {path}"
    if isinstance(err, IsADirectoryError):
        return f"expected a file, got a directory: {path}"
    reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return f"cannot read {path}: {reason}"


def read_file_once(path: str | os.PathLike) -> bytes:
    """The bytes of ``path``, read from disk by rank 0 only and sent to the rest.

    Useful for checkpoints on shared file systems (one read instead of N). If
    rank 0 cannot read the file, every rank raises :class:`UserError` naming it.
    """
    path = os.fspath(path)
    if not is_distributed():
        try:
            return _read_local(path)
        except OSError as err:
            raise UserError(_read_error(path, err)) from None

    data = b""
    header: tuple[Optional[str], int] = (None, 0)
    if rank() == 0:
        try:
            data = _read_local(path)
            header = (None, len(data))
        except OSError as err:
            header = (_read_error(path, err), 0)
    header = broadcast_object(header)
    problem, length = header
    if problem is not None:
        raise UserError(problem)

    comm_dev = _comm_device()
    if rank() == 0:
        out = data
        view = memoryview(data)
    else:
        buffer = bytearray(length)
        view = memoryview(buffer)
    for start in range(0, length, _CHUNK_BYTES):
        stop = min(start + _CHUNK_BYTES, length)
        if rank() == 0:
            chunk = torch.frombuffer(bytearray(view[start:stop]), dtype=torch.uint8).to(comm_dev)
        else:
            chunk = torch.empty(stop - start, dtype=torch.uint8, device=comm_dev)
        dist.broadcast(chunk, src=0)
        if rank() != 0:
            view[start:stop] = chunk.cpu().numpy().tobytes()
    if rank() != 0:
        out = bytes(buffer)
    return out


def load_state_dict(path: str | os.PathLike, **kwargs) -> Any:
    """``torch.load`` of a file read once by rank 0 (see :func:`read_file_once`)."""
    data = read_file_once(path)
    return torch.load(io.BytesIO(data), **kwargs)


# The --device flag's description, for every script that has one (FLAG_HELP).
DEVICE_HELP = "where to compute: auto (the GPU when there is one), cpu, cuda or cuda:N"


def pick_device(name):
    """A ``--device`` flag as a torch device: ``auto`` is the GPU when there is
    one; a CUDA device asked for where there is none is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {shown(name)} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {shown(name)} asked for, but CUDA is not available here")
    return device
