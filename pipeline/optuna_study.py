"""TODO docstring"""

from __future__ import annotations

import datetime
import shlex
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline import files
from pipeline.errors import UserError
from pipeline.layout import Layout
from pipeline.params import Params, validate_params
from pipeline.search_space import SET_BY_SWEEP, assign, lookup
from pipeline.sections import BOOKKEEPING, DEVICE, fingerprinted
from pipeline.tracking import connection

PARENT_RUN = "mlflow_parent_run_id"  # study user attribute: the sweep's MLflow parent run
FINGERPRINT = "fingerprint"  # study user attribute: what every process of one study must share
RUN_ID = "mlflow_run_id"  # trial user attribute: the trial's MLflow child run
OVER_BUDGET = "over_budget"  # trial user attribute: started in a race past the budget, given back
STARTED_BY = "started_by"  # trial user attribute: host:pid of the process running it, set first thing
RESULT = "failed_as_result"  # trial user attribute: it failed in its process (diverged), a result
MAX_RETRIES = 3  # a trial that keeps killing its process is not run forever


class OverBudget(Exception):
    """Two processes started the study's last trial at once: the later one gives its trial back."""


# --- the pure core: a trial's params, the budget, the report ---------------------------------


def trial_params(params: Params, values: dict[str, Any]) -> Params:
    """The params one trial trains with: params.yaml, the sweep's budget, then the sampled values."""
    sweep = params.sweep
    fixed = {key: getattr(sweep, source.split(".")[1]) for key, source in SET_BY_SWEEP.items()}
    raw = params.model_dump(mode="json")
    for key, value in {**fixed, "evaluate.n_samples": sweep.eval_samples, **values}.items():
        assign(raw, key, value)
    return validate_params(raw, source="a sweep trial's params")


def suggest(trial: optuna.Trial, params: Params) -> dict[str, Any]:
    """Sample `sweep.space`; an integer param gets integers, as params.yaml would hold."""
    values: dict[str, Any] = {}
    for key, dim in params.sweep.space.items():
        if dim.choices is not None:
            values[key] = trial.suggest_categorical(key, dim.choices)
        elif isinstance(lookup(params, key), int):
            step = int(dim.step or 1)
            values[key] = trial.suggest_int(key, int(dim.low), int(dim.high), step=step, log=dim.log)  # type: ignore[arg-type]
        else:
            values[key] = trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)  # type: ignore[arg-type]
    return values


def reruns(trials: list[FrozenTrial]) -> dict[int, int]:
    """Each trial that was queued again: its number -> its retry's (from the retries' Optuna history)."""
    return {n: t.number for t in trials for n in t.system_attrs.get("retry_history", [])}


def budget_used(trials: list[FrozenTrial], up_to: int | None = None) -> int:
    """Trials (numbered <= up_to) that count against `sweep.trials`.

    A trial that was run again (its number is in a retry's history) and one given back
    over budget do not count; every other trial does, running, waiting or failed alike
    (a diverged trial is a result, not a reason to train yet another one).
    """
    skip = set(reruns(trials))
    skip |= {t.number for t in trials if t.user_attrs.get(OVER_BUDGET)}
    return sum(1 for t in trials if t.number not in skip and (up_to is None or t.number <= up_to))


def score_of(trial: FrozenTrial) -> float | None:
    """The final FID of a finished trial, the last quick FID of a pruned one, else None."""
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return trial.value


