"""Data-parallel training: torchrun and train.nproc on the CPU (gloo), as users launch them.

Each job is a real `torchrun` (torch.distributed.run) or `python -m pipeline train` with
train.nproc, in processes of their own, on a small model; the checks are the files, the
MLflow run, the weights and what the user is told.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from pipeline import cli, files
from tests.conftest import (
    ROOT,
    SMALL_MODEL,
    assert_refused,
    assert_same_weights,
    free_port,
    generator_weights,
    make_project,
    one_thread_env,
    project_client,
    project_runs,
    run_cli,
    stage_env,
    with_db,
)

STEPS = 40
DDP_TRAIN = {"batch_size": 8, "log_every": 4, "checkpoint_every": 8, "sample_every": 8}


def torchrun_command(nproc: int, *rdzv: str) -> list[str]:
    rdzv = rdzv or ("--master-port", str(free_port()))  # never the fixed default 29500
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *rdzv, "-m", "pipeline", "train"]


def torchrun(project: Path, nproc: int = 2, *rdzv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(torchrun_command(nproc, *rdzv), cwd=project, env=one_thread_env(project), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory, tracking_db: Path) -> Path:
    """The reference job: `torchrun --nproc-per-node=2 -m pipeline train`, never interrupted."""
    project = with_db(make_project(tmp_path_factory.mktemp("ddp") / "p", steps=STEPS, **DDP_TRAIN), tracking_db)
    result = torchrun(project)
    assert result.returncode == 0, result.stderr[-3000:]
    return project


@pytest.mark.slow
def test_two_processes_train_one_model_into_one_run_and_one_set_of_files(two_processes: Path) -> None:
    (run,) = project_runs(two_processes)  # rank 1 logged nothing
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["dist.world_size"], tags["dist.backend"], tags["dist.per_rank_batch"]) == ("2", "gloo", "4")
    assert run.data.params["train.batch_size"] == "8"  # the global batch
    steps = [m.step for m in project_client(two_processes).get_metric_history(
        run.info.run_id, "g_loss")]  # fmt: skip
    assert steps == list(range(1, STEPS + 1))
    assert sorted(p.name for p in (two_processes / "samples").iterdir()) == [
        f"step_{s:06d}.png" for s in range(8, STEPS + 1, 8)
    ]
    assert len((two_processes / "metrics/train_log.csv").read_text().splitlines()) == 1 + STEPS
    ckpt = files.load_checkpoint(two_processes / "checkpoints/train.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 1  # rank 1's random state too
    assert not torch.equal(ckpt["rng_cpu"], ckpt["rng_ranks"][0]["cpu"])  # a stream of its own


@pytest.mark.slow
def test_ranks_hold_identical_weights_after_every_step(tmp_path: Path) -> None:
    env = one_thread_env(tmp_path)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port",
               str(free_port()), str(ROOT / "tests/ddp_check.py")]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["differences"] == [0.0] * 12  # max |w_rank0 - w_rank1| over G and D, after each step (6 with R1 + augmentation)
    assert found["distinct_batches"]  # each rank drew its own images
    # The watchdog: rank 0's verdict followed by both ranks, back to the best state (step 4), in sync.
    watched = found["watchdog"]
    assert watched["events"] == [[[6, 4, "halve_lr_d"]]] * 2 and watched["steps"] == [12, 12]
    assert watched["difference"] == 0.0 and watched["lr_d"] == [[1e-4]] * 2
    assert watched["best_world_size"] == 2  # the best state holds both ranks' random streams


@pytest.mark.slow
def test_train_nproc_launches_the_same_job_through_torchs_launcher(tmp_path: Path, two_processes: Path, tracking_db: Path) -> None:
    """Same seed, same world size: the job of train.nproc=2 is bit-identical to torchrun's."""
    project = with_db(make_project(tmp_path / "p", steps=STEPS, nproc=2, **DDP_TRAIN), tracking_db)
    result = subprocess.run([sys.executable, "-m", "pipeline", "train"], cwd=project, env=one_thread_env(project),
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(generator_weights(project), generator_weights(two_processes))
    (run,) = project_runs(project)
    assert run.data.tags["dist.world_size"] == "2"


@pytest.mark.slow
def test_one_process_under_torchrun_is_bit_identical_to_the_plain_run(tmp_path: Path, tracking_db: Path) -> None:
    plain = with_db(make_project(tmp_path / "plain", steps=8, **DDP_TRAIN), tracking_db)
    # The same threads as the job's process: another thread count sums in another order.
    assert run_cli(["train"], cwd=plain, env=one_thread_env(plain)).returncode == 0
    job = with_db(make_project(tmp_path / "job", steps=8, **DDP_TRAIN), tracking_db)
    result = torchrun(job, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(generator_weights(job), generator_weights(plain))
    assert (job / "metrics/train_log.csv").read_text() == (plain / "metrics/train_log.csv").read_text()


def worker(job: subprocess.Popen[bytes], rank: int) -> psutil.Process | None:
    for child in psutil.Process(job.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "pipeline" in child.cmdline():
                return child
        except psutil.Error:
            continue
    return None


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_which_then_resumes_bit_identically(
    tmp_path: Path, two_processes: Path, tracking_db: Path
) -> None:
    project = with_db(make_project(tmp_path / "p", steps=STEPS, **DDP_TRAIN), tracking_db)
    job = subprocess.Popen(torchrun_command(2), cwd=project, env=one_thread_env(project), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    ckpt = project / "checkpoints/train.pt"
    deadline = time.monotonic() + 300
    while job.poll() is None and time.monotonic() < deadline:
        if ckpt.exists() and files.load_checkpoint(ckpt)["step"] >= 8:
            break
        time.sleep(0.02)
    victim = worker(job, 1)
    assert victim is not None and job.poll() is None, "the job ended before a rank could be killed"
    victim.send_signal(signal.SIGKILL)
    started = time.monotonic()
    assert job.wait(timeout=120) != 0  # torchrun stops the whole job
    assert time.monotonic() - started < 60
    killed_at = files.load_checkpoint(ckpt)["step"]
    assert killed_at < STEPS and not (project / "models/generator.pt").exists()
    run_id = files.load_checkpoint(ckpt)["run_id"]

    # Another world size is refused, with one sentence, and the checkpoint is kept.
    before = ckpt.read_bytes()
    assert_refused(run_cli(["train"], cwd=project, env=stage_env(project)),
                   "was written by a job of 2 process(es), this one has 1")  # fmt: skip
    assert ckpt.read_bytes() == before

    result = torchrun(project)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from checkpoints/train.pt at step {killed_at}" in result.stdout
    assert_same_weights(generator_weights(project), generator_weights(two_processes))
    assert files.read_json(project / "models/train_run.json")["run_id"] == run_id  # the same MLflow run
    assert [r.info.status for r in project_runs(project)] == ["FINISHED"]


@pytest.mark.slow
def test_bad_batch_split_and_unreachable_rendezvous_fail_within_seconds(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", steps=4, batch_size=7, log_every=2, checkpoint_every=2)
    started = time.monotonic()
    result = torchrun(project, 2)
    assert result.returncode != 0 and time.monotonic() - started < 120
    assert "error: train.batch_size=7 does not split evenly over 2 processes; make it a multiple of 2." in result.stderr
    assert not (project / "checkpoints").exists() and not (project / "mlflow.db").exists()

    # A c10d rendezvous nobody answers (10.255.255.1 is not routed here): torchrun gives up after
    # read_timeout, and no worker ever starts.
    started = time.monotonic()
    result = torchrun(project, 2, "--rdzv-backend=c10d", "--rdzv-endpoint=10.255.255.1:29400",
                      "--rdzv-conf=read_timeout=5")  # fmt: skip
    assert result.returncode != 0 and time.monotonic() - started < 60
    assert "The connection to the C10d store has failed" in result.stderr.strip().splitlines()[-1]
    with socket.socket() as taken:  # the master port is in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        started = time.monotonic()
        result = torchrun(project, 2, "--master-port", str(taken.getsockname()[1]))
    assert result.returncode != 0 and time.monotonic() - started < 60
    assert "address already in use" in result.stderr.strip().splitlines()[-1]
    assert not (project / "checkpoints").exists()


def test_train_nproc_that_does_not_split_the_batch_is_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"model": SMALL_MODEL, "train": {"batch_size": 30, "nproc": 4}}))
    assert cli.main(["train", "--params", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {path}: train.batch_size=30 does not split evenly over train.nproc=4 processes; "
                   "make it a multiple of 4.\n")  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_ranks_stay_in_sync_on_cuda_with_nccl_and_syncbatchnorm(tmp_path: Path) -> None:
    nproc = min(2, torch.cuda.device_count())
    env = {**stage_env(tmp_path), "PYTHONPATH": str(ROOT), "DDP_CHECK_DEVICE": "cuda"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-port",
               str(free_port()), str(ROOT / "tests/ddp_check.py")]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["backend"] == "nccl" and found["differences"] == [0.0] * 6


def test_the_step_calls_d_once_per_backward_and_g_through_the_frozen_module() -> None:
    """A second DDP forward of D before the first one's backward re-broadcasts batch-norm buffers in
    place (the known DDP pitfall for GANs): each D forward through the wrapper has its own backward."""
    from pipeline.gan.loop import Nets, train_step
    from pipeline.gan.losses import LOSSES
    from pipeline.gan.state import new_state
    from pipeline.params import ModelParams, TrainParams

    events: list[str] = []

    class Wrapped(torch.nn.Module):  # stands in for DistributedDataParallel(D)
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
            events.append("forward")
            out = self.inner(x, labels)
            out.register_hook(lambda grad: events.append("backward"))
            return out

    state = new_state(ModelParams(**SMALL_MODEL), TrainParams(batch_size=4, device="cpu"), torch.device("cpu"), 10)
    nets = Nets(state.generator, Wrapped(state.discriminator), state.discriminator)
    train_step(state, torch.rand(4, 1, 28, 28) * 2 - 1, torch.randn(4, 100), contextlib.nullcontext(), LOSSES["bce"], nets)
    assert events == ["forward", "backward", "forward", "backward"]  # G's update never goes through the wrapper
