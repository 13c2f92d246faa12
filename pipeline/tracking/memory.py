"""An in-memory tracker for tests: `MemoryStore` hands out `MemoryTracker`s (tracker.Run) whose
every call lands in plain dicts and lists (`RunData`), so a test sees what a stage logged without
an MLflow store. tests/test_tracker_interface.py holds it to MlflowRun's behaviour, call by call.

Put a store in place of MLflow's with `monkeypatch.setattr(runs, "BACKEND", MemoryStore())`.
`MemoryStore.go_down(reason)` makes it fail as an unreachable server does: what a run logs from
then on is `lost`, said once on stderr, and nothing more is tried.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.tracking.connection import redact
from pipeline.tracking.housekeeping import owner_tags
from pipeline.tracking.logged_model import (
    ARTIFACT_SHA_TAG,
    TENSORS_SHA_TAG,
    WEIGHTS_FILE,
    architecture,
    save_weights,
)
from pipeline.tracking.tracker import Lost, summarise_lost

_ids = itertools.count(1)


@dataclass
class MemoryModel:
    """A logged model as MlflowRun.logged_models() describes one (the attributes stages read)."""

    model_id: str
    name: str
    tags: dict[str, str]
    weights: dict[str, Any]  # the state dict the weights file holds
    status: str = "READY"
    artifact_location: str = ""
    creation_timestamp: int = 0


@dataclass
class RunData:
    """Everything one run received."""

    run_id: str
    experiment_id: str
    name: str | None
    status: str = "RUNNING"
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, list[tuple[int, float]]] = field(
        default_factory=dict
    )  # name -> (step, value), in order
    images: list[tuple[str, int, np.ndarray]] = field(default_factory=list)  # (key, step, image)
    artifacts: list[tuple[str | None, str, bytes]] = field(
        default_factory=list
    )  # (folder, file name, content)
    datasets: list[dict[str, Any]] = field(default_factory=list)
    models: list[MemoryModel] = field(default_factory=list)
    children: list[RunData] = field(default_factory=list)


class MemoryStore:
    """The runs of every experiment, in memory: the Backend runs.py draws from in a test."""

    def __init__(self) -> None:
        self.runs: dict[str, RunData] = {}
        self.down: str | None = None  # why the store cannot be reached, once go_down() was called

    def go_down(self, reason: str = "connection refused") -> None:
        self.down = reason

    def start(
        self,
        experiment_id: str,
        name: str | None,
        tags: dict[str, str],
        resume_run_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> MemoryTracker:
        if self.down is not None:
            raise UserError(f"MLflow could not start a run: {self.down}.")
        old = self.runs.get(resume_run_id or "")
        if old is not None and old.experiment_id == experiment_id:
            previous, old.status = old.status, "RUNNING"
            old.tags.update(owner_tags())
            handle = MemoryTracker(self, old)
            handle.previous_status = previous
            return handle
        if parent_run_id:
            tags = {**tags, "mlflow.parentRunId": parent_run_id}
            if parent_run_id in self.runs:
                self.runs[parent_run_id].children.append(
                    self._new(experiment_id, name, {**tags, **owner_tags()})
                )
                return MemoryTracker(self, self.runs[parent_run_id].children[-1])
        return MemoryTracker(self, self._new(experiment_id, name, {**tags, **owner_tags()}))

    def create(self, experiment_id: str, name: str, tags: dict[str, str]) -> MemoryTracker:
        if self.down is not None:
            raise UserError(f"MLflow could not create run '{name}': {self.down}.")
        return MemoryTracker(self, self._new(experiment_id, name, dict(tags)))

    def existing(self, run_id: str, experiment_id: str) -> MemoryTracker | None:
        found = self.runs.get(run_id)
        return (
            MemoryTracker(self, found) if found is not None and found.experiment_id == experiment_id else None
        )

    def tagged(self, experiment_id: str, key: str, value: str) -> MemoryTracker | None:
        # The newest first, as MLflow's search orders runs by start time.
        for data in reversed(list(self.runs.values())):
            if data.experiment_id == experiment_id and data.tags.get(key) == value:
                return MemoryTracker(self, data)
        return None

    def _new(self, experiment_id: str, name: str | None, tags: dict[str, str]) -> RunData:
        data = RunData(f"run-{next(_ids)}", experiment_id, name, tags=dict(tags))
        self.runs[data.run_id] = data
        return data


class MemoryTracker:
    """One run of a MemoryStore behind the tracker.Run interface; `data` is what it received."""

    def __init__(self, store: MemoryStore, data: RunData) -> None:
        self.store, self.data = store, data
        self.run_id, self.experiment_id = data.run_id, data.experiment_id
        self.lost: list[Lost] = []
        self.failure: str | None = None
        self.previous_status: str | None = None

    def _guard(self, lost: Lost, write: Any) -> Any:
        """MlflowRun._guard's rule: after the first failure nothing more is tried."""
        if self.failure is None and self.store.down is not None:
            self.failure = self.store.down
            print(
                f"warning: MLflow logging failed at {lost} ({self.failure}); the stage goes on without MLflow.",
                file=sys.stderr,
            )
        if self.failure is not None:
            self.lost.append(lost)
            return None
        return write()

    def _read(self) -> RunData:
        if self.store.down is not None:
            raise ConnectionError(self.store.down)
        return self.data

    # --- the writes (tracker.Tracker) ------------------------------------------------------

    def log_params(self, params: dict[str, str]) -> None:
        logged = self.data.params if self.store.down is None else {}  # MlflowRun reads none from a dead store
        params = {key: redact(value) for key, value in params.items()}
        changed = {f"param_changed.{k}": v for k, v in params.items() if k in logged and logged[k] != v}
        if changed:
            self.set_tags(changed)
        items = [(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(items), 100):  # MlflowRun's batches: one Lost("params") each
            self._guard(Lost("params"), lambda chunk=items[i : i + 100]: self.data.params.update(chunk))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._guard(
            Lost("tags"), lambda: self.data.tags.update({key: redact(value) for key, value in tags.items()})
        )

    def log_metrics(self, rows: list[dict[str, float]]) -> None:
        metrics = [
            (name, float(value), int(row["step"]))
            for row in rows
            for name, value in row.items()
            if name != "step" and np.isfinite(value)
        ]
        for i in range(0, len(metrics), 1000):  # MlflowRun's batches: one Lost per 1000 values
            chunk = metrics[i : i + 1000]
            steps = sorted({step for _, _, step in chunk})

            def write(chunk: list[tuple[str, float, int]] = chunk) -> None:
                for name, value, step in chunk:
                    self.data.metrics.setdefault(name, []).append((step, value))

            self._guard(Lost("metrics", steps=(steps[0], steps[-1])), write)

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        self._guard(
            Lost("image", key, (step,)), lambda: self.data.images.append((key, step, np.array(image)))
        )

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self._guard(
            Lost("artifact", path.name),
            lambda: self.data.artifacts.append((folder, path.name, Path(path).read_bytes())),
        )

    def log_dataset(self, name: str, sha256: str, path: Path, context: str, counts: dict[str, int]) -> None:
        entry = {
            "name": name,
            "sha256": sha256,
            "source": path.as_posix(),
            "context": context,
            "counts": dict(counts),
        }
        self._guard(Lost("dataset", name), lambda: self.data.datasets.append(entry))

    def log_model(self, model: Any, name: str, input_example: np.ndarray) -> None:
        def write() -> None:
            # The tags MlflowRun's model gets: the SHA-256 of the same weights file, and of its tensors.
            with tempfile.TemporaryDirectory() as folder:
                tags = save_weights(model.state_dict(), architecture(model), Path(folder) / WEIGHTS_FILE)
            model_id = f"m-{next(_ids)}"
            state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
            self.data.models.append(
                MemoryModel(
                    model_id,
                    name,
                    tags,
                    state,
                    artifact_location=f"memory:/{model_id}",
                    creation_timestamp=next(_ids),
                )
            )

        self._guard(Lost("model", name), write)

    def child(self, name: str, tags: dict[str, str]) -> MemoryTracker:
        return self.store.start(self.experiment_id, name, tags, parent_run_id=self.run_id)

    def reopen(self) -> None:
        self._guard(Lost("run status"), lambda: setattr(self.data, "status", "RUNNING"))

    def finish(self, status: str = "FINISHED") -> None:
        self._guard(Lost("run status"), lambda: setattr(self.data, "status", status))

    def lost_summary(self) -> str:
        return summarise_lost(self.lost, self.failure)

    def drop_unfinished_models(self) -> int:
        def drop() -> int:
            unfinished = [model for model in self.data.models if model.status not in ("READY", "FAILED")]
            self.data.models = [model for model in self.data.models if model not in unfinished]
            return len(unfinished)

        return self._guard(Lost("model cleanup"), drop) or 0

    # --- the reads (tracker.History): they raise while the store is down, as MlflowRun's do ----------

    def current_params(self) -> dict[str, str]:
        data = self._read()
        changed = {
            k.removeprefix("param_changed."): v
            for k, v in data.tags.items()
            if k.startswith("param_changed.")
        }
        return {**data.params, **changed}

    def tags(self) -> dict[str, str]:
        return dict(self._read().tags)

    def metric_steps(self, name: str) -> set[int]:
        return {step for step, _ in self._read().metrics.get(name, [])}

    def image_steps(self, key: str, *, drop_incomplete: bool = False) -> set[int]:
        return {step for name, step, _ in self._read().images if name == key}  # every upload here is whole

    def logged_steps(self, metric: str, image_key: str) -> tuple[int, set[int]]:
        return max(self.metric_steps(metric), default=0), self.image_steps(image_key, drop_incomplete=True)

    def artifact_names(self) -> set[str]:
        """The top level of the run's artifacts, as MLflow lists it: files, their folders, and `images`."""
        data = self._read()
        return {folder or name for folder, name, _ in data.artifacts} | ({"images"} if data.images else set())

    def logged_models(self) -> list[MemoryModel]:
        return list(self._read().models)

    def has_model(self, tensors_sha256: str | None = None) -> bool:
        return any(
            model.status == "READY"
            and model.tags.get(ARTIFACT_SHA_TAG)
            and tensors_sha256 in (None, model.tags.get(TENSORS_SHA_TAG))
            for model in self.logged_models()
        )