def ranked(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Finished trials by FID, then pruned ones by their last quick FID, then the rest."""
    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.RUNNING: 2, TrialState.WAITING: 3}
    shown = [t for t in trials if not t.user_attrs.get(OVER_BUDGET)]

    def key(t: FrozenTrial) -> tuple[int, float, int]:
        fid = score_of(t)
        return order.get(t.state, 4), float("inf") if fid is None else fid, t.number

    return sorted(shown, key=key)


def trial_seconds(trial: FrozenTrial) -> float | None:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def table(trials: list[FrozenTrial], keys: list[str]) -> str:
    """The ranked table: rank, trial, state, FID (pruned: last quick FID @ step), seconds, params."""
    rows = [["rank", "trial", "state", "FID", "seconds", *keys]]
    rerun = reruns(trials)
    for rank, t in enumerate(ranked(trials), 1):
        fid = score_of(t)
        if t.state == TrialState.PRUNED and fid is not None:
            fid_text = f"({fid:.1f} @{max(t.intermediate_values)})"
        else:
            fid_text = "" if fid is None else f"{fid:.2f}"
        seconds = trial_seconds(t)
        state = t.state.name + (f" (rerun #{rerun[t.number]})" if t.number in rerun else "")
        rows.append(
            [
                str(rank),
                str(t.number),
                state,
                fid_text,
                "" if seconds is None else f"{seconds:.0f}",
                *(format_value(t.params[k]) if k in t.params else "" for k in keys),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # YAML spelling, as `dvc exp run -S` parses it
    if isinstance(value, float):
        return repr(value)  # every digit: the command must reproduce the trial exactly
    return str(value)


def dvc_command(best: FrozenTrial, params: Params) -> str:
    """`dvc exp run -S ...` that trains the best trial's generator as a DVC experiment."""
    sets = dict(best.params)
    if params.sweep.steps != params.train.steps:  # the trial's budget; drop it to train longer
        sets = {"train.steps": params.sweep.steps, **sets}
    return "dvc exp run " + " ".join(f"-S {shlex.quote(f'{k}={format_value(v)}')}" for k, v in sets.items())


# --- the study: storage, budget, processes ----------------------------------------------------


def storage_url(params: Params, root: Path) -> str:
    """`sweep.storage`, else a SQLite file at the repository root (next to mlflow.db)."""
    return params.sweep.storage or f"sqlite:///{Layout(root).optuna_db}"


def open_storage(url: str, heartbeat_s: int, on_stale: Callable[[optuna.Study, FrozenTrial], None]) -> Any:
    """An RDB storage with heartbeats, so the trials of a killed process are found and run again."""
    from optuna.storages import RDBStorage

    # SQLite's default 5 s lock timeout is short for several processes writing trials and heartbeats.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(3):
        time.sleep(attempt)  # before a retry only
        try:
            return RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=heartbeat_s,
                grace_period=2 * heartbeat_s,
                heartbeat_stale_trial_callback=on_stale,
            )
        except Exception as exc:  # noqa: BLE001 - bad URL, missing driver, unreachable server
            # Processes started together on a fresh database race to create its tables: the losers
            # fail once, then find the tables made.
            error = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    raise UserError(
        f"Optuna storage {connection.redact(url)} cannot be opened: {connection.redact(error).rstrip('.')}."
    )


def storage_failure(exc: BaseException) -> str | None:
    """The first line of the database error behind `exc` (somewhere in its chain), or None if there is none.

    A database that goes away mid-study surfaces through Optuna as many types (StorageInternalError,
    and in optuna 5.1 even an UnboundLocalError); the driver's own error in the chain says what happened.
    """
    import sqlalchemy.exc

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            cause = seen.orig if getattr(seen, "orig", None) is not None else seen
            text = str(cause).strip()
            return (text.splitlines()[0] if text else type(cause).__name__)[:200]
        seen = seen.__cause__ or seen.__context__
    return None


