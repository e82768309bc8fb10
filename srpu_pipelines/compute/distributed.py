"""Data-parallel training across processes (``torchrun``): gloo on CPUs, NCCL on GPUs.

A run started by ``torchrun`` (or ``srpu train --nproc N``, which starts it) has ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in its environment; every process trains on its own
slice of each global batch, gradients are averaged by DDP, and only rank 0 writes files,
logs to MLflow and registers models.
"""

from __future__ import annotations

import atexit
import datetime
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    """The torchrun environment of this process (a single process without one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def is_main_process() -> bool:
    return from_env().is_main


# how long a process waits in a collective for the others: rank 0 validates and writes
# checkpoints while the others wait (a large validation set on a CPU takes minutes)
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


def init(d: Dist, device: torch.device) -> None:
    """Join the process group, once per process (every stage of a run shares it; it is
    left at exit): NCCL when this process trains on a GPU, else gloo."""
    if not d.active or tdist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tdist.init_process_group(backend=backend, init_method="env://", timeout=COLLECTIVE_TIMEOUT)
    atexit.register(_leave)


def _leave() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def any_flag(flag: bool, d: Dist, device: torch.device) -> bool:
    """True on every process when it is True on any (e.g. over its time budget)."""
    if not d.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    tdist.all_reduce(t)
    return bool(t[0] > 0)


def mean_over_processes(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """The element-wise mean of ``t`` over the processes (``t`` itself when alone)."""
    if not d.active:
        return t
    t = t.clone()
    tdist.all_reduce(t)
    return t / d.world


def broadcast_flag(flag: bool, d: Dist, device: torch.device) -> bool:
    """Rank 0's value of ``flag`` on every process."""
    if not d.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    tdist.broadcast(t, 0)
    return bool(t[0] > 0)


def barrier(d: Dist) -> None:
    if d.active and tdist.is_initialized():
        tdist.barrier()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(nproc: int, module: str, args: list[str], port: int | None = None) -> list[str]:
    """The ``torchrun`` command that runs ``python -m module args`` in ``nproc`` processes
    on this machine, with the rendezvous on 127.0.0.1."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port or free_port()),
        "-m",
        module,
        *args,
    ]


def launch_env(nproc: int) -> dict[str, str]:
    """Environment for a one-machine launch: collective traffic on the loopback
    interface only, and the cores shared out (each process sets its own threads)."""
    env = dict(os.environ)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env
