"""`python -m pipeline generate`: the same samples from the DVC output, an MLflow run and the registry's
champion, which `evaluate --samples` scores as the evaluate stage scored them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline import files
from pipeline.gan.architectures import build_discriminator
from pipeline.params import ModelParams
from tests.conftest import SMALL_MODEL, assert_refused, make_eval_project, run_cli, stage_env, with_db


@pytest.mark.slow
def test_every_source_gives_the_samples_that_evaluate_scored(finished_project: Path) -> None:
    """The finished project's DVC output is its second training run's generator, just evaluated."""
    project, env = finished_project, stage_env(finished_project)

    def generate(name: str, *options: str) -> np.ndarray:
        result = run_cli(["generate", *options, "--output", f"{name}.npy"], cwd=project, env=env)
        assert result.returncode == 0, result.stderr
        return np.load(project / f"{name}.npy")

    def fid_of(samples: str, output: str) -> float:
        scored = run_cli(["evaluate", "--samples", samples, "--output", output], cwd=project, env=env)
        assert scored.returncode == 0, scored.stderr
        return json.loads((project / output).read_text())["fid"]

    # The stage's draw: evaluate.n_samples (64) at evaluate.seed, as .npy, as a folder of PNGs and as a
    # grid; the .npy and the PNGs, scored from outside, give the stage's FID.
    dvc = generate("dvc", "-n", "64", "--grid", "g.png", "--folder", "pngs")
    assert (project / "g.png").is_file() and len(list((project / "pngs").glob("*.png"))) == 64
    stage = json.loads((project / "metrics/eval.json").read_text())
    assert fid_of("dvc.npy", "dvc.eval.json") == stage["fid"]
    assert fid_of("pngs", "pngs.json") == stage["fid"]

    # The same generator through MLflow, by its training run.
    run_id = files.read_json(project / "models/train_run.json")["run_id"]
    assert np.array_equal(generate("run", "-n", "64", "--run", run_id), dvc)
    # The registry's champion is the run that `champion` names (drawn at another N and seed).
    shown = run_cli(["champion"], cwd=project, env=env)
    assert shown.returncode == 0 and "champion: dcgan-mnist-generator version " in shown.stdout
    assert re.search(r"FID [\d.]+, 95% interval \[[\d.]+, [\d.]+\]", shown.stdout), shown.stdout
    champion_run = re.search(r"from training run \S+ \((\w+)\)", shown.stdout)[1]  # type: ignore[index]
    champion = generate("champion", "-n", "40", "--seed", "7", "--model", "models:/dcgan-mnist-generator@champion")
    assert champion.shape == (40, 28, 28)
    assert np.array_equal(champion, generate("champion_run", "-n", "40", "--seed", "7", "--run", champion_run))


@pytest.mark.slow
def test_a_missing_or_foreign_model_is_one_sentence(tmp_path: Path, tracking_db: Path) -> None:
    project = with_db(make_eval_project(tmp_path / "p"), tracking_db)
    env = stage_env(project)
    (project / "models/generator.pt").unlink()
    assert_refused(run_cli(["generate"], cwd=project, env=env), "models/generator.pt is missing")
    assert_refused(run_cli(["champion"], cwd=project, env=env), "has no champion yet")
    assert_refused(run_cli(["generate", "--model", "models:/nothing@champion"], cwd=project, env=env),
                   "MLflow has no model models:/nothing@champion")  # fmt: skip
    discriminator = build_discriminator(ModelParams(**SMALL_MODEL), n_classes=10).state_dict()
    files.save_checkpoint({"generator": discriminator}, project / "models/generator.pt")
    assert_refused(run_cli(["generate"], cwd=project, env=env), "models/generator.pt does not match the model section")
    assert_refused(run_cli(["generate", "-n", "0"], cwd=project, env=env), "-n must be at least 1")
    assert not (project / "generated.png").exists()
