"""The tracking server is down or dies mid-run (then `resend`), and many writers share one store.

The servers here are real `mlflow server` processes started by the tests on a free loopback
port, with their own SQLite store and artifact folder, and always killed afterwards. Nothing
here touches the network beyond 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import files
from pipeline.errors import UserError
from pipeline.params import Params, flatten
from pipeline.stages.resend import backfill
from pipeline.tracking import connection, mlflow_run
from tests.conftest import (
    MlflowServer,
    assert_outputs_complete,
    assert_refused,
    free_port,
    make_project,
    mlflow_client,
    run_cli,
    run_in,
    snapshot,
    stage_env,
    start,
)

LOSSES = ("d_loss", "d_acc", "g_loss")


def tracking_env(project: Path, uri: str) -> dict[str, str]:
    """The stage's environment with MLFLOW_TRACKING_URI=`uri` and MLflow's own HTTP retry settings unset,
    so the project's fail-fast defaults (tracking.connect) are what is tested."""
    env = {k: v for k, v in stage_env(project).items() if not k.startswith("MLFLOW_HTTP_REQUEST_")}
    return {**env, "MLFLOW_TRACKING_URI": uri}


# --- unreachable at the start ---------------------------------------------------------------------


def timed_train(project: Path, uri: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """`train` against `uri`: its result and wall seconds (the CLI's start, torch and MLflow imported, included)."""
    started = time.monotonic()
    result = run_cli(["train"], cwd=project, env=tracking_env(project, uri), timeout=120)
    return result, time.monotonic() - started


@dataclasses.dataclass
class Refused:
    """`train` run once against a port where nothing listens."""

    project: Path
    port: int
    before: dict[str, str]  # the project's files before it
    result: subprocess.CompletedProcess[str]
    took: float  # wall seconds


@pytest.fixture(scope="module")
def refused(tmp_path_factory: pytest.TempPathFactory) -> Refused:
    """`train` against a refused connection, run once for the module: what the unreachable test checks,
    and the yardstick the hung test times its own `train` against, in the test after it."""
    project = make_project(tmp_path_factory.mktemp("refused") / "p", steps=3)
    port = free_port()  # nothing listens there
    before = snapshot(project)
    result, took = timed_train(project, f"http://127.0.0.1:{port}")
    return Refused(project, port, before, result, took)


def test_unreachable_server_is_reported_within_seconds_before_training(refused: Refused) -> None:
    assert refused.took < 60, refused.took  # a loaded machine's interpreter start; MLflow's own retries: minutes
    uri = f"http://127.0.0.1:{refused.port}"
    assert_refused(refused.result, f"MLflow tracking server {uri} is unreachable (connection refused)")
    assert snapshot(refused.project) == refused.before  # no checkpoint, no sample: training never began


@pytest.mark.slow
def test_hung_server_is_reported_within_seconds_before_training(refused: Refused) -> None:
    """A server that accepts connections and never answers (a hung process, a wedged proxy).

    Timed against the refused connection's `train` of the test before (the module's fixture), so a
    slow interpreter start on a loaded machine cancels out: the hang may cost its 5 s timeout and one
    retry, not minutes."""
    project = refused.project  # the refused `train` left it as it was (the test before checks that)
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)  # the kernel completes the handshakes; nobody ever reads or answers
        uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
        before = snapshot(project)
        result, took = timed_train(project, uri)
    assert took - refused.took < 20, (took, refused.took)
    assert_refused(result, f"MLflow tracking server {uri} is unreachable (no answer within 5 s)")
    assert snapshot(project) == before


# --- the server dies mid-run; `resend` once it is back --------------------------------------------------


def wait_for(proc: subprocess.Popen[bytes], ready, timeout: float = 300) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the stage ended before the fault could be injected"
        assert time.monotonic() < deadline, "the stage never reached the point of the fault"
        time.sleep(0.005)


