"""Command `sweep`: an Optuna study over params.yaml's `sweep.space`, every trial an MLflow child run.

A trial is the pipeline's own training (`train.new_state` + `train.train`) with the sampled
values and the sweep's budget, scored as the evaluate stage scores (`scoring.classify` +
`scoring.score`, at `sweep.eval_samples`) with the same frozen classifier; the objective is
that FID. The quick FIDs logged during training (`sweep.fid_every`) feed Optuna's pruner.

The study lives in an Optuna storage (SQLite at the repository root unless `sweep.storage`
names a database), so any number of processes, on one machine or several, share it. The
budget (`sweep.trials`) is the study's, not a process's: a process starts a trial only while
the study holds fewer. A trial whose process died (its heartbeat stops) or was interrupted
is run again with the same params; finished trials are never redone. A process with nothing
left to start waits for the trials still running elsewhere, so each ends with the report of
the whole study: a ranked table, figures on the parent run, and the best params as a
`dvc exp run -S ...` command.
"""

from __future__ import annotations

import csv
import datetime
import io
import os
import socket
import re
import shlex
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from pipeline import data, runtime, scoring, tracking
from pipeline.errors import UserError
from pipeline.layout import Layout
from pipeline.params import BOOKKEEPING, DEVICE, SET_BY_SWEEP, Params, flatten, load_params, validate_params, values_without
from pipeline.train import Callbacks, Diverged, TrainState, metric_rows, new_state, train

PARENT_RUN = "mlflow_parent_run_id"  # study user attribute: the sweep's MLflow parent run
FINGERPRINT = "fingerprint"  # study user attribute: what every process of one study must share
RUN_ID = "mlflow_run_id"  # trial user attribute: the trial's MLflow child run
OVER_BUDGET = "over_budget"  # trial user attribute: started in a race past the budget, given back
STARTED_BY = "started_by"  # trial user attribute: host:pid of the process running it, set first thing
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
        section, name = key.split(".", 1)
        raw[section][name] = value
    return validate_params(raw, source="a sweep trial's params")


def suggest(trial: optuna.Trial, params: Params) -> dict[str, Any]:
    """Sample `sweep.space`; an integer param gets integers, as params.yaml would hold."""
    values: dict[str, Any] = {}
    for key, dim in params.sweep.space.items():
        section, name = key.split(".", 1)
        if dim.choices is not None:
            values[key] = trial.suggest_categorical(key, dim.choices)
        elif isinstance(getattr(getattr(params, section), name), int):
            step = int(dim.step or 1)
            values[key] = trial.suggest_int(key, int(dim.low), int(dim.high), step=step, log=dim.log)  # type: ignore[arg-type]
        else:
            values[key] = trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)  # type: ignore[arg-type]
    return values


def budget_used(trials: list[FrozenTrial], up_to: int | None = None) -> int:
    """Trials (numbered <= up_to) that count against `sweep.trials`.

    A trial that was run again (its number is in a retry's history) and one given back
    over budget do not count; every other trial does, running, waiting or failed alike
    (a diverged trial is a result, not a reason to train yet another one).
    """
    skip = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
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


