"""The MLflow UI as users see it, in Debian's Chromium (headless, Selenium with chromedriver).

A small finished project (two training runs with their evaluations and registry versions,
and a small sweep) is made with the real stages; then `mlflow ui` serves it on 127.0.0.1 and
the browser checks what a person looks for. Screenshots go to test-artifacts/mlflow-ui/
(CI keeps them); without Chromium the test skips with a sentence (`.ci/run` installs it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, make_eval_project, run_cli, stage_env
from tests.mlflow_ui import MlflowUIBrowser, browser_available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(browser_available() is not None, reason=str(browser_available()))]

SHOTS = ROOT / "test-artifacts" / "mlflow-ui"
RUNS = ("tiny-a", "tiny-b")


@pytest.fixture(scope="module")
def finished_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two trainings (seeds 0 and 1) each evaluated, and a two-trial sweep, in one SQLite store."""
    project = make_eval_project(tmp_path_factory.mktemp("ui") / "p")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(steps=8, sample_every=2, log_every=2)
    params["sweep"] = {"trials": 2, "steps": 6, "fid_every": 3, "fid_samples": 32, "eval_samples": 64,
                       "startup_trials": 2, "prune_after_trials": 5}  # fmt: skip
    for seed, name in enumerate(RUNS):
        params["train"]["seed"] = seed
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        env = {**stage_env(project), "DVC_EXP_NAME": name}  # runs are named as DVC experiments name them
        for stage in ("train", "evaluate"):
            result = run_cli([stage], cwd=project, env=env)
            assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli(["sweep"], cwd=project, env=stage_env(project))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return project


def test_the_ui_shows_runs_scores_curves_grids_sweeps_and_the_champion(finished_project: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{finished_project / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("dcgan-mnist-generator", "champion").version
    shutil.rmtree(SHOTS, ignore_errors=True)
    with MlflowUIBrowser(f"sqlite:///{finished_project / 'mlflow.db'}", SHOTS) as ui:
        runs = ui.check_runs_table("dcgan-mnist", [*RUNS, "dcgan-sweep"], metrics=["eval_fid"],
                                   params=["train.lr_g", "train.batch_size"])  # fmt: skip
        curves = ui.check_run_metrics("dcgan-mnist", RUNS[0], metrics=("d_loss", "g_loss", "d_acc"), image_key="samples")
        sweep = ui.check_nested_children("dcgan-mnist", "dcgan-sweep", ["dcgan-sweep #0", "dcgan-sweep #1"])
        registry = ui.check_registered_model("dcgan-mnist-generator", "champion", ("1", "2"), alias_version=champion)
        print(ui.report())
    assert all(check.ok for check in (runs, curves, sweep, registry)), ui.report()
    fids = {row.get("run"): row.get("value") for row in runs.extra["rows"]}
    assert all(fids.get(name) not in (None, "", "-") for name in RUNS), fids  # each training run shows its FID
    assert curves.extra["steps"][-4:] == ["2", "4", "6", "8"]  # the sample grid of every logged step, by its slider
    assert "@ champion" in registry.extra["alias_row"] or "champion" in registry.extra["alias_row"]
    assert sorted(p.name for p in SHOTS.glob("*.png")) == sorted(
        ["a_runs_table.png", "b_run_metrics.png", "c_sweep_children.png", "d_registered_model.png"]
    )
