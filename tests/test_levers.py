"""The levers beyond the tutorial: generator EMA, the conditional pair, hinge loss, spectral norm."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import files
from pipeline.errors import UserError
from pipeline.gan.architectures import build_discriminator, build_generator
from pipeline.gan.loop import train
from pipeline.gan.losses import LOSSES
from pipeline.gan.sampling import generate, requested_labels
from pipeline.gan.state import new_state
from pipeline.gan.summary import count_parameters
from pipeline.params import EvaluateParams, ModelParams, TrainParams, load_params
from pipeline.scoring import scorer
from pipeline.scoring.scores import METRICS
from pipeline.scoring.scores.base import Asked
from tests.conftest import (
    CPU,
    SMALL_MODEL,
    TINY_MNIST,
    TINY_TRAIN,
    edit_params,
    make_eval_project,
    run_cli,
    stage_env,
    train_tiny,
    with_db,
)


def everything(state) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """G, D and the EMA's weights and buffers."""
    out = {f"G.{k}": v for k, v in state.generator.state_dict().items()}
    out |= {f"D.{k}": v for k, v in state.discriminator.state_dict().items()}
    if state.ema is not None:
        out |= {f"EMA.{k}": v for k, v in state.ema.state_dict().items()}
    return out


def test_ema_follows_the_hand_computed_average_over_two_steps() -> None:
    decay = 0.9
    first = train_tiny(1, ema_decay=decay)
    w1 = {k: v.clone() for k, v in first.generator.state_dict().items()}
    assert all(torch.equal(first.ema.module.state_dict()[k], w1[k]) for k in w1)  # the first update copies G
    second = train_tiny(2, state=first, ema_decay=decay)
    w2 = second.generator.state_dict()
    ema = second.ema.module.state_dict()
    for key in w1:
        if not w1[key].is_floating_point():
            continue
        expected = decay * w1[key] + (1 - decay) * w2[key]
        assert torch.allclose(ema[key], expected, rtol=1e-6, atol=1e-7), key
        assert not torch.equal(ema[key], w2[key]) or torch.equal(w1[key], w2[key]), key
    # batch-norm statistics are averaged too (use_buffers)
    assert any(k.endswith("running_mean") for k in w1)


def test_levers_off_leave_the_tutorials_models_and_checkpoint() -> None:
    assert count_parameters(build_generator(ModelParams(), n_classes=10)) == (855_809, 856_193)
    assert count_parameters(build_discriminator(ModelParams(), n_classes=10)) == (392_833, 393_729)
    state = train_tiny(3)
    assert state.ema is None and state.output is state.generator
    assert "ema" not in state.to_checkpoint("fp")


@pytest.mark.parametrize(
    ("model", "train_params"),
    [({}, {"ema_decay": 0.99}), ({"conditional": True}, {}), ({"conditional": True, "spectral_norm": True},
                                                               {"loss": "hinge", "ema_decay": 0.995})],
    ids=["ema", "conditional", "conditional+sn+hinge+ema"],
)
def test_lever_runs_resume_bit_identically(tmp_path: Path, model: dict, train_params: dict) -> None:
    saved = tmp_path / "ckpt.pt"
    first = train_tiny(3, model, **train_params)
    files.save_checkpoint(first.to_checkpoint("fp"), saved)
    m, p = ModelParams(**{**SMALL_MODEL, **model}), TrainParams(**{**TINY_TRAIN, **train_params, "steps": 3})
    resumed = new_state(m, p, CPU, 10)
    torch.manual_seed(12345)  # a different RNG state must be overwritten by the checkpoint's
    resumed.restore(files.load_checkpoint(saved))
    a, b = train_tiny(6, model, resumed, **train_params), train_tiny(6, model, **train_params)
    wa, wb = everything(a), everything(b)
    assert wa.keys() == wb.keys() and len(wa) > 0
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert a.history == b.history


