"""Beyond MNIST: Fashion-MNIST from its offline copy and your own data, through the same stages."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import data, own_data
from pipeline.errors import UserError
from pipeline.scoring.frozen_classifier import classify, load_classifier
from pipeline.scoring.metrics import fid
from tests.conftest import (
    ROOT,
    SMALL_MODEL,
    TINY_EVALUATE,
    TINY_TRAIN,
    assert_refused,
    dvc_repo,
    edit_params,
    project_client,
    run_dvc,
    run_here,
    shared_dataset_dir,
    with_db,
)

FASHION_CLASSIFIER = ROOT / "models/classifier-fashion-mnist.pt"


def shared_fashion_dir() -> Path | None:
    return shared_dataset_dir("FASHION_MNIST_MIRROR", "fashion-mnist")


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> data.Dataset:
    mirror = shared_fashion_dir()
    if mirror is None:
        pytest.skip("needs the offline Fashion-MNIST copy (FASHION_MNIST_MIRROR or ../shared/data/fashion-mnist)")
    return data.fetch_dataset(data.FASHION_MNIST, tmp_path_factory.mktemp("raw"), str(mirror), None, 30.0)


@pytest.mark.slow
def test_the_committed_fashion_classifier_scores_real_fashion_near_its_floor(fashion: data.Dataset) -> None:
    model, sha = load_classifier(FASHION_CLASSIFIER, 128, torch.device("cpu"))
    record = json.loads(FASHION_CLASSIFIER.with_suffix(".json").read_text())
    assert record["sha256"] == sha and record["data_sha256"] == data.fingerprint(fashion)
    features, probs = classify(model, fashion.test_images, 500, torch.device("cpu"))
    accuracy = float((probs.argmax(axis=1) == fashion.test_labels).mean())
    assert accuracy >= 0.93 and accuracy == pytest.approx(record["test_accuracy"], abs=1e-3)
    real, _ = classify(model, fashion.train_images[:5000], 500, torch.device("cpu"))
    assert fid(real, features) < 0.01 * np.trace(np.cov(features, rowvar=False))  # real vs real: near the floor
    assert record["classes"][0] == "T-shirt/top" and record["classes"][9] == "Ankle boot"


def shapes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n small 28 x 28 images of three classes (a bar across, a bar down, a square), jittered."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    labels = np.arange(n) % 3
    for image, label in zip(images, labels, strict=True):
        at = rng.integers(6, 18)
        if label == 0:
            image[at : at + 4, 4:24] = 255
        elif label == 1:
            image[4:24, at : at + 4] = 255
        else:
            image[at - 3 : at + 5, at - 3 : at + 5] = 255
    return images, labels


OWN = {"dataset": "own", "path": "data/own/shapes.npz", "classes": ["bar across", "bar down", "square"]}
# The real params, shrunk: a small classifier (4 epochs: 100 % test accuracy on these shapes), the small
# model, a few steps, a small evaluation.
TINY = {
    "classifier": {"epochs": 4, "feature_dim": 16, "min_accuracy": 0.6, "batch_size": 32},
    "model": SMALL_MODEL,
    "train": {**TINY_TRAIN, "steps": 8, "sample_every": 4, "log_every": 4, "checkpoint_every": 4},
    "evaluate": TINY_EVALUATE,
}


@pytest.fixture
def repo(tmp_path: Path, tracking_db: Path) -> tuple[Path, dict[str, str]]:
    """A committed copy of the project; its tracking store is the suite's pre-made empty one (these tests
    are about datasets, not about creating a store)."""
    path, env = dvc_repo(tmp_path / "repo")
    return with_db(path, tracking_db), env


@pytest.mark.slow
def test_your_own_data_runs_end_to_end_with_a_classifier_trained_for_it(
    repo: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    path, env = repo
    images, labels = shapes(300)
    np.savez(path / "data/own/shapes.npz", images=images, labels=labels)
    edit_params(path, data=OWN, **TINY)
    result = run_dvc(["repro"], path, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in ("prepare", "classifier", "reference", "train", "evaluate"):
        assert f"Running stage '{stage}'" in result.stdout
    record = json.loads((path / "models/classifier-own.json").read_text())
    assert record["classes"] == OWN["classes"] and record["test_accuracy"] >= 0.6 and record["dataset"] == "own"
    prepared = json.loads((path / "metrics/data.json").read_text())
    assert prepared["test"]["count"] == 60 and set(prepared["train"]["per_class"]) == set(OWN["classes"])
    scores = json.loads((path / "metrics/eval.json").read_text())
    assert scores["classifier_sha256"] == record["sha256"] and len(scores["class_counts"]) == 3
    rows = (path / "plots/eval_classes.csv").read_text().splitlines()
    assert rows[0] == "class,fraction,reference" and rows[1].startswith("bar across,")
    # The classifier is kept, not trained again, while its params and data stay the same.
    monkeypatch.chdir(path)
    again = run_here(capfd, "classifier")
    assert again.returncode == 0 and again.stdout.startswith("kept models/classifier-own.pt")


@pytest.mark.slow
def test_switching_to_fashion_mnist_scores_with_the_committed_classifier(repo: tuple[Path, dict[str, str]]) -> None:
    mirror = shared_fashion_dir()
    if mirror is None:
        pytest.skip("needs the offline Fashion-MNIST copy (FASHION_MNIST_MIRROR or ../shared/data/fashion-mnist)")
    path, env = repo
    classifier = yaml.safe_load((ROOT / "params.yaml").read_text())["classifier"]  # the committed one's
    edit_params(path, **{**TINY, "classifier": classifier, "evaluate": {**TINY_EVALUATE, "n_samples": 512}})
    for command in (["git", "add", "-A"], ["git", "commit", "-q", "-m", "tiny params"]):
        subprocess.run(command, cwd=path, env=env, check=True)
    committed = FASHION_CLASSIFIER.read_bytes()
    result = run_dvc(["exp", "run", "-S", "data.dataset=fashion-mnist"], path, {**env, "FASHION_MNIST_MIRROR": str(mirror)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "kept models/classifier-fashion-mnist.pt" in result.stdout  # never retrained
    assert (path / "models/classifier-fashion-mnist.pt").read_bytes() == committed
    scores = json.loads((path / "metrics/eval.json").read_text())
    record = json.loads((path / "models/classifier-fashion-mnist.json").read_text())
    assert scores["classifier_sha256"] == record["sha256"] and scores["fid"] > scores["fid_floor"] > 0
    assert (path / "plots/eval_classes.csv").read_text().splitlines()[1].startswith("T-shirt/top,")
    client = project_client(path)
    (run,) = client.search_runs([client.get_experiment_by_name("dcgan-mnist").experiment_id],
                                "tags.dataset = 'fashion-mnist' and tags.stage = 'train'")  # fmt: skip
    assert run.data.params["data.dataset"] == "fashion-mnist"
    assert client.get_model_version_by_alias("dcgan-mnist-fashion-mnist-generator", "champion").run_id == run.info.run_id


@pytest.mark.parametrize(
    ("arrays", "says"),
    [
        ({"images": np.zeros((90, 32, 32), np.uint8), "labels": np.arange(90) % 3}, "has shape (90, 32, 32); expected N x 28 x 28 grayscale"),
        ({"images": np.zeros((90, 28, 28, 3), np.uint8), "labels": np.arange(90) % 3}, "expected N x 28 x 28 grayscale"),
        ({"images": np.zeros((90, 28, 28), np.uint8), "labels": np.arange(90) % 4}, "labels run from 0 to 3, outside 0-2"),
        ({"images": np.full((90, 28, 28), np.nan, np.float32), "labels": np.arange(90) % 3}, "NaN/infinite values"),
        ({"images": np.zeros((30, 28, 28), np.uint8), "labels": np.arange(30) % 3}, "the train split has 8 image(s) of class 'a'; every class needs at least 10"),
        ({"pixels": np.zeros((30, 28, 28), np.uint8)}, "it needs images and labels"),
    ],
    ids=["not 28x28", "colour", "labels out of range", "NaN", "too few per class", "wrong keys"],
)
def test_unusable_own_data_is_one_sentence(tmp_path: Path, arrays: dict[str, np.ndarray], says: str) -> None:
    np.savez(tmp_path / "mine.npz", **arrays)
    with pytest.raises(UserError, match=rf"^data\.path {tmp_path}/mine\.npz.*{re.escape(says)}"):
        own_data.load_own(tmp_path / "mine.npz", ["a", "b", "c"], 0.2, 0, 10)


def test_the_prepare_stage_says_what_is_wrong_with_own_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"dataset": "own", "path": "data/own/nope.npz",
                                                                   "classes": ["a", "b"]}}))  # fmt: skip
    assert_refused(run_here(capfd, "prepare"), "data.path data/own/nope.npz does not exist")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"dataset": "own"}}))
    assert_refused(run_here(capfd, "prepare"), "data.dataset: own needs data.path")
