"""Stopping cleanly: the signals that stop a stage at the next step, and one process at a time per lock."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline import files
from pipeline.errors import UserError

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
            raise UserError(
                f"{what} is already running in this project ({who} holds {path}); wait for it to "
                "end, or stop it, before starting another."
            ) from None
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


def stopped_sentence(stop: Stopped, step: int, checkpoint: Path) -> str:
    """What a stop signal did, in one sentence."""
    if not stop.at_once:
        return f"stopped by {stop.name} at step {step}: checkpoint written to {checkpoint}; run the same command to resume."
    try:
        kept: int | None = int(files.load_checkpoint(checkpoint)["step"]) if checkpoint.exists() else None
    except (UserError, KeyError, TypeError, ValueError):
        kept = None
    at_once = f"stopped at once by a second {stop.name} after step {step}"
    if kept is None:
        return f"{at_once}, before any checkpoint; run the same command to start again."
    return f"{at_once}: {checkpoint} of step {kept} is kept; run the same command to resume from it."
