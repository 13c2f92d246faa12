"""The train stage stopped by a signal, two trainings in one project, and a finished run's deleted outputs.

Each fault is a real one: a SIGTERM, SIGINT or SIGHUP sent to `python -m pipeline train` in a
process of its own (and a real `timeout` command), a second training process started beside the
first, files removed as a user removes them. The checks are the exit status, the one sentence
the user reads, the checkpoint, the MLflow run, and the outputs after the same command again,
against a training that was never interrupted.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline import files, signals
from tests.conftest import (
    ROOT,
    TINY_TRAIN,
    assert_outputs_complete,
    assert_refused,
    assert_same_weights,
    dvc_repo,
    edit_params,
    generator_weights,
    make_eval_project,
    make_project,
    one_thread_env,
    project_client,
    project_runs,
    run_cli,
    run_dvc,
    stage_env,
    start,
    with_db,
)

STEPS = 150
# log_every, checkpoint_every and sample_every far apart: a stop lands off every cadence but the samples'.
SIGNAL_TRAIN = {"log_every": 10, "checkpoint_every": 100, "sample_every": 25}
STOPPED = r"stopped by {name} at step (\d+): checkpoint written to checkpoints/train.pt; run the same command to resume."


def signal_project(path: Path, tracking_db: Path, steps: int = STEPS, **train: Any) -> Path:
    return with_db(make_project(path, steps=steps, **{**SIGNAL_TRAIN, **train}), tracking_db)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, tracking_db: Path) -> Path:
    """The signal tests' training, run to the end in one go."""
    project = signal_project(tmp_path_factory.mktemp("uninterrupted") / "p", tracking_db)
    result = run_cli(["train"], cwd=project, env=one_thread_env(project))
    assert result.returncode == 0, result.stderr[-3000:]
    return project


def wait_until(proc: subprocess.Popen[bytes], path: Path, timeout: float = 300) -> None:
    """Until `path` exists (the stage reached that point); fails if the stage ended or stalled first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the stage ended (exit {proc.returncode}) before {path} appeared"
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)


def stderr_of(log: Path) -> str:
    return log.with_suffix(".err").read_text()


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def metric_record(project: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of the run: its (step, value) entries as logged, sorted; a step logged twice shows twice."""
    mlflow = project_client(project)
    names = mlflow.get_run(run_id).data.metrics
    return {name: sorted((m.step, m.value) for m in mlflow.get_metric_history(run_id, name)) for name in names}


def assert_same_training(project: Path, reference: Path) -> None:
    """Bit for bit the reference's training: weights, per-step log, sample grids, per-step MLflow metrics."""
    assert_same_weights(generator_weights(project), generator_weights(reference))
    assert (project / "metrics/train_log.csv").read_text() == (reference / "metrics/train_log.csv").read_text()
    grids = sorted(p.name for p in (reference / "samples").iterdir())
    assert sorted(p.name for p in (project / "samples").iterdir()) == grids
    assert all((project / "samples" / g).read_bytes() == (reference / "samples" / g).read_bytes() for g in grids)
    (run,) = [r for r in project_runs(project) if r.info.status == "FINISHED"]
    (ref,) = project_runs(reference)
    got_metrics, want_metrics = metric_record(project, run.info.run_id), metric_record(reference, ref.info.run_id)
    for name in ("d_loss", "d_acc", "g_loss"):  # each step once, with the uninterrupted run's value
        assert got_metrics[name] == want_metrics[name], name
        assert [step for step, _ in got_metrics[name]] == list(range(1, STEPS + 1)), name


def stop(project: Path, log: Path, signum: int, after: str = "samples/step_000025.png") -> int:
    """Start the stage, send `signum` once it has written `after`; the step it says it stopped at."""
    proc = start(["train"], project, one_thread_env(project), log)
    wait_until(proc, project / after)
    os.kill(proc.pid, signum)
    assert proc.wait(timeout=120) == 128 + signum
    name = signal.Signals(signum).name
    error = stderr_of(log)
    assert "Traceback" not in error, error
    sentence = last_line(error)
    found = re.fullmatch(STOPPED.format(name=name), sentence)
    assert found, sentence
    return int(found[1])


# --- a stop signal: stop at a step, checkpoint, KILLED, one sentence; the same command resumes -----------


@pytest.mark.slow
def test_sigterm_sigint_and_sighup_each_stop_at_a_step_and_the_thrice_resumed_run_is_the_uninterrupted_one(
    tmp_path: Path, tracking_db: Path, uninterrupted: Path
) -> None:
    project = signal_project(tmp_path / "p", tracking_db)
    first = stop(project, tmp_path / "logs/term", signal.SIGTERM)
    ckpt = files.load_checkpoint(project / "checkpoints/train.pt")
    assert ckpt["step"] == first and len(ckpt["history"]) == first  # the stop step's own checkpoint, every row in it
    (run,) = project_runs(project)
    assert run.info.status == "KILLED"
    assert [s for s, _ in metric_record(project, run.info.run_id)["g_loss"]] == list(range(1, first + 1))
    assert not (project / "models/generator.pt").exists()
    assert_outputs_complete(project, temps_allowed=False)

    # The same command resumes where the last stop left off; each other stop signal stops it again.
    second = stop(project, tmp_path / "logs/int", signal.SIGINT, after="samples/step_000075.png")
    assert f"resuming from checkpoints/train.pt at step {first}" in (tmp_path / "logs/int.out").read_text()
    third = stop(project, tmp_path / "logs/hup", signal.SIGHUP, after="samples/step_000125.png")
    assert f"resuming from checkpoints/train.pt at step {second}" in (tmp_path / "logs/hup.out").read_text()
    assert 25 <= first < 75 <= second < 125 <= third < STEPS  # the third leg passes step 100's checkpoint
    assert [r.info.status for r in project_runs(project)] == ["KILLED"]

    result = run_cli(["train"], cwd=project, env=one_thread_env(project))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from checkpoints/train.pt at step {third}" in result.stdout
    assert [r.info.status for r in project_runs(project)] == ["FINISHED"]  # the same run, finished
    assert_same_training(project, uninterrupted)


@pytest.mark.slow
def test_a_real_timeout_command_stops_training_with_the_sentence_and_a_resumable_checkpoint(
    tmp_path: Path, tracking_db: Path
) -> None:
    """`timeout -s TERM` signals its whole process group, as a CI job's or scheduler's time limit does."""
    project = signal_project(tmp_path / "p", tracking_db, steps=1_000_000)  # far more than the time allows
    env = one_thread_env(project)
    command = ["timeout", "--preserve-status", "-s", "TERM", "600", sys.executable, "-m", "pipeline", "train"]
    log = tmp_path / "logs/timeout"
    log.parent.mkdir(parents=True)
    with open(log.with_suffix(".err"), "wb") as err:
        limit = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=err)
    # The limit is reached once training runs, however slowly the stage started: timeout's timer fires
    # as a SIGALRM to itself, so sending it one is its time running out; timeout then signals as it would.
    wait_until(limit, project / "samples/step_000025.png")
    limit.send_signal(signal.SIGALRM)
    assert limit.wait(timeout=120) == 128 + signal.SIGTERM, stderr_of(log)[-3000:]
    error = stderr_of(log)
    assert "Traceback" not in error, error
    sentence = last_line(error)
    found = re.fullmatch(STOPPED.format(name="SIGTERM"), sentence)
    assert found, sentence
    assert files.load_checkpoint(project / "checkpoints/train.pt")["step"] == int(found[1])
    (run,) = project_runs(project)
    assert run.info.status == "KILLED"


DDP_STEPS = 60
DDP_TRAIN = {"nproc": 2, "batch_size": 8, "log_every": 4, "checkpoint_every": 50, "sample_every": 10}


@pytest.mark.slow
def test_a_job_of_two_processes_stops_at_one_step_on_sigterm_and_resumes_bit_identically(
    tmp_path: Path, tracking_db: Path
) -> None:
    """train.nproc=2: the signal reaches the launcher (a process group of its own, as a terminal's or
    `timeout`'s); torch's launcher hands it on to both ranks, which agree on the step to stop at."""
    reference = with_db(make_project(tmp_path / "reference", steps=DDP_STEPS, **DDP_TRAIN), tracking_db)
    result = run_cli(["train"], cwd=reference, env=one_thread_env(reference))
    assert result.returncode == 0, result.stderr[-3000:]

    project = with_db(make_project(tmp_path / "p", steps=DDP_STEPS, **DDP_TRAIN), tracking_db)
    log = tmp_path / "logs/job"
    job = start(["train"], project, one_thread_env(project), log)
    wait_until(job, project / "samples/step_000010.png")
    os.killpg(job.pid, signal.SIGTERM)
    assert job.wait(timeout=120) == 128 + signal.SIGTERM
    error = stderr_of(log)
    assert "Traceback" not in error and error.count("stopped by SIGTERM") == 1, error[-3000:]
    found = re.fullmatch(STOPPED.format(name="SIGTERM"), last_line(error))
    assert found, error[-3000:]
    ckpt = files.load_checkpoint(project / "checkpoints/train.pt")
    assert ckpt["step"] == int(found[1]) and ckpt["step"] % DDP_TRAIN["log_every"] == 0  # where the ranks sync
    assert ckpt["world_size"] == 2 and len(ckpt["history"]) == ckpt["step"]
    assert [r.info.status for r in project_runs(project)] == ["KILLED"]

    result = run_cli(["train"], cwd=project, env=one_thread_env(project))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from checkpoints/train.pt at step {ckpt['step']}" in result.stdout
    assert_same_weights(generator_weights(project), generator_weights(reference))
    assert (project / "metrics/train_log.csv").read_text() == (reference / "metrics/train_log.csv").read_text()
    (run,) = project_runs(project)
    assert run.info.status == "FINISHED"
    assert [s for s, _ in metric_record(project, run.info.run_id)["g_loss"]] == list(range(1, DDP_STEPS + 1))


