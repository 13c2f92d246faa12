"""The boundary to the tracker: where runs go, what they are named, tagged and given.

`Tracker` is what a stage logs about a run (params, tags, metric rows, images, a model,
nested runs); `MlflowRun` implements it. Only the stages' main() functions, the sweep and
`resend` call in here; the training and scoring cores never see MLflow. Once a run has
started, a tracking failure (server down, disk full) must not kill the training: the run
records, as data, what could not be logged and says so at the end.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np

from pipeline.errors import UserError
from pipeline.layout import Layout

DIGEST_LENGTH = 36  # the longest dataset digest MLflow stores
# The experiment-kind tag of MLflow 3's UI: model training, not GenAI (traces, token usage).
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


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
    return env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Layout(root).mlflow_db}"


_SCHEME, _WHITESPACE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://"), re.compile(r"\s")


def _password_span(url: str) -> tuple[int, int] | None:
    """Where the password of `url` (`scheme://user:password@host...`, no whitespace) lies, or None.

    The password runs from the first ':' after `//` to the LAST '@': passwords may hold '/', '@',
    ':' and '%' (SQLAlchemy takes a raw '/', requests splits the login off at the last '@'). A
    ':' after a '/' is a path's, not a login's; an '@' further on in a path only hides more.
    """
    start = url.index("//") + 2
    at, colon = url.rfind("@"), url.find(":", start)
    if at < 0 or colon < 0 or colon > at or "/" in url[start:colon] or colon + 1 == at:
        return None
    return colon + 1, at


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***: user:secret@host -> user:***@host.

    A URL ends at whitespace; see _password_span for where its password lies.
    """
    parts, done = [], 0
    for match in _SCHEME.finditer(text):
        if match.start() < done:  # a scheme inside a password already hidden
            continue
        space = _WHITESPACE.search(text, match.end())
        span = _password_span(text[match.start() : space.start() if space else len(text)])
        if span is not None:
            parts += [text[done : match.start() + span[0]], "***"]
            done = match.start() + span[1]
    return "".join(parts) + text[done:]


def without_login(uri: str, environ: MutableMapping[str, str]) -> str:
    """An http(s) tracking URI without its `user:password@`, the login moved to MLFLOW_TRACKING_USERNAME
    and MLFLOW_TRACKING_PASSWORD in `environ`; any other URI as it is.

    MLflow prints the tracking URI it was given (the "View run ... at:" line when a run ends) and
    puts it in its errors ("API request to ... failed"): given no login, none can show. A login in
    the URI won over those variables before (requests applies it last), so it overrides them here.
    """
    parts = urlsplit(uri)  # as requests reads the login: the host part ends at the first '/'
    if parts.scheme.lower() not in ("http", "https") or not parts.password:
        return uri
    environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
    environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _is_local_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:///")


@contextmanager
def _creation_lock(root: Path, uri: str) -> Iterator[None]:
    """Serialise DB/experiment creation: parallel workers on a fresh SQLite DB race on it."""
    if not _is_local_sqlite(uri):
        yield
        return
    from filelock import FileLock

    db = Layout(root).mlflow_db
    with FileLock(str(db.with_name(f".{db.name}.lock")), timeout=300):
        yield


# MLflow's HTTP defaults (7 retries with growing pauses, 120 s a request) make a dead server
# cost minutes. Checking the server before a stage does any work: fail within seconds. Logging
# a run: a little patience (a model upload takes time), yet a server that died mid-run costs
# seconds once, after which Tracker stops trying. MLFLOW_HTTP_REQUEST_* set by the user win.
CHECK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
RUN_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def _create_database(root: Path, path: Path) -> None:
    """Build a new SQLite tracking database in a temp file, then rename it into place.

    MLflow creates its tables in many steps, and a stage killed between two of them left a
    database that every later start refused ("table ... already exists"). The caller holds
    the creation lock, so a temp file left by such a kill can be removed.
    """
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from pipeline.runtime import atomic_path, remove_stale_temps

    if path.exists():
        return
    remove_stale_temps(path)
    with atomic_path(path) as tmp:
        SqlAlchemyStore(f"sqlite:///{tmp}", Layout(root).mlflow_artifacts.as_uri()).engine.dispose()


