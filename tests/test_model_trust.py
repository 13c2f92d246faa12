"""Models that come from MLflow: `generate --run/--model` reads only the weights file logged beside the
model, weights-only and checked against the SHA-256 recorded at log time, so a tampered artifact store
runs no code; every registered version holds the weights its FID was measured on, also for an extended
run; and `resend` repairs an extended run."""

from __future__ import annotations

import io
import pickle
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline import files
from pipeline.gan.architectures import build_generator
from pipeline.params import ModelParams, flatten, load_params
from pipeline.tracking import logged_model
from tests.conftest import (
    SMALL_MODEL,
    MlflowServer,
    Payload,
    assert_refused,
    copy_tracked_project,
    edit_params,
    make_eval_project,
    project_client,
    run_in,
    stage_env,
    with_db,
)

pytestmark = pytest.mark.slow

NAME = "dcgan-mnist-generator"
CHAMPION = f"models:/{NAME}@champion"


def set_steps(project: Path, steps: int) -> None:
    edit_params(project, train={"steps": steps})


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tracking_db: Path) -> dict[str, Path]:
    """The tiny project trained 4 steps ("trained"), and a copy of it evaluated too (its generator
    registered) with `generate`'s draw from models/generator.pt in local.npy ("evaluated"). Built once
    for the module: each test works on a copy of its own."""
    root = tmp_path_factory.mktemp("model-trust")
    project = with_db(make_eval_project(root / "trained"), tracking_db)
    set_steps(project, 4)
    run_stage(project, "train")
    evaluated = copy_tracked_project(project, root / "evaluated")
    run_stage(evaluated, "evaluate")
    draw(evaluated, "local")
    return {"trained": project, "evaluated": evaluated}


def trained(built: dict[str, Path], path: Path, evaluated: bool = True) -> tuple[Path, str]:
    """A copy of the project trained 4 steps (and evaluated): it and its run id."""
    project = copy_tracked_project(built["evaluated" if evaluated else "trained"], path)
    run_id = files.read_json(project / "models/train_run.json")["run_id"]
    for model in models_of(project, run_id):  # what a test tampers with is its own copy's
        assert model_dir(model).resolve().is_relative_to(project.resolve()), model.artifact_location
    return project, run_id


