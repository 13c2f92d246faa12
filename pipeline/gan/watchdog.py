"""The collapse watchdog (`train.watchdog`, off by default): judge the run as it trains, and rescue it.

Every `train.watchdog_every` steps the run's generator (the EMA of G where there is one) is judged
by the quick FID of `train.fid_samples` samples, which the caller measures (Callbacks.on_watch:
the core does no scoring). The state of the best FID so far is kept in memory. The run has
collapsed when its FID exceeds `train.watchdog_factor` x that best, or when a loss or weight is
no longer finite. Then it goes back to the best state (weights, optimisers, EMA, random streams,
history), takes the next remedy of `train.watchdog_remedies` (each rescue the next; the list
repeats), and goes on; after `train.watchdog_max_rescues` rescues a further collapse stops the run
with one sentence.

The remedies (params.WATCHDOG_REMEDIES): `halve_lr_d` halves D's learning rate; `r1` switches the
R1 penalty on at gamma 0.1 (the value the remedies study measured) or doubles it. Each holds for
the rest of the run, through later rollbacks.

Nothing here draws from training's random streams, so a run in which the watchdog never acts is
bit-identical to one without it. Its state (the best state, the rescues so far) goes into every
checkpoint: a resumed run rolls back as the uninterrupted one would. In a DDP job rank 0 judges
and every rank follows its verdict, each going back to its own random stream.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline import distributed, machine
from pipeline.distributed import World
from pipeline.errors import UserError
from pipeline.gan.remedies import Remedies
from pipeline.params import WATCHDOG_REMEDIES, TrainParams

if TYPE_CHECKING:
    from pipeline.gan.state import TrainState

R1_ON = 0.1  # the gamma `r1` switches on (docs/training.md, "Remedies for unstable runs")


class Collapsed(UserError):
    """The run collapsed again after its last rescue: it stops, its checkpoints kept."""


def remedy_names(spec: str) -> tuple[str, ...]:
    """`train.watchdog_remedies` (names joined by commas) as its names."""
    return tuple(spec.split(","))


@dataclass(frozen=True)
class Event:
    """One rescue: where the run collapsed, why, where it went back to, and what it changed."""

    number: int
    step: int
    reason: str
    back_to: int
    remedy: str

    def sentence(self) -> str:
        return (
            f"watchdog rescue {self.number} at step {self.step}: {self.reason}; back to step "
            f"{self.back_to}, remedy {self.remedy}"
        )

    def tags(self) -> dict[str, str]:
        """The run's tags of this rescue: how many so far, and this one's sentence."""
        return {"watchdog.rescues": str(self.number), f"watchdog.rescue_{self.number}": self.sentence()}

    def metric(self) -> dict[str, float]:
        """The run's metric row of this rescue, at the step of the collapse."""
        return {"step": self.step, "watchdog_rescue": self.number}


def watched_row(state: TrainState, window: int, signals: dict[str, float]) -> dict[str, float]:
    """A watchdog step's figures for the tracker: the judged signals, and D's mean accuracy over the
    last `window` steps."""
    accuracy = [row[2] for row in state.history[-window:]]
    return {
        "step": state.step,
        **{f"watchdog_{name}": value for name, value in signals.items()},
        "watchdog_d_acc": sum(accuracy) / max(len(accuracy), 1),
    }


@dataclass
class Watch:
    """What the watchdog keeps: the best quick FID, the state it was measured on, the rescues so far."""

    best_fid: float = math.inf
    best_step: int = 0
    best: dict[str, Any] | None = None  # the state of the best FID, as TrainState.to_checkpoint gives it
    remedies: list[str] = field(default_factory=list)  # applied so far, in order
    events: list[Event] = field(default_factory=list)
    # Each look's figures as the tracker got them (watched_row), those a rollback undid included.
    looks: list[dict[str, float]] = field(default_factory=list)

    def to_checkpoint(self) -> dict[str, Any]:
        return {
            "best_fid": self.best_fid,
            "best_step": self.best_step,
            "best": self.best,
            "remedies": list(self.remedies),
            "events": [vars(event) for event in self.events],
            "looks": [dict(look) for look in self.looks],
        }

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> Watch:
        return cls(
            float(saved["best_fid"]),
            int(saved["best_step"]),
            saved["best"],
            list(saved["remedies"]),
            [Event(**event) for event in saved["events"]],
            [dict(look) for look in saved.get("looks", [])],  # checkpoints from before looks were kept: none
        )

    def lr_d(self, params: TrainParams) -> float:
        return params.lr_d * 0.5 ** self.remedies.count("halve_lr_d")

    def training_remedies(self, params: TrainParams) -> Remedies:
        """The step's remedies: params', with R1 on (or doubled) once per `r1` rescue."""
        gamma = params.r1_gamma
        for _ in range(self.remedies.count("r1")):
            gamma = 2 * gamma if gamma else R1_ON
        return Remedies.of(params.model_copy(update={"r1_gamma": gamma}))


