"""Where a stage gets its run: the one factory behind the tracker.Run interface.

The runs come from `BACKEND`: MLflow's store (MlflowRun) when a stage runs; a test puts a
memory.MemoryStore there (monkeypatch) to see what a stage logs without an MLflow store.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.tracking.mlflow_run import MlflowRun
from pipeline.tracking.tracker import Backend, Run

if TYPE_CHECKING:
    import numpy as np

BACKEND: Backend = MlflowRun


def open_run(
    experiment_id: str,
    name: str | None,
    tags: dict[str, str],
    *,
    resume_run_id: str | None = None,
    parent_run_id: str | None = None,
) -> Run:
    """Start a run (this process's, until its finish()); reopen `resume_run_id` if the store has it."""
    return BACKEND.start(experiment_id, name, tags, resume_run_id=resume_run_id, parent_run_id=parent_run_id)


def shared_run(experiment_id: str, name: str, tags: dict[str, str]) -> Run:
    """A RUNNING run that no process owns (a sweep's parent, which many processes share)."""
    return BACKEND.create(experiment_id, name, tags)


def existing_run(run_id: str, experiment_id: str) -> Run | None:
    """A handle on a run made earlier (not started again), or None if the store lacks it."""
    return BACKEND.existing(run_id, experiment_id)


def tagged_run(experiment_id: str, key: str, value: str) -> Run | None:
    """The first run of the experiment whose tag `key` is `value`, or None."""
    return BACKEND.tagged(experiment_id, key, value)


class Recorded:
    """A finished MLflow run, reopened while its deleted outputs are written again: its metrics, images
    and model are there already, so logging them does nothing; its status is set as for any run."""

    def __init__(self, run: Run) -> None:
        self.recorded = run

    def log_metrics(self, rows: list[dict[str, float]]) -> None:
        pass

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        pass

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        pass

    def log_model(self, model: Any, name: str, input_example: np.ndarray) -> None:
        pass

    def drop_unfinished_models(self) -> int:
        return 0

    def __getattr__(self, name: str) -> Any:  # run_id, lost, finish, ...: the run's own
        return getattr(self.recorded, name)