def assert_run_complete(uri: str, run_id: str, project: Path, grid_steps: set[int]) -> dict[str, int]:
    """The MLflow run holds everything the DVC outputs hold, each metric step and image once."""
    client = mlflow_client(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = Params.model_validate(yaml.safe_load((project / "params.yaml").read_text()))
    assert run.data.params == flatten(params)
    history = files.load_checkpoint(project / "checkpoints/train.pt")["history"].tolist()
    counts = {}
    for i, name in enumerate(LOSSES, start=1):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
        assert logged == [(int(row[0]), row[i]) for row in history], name  # every step once, exact values
        counts[name] = len(logged)
    final = files.read_json(project / "metrics/train.json")
    for key in ("d_loss_last100", "g_loss_last100", "images_per_second"):
        assert run.data.metrics[f"final_{key}"] == final[key]
    names = [Path(a.path).name for a in client.list_artifacts(run_id, "images")]
    for suffix in (".png", "+compressed.webp"):
        shown = sorted(int(n.split("+step+")[1].split("+")[0]) for n in names if n.endswith(suffix))
        assert shown == sorted(grid_steps), suffix  # each grid once
    assert "train_log.csv" in {a.path for a in client.list_artifacts(run_id)}
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert [str(m.status) for m in models].count("READY") >= 1, [m.status for m in models]
    counts["images"] = len(names)
    return counts


@pytest.mark.slow
def test_server_killed_mid_training_then_resend_restores_the_run(tmp_path: Path, mlflow_server: MlflowServer) -> None:
    mlflow_server.start()
    steps, grid_steps = 24, set(range(4, 25, 4))
    project = make_project(tmp_path / "p", steps=steps, log_every=2, sample_every=4, checkpoint_every=10)
    env = tracking_env(project, mlflow_server.uri)
    proc = start(["train"], project, env, tmp_path / "logs/train")
    wait_for(proc, lambda: (project / "samples/step_000008.png").exists())  # the rest reaches no server
    mlflow_server.kill()
    assert proc.wait(timeout=300) == 0  # training went on to the end

    # The DVC outputs are complete.
    assert_outputs_complete(project, temps_allowed=False)
    assert len((project / "metrics/train_log.csv").read_text().splitlines()) == 1 + steps
    assert {int(p.stem[5:]) for p in (project / "samples").glob("step_*.png")} == grid_steps
    assert files.read_json(project / "metrics/train.json")["step"] == steps
    # The user is told, once at the failure and once at the end, what MLflow lacks and how to send it.
    stderr = (tmp_path / "logs/train.err").read_text()
    assert stderr.count("warning: MLflow logging failed at ") == 1, stderr[-3000:]
    summary = stderr.strip().splitlines()[-1]
    assert summary.startswith("warning: MLflow did not receive "), summary
    assert re.search(rf"metrics of steps \d+-{steps}\b", summary), summary
    assert re.search(rf"\d images 'samples' of steps \d+-{steps}\b", summary), summary
    for part in ("artifact train_log.csv", "model 'generator'", "run status (connection refused)",
                 "`python -m pipeline resend`"):  # fmt: skip
        assert part in summary, summary

    mlflow_server.start()  # back, on the same port and store
    run_id = files.read_json(project / "models/train_run.json")["run_id"]
    assert mlflow_client(mlflow_server.uri).get_run(run_id).info.status == "RUNNING"  # cut off mid-run
    result = run_in(project, "resend", env=env)
    assert result.returncode == 0, result.stderr
    assert f"re-sent to MLflow run {run_id}: " in result.stdout and "1 model" in result.stdout
    counts = assert_run_complete(mlflow_server.uri, run_id, project, grid_steps)

    again = run_in(project, "resend", env=env)  # idempotent: nothing is sent twice
    assert again.returncode == 0 and f"MLflow run {run_id} holds everything; nothing re-sent." in again.stdout
    assert assert_run_complete(mlflow_server.uri, run_id, project, grid_steps) == counts


def test_resend_refuses_where_no_training_finished(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", steps=3)
    env = tracking_env(project, f"http://127.0.0.1:{free_port()}")
    assert_refused(run_in(project, "resend", env=env), "no finished training run here")


def test_an_image_a_kill_left_half_uploaded_is_dropped_so_each_step_is_shown_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow uploads an image's PNG, then its compressed copy: a kill between the two left a PNG that a
    resumed run's upload of the same step duplicated (seen once in CI's kill test)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)  # connect() sets it: put it back after
    experiment = connection.connect(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", "dcgan-mnist")
    client = mlflow.MlflowClient()
    run = mlflow_run.MlflowRun(client.create_run(experiment).info.run_id, experiment, client)
    for step in (1, 2):
        run.log_image(np.full((28, 28), step, np.uint8), key="samples", step=step)
    root = tmp_path / "mlartifacts"
    (half,) = [p for p in root.rglob("samples+step+2+*+compressed.webp")]
    half.unlink()  # the kill

    def pngs() -> list[int]:
        names = [Path(a.path).name for a in client.list_artifacts(run.run_id, "images")]
        return sorted(int(n.split("+")[2]) for n in names if n.endswith(".png"))

    assert run.image_steps("samples") == {1} and pngs() == [1, 2]  # a plain listing deletes nothing
    assert run.image_steps("samples", drop_incomplete=True) == {1} and pngs() == [1]
    run.log_image(np.full((28, 28), 2, np.uint8), key="samples", step=2)  # the resumed run's upload
    assert pngs() == [1, 2] and run.image_steps("samples", drop_incomplete=True) == {1, 2}


def test_backfill_makes_a_new_run_once_when_the_store_lost_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server came back with an empty store: the record goes to one new run, tagged with the old id."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)  # connect() sets it: put it back after
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    experiment = connection.connect(tmp_path, uri, "dcgan-mnist")
    rows = [{"step": s, "d_loss": 0.5 + s, "g_loss": float(np.float32(0.1 * s))} for s in range(1, 5)]
    images = {2: np.full((152, 152), 7, np.uint8), 4: np.zeros((152, 152), np.uint8)}
    log = tmp_path / "train_log.csv"
    log.write_text("step,d_loss\n1,0.5\n")
    sent_ids = []
    for _ in range(2):
        run_id, sent = backfill(experiment, "0123456789abcdef", {"stage": "train"}, {"a": "1", "b": "x"},
                                         rows, images, "samples", [log])  # fmt: skip
        sent_ids.append((run_id, sent))
    (first, sent), (second, again) = sent_ids
    assert first == second != "0123456789abcdef"
    assert sent == {"params": 2, "tags": 0, "metrics": 8, "images": 2, "artifacts": 1, "model": 0}
    assert again == dict.fromkeys(sent, 0)
    client = mlflow_client(uri)
    run = client.get_run(first)
    assert run.data.tags["resent_from"] == "0123456789abcdef" and run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(first, "g_loss")] == [r["g_loss"] for r in rows]
    assert len(mlflow.search_runs([experiment], output_format="list")) == 1
    with pytest.raises(UserError, match=r"has a=1, not 2: these outputs are not its own"):
        backfill(experiment, first, {}, {"a": "2"}, [], {}, "samples", [])


