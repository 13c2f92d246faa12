"""The per-machine cache of the speed levers' faster forms (gan/levers.py): one small JSON file.

`$PIPELINE_LEVER_CACHE`, else `$XDG_CACHE_HOME/dcgan-pipeline/levers.json`, else
`~/.cache/dcgan-pipeline/levers.json`: {key: {"img_s": {form: img/s}, "measured": date}}. A cache
that cannot be read as that is ignored with one line, measured again and written over; it is
written atomically, so a kill never leaves half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline import files
from pipeline.errors import UserError


def path(env: dict[str, str] | None = None) -> Path:
    env = dict(os.environ) if env is None else env
    if given := env.get("PIPELINE_LEVER_CACHE"):
        return Path(given)
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "dcgan-pipeline" / "levers.json"


def read(where: Path) -> tuple[dict[str, Any], str | None]:
    """The cache's table, and a warning when a file there could not be used (then the table is empty)."""
    if not where.exists():
        return {}, None
    try:
        table = json.loads(where.read_text(encoding="utf-8"))
        if not isinstance(table, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return (
            {},
            f"warning: ignoring the lever cache {where} ({type(exc).__name__}: {str(exc)[:120]}); timing again.",
        )
    return table, None


def valid(entry: Any, forms: list[dict[str, bool | str]]) -> bool:
    """Whether a cache entry holds a positive img/s for each of `forms`."""
    if not isinstance(entry, dict) or not isinstance(entry.get("img_s"), dict):
        return False
    rates = entry["img_s"]
    wanted = {json.dumps(form, sort_keys=True) for form in forms}
    return set(rates) == wanted and all(isinstance(v, int | float) and v > 0 for v in rates.values())


def write(where: Path, table: dict[str, Any]) -> None:
    """The table, atomically; a cache that cannot be written (a read-only home) is only not kept."""
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        files.write_json(where, table)
    except (OSError, UserError):
        pass
