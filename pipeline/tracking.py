"""MLflow conventions: where runs go, what they are named, tagged and given as params.

Only the stages' main() functions call in here; the training and scoring cores never see
MLflow. Once a run has started, a tracking failure (server down, disk full) must not
kill the training: `Tracker` records what could not be logged and says so at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError

DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


def project_root(cwd: Path, env: Mapping[str, str]) -> Path:
    """The repository root, also from inside DVC's temporary experiment folders.

    Queued and --temp experiments run in <repo>/.dvc/tmp/exps/<run>/ and are deleted
    afterwards, so anything anchored there would be lost: climb back to <repo>.
    """
    root = Path(env.get("DVC_ROOT") or cwd).resolve()
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def tracking_uri(root: Path, env: Mapping[str, str]) -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite database at the repository root."""
    return env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / DB_NAME}"


def _is_local_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:///")


@contextmanager
def _creation_lock(root: Path, uri: str) -> Iterator[None]:
    """Serialise DB/experiment creation: parallel workers on a fresh SQLite DB race on it."""
    if not _is_local_sqlite(uri):
        yield
        return
    from filelock import FileLock

    with FileLock(str(root / f".{DB_NAME}.lock"), timeout=300):
        yield


def connect(root: Path, uri: str, experiment: str) -> str:
    """Point MLflow at `uri`, make sure `experiment` exists; return its id.

    Fails fast, with one sentence, when a tracking server does not answer.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    if uri.startswith(("http://", "https://")):
        # MLflow retries for minutes by default; a user waiting to train wants to know now.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    mlflow.set_tracking_uri(uri)
    try:
        with _creation_lock(root, uri):
            found = mlflow.get_experiment_by_name(experiment)
            if found is not None:
                return found.experiment_id
            location = (root / ARTIFACTS_DIR).as_uri() if _is_local_sqlite(uri) else None
            return mlflow.create_experiment(experiment, artifact_location=location)
    except MlflowException as exc:
        raise UserError(f"MLflow tracking at {uri} failed: {_first_line(exc)}.") from None
    except Exception as exc:  # requests/urllib3 connection errors surface as many types
        raise UserError(
            f"MLflow tracking server {uri} is unreachable ({_first_line(exc)}); start it or unset MLFLOW_TRACKING_URI."
        ) from None


def open_experiment(experiment: str, cwd: Path, env: Mapping[str, str]) -> tuple[str, str, Path]:
    """Connect as a stage does: (tracking URI, experiment id, repository root)."""
    root = project_root(cwd, env)
    uri = tracking_uri(root, env)
    return uri, connect(root, uri, experiment), root


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300].rstrip(".")


def git_info(root: Path) -> dict[str, str]:
    """Commit and dirtiness of the working tree, when it is a git repository."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()} if commit else {}


def dvc_tags(env: Mapping[str, str]) -> dict[str, str]:
    """The DVC experiment this run belongs to (set by `dvc exp run`)."""
    tags = {"dvc.exp_name": env.get("DVC_EXP_NAME", ""), "dvc.baseline": env.get("DVC_EXP_BASELINE_REV", "")}
    return {k: v for k, v in tags.items() if v}


def run_name(env: Mapping[str, str]) -> str | None:
    """The DVC experiment name under `dvc exp run`; None lets MLflow pick a readable one."""
    return env.get("DVC_EXP_NAME") or None


class Tracker:
    """One MLflow run. Logging failures after the start are recorded, not raised."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.lost: list[str] = []
        self._client: Any = None

    @classmethod
    def start(
        cls,
        experiment_id: str,
        name: str | None,
        tags: dict[str, str],
        resume_run_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> Tracker:
        """Start a run, the active one until finish(); reopen `resume_run_id` if it exists."""
        import mlflow
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient()
        try:
            run = None
            if resume_run_id:
                try:
                    if client.get_run(resume_run_id).info.experiment_id == experiment_id:
                        run = mlflow.start_run(run_id=resume_run_id)
                except MlflowException:
                    pass  # deleted, or made in another database: start a new run
            if run is None:
                # A tag rather than start_run(parent_run_id=...), which needs an ACTIVE parent:
                # evaluations nest under training runs that finished long ago.
                if parent_run_id:
                    tags = {**tags, "mlflow.parentRunId": parent_run_id}
                run = mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags)
        except Exception as exc:
            raise UserError(f"MLflow could not start a run: {_first_line(exc)}.") from None
        tracker = cls(run.info.run_id)
        tracker._client = client
        return tracker

    @classmethod
    def existing(cls, run_id: str, experiment_id: str) -> Tracker | None:
        """A handle on a run made earlier (not started again), or None if this store lacks it."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient()
        try:
            run = client.get_run(run_id)
        except MlflowException:
            return None
        if run.info.experiment_id != experiment_id or run.info.lifecycle_stage != "active":
            return None
        tracker = cls(run_id)
        tracker._client = client
        return tracker

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self.lost and self.lost[-1].startswith("tracking stopped"):
            self.lost.append(what)
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure of the tracking backend
            self.lost.append(f"tracking stopped at {what}: {_first_line(exc)}")
            print(f"warning: MLflow logging failed ({_first_line(exc)}); training goes on.", file=sys.stderr)

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._guard("params", self._client.log_batch, self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._guard("tags", self._client.log_batch, self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_metrics(self, rows: list[dict[str, float]], step_key: str = "step") -> None:
        """Log rows of {step, name: value, ...} as step metrics."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(name, float(value), now, int(row[step_key]))
            for row in rows
            for name, value in row.items()
            if name != step_key and np.isfinite(value)
        ]
        for i in range(0, len(metrics), 1000):
            first = int(rows[0][step_key]) if rows else 0
            self._guard(f"metrics from step {first}", self._client.log_batch, self.run_id, metrics=metrics[i : i + 1000])

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        self._guard(f"image '{key}' at step {step}", self._client.log_image, self.run_id, image, key=key, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._guard(f"artifact {path.name}", self._client.log_artifact, self.run_id, str(path), artifact_path)

    def log_model(self, model: Any, name: str, input_example: np.ndarray) -> None:
        self._guard(f"model '{name}'", self._log_model, model, name, input_example)

    def _log_model(self, model: Any, name: str, input_example: np.ndarray) -> None:
        import mlflow

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.pytorch.log_model(model, name=name, input_example=input_example)

    def finish(self, status: str = "FINISHED") -> None:
        import mlflow

        self._guard("run status", mlflow.end_run, status)