def connect(root: Path, uri: str, experiment: str) -> str:
    """Point MLflow at `uri`, make sure `experiment` exists; return its id.

    Fails fast, with one sentence, when a tracking server does not answer. A login in an http(s)
    `uri` goes to MLflow through its variables instead (see without_login).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    remote = uri.startswith(("http://", "https://"))
    user = {key: os.environ[key] for key in CHECK_HTTP if key in os.environ}  # the user's settings win
    if remote:
        os.environ.update({**CHECK_HTTP, **user})
    mlflow.set_tracking_uri(without_login(uri, os.environ))
    try:
        with _creation_lock(root, uri):
            if _is_local_sqlite(uri):
                _create_database(root, Path(uri.removeprefix("sqlite:///").split("?")[0]))
            found = mlflow.get_experiment_by_name(experiment)
            if found is not None:
                if found.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:
                    mlflow.MlflowClient().set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
                return found.experiment_id
            location = Layout(root).mlflow_artifacts.as_uri() if _is_local_sqlite(uri) else None
            try:
                return mlflow.create_experiment(experiment, artifact_location=location,
                                                tags={EXPERIMENT_KIND: MODEL_TRAINING})  # fmt: skip
            except MlflowException as exc:  # another worker created it a moment ago (a server takes no file lock)
                if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                    raise
                return mlflow.get_experiment_by_name(experiment).experiment_id
    except Exception as exc:  # noqa: BLE001 - network errors arrive as many types, often inside an MlflowException
        shown = redact(uri)
        if room := store_out_of_room(exc, uri):
            raise room from None
        if reason := network_failure(exc):
            raise UserError(
                f"MLflow tracking server {shown} is unreachable ({reason}); start it, "
                "or unset MLFLOW_TRACKING_URI to log to the local mlflow.db."
            ) from None
        code = getattr(exc, "error_code", "")
        if code == "UNAUTHENTICATED":
            raise UserError(
                f"MLflow tracking server {shown} refused the login (HTTP 401); set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD to an account of that server."
            ) from None
        if code == "PERMISSION_DENIED":
            who = os.environ.get("MLFLOW_TRACKING_USERNAME", "this user")
            raise UserError(
                f"MLflow tracking server {shown} denies {who} the experiment '{experiment}' (HTTP 403); "
                "ask its admin for EDIT permission on it."
            ) from None
        raise UserError(f"MLflow tracking at {shown} failed: {redact(first_line(exc))}.") from None
    finally:
        if remote:
            os.environ.update({**RUN_HTTP, **user})


def ui_hint(uri: str, experiment_id: str) -> str:
    """Where to see the experiment's training runs in the MLflow UI.

    MLflow 3.17's UI opens an experiment on its GenAI overview whatever the experiment-kind tag
    says (the global GenAI / Model training switch decides); `workflowType=machine_learning` in
    the address opens the runs table.
    """
    page = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{redact(uri).rstrip('/')}/{page}"
    return f"`mlflow ui --backend-store-uri {redact(uri)}`, then http://127.0.0.1:5000/{page}"


def network_failure(exc: BaseException) -> str | None:
    """A few words when `exc` (or what it wraps) is a network failure, else None.

    MLflow re-raises requests' errors as MlflowException with a 300-character text; the
    cause chain still holds the original, which says what happened in words a user needs.
    """
    import requests

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            text = str(seen).lower()
            if "timed out" in text or isinstance(seen, requests.exceptions.Timeout):
                return f"no answer within {os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT', '120')} s"
            return "connection refused" if "refused" in text else "cannot connect"
        seen = seen.__cause__ or seen.__context__
    return None


def open_experiment(experiment: str, cwd: Path, env: Mapping[str, str]) -> tuple[str, str, Path]:
    """Connect as a stage does: (tracking URI as it may be shown, experiment id, repository root)."""
    root = project_root(cwd, env)
    uri = tracking_uri(root, env)
    return redact(without_login(uri, {})), connect(root, uri, experiment), root


def first_line(exc: BaseException) -> str:
    text = redact(str(exc)).strip()  # errors of MLflow and SQLAlchemy quote the URIs they were given
    return (text.splitlines()[0] if text else type(exc).__name__)[:300].rstrip(".")


def store_out_of_room(exc: BaseException, uri: str) -> UserError | None:
    """The one sentence for a write of the tracking store at `uri` that found no room (a full disk,
    `ulimit -f`): its SQLite file or the artifact file named in the error; None for other failures."""
    from pipeline import runtime

    found = runtime.out_of_room(exc)
    if found is None:
        return None
    if isinstance(found, OSError) and found.filename:
        path = Path(found.filename)
    elif uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///").split("?")[0])
    else:
        path = Path.cwd()  # the file is not known: the project's filesystem is the likely one
    return runtime.storage_error(path, found)


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
    """The DVC experiment this run belongs to (set by `dvc exp run`), and the sweep it is part of.

    DVC gives a queued grid no name of its own: DCGAN_SWEEP, set in the shell that runs
    `dvc queue start`, reaches every queued run and tags them all alike (`tags.sweep = '...'`).
    """
    tags = {
        "dvc.exp_name": env.get("DVC_EXP_NAME", ""),
        "dvc.baseline": env.get("DVC_EXP_BASELINE_REV", ""),
        "sweep": env.get("DCGAN_SWEEP", ""),
    }
    return {k: v for k, v in tags.items() if v}


def run_name(env: Mapping[str, str]) -> str | None:
    """The DVC experiment name under `dvc exp run`; None lets MLflow pick a readable one."""
    return env.get("DVC_EXP_NAME") or None


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


# --- the generator's weights beside its MLflow model --------------------------------------
# Loading an MLflow PyTorch model unpickles (data/model.pth, or a .pt2 archive's sample inputs),
# so whoever can write to an artifact store would run code on everyone who draws from it. Every
# logged generator therefore carries its state dict as a checkpoint of runtime.save_checkpoint's
# format (read weights-only), and its model's tags record, at log time, the SHA-256 of that file
# (checked before it is parsed) and of its tensors (what evaluate compares with models/generator.pt).

WEIGHTS_FILE = "generator_weights.pt"
WEIGHTS_PATH = f"extra_files/{WEIGHTS_FILE}"  # inside the logged model's artifacts
ARTIFACT_SHA_TAG = "weights.artifact_sha256"
TENSORS_SHA_TAG = "weights.tensors_sha256"


def tensors_sha256(weights: Mapping[str, Any]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and values: equal for equal weights, whatever file holds them."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for key in sorted(weights):
        tensor = weights[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def architecture(model: Any) -> dict[str, float]:
    """What rebuilding `model` needs beyond the sizes its weights show: its batch norms' settings."""
    norm = next((m for m in model.modules() if hasattr(m, "eps") and hasattr(m, "momentum")), None)
    return {} if norm is None else {"bn_eps": float(norm.eps), "bn_momentum": float(norm.momentum)}


