"""A full disk or a file-size limit: one sentence naming the file and the room left, the previous
outputs intact, no temp files, the MLflow run's status true, and the same command resumes once
there is room again. The stages run under a real `ulimit -f` (writes past it fail with EFBIG);
ENOSPC, which a test cannot make without mounting a filesystem, is injected at the write."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import cli, files
from pipeline.errors import UserError
from tests.conftest import (
    ROOT,
    SMALL_MODEL,
    assert_outputs_complete,
    assert_refused,
    assert_same_weights,
    copy_tracked_project,
    edit_params,
    generator_weights,
    make_eval_project,
    make_project,
    project_client,
    run_cli,
    stage_env,
    temp_files,
    with_db,
)

# G of about 1.3 MiB, so that a limit can fall between its files and the ~1 MiB mlflow.db:
# generator.pt ~1.3 MiB, the resume checkpoint (G, D and both Adam states) ~4 MiB.
BIG_G = {**SMALL_MODEL, "g_dense_channels": 64, "g_channels": [32, 16]}
CHECKPOINT_LIMIT_KIB = 2500  # under the checkpoint, over every other file of a training
GENERATOR_LIMIT_KIB = 1200  # under generator.pt, over mlflow.db


def no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def run_limited(args: list[str], cwd: Path, kib: int) -> subprocess.CompletedProcess[str]:
    """`python -m pipeline ...` under `ulimit -f kib` (KiB blocks in bash), as a user's shell runs it."""
    env = stage_env(cwd)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        ["bash", "-c", f'ulimit -f {kib}; exec "$0" -m pipeline "$@"', sys.executable, *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def trained(path: Path, db: Path, steps: int) -> Path:
    """A project of BIG_G trained, without a limit, to `steps` (a checkpoint every 3 steps)."""
    project = with_db(make_project(path, steps=steps, checkpoint_every=3, sample_every=3, log_every=3), db)
    edit_params(project, model=BIG_G)
    result = run_cli(["train"], cwd=project, env=stage_env(project))
    assert result.returncode == 0, result.stderr[-2000:]
    return project


def run_status(project: Path) -> str:
    run_id = json.loads((project / "models/train_run.json").read_text())["run_id"]
    return project_client(project).get_run(run_id).info.status


# --- the one place: atomic writes ------------------------------------------------------------


def test_enospc_at_a_write_is_one_sentence_naming_the_file_and_the_old_file_stays(tmp_path: Path) -> None:
    path = tmp_path / "metrics" / "eval.json"
    files.write_json(path, {"fid": 1.0})
    before = path.read_bytes()
    with pytest.raises(UserError) as info:
        with files.atomic_open(path) as fh:
            fh.write('{"fid": ')
            raise no_space()
    message = str(info.value)
    assert str(path) in message and "no space left" in message and "free on its filesystem" in message, message
    assert message.endswith("run the same command again."), message
    assert path.read_bytes() == before
    assert list(path.parent.glob(".*.tmp")) == []


def test_enospc_inside_torch_save_is_the_same_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save into a file wraps the OSError in a RuntimeError; the sentence looks through it."""
    path = tmp_path / "train.pt"
    files.save_checkpoint({"step": 1}, path)

    def full(self: Path, data: bytes) -> int:
        try:
            raise no_space()
        except OSError:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")  # noqa: B904

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(UserError, match=r"cannot write .*train\.pt: no space left"):
        files.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert files.load_checkpoint(path)["step"] == 1
    assert list(tmp_path.glob(".*.tmp")) == []


def test_a_full_disk_at_the_third_output_leaves_all_three_old(tmp_path: Path) -> None:
    paths = [tmp_path / "plots" / "eval_samples.png", tmp_path / "plots" / "eval_classes.csv", tmp_path / "eval.json"]
    for path in paths:
        files.write_json(path, {"old": path.name})
    with pytest.raises(UserError, match="eval.json"), files.atomic_files():
        files.write_json(paths[0], {"new": 1})
        files.write_json(paths[1], {"new": 2})
        with files.atomic_open(paths[2]):
            raise no_space()
    assert [json.loads(p.read_text()) for p in paths] == [{"old": p.name} for p in paths]
    assert list(tmp_path.rglob(".*.tmp")) == []
    with files.atomic_files():  # and with room, all appear together at the end
        for i, path in enumerate(paths):
            files.write_json(path, {"new": i})
        assert json.loads(paths[0].read_text()) == {"old": paths[0].name}
    assert [json.loads(p.read_text()) for p in paths] == [{"new": i} for i in range(3)]


def test_cli_turns_a_stray_no_room_error_into_one_sentence(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """A write outside our atomic writers (PIL, torch, MLflow) that finds no room: no traceback."""

    def stage(args: object) -> None:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), "mlartifacts/1/model.pt2")

    monkeypatch.setattr(cli, "run", stage)
    assert cli.main(["train"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: cannot write mlartifacts/1/model.pt2: the file-size limit was reached"), error
    assert "\n" not in error

    def broken(args: object) -> None:
        raise OSError(errno.EACCES, "Permission denied", "x")

    monkeypatch.setattr(cli, "run", broken)
    with pytest.raises(PermissionError):  # any other failure is not ours to word
        cli.main(["train"])


# --- the stages under a real file-size limit -------------------------------------------------


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, tracking_db: Path) -> Path:
    """A run of BIG_G trained to 12 steps in one go, without a limit: the weights a resumed run must
    reach, and a finished run to copy (copy_tracked_project); no test changes it."""
    return trained(tmp_path_factory.mktemp("straight") / "p", tracking_db, steps=12)


@pytest.mark.slow
def test_train_failing_at_its_checkpoint_keeps_the_last_one_and_resumes_bit_identically(
    tmp_path: Path, tracking_db: Path, straight: Path
) -> None:
    project = trained(tmp_path / "p", tracking_db, steps=6)
    checkpoint = (project / "checkpoints/train.pt").read_bytes()

    edit_params(project, train={"steps": 12})  # the checkpoint at step 9 finds no room
    result = run_limited(["train"], project, CHECKPOINT_LIMIT_KIB)
    error = assert_refused(result, "checkpoints/train.pt", "the file-size limit was reached", "free on its filesystem")
    assert "ulimit -f limits files to 2.4 MiB" in error
    assert (project / "checkpoints/train.pt").read_bytes() == checkpoint
    assert files.load_checkpoint(project / "checkpoints/train.pt")["step"] == 6
    assert temp_files(project) == []
    assert_outputs_complete(project, temps_allowed=False)
    assert run_status(project) == "FAILED"

    result = run_cli(["train"], cwd=project, env=stage_env(project))  # room again: the same command
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from checkpoints/train.pt at step 6" in result.stdout
    assert run_status(project) == "FINISHED"
    assert_same_weights(generator_weights(project), generator_weights(straight))


@pytest.mark.slow
def test_a_finished_run_stays_finished_when_a_no_op_resume_cannot_write_its_outputs(
    tmp_path: Path, straight: Path
) -> None:
    project = copy_tracked_project(straight, tmp_path / "p")
    outputs = {p: p.read_bytes() for p in (project / "models").iterdir()} | {
        p: p.read_bytes() for p in (project / "metrics").iterdir()
    }

    result = run_limited(["train"], project, GENERATOR_LIMIT_KIB)  # at the last step: only the outputs to write
    assert_refused(result, "models/generator.pt", "free on its filesystem")
    assert {p: p.read_bytes() for p in outputs} == outputs
    assert temp_files(project) == []
    assert run_status(project) == "FINISHED"

    assert run_cli(["train"], cwd=project, env=stage_env(project)).returncode == 0
    assert run_status(project) == "FINISHED"


@pytest.mark.slow
def test_evaluate_under_a_file_size_limit_keeps_its_outputs(tmp_path: Path, tracking_db: Path) -> None:
    project = with_db(make_eval_project(tmp_path / "p"), tracking_db)
    assert run_cli(["evaluate"], cwd=project, env=stage_env(project)).returncode == 0
    outputs = [project / "metrics/eval.json", project / "plots/eval_classes.csv", project / "plots/eval_samples.png"]
    before = [p.read_bytes() for p in outputs]

    result = run_limited(["evaluate"], project, 8)  # the sample grid (~27 KiB) finds no room
    assert_refused(result, "plots/eval_samples.png", "free on its filesystem")
    assert [p.read_bytes() for p in outputs] == before
    assert temp_files(project) == []
    assert_outputs_complete(project, temps_allowed=False)
