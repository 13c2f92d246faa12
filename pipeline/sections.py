"""The building blocks of params.yaml's sections: the base class, the value types, the param groups.

A leaf of the shared ground (it imports nothing of the pipeline), so that the registries' entries
(an architecture's own section) and params.py, which assembles the whole file from them, share one
base without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(gt=0, le=10**9)]
NonNegativeInt = Annotated[int, Field(ge=0, le=10**9)]
BatchSize = Annotated[int, Field(gt=0, le=65536)]  # beyond this no device holds the activations
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
Probability = Annotated[float, Field(ge=0.0, lt=1.0)]
LearningRate = Annotated[float, Field(gt=0.0, le=1.0)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
Device = Literal["auto", "cpu", "cuda", "mps"]
# The speed levers' forms, each computing the same function (gan/levers.py times them for `auto`),
# and each lever's param type: one of its forms, or `auto`, the faster one on this machine.
LEVER_FORMS: dict[str, tuple[bool | str, ...]] = {
    "fast_upsample": (True, False, "taps"),
    "fast_output": (True, False),
    "channels_last": (True, False),
}
LEVER_TYPES: dict[str, Any] = {name: Literal[(*forms, "auto")] for name, forms in LEVER_FORMS.items()}


@dataclass(frozen=True)
class Group:
    """What a param is for. Fingerprints take or leave whole groups, never hand-kept lists of names."""

    name: str


BUDGET = Group("budget")  # how long a run trains: a finished run may be extended
RECIPE = Group("recipe")  # what is trained: batch, objective, seed
OPTIMISER = Group("optimiser")
LEVERS = Group("speed levers")  # the same function computed faster; the last bits may differ
CADENCE = Group("cadence")  # when to log, sample, checkpoint and measure: never the numbers
DEVICE = Group("device")  # where it runs
BOOKKEEPING = Group("bookkeeping")  # names and storage: never what a run computes


@dataclass(frozen=True)
class Added:
    """A param added after runs existed: at `off` a run computes what those runs computed, so the
    fingerprints leave it out there, and a checkpoint or study made before it still matches."""

    off: Any


class Section(BaseModel):
    """Base for every section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


def fingerprinted(section: Section, *groups: Group) -> dict[str, Any]:
    """What a fingerprint takes of the section: `values_without` its groups and the added params at `off`."""
    fields = type(section).model_fields
    return {
        name: value
        for name, value in values_without(section, *groups).items()
        if not any(isinstance(mark, Added) and mark.off == value for mark in fields[name].metadata)
    }


def values_without(section: Section, *groups: Group) -> dict[str, Any]:
    """The section's values (JSON types), leaving out the fields of `groups`."""
    fields = type(section).model_fields
    return {
        name: value
        for name, value in section.model_dump(mode="json").items()
        if not any(group in fields[name].metadata for group in groups)
    }
