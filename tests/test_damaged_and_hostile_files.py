"""Broken and hostile files, and the security basics.

Each damaged file goes through the stage that reads it (`python -m pipeline <stage>`): the
stage must exit 2 with one sentence naming the file, never a traceback, never load garbage
or run code from it, and leave every other file as it was (a good file is never replaced).
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline import data, files, machine
from pipeline.data import save_prepared
from pipeline.errors import UserError
from pipeline.gan.resume import checkpoint_fingerprint
from pipeline.gan.state import new_state
from pipeline.params import load_params
from pipeline.stages.evaluate import load_samples
from tests.conftest import (
    CPU,
    ROOT,
    Payload,
    assert_refused,
    make_eval_project,
    make_project,
    run_cli,
    shared_mnist_dir,
    snapshot,
    stage_env,
    synthetic_mnist,
    with_db,
)


def with_footer(body: bytes) -> bytes:
    """Our checkpoint format around any torch.save body: the checksum an attacker can compute too."""
    return body + b"\nDCGAN-SHA256:" + hashlib.sha256(body).hexdigest().encode()


# --- checkpoints -------------------------------------------------------------------------------


def good_checkpoint(project: Path) -> tuple[Path, str]:
    """A real resume checkpoint for the project's params and data, and its fingerprint."""
    params = load_params(project / "params.yaml")
    data_hash = files.sha256_file(project / "data/prepared/mnist.npz")
    precision = machine.resolve_precision(params.train.precision, machine.pick_device(params.train.device))
    fingerprint = checkpoint_fingerprint(params, data_hash, precision)
    path = project / "checkpoints/train.pt"
    files.save_checkpoint(new_state(params.model, params.train, CPU, 10).to_checkpoint(fingerprint), path)
    return path, fingerprint


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "bit flip", "pickled payload", "our fingerprint, wrong body"])
def test_train_refuses_a_damaged_or_hostile_checkpoint(tmp_path: Path, damage: str) -> None:
    """Decision: refuse (exit 2, the file named, "delete it to start fresh") rather than start over
    silently: a checkpoint can hold days of GPU time, and only the user may throw it away."""
    project = make_project(tmp_path / "p", steps=3)
    path, fingerprint = good_checkpoint(project)
    blob = bytearray(path.read_bytes())
    marker = tmp_path / "executed"
    if damage == "truncated":
        blob = blob[: len(blob) // 2]
    elif damage == "bit flip":
        blob[len(blob) // 3] ^= 0x10
    elif damage == "pickled payload":
        buffer = io.BytesIO()
        torch.save({"fingerprint": fingerprint, "step": 1, "run_id": Payload(marker)}, buffer)
        blob = bytearray(with_footer(buffer.getvalue()))
    else:
        files.save_checkpoint({"fingerprint": fingerprint, "step": 2, "generator": {"x": torch.zeros(1)}}, path)
        blob = bytearray(path.read_bytes())
    path.write_bytes(bytes(blob))
    before = snapshot(project)

    result = run_cli(["train"], cwd=project, env=stage_env(project))
    error = assert_refused(result, "checkpoints/train.pt")
    expected = {
        "truncated": "is truncated or not one of ours; delete it to start fresh",
        "bit flip": "fails its checksum (corrupted); delete it to start fresh",
        "pickled payload": "holds something other than weights (a pickled posix.system); refusing to load it",
        "our fingerprint, wrong body": "does not fit this model",
    }[damage]
    assert expected in error
    assert not marker.exists()  # the payload never ran
    assert snapshot(project) == before  # the checkpoint is kept as it was; nothing else written
    assert not (project / "mlflow.db").exists()  # refused before any MLflow run was made


# --- datasets ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "bit flip", "labels altered"])
def test_train_refuses_a_damaged_prepared_dataset(tmp_path: Path, damage: str) -> None:
    project = make_project(tmp_path / "p", steps=3)
    good_checkpoint(project)
    prepared = project / "data/prepared/mnist.npz"
    if damage == "labels altered":  # a well-formed file whose content is wrong
        mnist = synthetic_mnist(n_train=128)
        mnist.train_labels[5] = 10
        save_prepared(mnist, prepared)
    else:
        blob = bytearray(prepared.read_bytes())
        if damage == "truncated":
            blob = blob[: len(blob) - 1000]
        else:
            blob[len(blob) // 2] ^= 0x01  # a pixel byte: only the zip CRC can tell
        prepared.write_bytes(bytes(blob))
    before = snapshot(project)
    result = run_cli(["train"], cwd=project, env=stage_env(project))
    error = assert_refused(result, "prepared dataset data/prepared/mnist.npz")
    assert "run `dvc repro prepare`" in error
    assert snapshot(project) == before and not (project / "mlflow.db").exists()


@pytest.mark.slow
def test_prepare_refuses_altered_and_truncated_raw_mnist(tmp_path: Path) -> None:
    mirror = shared_mnist_dir()
    if mirror is None:
        pytest.skip("prepare reads the real checksums; needs the offline MNIST copy")
    project = tmp_path / "p"
    project.mkdir()
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    save_prepared(synthetic_mnist(), project / "data/prepared/mnist.npz")  # an earlier output that must survive
    env = {**stage_env(project), "MNIST_MIRROR": str(mirror)}

    # Altered: a well-formed gzip whose content differs by one label.
    name = data.MNIST.files["test_labels"].name
    raw = bytearray(gzip.decompress((mirror / name).read_bytes()))
    raw[100] = (raw[100] + 1) % 10
    (project / "data/raw/mnist").mkdir(parents=True)
    (project / "data/raw/mnist" / name).write_bytes(gzip.compress(bytes(raw)))
    before = snapshot(project)
    error = assert_refused(run_cli(["prepare"], cwd=project, env=env), f"{name} from data/raw/mnist")
    assert "(corrupted or altered)" in error
    assert snapshot(project) == before

    # Truncated: an uncompressed IDX file in the mirror, cut short.
    (project / "data/raw/mnist" / name).unlink()
    other = tmp_path / "mirror"
    other.mkdir()
    for spec in data.MNIST.files.values():
        (other / spec.name).symlink_to(mirror / spec.name)
    images = data.MNIST.files["test_images"].name
    (other / images).unlink()
    (other / images.removesuffix(".gz")).write_bytes(gzip.decompress((mirror / images).read_bytes())[:-784])
    before = snapshot(project)
    error = assert_refused(run_cli(["prepare"], cwd=project, env={**env, "MNIST_MIRROR": str(other)}), images)
    assert "is truncated or padded" in error
    assert snapshot(project) == before


# --- what `evaluate` reads ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["generator bit flip", "generator pickled payload", "floors truncated"])
def test_evaluate_refuses_damaged_inputs(tmp_path: Path, damage: str, tracking_db: Path) -> None:
    project = with_db(make_eval_project(tmp_path / "p"), tracking_db)
    (project / "metrics").mkdir(exist_ok=True)
    (project / "metrics/eval.json").write_text('{"fid": 1.0}\n')  # an earlier report that must survive
    marker = tmp_path / "executed"
    generator = project / "models/generator.pt"
    if damage == "generator bit flip":
        blob = bytearray(generator.read_bytes())
        blob[len(blob) // 2] ^= 0x04
        generator.write_bytes(bytes(blob))
        names = ("models/generator.pt", "fails its checksum")
    elif damage == "generator pickled payload":
        buffer = io.BytesIO()
        torch.save({"generator": Payload(marker)}, buffer)
        generator.write_bytes(with_footer(buffer.getvalue()))
        names = ("models/generator.pt", "refusing to load it")
    else:
        (project / "metrics/reference.json").write_text('{"fid": 3.5, "kid_mean"')
        names = ("metrics/reference.json", "cannot be read as JSON")
    before = snapshot(project)
    assert_refused(run_cli(["evaluate"], cwd=project, env=stage_env(project)), *names)
    assert not marker.exists()
    assert snapshot(project) == before


@pytest.mark.slow
@pytest.mark.parametrize(
    ("array", "says"),
    [
        (np.zeros((20, 28, 28), np.uint8), "holds 20 samples; scoring needs at least 32 (2 x classifier.feature_dim)"),
        (np.full((40, 28, 28), np.nan, np.float32), "contains NaN or infinite values"),
        (np.zeros((40, 28, 27), np.uint8), "has shape (40, 28, 27); expected N x 28 x 28"),
    ],
    ids=["too few", "NaN", "wrong shape"],
)
def test_evaluate_samples_refuses_bad_files_and_keeps_the_old_report(
    tmp_path: Path, array: np.ndarray, says: str
) -> None:
    project = make_eval_project(tmp_path / "p")
    np.save(project / "mine.npy", array)
    (project / "report.json").write_text('{"fid": 12.5}\n')
    before = snapshot(project)
    args = ["evaluate", "--samples", "mine.npy", "--output", "report.json"]
    result = run_cli(args, cwd=project, env=stage_env(project))
    error = assert_refused(result, "mine.npy", says)
    assert error.count(". ") == 0  # one sentence
    assert snapshot(project) == before


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda d: np.save(d / "s.npy", np.array([Payload(d / "executed")], dtype=object), allow_pickle=True),
         "not a readable numpy file"),
        (lambda d: np.save(d / "s.npy", np.full((4, 28, 28), np.inf, np.float64)), "contains NaN or infinite"),
        (lambda d: np.save(d / "s.npy", np.ones((4, 28, 28), bool)), "has dtype bool"),
        (lambda d: np.save(d / "s.npy", np.ones((4, 28, 28), np.complex64)), "has dtype complex64"),
        (lambda d: np.savez(d / "s.npz"), "holds no arrays"),
        (lambda d: (d / "s").mkdir() or (d / "s/a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage"), "cannot be read"),
        (lambda d: (d / "s").mkdir() or [Image.fromarray(np.zeros(size, np.uint8)).save(d / f"s/{i}.png")
                                         for i, size in enumerate([(28, 28), (32, 32)])], "differs in size"),
    ],
    ids=["pickled objects", "inf", "bool", "complex", "empty npz", "corrupt png", "mixed png sizes"],
)
def test_samples_loader_refuses_hostile_and_odd_files(tmp_path: Path, make, says: str) -> None:  # type: ignore
    make(tmp_path)
    path = next(p for p in tmp_path.iterdir() if p.name.startswith("s"))
    with pytest.raises(UserError, match=re.escape(says)):
        load_samples(path)
    assert not (tmp_path / "executed").exists()


# --- security basics ---------------------------------------------------------------------------------


def calls(name: str) -> list[tuple[Path, ast.Call]]:
    """Every call of `...name(...)` in the package's source."""
    found = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called == name:
                    found.append((path, node))
    return found


def test_every_load_of_weights_or_arrays_refuses_pickled_code() -> None:
    """torch.load only with weights_only=True, np.load never with allow_pickle=True, YAML only safe_load."""
    loads = calls("load")
    torch_loads = [(path, call) for path, call in loads if ast.unparse(call.func) == "torch.load"]
    assert torch_loads, "expected the package to load weights somewhere"
    for path, call in torch_loads:
        kwargs = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert kwargs.get("weights_only") == "True", f"{path.name}:{call.lineno} torch.load without weights_only=True"
    for path, call in loads:
        kwargs = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert kwargs.get("allow_pickle", "False") == "False", f"{path.name}:{call.lineno}"
    for name in ("unsafe_load", "full_load", "loads"):
        for path, call in calls(name):
            assert ast.unparse(call.func) not in {"yaml.unsafe_load", "yaml.full_load", "pickle.loads"}, path
    for path, call in loads:
        assert ast.unparse(call.func) != "pickle.load", f"{path.name}:{call.lineno}"
        if ast.unparse(call.func) == "yaml.load":  # only with a SafeLoader (a subclass may add checks)
            loader = {k.arg: k.value for k in call.keywords}.get("Loader")
            module = importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
            name = ast.unparse(loader) if loader is not None else "Loader missing"
            found = getattr(yaml, name[5:]) if name.startswith("yaml.") else getattr(module, name, None)
            assert isinstance(found, type) and issubclass(found, yaml.SafeLoader), f"{path.name}:{call.lineno}"


def test_output_paths_stay_inside_the_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "p"
    (project / "sub").mkdir(parents=True)
    (project / "escape").symlink_to(tmp_path, target_is_directory=True)
    monkeypatch.chdir(project)
    for fine in ("r.json", "sub/r.json", "sub/../r.json", str(project / "r.json")):
        assert files.inside_project(Path(fine)) == Path(fine)
    for outside in ("../r.json", "sub/../../r.json", str(tmp_path / "r.json"), "/etc/passwd", "escape/r.json"):
        with pytest.raises(UserError, match=r"is outside the project .*; pass --allow-outside to write there anyway"):
            files.inside_project(Path(outside))
        assert files.inside_project(Path(outside), allow_outside=True) == Path(outside)


@pytest.mark.slow
def test_cli_writes_outside_the_project_only_when_told(tmp_path: Path, tracking_db: Path) -> None:
    project = with_db(make_eval_project(tmp_path / "p"), tracking_db)
    env = stage_env(project)
    np.save(project / "mine.npy", synthetic_mnist(n_train=64).train_images)
    outside = tmp_path / "elsewhere.json"
    for args in (["evaluate", "--samples", "mine.npy", "--output", "../elsewhere.json"],
                 ["schema", "--output", str(outside)]):  # fmt: skip
        assert_refused(run_cli(args, cwd=project, env=env), "is outside the project", "--allow-outside")
        assert not outside.exists()
    result = run_cli(["evaluate", "--samples", "mine.npy", "--output", "../elsewhere.json", "--allow-outside"],
                     cwd=project, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert '"n_samples": 64' in outside.read_text()


def test_servers_listen_on_loopback_by_default() -> None:
    """The only servers the project tells users to start are MLflow's; both bind 127.0.0.1 unless asked."""
    import click
    from mlflow.cli import cli

    for name in ("server", "ui"):  # `mlflow ui` is an alias of `mlflow server`
        command = cli.get_command(click.Context(cli), name)
        (host,) = [p for p in command.params if p.name == "host"]
        assert host.default == "127.0.0.1", (name, host.default)
    # Nothing in the project binds every interface or tells users to.
    docs = sorted((ROOT / "docs").glob("*.md"))
    assert docs, "the docs the README links to are missing"
    texts = [ROOT / "README.md", *docs, ROOT / "dvc.yaml", *sorted(ROOT.glob(".ci/*"))]
    texts += sorted((ROOT / "pipeline").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    for path in texts:
        text = path.read_text()
        assert "0.0.0.0" not in text and "::/0" not in text, path
        for host in re.findall(r"--host[ =](\S+)", text):
            assert host.strip("`'\"") in ("127.0.0.1", "localhost"), (path, host)
