"""`dvc repro` end to end in a fresh git repository holding a copy of the project."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_project, git_env, run_dvc, shared_mnist_dir

pytestmark = pytest.mark.slow

# The real params, shrunk: a few training steps, a small evaluation.
TINY = {
    "train": {"steps": 20, "batch_size": 16, "sample_every": 10, "log_every": 5, "checkpoint_every": 10,
              "fid_every": 10, "fid_samples": 256, "device": "cpu"},
    "evaluate": {"n_samples": 300, "kid_subsets": 5, "kid_subset_size": 100, "batch_size": 300},
}  # fmt: skip


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    mirror = shared_mnist_dir()
    if mirror is None:
        pytest.skip("needs the offline MNIST copy (MNIST_MIRROR or ../shared/data/mnist)")
    repo = copy_project(tmp_path / "repo")
    env = git_env()
    # Stages run `python -m pipeline`: make `python` this interpreter, as an activated venv does.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    env["MNIST_MIRROR"] = str(mirror)
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME"):
        env.pop(var, None)
    return repo, env


def shrink(repo: Path) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_repro_prepare_twice_second_is_a_no_op(project: tuple[Path, dict[str, str]]) -> None:
    repo, env = project
    first = run_dvc(["repro", "prepare"], repo, env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (repo / "data/prepared/mnist.npz").is_file() and (repo / "metrics/data.json").is_file()
    second = run_dvc(["repro", "prepare"], repo, env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Running stage" not in second.stdout and "up to date" in second.stdout


def test_whole_pipeline_with_tiny_params(project: tuple[Path, dict[str, str]]) -> None:
    repo, env = project
    shrink(repo)
    result = run_dvc(["repro"], repo, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The committed classifier is used as is: a fresh clone never retrains it.
    assert "Running stage 'classifier'" not in result.stdout
    for stage in ("prepare", "reference", "train", "evaluate"):
        assert f"Running stage '{stage}'" in result.stdout

    scores = json.loads((repo / "metrics/eval.json").read_text())
    assert scores["n_samples"] == 300 and scores["fid"] > scores["fid_floor"] > 0
    assert len(scores["classifier_sha256"]) == 64
    assert len((repo / "metrics/train_fid.csv").read_text().splitlines()) == 3  # header + steps 10, 20

    shown = run_dvc(["exp", "show", "--json"], repo, env)
    assert shown.returncode == 0, shown.stderr
    assert "metrics/eval.json" in shown.stdout and '"fid_floor"' in shown.stdout

    # Evaluation scores land in the training run, next to a nested evaluation run.
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    run_id = json.loads((repo / "models/train_run.json").read_text())["run_id"]
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.data.metrics["eval_fid"] == pytest.approx(scores["fid"])
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert len(children) == 1 and children[0].data.metrics["fid"] == pytest.approx(scores["fid"])

    again = run_dvc(["repro"], repo, env)
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout
