"""The named GAN objectives: the tutorial's BCE terms, and params that can name only what exists."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import pytest
import torch

from pipeline.errors import UserError
from pipeline.gan.losses import LOSSES
from pipeline.params import TrainParams, load_params


def test_bce_terms_are_the_tutorials_binary_cross_entropy() -> None:
    logits = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0])
    p = torch.sigmoid(logits)
    assert torch.allclose(LOSSES["bce"].d_real(logits), -torch.log(p).mean())  # label 1
    assert torch.allclose(LOSSES["bce"].d_fake(logits), -torch.log(1 - p).mean())  # label 0
    assert torch.allclose(LOSSES["bce"].g(logits), -torch.log(p).mean())  # G wants "real"
    assert LOSSES["bce"].d_real(logits).dtype == torch.float32 and LOSSES["bce"].d_real(logits).shape == ()


def test_params_name_exactly_the_losses_that_exist() -> None:
    assert set(get_args(TrainParams.model_fields["loss"].annotation)) == set(LOSSES)
    assert TrainParams().loss == "bce"


def test_an_unknown_loss_is_one_sentence(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  loss: wasserstein\n")
    with pytest.raises(UserError, match=re.escape("'train.loss' = \"wasserstein\" is invalid: input should be 'bce'")):
        load_params(path)