def check_storage_location(url: str, root: Path, allow_outside: bool) -> None:
    """A SQLite study file outside the project needs the same consent as --output (--allow-outside)."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///").split("?")[0])
        try:
            files.inside_project(path, allow_outside, root)
        except UserError:
            raise UserError(
                f"Optuna storage {path} is outside the project ({root}); pass --allow-outside to "
                "keep the study there anyway."
            ) from None


def open_study(params: Params, storage: Any) -> tuple[optuna.Study, bool]:
    """Create the study, or load it when it exists; True when this process created it."""
    sweep = params.sweep
    pruner = (
        optuna.pruners.MedianPruner(
            n_startup_trials=sweep.prune_after_trials, n_warmup_steps=sweep.prune_after_steps
        )
        if sweep.pruner == "median"
        else optuna.pruners.NopPruner()
    )

    def sampler(seed: int | None) -> optuna.samplers.BaseSampler:
        if sweep.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=sweep.startup_trials)

    try:
        study = optuna.create_study(
            storage=storage,
            study_name=sweep.study,
            direction="minimize",
            sampler=sampler(sweep.seed),
            pruner=pruner,
        )
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        # A process joining (or resuming) a study must not replay the seeded draws of the first:
        # its first trials would repeat trials that already exist.
        return optuna.load_study(
            study_name=sweep.study, storage=storage, sampler=sampler(None), pruner=pruner
        ), False


def fingerprint(params: Params, data_sha256: str, classifier_sha256: str) -> str:
    """What every process and every resumption of one study must share for its trials to compare:
    every param but the bookkeeping of the study (its name, storage, size) and the device."""
    sections = {
        name: fingerprinted(getattr(params, name), BOOKKEEPING, DEVICE) for name in type(params).model_fields
    }
    return files.fingerprint(sections, data_sha256, classifier_sha256)


def wait_for_attr(study: optuna.Study, key: str, timeout_s: float = 60.0) -> Any:
    """A study attribute the creating process sets right after creating the study."""
    deadline = time.monotonic() + timeout_s
    while (value := study.user_attrs.get(key)) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    return value


def orphans(trials: list[FrozenTrial], now: datetime.datetime, grace_s: float) -> list[FrozenTrial]:
    """RUNNING trials whose process died before its objective began (the storage went away, or a kill,
    between creating the trial and its first heartbeat): Optuna never finds them stale, as they have
    no heartbeat, and every process would wait for them forever."""
    return [
        t
        for t in trials
        if t.state == TrialState.RUNNING
        and STARTED_BY not in t.user_attrs
        and t.datetime_start is not None
        and (now - t.datetime_start).total_seconds() > grace_s
    ]


def retries_due(trials: list[FrozenTrial], now: datetime.datetime, grace_s: float) -> list[FrozenTrial]:
    """FAILed trials that another process is queueing again right now: failed from outside their process (stale,
    orphaned) or interrupted, with no retry queued yet. Optuna fails a stale trial first and queues its retry
    after (the process doing it reports the child run to MLflow in between), so a process that looked between
    the two would report the study finished without the retry. Not for long: a retry that has not come after
    `grace_s` is not coming (the process queueing it died too)."""
    queued = reruns(trials)
    return [
        t
        for t in trials
        if t.state == TrialState.FAIL
        and t.number not in queued
        and not t.user_attrs.get(RESULT)
        and not t.user_attrs.get(OVER_BUDGET)
        and len(t.system_attrs.get("retry_history", [])) < MAX_RETRIES  # beyond it Optuna queues none
        and t.datetime_complete is not None
        and (now - t.datetime_complete).total_seconds() < grace_s
    ]


def fail_orphans(study: optuna.Study, grace_s: float) -> None:
    for trial in orphans(study.get_trials(deepcopy=False), datetime.datetime.now(), grace_s):
        try:  # whichever process fails it first queues it again; the others find it finished
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except RuntimeError:  # optuna's UpdateFinishedTrialError
            continue
        retry(study, study._storage.get_trial(trial._trial_id))


def work(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    budget: int,
    poll_s: float,
    catch: tuple[type[Exception], ...],
) -> None:
    """Run trials until the study holds `budget` of them, then wait for those running elsewhere."""
    waiting_said = False
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # dead processes' trials -> FAIL, queued again
        grace_s = max(60.0, 4 * poll_s)
        fail_orphans(study, grace_s)
        trials = study.get_trials(deepcopy=False)
        states = {t.state for t in trials}
        due = retries_due(trials, datetime.datetime.now(), grace_s)
        if budget_used(trials) < budget or TrialState.WAITING in states:
            # n_trials=1 keeps Optuna's own trial lifecycle (heartbeat thread, pruning, tell).
            study.optimize(objective, n_trials=1, catch=catch)
            waiting_said = False
        elif TrialState.RUNNING in states or due:
            if not waiting_said:
                running = sorted(t.number for t in trials if t.state == TrialState.RUNNING)
                print(
                    f"waiting for trial(s) {running}, running in other processes (or stale within {poll_s * 2:.0f} s)"
                    + (f", and for the retry of trial(s) {[t.number for t in due]}" if due else "")
                )
                waiting_said = True
            time.sleep(poll_s)
        else:
            return


def retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue `trial` again with its params; Optuna records the retry history that budget_used reads."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(study, trial)
