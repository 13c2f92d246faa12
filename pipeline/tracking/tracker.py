"""The one boundary between stages and a tracker: what a stage logs (`Tracker`), what a resuming
stage reads back (`History`), and `Lost`, the items a tracker did not receive, as data.

`MlflowRun` (mlflow_run.py) is the implementation stages run with; `MemoryTracker` (memory.py)
records the same calls in plain dicts and lists for fast tests. Stages get theirs from runs.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Lost:
    """One item the tracker did not receive: its kind, the name of the item, and the steps it covers."""

    kind: str  # "params", "tags", "metrics", "image", "artifact", "model", "dataset", "run status"
    name: str = ""  # the image key, artifact file or model name
    steps: tuple[int, ...] = ()

    def __str__(self) -> str:
        if self.kind == "metrics":
            return f"metrics of steps {self.steps[0]}-{self.steps[-1]}"
        if self.kind == "image":
            return f"image '{self.name}' at step {self.steps[0]}"
        if self.kind == "artifact":
            return f"artifact {self.name}"
        if self.kind == "model":
            return f"model '{self.name}'"
        return self.kind


def summarise_lost(lost: list[Lost], failure: str | None) -> str:
    """'MLflow did not receive metrics of steps 12-60, 10 images 'samples' of steps 15-60, ...' or ''."""
    if not lost:
        return ""
    spans: dict[tuple[str, str], list[Lost]] = {}  # per-step items, grouped by kind and name
    others: list[str] = []
    for item in lost:
        if item.kind in ("metrics", "image") and item.steps:
            spans.setdefault((item.kind, item.name), []).append(item)
        elif str(item) not in others:
            others.append(str(item))
    parts = []
    for (kind, name), items in spans.items():
        steps = [step for item in items for step in item.steps]
        what = "metrics" if kind == "metrics" else f"{len(items)} images '{name}'"
        parts.append(f"{what} of steps {min(steps)}-{max(steps)}")
    return f"MLflow did not receive {', '.join(parts + others)}" + (f" ({failure})" if failure else "")


class Tracker(Protocol):
    """What a stage logs about one run.

    Once a run has started, a failing backend never raises from these calls: the first
    failure is said once on stderr, later calls are not even tried, and `lost` lists, as
    data, everything the backend did not receive.
    """

    run_id: str
    lost: list[Lost]
    failure: str | None

    def log_params(self, params: dict[str, str]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_metrics(self, rows: list[dict[str, float]]) -> None: ...
    def log_image(self, image: np.ndarray, key: str, step: int) -> None: ...
    def log_artifact(self, path: Path, folder: str | None = None) -> None: ...
    def log_dataset(
        self, name: str, sha256: str, path: Path, context: str, counts: dict[str, int]
    ) -> None: ...
    def log_model(self, model: Any, name: str, input_example: np.ndarray) -> None: ...
    def child(self, name: str, tags: dict[str, str]) -> Run: ...
    def reopen(self) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...
    def lost_summary(self) -> str: ...


class History(Protocol):
    """What a run holds already: read by a stage that resumes it (train) or fills it in (resend)."""

    previous_status: str | None  # a resumed run's status before it was reopened

    def current_params(self) -> dict[str, str]: ...
    def tags(self) -> dict[str, str]: ...
    def metric_steps(self, name: str) -> set[int]: ...
    def image_steps(self, key: str, *, drop_incomplete: bool = False) -> set[int]: ...
    def logged_steps(self, metric: str, image_key: str) -> tuple[int, set[int]]: ...
    def artifact_names(self) -> set[str]: ...
    def logged_models(
        self,
    ) -> list[Any]: ...  # each with model_id, status, tags, artifact_location, creation_timestamp
    def has_model(self, tensors_sha256: str | None = None) -> bool: ...
    def drop_unfinished_models(self) -> int: ...


class Run(Tracker, History, Protocol):
    """A run as runs.py hands it to a stage: it logs, and it says what it holds."""


class Backend(Protocol):
    """Where runs come from (runs.py): MLflow's store, or memory in a test."""

    def start(
        self,
        experiment_id: str,
        name: str | None,
        tags: dict[str, str],
        resume_run_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> Run: ...
    def create(self, experiment_id: str, name: str, tags: dict[str, str]) -> Run: ...
    def existing(self, run_id: str, experiment_id: str) -> Run | None: ...
    def tagged(self, experiment_id: str, key: str, value: str) -> Run | None: ...
