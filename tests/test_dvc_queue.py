"""A DVC queue grid end to end: `dvc exp run --queue -S ...`, `dvc queue start -j 2`, runs in MLflow."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.data import save_prepared
from tests.conftest import (
    SMALL_MODEL,
    TINY_TRAIN,
    dvc_repo,
    edit_params,
    run_dvc,
    synthetic_mnist,
    tracking_uri,
    write_reference,
)

pytestmark = pytest.mark.slow

# The real params, shrunk: the small model, a few steps, a small evaluation.
TINY = {
    "model": SMALL_MODEL,
    "train": {**TINY_TRAIN, "steps": 12, "sample_every": 6, "log_every": 3, "checkpoint_every": 6, "fid_every": 6,
              "fid_samples": 256},
    "evaluate": {"n_samples": 256, "fid_resamples": 10, "kid_subsets": 3, "kid_subset_size": 64, "batch_size": 256},
}  # fmt: skip
GRID = ["0.0001", "0.0003"]


def dvc(args: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> str:
    result = run_dvc(args, cwd, env)
    assert result.returncode == 0 or not check, f"dvc {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A committed project whose prepared data and reference are in the DVC cache, as after `dvc repro`.

    Both are small and made here (synthetic digits, and the reference the committed classifier
    computes on them), then recorded with `dvc commit`: the experiments run only train and evaluate.
    """
    repo, env = dvc_repo(tmp_path / "repo")  # queue workers run `dvc` and `python` from this interpreter
    mnist = synthetic_mnist(n_train=128, n_test=512)  # the reference needs N >= 2 x 128 features
    save_prepared(mnist, repo / "data/prepared/mnist.npz")
    write_reference(repo, mnist)
    edit_params(repo, **TINY)
    env["OMP_NUM_THREADS"] = "1"  # two workers on two cores
    for var in ("DCGAN_SWEEP", "MNIST_MIRROR"):
        env.pop(var, None)
    dvc(["commit", "--force", "prepare", "classifier", "reference"], repo, env)  # the classifier is the committed one
    for cmd in (["git", "add", "-A"], ["git", "commit", "-q", "-m", "tiny params"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True)
    return repo, env


def wait_for_queue(repo: Path, env: dict[str, str], timeout_s: float = 600) -> str:
    """`dvc queue start` returns at once: poll until every task is done and the workers have exited."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = dvc(["queue", "status"], repo, env)
        busy = any(word in line.split() for line in status.splitlines() for word in ("Queued", "Running"))
        if not busy and "Worker status: 0 active, 0 idle" in status:
            return status
        time.sleep(3)
    raise AssertionError(f"the queue did not finish in {timeout_s} s:\n{status}")


def test_queued_grid_on_two_workers_lands_in_mlflow_and_dvc_exp_show(repo: tuple[Path, dict[str, str]]) -> None:
    path, env = repo
    assert not (path / "mlflow.db").exists()  # the two workers race to create it
    queued = dvc(["exp", "run", "--queue", "-S", f"train.lr_g={','.join(GRID)}"], path, env)
    names = [line.split("'")[1] for line in queued.splitlines() if line.startswith("Queued experiment")]
    assert len(names) == 2, queued

    dvc(["queue", "start", "-j", "2"], path, {**env, "DCGAN_SWEEP": "lr-grid"})
    status = wait_for_queue(path, env)
    assert status.count("Success") == 2, status + dvc(["queue", "logs", names[0]], path, env, check=False)

    shown = json.loads(dvc(["exp", "show", "--json"], path, env))
    experiments = {
        exp["name"]: exp["revs"][0]["data"]
        for entry in shown for exp in (entry.get("experiments") or []) if exp.get("name") in names
    }  # fmt: skip
    assert set(experiments) == set(names)
    for data in experiments.values():
        scores = data["metrics"]["metrics/eval.json"]["data"]
        assert scores["n_samples"] == 256 and scores["fid"] > 0

    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri(path))
    client = MlflowClient()
    experiment = client.get_experiment_by_name("dcgan-mnist")
    runs = client.search_runs([experiment.experiment_id], "tags.sweep = 'lr-grid'")
    training = {r.info.run_name: r for r in runs if r.data.tags["stage"] == "train"}
    assert set(training) == set(names)  # one MLflow run per DVC experiment, named after it
    for name, run in training.items():
        exp = experiments[name]
        assert run.info.status == "FINISHED" and run.data.tags["dvc.exp_name"] == name
        assert run.data.params["train.lr_g"] == str(exp["params"]["params.yaml"]["data"]["train"]["lr_g"])
        assert run.data.metrics["eval_fid"] == pytest.approx(exp["metrics"]["metrics/eval.json"]["data"]["fid"])
        evaluations = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
        assert len(evaluations) == 1 and evaluations[0].data.tags["stage"] == "evaluate"
        # Artifacts live at the repository root, not in DVC's deleted temporary workspace.
        assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(path / "mlartifacts")
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"train_log.csv", "images"}
        saved = Path(evaluations[0].info.artifact_uri.removeprefix("file://")) / "evaluation/eval.json"
        assert json.loads(saved.read_text())["fid"] == pytest.approx(run.data.metrics["eval_fid"])
    assert not list((path / ".dvc/tmp/exps").glob("*/mlflow.db"))
