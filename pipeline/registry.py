"""Registries: the one list of each kind of name, found by looking rather than kept by hand.

A registry is a package in which every module that defines the agreed attribute (`ARCHITECTURE`,
`LOSS`, `METRIC`) adds one entry, named by the entry's `name`. Adding a module adds a name: the
params schema, the CLI, eval.json and the docs read the registry, so no second list can fall
behind it. Modules without the attribute (a package's shared base) are skipped.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any


def discover(package: str, attribute: str) -> dict[str, Any]:
    """The entries of `package`'s modules under `attribute`, keyed by their `name`, in module order."""
    found: dict[str, Any] = {}
    where: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(importlib.import_module(package).__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{package}.{info.name}")
        entry = getattr(module, attribute, None)
        if entry is None:
            continue
        if entry.name in found:  # a programming error, found at import: two modules claim one name
            raise RuntimeError(
                f"{package}: {where[entry.name]} and {module.__name__} both define {entry.name!r}"
            )
        found[entry.name], where[entry.name] = entry, module.__name__
    return found