def test_the_conditional_generator_draws_the_class_it_is_asked_for() -> None:
    generator = train_tiny(2, {"conditional": True}).output.eval()
    z = torch.randn(10, generator.latent_dim)
    labels = torch.arange(10)
    with torch.no_grad():
        images = generator(z, labels)
        assert images.shape == (10, 1, 28, 28)
        # the same noise asked for another class is another image; the label may ride in z's last column
        assert not torch.equal(images, generator(z, (labels + 1) % 10))
        assert torch.equal(images, generator(torch.cat([z, labels[:, None].float()], dim=1)))
    with pytest.raises(ValueError, match="conditional generator needs one label per sample"):
        generate(generator, 4, 0, 2, CPU)
    pixels = generate(generator, 4, 0, 2, CPU, torch.tensor([3, 3, 7, 7]))
    assert pixels.shape == (4, 28, 28) and pixels.dtype == torch.uint8
    with pytest.raises(ValueError, match="trains on labelled images"):
        m, p = ModelParams(**SMALL_MODEL, conditional=True), TrainParams(**TINY_TRAIN)
        train(new_state(m, p, CPU, 10), torch.from_numpy(TINY_MNIST.train_images), p, m.latent_dim)


def test_requested_labels_follow_the_distribution_and_the_seed() -> None:
    share = np.array([0.5, 0.3, 0.2])
    labels = requested_labels(20_000, share, seed=3)
    assert torch.equal(labels, requested_labels(20_000, share, seed=3))
    assert np.allclose(np.bincount(labels.numpy(), minlength=3) / 20_000, share, atol=0.015)


def test_the_conditional_discriminator_sees_the_labels_of_real_and_fake_batches() -> None:
    seen = []
    state = new_state(ModelParams(**SMALL_MODEL, conditional=True), TrainParams(**TINY_TRAIN), CPU, 10)
    state.discriminator.embed.register_forward_hook(lambda _m, args, _out: seen.append(args[0].clone()))
    train_tiny(1, {"conditional": True}, state)
    real, fake, through = seen  # D on the real batch, on the fakes, and G's update through D
    assert torch.equal(real, fake) and torch.equal(real, through) and real.shape == (TINY_TRAIN["batch_size"],)