def _seconds(trial: FrozenTrial) -> float | None:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def table(trials: list[FrozenTrial], keys: list[str]) -> str:
    """The ranked table: rank, trial, state, FID (pruned: last quick FID @ step), seconds, params."""
    rows = [["rank", "trial", "state", "FID", "seconds", *keys]]
    rerun = {n: t.number for t in trials for n in t.system_attrs.get("retry_history", [])}
    for rank, t in enumerate(ranked(trials), 1):
        fid = score_of(t)
        if t.state == TrialState.PRUNED and fid is not None:
            fid_text = f"({fid:.1f} @{max(t.intermediate_values)})"
        else:
            fid_text = "" if fid is None else f"{fid:.2f}"
        seconds = _seconds(t)
        state = t.state.name + (f" (rerun #{rerun[t.number]})" if t.number in rerun else "")
        rows.append([
            str(rank), str(t.number), state, fid_text, "" if seconds is None else f"{seconds:.0f}",
            *(_format_value(t.params[k]) if k in t.params else "" for k in keys),
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _format_value(value: Any) -> str:
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
    return "dvc exp run " + " ".join(f"-S {shlex.quote(f'{k}={_format_value(v)}')}" for k, v in sets.items())


# --- one trial: the pipeline's own training, scored as the evaluate stage scores ------------


def run_trial(
    params: Params, images: torch.Tensor, labels: torch.Tensor, classifier: torch.nn.Module,
    reference: scoring.Reference, callbacks: Callbacks,
) -> tuple[dict[str, Any], np.ndarray]:  # fmt: skip
    """Train with `params` (on `images`' device; `labels` beside them) and score `evaluate.n_samples`
    samples: (scores, 5x5 grid)."""
    device = images.device
    state = new_state(params.model, params.train, device, len(reference.label_distribution))
    train(state, images, params.train, params.model.latent_dim, callbacks, labels=labels)
    p = params.evaluate
    pixels, _ = scoring.draw(state.output, p.n_samples, p.seed, p.batch_size, device, reference)
    samples = pixels.numpy()
    features, probs = scoring.classify(classifier, samples, p.batch_size, device)
    return scoring.score(features, probs, reference, p), data.make_grid(samples[:25])


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
                url, engine_kwargs=engine, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
                heartbeat_stale_trial_callback=on_stale,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - bad URL, missing driver, unreachable server
            # Processes started together on a fresh database race to create its tables: the losers
            # fail once, then find the tables made.
            error = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    raise UserError(f"Optuna storage {tracking.redact(url)} cannot be opened: {tracking.redact(error).rstrip('.')}.")


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
            runtime.inside_project(path, allow_outside, root)
        except UserError:
            raise UserError(f"Optuna storage {path} is outside the project ({root}); pass --allow-outside to "
                            "keep the study there anyway.") from None  # fmt: skip


def open_study(params: Params, storage: Any) -> tuple[optuna.Study, bool]:
    """Create the study, or load it when it exists; True when this process created it."""
    sweep = params.sweep
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=sweep.prune_after_trials, n_warmup_steps=sweep.prune_after_steps)
        if sweep.pruner == "median"
        else optuna.pruners.NopPruner()
    )

    def sampler(seed: int | None) -> optuna.samplers.BaseSampler:
        if sweep.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=sweep.startup_trials)

    try:
        study = optuna.create_study(
            storage=storage, study_name=sweep.study, direction="minimize", sampler=sampler(sweep.seed), pruner=pruner
        )
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        # A process joining (or resuming) a study must not replay the seeded draws of the first:
        # its first trials would repeat trials that already exist.
        return optuna.load_study(study_name=sweep.study, storage=storage, sampler=sampler(None), pruner=pruner), False


def fingerprint(params: Params, data_sha256: str, classifier_sha256: str) -> str:
    """What every process and every resumption of one study must share for its trials to compare:
    every param but the bookkeeping of the study (its name, storage, size) and the device."""
    sections = {name: values_without(getattr(params, name), BOOKKEEPING, DEVICE) for name in type(params).model_fields}
    return runtime.fingerprint(sections, data_sha256, classifier_sha256)


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
        t for t in trials
        if t.state == TrialState.RUNNING and STARTED_BY not in t.user_attrs and t.datetime_start is not None
        and (now - t.datetime_start).total_seconds() > grace_s
    ]  # fmt: skip


def fail_orphans(study: optuna.Study, grace_s: float) -> None:
    for trial in orphans(study.get_trials(deepcopy=False), datetime.datetime.now(), grace_s):
        try:  # whichever process fails it first queues it again; the others find it finished
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except RuntimeError:  # optuna's UpdateFinishedTrialError
            continue
        retry(study, study._storage.get_trial(trial._trial_id))


def work(study: optuna.Study, objective: Callable[[optuna.Trial], float], budget: int, poll_s: float,
         catch: tuple[type[Exception], ...]) -> None:  # fmt: skip
    """Run trials until the study holds `budget` of them, then wait for those running elsewhere."""
    waiting_said = False
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # dead processes' trials -> FAIL, queued again
        fail_orphans(study, grace_s=max(60.0, 4 * poll_s))
        trials = study.get_trials(deepcopy=False)
        states = {t.state for t in trials}
        if budget_used(trials) < budget or TrialState.WAITING in states:
            # n_trials=1 keeps Optuna's own trial lifecycle (heartbeat thread, pruning, tell).
            study.optimize(objective, n_trials=1, catch=catch)
            waiting_said = False
        elif TrialState.RUNNING in states:
            if not waiting_said:
                running = sorted(t.number for t in trials if t.state == TrialState.RUNNING)
                print(f"waiting for trial(s) {running}, running in other processes (or stale within {poll_s * 2:.0f} s)")
                waiting_said = True
            time.sleep(poll_s)
        else:
            return


