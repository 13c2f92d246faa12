from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.errors import UserError
from pipeline.params import Params, flatten, json_schema, load_params
from tests.conftest import ROOT, run_cli


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_committed_params_are_the_defaults() -> None:
    assert load_params(ROOT / "params.yaml") == Params()


def test_typo_in_a_key_names_it_and_the_allowed_keys(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"unknown key 'train\.batch_sze' \(allowed here: steps, batch_size"):
        load_params(write(tmp_path, "train:\n  batch_sze: 64\n"))


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"unknown key 'trian' \(allowed here: data, prepare, model"):
        load_params(write(tmp_path, "trian:\n  steps: 1\n"))


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("train:\n  batch_size: many\n", r"'train\.batch_size' = \"many\" is invalid: input should be a valid integer"),
        ("train:\n  lr_d: -0.1\n", r"'train\.lr_d' = -0\.1 is invalid: input should be greater than 0"),
        ("train:\n  precision: fp8\n", r"'train\.precision' = \"fp8\" is invalid: input should be 'auto', 'fp32' or 'bf16'"),
        ("model:\n  dcgan:\n    d_channels: [1, 2]\n", r"'model\.dcgan\.d_channels' = \[1, 2\] is invalid: list should have at least 4"),
        ("model:\n  dropout: 1.5\n", r"'model\.dcgan\.dropout' = 1\.5 is invalid: input should be less than 1"),  # a moved key
        ("model:\n  arch: gpt\n", r"'model\.arch' = \"gpt\" is invalid: input should be 'dcgan'"),
        ("train: 5\n", r"'train' = 5 is invalid"),
        ("- a\n- b\n", r"must be a mapping of sections, got list"),
    ],
)
def test_bad_values_name_path_value_and_rule(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(UserError, match=pattern):
        load_params(write(tmp_path, text))


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"is not valid YAML at line 3, column 9: mapping values are not allowed"):
        load_params(write(tmp_path, "train:\n  steps: 1\n    lr_d: 2\n"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"not found"):
        load_params(tmp_path / "nope.yaml")


def test_an_empty_file_is_refused_and_an_empty_mapping_gives_defaults(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"holds no params \(it is empty or only comments\)"):
        load_params(write(tmp_path, ""))  # an emptied file (a crash mid-write) is not taken to mean the defaults
    assert load_params(write(tmp_path, "{}\n")) == Params()


def test_cli_reports_one_sentence_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    write(tmp_path, "train:\n  steps: 0\n")
    result = run_cli(["prepare"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "'train.steps' = 0 is invalid" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_flatten_uses_dvc_dotted_keys() -> None:
    flat = flatten(Params())
    assert flat["train.lr_g"] == "0.0002"
    assert flat["model.dcgan.d_channels"] == "[32, 64, 128, 256]"
    assert flat["tracking.experiment"] == "dcgan-mnist"


def test_committed_json_schema_is_current() -> None:
    committed = json.loads((ROOT / "params.schema.json").read_text())
    assert committed == json_schema(), "regenerate with: python -m pipeline schema --output params.schema.json"
    assert set(committed["properties"]) == set(yaml.safe_load((ROOT / "params.yaml").read_text()))


def test_rules_across_sections(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"params.yaml: train.fid_samples must be at least 256 \(2 x classifier.feature_dim\)"):
        load_params(write(tmp_path, "train:\n  fid_every: 100\n  fid_samples: 100\n"))
    with pytest.raises(UserError, match=r"evaluate.n_samples must be at least 64"):
        load_params(write(tmp_path, "classifier:\n  feature_dim: 32\nevaluate:\n  n_samples: 50\n"))


def test_params_yaml_is_written_as_dvc_writes_it(tmp_path: Path) -> None:
    """`dvc exp run -S key=value` rewrites params.yaml in its own style (blank for null, block lists):
    the committed file is already in that style, so an experiment's diff shows only the values it set."""
    from dvc.utils.hydra import apply_overrides

    copy = tmp_path / "params.yaml"
    shutil.copyfile(ROOT / "params.yaml", copy)
    apply_overrides(copy, [f"train.steps={load_params(ROOT / 'params.yaml').train.steps}"])  # a no-op -S
    assert copy.read_text() == (ROOT / "params.yaml").read_text()
