"""Runtime helpers shared by the stages: device choice, seeding, atomic file writes."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import random
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

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
    space, the next step reuses the last one's pages (a step 4-5% faster on the AMX machine).
    The process then holds its peak memory, as a caching allocator does. Training, evaluate and
    reference (classifier batches, PRDC's distance blocks) call it. Once per process; False where
    malloc is not glibc's.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) and libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one param."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device_name(device: torch.device) -> str:
    """A human-readable name for tags and logs ('cpu', 'NVIDIA H200', ...)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` atomically.

    A crash or exception leaves the old file (if any) untouched and no partial file that
    DVC or a later stage could mistake for a finished output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs get normal permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: str = "w") -> Iterator[IO[Any]]:
    """open() for writing whose result appears atomically (see atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as fh:
        yield fh


def write_json(path: Path | str, data: Any) -> None:
    """Write pretty JSON atomically."""
    with atomic_open(path) as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")


def read_json(path: Path | str) -> Any:
    """Load a JSON output of an earlier stage; a damaged file is a UserError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} cannot be read as JSON ({exc}); run the stage that writes it again.") from None


def remove_stale_temps(*outputs: Path | str) -> list[Path]:
    """Delete the temp files that killed atomic writes left beside `outputs` (or inside them, for folders).

    A stage calls this at its start for its own outputs: no live writer can own those temp
    files then, and DVC would otherwise cache one inside a folder output (samples/) as data.
    """
    removed = []
    for output in map(Path, outputs):
        pattern = ".*.tmp" if output.is_dir() else f".{output.name}.*.tmp"
        for stale in (output if output.is_dir() else output.parent).glob(pattern):
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def inside_project(path: Path, allow_outside: bool = False, root: Path | None = None) -> Path:
    """`path`, to be written; refused when it resolves outside `root` (the working directory).

    Symbolic links are followed, so a link cannot smuggle a write out either.
    """
    root = (root or Path.cwd()).resolve()
    if not allow_outside and not (root / path).resolve().is_relative_to(root):
        raise UserError(f"{path} is outside the project ({root}); pass --allow-outside to write there anyway.")
    return path


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --- checkpoints -------------------------------------------------------------------------
# A checkpoint is torch.save's zip followed by a footer holding the SHA-256 of those
# bytes, so truncation and bit flips are caught before torch ever parses the file, and
# loading goes through torch's weights-only unpickler: tensors and plain containers only,
# never arbitrary objects.

_FOOTER_MAGIC = b"\nDCGAN-SHA256:"
_FOOTER_LEN = len(_FOOTER_MAGIC) + 64


def save_checkpoint(state: dict[str, Any], path: Path | str) -> None:
    """Write `state` (tensors, numbers, strings, dicts, lists) atomically with a checksum."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    body = buffer.getvalue()
    with atomic_path(path) as tmp:
        tmp.write_bytes(body + _FOOTER_MAGIC + hashlib.sha256(body).hexdigest().encode())


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify and load a checkpoint written by save_checkpoint; any damage is a UserError."""
    import io
    import pickle

    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise UserError(f"checkpoint {path} cannot be read ({exc.strerror}).") from None
    body, footer = blob[:-_FOOTER_LEN], blob[-_FOOTER_LEN:]
    if len(blob) < _FOOTER_LEN or not footer.startswith(_FOOTER_MAGIC):
        raise UserError(f"checkpoint {path} is truncated or not one of ours; delete it to start fresh.")
    if hashlib.sha256(body).hexdigest().encode() != footer[len(_FOOTER_MAGIC) :]:
        raise UserError(f"checkpoint {path} fails its checksum (corrupted); delete it to start fresh.")
    try:
        state = torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError, KeyError, TypeError,
            AttributeError, IndexError, UnicodeDecodeError) as exc:  # fmt: skip
        # Not torch's text: it advises weights_only=False, the wrong advice for a file that carries code.
        found = re.search(r"(?:Unsupported global: |unsupported )GLOBAL (\S+)", str(exc))
        what = f"a pickled {found[1]}" if found else type(exc).__name__
        raise UserError(
            f"checkpoint {path} holds something other than weights ({what}); refusing to load it."
        ) from None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} does not hold a state dictionary; delete it to start fresh.")
    return state


def fingerprint(*parts: Any) -> str:
    """A stable short hash of JSON-serialisable parts (params, data hashes)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- stop signals and the one-writer lock ------------------------------------------------------
# (imports inside: this module is imported by every stage, most of which never need them)

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")  # timeout / docker stop / Slurm; Ctrl-C; a closed terminal


class Stopped(KeyboardInterrupt):
    """A stage stopped on a signal. A KeyboardInterrupt, so that its MLflow run is marked KILLED; the
    CLI prints `message` (empty where another process says it) and exits 128 + the signal's number,
    as a shell reports a death by that signal."""

    def __init__(self, signum: int, message: str = "", *, at_once: bool = False) -> None:
        super().__init__(message)
        self.signum, self.message, self.at_once = signum, message, at_once
        self.exit_code = 128 + signum

    @property
    def name(self) -> str:
        import signal

        return signal.Signals(self.signum).name


class StopRequest:
    """The first stop signal received while `stop_on_signals` is in force (`signum` 0: none yet)."""

    def __init__(self) -> None:
        self.signum = 0


@contextlib.contextmanager
def stop_on_signals(request: StopRequest, second_stops_at_once: bool = True) -> Iterator[StopRequest]:
    """For the block: the first SIGTERM, SIGINT or SIGHUP is recorded in `request` (the work polls it
    and stops where it can resume from); a second one raises Stopped at once, unless
    `second_stops_at_once` is False. The old handlers come back afterwards. Python sets handlers only
    in the main thread: elsewhere this does nothing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame: Any) -> None:
        if request.signum and second_stops_at_once:
            raise Stopped(signum, at_once=True)
        request.signum = signum

    old = {sig: signal.signal(sig, handle) for sig in (getattr(signal, name) for name in STOP_SIGNALS)}
    try:
        yield request
    finally:
        for sig, handler in old.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold an flock on `path` for the block; while another process holds it, refuse with one sentence
    naming that process's PID (written into the file). The kernel drops the lock with its process,
    so a killed holder leaves nothing stuck; the file is removed on the way out."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f"PID {holder}" if holder.isdigit() else "a process that is just starting"
            raise UserError(f"{what} is already running in this project ({who} holds {path}); wait for it to "
                            "end, or stop it, before starting another.") from None  # fmt: skip
        # The holder before us removes the file on its way out: if it did so between our open and our
        # lock, ours is a lock on a file nobody else opens. Then lock the file that is there instead.
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding the lock: see above
        os.close(fd)
