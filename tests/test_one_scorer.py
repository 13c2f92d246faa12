"""One scorer and one set of run tags for the stages that score and log: train, evaluate and sweep."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from pipeline.data import save_prepared
from pipeline.errors import UserError
from pipeline.gan.architectures import build_generator
from pipeline.layout import Layout
from pipeline.params import ModelParams, Params, validate_params
from pipeline.scoring import scorer
from pipeline.tracking import connection
from tests.conftest import (
    ROOT,
    SMALL_MODEL,
    git_env,
    run_cli,
    stage_env,
    synthetic_mnist,
    with_db,
    write_reference,
)

CPU = torch.device("cpu")
# The train stage's and a sweep trial's training are the same: 12 steps, quick FIDs at 6 and 12. The
# evaluate seed differs from the training seed, as in params.yaml.
TRAIN = {"steps": 12, "batch_size": 8, "log_every": 3, "fid_every": 6, "fid_samples": 256, "device": "cpu", "seed": 0}
SWEEP = {
    "trials": 1,
    "steps": 12,
    "fid_every": 6,
    "fid_samples": 256,
    "eval_samples": 256,
    "pruner": "none",
    "space": {"train.beta1": {"choices": [0.5]}},  # the default: the trial trains with the stage's params
}
EVALUATE = {"n_samples": 256, "seed": 1234, "batch_size": 256, "fid_resamples": 10, "kid_subsets": 3, "kid_subset_size": 64}


def project(path: Path, tracking_db: Path) -> Path:
    """The committed classifier, a reference it computes here, synthetic data, all in a git commit."""
    (path / "models").mkdir(parents=True)
    shutil.copy2(ROOT / "models/classifier-mnist.pt", path / "models/classifier-mnist.pt")
    mnist = synthetic_mnist(n_train=128, n_test=512)  # the reference needs N >= 2 x 128 features
    save_prepared(mnist, path / "data/prepared/mnist.npz")
    write_reference(path, mnist)
    raw = {"model": SMALL_MODEL, "train": TRAIN, "evaluate": EVALUATE, "sweep": SWEEP}
    (path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with_db(path, tracking_db)
    for args in (["init", "-q"], ["add", "params.yaml"], ["commit", "-q", "-m", "params"]):
        subprocess.run(["git", *args], cwd=path, env=git_env(), check=True, capture_output=True)
    return path


def runs_by_stage(path: Path) -> tuple[dict[str, Any], Any]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dcgan-mnist")
    runs = client.search_runs([experiment.experiment_id])
    trials = [r for r in runs if "sweep.trial" in r.data.tags]
    return {"trial": trials[0], **{r.data.tags["stage"]: r for r in runs if r not in trials}}, client


def params_with(**sections: dict[str, Any]) -> Params:
    return validate_params({"model": SMALL_MODEL, **sections}, source="test params")


def test_quick_fid_is_seeded_by_the_training_seed_alone(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    shutil.copy2(ROOT / "models/classifier-mnist.pt", tmp_path / "models/classifier-mnist.pt")
    write_reference(tmp_path, synthetic_mnist(n_train=128, n_test=512))
    torch.manual_seed(0)
    generator = build_generator(ModelParams(**SMALL_MODEL), n_classes=0).eval()
    base = params_with(train=TRAIN, evaluate=EVALUATE)
    frozen = scorer.Scorer.load(Layout(tmp_path), base, CPU)
    fid = frozen.quick_fid(generator, base)
    assert fid == frozen.quick_fid(generator, params_with(train=TRAIN, evaluate={**EVALUATE, "seed": 7}))
    assert fid != frozen.quick_fid(generator, params_with(train={**TRAIN, "seed": 7}, evaluate=EVALUATE))
    assert fid == scorer.quick_look(generator, frozen.classifier, frozen.reference, 256, 0, 256, CPU)[0]


def test_scorer_refuses_a_reference_of_other_weights(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    shutil.copy2(ROOT / "models/classifier-mnist.pt", tmp_path / "models/classifier-mnist.pt")
    path = write_reference(tmp_path, synthetic_mnist(n_train=128, n_test=512))
    ref = scorer.load_reference(path)
    scorer.save_reference(scorer.Reference(ref.features, ref.mean, ref.cov, ref.label_distribution, "0" * 64), path)
    with pytest.raises(UserError, match=r"was computed with classifier 000000000000, not the current"):
        scorer.Scorer.load(Layout(tmp_path), params_with(), CPU)


def head(repo: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()


def test_run_tags_name_code_experiment_stage_dataset_and_device(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    for args in (["init", "-q"], ["add", "a"], ["commit", "-q", "-m", "a"]):
        subprocess.run(["git", *args], cwd=tmp_path, env=git_env(), check=True, capture_output=True)
    env = {"DVC_EXP_NAME": "exp-1", "DCGAN_SWEEP": "grid"}
    tags = connection.run_tags("evaluate", params_with(), env, tmp_path, CPU)
    assert tags == {
        "git.commit": head(tmp_path),
        "git.dirty": "false",
        "dvc.exp_name": "exp-1",
        "sweep": "grid",
        "stage": "evaluate",
        "dataset": "mnist",
        "device": tags["device"],
        "torch": torch.__version__,
    }
    assert tags["device"]  # the CPU's model name, or "cpu"


@pytest.mark.slow
def test_train_stage_and_sweep_trial_draw_one_quick_fid_curve_and_every_run_has_the_common_tags(
    tmp_path: Path, tracking_db: Path
) -> None:
    path = project(tmp_path / "p", tracking_db)
    env = stage_env(path)
    for stage in ("train", "evaluate", "sweep"):
        result = run_cli([stage], path, env)
        assert result.returncode == 0, result.stderr[-2000:]
    runs, client = runs_by_stage(path)

    # The same params, trained the same way: the same quick FIDs, whichever command trained.
    from_stage = [line.split(",") for line in (path / "metrics/train_fid.csv").read_text().splitlines()[1:]]
    from_trial = client.get_metric_history(runs["trial"].info.run_id, "fid_quick")
    assert [int(step) for step, _ in from_stage] == [m.step for m in from_trial] == [6, 12]
    assert [float(fid) for _, fid in from_stage] == [m.value for m in from_trial]
    logged = client.get_metric_history(runs["train"].info.run_id, "fid_quick")
    assert [m.value for m in logged] == [m.value for m in from_trial]

    # Every stage's run names the code, the stage, the dataset and where it ran, alike.
    commit = head(path)
    for stage in ("train", "evaluate", "sweep", "trial"):
        tags = runs[stage].data.tags
        assert tags["git.commit"] == commit and tags["dataset"] == "mnist", stage
        assert tags["device"] == runs["train"].data.tags["device"] and tags["torch"] == torch.__version__, stage
        assert tags["stage"] == ("sweep" if stage == "trial" else stage)