# A slow disk for the checkpoint only, from its second write on: its fsync waits, so that a second
# signal lands inside a write.
SLOW_CHECKPOINT = """import os, time
_fsync, _writes = os.fsync, []
def _slow_fsync(fd):
    if ".train.pt." in os.readlink(f"/proc/self/fd/{fd}"):
        _writes.append(fd)
        if len(_writes) > 1:
            time.sleep(float(os.environ["CHECKPOINT_FSYNC_DELAY_S"]))
    _fsync(fd)
os.fsync = _slow_fsync
"""


@pytest.mark.slow
def test_a_second_signal_stops_at_once_and_the_last_checkpoint_stays_whole(tmp_path: Path, tracking_db: Path) -> None:
    project = signal_project(tmp_path / "p", tracking_db, checkpoint_every=20, sample_every=1000)
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow/sitecustomize.py").write_text(SLOW_CHECKPOINT)
    env = {**one_thread_env(project), "PYTHONPATH": str(tmp_path / "slow"), "CHECKPOINT_FSYNC_DELAY_S": "60"}
    proc = start(["train"], project, env, tmp_path / "logs/twice")
    wait_until(proc, project / "checkpoints/train.pt")  # the step-20 checkpoint, whole
    os.kill(proc.pid, signal.SIGTERM)  # stop at the next step: its checkpoint write takes a minute ...
    deadline = time.monotonic() + 60
    while not list((project / "checkpoints").glob(".train.pt.*.tmp")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint write after the first signal"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGTERM)  # ... and the second signal lands inside it
    started = time.monotonic()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 30  # at once, not after the write
    error = stderr_of(tmp_path / "logs/twice")
    assert "Traceback" not in error, error
    ckpt = files.load_checkpoint(project / "checkpoints/train.pt")  # whole: the write cut short left it alone
    assert ckpt["step"] % 20 == 0
    sentence = last_line(error)
    assert sentence.startswith("stopped at once by a second SIGTERM after step "), sentence
    kept = f": checkpoints/train.pt of step {ckpt['step']} is kept; run the same command to resume from it."
    assert sentence.endswith(kept), sentence
    assert list((project / "checkpoints").glob(".*.tmp")) == []
    (run,) = project_runs(project)
    assert run.info.status == "KILLED"


# --- two trainings in one project ---------------------------------------------------------------------
# (A killed training leaves its lock file behind, locking nothing: tests/test_kills_and_divergence.py
# checks that after each of its kills.)


@pytest.mark.slow
def test_a_second_training_in_the_same_project_is_refused_naming_the_first_ones_pid(
    tmp_path: Path, tracking_db: Path, uninterrupted: Path
) -> None:
    project = signal_project(tmp_path / "p", tracking_db)
    first = start(["train"], project, one_thread_env(project), tmp_path / "logs/first")
    wait_until(first, project / "samples/step_000025.png")
    os.killpg(first.pid, signal.SIGSTOP)  # held mid-training while the second one starts, however slowly
    try:
        second = run_cli(["train"], cwd=project, env=one_thread_env(project))
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    assert_refused(second, f"PID {first.pid}", "checkpoints/train.lock")
    assert first.wait(timeout=300) == 0, stderr_of(tmp_path / "logs/first")
    assert not (project / "checkpoints/train.lock").exists()
    assert_same_training(project, uninterrupted)  # steps logged once, the model upload intact
    (run,) = project_runs(project)
    models = project_client(project).search_logged_models([run.info.experiment_id])
    assert [str(m.status) for m in models] == ["READY"]


def test_the_lock_is_per_working_directory_and_released_on_the_way_out(tmp_path: Path) -> None:
    """DVC's queued experiments train side by side, each in a workspace of its own."""
    held = tmp_path / "a/checkpoints/train.lock"
    with signals.exclusive(held, "a training"):
        assert held.read_text() == f"{os.getpid()}\n"
        with signals.exclusive(tmp_path / "b/checkpoints/train.lock", "a training"):
            pass
        probe = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; from pipeline import signals\n"
             "with signals.exclusive(Path(sys.argv[1]), 'a training'): pass", str(held)],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert f"a training is already running in this project (PID {os.getpid()} holds {held})" in probe.stderr
    assert not held.exists()
    with signals.exclusive(held, "a training"):  # free again
        pass


