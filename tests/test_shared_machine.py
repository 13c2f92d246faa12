"""Several jobs on one machine: the stage says when the cores are oversubscribed, and the thread count a
run trains with (which its weights depend on) is a param and a tag of its MLflow run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import machine
from tests.conftest import make_project, run_cli, stage_env, with_db


@pytest.mark.parametrize(
    ("threads", "cores", "load", "share"),
    [(2, 2, 6.0, 1), (2, 2, 2.5, 1), (16, 16, 40.0, 5), (8, 8, 12.0, 3)],
)
def test_a_busy_machine_is_said_with_a_share_of_its_cores(threads: int, cores: int, load: float, share: int) -> None:
    advice = machine.busy_machine_advice(threads, cores, load)
    assert advice is not None
    assert f"load {load:.1f} on {cores} cores" in advice and f"adds {threads} thread(s)" in advice
    assert f"-S train.threads={share} " in advice and f"OMP_NUM_THREADS={share};" in advice


@pytest.mark.parametrize(("cores", "load"), [(2, 0.3), (2, 2.0), (16, 15.9)])
def test_a_machine_within_its_cores_gets_no_advice(cores: int, load: float) -> None:
    assert machine.busy_machine_advice(cores, cores, load) is None


def test_use_threads_sets_the_count_and_zero_keeps_torchs_choice() -> None:
    before = torch.get_num_threads()
    try:
        assert machine.use_threads(0) == before
        assert machine.use_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_the_thread_count_a_run_trains_with_is_its_param_and_tag(tmp_path: Path, tracking_db: Path) -> None:
    from mlflow import MlflowClient

    project = with_db(make_project(tmp_path / "p", steps=2, threads=1), tracking_db)
    result = run_cli(["train"], cwd=project, env=stage_env(project))
    assert result.returncode == 0, result.stderr
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("dcgan-mnist").experiment_id])
    assert run.data.params["train.threads"] == "1"
    assert run.data.tags["threads"] == "1"
