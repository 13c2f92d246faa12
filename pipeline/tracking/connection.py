"""Where runs go: the tracking URI (passwords redacted), connecting and creating the experiment,
telling outages from mistakes, and a run's name and the tags every stage's run carries.

Only the stages call into tracking/; the training and scoring cores never see MLflow."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit, urlunsplit

from pipeline.errors import UserError
from pipeline.layout import Layout

if TYPE_CHECKING:
    import torch

    from pipeline.params import Params


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

    from pipeline.files import atomic_path, remove_stale_temps

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

    remote = uri.startswith(("http://", "https://"))
    user = {key: os.environ[key] for key in CHECK_HTTP if key in os.environ}  # the user's settings win
    if remote:
        os.environ.update({**CHECK_HTTP, **user})
    mlflow.set_tracking_uri(without_login(uri, os.environ))
    try:
        with _creation_lock(root, uri):
            if _is_local_sqlite(uri):
                _create_database(root, Path(uri.removeprefix("sqlite:///").split("?")[0]))
            return _experiment_id(root, uri, experiment)
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


def _experiment_id(root: Path, uri: str, experiment: str) -> str:
    """The id of `experiment`, created (tagged as model training) if it does not exist yet."""
    import mlflow
    from mlflow.exceptions import MlflowException

    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        if found.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:
            mlflow.MlflowClient().set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        return found.experiment_id
    location = Layout(root).mlflow_artifacts.as_uri() if _is_local_sqlite(uri) else None
    try:
        return mlflow.create_experiment(
            experiment, artifact_location=location, tags={EXPERIMENT_KIND: MODEL_TRAINING}
        )
    except MlflowException as exc:  # another worker created it a moment ago (a server takes no file lock)
        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
        return mlflow.get_experiment_by_name(experiment).experiment_id


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
    from pipeline import files

    found = files.out_of_room(exc)
    if found is None:
        return None
    if isinstance(found, OSError) and found.filename:
        path = Path(found.filename)
    elif uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///").split("?")[0])
    else:
        path = Path.cwd()  # the file is not known: the project's filesystem is the likely one
    return files.storage_error(path, found)


# What the stages write and DVC records (its lock file and the folders of every stage's outputs,
# some committed to git): they change as the pipeline runs, not as the code does.
PIPELINE_WRITES = ("dvc.lock", "data", "metrics", "models", "plots", "samples")


def git_info(root: Path) -> dict[str, str]:
    """Commit and dirtiness of the working tree, when it is a git repository. Dirty means changed
    code, params or docs: the files the stages themselves write (PIPELINE_WRITES) do not count, so
    the first run of a fresh clone, after earlier stages rewrote committed metrics, is clean."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=20
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        outputs = [f":(exclude){path}" for path in PIPELINE_WRITES]
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", *outputs))
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


def run_tags(
    stage: str, params: Params, env: Mapping[str, str], root: Path, device: torch.device
) -> dict[str, str]:
    """The tags of every stage's run: the code (git), the DVC experiment, the stage, the dataset and
    where it ran; a stage adds its own after these (the sweep's `sweep` replaces DCGAN_SWEEP's)."""
    import torch

    from pipeline import machine

    return {
        **git_info(root),
        **dvc_tags(env),
        "stage": stage,
        "dataset": params.data.dataset,
        "device": machine.device_name(device),
        "torch": torch.__version__,
    }


def run_name(env: Mapping[str, str]) -> str | None:
    """The DVC experiment name under `dvc exp run`; None lets MLflow pick a readable one."""
    return env.get("DVC_EXP_NAME") or None