# --- the command ---------------------------------------------------------------------------


def retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue `trial` again with its params; Optuna records the retry history that budget_used reads."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(study, trial)


def parent_run(study: optuna.Study, created: bool, experiment_id: str, tags: dict[str, str], mark: str,
               where: str) -> tracking.MlflowRun:  # fmt: skip
    """The sweep's MLflow parent run: made by the process that created the study, found by the others."""
    name = study.study_name
    if created:
        study.set_user_attr(FINGERPRINT, mark)
        parent = tracking.MlflowRun.create(experiment_id, name, tags)
        study.set_user_attr(PARENT_RUN, parent.run_id)
        return parent
    run_id = wait_for_attr(study, PARENT_RUN)
    if run_id is None:
        raise UserError(f"study '{name}' in {where} has no MLflow parent run; name a new study with --study.")
    if study.user_attrs.get(FINGERPRINT) != mark:
        raise UserError(
            f"study '{name}' in {where} was started with other params, data or classifier; "
            "run it with those, or name a new study with --study."
        )
    found = tracking.MlflowRun.existing(run_id, experiment_id)
    if found is None:
        raise UserError(f"the MLflow parent run {run_id} of study '{name}' is not in this tracking store; "
                        "name a new study with --study.")  # fmt: skip
    found.reopen()  # a resumed sweep is running again
    return found


@dataclass
class Objective:
    """One Optuna trial: budget check, MLflow child run, training with pruning, final score."""

    study: optuna.Study
    params: Params
    images: torch.Tensor
    labels: torch.Tensor
    classifier: torch.nn.Module
    reference: scoring.Reference
    parent: tracking.MlflowRun
    tags: dict[str, str]
    running: list[int] = field(default_factory=list)  # the trial in progress, for the interrupt handler

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr(STARTED_BY, f"{socket.gethostname()}:{os.getpid()}")  # alive: see orphans()
        sweep = self.params.sweep
        if budget_used(self.study.get_trials(deepcopy=False), up_to=trial.number) > sweep.trials:
            trial.set_user_attr(OVER_BUDGET, True)
            raise OverBudget(f"trial {trial.number} started past the budget of {sweep.trials}; given back")
        self.running[:] = [trial.number]
        values = suggest(trial, self.params)
        p = trial_params(self.params, values)
        name, tags = f"{sweep.study} #{trial.number}", {**self.tags, "sweep.trial": str(trial.number)}
        run = self.parent.child(name, tags)
        trial.set_user_attr(RUN_ID, run.run_id)
        run.log_params(flatten(p))
        print(f"trial {trial.number}: " + ", ".join(f"{k}={_format_value(v)}" for k, v in values.items()))

        def on_log(rows: list[tuple[int, float, float, float]], rate: float) -> None:
            run.log_metrics(metric_rows(rows))

        def on_eval(state: TrainState) -> None:
            fid = scoring.generator_fid(state.output, self.classifier, self.reference, p.train.fid_samples,
                                        p.evaluate.seed, p.evaluate.batch_size, self.images.device)  # fmt: skip
            run.log_metrics([{"step": state.step, "fid_quick": fid}])
            print(f"trial {trial.number}: step {state.step}, quick FID {fid:.1f} ({p.train.fid_samples} samples)")
            trial.report(fid, state.step)
            if state.step < p.train.steps and trial.should_prune():
                raise optuna.TrialPruned(f"quick FID {fid:.1f} at step {state.step} is worse than the median")

        started, outcome = time.perf_counter(), "FAIL"
        try:
            scores, grid = run_trial(p, self.images, self.labels, self.classifier, self.reference, Callbacks(on_log=on_log, on_eval=on_eval))
            outcome = "COMPLETE"
        except optuna.TrialPruned as exc:
            outcome = "PRUNED"
            print(f"trial {trial.number}: pruned, {exc}")
            raise
        except KeyboardInterrupt:
            outcome = "INTERRUPTED"
            raise
        except Diverged as exc:
            print(f"trial {trial.number}: failed, {exc}")
            run.set_tags({"sweep.error": str(exc)})
            raise
        finally:
            if outcome != "INTERRUPTED":
                self.running.clear()
            seconds = time.perf_counter() - started
            run.set_tags({"sweep.state": outcome})
            run.log_metrics([{"step": p.train.steps, "seconds": seconds}])
            if outcome != "COMPLETE":  # pruned and interrupted trials end KILLED, failures FAILED
                run.finish("FAILED" if outcome == "FAIL" else "KILLED")
        run.log_metrics([{"step": p.train.steps, **{f"eval_{k}": float(v) for k, v in scores.items()
                                                    if isinstance(v, (int, float))}}])  # fmt: skip
        run.log_image(grid, key="samples", step=p.train.steps)
        run.finish()
        print(f"trial {trial.number}: FID {scores['fid']:.2f} at N={p.evaluate.n_samples} ({seconds:.0f} s)")
        if run.lost:
            print(f"warning: trial {trial.number}: {run.lost_summary()}")
        return float(scores["fid"])