# --- a finished run's outputs deleted ------------------------------------------------------------------

DELETED = ("samples", "models/generator.pt", "plots", "metrics/train_log.csv")


def outputs(project: Path) -> dict[str, bytes]:
    files = [p for p in project.rglob("*") if p.is_file() and p.relative_to(project).parts[0] in ("samples", "models",
             "plots", "metrics")]  # fmt: skip
    return {str(p.relative_to(project)): p.read_bytes() for p in sorted(files)}


def delete(project: Path) -> None:
    for name in DELETED:
        path = project / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.slow
def test_a_finished_run_whose_outputs_were_deleted_writes_every_one_again_byte_for_byte(
    tmp_path: Path, tracking_db: Path
) -> None:
    project = with_db(make_project(tmp_path / "p", steps=9, sample_every=3, fid_every=0), tracking_db)
    assert run_cli(["train"], cwd=project, env=one_thread_env(project)).returncode == 0
    before = outputs(project)
    (run,) = project_runs(project)
    record = metric_record(project, run.info.run_id)
    delete(project)

    result = run_cli(["train"], cwd=project, env=one_thread_env(project))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from checkpoints/train.pt at step 9" in result.stdout
    assert outputs(project) == before  # samples, generator, plots, logs, train.json: each byte as it was
    (again,) = project_runs(project)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert metric_record(project, run.info.run_id) == record  # not a step logged twice, final_* included
    models = project_client(project).search_logged_models([run.info.experiment_id])
    assert [str(m.status) for m in models] == ["READY"]


@pytest.mark.slow
def test_dvc_repro_forced_after_deleting_outputs_gives_them_back(tmp_path: Path) -> None:
    repo, env = dvc_repo(tmp_path / "repo")
    edit_params(repo, train={**TINY_TRAIN, "log_every": 3, "fid_every": 0})
    # The upstream stages' outputs, small (tests/test_dvc_e2e.py runs those stages): train reads the
    # prepared data, and with fid_every 0 only hashes the classifier and reference, its deps.
    parts = make_eval_project(tmp_path / "parts")
    for name in ("data/prepared/mnist.npz", "models/classifier-mnist.pt", "data/reference/mnist.npz"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(parts / name, repo / name)
    first = run_dvc(["repro", "-s", "train"], repo, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = outputs(repo)
    shutil.rmtree(repo / "samples")
    (repo / "models/generator.pt").unlink()
    again = run_dvc(["repro", "-f", "-s", "train"], repo, env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    after = outputs(repo)
    for name in [n for n in before if n.startswith("samples/")] + ["models/generator.pt", "plots/train_samples.png"]:
        assert after[name] == before[name], name


def test_the_ui_command_stops_its_mlflow_server_with_it(tmp_path: Path, tracking_db: Path) -> None:
    """SIGHUP, as when its terminal closes: the server, in a session of its own, gets nothing from the
    terminal, so the command must stop it. Ctrl-C and SIGTERM go through the same handler
    (signals.stop_on_signals, which the train stage's tests above send each of the three)."""
    import urllib.request

    from tests.servers import free_port

    project, port = with_db(make_project(tmp_path / "p"), tracking_db), free_port()
    process = start(["ui", "--port", str(port)], cwd=project, env=stage_env(project), log=tmp_path / "ui")

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):  # noqa: S310 - ours, on 127.0.0.1
                return True
        except OSError:
            return False

    deadline = time.monotonic() + 120
    while not answers() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
    assert answers(), (tmp_path / "ui.err").read_text()[-2000:]
    process.send_signal(signal.SIGHUP)
    assert process.wait(timeout=60) == 128 + signal.SIGHUP
    assert "the MLflow UI stopped on SIGHUP." in (tmp_path / "ui.err").read_text()
    deadline = time.monotonic() + 30
    while answers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not answers(), "the MLflow server outlived the ui command"
