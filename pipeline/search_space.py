"""The `sweep` section of params.yaml: the Optuna study's settings and `space`, the searched params.

A searched param is named by its dotted path as params.yaml nests it (`train.lr_g`,
`model.dcgan.dropout`); a key that moved into an architecture's section keeps working under
its old name (`model.dropout`). Only params.py (which checks the space against the whole file)
and the sweep read this module.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator

from pipeline.gan.architectures import ARCHITECTURES
from pipeline.sections import (
    BOOKKEEPING,
    BUDGET,
    CADENCE,
    DEVICE,
    NonNegativeInt,
    PositiveInt,
    Section,
    Seed,
    values_without,
)

if TYPE_CHECKING:
    from pipeline.params import Params

# A sweep varies the model and the training; the scoring stays fixed so that trials compare.
SWEEP_SECTIONS = ("model", "train")
# Params every trial takes from the sweep section rather than from the search space.
# Where a trial runs (DEVICE) and when it logs (CADENCE) are not searched either.
NOT_SEARCHED = (BUDGET, CADENCE, DEVICE)
SET_BY_SWEEP = {
    "train.steps": "sweep.steps",
    "train.fid_every": "sweep.fid_every",
    "train.fid_samples": "sweep.fid_samples",
}


class SearchDimension(Section):
    """One searched param: a range `low`..`high` (on a `log` scale, or in multiples of `step`) or `choices`."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: Annotated[float, Field(gt=0)] | None = None
    choices: Annotated[list[bool | int | float | str], Field(min_length=1)] | None = None


class SweepParams(Section):
    """`python -m pipeline sweep`: an Optuna study over `space`, every trial an MLflow child run."""

    study: Annotated[str, Field(min_length=1, max_length=200), BOOKKEEPING] = "dcgan-sweep"
    # an Optuna storage URL; None: sqlite:///optuna.db at the repository root
    storage: Annotated[str | None, BOOKKEEPING] = None
    trials: Annotated[PositiveInt, BOOKKEEPING] = 20  # in the whole study, however many processes share it
    steps: PositiveInt = 1000  # training steps per trial: the trial budget
    fid_every: PositiveInt = 250  # quick FID every N steps, what pruning looks at
    fid_samples: PositiveInt = 1000
    eval_samples: Annotated[int, Field(ge=2, le=1_000_000)] = 5000  # N of the final FID, the objective
    sampler: Literal["tpe", "random"] = "tpe"
    startup_trials: NonNegativeInt = 5  # random trials before TPE models the space
    seed: Seed = 0
    pruner: Literal["median", "none"] = "median"
    prune_after_trials: NonNegativeInt = 3  # no pruning before this many trials have finished
    prune_after_steps: NonNegativeInt = 250  # nor before this step of a trial
    heartbeat_s: Annotated[int, Field(ge=1, le=3600), BOOKKEEPING] = (
        30  # a trial silent for 2x this is retried
    )
    space: dict[str, SearchDimension] = Field(
        default_factory=lambda: {
            "train.lr_g": SearchDimension(low=5e-5, high=1e-3, log=True),
            "train.lr_d": SearchDimension(low=5e-5, high=1e-3, log=True),
            "train.beta1": SearchDimension(low=0.3, high=0.9),
        }
    )

    @field_validator("space", mode="before")
    @classmethod
    def _moved_keys(cls, space: Any) -> Any:
        return {canonical_key(key): dim for key, dim in space.items()} if isinstance(space, dict) else space


def canonical_key(key: str) -> str:
    """`model.<key>` of a key that moved into an architecture's section: its path there."""
    section, _, field = key.partition(".")
    if section == "model":
        for name, arch in ARCHITECTURES.items():
            if field in arch.flat_keys:
                return f"model.{name}.{field}"
    return key


def lookup(params: Any, key: str) -> Any:
    """The value at a dotted path of params (`model.dcgan.dropout`)."""
    value = params
    for part in key.split("."):
        value = getattr(value, part)
    return value


def assign(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted path in params as plain dicts (params.model_dump())."""
    *parents, field = key.split(".")
    for part in parents:
        raw = raw[part]
    raw[field] = value


def searchable(params: Params) -> list[str]:
    """The params a sweep may search: model and train, without budget, cadence, device or lists;
    of the architectures' sections only the chosen one's."""
    keys: list[str] = []

    def walk(prefix: str, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                if prefix != "model" or key == params.model.arch:
                    walk(f"{prefix}.{key}", value)
            elif not isinstance(value, list):
                keys.append(f"{prefix}.{key}")

    for name in SWEEP_SECTIONS:
        walk(name, values_without(getattr(params, name), *NOT_SEARCHED))
    return keys


def check_space(params: Params) -> None:
    """Each searched key names a real param of model/train, and its range or choices are valid for it."""
    sweep, need = params.sweep, 2 * params.classifier.feature_dim
    for key in ("fid_samples", "eval_samples"):
        if getattr(sweep, key) < need:
            raise ValueError(f"sweep.{key} must be at least {need} (2 x classifier.feature_dim) for FID")
    allowed = searchable(params)
    if not sweep.space:
        raise ValueError(f"sweep.space is empty: name at least one param to search ({', '.join(allowed)})")
    for key, dim in sweep.space.items():
        where = f"sweep.space.{key}"
        if key in SET_BY_SWEEP:
            raise ValueError(f"{where} cannot be searched: every trial takes it from {SET_BY_SWEEP[key]}")
        if key not in allowed:
            raise ValueError(f"{where} is not a searchable param (searchable: {', '.join(allowed)})")
        for value in _values_to_try(where, key, dim, lookup(params, key)):
            _check_value(params, where, key, value)


def _values_to_try(where: str, key: str, dim: SearchDimension, current: Any) -> list[Any]:
    """The values a dimension can give that must each be valid: its choices, or its range's ends."""
    numeric = isinstance(current, (int, float)) and not isinstance(current, bool)
    if dim.choices is not None:
        if dim.low is not None or dim.high is not None or dim.step is not None or dim.log:
            raise ValueError(f"{where} gives choices and a range: give one of them")
        return list(dim.choices)
    if not numeric:
        raise ValueError(f"{where}: {key} is not a number, so it needs choices, e.g. [{json.dumps(current)}]")
    if dim.low is None or dim.high is None:
        raise ValueError(f"{where} needs low and high (or choices)")
    if dim.low >= dim.high:
        raise ValueError(f"{where} is an empty range: low {dim.low:g} must be below high {dim.high:g}")
    if dim.log and dim.low <= 0:
        raise ValueError(f"{where} is on a log scale, so low must be above 0, not {dim.low:g}")
    if dim.log and dim.step is not None:
        raise ValueError(f"{where} gives both log and step: a log range has no step")
    if isinstance(current, int) and not all(
        float(v).is_integer() for v in (dim.low, dim.high, dim.step or 1)
    ):
        raise ValueError(f"{where}: {key} is an integer, so low, high and step must be whole numbers")
    return [dim.low, dim.high]


def _check_value(params: Params, where: str, key: str, value: Any) -> None:
    """`value` is valid for `key` in the section that holds it."""
    *parents, field = key.split(".")
    section = lookup(params, ".".join(parents))
    try:
        type(section).model_validate({**section.model_dump(), field: value})
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"]
        raise ValueError(
            f"{where}: {json.dumps(value)} is not a valid {key} ({msg[0].lower()}{msg[1:]})"
        ) from None
