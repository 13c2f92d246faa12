"""The machine a stage runs on: the device, the precision, seeding, threads and the kept heap."""

from __future__ import annotations

import ctypes
import functools
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import UserError


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then CPU; an explicit choice must be available."""
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if requested == "cuda" and not cuda:
        raise UserError("device 'cuda' was requested but no CUDA GPU is available; use 'auto' or 'cpu'.")
    if requested == "mps" and not mps:
        raise UserError("device 'mps' was requested but Apple MPS is not available; use 'auto' or 'cpu'.")
    return torch.device(requested)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 dot-product instructions (x86 AVX512-BF16 or AMX-BF16; Linux flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` means bf16 where the hardware computes it natively (CUDA with bf16, such CPUs), else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation instead of returning it to the OS.

    PyTorch's CPU allocator caches nothing (its CUDA one does): each training step allocates its
    large activations afresh, and glibc serves blocks over its mmap threshold from new pages,
    faulted in on first write: 10,000-15,000 page faults per training step at batch 128. With
    blocks up to 1 GiB served from the heap and the heap trimmed only beyond 1 GiB of free
    space, the next step reuses the last one's pages (docs/speed.md has what that saves).
    The process then holds its peak memory, as a caching allocator does. Training, evaluate and
    reference (classifier batches, PRDC's distance blocks) call it. Once per process; False where
    malloc is not glibc's.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) and libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


def use_threads(requested: int) -> int:
    """Run torch's CPU work on `requested` threads (0: keep torch's own choice); the count in use."""
    if requested:
        torch.set_num_threads(requested)
    return torch.get_num_threads()


def cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_machine_advice(threads: int, cores: int, load: float) -> str | None:
    """What to do when the machine is oversubscribed (its 1-minute load above its cores), else None.

    Every process starts one thread per core by default: a few jobs on one machine then spin
    against each other and each trains many times slower than alone. A share of the cores each,
    in proportion to the work already there, avoids that.
    """
    if load <= cores:
        return None
    share = max(1, round(cores * cores / (load + cores)))
    return (
        f"this machine is oversubscribed (load {load:.1f} on {cores} cores) and this run adds {threads} "
        f"thread(s): processes that share cores can each train many times slower; give each job a share, "
        f"e.g. -S train.threads={share} (or OMP_NUM_THREADS={share}; the weights depend on the thread count)."
    )


def busy_now() -> str | None:
    """busy_machine_advice for this process's threads and the machine's load now (None where no load is told)."""
    if not hasattr(os, "getloadavg"):
        return None
    return busy_machine_advice(torch.get_num_threads(), cores(), os.getloadavg()[0])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one param."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what Python's platform module says."""
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        found = None
    import platform

    return found.group(1).strip() if found else (platform.processor() or platform.machine() or "unknown")


def processor_name(device: torch.device) -> str:
    """The processor that computes on `device`: the GPU's name, or the CPU's model."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def device_name(device: torch.device) -> str:
    """A human-readable name for tags and logs ('cpu', 'NVIDIA H200', ...)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def rng_state() -> dict[str, Any]:
    """This process's random state: what its batches, noise and dropout masks are drawn from."""
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
