"""Registries are the only lists of names: a new loss, architecture or metric is one new module.

Each test adds one, as a user would, to a fresh copy of the project, and then runs the stages
with it: nothing else in the copy changes (git sees one new file), yet params.yaml accepts the
name, the JSON schema lists it, and the train stage (and, for an architecture, generate) runs
it; a new metric lands in eval.json and the printed report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import yaml

from pipeline.data import DATASETS, OWN
from pipeline.gan.architectures import ARCHITECTURES
from pipeline.gan.losses import LOSSES
from pipeline.params import DataParams, ModelParams, Params, TrainParams, flatten
from pipeline.registry import discover
from pipeline.scoring.scores import CONDITIONAL_SCALARS, METRICS, SCALARS
from tests.conftest import copy_project, make_eval_project, make_project, stage_env, with_db

LEAST_SQUARES = '''"""Least-squares GAN (Mao et al. 2017): D regresses real to 1 and fake to 0; G pulls its fakes to 1."""

from pipeline.gan.losses.base import GanLoss

LOSS = GanLoss(
    name="least_squares",
    d_real=lambda logits: ((logits - 1.0) ** 2).mean() / 2,
    d_fake=lambda logits: (logits**2).mean() / 2,
    g=lambda logits: ((logits - 1.0) ** 2).mean() / 2,
)
'''

TINY_MLP = '''"""A two-layer perceptron pair: the smallest architecture, to show what adding one takes."""

import torch
from torch import nn

from pipeline.gan.architectures.base import Architecture
from pipeline.sections import PositiveInt, Section


class TinyMlpParams(Section):
    hidden: PositiveInt = 32


class Generator(nn.Module):
    def __init__(self, latent_dim: int, hidden: int) -> None:
        super().__init__()
        self.latent_dim, self.n_classes = latent_dim, 0
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, 28 * 28), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(z).view(-1, 1, 28, 28)


class Discriminator(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(images).squeeze(1)


def from_weights(weights, model):
    hidden = int(weights["net.0.weight"].shape[0])
    latent = int(weights["net.0.weight"].shape[1])
    return model.model_copy(update={"latent_dim": latent, "tiny_mlp": TinyMlpParams(hidden=hidden)}), 0


ARCHITECTURE = Architecture(
    name="tiny_mlp",
    params=TinyMlpParams,
    generator=lambda model, *, n_classes, **levers: Generator(model.latent_dim, model.tiny_mlp.hidden),
    discriminator=lambda model, *, n_classes, **levers: Discriminator(model.tiny_mlp.hidden),
    from_weights=from_weights,
)
'''


FEATURE_NORM = '''"""The mean length of the samples' feature vectors, beside the real images' (a toy score)."""

import numpy as np

from pipeline.scoring.scores.base import Metric


def feature_norm(features, probs, reference, params):
    return {"feature_norm": float(np.linalg.norm(features, axis=1).mean() / np.linalg.norm(reference.features, axis=1).mean())}


METRIC = Metric(name="feature_norm", scalars=("feature_norm",), compute=feature_norm, order=60)
'''


def python(args: list[str], cwd: Path, code: Path) -> subprocess.CompletedProcess[str]:
    """`python -m pipeline ...` importing the package from `code` (the copy), not from this checkout."""
    env = {**stage_env(cwd), "PYTHONPATH": str(code)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def add_module(tmp_path: Path, where: str, source: str) -> Path:
    """A fresh copy of the project with one module added; asserts git sees exactly that one new file."""
    code = copy_project(tmp_path / "code")
    (code / where).write_text(source)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=code,
                            capture_output=True, text=True, check=True).stdout.splitlines()  # fmt: skip
    assert status == [f"?? {where}"]
    return code


def schema_enum(code: Path, cwd: Path, definition: str, field: str) -> list[str]:
    out = python(["-m", "pipeline", "schema"], cwd, code)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["$defs"][definition]["properties"][field]["enum"]


def test_params_name_exactly_what_the_registries_hold() -> None:
    assert get_args(TrainParams.model_fields["loss"].annotation) == tuple(LOSSES)
    assert get_args(ModelParams.model_fields["arch"].annotation) == tuple(ARCHITECTURES)
    assert get_args(DataParams.model_fields["dataset"].annotation) == (*DATASETS, OWN)
    # each architecture's own section sits under model, with its defaults
    for name, arch in ARCHITECTURES.items():
        assert getattr(ModelParams(), name) == arch.params()


def test_eval_json_lists_exactly_the_registered_scores() -> None:
    assert SCALARS + CONDITIONAL_SCALARS == tuple(key for metric in METRICS.values() for key in metric.scalars)
    assert SCALARS[:5] == ("fid", "fid_low", "fid_high", "kid_mean", "kid_std")  # the registry's order is eval.json's
    assert CONDITIONAL_SCALARS == ("label_accuracy", "fid_class_mean")  # a class-conditional generator adds these


def test_keys_that_moved_into_the_dcgan_section_keep_working(tmp_path: Path) -> None:
    flat = Params.model_validate({"model": {"dropout": 0.1, "g_channels": [8, 4]}})
    assert flat.model.dcgan.dropout == 0.1 and flat.model.dcgan.g_channels == [8, 4]
    assert flat == Params.model_validate({"model": {"dcgan": {"dropout": 0.1, "g_channels": [8, 4]}}})
    assert "model.dcgan.dropout" in flatten(flat) and "model.dropout" not in flatten(flat)
    swept = Params.model_validate({"sweep": {"space": {"model.dropout": {"low": 0.1, "high": 0.5}}}})
    assert list(swept.sweep.space) == ["model.dcgan.dropout"]
    both = Params.model_validate({"model": {"dropout": 0.1, "dcgan": {"dropout": 0.2, "bn_eps": 0.01}}})
    assert (both.model.dcgan.dropout, both.model.dcgan.bn_eps) == (0.1, 0.01)  # as `-S model.dropout=0.1` means


def test_two_modules_claiming_one_name_fail_at_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "clashing"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for module in ("a", "b"):
        (package / f"{module}.py").write_text("class Entry:\n    name = 'same'\nENTRY = Entry()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match="clashing.a and clashing.b both define 'same'"):
        discover("clashing", "ENTRY")


@pytest.mark.slow
def test_a_new_loss_is_one_module(tmp_path: Path, tracking_db: Path) -> None:
    code = add_module(tmp_path, "pipeline/gan/losses/least_squares.py", LEAST_SQUARES)
    project = with_db(make_project(tmp_path / "project", steps=4, loss="least_squares"), tracking_db)
    assert "least_squares" in schema_enum(code, project, "TrainParams", "loss")
    out = python(["-m", "pipeline", "train"], project, code)
    assert out.returncode == 0, out.stderr
    assert json.loads((project / "metrics/train.json").read_text())["step"] == 4


@pytest.mark.slow
def test_a_new_architecture_is_one_module(tmp_path: Path, tracking_db: Path) -> None:
    code = add_module(tmp_path, "pipeline/gan/architectures/tiny_mlp.py", TINY_MLP)
    project = with_db(make_project(tmp_path / "project", steps=4), tracking_db)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"] = {"arch": "tiny_mlp", "latent_dim": 12, "tiny_mlp": {"hidden": 24}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert "tiny_mlp" in schema_enum(code, project, "ModelParams", "arch")
    for args in (["train"], ["generate", "-n", "6", "--output", "six.npy"]):
        out = python(["-m", "pipeline", *args], project, code)
        assert out.returncode == 0, out.stderr
    assert np.load(project / "six.npy").shape == (6, 28, 28)
    assert os.path.getsize(project / "models/generator.pt") < 200_000  # the MLP's, not a DCGAN's
    unknown = python(["-m", "pipeline", "check-params"], project, Path(__file__).resolve().parents[1])
    assert unknown.returncode == 2 and "tiny_mlp" in unknown.stderr  # this checkout has no such architecture


@pytest.mark.slow
def test_a_new_metric_is_one_module(tmp_path: Path, tracking_db: Path) -> None:
    code = add_module(tmp_path, "pipeline/scoring/scores/feature_norm.py", FEATURE_NORM)
    project = with_db(make_eval_project(tmp_path / "project"), tracking_db)
    out = python(["-m", "pipeline", "evaluate"], project, code)
    assert out.returncode == 0, out.stderr
    scores = json.loads((project / "metrics/eval.json").read_text())
    assert scores["feature_norm"] > 0 and list(scores)[list(scores).index("coverage") + 1] == "feature_norm"
    assert "feature_norm" in out.stdout  # the printed report
