"""Files: atomic writes, full-disk errors, JSON, checksummed weights-only checkpoints, fingerprints."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import json
import os
import re
import resource
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from pipeline.errors import UserError

# The outputs that atomic_files() holds back: target -> its finished temp file, while one is open.
_STAGED: contextvars.ContextVar[dict[Path, Path] | None] = contextvars.ContextVar("staged", default=None)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` atomically.

    A crash or exception leaves the old file (if any) untouched and no partial file that
    DVC or a later stage could mistake for a finished output. A full disk or a file-size
    limit is a UserError naming `path` and the space left (see storage_error). Inside
    atomic_files() the replacement waits for the end of that block.
    """
    path = Path(path)
    tmp_path: Path | None = None
    # A stop signal's handler raises (signals.stop_on_signals): held back until the temp file is one
    # this block removes, it cannot leave one behind.
    held = _hold_stop_signals()
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as exc:
            if (error := storage_error(path, exc)) is not None:
                raise error from None
            raise
        tmp_path = Path(tmp)
        _release_stop_signals(held)  # a signal that came meanwhile is handled here, with the temp file ours
        held = None
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get normal permissions
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        staged = _STAGED.get()
        if staged is None:
            os.replace(tmp, path)
        else:
            if (earlier := staged.pop(path, None)) is not None:  # written twice in one block: the last counts
                earlier.unlink(missing_ok=True)
            staged[path] = Path(tmp)
            tmp_path = None  # atomic_files() renames it, or removes it
    except Exception as exc:
        if tmp_path is None:  # no temp file yet (its folder or its creation failed, said above)
            raise
        # numpy's tofile says only "N requested and M written": what the temp file shows decides.
        hint = _short_write(Path(tmp)) if isinstance(exc, OSError) and exc.errno is None else None
        tmp_path.unlink(missing_ok=True)  # first, so that the space said is what the user has
        if (error := storage_error(path, OSError(hint, os.strerror(hint)) if hint else exc)) is not None:
            raise error from None
        raise
    finally:
        _release_stop_signals(held)
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


def _hold_stop_signals() -> Any:
    """Block the stop signals (signals.STOP_SIGNALS) in this thread; the old mask (None where there is
    none to block)."""
    import signal

    from pipeline.signals import STOP_SIGNALS

    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {getattr(signal, name) for name in STOP_SIGNALS})


def _release_stop_signals(held: Any) -> None:
    """Back to the mask `_hold_stop_signals` returned: a signal that came meanwhile is handled now."""
    if held is not None:
        import signal

        signal.pthread_sigmask(signal.SIG_SETMASK, held)


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: str = "w") -> Iterator[IO[Any]]:
    """open() for writing whose result appears atomically (see atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as fh:
        yield fh


@contextlib.contextmanager
def atomic_files() -> Iterator[None]:
    """Every atomic write in the block appears at its end, together; after a failure none does.

    A stage's outputs are written as temp files first and renamed one after another once all
    are complete (renames need no space), so a full disk at the third file cannot leave two
    new files beside an old third one. Nested blocks belong to the outermost.
    """
    if _STAGED.get() is not None:
        yield
        return
    staged: dict[Path, Path] = {}
    token = _STAGED.set(staged)
    try:
        yield
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _STAGED.reset(token)
    for path, tmp in staged.items():
        os.replace(tmp, path)


# Writes that fail for want of room: no space, a file over `ulimit -f` (Python ignores SIGXFSZ,
# so the write fails with EFBIG), a quota. SQLite reports them as SQLITE_FULL, or under a
# file-size limit as SQLITE_IOERR_WRITE.
NO_ROOM = {
    errno.ENOSPC: "no space left on the device",
    errno.EFBIG: "the file-size limit was reached",
    errno.EDQUOT: "the disk quota is exceeded",
}
_SQLITE_FULL, _SQLITE_IOERR_WRITE = 13, 778


def out_of_room(exc: BaseException) -> BaseException | None:
    """The error in `exc` or what it wraps (torch, PIL, SQLAlchemy wrap them) that says a write found
    no room; None when there is none."""
    seen: BaseException | None = exc
    for _ in range(20):  # a cause chain, not a cycle
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno in NO_ROOM:
            return seen
        if getattr(seen, "sqlite_errorcode", None) in (_SQLITE_FULL, _SQLITE_IOERR_WRITE):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _short_write(tmp: Path) -> int | None:
    """EFBIG when `tmp` reached the file-size limit, ENOSPC when its filesystem is all but full, else None."""
    try:
        size = tmp.stat().st_size
    except OSError:
        return None
    if (limit := _file_size_limit()) is not None and size >= limit:
        return errno.EFBIG
    free = _free_bytes(tmp)
    return errno.ENOSPC if free is not None and free < 1 << 20 else None


def _free_bytes(path: Path) -> int | None:
    """Free space on the filesystem of `path` (of its nearest existing folder); None when unknown."""
    where = path.absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        return shutil.disk_usage(where).free
    except OSError:
        return None


def _file_size_limit() -> int | None:
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if limit == resource.RLIM_INFINITY else limit


def _likely_cause(path: Path) -> int:
    """SQLite says only "disk I/O error" or "full": a file-size limit with the disk not nearly full is it."""
    free = _free_bytes(path)
    return (
        errno.EFBIG
        if _file_size_limit() is not None and free is not None and free >= 1 << 20
        else errno.ENOSPC
    )


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def room_left(path: Path | str) -> str:
    """'1.2 MiB free on its filesystem', plus the file-size limit when one is set (ulimit -f)."""
    free = _free_bytes(Path(path))
    text = "free space unknown" if free is None else f"{_size(free)} free on its filesystem"
    if (limit := _file_size_limit()) is not None:
        text += f", and ulimit -f limits files to {_size(limit)}"
    return text


def storage_error(path: Path | str, exc: BaseException) -> UserError | None:
    """The one sentence for a write of `path` that found no room (None for any other failure)."""
    found = out_of_room(exc)
    if found is None:
        return None
    code = getattr(found, "errno", None) if isinstance(found, OSError) else _likely_cause(Path(path))
    reason = NO_ROOM.get(code, "the disk is full")  # type: ignore[arg-type]
    return UserError(
        f"cannot write {path}: {reason} ({room_left(path)}); the previous outputs are kept, "
        "so free some space and run the same command again."
    )


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
        raise UserError(
            f"{path} cannot be read as JSON ({exc}); run the stage that writes it again."
        ) from None


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
        raise UserError(
            f"{path} is outside the project ({root}); pass --allow-outside to write there anyway."
        )
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
    except (
        pickle.UnpicklingError,
        RuntimeError,
        ValueError,
        EOFError,
        OSError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
        UnicodeDecodeError,
    ) as exc:
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