def save_weights(weights: Mapping[str, Any], arch: dict[str, float], path: Path) -> dict[str, str]:
    """The weights file a logged model carries; the tags that record its SHA-256 and its tensors'."""
    from pipeline.runtime import save_checkpoint, sha256_file

    state = {key: value.detach().cpu() for key, value in weights.items()}
    save_checkpoint({"generator": state, "architecture": arch}, path)
    return {ARTIFACT_SHA_TAG: sha256_file(path), TENSORS_SHA_TAG: tensors_sha256(state)}


def weights_present(model_location: str) -> bool:
    """Whether the logged model at `model_location` (its artifact location) holds its weights file."""
    import mlflow

    try:
        found = mlflow.artifacts.list_artifacts(artifact_uri=f"{model_location.rstrip('/')}/extra_files")
    except Exception:  # noqa: BLE001 - a folder the store does not have
        return False
    return any(Path(item.path).name == WEIGHTS_FILE for item in found)


def current_params(run: MlflowRun) -> dict[str, str]:
    """The run's params as they stand now: a param changed on a resumed run is logged as the tag
    `param_changed.<key>` (log_params), which overrides the immutable first value."""
    data = run._client.get_run(run.run_id).data
    changed = {key.removeprefix("param_changed."): value for key, value in data.tags.items()
               if key.startswith("param_changed.")}  # fmt: skip
    return {**dict(data.params), **changed}
