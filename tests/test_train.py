from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import files
from pipeline.gan.loop import Callbacks, Diverged
from pipeline.gan.state import new_state
from pipeline.params import ModelParams, Params, TrainParams, flatten
from tests.conftest import (
    CPU,
    SMALL_MODEL,
    TINY_TRAIN,
    assert_same_weights,
    edit_params,
    make_project,
    project_client,
    run_cli,
    stage_env,
    tracking_uri,
    train_tiny,
    with_db,
)


def weights(state) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {**state.generator.state_dict(), **{f"D.{k}": v for k, v in state.discriminator.state_dict().items()}}


def assert_identical(a, b) -> None:  # type: ignore[no-untyped-def]
    assert_same_weights(weights(a), weights(b))
    assert a.history == b.history


def test_same_seed_gives_bit_identical_runs() -> None:
    assert_identical(train_tiny(6), train_tiny(6))


def test_other_seed_differs() -> None:
    assert train_tiny(6, seed=1).history != train_tiny(6).history


def test_resume_from_checkpoint_is_bit_identical(tmp_path: Path) -> None:
    saved = tmp_path / "ckpt.pt"
    train_tiny(3, callbacks=Callbacks(on_checkpoint=lambda s: files.save_checkpoint(s.to_checkpoint("fp"), saved)))
    model, params = ModelParams(**SMALL_MODEL), TrainParams(**TINY_TRAIN)
    resumed = new_state(model, params, CPU, 10)
    torch.manual_seed(12345)  # a different RNG state must be overwritten by the checkpoint's
    resumed.restore(files.load_checkpoint(saved))
    assert resumed.step == 3
    assert_identical(train_tiny(6, state=resumed), train_tiny(6))


def test_history_and_callbacks() -> None:
    logs, grids = [], []
    callbacks = Callbacks(on_log=lambda rows, _: logs.append(rows), on_sample=lambda step, g: grids.append((step, g)))
    state = train_tiny(6, callbacks=callbacks)
    assert [r[0] for r in state.history] == [1, 2, 3, 4, 5, 6]
    assert [len(rows) for rows in logs] == [2, 1, 1, 2]  # log points 2, 4, 6 and checkpoint 3
    assert all(0.0 <= r[2] <= 1.0 and r[1] > 0 and r[3] > 0 for r in state.history)
    assert [step for step, _ in grids] == [3, 6]
    assert grids[0][1].shape == (152, 152) and grids[0][1].dtype == np.uint8


def test_nan_loss_stops_with_step_and_loss() -> None:
    model, params = ModelParams(**SMALL_MODEL), TrainParams(**TINY_TRAIN)
    state = new_state(model, params, CPU, 10)
    with torch.no_grad():
        state.generator.dense.weight.fill_(float("nan"))
    saved = []
    with pytest.raises(Diverged, match=r"training diverged at step 1: D loss nan, G loss nan"):
        train_tiny(6, state=state, callbacks=Callbacks(on_checkpoint=saved.append))
    assert saved == []  # no checkpoint is written from a diverged state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_cuda_bf16_step_runs() -> None:
    state = train_tiny(6, precision="bf16", device="cuda")
    assert len(state.history) == 6 and all(np.isfinite(r[1]) for r in state.history)


# --- the stage, end to end -------------------------------------------------------------


@pytest.mark.slow
def test_stage_writes_outputs_and_logs_to_mlflow(tmp_path: Path, tracking_db: Path) -> None:
    project = with_db(make_project(tmp_path / "p", steps=6), tracking_db)
    result = run_cli(["train"], cwd=project, env=stage_env(project))
    assert result.returncode == 0, result.stderr
    for out in ("models/generator.pt", "metrics/train.json", "metrics/train_log.csv", "plots/train_samples.png",
                "samples/step_000003.png", "samples/step_000006.png", "checkpoints/train.pt"):
        assert (project / out).is_file(), out
    assert len((project / "metrics/train_log.csv").read_text().splitlines()) == 7
    info = json.loads((project / "models/train_run.json").read_text())

    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri(project))
    client = MlflowClient()
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    params = Params.model_validate(yaml.safe_load((project / "params.yaml").read_text()))
    assert run.data.params == flatten(params)
    assert run.data.tags["data.sha256"] == files.sha256_file(project / "data/prepared/mnist.npz")
    assert {"device", "torch", "cuda"} <= run.data.tags.keys()
    assert [m.step for m in client.get_metric_history(run.info.run_id, "g_loss")] == [1, 2, 3, 4, 5, 6]
    images_logged = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("step+3+" in p for p in images_logged) and any("step+6+" in p for p in images_logged)
    models = mlflow.search_logged_models(experiment_ids=[info["experiment_id"]], output_format="list")
    generator = mlflow.pytorch.load_model(f"models:/{models[0].model_id}")
    assert generator(torch.randn(3, 100)).shape == (3, 1, 28, 28)


@pytest.mark.slow
def test_a_model_upload_cut_short_is_removed_when_the_run_ends_again(tmp_path: Path, tracking_db: Path) -> None:
    """A kill during the final upload leaves a PENDING logged model beside the run; the next end of
    the run (here: the run extended by two steps) deletes it, says so, and logs one READY model."""
    import mlflow

    project = with_db(make_project(tmp_path / "p", steps=3), tracking_db)
    assert run_cli(["train"], cwd=project, env=stage_env(project)).returncode == 0
    info = json.loads((project / "models/train_run.json").read_text())
    client = project_client(project)
    mlflow.set_tracking_uri(tracking_uri(project))
    pending = client.create_logged_model(info["experiment_id"], name="generator", source_run_id=info["run_id"])
    assert str(pending.status) == "PENDING"
    edit_params(project, train={"steps": 5})
    result = run_cli(["train"], cwd=project, env=stage_env(project))
    assert result.returncode == 0, result.stderr
    assert f"removed 1 unfinished logged model(s) of MLflow run {info['run_id']}" in result.stdout
    models = client.search_logged_models([info["experiment_id"]], filter_string=f"source_run_id = '{info['run_id']}'")
    assert sorted(str(m.status) for m in models) == ["READY", "READY"]  # the first end's and this one's


@pytest.mark.slow
def test_checkpoint_from_other_params_is_not_resumed(tmp_path: Path, tracking_db: Path) -> None:
    project = with_db(make_project(tmp_path / "p", steps=3), tracking_db)
    assert run_cli(["train"], cwd=project, env=stage_env(project)).returncode == 0
    edit_params(project, train={"lr_g": 0.001})
    result = run_cli(["train"], cwd=project, env=stage_env(project))
    assert result.returncode == 0, result.stderr
    assert "(other params, or another budget) is kept as checkpoints/history/" in result.stdout
