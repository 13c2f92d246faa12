"""The tracker interface: one contract, held by MlflowRun (on a SQLite store) and MemoryTracker alike,
so the in-memory tracker the fast stage tests use cannot drift from the real one; then those
fast tests: what the train and evaluate stages log, seen in memory without an MLflow store."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from pipeline import files
from pipeline.gan.architectures import build_generator
from pipeline.gan.export import for_export
from pipeline.params import ModelParams, Params, flatten
from pipeline.tracking import connection, runs
from pipeline.tracking.logged_model import (
    ARTIFACT_SHA_TAG,
    TENSORS_SHA_TAG,
    WEIGHTS_FILE,
    save_weights,
    tensors_sha256,
)
from pipeline.tracking.memory import MemoryStore, RunData
from pipeline.tracking.mlflow_run import MlflowRun
from tests.conftest import SMALL_MODEL, make_eval_project, make_project

# --- one contract, two trackers ---------------------------------------------------------------


@dataclass
class Backend:
    """One tracker behind runs.py, and a look at what its store holds, in the same terms for both."""

    name: str
    experiment_id: str
    store: MemoryStore | None = None

    def view(self, run_id: str) -> dict[str, Any]:
        """The run's status, params, tags and metric values (step, value) as the store holds them."""
        if self.store is not None:
            data = self.store.runs[run_id]
            return {"status": data.status, "params": data.params, "tags": data.tags,
                    "metrics": {name: sorted(values) for name, values in data.metrics.items()}}  # fmt: skip
        import mlflow

        client = mlflow.MlflowClient()
        run = client.get_run(run_id)
        metrics = {name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
                   for name in run.data.metrics}  # fmt: skip
        return {"status": run.info.status, "params": dict(run.data.params), "tags": dict(run.data.tags),
                "metrics": metrics}  # fmt: skip


@pytest.fixture(scope="module")
def sqlite_experiment(tmp_path_factory: pytest.TempPathFactory, tracking_db: Path) -> Iterator[str]:
    """An experiment in a SQLite store (a copy of the session's empty database), MLflow pointed at it."""
    from mlflow.tracking._tracking_service import utils

    root = tmp_path_factory.mktemp("contract")
    (root / "mlflow.db").write_bytes(tracking_db.read_bytes())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utils, "_tracking_uri", utils._tracking_uri)  # connect() sets it: put it back after
        yield connection.connect(root, f"sqlite:///{root / 'mlflow.db'}", "contract")


@pytest.fixture(params=["memory", pytest.param("mlflow", marks=pytest.mark.slow)])  # a store costs seconds
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Backend:
    if request.param == "memory":
        store = MemoryStore()
        monkeypatch.setattr(runs, "BACKEND", store)
        return Backend("memory", "1", store)
    assert runs.BACKEND is MlflowRun  # what the stages run with, unless a test puts another there
    return Backend("mlflow", request.getfixturevalue("sqlite_experiment"))


def test_a_run_keeps_params_tags_and_finite_metrics_and_ends_with_its_status(backend: Backend) -> None:
    run = runs.open_run(backend.experiment_id, "train", {"stage": "train"})
    run.log_params({"train.lr": "0.0002", "store": "postgresql://ann:s3cr3t@db/x"})
    run.log_params({"train.lr": "0.0002", "train.steps": "10"})  # a resumed run: one param new
    run.log_params({"train.steps": "12"})  # MLflow keeps a param's first value: the change is a tag
    run.set_tags({"note": "http://bob:pw@h:5000"})
    run.log_metrics([{"step": 1, "g_loss": 1.5, "d_loss": float("nan")}, {"step": 2, "g_loss": 0.25}])
    run.log_metrics([{"step": 0, "fid": 3.125}])
    assert run.metric_steps("g_loss") == {1, 2} and run.metric_steps("d_loss") == set()
    assert run.current_params() == {"train.lr": "0.0002", "store": "postgresql://ann:***@db/x", "train.steps": "12"}
    assert {"stage": "train", "note": "http://bob:***@h:5000"}.items() <= run.tags().items()
    run.finish("KILLED")

    seen = backend.view(run.run_id)
    assert seen["status"] == "KILLED" and run.lost == [] and run.lost_summary() == ""
    assert seen["params"] == {"train.lr": "0.0002", "store": "postgresql://ann:***@db/x", "train.steps": "10"}
    assert {"stage": "train", "param_changed.train.steps": "12", "note": "http://bob:***@h:5000",
            "pipeline.pid": str(os.getpid())}.items() <= seen["tags"].items()  # fmt: skip
    assert seen["metrics"] == {"g_loss": [(1, 1.5), (2, 0.25)], "fid": [(0, 3.125)]}