def main(
    params_path: Path = Path("params.yaml"), study: str | None = None, storage: str | None = None,
    trials: int | None = None, allow_outside: bool = False,
) -> None:  # fmt: skip
    params = load_params(params_path)
    paths = Layout(dataset=params.data.dataset)
    options = {k: v for k, v in {"study": study, "storage": storage, "trials": trials}.items() if v is not None}
    if options:  # command-line values are checked exactly as params.yaml's
        raw = params.model_dump(mode="json")
        raw["sweep"].update(options)
        params = validate_params(raw, source=f"{params_path} with {', '.join('--' + k for k in options)}")
    sweep, env = params.sweep, dict(os.environ)
    url = storage_url(params, tracking.project_root(Path.cwd(), env))
    check_storage_location(url, tracking.project_root(Path.cwd(), env), allow_outside)  # before anything is written
    where = tracking.redact(url)
    device = runtime.pick_device(params.train.device)
    classifier, classifier_sha = scoring.load_classifier(paths.classifier, params.classifier.feature_dim, device)
    reference = scoring.load_reference(paths.reference, classifier_sha256=classifier_sha)
    dataset = data.load_prepared(paths.prepared, len(data.class_names(params.data)))
    images, labels = torch.from_numpy(dataset.train_images).to(device), torch.from_numpy(dataset.train_labels).to(device)
    data_sha = runtime.sha256_file(paths.prepared)
    uri, experiment_id, root = tracking.open_experiment(params.tracking.experiment, Path.cwd(), env)

    def on_stale(st: optuna.Study, trial: FrozenTrial) -> None:
        """A trial whose process died: its child run ends KILLED and the trial is queued again."""
        run_id = trial.user_attrs.get(RUN_ID)
        if run_id and (run := tracking.MlflowRun.existing(run_id, experiment_id)) is not None:
            run.set_tags({"sweep.state": "STALE"})
            run.finish("KILLED")
        retry(st, trial)

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # this command prints its own line per trial
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study_, created = open_study(params, open_storage(url, sweep.heartbeat_s, on_stale))
    tags = {
        **tracking.git_info(root), **tracking.dvc_tags(env), "sweep": sweep.study, "stage": "sweep",
        "device": runtime.device_name(device), "torch": torch.__version__, "data.sha256": data_sha,
        "dataset": params.data.dataset,
    }  # fmt: skip
    mark = fingerprint(params, data_sha, classifier_sha)
    parent = parent_run(study_, created, experiment_id, {**tags, "sweep.storage": where}, mark, where)
    if created:  # once: MLflow refuses to change a logged param, and --trials may grow
        parent.log_params(flatten(params))
    print(f"sweep '{sweep.study}': {sweep.trials} trials of {sweep.steps} steps in {where} "
          f"({'new' if created else 'joined'}); MLflow parent run {parent.run_id} at {uri}")  # fmt: skip

    objective = Objective(study_, params, images, labels, classifier, reference, parent, tags)
    try:
        work(study_, objective, sweep.trials, float(sweep.heartbeat_s), catch=(Diverged, OverBudget))
    except KeyboardInterrupt:
        # Optuna marked the trial FAIL: queue it again, so that running the sweep again redoes it.
        for t in study_.get_trials(deepcopy=False):
            if t.number in objective.running and t.state == TrialState.FAIL:
                retry(study_, t)
        print(f"sweep interrupted; run the same command again to resume study '{sweep.study}'.")
        raise
    except Exception as exc:
        if (reason := storage_failure(exc)) is None:
            raise
        raise UserError(
            f"Optuna storage {where} went away ({tracking.redact(reason).rstrip('.')}); the finished trials are "
            "kept there: run the same command again once it is back."
        ) from None
    report(study_, params, Layout(root), parent)
    parent.finish()  # the report is on disk either way


def report(study: optuna.Study, params: Params, paths: Layout, parent: tracking.Tracker) -> None:
    """Ranked table, figures, best params as a `dvc exp run` command; on disk and on `parent`."""
    trials = study.get_trials(deepcopy=False)
    keys = list(params.sweep.space)
    text = table(trials, keys)
    print(text)
    out = paths.sweeps / re.sub(r"[^\w.-]+", "_", params.sweep.study)
    with runtime.atomic_open(out / "trials.txt") as fh:
        fh.write(text + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial", "state", "fid", "seconds", *keys, "mlflow_run_id"])
    for t in ranked(trials):
        writer.writerow([t.number, t.state.name, score_of(t), _seconds(t), *(t.params.get(k) for k in keys),
                         t.user_attrs.get(RUN_ID, "")])  # fmt: skip
    with runtime.atomic_open(out / "trials.csv") as fh:
        fh.write(buffer.getvalue())
    written = [out / "trials.txt", out / "trials.csv", *figures(study, out)]

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    counts = {f"trials_{s.name.lower()}": sum(t.state == s for t in trials) for s in
              (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}  # fmt: skip
    if complete:
        best = study.best_trial
        command = dvc_command(best, params)
        runtime.write_json(out / "best.json", {
            "trial": best.number, "fid": best.value, "n_samples": params.sweep.eval_samples, "params": best.params,
            "mlflow_run_id": best.user_attrs.get(RUN_ID), "dvc_exp_run": command,
        })  # fmt: skip
        with runtime.atomic_open(out / "best.txt") as fh:
            fh.write(command + "\n")
        written += [out / "best.json", out / "best.txt"]
        parent.log_metrics([{"step": 0, "best_fid": float(best.value or 0.0), **counts}])
        parent.set_tags({"sweep.best_trial": str(best.number), "sweep.best_run": best.user_attrs.get(RUN_ID, "")})
        print(f"best: trial {best.number}, FID {best.value:.2f} at N={params.sweep.eval_samples}; reproduce it with\n  {command}")
    else:
        parent.log_metrics([{"step": 0, **counts}])
        print("no trial finished: nothing to reproduce.")
    for path in written:
        parent.log_artifact(path, "sweep")
    print(f"report -> {out.relative_to(paths.root) if out.is_relative_to(paths.root) else out}")
    if parent.lost:
        print(f"warning: {parent.lost_summary()}")


def figures(study: optuna.Study, out: Path) -> list[Path]:
    """Optimisation history, quick-FID curves and param importances as PNGs (skipped when undefined)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    made = []
    finished = sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    for name, plot in (
        ("optimization_history", plots.plot_optimization_history),
        ("quick_fid", plots.plot_intermediate_values),
        ("param_importances", plots.plot_param_importances),
    ):
        if name == "param_importances" and finished < 3:  # fewer points than that say nothing
            print(f"figure {name} skipped: it needs 3 finished trials, the study has {finished}")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
            try:
                axes = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. importances of one trial
                print(f"figure {name} skipped: {exc}")
                continue
        figure = np.ravel(axes)[0].figure
        figure.tight_layout()
        with runtime.atomic_path(out / f"{name}.png") as tmp:
            figure.savefig(tmp, format="png", dpi=110)
        plt.close(figure)
        made.append(out / f"{name}.png")
    return made
