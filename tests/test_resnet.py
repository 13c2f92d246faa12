"""`model.arch: resnet`, the SNGAN-style residual pair: shapes, conditional batch norm and projection,
bit-identical resume, and every stage with it (train, evaluate into the registry, generate a class
from the champion, a served request, a sweep trial, a two-process job)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import files
from pipeline.gan.architectures import build_discriminator, build_generator, model_for_weights
from pipeline.gan.state import new_state
from pipeline.params import ModelParams, TrainParams
from tests.conftest import (
    CPU,
    SMALL_MODEL,
    TINY_TRAIN,
    edit_params,
    make_eval_project,
    one_thread_env,
    run_cli,
    stage_env,
    start,
    train_tiny,
    with_db,
)
from tests.servers import free_port
from tests.test_levers import everything
from tests.test_serve import get, wait_until_up

RESNET = {"arch": "resnet", "resnet": {"g_channels": 8, "d_channels": 8}}


def test_the_residual_pair_draws_28x28_digits_of_the_class_asked_for() -> None:
    model = ModelParams(**{**RESNET, "conditional": True, "spectral_norm": True})
    generator, discriminator = build_generator(model, n_classes=10), build_discriminator(model, n_classes=10)
    z, labels = torch.randn(6, 100), torch.tensor([0, 1, 2, 3, 4, 5])
    images = generator(z, labels)
    assert images.shape == (6, 1, 28, 28) and images.abs().max() <= 1
    assert discriminator(images, labels).shape == (6,)
    generator.eval()
    with torch.no_grad():  # each class its own scale and shift (1 and 0 for all at first, as trained apart here)
        assert torch.equal(generator(z, labels), generator(z, (labels + 1) % 10))
        generator.blocks[0].norm1.scale.weight.normal_()
        assert not torch.equal(generator(z, labels), generator(z, (labels + 1) % 10))
        assert torch.equal(generator(z, labels), generator(torch.cat([z, labels[:, None].float()], 1)))
    rebuilt, n_classes = model_for_weights(generator.state_dict(), ModelParams(arch="resnet"))
    assert (rebuilt.arch, rebuilt.resnet.g_channels, rebuilt.conditional, n_classes) == ("resnet", 8, True, 10)
    with pytest.raises(ValueError, match="needs the labels"):
        discriminator(images)


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
def test_resnet_runs_resume_bit_identically(tmp_path: Path, conditional: bool) -> None:
    model = {**RESNET, "conditional": conditional}
    saved = tmp_path / "ckpt.pt"
    first = train_tiny(3, model, ema_decay=0.9)
    files.save_checkpoint(first.to_checkpoint("fp"), saved)
    m = ModelParams(**{**SMALL_MODEL, **model})
    resumed = new_state(m, TrainParams(**{**TINY_TRAIN, "ema_decay": 0.9, "steps": 3}), CPU, 10)
    torch.manual_seed(12345)
    resumed.restore(files.load_checkpoint(saved))
    a, b = train_tiny(6, model, resumed, ema_decay=0.9), train_tiny(6, model, ema_decay=0.9)
    wa, wb = everything(a), everything(b)
    assert wa.keys() == wb.keys() and any("blocks.0.conv1" in k for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and a.history == b.history


def resnet_project(path: Path, tracking_db: Path) -> Path:
    project = with_db(make_eval_project(path), tracking_db)
    edit_params(project, model={**RESNET, "conditional": True}, train={"steps": 4})
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sweep"] = {"trials": 1, "steps": 3, "fid_every": 3, "fid_samples": 32, "eval_samples": 64}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


@pytest.mark.slow
def test_every_stage_runs_the_resnet_through_to_the_served_champion(tmp_path: Path, tracking_db: Path) -> None:
    project = resnet_project(tmp_path / "p", tracking_db)
    env = stage_env(project)
    for args in (["train"], ["evaluate"], ["sweep"]):
        result = run_cli(args, cwd=project, env=env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    champion = "models:/dcgan-mnist-generator@champion"
    drawn = run_cli(["generate", "--model", champion, "--label", "3", "-n", "4", "--seed", "5", "--output", "threes.npy"],
                    cwd=project, env=env)  # fmt: skip
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    port = free_port()
    process = start(["serve", "--port", str(port)], cwd=project, env=env, log=tmp_path / "serve")
    try:
        health = wait_until_up(f"http://127.0.0.1:{port}", process, tmp_path / "serve")
        assert health["conditional"] is True
        status, body, _ = get(f"http://127.0.0.1:{port}/digits?n=4&seed=5&label=3")
        assert status == 200
        assert np.array_equal(np.array(json.loads(body)["images"]), np.load(project / "threes.npy"))
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.mark.slow
def test_a_two_process_resnet_job_trains(tmp_path: Path, tracking_db: Path) -> None:
    project = resnet_project(tmp_path / "p", tracking_db)
    edit_params(project, train={"nproc": 2, "steps": 3})
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipeline", "train"], cwd=project, env=one_thread_env(project),
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    state = files.load_checkpoint(project / "checkpoints/train.pt")
    assert state["step"] == 3 and state["world_size"] == 2 and time.monotonic() - started < 600