def test_a_resumed_run_is_the_same_run_and_says_its_status_before(backend: Backend) -> None:
    first = runs.open_run(backend.experiment_id, "train", {"stage": "train"})
    first.log_metrics([{"step": 4, "g_loss": 1.0}])
    first.finish("KILLED")
    again = runs.open_run(backend.experiment_id, "ignored", {}, resume_run_id=first.run_id)
    assert again.run_id == first.run_id and again.previous_status == "KILLED"
    assert backend.view(first.run_id)["status"] == "RUNNING"
    assert again.logged_steps("g_loss", "samples") == (4, set())
    again.finish()
    other = runs.open_run(backend.experiment_id, None, {"a": "b"}, resume_run_id="not-a-run-of-this-store")
    assert other.run_id != first.run_id and other.previous_status is None
    other.finish()


def test_images_artifacts_and_datasets_are_listed_as_the_store_holds_them(backend: Backend, tmp_path: Path) -> None:
    run = runs.open_run(backend.experiment_id, "eval", {})
    for step in (3, 6):
        run.log_image(np.full((28, 28), step, np.uint8), key="samples", step=step)
    (tmp_path / "train_log.csv").write_text("step,g_loss\n1,0.5\n")
    (tmp_path / "eval.json").write_text("{}")
    run.log_artifact(tmp_path / "train_log.csv")
    run.log_artifact(tmp_path / "eval.json", "evaluation")
    run.log_dataset("mnist", "ab" * 32, Path("data/prepared/mnist.npz"), "training", {"images": 128, "classes": 10})
    assert run.image_steps("samples") == {3, 6} and run.image_steps("other") == set()
    assert run.image_steps("samples", drop_incomplete=True) == {3, 6}
    assert run.artifact_names() == {"train_log.csv", "evaluation", "images"}
    run.finish()
    assert run.lost == []


def test_a_logged_model_is_found_by_its_weights_and_carries_their_hashes(backend: Backend) -> None:
    torch.manual_seed(0)
    weights = build_generator(ModelParams(**SMALL_MODEL), n_classes=0).state_dict()
    run = runs.open_run(backend.experiment_id, "train", {})
    assert not run.has_model() and run.logged_models() == []
    run.log_model(*for_export(ModelParams(**SMALL_MODEL), weights, 0))
    assert run.has_model() and run.has_model(tensors_sha256(weights)) and not run.has_model("0" * 64)
    assert run.drop_unfinished_models() == 0
    (model,) = run.logged_models()
    assert str(model.status) == "READY" and model.creation_timestamp > 0 and model.artifact_location
    assert model.tags[TENSORS_SHA_TAG] == tensors_sha256(weights)
    assert model.tags[ARTIFACT_SHA_TAG] == expected_artifact_sha(weights)
    run.finish()


def expected_artifact_sha(weights: dict[str, torch.Tensor]) -> str:
    """The SHA-256 of the weights file a logged model of `weights` (the small model's) carries."""
    import tempfile

    from pipeline.tracking.logged_model import architecture

    with tempfile.TemporaryDirectory() as where:
        tags = save_weights(weights, architecture(build_generator(ModelParams(**SMALL_MODEL), n_classes=0)), Path(where) / WEIGHTS_FILE)
    return tags[ARTIFACT_SHA_TAG]


def test_children_nest_and_runs_are_found_again_by_id_and_tag(backend: Backend) -> None:
    parent = runs.shared_run(backend.experiment_id, "study", {"sweep": "s1"})
    child = parent.child("trial 0", {"sweep.trial": "0"})
    child.finish("KILLED")
    assert backend.view(child.run_id)["tags"]["mlflow.parentRunId"] == parent.run_id
    assert backend.view(child.run_id)["status"] == "KILLED"
    found = runs.existing_run(parent.run_id, backend.experiment_id)
    assert found is not None and found.run_id == parent.run_id and found.previous_status is None
    assert runs.existing_run(parent.run_id, "another experiment") is None
    tagged = runs.tagged_run(backend.experiment_id, "sweep.trial", "0")
    assert tagged is not None and tagged.run_id == child.run_id
    assert runs.tagged_run(backend.experiment_id, "sweep.trial", "never") is None
    parent.finish()
    assert backend.view(parent.run_id)["status"] == "FINISHED"
    found.reopen()  # a resumed sweep
    assert backend.view(parent.run_id)["status"] == "RUNNING"
    found.finish()


# --- what the in-memory tracker adds: an outage on demand ---------------------------------------


