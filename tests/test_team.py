"""The team set-up against real servers started here: PostgreSQL, an MLflow server on it with basic
auth and proxied artifacts, and Optuna studies that several workers share.

Everything listens on 127.0.0.1 and is removed afterwards. Without PostgreSQL's server binaries
the tests skip with a sentence (`.ci/run` installs them, so CI never skips).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from pipeline import files
from tests.conftest import (
    ROOT,
    assert_refused,
    edit_params,
    make_eval_project,
    run_cli,
    snapshot,
    stage_env,
)
from tests.postgres import PostgresCluster, pg_available
from tests.servers import MEMBER, MlflowServer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(pg_available() is not None, reason=f"needs PostgreSQL: {pg_available()}"),
]

@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def team(postgres: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """The team's MLflow server: PostgreSQL store, basic auth, artifacts proxied to a folder."""
    server = MlflowServer(tmp_path_factory.mktemp("team-server"), postgres.create_database("mlflow"), auth=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(key, None)


def member_env(team: MlflowServer, project: Path, password: str | None = None) -> dict[str, str]:
    return team.member_env(stage_env(project), password)


SWEEP = {"trials": 2, "steps": 12, "fid_every": 6, "fid_samples": 32, "eval_samples": 64, "heartbeat_s": 1,
         "prune_after_trials": 1, "prune_after_steps": 0, "startup_trials": 2}  # fmt: skip


def team_project(path: Path, experiment: str = "dcgan-mnist", **sweep: Any) -> Path:
    """A member's clone: a small classifier and reference, synthetic data, tiny train/evaluate/sweep params."""
    make_eval_project(path)
    edit_params(path, train={"steps": 6, "fid_every": 3, "fid_samples": 32}, sweep={**SWEEP, **sweep},
                tracking={"experiment": experiment})  # fmt: skip
    return path


def test_every_command_works_against_the_team_server_and_a_replayed_resume_logs_every_metric_once(
    tmp_path: Path, team: MlflowServer
) -> None:
    """train, evaluate and resend as a member; then the run is extended from 6 to 12 steps, and a kill
    after step 12's metrics went out but before its checkpoint is played: the run is trained again from
    step 6 to 12, and every metric, the `final_*` ones included, still holds one point per step."""
    project = team_project(tmp_path / "p")
    env = member_env(team, project)
    for command in (["train"], ["evaluate"], ["resend"]):
        result = run_cli(command, cwd=project, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "holds everything; nothing re-sent" in result.stdout  # nothing was lost on the way

    client = team.client()
    info = files.read_json(project / "models/train_run.json")
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.info.user_id == MEMBER
    assert run.data.params["train.steps"] == "6" and "eval_fid" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "g_loss")] == [1, 2, 3, 4, 5, 6]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "fid_quick")] == [3, 6]
    images = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
    assert any("step+3+" in p for p in images) and any("step+6+" in p for p in images)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    assert (team.root / "artifacts").is_dir()
    import mlflow
    import torch

    (model,) = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    mlflow.set_tracking_uri(team.uri)
    generator = mlflow.pytorch.load_model(f"models:/{model.model_id}")  # downloaded through the proxy
    assert generator(torch.randn(2, 100)).shape == (2, 1, 28, 28)
    (evaluation,) = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert evaluation.data.tags["stage"] == "evaluate"
    # The data each run read, as MLflow datasets: the runs table's Dataset column tells MNIST from the others.
    (trained_on,) = run.inputs.dataset_inputs
    assert (trained_on.dataset.name, trained_on.dataset.source_type) == ("mnist", "local")
    assert trained_on.dataset.digest == run.data.tags["data.sha256"][:36]
    assert trained_on.dataset.digest == files.sha256_file(project / "data/prepared/mnist.npz")[:36]
    assert "data/prepared/mnist.npz" in trained_on.dataset.source
    assert {t.key: t.value for t in trained_on.tags} == {"mlflow.data.context": "training", "images": "128",
                                                         "classes": "10"}  # fmt: skip
    (scored_against,) = client.get_run(evaluation.info.run_id).inputs.dataset_inputs
    assert scored_against.dataset.name == "mnist-reference"
    assert scored_against.dataset.digest == files.sha256_file(project / "data/reference/mnist.npz")[:36]
    assert {t.key: t.value for t in scored_against.tags}["mlflow.data.context"] == "evaluation"
    assert team.failed_requests() == []  # the sweep's runs on the server: the last two tests

    # The run extended to 12 steps; then step 6's checkpoint back, as a kill after step 12's metrics left it.
    step_6 = (project / "checkpoints/train.pt").read_bytes()
    edit_params(project, train={"steps": 12})
    result = run_cli(["train"], cwd=project, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (project / "checkpoints/train.pt").write_bytes(step_6)
    result = run_cli(["train"], cwd=project, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from checkpoints/train.pt at step 6" in result.stdout

    run_id = run.info.run_id
    assert files.read_json(project / "models/train_run.json")["run_id"] == run_id
    run = client.get_run(run_id)
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)
    assert [m.step for m in client.get_metric_history(run_id, "final_images_per_second")] == [6, 12]
    assert [m.step for m in client.get_metric_history(run_id, "g_loss")] == list(range(1, 13))
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert len(models) == 2  # steps 6 and 12; the replayed step 12's weights are the model logged already


def test_a_refused_login_is_one_sentence_before_any_training(tmp_path: Path, team: MlflowServer) -> None:
    project = team_project(tmp_path / "p")
    before = snapshot(project)
    started = time.monotonic()
    result = run_cli(["train"], cwd=project, env=member_env(team, project, password="not-the-password"))
    assert time.monotonic() - started < 60
    assert_refused(result, f"MLflow tracking server {team.uri} refused the login", "MLFLOW_TRACKING_PASSWORD")
    assert snapshot(project) == before


def sweep_worker(project: Path, env: dict[str, str], storage: str, log: Path) -> subprocess.Popen[bytes]:
    """`python -m pipeline sweep --storage URL`, in a session of its own (a clone on another machine)."""
    env = {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline", "sweep", "--storage", storage], cwd=project,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def study(storage: str, name: str = "dcgan-sweep") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(storage, skip_table_creation=True))


def test_sweep_workers_share_one_postgres_study_and_rerun_a_killed_workers_trial(
    tmp_path: Path, postgres: PostgresCluster, team: MlflowServer
) -> None:
    storage = postgres.create_database("optuna_shared")
    # A new experiment: the three workers also race to create it on the server.
    clones = [team_project(tmp_path / f"clone{i}", experiment="team-sweep", trials=4) for i in range(3)]
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    workers = [sweep_worker(clone, member_env(team, clone), storage, log) for clone, log in zip(clones, logs, strict=True)]
    victim, deadline = workers[0], time.monotonic() + 300
    while time.monotonic() < deadline:  # kill the first worker in the middle of a trial of its own
        if re.search(r"^trial \d+: step ", logs[0].read_text(), re.MULTILINE):  # after a quick FID, before the end
            os.killpg(victim.pid, signal.SIGKILL)
            break
        assert victim.poll() is None, "the worker ended before it could be killed"
        time.sleep(0.05)
    victim.wait()
    for worker in workers[1:]:
        assert worker.wait(timeout=600) == 0, [log.read_text()[-2000:] for log in logs]

    trials = study(storage).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4 and len({t.number for t in trials}) == len(trials)
    retried = [t for t in trials if t.system_attrs.get("failed_trial") is not None]
    assert len(retried) == 1 and retried[0].state.is_finished()  # the killed worker's trial, run by another
    tables = [log.read_text().split("rank  trial")[-1] for log in logs[1:]]
    assert tables[0] == tables[1]  # whichever worker finishes last reports the same study
    password = postgres.password
    for log in logs:
        assert password not in log.read_text()
    client = team.client()
    experiment = client.get_experiment_by_name("team-sweep")
    runs = client.search_runs([experiment.experiment_id], "tags.sweep = 'dcgan-sweep'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1  # the three workers joined one parent run
    children = {r.data.tags["mlflow.runName"] for r in runs if r not in parents}
    assert {f"dcgan-sweep #{t.number}" for t in finished} <= children
    for run in runs:
        assert password not in repr(run.data.params) and password not in repr(run.data.tags)
    assert team.failed_requests() == []


def test_postgres_going_away_stops_the_sweep_with_one_sentence_and_loses_nothing(
    tmp_path: Path, postgres: PostgresCluster, team: MlflowServer
) -> None:
    storage = postgres.create_database("optuna_outage")
    project = team_project(tmp_path / "p", trials=2)
    log = tmp_path / "worker.log"
    worker = sweep_worker(project, member_env(team, project), storage, log)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and log.read_text().count(" at N=") < 1:  # a trial finished
        assert worker.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)
    done = {t.number: t.value for t in study(storage).get_trials() if t.state == TrialState.COMPLETE}
    postgres.kill()
    try:
        assert worker.wait(timeout=120) == 2
    finally:
        postgres.restart()
    error = log.read_text().strip().splitlines()[-1]
    assert error.startswith("error: Optuna storage postgresql://") and error.endswith(".") and "***" in error
    assert postgres.password not in log.read_text()
    again = run_cli(["sweep", "--storage", storage], cwd=project, env=member_env(team, project), timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    trials = study(storage).get_trials()
    assert {t.number: t.value for t in trials if t.number in done} == done  # finished trials kept
    assert len([t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 2
    shutil.rmtree(project)
