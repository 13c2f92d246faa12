"""One MLflow run: `MlflowRun`, the implementation of tracker.Run that stages run with.

Once a run has started, a tracking failure (server down, disk full) must not kill the
training: the run records, as `Lost` items (data, not exceptions), what could not be logged
and says so at the end. Its reads (what resuming and `resend` need) are MlflowHistory's
(mlflow_history.py); runs left RUNNING by a killed process are marked KILLED (housekeeping.py)."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.tracking.connection import DIGEST_LENGTH, first_line, network_failure, redact, store_out_of_room
from pipeline.tracking.housekeeping import mark_dead_runs_killed, owner_tags
from pipeline.tracking.logged_model import WEIGHTS_FILE, architecture, save_weights
from pipeline.tracking.mlflow_history import MlflowHistory
from pipeline.tracking.tracker import Lost, summarise_lost

__all__ = ["Lost", "MlflowRun", "summarise_lost"]


class MlflowRun(MlflowHistory):
    """One MLflow run behind the tracker.Run interface: the writes here, the reads MlflowHistory's."""

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
        owner = owner_tags()
        try:
            try:
                mark_dead_runs_killed(client, experiment_id)
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

    @classmethod
    def tagged(cls, experiment_id: str, key: str, value: str) -> MlflowRun | None:
        """The first run of the experiment whose tag `key` is `value`."""
        client = _client()
        found = client.search_runs([experiment_id], f"tags.`{key}` = '{value}'", max_results=1)
        return cls(found[0].info.run_id, experiment_id, client) if found else None

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
            print(
                f"warning: MLflow logging failed at {lost} ({self.failure}); the stage goes on without MLflow.",
                file=sys.stderr,
            )
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
        self._guard(
            Lost("tags"), self._client.log_batch, self.run_id, tags=[RunTag(k, v) for k, v in tags.items()]
        )

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
            self._guard(
                Lost("metrics", steps=(steps[0], steps[-1])),
                self._client.log_batch,
                self.run_id,
                metrics=chunk,
            )

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        self._guard(
            Lost("image", key, (step,)), self._client.log_image, self.run_id, image, key=key, step=step
        )

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self._guard(Lost("artifact", path.name), self._client.log_artifact, self.run_id, str(path), folder)

    def log_dataset(self, name: str, sha256: str, path: Path, context: str, counts: dict[str, int]) -> None:
        """The data the run read, as an MLflow dataset input: the runs table's Dataset column, and its filter.

        Its digest is the file's SHA-256 cut to the 36 characters MLflow keeps (the full one is the
        run's `data.sha256` tag); its source the DVC path; `context` and `counts` are its tags.
        """
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=name,
            digest=sha256[:DIGEST_LENGTH],
            source_type="local",
            source=json.dumps({"uri": path.as_posix()}),
            profile=json.dumps(counts),
        )
        tags = [InputTag("mlflow.data.context", context), *(InputTag(k, str(v)) for k, v in counts.items())]
        self._guard(
            Lost("dataset", name), self._client.log_inputs, self.run_id, [DatasetInput(dataset, tags)]
        )

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
                mlflow.pytorch.log_model(
                    model,
                    name=name,
                    input_example=input_example,
                    extra_files=[str(weights)],
                    tags=tags,
                    pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                )

    def drop_unfinished_models(self) -> int:
        """Delete the run's logged models whose upload never finished (a kill left them PENDING); how many.

        (Their status is filtered here, not in the search: MLflow 3.17 matches no `status` filter.)
        """

        def drop() -> int:
            unfinished = [
                model for model in self.logged_models() if str(model.status) not in ("READY", "FAILED")
            ]
            for model in unfinished:
                self._client.delete_logged_model(model.model_id)
            return len(unfinished)

        return self._guard(Lost("model cleanup"), drop) or 0

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


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()
