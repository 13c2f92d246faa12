"""`dvc repro` end to end in a fresh git repository holding a copy of the project."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.gan.export import load_generator
from pipeline.gan.sampling import generate
from pipeline.params import load_params
from tests.conftest import edit_params, mnist_dvc_repo, run_cli, run_dvc, tracking_uri

pytestmark = pytest.mark.slow

# The real params, shrunk: a few training steps, a small evaluation.
TINY = {
    "train": {"steps": 20, "batch_size": 16, "sample_every": 10, "log_every": 5, "checkpoint_every": 10,
              "fid_every": 10, "fid_samples": 256, "device": "cpu"},
    "evaluate": {"n_samples": 300, "fid_resamples": 10, "kid_subsets": 5, "kid_subset_size": 100, "batch_size": 300},
}  # fmt: skip


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    return mnist_dvc_repo(tmp_path / "repo")


def test_repro_prepare_twice_second_is_a_no_op(project: tuple[Path, dict[str, str]]) -> None:
    repo, env = project
    first = run_dvc(["repro", "prepare"], repo, env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (repo / "data/prepared/mnist.npz").is_file() and (repo / "metrics/data.json").is_file()
    second = run_dvc(["repro", "prepare"], repo, env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Running stage" not in second.stdout and "up to date" in second.stdout


def test_whole_pipeline_with_tiny_params_then_a_second_clone_pulls_it(project: tuple[Path, dict[str, str]]) -> None:
    repo, env = project
    edit_params(repo, **TINY)
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

    mlflow.set_tracking_uri(tracking_uri(repo))
    run_id = json.loads((repo / "models/train_run.json").read_text())["run_id"]
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.data.metrics["eval_fid"] == pytest.approx(scores["fid"])
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert len(children) == 1 and children[0].data.metrics["fid"] == pytest.approx(scores["fid"])

    again = run_dvc(["repro"], repo, env)
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout

    # The team's DVC remote (a shared directory): push from this clone, pull into a fresh one.
    remote = repo.parent / "remote"
    assert run_dvc(["remote", "add", "-d", "shared", str(remote)], repo, env).returncode == 0
    for command in (["git", "add", "-A"], ["git", "commit", "-q", "-m", "tiny run and the remote"]):
        subprocess.run(command, cwd=repo, env=env, check=True)
    pushed = run_dvc(["push"], repo, env)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    other = repo.parent / "other"
    subprocess.run(["git", "clone", "-q", str(repo), str(other)], env=env, check=True)
    pulled = run_dvc(["pull"], other, env)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    status = run_dvc(["status"], other, env)
    assert "Data and pipelines are up to date." in status.stdout, status.stdout
    nothing = run_dvc(["repro"], other, env)
    assert nothing.returncode == 0 and "Running stage" not in nothing.stdout, nothing.stdout
    assert (other / "models/generator.pt").read_bytes() == (repo / "models/generator.pt").read_bytes()

    # The pulled model's samples score exactly as the pushed one's.
    reports = []
    for clone in (repo, other):
        params = load_params(clone / "params.yaml")
        generator = load_generator(clone / "models/generator.pt", params.model, torch.device("cpu"), 10)
        np.save(clone / "samples.npy", generate(generator, 300, 7, 100, torch.device("cpu")).numpy())
        scored = run_cli(["evaluate", "--samples", "samples.npy", "--output", "samples.eval.json"], cwd=clone, env=env)
        assert scored.returncode == 0, scored.stderr
        reports.append({k: v for k, v in json.loads((clone / "samples.eval.json").read_text()).items() if k != "seconds"})
    assert reports[0] == reports[1]

    # A bad value, or a typo'd key, stops DVC at check-params: no stage's outputs are deleted.
    trained, text = (repo / "models/generator.pt").read_bytes(), (repo / "params.yaml").read_text()
    bad = run_dvc(["exp", "run", "-S", "train.lr_g=-0.001"], repo, env)
    assert bad.returncode != 0 and "'train.lr_g' = -0.001 is invalid" in bad.stdout + bad.stderr, bad.stdout
    (repo / "params.yaml").write_text(text.replace("train:\n", "train:\n  lr_gg: 0.1\n", 1))
    typo = run_dvc(["repro"], repo, env)
    assert typo.returncode != 0 and "unknown key 'train.lr_gg'" in typo.stdout + typo.stderr, typo.stdout
    for failed in (bad, typo):
        assert "Running stage 'check-params'" in failed.stdout and "Running stage 'prepare'" not in failed.stdout
    assert (repo / "models/generator.pt").read_bytes() == trained
    assert all((repo / path).is_file() for path in ("data/reference/mnist.npz", "metrics/eval.json"))
    (repo / "params.yaml").write_text(text)
    assert "Running stage" not in run_dvc(["repro"], repo, env).stdout  # the last good state, as it was
