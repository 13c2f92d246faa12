"""Command `sweep`: an Optuna study over params.yaml's `sweep.space`, every trial an MLflow child run.

A trial is the pipeline's own training (`gan.loop.new_state` + `gan.loop.train`) with the sampled
values and the sweep's budget, scored as the evaluate stage scores (`frozen_classifier.classify`
+ `scorer.score`, at `sweep.eval_samples`) with the same frozen classifier; the objective is
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
import io
import os
import re
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from pipeline import data, files, machine
from pipeline.errors import UserError
from pipeline.gan import levers
from pipeline.gan.loop import Callbacks, Diverged, metric_rows, train
from pipeline.gan.state import TrainState, new_state
from pipeline.gan.watchdog import Collapsed, Event
from pipeline.layout import Layout
from pipeline.optuna_study import (
    FINGERPRINT,
    OVER_BUDGET,
    PARENT_RUN,
    RESULT,
    RUN_ID,
    STARTED_BY,
    OverBudget,
    budget_used,
    check_storage_location,
    dvc_command,
    fingerprint,
    format_value,
    open_storage,
    open_study,
    ranked,
    retry,
    score_of,
    storage_failure,
    storage_url,
    suggest,
    table,
    trial_params,
    trial_seconds,
    wait_for_attr,
    work,
)
from pipeline.params import Params, SweepParams, flatten, load_params, validate_params
from pipeline.scoring import frozen_classifier, scorer
from pipeline.scoring.scorer import Scorer
from pipeline.tracking import connection, runs
from pipeline.tracking.tracker import Run, Tracker

# --- one trial: the pipeline's own training, scored as the evaluate stage scores ------------


def run_trial(
    params: Params, images: torch.Tensor, labels: torch.Tensor, frozen: Scorer, callbacks: Callbacks
) -> tuple[dict[str, Any], np.ndarray]:
    """Train with `params` (on `images`' device; `labels` beside them) and score `evaluate.n_samples`
    samples: (scores, 5x5 grid)."""
    device, reference = images.device, frozen.reference
    params, said = levers.choose(params, device, len(reference.label_distribution))  # the `auto` speed levers
    if said:
        print(said)
    state = new_state(params.model, params.train, device, len(reference.label_distribution))
    train(state, images, params.train, params.model.latent_dim, callbacks, labels=labels)
    p = params.evaluate
    pixels, _ = scorer.draw(state.given(), p.n_samples, p.seed, p.batch_size, device, reference)
    samples = pixels.numpy()
    features, probs = frozen_classifier.classify(frozen.classifier, samples, p.batch_size, device)
    return scorer.score(features, probs, reference, p), data.make_grid(samples[:25])


# --- the command ---------------------------------------------------------------------------


def parent_run(
    study: optuna.Study, created: bool, experiment_id: str, tags: dict[str, str], mark: str, where: str
) -> Run:
    """The sweep's MLflow parent run: made by the process that created the study, found by the others."""
    name = study.study_name
    if created:
        study.set_user_attr(FINGERPRINT, mark)
        parent = runs.shared_run(experiment_id, name, tags)
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
    found = runs.existing_run(run_id, experiment_id)
    if found is None:
        raise UserError(
            f"the MLflow parent run {run_id} of study '{name}' is not in this tracking store; "
            "name a new study with --study."
        )
    found.reopen()  # a resumed sweep is running again
    return found


def watching(frozen: Scorer, p: Params, run: Run, number: int) -> dict[str, Any]:
    """Trial `number`'s watchdog callbacks (train.watchdog): its judge, and each rescue printed, tagged and
    logged as the train stage logs it."""

    def on_rescue(event: Event) -> None:
        print(f"trial {number}: {event.sentence()}")
        run.set_tags(event.tags())
        run.log_metrics([event.metric()])

    return {"on_watch": lambda state: frozen.watch(state.output, p)["fid"], "on_rescue": on_rescue}


@dataclass
class Objective:
    """One Optuna trial: budget check, MLflow child run, training with pruning, final score."""

    study: optuna.Study
    params: Params
    images: torch.Tensor
    labels: torch.Tensor
    frozen: Scorer
    parent: Run
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
        run = self.open_run(trial, p, values)

        def on_log(rows: list[tuple[int, float, float, float]], rate: float) -> None:
            run.log_metrics(metric_rows(rows))

        def on_eval(state: TrainState) -> None:
            fid = self.frozen.quick_fid(state.output, p)
            run.log_metrics([{"step": state.step, "fid_quick": fid}])
            print(
                f"trial {trial.number}: step {state.step}, quick FID {fid:.1f} ({p.train.fid_samples} samples)"
            )
            trial.report(fid, state.step)
            if state.step < p.train.steps and trial.should_prune():
                raise optuna.TrialPruned(f"quick FID {fid:.1f} at step {state.step} is worse than the median")

        started, outcome = time.perf_counter(), "FAIL"
        try:
            callbacks = Callbacks(
                on_log=on_log, on_eval=on_eval, **watching(self.frozen, p, run, trial.number)
            )
            scores, grid = run_trial(p, self.images, self.labels, self.frozen, callbacks)
            outcome = "COMPLETE"
        except optuna.TrialPruned as exc:
            outcome = "PRUNED"
            print(f"trial {trial.number}: pruned, {exc}")
            raise
        except KeyboardInterrupt:
            outcome = "INTERRUPTED"
            raise
        except (Diverged, Collapsed) as exc:
            print(f"trial {trial.number}: failed, {exc}")
            trial.set_user_attr(RESULT, True)  # a result: the other processes do not wait for a retry of it
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
        numbers = {f"eval_{k}": float(v) for k, v in scores.items() if isinstance(v, (int, float))}
        run.log_metrics([{"step": p.train.steps, **numbers}])
        run.log_image(grid, key="samples", step=p.train.steps)
        run.finish()
        print(f"trial {trial.number}: FID {scores['fid']:.2f} at N={p.evaluate.n_samples} ({seconds:.0f} s)")
        if run.lost:
            print(f"warning: trial {trial.number}: {run.lost_summary()}")
        return float(scores["fid"])

    def open_run(self, trial: optuna.Trial, p: Params, values: dict[str, Any]) -> Run:
        """The trial's MLflow run, a child of the sweep's, with its params."""
        # N beside every FID: a trial is scored at sweep.eval_samples, a training run at evaluate.n_samples.
        tags = {**self.tags, "sweep.trial": str(trial.number), "eval.n_samples": str(p.evaluate.n_samples)}
        run = self.parent.child(f"{self.params.sweep.study} #{trial.number}", tags)
        trial.set_user_attr(RUN_ID, run.run_id)
        run.log_params(flatten(p))
        print(f"trial {trial.number}: " + ", ".join(f"{k}={format_value(v)}" for k, v in values.items()))
        return run


def main(
    params_path: Path = Path("params.yaml"),
    study: str | None = None,
    storage: str | None = None,
    trials: int | None = None,
    allow_outside: bool = False,
) -> None:
    params = with_options(load_params(params_path), params_path, study=study, storage=storage, trials=trials)
    paths, env = Layout(dataset=params.data.dataset), dict(os.environ)
    url = storage_url(params, connection.project_root(Path.cwd(), env))
    check_storage_location(
        url, connection.project_root(Path.cwd(), env), allow_outside
    )  # before anything is written
    where = connection.redact(url)
    device = machine.pick_device(params.train.device)
    frozen = Scorer.load(paths, params, device)
    dataset = data.load_prepared(paths.prepared, len(data.class_names(params.data)))
    images = torch.from_numpy(dataset.train_images).to(device)
    labels = torch.from_numpy(dataset.train_labels).to(device)
    data_sha = files.sha256_file(paths.prepared)
    uri, experiment_id, root = connection.open_experiment(params.tracking.experiment, Path.cwd(), env)
    study_, created = shared_study(params, url, experiment_id)
    tags = {
        **connection.run_tags("sweep", params, env, root, device),
        "sweep": params.sweep.study,  # over DCGAN_SWEEP's: this study is the sweep
        "data.sha256": data_sha,
    }
    mark = fingerprint(params, data_sha, frozen.sha256)
    parent = parent_run(study_, created, experiment_id, {**tags, "sweep.storage": where}, mark, where)
    if created:  # once: MLflow refuses to change a logged param, and --trials may grow
        parent.log_params(flatten(params))
    print(
        f"sweep '{params.sweep.study}': {params.sweep.trials} trials of {params.sweep.steps} steps in {where} "
        f"({'new' if created else 'joined'}); MLflow parent run {parent.run_id} at {uri}"
    )
    objective = Objective(study_, params, images, labels, frozen, parent, tags)
    run_study(study_, objective, params.sweep, where)
    report(study_, params, Layout(root), parent)
    parent.finish()  # the report is on disk either way


def with_options(params: Params, params_path: Path, **given: str | int | None) -> Params:
    """`params` with the command line's sweep options, checked exactly as params.yaml's."""
    options = {key: value for key, value in given.items() if value is not None}
    if not options:
        return params
    raw = params.model_dump(mode="json")
    raw["sweep"].update(options)
    return validate_params(raw, source=f"{params_path} with {', '.join('--' + k for k in options)}")


def shared_study(params: Params, url: str, experiment_id: str) -> tuple[optuna.Study, bool]:
    """The study in its storage at `url`, and whether this process created it."""

    def on_stale(st: optuna.Study, trial: FrozenTrial) -> None:
        """A trial whose process died: it is queued again (first: the other processes wait for it, see
        retries_due), and its child run ends KILLED."""
        retry(st, trial)
        run_id = trial.user_attrs.get(RUN_ID)
        if run_id and (run := runs.existing_run(run_id, experiment_id)) is not None:
            run.set_tags({"sweep.state": "STALE"})
            run.finish("KILLED")

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # this command prints its own line per trial
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return open_study(params, open_storage(url, params.sweep.heartbeat_s, on_stale))


def run_study(study: optuna.Study, objective: Objective, sweep: SweepParams, where: str) -> None:
    """Run trials until the study holds `sweep.trials`; an interrupted trial is queued again."""
    try:
        work(study, objective, sweep.trials, float(sweep.heartbeat_s), catch=(Diverged, OverBudget))
    except KeyboardInterrupt:
        # Optuna marked the trial FAIL: queue it again, so that running the sweep again redoes it.
        for t in study.get_trials(deepcopy=False):
            if t.number in objective.running and t.state == TrialState.FAIL:
                retry(study, t)
        print(f"sweep interrupted; run the same command again to resume study '{sweep.study}'.")
        raise
    except Exception as exc:
        if (reason := storage_failure(exc)) is None:
            raise
        raise UserError(
            f"Optuna storage {where} went away ({connection.redact(reason).rstrip('.')}); the finished trials are "
            "kept there: run the same command again once it is back."
        ) from None


def report(study: optuna.Study, params: Params, paths: Layout, parent: Tracker) -> None:
    """Ranked table, figures, best params as a `dvc exp run` command; on disk and on `parent`."""
    trials = study.get_trials(deepcopy=False)
    keys = list(params.sweep.space)
    text = table(trials, keys)
    print(text)
    out = paths.sweeps / re.sub(r"[^\w.-]+", "_", params.sweep.study)
    with files.atomic_open(out / "trials.txt") as fh:
        fh.write(text + "\n")
    with files.atomic_open(out / "trials.csv") as fh:
        fh.write(trials_csv(trials, keys))
    written = [out / "trials.txt", out / "trials.csv", *figures(study, out)]

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    counts = {
        f"trials_{s.name.lower()}": sum(t.state == s for t in trials)
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    if complete:
        best = study.best_trial
        command = dvc_command(best, params)
        files.write_json(
            out / "best.json",
            {
                "trial": best.number,
                "fid": best.value,
                "n_samples": params.sweep.eval_samples,
                "params": best.params,
                "mlflow_run_id": best.user_attrs.get(RUN_ID),
                "dvc_exp_run": command,
            },
        )
        with files.atomic_open(out / "best.txt") as fh:
            fh.write(command + "\n")
        written += [out / "best.json", out / "best.txt"]
        parent.log_metrics([{"step": 0, "best_fid": float(best.value or 0.0), **counts}])
        parent.set_tags(
            {"sweep.best_trial": str(best.number), "sweep.best_run": best.user_attrs.get(RUN_ID, "")}
        )
        print(
            f"best: trial {best.number}, FID {best.value:.2f} at N={params.sweep.eval_samples}; reproduce it with\n  {command}"
        )
    else:
        parent.log_metrics([{"step": 0, **counts}])
        print("no trial finished: nothing to reproduce.")
    for path in written:
        parent.log_artifact(path, "sweep")
    print(f"report -> {out.relative_to(paths.root) if out.is_relative_to(paths.root) else out}")
    if parent.lost:
        print(f"warning: {parent.lost_summary()}")


def trials_csv(trials: list[FrozenTrial], keys: list[str]) -> str:
    """The ranked trials as CSV: number, state, FID, seconds, the searched values, the MLflow run."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial", "state", "fid", "seconds", *keys, "mlflow_run_id"])
    for t in ranked(trials):
        row = [t.number, t.state.name, score_of(t), trial_seconds(t), *(t.params.get(k) for k in keys)]
        writer.writerow([*row, t.user_attrs.get(RUN_ID, "")])
    return buffer.getvalue()


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
        with files.atomic_path(out / f"{name}.png") as tmp:
            figure.savefig(tmp, format="png", dpi=110)
        plt.close(figure)
        made.append(out / f"{name}.png")
    return made
