"""Process-group setup for every launcher, and the few collectives the trainer uses.

The deepspeed launcher and torchrun set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*.
mpirun does not: MPICH sets PMI_RANK/PMI_SIZE/MPI_LOCALRANKID and Open MPI sets
OMPI_COMM_WORLD_*; we map those. A plain `python launch/train.py` is one rank.
"""

from __future__ import annotations

import glob
import os
import socket
from typing import Any

import torch

from owlore_ds.errors import UserInputError

_MPI_ENV = (
    # (rank, size, local rank, local size) variable names
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)


def free_port() -> int:
    """A TCP port free on this host now (for a launcher's --master_port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def map_launcher_env(environ: dict[str, str] = os.environ) -> None:
    """Fills RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for any launcher."""
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        for rank_key, size_key, local_key, local_size_key in _MPI_ENV:
            if rank_key in environ:
                environ["RANK"] = environ[rank_key]
                environ["WORLD_SIZE"] = environ[size_key]
                environ.setdefault("LOCAL_RANK", environ.get(local_key, "0"))
                single_node = environ.get(local_size_key) == environ[size_key]
                if single_node:
                    environ.setdefault("MASTER_ADDR", "127.0.0.1")
                # Multi-node MPI jobs must export MASTER_ADDR (rank 0's host), e.g.
                # `mpirun -genv MASTER_ADDR node0` (MPICH) or `-x MASTER_ADDR` (Open MPI).
                environ.setdefault("MASTER_PORT", "29500")
                break
        else:
            environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            environ.setdefault("MASTER_ADDR", "127.0.0.1")
            environ.setdefault("MASTER_PORT", str(free_port()))
    environ.setdefault("LOCAL_RANK", "0")
    if "MASTER_ADDR" not in environ:
        raise UserInputError("MASTER_ADDR is not set: export rank 0's host name to every rank of a multi-node job")


def select_accelerator() -> None:
    """Runs on CPU (gloo) by itself when there is no GPU. Must precede `import deepspeed`."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def init() -> None:
    """Maps the launcher's variables and starts the process group on the accelerator's backend."""
    map_launcher_env()
    select_accelerator()
    import deepspeed

    deepspeed.init_distributed(dist_init_required=True)
    from deepspeed.accelerator import get_accelerator

    get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def _comm_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Reduces a few scalars over all ranks (sum or max) in one collective."""
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    if world_size() > 1:
        reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
        torch.distributed.all_reduce(tensor, op=reduce_op)
    return tensor.tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if world_size() == 1:
        return obj
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=src, device=_comm_device())
    return holder[0]


def all_gather_object(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order (small objects: names, plans)."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def all_agree(ok: bool) -> bool:
    """True when every rank passes True; lets ranks fail together instead of hanging."""
    return all_reduce([0.0 if ok else 1.0], op="max")[0] == 0.0


def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    remove_shm_buffers(os.environ.get("MASTER_PORT", ""), os.environ.get("RANK", "*"))


def remove_shm_buffers(port: str | int, rank: str | int = "*") -> None:
    """Deletes DeepSpeed's CPU shared-memory all-reduce files of `port` (one rank's, or all).

    DeepSpeed leaves a 66 MB RAM-backed file per rank and port in /dev/shm, even after a
    clean exit; a CPU user running many jobs (or a sweep of runs that die) fills memory.
    """
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_{rank}"):
        try:
            os.remove(path)
        except OSError:
            pass