def test_hinge_and_spectral_norm_train_with_finite_losses() -> None:
    logits = torch.tensor([-2.0, -0.5, 0.5, 2.0])
    assert LOSSES["hinge"].d_real(logits) == pytest.approx((3.0 + 1.5 + 0.5 + 0.0) / 4)
    assert LOSSES["hinge"].d_fake(logits) == pytest.approx((0.0 + 0.5 + 1.5 + 3.0) / 4)
    assert LOSSES["hinge"].g(logits) == pytest.approx(0.0)
    state = train_tiny(6, {"spectral_norm": True}, loss="hinge")
    assert all(np.isfinite(row[1:]).all() for row in state.history)
    convs = [m for m in state.discriminator.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert convs and all(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in convs)
    # with spectral norm each weight's largest singular value is 1 (up to the power iteration)
    head = state.discriminator.head.weight
    assert torch.linalg.matrix_norm(head, ord=2).item() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [("train:\n  ema_decay: 1.0\n", "'train.ema_decay' = 1.0 is invalid: input should be less than 1"),
     ("train:\n  loss: wgan\n", "'train.loss' = \"wgan\" is invalid: input should be 'bce' or 'hinge'"),
     ("model:\n  conditional: maybe\n", "'model.conditional' = \"maybe\" is invalid")],
)  # fmt: skip
def test_bad_lever_params_are_one_sentence(tmp_path: Path, override: str, pattern: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(override)
    with pytest.raises(UserError, match=re.escape(pattern)):
        load_params(path)


def test_conditional_scores_per_class_and_the_asked_for_label() -> None:
    rng = np.random.default_rng(0)
    d, n_real = 4, 400
    real_labels = np.repeat([0, 1], n_real // 2)
    real = rng.normal(size=(n_real, d)).astype(np.float32) + real_labels[:, None] * 3
    ref = scorer.compute_reference(real, real_labels, "sha", n_classes=2)
    asked = np.repeat([0, 1], 100)
    fake = rng.normal(size=(200, d)).astype(np.float32) + asked[:, None] * 3
    probs = np.zeros((200, 2))
    probs[np.arange(200), asked] = 1.0
    probs[:20] = [0.0, 1.0]  # the classifier puts 20 samples asked for class 0 in class 1
    params = EvaluateParams()
    conditional = METRICS["asked_class"].compute
    out = conditional(fake, probs, ref, params, Asked(asked, real_labels))
    assert out["label_accuracy"] == pytest.approx(0.9)
    assert len(out["fid_per_class"]) == 2 and all(0 <= f < 1 for f in out["fid_per_class"])
    assert out["fid_class_mean"] == pytest.approx(np.mean(out["fid_per_class"]))
    few = conditional(fake[:105], probs[:105], ref, params, Asked(asked[:105], real_labels))
    assert few["fid_per_class"][1] is None and "fid_class_mean" not in few  # 5 samples of class 1: too few for 4-D
    with pytest.raises(UserError, match="the reference holds 400 images, the test split 3"):
        conditional(fake, probs, ref, params, Asked(asked, real_labels[:3]))


@pytest.mark.slow
def test_a_conditional_ema_run_from_params_to_scores_and_samples(tmp_path: Path, tracking_db: Path) -> None:
    """params.yaml -> train -> evaluate -> generate: the exported generator is the EMA, the raw G stays
    in the file, the scores say whether it draws the asked-for class, and `generate --label` draws one."""
    project = with_db(make_eval_project(tmp_path / "p"), tracking_db)  # with an unconditional generator trained without EMA
    env = stage_env(project)
    for args, said in ((["--label", "3"], "is not a conditional generator"), (["--raw"], "leave out --raw")):
        bad = run_cli(["generate", "-n", "2", *args], cwd=project, env=env)
        assert bad.returncode == 2 and said in bad.stderr, bad.stderr
    edit_params(project, model={"conditional": True, "spectral_norm": True},
                train={"steps": 4, "ema_decay": 0.9, "loss": "hinge", "standing_stats": 1})  # fmt: skip
    for stage in ("train", "evaluate"):
        result = run_cli([stage], cwd=project, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    saved = files.load_checkpoint(project / "models/generator.pt")
    assert {"generator", "generator_raw"} <= saved.keys() and "embed.weight" in saved["generator"]
    # The EMA as the checkpoint keeps it, exported with batch norm from its own samples (standing_stats).
    ema = {k.removeprefix("module."): v for k, v in files.load_checkpoint(project / "checkpoints/train.pt")["ema"].items()}
    for key, value in saved["generator"].items():
        if "num_batches" not in key:
            assert torch.equal(value, ema[key]) == ("running_" not in key), key
    scores = json.loads((project / "metrics/eval.json").read_text())
    assert 0.0 <= scores["label_accuracy"] <= 1.0
    assert scores["fid_per_class"] == [None] * 10 and "fid_class_mean" not in scores  # 64 samples: too few per class
    result = run_cli(["generate", "-n", "6", "--label", "7", "--output", "seven.npy"], cwd=project, env=env)
    assert result.returncode == 0, result.stderr
    assert np.load(project / "seven.npy").shape == (6, 28, 28)
    raw = run_cli(["generate", "-n", "6", "--label", "7", "--raw", "--output", "raw.npy"], cwd=project, env=env)
    assert raw.returncode == 0, raw.stderr
    assert not np.array_equal(np.load(project / "raw.npy"), np.load(project / "seven.npy"))
    bad = run_cli(["generate", "-n", "2", "--label", "eleven"], cwd=project, env=env)
    assert bad.returncode == 2 and "--label 'eleven' is not a class of mnist" in bad.stderr, bad.stderr


def test_the_readme_names_the_preset_the_study_measures() -> None:
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("lever_quality", root / "benchmarks/lever_quality.py")
    assert spec is not None and spec.loader is not None
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    readme = (root / "README.md").read_text()
    for preset in (study.PRESET, study.ROBUST, study.BEST_CANDIDATE):
        assert f"dvc exp run {study.dvc_overrides(preset)}\n" in readme
        study.with_overrides(load_params(root / "params.yaml"), preset)  # valid params
    nested = study.with_overrides(load_params(root / "params.yaml"), {"model.dcgan.dropout": 0.0})
    assert nested.model.dcgan.dropout == 0.0 and nested.model.dcgan.leaky_slope == 0.2  # as `-S` sets one key
    assert list(study.STUDY)[0] == "tutorial" and study.STUDY["tutorial"] == {}
    assert study.STUDY["quality preset"] == study.PRESET
    load_params(root / "params.yaml")  # the defaults the overrides apply to
    study.with_overrides(load_params(root / "params.yaml"), study.PRESET)  # valid params
