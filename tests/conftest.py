"""Shared fixtures and helpers: MNIST sources that never touch the network, tiny datasets and
projects, stage processes, real MLflow servers, and checks of what a stage left behind."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from filelock import FileLock
from PIL import Image

from pipeline import cli as pipeline_cli
from pipeline import data, files
from pipeline.data import Dataset, IdxFile, load_prepared, save_prepared
from pipeline.gan.architectures import build_generator
from pipeline.gan.loop import Callbacks, train
from pipeline.gan.state import TrainState, new_state
from pipeline.params import ModelParams, TrainParams
from pipeline.scoring.frozen_classifier import Classifier, classify, load_classifier, save_classifier
from pipeline.scoring.scorer import compute_reference, load_reference, save_reference
from pipeline.tracking import connection, runs
from pipeline.tracking.memory import MemoryStore
from tests.servers import MlflowServer, free_port  # noqa: F401 - shared with the test modules

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")

if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    # One thread per worker, in it and in the stage processes it starts: xdist runs one worker per
    # core, and threads spinning on a core another worker needs would slow both many times over.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def shared_dataset_dir(variable: str = "MNIST_MIRROR", folder: str = "mnist") -> Path | None:
    """The offline copy of a dataset (its mirror variable, else ../shared/data/<folder>), if here."""
    for candidate in (os.environ.get(variable), ROOT.parent / "shared" / "data" / folder):
        if candidate and "://" not in str(candidate) and (Path(candidate) / "t10k-labels-idx1-ubyte.gz").is_file():
            return Path(candidate)
    return None


def shared_mnist_dir() -> Path | None:
    """The offline MNIST copy (MNIST_MIRROR or ../shared/data/mnist), if this machine has one."""
    return shared_dataset_dir("MNIST_MIRROR", "mnist")


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def synthetic_mnist(n_train: int = 256, n_test: int = 64, seed: int = 0) -> Dataset:
    """Random digits-shaped data: enough to exercise shapes, files and determinism."""
    rng = np.random.default_rng(seed)
    return Dataset(
        train_images=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        train_labels=np.arange(n_train, dtype=np.int64) % 10,
        test_images=rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        test_labels=np.arange(n_test, dtype=np.int64) % 10,
    )


@pytest.fixture
def tiny_idx_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A mirror directory with small, valid IDX files; the checksums are patched to match."""
    mirror = tmp_path / "tiny-mirror"
    mirror.mkdir()
    mnist = synthetic_mnist(n_train=40, n_test=20)
    specs = {}
    for key, spec in data.MNIST.files.items():
        array = getattr(mnist, key).astype(np.uint8)
        raw = idx_bytes(array)
        (mirror / spec.name).write_bytes(gzip.compress(raw))
        specs[key] = IdxFile(spec.name, hashlib.md5(raw).hexdigest(), array.shape)
    monkeypatch.setitem(data.DATASETS, "mnist", dataclasses.replace(data.MNIST, files=specs))
    monkeypatch.setattr(data, "MNIST", data.DATASETS["mnist"])
    return mirror


@pytest.fixture
def mnist_mirror(request: pytest.FixtureRequest) -> Path:
    """The real offline MNIST when present, else the tiny patched mirror."""
    shared = shared_mnist_dir()
    return shared if shared is not None else request.getfixturevalue("tiny_idx_dir")


def copy_project(dst: Path, with_git: bool = True) -> Path:
    """What a fresh clone of this working tree holds, in `dst`, as a git repo with one commit."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file() and not name.startswith(("tests/", "benchmarks/")):
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    if with_git:
        env = git_env()
        for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "init"]):
            subprocess.run(cmd, cwd=dst, check=True, env=env)
    return dst


def git_env() -> dict[str, str]:
    """Environment with a committer identity, so tests never depend on the machine's git config."""
    env = dict(os.environ)
    env.update(
        GIT_AUTHOR_NAME="pipeline tests",
        GIT_AUTHOR_EMAIL="tests@example.invalid",
        GIT_COMMITTER_NAME="pipeline tests",
        GIT_COMMITTER_EMAIL="tests@example.invalid",
    )
    return env


def dvc_repo(path: Path) -> tuple[Path, dict[str, str]]:
    """A committed copy of the project in `path` and the environment its `dvc` commands run in."""
    repo = copy_project(path)
    env = git_env()
    # Stages run `python -m pipeline`: make `python` this interpreter, as an activated venv does.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME"):
        env.pop(var, None)
    return repo, env


