"""Stages killed at any moment, and a training run that diverges.

Every fault is injected into the real entry point, `python -m pipeline <stage>` in a
process of its own, and the test then checks the exit status, what the user is told, and
every output, checkpoint and MLflow run left behind. A kill is SIGKILL to the stage's whole
process group: nothing gets to clean up, as after the OOM killer or a power cut.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline import files
from pipeline.data import load_prepared
from pipeline.gan.loop import Callbacks, train
from pipeline.gan.state import new_state
from pipeline.params import Params, TrainParams
from tests.conftest import (
    CPU,
    ROOT,
    assert_outputs_complete,
    assert_same_weights,
    generator_weights,
    make_eval_project,
    make_project,
    project_client,
    project_runs,
    run_cli,
    shared_mnist_dir,
    stage_env,
    start,
    with_db,
)

# --- stage processes and kills ---------------------------------------------------------------


# A slow disk: every fsync waits a little first. Run through sitecustomize, so the stage itself is
# unchanged; it only widens each atomic write enough for kill_mid_write to land inside it
# reliably, also on a RAM disk where a write takes microseconds.
SLOW_DISK = """import os, time
_fsync = os.fsync
def _slow_fsync(fd):
    time.sleep(float(os.environ["FAULTS_FSYNC_DELAY_S"]))
    _fsync(fd)
os.fsync = _slow_fsync
"""


def slow_disk(env: dict[str, str], where: Path, delay_s: float = 0.01) -> dict[str, str]:
    """`env` for a stage whose every os.fsync takes `delay_s` longer."""
    (where / "slow-disk").mkdir(parents=True, exist_ok=True)
    (where / "slow-disk/sitecustomize.py").write_text(SLOW_DISK)
    path = os.pathsep.join(filter(None, [str(where / "slow-disk"), env.get("PYTHONPATH")]))
    return {**env, "PYTHONPATH": path, "FAULTS_FSYNC_DELAY_S": str(delay_s)}


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the stage and everything it started (MLflow's helper processes too)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def kill_when(proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float = 300) -> bool:
    """SIGKILL the stage as soon as `ready()`; False when the stage ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if ready():
            kill(proc)
            return True
        if time.monotonic() > deadline:
            kill(proc)
            pytest.fail("the stage neither reached the kill point nor ended")
        time.sleep(0.002)
    return False


def kill_mid_write(proc: subprocess.Popen[bytes], folder: Path, pattern: str, timeout: float = 300) -> bool:
    """SIGKILL the stage while files.atomic_path has a temp file matching `pattern` open in `folder`.

    The stage is frozen (SIGSTOP) the moment a new temp file shows up and killed only if the
    file is still there, so a True result means the kill really landed inside a write.
    """
    old = set(folder.glob(pattern))
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        for tmp in set(folder.glob(pattern)) - old:
            os.killpg(proc.pid, signal.SIGSTOP)
            if tmp.exists():
                kill(proc)
                return True
            os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.0005)
    if proc.poll() is None:
        kill(proc)
        pytest.fail(f"no write of {pattern} in {folder} within {timeout} s")
    return False


# --- the state left behind ------------------------------------------------------------------


def runs_in(project: Path, status: str = "RUNNING") -> int:
    """Runs in `status` in the project's tracking database, read without MLflow (fast enough to poll)."""
    if not (project / "mlflow.db").exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{project / 'mlflow.db'}?mode=ro", uri=True, timeout=0.1)) as db:
        try:
            return int(db.execute("SELECT count(*) FROM runs WHERE status = ?", (status,)).fetchone()[0])
        except sqlite3.Error:  # tables not there yet, or locked for a moment
            return 0


# --- killed at any moment --------------------------------------------------------------------------


