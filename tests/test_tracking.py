"""The tracking boundary's bookkeeping: what MLflow did not receive is data, summed up in one sentence."""

from __future__ import annotations

from pathlib import Path

from pipeline.tracking.connection import redact
from pipeline.tracking.mlflow_run import Lost, summarise_lost


def test_lost_items_sum_up_by_kind_and_step_span() -> None:
    lost = [
        Lost("metrics", steps=(13, 14)),
        Lost("image", "samples", (16,)),
        Lost("metrics", steps=(15, 40)),
        Lost("image", "samples", (20,)),
        Lost("artifact", "train_log.csv"),
        Lost("model", "generator"),
        Lost("run status"),
        Lost("run status"),
    ]
    assert summarise_lost(lost, "connection refused") == (
        "MLflow did not receive metrics of steps 13-40, 2 images 'samples' of steps 16-20, artifact train_log.csv, "
        "model 'generator', run status (connection refused)"
    )
    assert str(lost[1]) == "image 'samples' at step 16" and str(lost[0]) == "metrics of steps 13-14"
    assert summarise_lost([], None) == ""


def test_passwords_in_urls_never_reach_logs_or_the_tracker() -> None:
    assert redact("postgresql://ann:s3cr3t@db:5432/optuna") == "postgresql://ann:***@db:5432/optuna"
    assert redact("postgresql+psycopg://ann:p%40ss@127.0.0.1/x and http://bob:pw@h:5000") == (
        "postgresql+psycopg://ann:***@127.0.0.1/x and http://bob:***@h:5000"
    )
    assert redact("sqlite:////work/optuna.db") == "sqlite:////work/optuna.db"
    assert redact("postgresql://ann@db/optuna") == "postgresql://ann@db/optuna"  # no password: nothing to hide


def test_git_dirty_counts_code_and_params_not_what_the_stages_write(tmp_path: Path) -> None:
    """A fresh clone's first run: earlier stages rewrote committed metrics and dvc.lock, the code is as committed."""
    import subprocess

    from pipeline.tracking.connection import git_info
    from tests.conftest import git_env

    for name in ("params.yaml", "dvc.lock", "metrics/data.json", "plots/eval_classes.csv", "pipeline/x.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("as committed\n")
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "clone"]):
        subprocess.run(command, cwd=tmp_path, env=git_env(), check=True)
    for name in ("dvc.lock", "metrics/data.json", "plots/eval_classes.csv"):
        (tmp_path / name).write_text("rewritten by a stage\n")
    assert git_info(tmp_path)["git.dirty"] == "false"
    (tmp_path / "params.yaml").write_text("edited\n")
    assert git_info(tmp_path)["git.dirty"] == "true"