def test_a_store_gone_down_loses_every_later_item_as_data_and_says_it_once(capsys: pytest.CaptureFixture[str]) -> None:
    store = MemoryStore()
    run = store.start("1", "train", {})
    run.log_metrics([{"step": 1, "g_loss": 1.0}])
    store.go_down("connection refused")
    run.log_metrics([{"step": 2, "g_loss": 0.5}, {"step": 3, "g_loss": 0.4}])
    run.log_image(np.zeros((28, 28), np.uint8), key="samples", step=3)
    run.finish()
    assert run.lost_summary() == (
        "MLflow did not receive metrics of steps 2-3, 1 images 'samples' of steps 3-3, run status (connection refused)"
    )
    assert capsys.readouterr().err.count("warning: MLflow logging failed") == 1
    assert store.runs[run.run_id].status == "RUNNING" and store.runs[run.run_id].metrics == {"g_loss": [(1, 1.0)]}
    with pytest.raises(ConnectionError):
        run.metric_steps("g_loss")


# --- the stages, in memory: what they log, without an MLflow store -----------------------------


def train_in_process(project: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Params, dict[str, str]]:
    from pipeline.stages import train

    monkeypatch.chdir(project)
    train.main(project / "params.yaml")
    params = Params.model_validate(yaml.safe_load((project / "params.yaml").read_text()))
    return params, json.loads((project / "models/train_run.json").read_text())


def test_the_train_stage_logs_params_every_step_its_grids_log_and_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, memory_store: MemoryStore
) -> None:
    project = make_project(tmp_path / "p", steps=6)
    params, info = train_in_process(project, monkeypatch)
    data = memory_store.runs[info["run_id"]]
    assert data.status == "FINISHED" and data.params == flatten(params)
    assert data.tags["data.sha256"] == files.sha256_file(project / "data/prepared/mnist.npz")
    assert {"device", "torch", "cuda", "stage", "dist.world_size"} <= data.tags.keys()
    assert [step for step, _ in data.metrics["g_loss"]] == [1, 2, 3, 4, 5, 6]
    log = (project / "metrics/train_log.csv").read_text().splitlines()[1:]
    assert [value for _, value in data.metrics["g_loss"]] == [float(np.float32(line.split(",")[3])) for line in log]
    assert sorted(step for key, step, _ in data.images if key == "samples") == [3, 6]
    assert [(folder, name) for folder, name, _ in data.artifacts] == [(None, "train_log.csv")]
    assert [d["counts"] for d in data.datasets] == [{"images": 128, "classes": 10}]
    (model,) = data.models
    saved = files.load_checkpoint(project / "models/generator.pt")["generator"]
    assert model.tags[TENSORS_SHA_TAG] == tensors_sha256(saved)


def test_an_extended_training_logs_each_new_step_once_to_the_same_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, memory_store: MemoryStore
) -> None:
    project = make_project(tmp_path / "p", steps=3)
    _, first = train_in_process(project, monkeypatch)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["steps"] = 6
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    _, second = train_in_process(project, monkeypatch)
    assert second["run_id"] == first["run_id"] and list(memory_store.runs) == [first["run_id"]]
    data: RunData = memory_store.runs[first["run_id"]]
    assert [step for step, _ in data.metrics["g_loss"]] == [1, 2, 3, 4, 5, 6]
    assert data.tags["param_changed.train.steps"] == "6" and data.params["train.steps"] == "3"
    assert sorted(step for _, step, _ in data.images) == [3, 6] and len(data.models) == 2


def test_the_evaluate_stage_nests_its_run_under_the_training_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, memory_store: MemoryStore
) -> None:
    from pipeline.stages import evaluate

    project = make_eval_project(tmp_path / "p")
    training = memory_store.start("1", "train", {"stage": "train"})
    training.finish()
    files.write_json(project / "models/train_run.json", {"run_id": training.run_id, "experiment_id": "1"})
    monkeypatch.chdir(project)
    evaluate.main(project / "params.yaml")
    scores = json.loads((project / "metrics/eval.json").read_text())
    (child,) = memory_store.runs[training.run_id].children
    assert child.tags["mlflow.parentRunId"] == training.run_id and child.status == "FINISHED"
    assert child.metrics["fid"] == [(0, scores["fid"])] and child.params["n_samples"] == "64"
    assert [key for key, _, _ in child.images] == ["eval_samples"] and child.artifacts
    parent = memory_store.runs[training.run_id]
    assert parent.metrics["eval_fid"] == [(0, scores["fid"])] and parent.tags["eval.latest_run"] == child.run_id
