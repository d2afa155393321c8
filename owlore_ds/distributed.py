"""Process-group setup for every launcher, and the few collectives the trainer uses.

The deepspeed launcher and torchrun set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*.
mpirun does not: MPICH sets PMI_RANK/PMI_SIZE/MPI_LOCALRANKID and Open MPI sets
OMPI_COMM_WORLD_*; `srun` sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; we map those.
A plain `python launch/train.py` is one rank.
"""

from __future__ import annotations

import glob
import os
import re
import socket
from datetime import timedelta
from typing import Any, Callable, Optional, TypeVar

import torch

from owlore_ds.errors import RunFailure, UserInputError

T = TypeVar("T")

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


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a SLURM node list, in order, without `scontrol show hostnames`.

    Handles comma-separated entries, bracketed ranges and lists with zero padding
    (`node[01-04,07],gpu-a3` -> node01..node04, node07, gpu-a3), and several bracket
    groups in one name (`r[1-2]n[1-2]` -> r1n1, r1n2, r2n1, r2n2).
    """
    hosts: list[str] = []
    for entry in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_host(entry, nodelist))
    if not hosts:
        raise UserInputError(f"SLURM_JOB_NODELIST {nodelist!r}: no host names")
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Splits at the commas that are not inside brackets."""
    entries, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            entries.append(text[start:i])
            start = i + 1
    entries.append(text[start:])
    return [e.strip() for e in entries if e.strip()]


def _expand_host(entry: str, nodelist: str) -> list[str]:
    match = re.search(r"\[([^\[\]]*)\]", entry)
    if match is None:
        if "[" in entry or "]" in entry:
            raise UserInputError(f"SLURM_JOB_NODELIST {nodelist!r}: unbalanced brackets in {entry!r}")
        return [entry]
    prefix, suffix = entry[: match.start()], entry[match.end():]
    names = []
    for part in match.group(1).split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()) or (high and int(high) < int(low)):
            raise UserInputError(f"SLURM_JOB_NODELIST {nodelist!r}: bad range {part!r}")
        width = len(low)  # node[01-10]: numbers keep the padding of the first bound
        for number in range(int(low), int(high or low) + 1):
            names.append(f"{number:0{width}d}")
    # Later bracket groups of the same name (r[1-2]n[1-2]) are expanded recursively.
    return [host for name in names for host in _expand_host(prefix + name + suffix, nodelist)]


def _slurm_port(environ: dict[str, str]) -> str:
    """A port derived from the job id, so that two jobs sharing a node do not collide."""
    job = environ.get("SLURM_JOB_ID", "")
    return str(20000 + int(job) % 20000) if job.isdigit() else "29500"


def map_launcher_env(environ: dict[str, str] = os.environ) -> None:
    """Fills RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for any launcher.

    Precedence: variables a launcher already set (torchrun, deepspeed), then MPI's, then
    SLURM's. MPI comes before SLURM because an `mpirun` inside an sbatch script inherits the
    batch script's SLURM_PROCID=0 in every rank; only `srun` sets SLURM_PROCID per task.
    """
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        if not _map_mpi(environ) and not _map_slurm(environ):
            environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            environ.setdefault("MASTER_ADDR", "127.0.0.1")
            environ.setdefault("MASTER_PORT", str(free_port()))
    environ.setdefault("LOCAL_RANK", "0")
    if "MASTER_ADDR" not in environ:
        raise UserInputError("MASTER_ADDR is not set: export rank 0's host name to every rank of a multi-node job")


def _map_mpi(environ: dict[str, str]) -> bool:
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
            return True
    return False


def _map_slurm(environ: dict[str, str]) -> bool:
    """srun: one process per task. Rank 0 is the step's first task, which SLURM places on the
    first host of the step's node list (the job's node list outside a step)."""
    if "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return False
    environ["RANK"] = environ["SLURM_PROCID"]
    environ["WORLD_SIZE"] = environ["SLURM_NTASKS"]
    environ.setdefault("LOCAL_RANK", environ.get("SLURM_LOCALID", "0"))
    environ.setdefault("NODE_RANK", environ.get("SLURM_NODEID", "0"))  # for logs; node-local work keys on LOCAL_RANK
    if "MASTER_ADDR" not in environ:
        nodelist = next((environ[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                         if environ.get(k)), None)
        if nodelist is None:
            raise UserInputError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not: export MASTER_ADDR "
                                 "(rank 0's host) to every task")
        environ["MASTER_ADDR"] = expand_nodelist(nodelist)[0]
    environ.setdefault("MASTER_PORT", _slurm_port(environ))
    return True


def select_accelerator() -> None:
    """Runs on CPU (gloo) by itself when there is no GPU. Must precede `import deepspeed`."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def init(timeout_s: float = 1800) -> None:
    """Maps the launcher's variables and starts the process group on the accelerator's backend.

    `timeout_s` bounds every collective (--ddp_timeout): a rank that died or hangs makes the
    others fail after that long instead of waiting forever.
    """
    map_launcher_env()
    select_accelerator()
    import deepspeed
    from torch.distributed import distributed_c10d

    timeout = timedelta(seconds=timeout_s)
    # Groups created later with no timeout of their own (DeepSpeed's new_group calls) take
    # torch's module defaults, read at creation time: make them ours too.
    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_init_required=True, timeout=timeout)
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
    """Every rank's `obj`, in rank order (small objects only: it pickles them)."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def on_main(work: Callable[[], T], what: str) -> Optional[T]:
    """Runs `work` on rank 0 while the others wait; when it fails, every rank fails with its
    reason (rank 0 re-raises the error itself) instead of the others waiting in a collective."""
    result, error, reason = None, None, None
    if is_main():
        try:
            result = work()
        except Exception as exc:
            error = exc
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    reason = broadcast_object(reason)  # also the others' wait for rank 0
    if error is not None:
        raise error
    if reason is not None:
        raise RunFailure(f"{what} failed on rank 0: {reason}")
    return result


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
