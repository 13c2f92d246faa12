"""Earlier runs' checkpoints, kept: a change of params or budget never costs a run's progress.

The train stage resumes from `checkpoints/train.pt` when it matches (its fingerprint, and a step
not beyond `train.steps`). A checkpoint that does not match is not overwritten by the fresh run:
it moves to `checkpoints/history/` (named by its fingerprint and step), and a later run whose
params match one there takes it back. So `-S train.steps=200` after the 4,000-step default
trains its own 200 steps, and going back to 4,000 finds the finished run where it stood. The
history holds at most `train.keep_checkpoints` files, the oldest removed first.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pipeline import files

NAME = re.compile(r"(?P<fingerprint>[0-9a-f]{16})-step(?P<step>\d+)\.pt")


def history(checkpoint: Path) -> Path:
    return checkpoint.parent / "history"


def _entries(folder: Path) -> list[tuple[str, int, Path]]:
    """(fingerprint prefix, step, path) of each checkpoint in the history."""
    found = []
    for path in folder.glob("*.pt") if folder.is_dir() else ():
        if match := NAME.fullmatch(path.name):
            found.append((match["fingerprint"], int(match["step"]), path))
    return found


def _shelve(checkpoint: Path, fingerprint: str, step: int, keep: int) -> Path | None:
    """Move `checkpoint` into the history (or delete it, with no history kept); keep the `keep` newest."""
    if keep == 0:
        checkpoint.unlink()
        return None
    folder = history(checkpoint)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{fingerprint[:16]}-step{step}.pt"
    os.replace(checkpoint, target)
    target.touch()  # its age in the history counts from now
    by_age = sorted(_entries(folder), key=lambda entry: entry[2].stat().st_mtime)
    for _, _, old in by_age[: max(0, len(by_age) - keep)]:
        old.unlink()
    return target if target.exists() else None


def prepare(
    checkpoint: Path, fingerprint: str, steps: int, keep: int
) -> tuple[dict[str, Any] | None, str | None]:
    """The checkpoint to resume (read once, here), put at `checkpoint`, and what was moved, to say.

    The current checkpoint stays when it can be resumed and the history holds none further along.
    Otherwise it goes to the history, and the history's furthest checkpoint of this fingerprint
    not beyond `steps` (if any) takes its place.
    """
    current = files.load_checkpoint(checkpoint) if checkpoint.exists() else None
    prefix = fingerprint[:16]
    found = [
        (step, path) for mark, step, path in _entries(history(checkpoint)) if mark == prefix and step <= steps
    ]
    best = max(found, default=None)
    resumable = (
        current is not None and current.get("fingerprint") == fingerprint and int(current["step"]) <= steps
    )
    if current is None and best is None or resumable and (best is None or int(current["step"]) >= best[0]):
        return current, None
    said = []
    if current is not None:
        kept = _shelve(checkpoint, str(current.get("fingerprint", "0" * 16)), int(current["step"]), keep)
        said.append(
            f"the checkpoint of step {current['step']} (other params, or another budget) is kept as {kept}"
            if kept
            else f"the checkpoint of step {current['step']} is not kept (train.keep_checkpoints: 0)"
        )
    if best is None:
        return None, "; ".join(said)
    os.replace(best[1], checkpoint)
    said.append(f"{best[1]} (step {best[0]}) matches these params: back in {checkpoint}")
    return files.load_checkpoint(checkpoint), "; ".join(said)