@pytest.mark.slow
def test_prepare_killed_at_random_moments_and_mid_write(tmp_path: Path) -> None:
    mirror = shared_mnist_dir()
    if mirror is None:
        pytest.skip("prepare reads the real checksums; needs the offline MNIST copy")
    env = {**stage_env(tmp_path), "MNIST_MIRROR": str(mirror)}
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    started = time.monotonic()
    assert run_cli(["prepare"], cwd=reference, env=env).returncode == 0
    duration = time.monotonic() - started
    want = {out: files.sha256_file(reference / out) for out in ("data/prepared/mnist.npz", "metrics/data.json")}

    project = tmp_path / "p"
    project.mkdir()
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    rng = random.Random(20260701)
    plan = [("at", rng.uniform(0.3, 0.9) * duration) for _ in range(2)] + [("mid-write", 0.0)]
    injected = []
    for i, (how, delay) in enumerate(plan):
        proc = start(["prepare"], project, env, tmp_path / f"logs/{i}")
        if how == "at":
            t0 = time.monotonic()
            killed = kill_when(proc, lambda: time.monotonic() - t0 > delay)  # noqa: B023
        else:
            killed = kill_mid_write(proc, project / "data/prepared", ".mnist.npz.*.tmp")
        if killed:
            injected.append(how)
        # Whatever moment it died at: each output is absent, or whole and exactly right.
        for out, sha in want.items():
            assert not (project / out).exists() or files.sha256_file(project / out) == sha, out
        assert_outputs_complete(project, temps_allowed=True)
    assert injected.count("mid-write") == 1, injected

    result = run_cli(["prepare"], cwd=project, env=env)
    assert result.returncode == 0, result.stderr
    assert {out: files.sha256_file(project / out) for out in want} == want
    assert_outputs_complete(project, temps_allowed=False)
    print(f"prepare: {len(injected)} kills injected ({injected}), outputs exact afterwards")


KILL_STEPS = 24
KILL_TRAIN = {"log_every": 2, "checkpoint_every": 4, "sample_every": 1}


Grids = dict[int, np.ndarray]


def uninterrupted(project: Path) -> tuple[list[tuple[int, float, float, float]], dict[str, torch.Tensor], Grids]:
    """The same training in this process, never interrupted: history, generator weights, grids."""
    params = Params.model_validate(yaml.safe_load((project / "params.yaml").read_text()))
    grids: dict[int, np.ndarray] = {}
    state = new_state(params.model, params.train, CPU, 10)
    images = torch.from_numpy(load_prepared(project / "data/prepared/mnist.npz").train_images)
    train(state, images, params.train, params.model.latent_dim, Callbacks(on_sample=grids.__setitem__))
    return state.history, state.generator.state_dict(), grids