# --- many writers at once ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_four_trainings_log_to_one_fresh_sqlite_store_at_once(tmp_path: Path) -> None:
    """Four `dvc exp run --queue -j 4`-style workers: workspaces under <repo>/.dvc/tmp/exps/, one fresh
    mlflow.db and one mlartifacts/ at <repo>, all four racing to create the database."""
    repo = tmp_path / "repo"
    steps, grid_steps = 8, {4, 8}
    workers = [make_project(repo / f".dvc/tmp/exps/run{i}", steps=steps, seed=i, log_every=2, sample_every=4,
                            checkpoint_every=4) for i in range(4)]  # fmt: skip
    procs = [start(["train"], w, stage_env(w), tmp_path / f"logs/{i}") for i, w in enumerate(workers)]
    for proc in procs:
        assert proc.wait(timeout=600) == 0
    for i in range(4):
        assert "warning: MLflow" not in (tmp_path / f"logs/{i}.err").read_text()
    assert not any((w / "mlflow.db").exists() for w in workers)  # one store, at the repository root

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    runs = {files.read_json(w / "models/train_run.json")["run_id"]: w for w in workers}
    assert len(runs) == 4
    for run_id, workspace in runs.items():
        assert_run_complete(uri, run_id, workspace, grid_steps)
        assert (repo / "mlartifacts").is_dir()
    client = mlflow_client(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "dcgan-mnist"]
    assert experiment.artifact_location == (repo / "mlartifacts").as_uri()
    assert len(client.search_runs([experiment.experiment_id])) == 4
