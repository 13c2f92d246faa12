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
from tests.conftest import SMALL_MODEL, assert_refused, make_eval_project, run_cli, stage_env


@pytest.mark.slow
def test_every_source_gives_the_samples_that_evaluate_scored(finished_project: Path) -> None:
    """The finished project's DVC output is its second training run's generator, just evaluated."""
    project, env = finished_project, stage_env(finished_project)

    def generate(name: str, *source: str) -> np.ndarray:
        result = run_cli(["generate", "-n", "64", *source, "--output", f"{name}.npy"], cwd=project, env=env)
        assert result.returncode == 0, result.stderr
        return np.load(project / f"{name}.npy")

    # The stage's draw: evaluate.n_samples (64) at evaluate.seed, as .npy, scored from outside.
    dvc = generate("dvc")
    scored = run_cli(["evaluate", "--samples", "dvc.npy", "--output", "dvc.eval.json"], cwd=project, env=env)
    assert scored.returncode == 0, scored.stderr
    stage = json.loads((project / "metrics/eval.json").read_text())
    assert json.loads((project / "dvc.eval.json").read_text())["fid"] == stage["fid"]

    # The same generator through MLflow, by its training run.
    run_id = files.read_json(project / "models/train_run.json")["run_id"]
    assert np.array_equal(generate("run", "--run", run_id), dvc)
    # The registry's champion is the run that `champion` names.
    shown = run_cli(["champion"], cwd=project, env=env)
    assert shown.returncode == 0 and "champion: dcgan-mnist-generator version " in shown.stdout
    assert re.search(r"FID [\d.]+, 95% interval \[[\d.]+, [\d.]+\]", shown.stdout), shown.stdout
    champion_run = re.search(r"from training run \S+ \((\w+)\)", shown.stdout)[1]  # type: ignore[index]
    assert np.array_equal(generate("champion", "--model", "models:/dcgan-mnist-generator@champion"),
                          generate("champion_run", "--run", champion_run))  # fmt: skip

    result = run_cli(["generate", "-n", "40", "--seed", "7", "--grid", "g.png", "--folder", "pngs"], cwd=project, env=env)
    assert result.returncode == 0, result.stderr
    assert (project / "g.png").is_file() and len(list((project / "pngs").glob("*.png"))) == 40
    assert run_cli(["evaluate", "--samples", "pngs", "--output", "pngs.json"], cwd=project, env=env).returncode == 0


@pytest.mark.slow
def test_a_missing_or_foreign_model_is_one_sentence(tmp_path: Path) -> None:
    project = make_eval_project(tmp_path / "p")
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
