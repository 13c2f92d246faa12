"""Data-parallel training over processes: joining a torchrun job, or launching one (train.nproc).

`torchrun ... -m pipeline train` starts the train stage once per process with RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT set; `join` turns that into a process group
(NCCL on CUDA, gloo on the CPU). `launch` is what `train.nproc > 1` does under a plain
`python -m pipeline train` (and so under `dvc repro`): it starts those processes on this
machine through torch's own launcher (torch.distributed.launcher, as torchrun does).

Everything about a job that the training loop needs is a `World`; the plain, single-process
run is `World()`.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel job; the defaults are a plain single-process run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "nccl" or "gloo" once joined; None: not distributed

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def writer(self) -> bool:
        """The one process that writes outputs, logs to MLflow and prints: rank 0."""
        return self.rank == 0


def under_torchrun(env: Mapping[str, str]) -> bool:
    return all(name in env for name in TORCHRUN_VARS)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s random stream (batches, noise, dropout). Rank 0 keeps `seed`,
    so a one-process job draws exactly what the plain run draws."""
    if rank == 0:
        return seed
    return int(
        torch.randint(0, 2**32 - 1, (1,), generator=torch.Generator().manual_seed(seed * 1_000_003 + rank))
    )


def join(device: torch.device, env: Mapping[str, str], timeout_s: float) -> tuple[World, torch.device]:
    """Join the torchrun job described by `env`: the process group, and this rank's device.

    On CUDA each process takes the GPU of its LOCAL_RANK (NCCL); on the CPU they share it (gloo).
    A rank that cannot reach the others fails after `timeout_s`, with one sentence.
    """
    import torch.distributed as dist

    rank, size, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"local rank {local_rank} has no GPU of its own (this machine has {torch.cuda.device_count()}); "
                "start at most one process per GPU."
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UserError(f"distributed training runs on CUDA (NCCL) or the CPU (gloo), not on {device.type}.")
    where = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=size, timeout=datetime.timedelta(seconds=timeout_s)
        )
    except Exception as exc:  # noqa: BLE001 - store timeouts and refused connections arrive as many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(
            f"rank {rank} could not join the job at {where} within {timeout_s:.0f} s ({first})."
        ) from None
    return World(rank=rank, size=size, local_rank=local_rank, backend=backend), device


def leave(world: World) -> None:
    import torch.distributed as dist

    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(nproc: int, params_path: Path) -> None:
    """Run `python -m pipeline train` as `nproc` processes on this machine, as torchrun would.

    Returns when every process has finished; if one fails, the others are stopped and this
    raises one sentence naming it (each process has printed its own error above).
    """
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from pipeline.signals import STOP_SIGNALS, Stopped

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"dcgan-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,  # a failed process is a failed run: resume it by running the command again
        monitor_interval=0.5,
    )
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        elastic_launch(config, entrypoint=sys.executable)(
            "-m", "pipeline", "train", "--params", str(params_path)
        )
    except SignalException as exc:
        # Ours to stop (Ctrl-C, timeout, a scheduler): torch's launcher sent it on to the processes, which
        # stop together at one step, and rank 0 says where; this process only exits as they do.
        raise Stopped(int(exc.sigval)) from None
    except ChildFailedError as exc:
        stop_codes = {128 + int(getattr(signal, name)) for name in STOP_SIGNALS}
        if {
            failure.exitcode for failure in exc.failures.values()
        } <= stop_codes:  # signalled directly: the same
            raise Stopped(min(failure.exitcode for failure in exc.failures.values()) - 128) from None
        rank, failure = min(exc.failures.items())
        raise UserError(
            f"training process {rank} of {nproc} failed (exit code {failure.exitcode}); the others were stopped, "
            "and running the same command again resumes from the last checkpoint."
        ) from None


def all_gather(world: World, value: Any) -> list[Any]:
    """`value` from every rank, in rank order (a list of one outside a job)."""
    if not world.distributed:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast(world: World, value: Any) -> Any:
    """Rank 0's `value`, on every rank."""
    if not world.distributed:
        return value
    import torch.distributed as dist

    box = [value if world.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agreed_stop(world: World, signum: int, device: torch.device) -> int:
    """The stop signal any rank received (0: none), the same on every rank, so that all stop at the
    same step; outside a job, `signum` itself. One collective: call it at a step where all ranks do."""
    if not world.distributed:
        return signum
    import torch.distributed as dist

    flag = torch.tensor([signum], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())
