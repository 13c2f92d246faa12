"""`python -m pipeline resend`: give the tracker what a finished training run could not log.

After a tracking outage the train stage's DVC outputs are complete: `resend` reads the
run's params, per-step losses, quick FIDs, final figures, sample grids, log and model back
from them, and `backfill` sends whatever the run does not hold yet, so it is safe to run
twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import data, files
from pipeline.errors import UserError
from pipeline.gan import watchdog
from pipeline.gan.export import for_export
from pipeline.gan.loop import LOG_COLUMNS, summary_row
from pipeline.gan.sampling import GRID
from pipeline.layout import Layout
from pipeline.params import flatten, load_params
from pipeline.tracking import connection, logged_model, runs
from pipeline.tracking.tracker import Run


def backfill(
    experiment_id: str,
    run_id: str,
    tags: dict[str, str],
    params: dict[str, str],
    rows: list[dict[str, float]],
    images: dict[int, np.ndarray],
    image_key: str,
    artifacts: list[Path],
    model: Callable[[], tuple[Any, np.ndarray]] | None = None,
    model_name: str = "generator",
    run_tags: dict[str, str] | None = None,
) -> tuple[str, dict[str, int]]:
    """Send what a finished run lacks of these params, step metrics, images, artifacts, model and
    `run_tags` (`model()` gives the network and an input example; it is sent when the run holds no
    model of its weights with their weights file).

    The run is `run_id`, or, where this store lacks it, a new run tagged `resent_from` with
    `tags` (found again by the next call). Whatever the run already holds is skipped, so a
    second call sends nothing twice. The run ends FINISHED. Returns its id and the counts sent.
    """
    try:
        run, have = open_run(experiment_id, run_id, tags, params)
        new_params = {key: value for key, value in params.items() if key not in have}
        run.log_params(new_params)
        held = run.tags() if run_tags else {}
        new_tags = {key: value for key, value in (run_tags or {}).items() if held.get(key) != value}
        run.set_tags(new_tags)
        missing = missing_metrics(run, rows)
        run.log_metrics(missing)
        sent_images = send_images(run, images, image_key)
        sent_artifacts = send_artifacts(run, artifacts)
        run.drop_unfinished_models()  # uploads a kill interrupted; the model is sent again below
        sent_model = send_model(run, model, model_name) if model is not None else 0
        run.finish()
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the backend says, the user only needs to retry
        raise _retry(connection.network_failure(exc) or connection.first_line(exc)) from None
    if run.lost:
        raise _retry(run.failure)
    metrics = sum(len(row) - 1 for row in missing)
    sent = {"params": len(new_params), "tags": len(new_tags), "metrics": metrics}
    sent |= {"images": sent_images, "artifacts": sent_artifacts}
    return run.run_id, sent | {"model": sent_model}


def open_run(
    experiment_id: str, run_id: str, tags: dict[str, str], params: dict[str, str]
) -> tuple[Run, dict[str, str]]:
    """The run `run_id` reopened (or its stand-in, or a new one: see backfill) and the params it holds;
    a UserError when it holds other values of `params`."""
    found = runs.existing_run(run_id, experiment_id) or runs.tagged_run(experiment_id, "resent_from", run_id)
    # A param changed on the run (an extended run's train.steps) is recorded as a tag, since MLflow
    # params are immutable: its current value is the tag's.
    have = found.current_params() if found else {}
    clash = next((key for key, value in params.items() if have.get(key, value) != value), None)
    if found and clash:
        raise UserError(
            f"run {found.run_id} has {clash}={have[clash]}, not {params[clash]}: these outputs are not its own."
        )
    # Reopens the run that was found; else a new run, tagged with the id it stands in for.
    run = runs.open_run(
        experiment_id, None, {**tags, "resent_from": run_id}, resume_run_id=found.run_id if found else None
    )
    return run, have


def missing_metrics(run: Run, rows: list[dict[str, float]]) -> list[dict[str, float]]:
    """The metric rows holding only what the run lacks (finite values at steps it has not logged)."""
    logged: dict[str, set[int]] = {}
    missing = []
    for row in rows:
        values = {name: value for name, value in row.items() if name != "step" and np.isfinite(value)}
        for name in values.keys() - logged.keys():
            logged[name] = run.metric_steps(name)
        new = {name: value for name, value in values.items() if int(row["step"]) not in logged[name]}
        if new:
            missing.append({"step": row["step"], **new})
    return missing


def send_images(run: Run, images: dict[int, np.ndarray], key: str) -> int:
    """The images of the steps the run does not show; how many were sent."""
    shown = run.image_steps(key, drop_incomplete=True)  # a kill mid-upload: the step is sent again
    sent = 0
    for step, image in sorted(images.items()):
        if step not in shown:
            run.log_image(image, key=key, step=step)
            sent += 1
    return sent


def send_artifacts(run: Run, artifacts: list[Path]) -> int:
    """The files the run lacks (by name); how many were sent."""
    present = run.artifact_names()
    missing = [path for path in artifacts if path.name not in present]
    for path in missing:
        run.log_artifact(path)
    return len(missing)


def send_model(run: Run, model: Callable[[], tuple[Any, np.ndarray]], name: str) -> int:
    """The model of `model()`'s weights, with its weights file, unless the run holds it: a run that holds
    only an older model (an extended run's first, or one logged before models carried weights files)
    gets it. 1 when it was sent."""
    network, example = model()
    if run.has_model(logged_model.tensors_sha256(network.state_dict())):
        return 0
    run.log_model(network, name, example)
    return 1


def _retry(reason: str | None) -> UserError:
    return UserError(
        f"re-sending to MLflow failed ({reason}); what was sent stays, run this again for the rest."
    )


def logged_rows(paths: Layout) -> list[dict[str, float]]:
    """The per-step losses, quick FIDs and final figures, read back from the train stage's files."""

    def table(path: Path) -> list[list[str]]:
        return (
            [line.split(",") for line in path.read_text().splitlines()[1:] if line] if path.is_file() else []
        )

    # The losses were float32 on the device: the CSV's 9 digits give back exactly what was logged.
    rows: list[dict[str, float]] = [
        {"step": int(step), **{k: float(np.float32(v)) for k, v in zip(LOG_COLUMNS, values, strict=True)}}
        for step, *values in table(paths.train_log)
    ]
    rows += [{"step": int(step), "fid_quick": float(fid)} for step, fid in table(paths.fid_log)]
    rows.append(summary_row(files.read_json(paths.train_metrics)))
    return rows


def logged_watchdog(paths: Layout) -> tuple[list[dict[str, float]], dict[str, str]]:
    """The watchdog's metric rows and tags, read back from the train stage's record of them (none where
    the run had no watchdog, or was trained before the record was kept)."""
    if not paths.train_watchdog.is_file():
        return [], {}
    try:
        return watchdog.recorded(files.read_json(paths.train_watchdog))
    except (KeyError, TypeError, ValueError):
        raise UserError(
            f"{paths.train_watchdog} is not the train stage's watchdog record; train again."
        ) from None


def logged_grids(paths: Layout) -> dict[int, np.ndarray]:
    """The sample grids by step, read back from their PNGs (enlarged by nearest: every n-th pixel)."""
    from PIL import Image

    grid_size = data.make_grid(np.zeros((1, data.IMAGE_SIZE, data.IMAGE_SIZE), np.uint8), GRID).shape[0]
    images = {}
    for path in sorted(paths.samples.glob("step_*.png")):
        big = np.asarray(Image.open(path).convert("L"))
        images[int(path.stem.removeprefix("step_"))] = big[
            :: big.shape[0] // grid_size, :: big.shape[1] // grid_size
        ]
    return images


def resend(params_path: Path = Path("params.yaml")) -> None:
    """The command: rebuild the finished training run's record from the DVC outputs and backfill it."""
    params = load_params(params_path)
    paths = Layout(dataset=params.data.dataset)
    if not (paths.run_info.is_file() and paths.train_metrics.is_file() and paths.train_log.is_file()):
        raise UserError(
            f"no finished training run here ({paths.run_info}, {paths.train_metrics} or {paths.train_log} is "
            "missing); train first."
        )
    info = files.read_json(paths.run_info)
    flat = flatten(params)
    if info.get("params_sha256", files.fingerprint(flat)) != files.fingerprint(flat):
        raise UserError(
            f"{params_path} changed since run {info['run_id']} was trained; restore it to re-send that run."
        )
    uri, experiment_id, _ = connection.open_experiment(
        params.tracking.experiment, Path.cwd(), dict(os.environ)
    )

    watched, watch_tags = logged_watchdog(paths)
    rows, images = logged_rows(paths) + watched, logged_grids(paths)

    def model() -> tuple[Any, np.ndarray]:
        weights = files.load_checkpoint(paths.generator)["generator"]
        network, _, example = for_export(params.model, weights, len(data.class_names(params.data)))
        return network, example

    run_id, sent = backfill(
        experiment_id,
        info["run_id"],
        {"stage": "train"},
        flat,
        rows,
        images,
        "samples",
        [paths.train_log],
        model,
        run_tags=watch_tags,
    )
    if run_id != info["run_id"]:
        print(f"run {info['run_id']} is not in {uri}; its record goes to run {run_id}.")
    what = ", ".join(f"{n} {kind}" for kind, n in sent.items() if n)
    if what:
        print(f"re-sent to MLflow run {run_id}: {what}.")
    else:
        print(f"MLflow run {run_id} holds everything; nothing re-sent.")