def mnist_dvc_repo(path: Path) -> tuple[Path, dict[str, str]]:
    """dvc_repo, its `prepare` fetching MNIST from the offline copy; the test skips without one."""
    mirror = shared_mnist_dir()
    if mirror is None:
        pytest.skip("needs the offline MNIST copy (MNIST_MIRROR or ../shared/data/mnist)")
    repo, env = dvc_repo(path)
    env["MNIST_MIRROR"] = str(mirror)
    return repo, env


# --- tiny projects, as a stage sees them --------------------------------------------------

SMALL_MODEL = {"g_dense_channels": 16, "g_channels": [16, 8], "d_channels": [4, 8, 8, 16]}
TINY_TRAIN = {"steps": 6, "batch_size": 8, "sample_every": 3, "log_every": 2, "checkpoint_every": 3, "device": "cpu"}


def make_project(path: Path, steps: int = 12, **train_overrides: object) -> Path:
    """A folder the train stage can run in: synthetic prepared data and params of the small model."""
    path.mkdir(parents=True, exist_ok=True)
    save_prepared(synthetic_mnist(n_train=128), path / "data/prepared/mnist.npz")
    params = {"model": SMALL_MODEL, "train": {**TINY_TRAIN, "steps": steps, **train_overrides}}
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    return path


def edit_params(project: Path, **sections: Mapping[str, object]) -> None:
    """Put each section's values over the same section of the project's params.yaml (a missing section
    is added); every other key stays as it was, in its order."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def stage_env(path: Path) -> dict[str, str]:
    """This environment without the variables that would send a stage's runs elsewhere."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DVC_ROOT", None)
    return env


def one_thread_env(project: Path) -> dict[str, str]:
    """stage_env with one thread a process, as jobs of several processes on two cores need, and as a run
    compared bit for bit with another needs (another thread count sums in another order). PYTHONPATH
    reaches the processes torchrun starts too."""
    return {**stage_env(project), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


TINY_EVALUATE = {
    "n_samples": 64, "batch_size": 64, "fid_resamples": 10, "kid_subsets": 2, "kid_subset_size": 32, "is_splits": 2, "prdc_k": 3
}  # fmt: skip
EVAL_PARAMS = {"classifier": {"feature_dim": 16}, "evaluate": TINY_EVALUATE}


def make_eval_project(path: Path) -> Path:
    """make_project plus what `evaluate` reads: a small generator, a classifier and its reference."""
    make_project(path, steps=1)
    params = yaml.safe_load((path / "params.yaml").read_text())
    (path / "params.yaml").write_text(yaml.safe_dump({**params, **EVAL_PARAMS}))
    torch.manual_seed(0)
    save_classifier(Classifier(16), path / "models/classifier-mnist.pt")
    write_reference(path, synthetic_mnist(n_train=128), feature_dim=16)
    generator = build_generator(ModelParams(**SMALL_MODEL), n_classes=10)
    files.save_checkpoint({"generator": generator.state_dict()}, path / "models/generator.pt")
    return path


def write_reference(project: Path, mnist: Dataset, feature_dim: int = 128) -> Path:
    """data/reference/mnist.npz from the project's classifier and `mnist`'s test images (needs N >= 2 D)."""
    classifier, sha = load_classifier(project / "models/classifier-mnist.pt", feature_dim, CPU)
    features, _ = classify(classifier, mnist.test_images, 256, CPU)
    path = project / "data/reference/mnist.npz"
    save_reference(compute_reference(features, mnist.test_labels, sha), path)
    return path


@pytest.fixture(scope="session")
def tracking_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty tracking database as tracking.connect creates it, to copy into projects.

    Creating one costs seconds of schema migrations; the tests of that creation itself (a kill
    in the middle of it, four writers racing on it) start without one.
    """
    where = tmp_path_factory.mktemp("tracking-db")
    connection._create_database(where, where / "mlflow.db")
    return where / "mlflow.db"


def with_db(project: Path, template: Path) -> Path:
    shutil.copyfile(template, project / "mlflow.db")
    return project


def copy_tracked_project(src: Path, dst: Path) -> Path:
    """A copy of a project whose runs are in its own SQLite store. The store names the artifact folders
    by absolute path: in the copy they name the copy's own, so a test changes nothing but its copy."""
    shutil.copytree(src, dst, symlinks=True)
    old, new = f"{src.resolve()}{os.sep}", f"{dst.resolve()}{os.sep}"  # with the separator: never src2/
    with contextlib.closing(sqlite3.connect(dst / "mlflow.db")) as db, db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()]
        for table in tables:
            for column in [row[1] for row in db.execute(f'PRAGMA table_info("{table}")').fetchall()]:
                db.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) WHERE instr("{column}", ?)',
                           (old, new, old))  # fmt: skip
        assert db.total_changes > 0, f"{src / 'mlflow.db'} names no artifact folder under {old}"
    return dst