def run_stage(project: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """`run_in`, which must succeed: what it printed on stdout."""
    result = run_in(project, *args, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def draw(project: Path, name: str, *source: str, env: dict[str, str] | None = None) -> np.ndarray:
    result = run_in(project, "generate", "-n", "16", *source, "--output", f"{name}.npy", env=env)
    assert result.returncode == 0, result.stderr
    return np.load(project / f"{name}.npy")


def models_of(project: Path, run_id: str) -> list[Any]:
    """The run's logged models, oldest first."""
    mlflow = project_client(project)
    experiment = mlflow.get_run(run_id).info.experiment_id
    found = mlflow.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
    return sorted(found, key=lambda model: model.creation_timestamp)


def model_dir(model: Any) -> Path:
    return Path(model.artifact_location.removeprefix("file://"))


def tensors_of(path: Path) -> str:
    return logged_model.tensors_sha256(files.load_checkpoint(path)["generator"])


# --- ways to tamper with a logged model: each gets the marker file a loader that unpickles would create


def swap_for_pth(folder: Path, marker: Path) -> None:
    """The MLflow model's data/ becomes a pickled model (model.pth), as older MLflow logged it."""
    (folder / "data/model.pt2").unlink()
    (folder / "data/model.pth").write_bytes(pickle.dumps(Payload(marker)))
    (folder / "data/pickle_module_info.txt").write_text("pickle")


def poison_sample_inputs(folder: Path, marker: Path) -> None:
    """model.pt2's sample inputs, which torch.export.load unpickles, become a payload."""
    archive, out = folder / "data/model.pt2", io.BytesIO()
    payload = io.BytesIO()
    torch.save(Payload(marker), payload)
    with zipfile.ZipFile(archive) as old, zipfile.ZipFile(out, "w") as new:
        names = [info.filename for info in old.infolist()]
        assert any(name.endswith("sample_inputs/model.pt") for name in names), names
        for info in old.infolist():
            body = payload.getvalue() if info.filename.endswith("sample_inputs/model.pt") else old.read(info)
            new.writestr(info, body)
    archive.write_bytes(out.getvalue())


def pickle_weights(folder: Path, marker: Path) -> None:
    """The weights file itself becomes a pickle that runs code."""
    (folder / logged_model.WEIGHTS_PATH).write_bytes(pickle.dumps(Payload(marker)))


def other_weights(folder: Path, marker: Path) -> None:
    """The weights file becomes a valid checkpoint of other weights (no code: another generator)."""
    torch.manual_seed(123)
    generator = build_generator(ModelParams(**SMALL_MODEL), n_classes=0)
    files.save_checkpoint({"generator": generator.state_dict(), "architecture": {}}, folder / logged_model.WEIGHTS_PATH)


def delete_weights(folder: Path, marker: Path) -> None:
    (folder / logged_model.WEIGHTS_PATH).unlink()


def test_a_tampered_mlflow_model_runs_no_code_and_tampered_weights_are_refused(
    tmp_path: Path, built: dict[str, Path]
) -> None:
    project, run_id = trained(built, tmp_path / "p")
    (model,) = models_of(project, run_id)
    folder, marker = model_dir(model), tmp_path / "marker"

    # Untampered: MLflow gives exactly the pixels of models/generator.pt.
    local = np.load(project / "local.npy")  # drawn from models/generator.pt
    assert np.array_equal(draw(project, "run", "--run", run_id), local)
    assert np.array_equal(draw(project, "champion", "--model", CHAMPION), local)
    assert np.array_equal(draw(project, "version", "--model", f"models:/{NAME}/1"), local)

    pristine = tmp_path / "pristine"
    shutil.copytree(folder, pristine)

    def tampered(how: Callable[[Path, Path], None]) -> None:
        shutil.rmtree(folder)
        shutil.copytree(pristine, folder)
        marker.unlink(missing_ok=True)
        how(folder, marker)

    # The MLflow model is never loaded: a payload in it runs nowhere, and the verified weights still draw.
    for how in (swap_for_pth, poison_sample_inputs):
        for source in (["--run", run_id], ["--model", CHAMPION]):
            tampered(how)
            result = run_in(project, "generate", "-n", "16", *source, "--output", "t.npy", env=stage_env(project))
            assert not marker.exists(), f"{how.__name__}, {source[0]}: loading the model ran its payload"
            assert result.returncode == 0, result.stderr
            assert np.array_equal(np.load(project / "t.npy"), local), (how.__name__, source[0])

    # The weights file beside the model, its SHA-256 recorded at log time and copied onto the version.
    assert model.tags[logged_model.ARTIFACT_SHA_TAG] == files.sha256_file(pristine / logged_model.WEIGHTS_PATH)
    version = project_client(project).get_model_version_by_alias(NAME, "champion")
    assert version.tags[logged_model.ARTIFACT_SHA_TAG] == model.tags[logged_model.ARTIFACT_SHA_TAG]

    # The weights file fails its recorded SHA-256: refused before torch reads a byte of it.
    for how in (pickle_weights, other_weights):
        tampered(how)
        error = assert_refused(run_in(project, "generate", "--run", run_id, env=stage_env(project)),
                               f"MLflow run {run_id}'s generator weights fail their SHA-256 check")  # fmt: skip
        assert "refusing to load them" in error
        assert_refused(run_in(project, "generate", "--model", CHAMPION, env=stage_env(project)),
                       f"registered model {NAME} version 1's generator weights fail their SHA-256 check")  # fmt: skip
        assert not marker.exists(), how.__name__
    tampered(delete_weights)
    assert_refused(run_in(project, "generate", "--run", run_id, env=stage_env(project)),
                   f"MLflow run {run_id}'s generator weights", "cannot be fetched", "resend")  # fmt: skip
    assert not (project / "generated.png").exists()


def test_through_a_tracking_server_the_weights_file_is_checked_too(tmp_path: Path, mlflow_server: MlflowServer) -> None:
    """Artifacts proxied by `mlflow server`: the weights file travels inside the logged model and back."""
    mlflow_server.start()
    project = make_eval_project(tmp_path / "p")
    set_steps(project, 4)
    env = {**stage_env(project), "MLFLOW_TRACKING_URI": mlflow_server.uri}
    run_stage(project, "train", env=env)
    run_stage(project, "evaluate", env=env)
    run_id = files.read_json(project / "models/train_run.json")["run_id"]
    local = draw(project, "local", env=env)
    assert np.array_equal(draw(project, "run", "--run", run_id, env=env), local)
    assert np.array_equal(draw(project, "champion", "--model", CHAMPION, env=env), local)

    (weights,) = (mlflow_server.root / "artifacts").rglob(logged_model.WEIGHTS_FILE)
    marker = tmp_path / "marker"
    weights.write_bytes(pickle.dumps(Payload(marker)))
    assert_refused(run_in(project, "generate", "--run", run_id, env=env),
                   f"MLflow run {run_id}'s generator weights fail their SHA-256 check")  # fmt: skip
    assert_refused(run_in(project, "generate", "--model", CHAMPION, env=env),
                   f"registered model {NAME} version 1's generator weights fail their SHA-256 check")  # fmt: skip
    assert not marker.exists()


def test_a_model_logged_without_a_weights_file_is_refused_until_resend_adds_one(
    tmp_path: Path, built: dict[str, Path]
) -> None:
    """A run and a version from code before weights files: refused in one sentence; `resend` logs the
    weights, and the next evaluation registers a version that holds them, which takes the alias."""
    project, run_id = trained(built, tmp_path / "p")
    (model,) = models_of(project, run_id)
    mlflow = project_client(project)
    for tag in (logged_model.ARTIFACT_SHA_TAG, logged_model.TENSORS_SHA_TAG):  # as older code logged and registered it
        mlflow.delete_logged_model_tag(model.model_id, tag)
        mlflow.delete_model_version_tag(NAME, "1", tag)
    shutil.rmtree(model_dir(model) / "extra_files")
    env = stage_env(project)
    assert_refused(run_in(project, "generate", "--run", run_id, env=env),
                   f"MLflow run {run_id} was logged without a verifiable weights file", "resend")  # fmt: skip
    assert_refused(run_in(project, "generate", "--model", CHAMPION, env=env),
                   f"registered model {NAME} version 1 was logged without", f"resend` for its training run {run_id}")  # fmt: skip

    assert "1 model" in run_stage(project, "resend")
    local = np.load(project / "local.npy")  # drawn from models/generator.pt
    assert np.array_equal(draw(project, "run", "--run", run_id), local)
    said = run_stage(project, "evaluate")
    assert f"registered {NAME} version 2: is now the champion" in said, said
    assert np.array_equal(draw(project, "champion", "--model", CHAMPION), local)
    assert "nothing re-sent" in run_stage(project, "resend")


def test_an_extended_run_registers_the_weights_it_was_scored_on(tmp_path: Path, built: dict[str, Path]) -> None:
    project, run_id = trained(built, tmp_path / "p")  # 4 steps
    first = np.load(project / "local.npy")  # drawn from models/generator.pt
    shutil.copyfile(project / "models/generator.pt", tmp_path / "first.pt")
    set_steps(project, 6)
    run_stage(project, "train")
    said = run_stage(project, "evaluate")
    assert f"registered {NAME} version 2" in said, said
    second = draw(project, "second")
    assert not np.array_equal(first, second)
    first_tensors, second_tensors = tensors_of(tmp_path / "first.pt"), tensors_of(project / "models/generator.pt")

    mlflow = project_client(project)
    old, new = models_of(project, run_id)
    for number, pixels, tensors, model in ((1, first, first_tensors, old), (2, second, second_tensors, new)):
        version = mlflow.get_model_version(NAME, str(number))
        assert version.run_id == run_id and version.source == f"models:/{model.model_id}"
        assert version.tags[logged_model.TENSORS_SHA_TAG] == tensors
        assert version.tags[logged_model.ARTIFACT_SHA_TAG] == model.tags[logged_model.ARTIFACT_SHA_TAG]
        assert np.array_equal(draw(project, f"v{number}", "--model", f"models:/{NAME}/{number}"), pixels)
    # Whichever version won, the champion draws the weights its FID was measured on.
    champion = mlflow.get_model_version_by_alias(NAME, "champion")
    expected = {"1": first, "2": second}[str(champion.version)]
    assert np.array_equal(draw(project, "champion", "--model", CHAMPION), expected)
    assert np.array_equal(draw(project, "run", "--run", run_id), second)
    # A re-evaluation of the same weights keeps their version.
    assert f"registered {NAME} version 2" in run_stage(project, "evaluate")
    assert len(mlflow.search_model_versions(f"name = '{NAME}'")) == 2


def test_resend_repairs_an_extended_run_and_still_refuses_foreign_outputs(tmp_path: Path, built: dict[str, Path]) -> None:
    project, _ = trained(built, tmp_path / "p", evaluated=False)  # 4 steps
    set_steps(project, 6)
    run_stage(project, "train")
    run_id = files.read_json(project / "models/train_run.json")["run_id"]
    assert project_client(project).get_run(run_id).data.tags["param_changed.train.steps"] == "6"
    # The server lost the log and the final model (the sqlite store keeps its record: the files go).
    artifacts = Path(project_client(project).get_run(run_id).info.artifact_uri.removeprefix("file://"))
    (artifacts / "train_log.csv").unlink()
    newest = models_of(project, run_id)[-1]
    project_client(project).delete_logged_model(newest.model_id)

    said = run_stage(project, "resend")
    assert f"re-sent to MLflow run {run_id}: 1 artifacts, 1 model." in said, said
    assert (artifacts / "train_log.csv").is_file()
    assert np.array_equal(draw(project, "run", "--run", run_id), draw(project, "local"))
    assert "nothing re-sent" in run_stage(project, "resend")

    # Outputs of another seed, a param the run never changed: not its own.
    edit_params(project, train={"seed": 5})
    info = files.read_json(project / "models/train_run.json")
    info["params_sha256"] = files.fingerprint(flatten(load_params(project / "params.yaml")))
    files.write_json(project / "models/train_run.json", info)
    assert_refused(run_in(project, "resend", env=stage_env(project)),
                   f"run {run_id} has train.seed=0, not 5")  # fmt: skip
