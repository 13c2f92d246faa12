"""The MLflow UI as users see it, in Debian's Chromium (headless, Selenium with chromedriver).

A small finished project (two training runs with their evaluations and registry versions,
and a small sweep; conftest's `finished_project`) is made with the real stages; then `mlflow ui` serves it on 127.0.0.1 and
the browser checks what a person looks for. Screenshots go to test-artifacts/mlflow-ui/
(CI keeps them); without Chromium the test skips with a sentence (`.ci/run` installs it).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import psutil
import pytest

from tests.conftest import FINISHED_RUNS, ROOT
from tests.mlflow_ui import MlflowUIBrowser, browser_available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(browser_available() is not None, reason=str(browser_available()))]

SHOTS = ROOT / "test-artifacts" / "mlflow-ui"
RUNS = FINISHED_RUNS


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


def test_the_pipelines_ui_address_opens_the_runs_sorted_by_fid_with_n_beside_it(finished_project: Path) -> None:
    """`python -m pipeline ui` prints an address (and starts the UI); Chromium, at that address with no
    clicks, sees the training runs sorted by FID, lowest first, with N, KID, precision, recall and params."""
    import re
    import time
    import urllib.request

    from pipeline.stages import ui as pipeline_ui
    from tests.conftest import stage_env, start
    from tests.servers import free_port

    port = free_port()
    log = SHOTS.parent / "pipeline-ui" / "ui"
    process = start(["ui", "--port", str(port)], cwd=finished_project, env=stage_env(finished_project), log=log)
    try:
        deadline, printed = time.monotonic() + 120, ""
        while "sorted by FID" not in printed and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.5)
            printed = log.with_suffix(".out").read_text() if log.with_suffix(".out").exists() else ""
        address = re.search(r"http://127\.0\.0\.1:\d+/#/experiments/\S+", printed)
        assert address, printed + (log.with_suffix(".err").read_text() if log.with_suffix(".err").exists() else "")
        hash_path = address.group(0).split("/", 3)[3]
        while time.monotonic() < deadline:  # the UI answers a little after the address is printed
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):  # noqa: S310 - ours, on 127.0.0.1
                    break
            except OSError:
                time.sleep(0.5)
        beside = []  # what the UI started: MLflow's job runner and its huey workers are not for viewing runs
        for child in psutil.Process(process.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                beside.append(" ".join(child.cmdline()))
        assert not [c for c in beside if "huey" in c or "_job_runner" in c], beside
        want = {f"metrics.`{m}`": m for m in pipeline_ui.METRICS} | {"tags.`eval.n_samples`": "eval.n_samples"}
        want |= {f"params.`{p}`": p for p in ("train.lr_g", "train.seed")}
        with MlflowUIBrowser(f"sqlite:///{finished_project / 'mlflow.db'}", SHOTS,
                             base_url=f"http://127.0.0.1:{port}") as browser:  # fmt: skip
            view = browser.check_view("e_pipeline_ui", hash_path, want, list(RUNS), "metrics.`eval_fid`")
            print(browser.report())
        assert view.ok, view
        fids = [float(row["value"]) for row in view.extra["rows"] if row.get("value") not in (None, "", "-")]
        assert len(fids) >= 2 and fids == sorted(fids), view.extra["rows"]  # lowest FID first
    finally:
        process.terminate()
        process.wait(timeout=30)