def record(watch: Watch | None) -> dict[str, list[dict[str, Any]]]:
    """What the train stage keeps of a run's watchdog (Layout.train_watchdog), for resend: every look's
    figures and every rescue (empty without the watchdog)."""
    if watch is None:
        return {"looks": [], "rescues": []}
    return {"looks": [dict(look) for look in watch.looks], "rescues": [vars(event) for event in watch.events]}


def recorded(saved: dict[str, list[dict[str, Any]]]) -> tuple[list[dict[str, float]], dict[str, str]]:
    """The metric rows and tags the tracker got of a `record`: the looks, and each rescue's metric and tags."""
    looks = [{name: float(value) for name, value in look.items()} for look in saved["looks"]]
    events = [Event(**event) for event in saved["rescues"]]
    tags = {key: value for event in events for key, value in event.tags().items()}
    return [*looks, *(event.metric() for event in events)], tags


def due(params: TrainParams, step: int) -> bool:
    return params.watchdog and step % params.watchdog_every == 0


def snapshot(state: TrainState, world: World) -> dict[str, Any]:
    """A copy of everything a rollback restores, every rank's random stream included (for checkpoints)."""
    if world.distributed:
        state.rank_rngs = distributed.all_gather(world, machine.rng_state())
    return copy.deepcopy(state.to_checkpoint("", with_watch=False))


def collapse_reason(watch: Watch, fid: float, factor: float) -> str | None:
    """Why a quick FID of `fid` is a collapse, or None."""
    if not math.isfinite(fid):
        return f"quick FID {fid}"
    if fid > factor * watch.best_fid:
        return f"quick FID {fid:.1f} > {factor:g} x the best {watch.best_fid:.1f} (step {watch.best_step})"
    return None


def judge(state: TrainState, params: TrainParams, world: World, fid: float | None) -> str | None:
    """At a watchdog step, with the writer's quick FID (None on other ranks): rank 0's verdict on every
    rank, the best state kept when `fid` is the best so far; the reason of a collapse, or None."""
    watch = state.watch
    assert watch is not None
    reason = None if fid is None else collapse_reason(watch, fid, params.watchdog_factor)
    fid, reason = distributed.broadcast(world, (fid, reason))
    if reason is None and fid < watch.best_fid:
        watch.best_fid, watch.best_step = fid, state.step
        watch.best = snapshot(state, world)
    return reason


def rescue(state: TrainState, params: TrainParams, world: World, reason: str) -> Event:
    """Back to the best state with the next remedy; Collapsed when the rescues are spent or there is no
    good state to go back to."""
    watch = state.watch
    assert watch is not None
    step = state.step
    if watch.best is None:
        raise Collapsed(
            f"training collapsed at step {step} ({reason}) before the watchdog's first good look; lower the "
            "learning rates (train.lr_d / train.lr_g) or look sooner (train.watchdog_every)."
        )
    if len(watch.events) >= params.watchdog_max_rescues:
        raise Collapsed(
            f"training collapsed at step {step} ({reason}) after {len(watch.events)} rescue(s) "
            f"({', '.join(watch.remedies)}); the best quick FID was {watch.best_fid:.1f} at step {watch.best_step}. "
            "Lower train.lr_d, raise train.r1_gamma, or allow more rescues (train.watchdog_max_rescues)."
        )
    names = remedy_names(params.watchdog_remedies)
    remedy = names[len(watch.events) % len(names)]
    assert remedy in WATCHDOG_REMEDIES
    state.restore(watch.best, world.rank, with_watch=False)
    watch.remedies.append(remedy)
    for group in state.opt_d.param_groups:
        group["lr"] = watch.lr_d(params)
    event = Event(len(watch.events) + 1, step, reason, state.step, remedy)
    watch.events.append(event)
    return event


def new_watch(params: TrainParams) -> Watch | None:
    return Watch() if params.watchdog else None


def step_remedies(watch: Watch | None, params: TrainParams) -> Remedies:
    """The remedies a training step applies: params', and the watchdog's since its rescues."""
    return watch.training_remedies(params) if watch is not None else Remedies.of(params)