@pytest.mark.slow
def test_train_killed_at_random_steps_and_mid_write_resumes_bit_identically(tmp_path: Path, tracking_db: Path) -> None:
    project = with_db(make_project(tmp_path / "p", steps=KILL_STEPS, **KILL_TRAIN), tracking_db)
    env = stage_env(project)
    history, weights, grids = uninterrupted(project)
    samples, ckpt = project / "samples", project / "checkpoints/train.pt"
    lock = project / "checkpoints/train.lock"

    def last_sample() -> int:
        return max((int(p.stem[5:]) for p in samples.glob("step_*.png")), default=0)

    rng = random.Random(7)
    plan = ["checkpoint write", "step", "sample write", "after training"]
    injected: list[str] = []
    starts: list[int] = []  # the checkpoint step each run resumes from (0: it starts afresh)
    for i, how in enumerate(plan):
        starts.append(files.load_checkpoint(ckpt)["step"] if ckpt.exists() else 0)
        proc = start(["train"], project, slow_disk(env, tmp_path), tmp_path / f"logs/{i}")
        if how == "step":  # a seeded random step ahead of what earlier runs reached
            target = rng.randint(last_sample() + 1, last_sample() + 6)
            killed = kill_when(proc, lambda: (samples / f"step_{target:06d}.png").exists())  # noqa: B023
            how = f"step {target}"
        elif how == "checkpoint write":
            killed = kill_mid_write(proc, ckpt.parent, ".train.pt.*.tmp")
        elif how == "sample write":
            killed = kill_mid_write(proc, samples, ".step_*.png.*.tmp")
        else:  # outputs written, MLflow's final logging under way
            killed = kill_when(proc, lambda: (project / "metrics/train.json").exists())
        # Each start after a kill got as far as its kill point: the lock the dead process left locks nothing.
        assert killed, f"training ended before the kill ({how})"
        injected.append(how)
        assert lock.read_text().strip() == str(proc.pid)  # its file is left behind, naming the dead process
        assert_outputs_complete(project, temps_allowed=True)
        if ckpt.exists():  # the checkpoint is a good one: its history is the uninterrupted run's
            state = files.load_checkpoint(ckpt)
            saved = [tuple(row) for row in state["history"].tolist()]
            assert saved == [tuple(map(float, row)) for row in history[: state["step"]]]
    # The first kill lands inside the first checkpoint's write, so the second run starts afresh too;
    # the third and the fourth resume from the checkpoint the second one left mid-way.
    assert starts[:2] == [0, 0] and 0 < starts[2] <= starts[3] < KILL_STEPS, starts

    result = run_cli(["train"], cwd=project, env=env)
    assert result.returncode == 0, result.stderr
    assert f"resuming from checkpoints/train.pt at step {KILL_STEPS}" in result.stdout  # the last kill: after training
    assert_outputs_complete(project, temps_allowed=False)
    assert not lock.exists()

    # Bit-identical to the run that was never killed: weights, per-step log, sample grids.
    assert_same_weights(generator_weights(project), weights)
    rows = [line.split(",") for line in (project / "metrics/train_log.csv").read_text().splitlines()[1:]]
    assert [(int(s), *(float(np.float32(v)) for v in vals)) for s, *vals in rows] == history
    for step, grid in grids.items():
        png = np.asarray(Image.open(samples / f"step_{step:06d}.png"))
        assert np.array_equal(png[::3, ::3], grid), step

    # One MLflow run across the restarts, finished, with every step's losses (the values of the
    # uninterrupted run) and every sample grid. A run killed before its first checkpoint cannot
    # be resumed: the next start marks it KILLED, so no run is left RUNNING.
    runs = project_runs(project)
    (run,) = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(r.info.status for r in runs if r is not run) == ["KILLED"] * (len(runs) - 1)
    client = project_client(project)
    logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "g_loss"))
    assert logged == [(step, g) for step, _, _, g in history]  # each step once, though runs resumed mid-way
    names = [a.path for a in client.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png")]
    assert sorted(int(n.split("+step+")[1].split("+")[0]) for n in names) == list(range(1, KILL_STEPS + 1))
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [str(m.status) for m in models] == ["READY"]  # a kill during an upload left nothing behind
    print(f"train: {len(injected)} kills injected ({injected}), result bit-identical, "
          f"{len(runs) - 1} run(s) killed before their first checkpoint marked KILLED")  # fmt: skip


@pytest.mark.slow
def test_evaluate_killed_at_random_moments_and_mid_write(tmp_path: Path, tracking_db: Path) -> None:
    reference = with_db(make_eval_project(tmp_path / "reference"), tracking_db)
    env = stage_env(reference)
    started = time.monotonic()
    result = run_cli(["evaluate"], cwd=reference, env=env)
    assert result.returncode == 0, result.stderr
    duration = time.monotonic() - started
    want = {k: v for k, v in json.loads((reference / "metrics/eval.json").read_text()).items() if k != "seconds"}

    project = make_eval_project(tmp_path / "p")
    rng = random.Random(99)
    plan = [("db creation", 0.0), ("at", rng.uniform(0.3, 0.9) * duration)]
    plan += [("mid-write", 0.0), ("logging", 0.0)]
    injected, finished = [], 0  # finished: the FINISHED runs so far
    for i, (how, delay) in enumerate(plan):
        proc = start(["evaluate"], project, slow_disk(env, tmp_path), tmp_path / f"logs/{i}")
        if how == "at":
            t0 = time.monotonic()
            killed = kill_when(proc, lambda: time.monotonic() - t0 > delay)  # noqa: B023
        elif how == "db creation":  # MLflow builds its tables in many steps
            killed = kill_mid_write(proc, project, ".mlflow.db.*.tmp")
        elif how == "mid-write":
            killed = kill_mid_write(proc, project / "plots", ".eval_samples.png.*.tmp")
        else:  # outputs written, its MLflow run open
            killed = kill_when(proc, lambda: runs_in(project) > 0)
        if killed:
            injected.append(how)
        else:  # the random moment came after the end
            assert proc.returncode == 0
        # A kill can land after the run was marked FINISHED, while the interpreter shuts down.
        finished_before, finished = finished, runs_in(project, "FINISHED")
        assert finished - finished_before in ((0, 1) if killed else (1,))
        assert_outputs_complete(project, temps_allowed=True)
        if (project / "metrics/eval.json").exists():
            got = json.loads((project / "metrics/eval.json").read_text())
            assert {k: v for k, v in got.items() if k != "seconds"} == want
    assert {"db creation", "mid-write", "logging"} <= set(injected), injected

    result = run_cli(["evaluate"], cwd=project, env=env)
    assert result.returncode == 0, result.stderr
    assert_outputs_complete(project, temps_allowed=False)
    got = json.loads((project / "metrics/eval.json").read_text())
    assert {k: v for k, v in got.items() if k != "seconds"} == want
    # A killed evaluation's run is marked KILLED when the next one starts; none stays RUNNING.
    statuses = sorted(run.info.status for run in project_runs(project))
    assert statuses.count("FINISHED") == 1 + finished and "KILLED" in statuses
    assert set(statuses) <= {"FINISHED", "KILLED"}, statuses
    print(f"evaluate: {len(injected)} kills injected ({injected}), MLflow runs {statuses}")


# --- divergence -------------------------------------------------------------------------------------

# Adam's step is at most about lr per weight, so a huge learning rate alone never overflows this
# model (lr 1.0 leaves the losses in the hundreds). beta2 = 0 (legal: 0 <= beta2 < 1) with
# beta1 > 0 does: the step becomes m / |g|, which explodes as soon as a gradient is near zero,
# and with lr 1.0 the losses reach 1e30 and NaN within about ten steps.
EXPLOSIVE = {"lr_d": 1.0, "lr_g": 1.0, "beta1": 0.5, "beta2": 0.0, "log_every": 1, "checkpoint_every": 2}


@pytest.mark.slow
def test_divergence_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path: Path, tracking_db: Path) -> None:
    project = with_db(make_project(tmp_path / "p", steps=40, **EXPLOSIVE), tracking_db)
    env = stage_env(project)
    result = run_cli(["train"], cwd=project, env=env)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: training diverged at step "), result.stderr
    assert "lower the learning rates" in error and "Traceback" not in result.stderr
    step = int(error.split("step ")[1].split(":")[0])
    assert re.search(r"D loss [-+.\w]+, G loss [-+.\w]+", error)  # the losses are named

    ckpt = files.load_checkpoint(project / "checkpoints/train.pt")
    assert 0 < ckpt["step"] < step  # the last good one, never the diverged state
    assert all(torch.isfinite(t).all() for t in ckpt["generator"].values() if t.is_floating_point())
    assert not (project / "models/generator.pt").exists() and not (project / "metrics/train.json").exists()
    (run,) = project_runs(project)
    assert run.info.status == "FAILED"

    # Again: it resumes from that checkpoint, diverges at the same step, and keeps the checkpoint.
    before = (project / "checkpoints/train.pt").read_bytes()
    again = run_cli(["train"], cwd=project, env=env)
    assert again.returncode == 2 and f"resuming from checkpoints/train.pt at step {ckpt['step']}" in again.stdout
    assert again.stderr.strip().splitlines()[-1] == error
    assert (project / "checkpoints/train.pt").read_bytes() == before
    print(f"divergence: injected twice, stopped at step {step}, checkpoint at step {ckpt['step']} kept")


def test_explosive_params_are_legal() -> None:
    """The divergence test uses values params.yaml accepts: the fault is the user's to make."""
    params = TrainParams(**EXPLOSIVE)
    assert {key: getattr(params, key) for key in EXPLOSIVE} == EXPLOSIVE  # taken as given, none clamped