def tracking_uri(project: Path) -> str:
    """The project's own tracking store, as the stages use it when MLFLOW_TRACKING_URI is not set."""
    return f"sqlite:///{project / 'mlflow.db'}"


def project_client(project: Path) -> Any:
    return mlflow_client(tracking_uri(project))


def project_runs(project: Path, experiment: str = "dcgan-mnist") -> list[Any]:
    """The runs of the project's store in `experiment`, newest first; none if the experiment is not there."""
    client = project_client(project)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def generator_weights(project: Path) -> dict[str, torch.Tensor]:
    """The trained generator's tensors (models/generator.pt)."""
    return files.load_checkpoint(project / "models/generator.pt")["generator"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    for key in a:
        assert torch.equal(a[key], b[key]), key


FINISHED_RUNS = ("tiny-a", "tiny-b")


@pytest.fixture(scope="session")
def finished_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two trainings (seeds 0 and 1) each evaluated, and a two-trial sweep, in one SQLite store.

    Built once per test session: xdist workers share it through the directory above their own
    (the tests using it read it, and write only files of their own names into it).
    """
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    project = shared / "finished" / "p"
    with FileLock(str(shared / "finished.lock")):
        if not (shared / "finished" / "built").is_file():
            shutil.rmtree(project.parent, ignore_errors=True)
            build_finished_project(project)
            (shared / "finished" / "built").touch()
    return project


def build_finished_project(path: Path) -> Path:
    project = make_eval_project(path)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(steps=8, sample_every=2, log_every=2)
    params["sweep"] = {"trials": 2, "steps": 6, "fid_every": 3, "fid_samples": 32, "eval_samples": 64,
                       "startup_trials": 2, "prune_after_trials": 5}  # fmt: skip
    for seed, name in enumerate(FINISHED_RUNS):
        params["train"]["seed"] = seed
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        env = {**stage_env(project), "DVC_EXP_NAME": name}  # runs are named as DVC experiments name them
        for stage in ("train", "evaluate"):
            result = run_cli([stage], cwd=project, env=env)
            assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli(["sweep"], cwd=project, env=stage_env(project))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return project


@pytest.fixture
def memory_store(monkeypatch: pytest.MonkeyPatch) -> MemoryStore:
    """Runs go to memory; the experiment is "1" of a store never made (no SQLite schema to build)."""
    store = MemoryStore()
    monkeypatch.setattr(runs, "BACKEND", store)
    monkeypatch.setattr(connection, "open_experiment", lambda experiment, cwd, env: ("memory:", "1", cwd))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    return store


# --- training in this process -------------------------------------------------------------

TINY_MNIST = synthetic_mnist(n_train=64)


def train_tiny(
    steps: int,
    model: Mapping[str, object] | None = None,
    state: TrainState | None = None,
    callbacks: Callbacks = Callbacks(),
    **train_params: object,
) -> TrainState:
    """The training loop on TINY_MNIST (and its labels, which only a conditional model reads): the small
    model with `model`'s changes and TINY_TRAIN with `train_params`, from `state` or from the seed, on
    the params' device."""
    model_params = ModelParams(**{**SMALL_MODEL, **(model or {})})
    params = TrainParams(**{**TINY_TRAIN, **train_params, "steps": steps})
    device = torch.device(params.device)
    state = state or new_state(model_params, params, device, 10)
    images, labels = torch.from_numpy(TINY_MNIST.train_images), torch.from_numpy(TINY_MNIST.train_labels)
    return train(state, images.to(device), params, model_params.latent_dim, callbacks, labels=labels.to(device))


# --- stage processes ----------------------------------------------------------------------


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `python -m pipeline ...` in a subprocess, as a user would."""
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def run_here(capfd: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m pipeline ARGS` in this process and working directory (no interpreter start, no torch
    import): its exit code and what it printed, captured at the file descriptors."""
    capfd.readouterr()
    code = pipeline_cli.main(list(args))
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def run_in(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m pipeline ARGS` in `project` with `env` (default: `stage_env`), run in this process (torch and
    MLflow are imported once, not once a command): its exit code and what it printed. The environment, the
    working directory and MLflow's tracking URI (a stage's connect() sets it) are as before afterwards, and
    MLflow's artifact locations are looked up afresh: it caches them by run and model id, which the copies of
    one project share (a cached one would send a copy's artifacts to the original's folder)."""
    from mlflow.tracking._tracking_service import utils

    saved_env, saved_cwd, out, err = dict(os.environ), Path.cwd(), io.StringIO(), io.StringIO()
    saved_uri = utils._tracking_uri
    utils._artifact_repos_cache.clear()
    try:
        os.environ.clear()
        os.environ.update(env or stage_env(project))
        os.chdir(project)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = pipeline_cli.main(list(args))
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        utils._tracking_uri = saved_uri
        utils._artifact_repos_cache.clear()
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def run_stage(project: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """`python -m pipeline <args>` in the project, which must succeed: its stdout."""
    result = run_cli(list(args), cwd=project, env=env or stage_env(project))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def start(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`python -m pipeline ...` in a process group of its own; stdout and stderr go to `log`.out/.err."""
    env = {**env, "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log.with_suffix(".out"), "wb") as out, open(log.with_suffix(".err"), "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True
        )


def run_dvc(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


# --- what a stage left behind -------------------------------------------------------------

OUTPUT_DIRS = ("checkpoints", "models", "metrics", "plots", "samples", "data")
TRACKING_FILES = {"mlflow.db", ".mlflow.db.lock", "mlartifacts"}  # the run record, not stage outputs


def temp_files(project: Path) -> list[Path]:
    return sorted(p for d in OUTPUT_DIRS for p in (project / d).rglob(".*.tmp"))


def assert_outputs_complete(project: Path, temps_allowed: bool) -> None:
    """Every visible output file parses completely: nothing half-written is there to be trusted.

    Temp files of atomic writes may stay after a kill (hidden, never read); after a run that
    finished there must be none, or DVC would cache them inside the samples/ folder output.
    """
    for folder in OUTPUT_DIRS:
        for path in sorted((project / folder).rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            if path.suffix == ".pt" and not path.name.startswith("classifier-"):
                files.load_checkpoint(path)
            elif path.suffix == ".png":
                with Image.open(path) as image:
                    image.load()
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".csv":
                text = path.read_text()
                assert text.endswith("\n"), path
                assert len({line.count(",") for line in text.splitlines()}) == 1, path
            elif path.suffix == ".npz" and path.parent.name == "prepared":
                load_prepared(path)
            elif path.suffix == ".npz" and path.parent.name == "reference":
                load_reference(path)
    if not temps_allowed:
        assert temp_files(project) == []


def leave_kill_leftovers(*paths: Path) -> list[Path]:
    """Half-written temp files at `paths`, as a kill during an atomic write leaves them."""
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    return list(paths)


def snapshot(project: Path) -> dict[str, str]:
    """SHA-256 of every file in the project except the tracking store."""
    return {
        str(p.relative_to(project)): files.sha256_file(p)
        for p in sorted(project.rglob("*"))
        if p.is_file() and p.relative_to(project).parts[0] not in TRACKING_FILES
    }


def assert_refused(result: subprocess.CompletedProcess[str], *names: str) -> str:
    """Exit 2, no traceback, and a last stderr line that is one sentence naming every one of `names`."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and error.endswith("."), error
    for name in names:
        assert name in error, error
    return error


class Payload:
    """Unpickling this runs a shell command: a loader that executes pickles would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


# --- a real MLflow server on loopback -------------------------------------------------------


@pytest.fixture
def mlflow_server(tmp_path: Path, tracking_db: Path) -> Iterator[MlflowServer]:
    """`mlflow server` (not started yet) whose SQLite store is a copy of the pre-made empty one: the tests
    using it are about a server, not about it building a store."""
    server = MlflowServer(tmp_path / "server", store_from=tracking_db)
    try:
        yield server
    finally:
        server.stop()


def mlflow_client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)
