"""One MLflow run: `Tracker`, what a stage logs about a run, and `MlflowRun`, which implements it.

Once a run has started, a tracking failure (server down, disk full) must not kill the
training: the run records, as `Lost` items (data, not exceptions), what could not be logged
and says so at the end. Runs left RUNNING by a killed process are marked KILLED."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.errors import UserError
from pipeline.tracking.connection import DIGEST_LENGTH, first_line, network_failure, redact, store_out_of_room
from pipeline.tracking.logged_model import (
    ARTIFACT_SHA_TAG,
    TENSORS_SHA_TAG,
    WEIGHTS_FILE,
    architecture,
    save_weights,
    weights_present,
)


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
    """What a stage logs about one run. MlflowRun is the implementation.

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
    def log_dataset(self, name: str, sha256: str, path: Path, context: str, counts: dict[str, int]) -> None: ...
    def log_model(self, model: Any, name: str, input_example: np.ndarray) -> None: ...
    def child(self, name: str, tags: dict[str, str]) -> Tracker: ...
    def finish(self, status: str = "FINISHED") -> None: ...
    def lost_summary(self) -> str: ...


class MlflowRun:
    """One MLflow run behind the Tracker interface, plus the reads that `resend` needs."""

    previous_status: str | None = None  # a resumed run's status before start() reopened it

    def __init__(self, run_id: str, experiment_id: str, client: Any) -> None:
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.lost: list[Lost] = []
        self.failure: str | None = None  # why logging stopped
        self._client = client

    # --- opening runs ------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        experiment_id: str,
        name: str | None,
        tags: dict[str, str],
        resume_run_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> MlflowRun:
        """Start a run, the active one until finish(); reopen `resume_run_id` if this store has it."""
        import mlflow
        from mlflow.entities import RunTag
        from mlflow.exceptions import MlflowException

        client = _client()
        owner = {"pipeline.host": socket.gethostname(), "pipeline.pid": str(os.getpid())}
        try:
            try:
                _mark_dead_runs_killed(client, experiment_id)
            except Exception:  # noqa: BLE001 - housekeeping: never the reason a run cannot start
                pass
            run, previous = None, None
            if resume_run_id:
                try:
                    old = client.get_run(resume_run_id).info
                    if old.experiment_id == experiment_id and old.lifecycle_stage == "active":
                        previous = old.status
                        run = mlflow.start_run(run_id=resume_run_id)
                        client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in owner.items()])
                except MlflowException:
                    pass  # made in another database: start a new run
            if run is None:
                # A tag rather than start_run(parent_run_id=...), which needs an ACTIVE parent:
                # evaluations nest under training runs that finished long ago.
                if parent_run_id:
                    tags = {**tags, "mlflow.parentRunId": parent_run_id}
                run = mlflow.start_run(experiment_id=experiment_id, run_name=name, tags={**tags, **owner})
        except Exception as exc:
            raise store_out_of_room(exc, mlflow.get_tracking_uri()) or UserError(
                f"MLflow could not start a run: {first_line(exc)}."
            ) from None
        started = cls(run.info.run_id, experiment_id, client)
        started.previous_status = previous
        return started

    @classmethod
    def create(cls, experiment_id: str, name: str, tags: dict[str, str]) -> MlflowRun:
        """A RUNNING run that no process owns (a sweep's parent, which many processes share)."""
        client = _client()
        try:
            run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        except Exception as exc:
            raise UserError(f"MLflow could not create run '{name}': {first_line(exc)}.") from None
        return cls(run_id, experiment_id, client)

    @classmethod
    def existing(cls, run_id: str, experiment_id: str) -> MlflowRun | None:
        """A handle on a run made earlier (not started again), or None if this store lacks it."""
        from mlflow.exceptions import MlflowException

        client = _client()
        try:
            run = client.get_run(run_id)
        except MlflowException:
            return None
        if run.info.experiment_id != experiment_id or run.info.lifecycle_stage != "active":
            return None
        return cls(run_id, experiment_id, client)

    def child(self, name: str, tags: dict[str, str]) -> MlflowRun:
        """A nested run under this one, started (the active run) until its finish()."""
        return MlflowRun.start(self.experiment_id, name, tags, parent_run_id=self.run_id)

    # --- logging -----------------------------------------------------------------------------

    def _guard(self, lost: Lost, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """fn(...)'s result; None, with `lost` recorded, when the backend fails (or failed before)."""
        # After the first failure nothing more is tried: every call to a dead server costs
        # seconds of retries, and a clean cut is simple to fill in afterwards (`resend`).
        if self.failure is not None:
            self.lost.append(lost)
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure of the tracking backend
            self.failure = network_failure(exc) or first_line(exc)
            self.lost.append(lost)
            print(f"warning: MLflow logging failed at {lost} ({self.failure}); the stage goes on without MLflow.",
                  file=sys.stderr)  # fmt: skip
            return None

    def lost_summary(self) -> str:
        """One sentence on what MLflow did not receive; empty when nothing was lost."""
        return summarise_lost(self.lost, self.failure)

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        # A resumed run may differ in params that do not change the numbers (log_every, ...):
        # MLflow refuses to change a logged param, so those become tags instead.
        try:
            logged = self.params()
        except Exception:  # noqa: BLE001 - a fresh run, or a backend that fails below anyway
            logged = {}
        params = {key: redact(value) for key, value in params.items()}  # no password reaches the tracker
        changed = {f"param_changed.{k}": v for k, v in params.items() if k in logged and logged[k] != v}
        if changed:
            self.set_tags(changed)
        items = [Param(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(items), 100):
            self._guard(Lost("params"), self._client.log_batch, self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        tags = {key: redact(value) for key, value in tags.items()}
        self._guard(Lost("tags"), self._client.log_batch, self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_metrics(self, rows: list[dict[str, float]]) -> None:
        """Log rows of {"step": step, name: value, ...} as step metrics."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(name, float(value), now, int(row["step"]))
            for row in rows
            for name, value in row.items()
            if name != "step" and np.isfinite(value)
        ]
        for i in range(0, len(metrics), 1000):
            chunk = metrics[i : i + 1000]
            steps = sorted({metric.step for metric in chunk})
            self._guard(Lost("metrics", steps=(steps[0], steps[-1])), self._client.log_batch, self.run_id,
                        metrics=chunk)  # fmt: skip

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        self._guard(Lost("image", key, (step,)), self._client.log_image, self.run_id, image, key=key, step=step)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self._guard(Lost("artifact", path.name), self._client.log_artifact, self.run_id, str(path), folder)

    def log_dataset(self, name: str, sha256: str, path: Path, context: str, counts: dict[str, int]) -> None:
        """The data the run read, as an MLflow dataset input: the runs table's Dataset column, and its filter.

        Its digest is the file's SHA-256 cut to the 36 characters MLflow keeps (the full one is the
        run's `data.sha256` tag); its source the DVC path; `context` and `counts` are its tags.
        """
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=sha256[:DIGEST_LENGTH], source_type="local",
                          source=json.dumps({"uri": path.as_posix()}), profile=json.dumps(counts))  # fmt: skip
        tags = [InputTag("mlflow.data.context", context), *(InputTag(k, str(v)) for k, v in counts.items())]
        self._guard(Lost("dataset", name), self._client.log_inputs, self.run_id, [DatasetInput(dataset, tags)])

    def log_model(self, model: Any, name: str, input_example: np.ndarray) -> None:
        """The generator as an MLflow model, with its weights beside it as a checksummed weights-only file
        (see `WEIGHTS_PATH`): what `generate` loads, since loading the MLflow model unpickles."""
        self._guard(Lost("model", name), self._log_model, model, name, input_example)

    def _log_model(self, model: Any, name: str, input_example: np.ndarray) -> None:
        import tempfile

        import mlflow

        with tempfile.TemporaryDirectory() as folder:
            weights = Path(folder) / WEIGHTS_FILE
            tags = save_weights(model.state_dict(), architecture(model), weights)
            # mlflow.pytorch logs into the active run: the one start() opened.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # Named requirements: otherwise MLflow infers them by loading the model in a fresh
                # Python process (torch imported again), seconds per training run for the same answer.
                # The weights travel inside the model (extra_files/), so a model and its weights are
                # one upload, and the tags record their SHA-256 when the model is created.
                mlflow.pytorch.log_model(model, name=name, input_example=input_example, extra_files=[str(weights)],
                                         tags=tags, pip_requirements=mlflow.pytorch.get_default_pip_requirements())  # fmt: skip

    def reopen(self) -> None:
        """Mark the run RUNNING again (a resumed sweep)."""
        self._guard(Lost("run status"), self._client.update_run, self.run_id, status="RUNNING")

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with `status`; a status MLflow did not take is in `lost` as "run status"."""
        import mlflow

        # A local store that failed one write (a full disk) may well take this small one, and a
        # run left RUNNING would be untrue: tried even after a failure, unless a server is gone.
        local = not mlflow.get_tracking_uri().startswith(("http://", "https://"))
        if local and self.failure is not None:
            self.failure, failure = None, self.failure
            self.finish(status)
            self.failure = self.failure or failure
            return
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            # end_run takes the run off MLflow's stack before it writes: a failure here is not
            # tried again (with a traceback) when the process exits.
            self._guard(Lost("run status"), mlflow.end_run, status)
        else:
            self._guard(Lost("run status"), self._client.set_terminated, self.run_id, status)

    # --- what the run holds (for `resend`) ----------------------------------------------------

    def params(self) -> dict[str, str]:
        return dict(self._client.get_run(self.run_id).data.params)

    def metric_steps(self, name: str) -> set[int]:
        return {metric.step for metric in self._client.get_metric_history(self.run_id, name)}

    def image_steps(self, key: str, *, drop_incomplete: bool = False) -> set[int]:
        """Steps of the images logged under `key` that are complete (the UI shows the compressed file).

        MLflow's log_image uploads the PNG first, then the compressed WEBP the UI shows: a kill
        between the two leaves a PNG that the step's next upload would duplicate. With
        `drop_incomplete`, such PNGs are deleted (from the same listing), so the step is sent again, whole.
        """
        names = {Path(a.path).name for a in self._client.list_artifacts(self.run_id, "images")}
        if drop_incomplete:
            pattern = rf"{re.escape(key)}\+step\+\d+\+.*\.png"
            orphans = [n for n in names if re.fullmatch(pattern, n) and f"{n[:-4]}+compressed.webp" not in names]
            if orphans:
                from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

                repository = get_artifact_repository(self._client.get_run(self.run_id).info.artifact_uri)
                for name in orphans:
                    repository.delete_artifacts(f"images/{name}")
        pattern = rf"{re.escape(key)}\+step\+(\d+)\+.*\+compressed\.webp"
        return {int(found[1]) for name in names if (found := re.fullmatch(pattern, name))}

    def artifact_names(self) -> set[str]:
        return {artifact.path for artifact in self._client.list_artifacts(self.run_id)}

    def logged_models(self) -> list[Any]:
        import mlflow

        return list(mlflow.search_logged_models(
            experiment_ids=[self.experiment_id], filter_string=f"source_run_id = '{self.run_id}'", output_format="list"
        ))  # fmt: skip

    def has_model(self, tensors_sha256: str | None = None) -> bool:
        """Whether the run holds a finished logged model with its weights file (of these tensors, if given).

        A model logged by older code, without the weights file, does not count: `resend` then logs one.
        """
        for model in self.logged_models():
            if str(model.status) != "READY" or not model.tags.get(ARTIFACT_SHA_TAG):
                continue
            if tensors_sha256 is not None and model.tags.get(TENSORS_SHA_TAG) != tensors_sha256:
                continue
            if weights_present(model.artifact_location):
                return True
        return False

    def drop_unfinished_models(self) -> int:
        """Delete the run's logged models whose upload never finished (a kill left them PENDING); how many.

        (Their status is filtered here, not in the search: MLflow 3.17 matches no `status` filter.)
        """

        def drop() -> int:
            unfinished = [model for model in self.logged_models() if str(model.status) not in ("READY", "FAILED")]
            for model in unfinished:
                self._client.delete_logged_model(model.model_id)
            return len(unfinished)

        return self._guard(Lost("model cleanup"), drop) or 0

    def logged_steps(self, metric: str, image_key: str) -> tuple[int, set[int]]:
        """The last step of `metric` the run holds, and the steps of its complete images under
        `image_key` (the incomplete ones a kill left are deleted: see image_steps)."""
        return max(self.metric_steps(metric), default=0), self.image_steps(image_key, drop_incomplete=True)

    @classmethod
    def tagged(cls, experiment_id: str, key: str, value: str) -> MlflowRun | None:
        """The first run of the experiment whose tag `key` is `value`."""
        client = _client()
        found = client.search_runs([experiment_id], f"tags.`{key}` = '{value}'", max_results=1)
        return cls(found[0].info.run_id, experiment_id, client) if found else None


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def _process_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) is no probe on Windows: never call a run dead there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, owned by someone else
        return True
    return True


def _mark_dead_runs_killed(client: Any, experiment_id: str) -> None:
    """A SIGKILLed stage leaves its run RUNNING forever: mark runs of dead processes on this host KILLED.

    Runs carry the host and pid of the process that logs to them (`pipeline.host`, `pipeline.pid`);
    only runs of this host are judged, and a pid that exists again is taken as alive.
    """
    host = socket.gethostname().replace("'", "")
    running = client.search_runs(
        [experiment_id], f"attributes.status = 'RUNNING' and tags.`pipeline.host` = '{host}'", max_results=1000
    )
    for run in running:
        pid = run.data.tags.get("pipeline.pid", "")
        if pid.isdigit() and not _process_alive(int(pid)):
            client.set_terminated(run.info.run_id, "KILLED")


def current_params(run: MlflowRun) -> dict[str, str]:
    """The run's params as they stand now: a param changed on a resumed run is logged as the tag
    `param_changed.<key>` (log_params), which overrides the immutable first value."""
    data = run._client.get_run(run.run_id).data
    changed = {key.removeprefix("param_changed."): value for key, value in data.tags.items()
               if key.startswith("param_changed.")}  # fmt: skip
    return {**dict(data.params), **changed}
