"""dvc.yaml against the code: each stage's files are the layout's, and its deps cover the code it runs.

DVC re-runs a stage only when a dep changes. A module the stage imports but does not list
would let DVC trust stale outputs (an edit of the pixel transform leaving reference.npz as
it was), so each stage lists every `pipeline.*` module it imports, directly or not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pipeline.cli import STAGES
from pipeline.layout import Layout
from tests.conftest import ROOT

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

# Modules a stage runs but deliberately does not list. The classifier's weights are committed and
# every score records their SHA-256: an edit of a shared module (the data code, the classifier's
# network, the layout) must not retrain it, and so change every score, behind the user's back.
# `dvc repro --force classifier` retrains it on purpose.
# The same goes for the GAN registries, which params.py reads for the names of model.arch and
# train.loss (and the architectures' sections) that the classifier never uses.
REGISTRIES = {str(path.relative_to(ROOT)) for folder in ("architectures", "losses")
              for path in (ROOT / "pipeline/gan" / folder).glob("*.py")} | {"pipeline/gan/layers.py"}  # fmt: skip
NOT_LISTED = {
    "classifier": {"pipeline/data.py", "pipeline/errors.py", "pipeline/files.py", "pipeline/gan/remedies.py",
                   "pipeline/layout.py", "pipeline/machine.py", "pipeline/params.py",
                   "pipeline/scoring/frozen_classifier.py", "pipeline/registry.py", "pipeline/search_space.py",
                   "pipeline/sections.py", "pipeline/signals.py", *REGISTRIES},
}  # fmt: skip


def imported_modules(path: Path) -> set[str]:
    """The `pipeline.*` modules a source file imports anywhere (in functions too), except for type checking."""
    tree = ast.parse(path.read_text())
    skip = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for stmt in node.body
        for child in ast.walk(stmt)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("pipeline.")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pipeline":
            # `from pipeline.gan import loop` imports a module; `from pipeline.gan.loop import train` a name
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return {name for name in found if source(name).is_file()}


def source(module: str) -> Path:
    """The file of a `pipeline.*` module or package."""
    path = ROOT / module.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def registry_modules(package: str) -> set[str]:
    """A registry package's modules (pipeline/registry.py's discover finds them at run time, not by import)."""
    init = source(package)
    if init.name != "__init__.py" or "discover(" not in init.read_text():
        return set()
    return {f"{package}.{path.stem}" for path in init.parent.glob("*.py") if path.name != "__init__.py"}


def closure(module: str) -> set[str]:
    """`module` and everything it imports, transitively, as repository paths."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imported_modules(source(name)) | registry_modules(name))
    return {str(source(name).relative_to(ROOT)) for name in seen}


def is_registry(path: str) -> bool:
    return bool(registry_modules(".".join(Path(path).parent.parts)))


def stage_module(stage: str) -> str:
    command = DVC[stage]["cmd"].split()
    assert command[:3] == ["python", "-m", "pipeline"] and len(command) == 4, DVC[stage]["cmd"]
    return STAGES[command[3]][0]


def listed(entries: list[str | dict[str, object]]) -> set[str]:
    """The paths of a stage's entries, for the default dataset (DVC fills ${data.dataset} in from params.yaml)."""
    paths = {entry if isinstance(entry, str) else next(iter(entry)) for entry in entries}
    paths = {path.replace("${data.dataset}", Layout().dataset) for path in paths}
    # A code folder (a registry: every module in it is a name) covers every file in it.
    registries = {path for path in paths if path.startswith("pipeline/") and (ROOT / path).is_dir()}
    return (paths - registries) | {str(f.relative_to(ROOT)) for path in registries for f in (ROOT / path).glob("*.py")}


def test_the_import_scan_sees_lazy_imports_and_skips_type_checking_ones() -> None:
    train = imported_modules(ROOT / "pipeline/stages/train.py")
    assert {"pipeline.data", "pipeline.gan.loop", "pipeline.tracking.connection", "pipeline.scoring.scorer"} <= train
    assert "pipeline.tracking.runs" in train and "pipeline.tracking.tracker" not in train  # lazily; for type checking
    assert "pipeline.cli" not in closure("pipeline.stages.train")
    assert {"pipeline/gan/losses/bce.py", "pipeline/gan/architectures/dcgan.py"} <= closure("pipeline.stages.train")


def test_packages_hold_no_code() -> None:
    """A package's __init__.py runs with each of its modules but is not a stage's dep: it holds only its docstring."""
    for init in (ROOT / "pipeline").glob("**/__init__.py"):  # pipeline/__init__.py: the version, in no stage
        if init.parent == ROOT / "pipeline" or registry_modules(".".join(init.parent.relative_to(ROOT).parts)):
            continue  # a registry's __init__ holds the registry; stages list its whole folder
        body = ast.parse(init.read_text()).body
        assert len(body) <= 1 and all(isinstance(n, ast.Expr) for n in body), init


@pytest.mark.parametrize("stage", list(DVC))
def test_stage_deps_cover_the_code_it_runs(stage: str) -> None:
    deps = listed(DVC[stage]["deps"])
    code = {path for path in closure(stage_module(stage)) if not path.endswith("__init__.py") or is_registry(path)}
    missing = code - deps - NOT_LISTED.get(stage, set())
    assert not missing, f"stage {stage} runs {sorted(missing)} without listing it in dvc.yaml deps"
    stale = {dep for dep in deps if dep.endswith(".py")} - code
    assert not stale, f"stage {stage} lists {sorted(stale)}, which it never imports"
    assert NOT_LISTED.get(stage, set()) <= code, "the allow-list names modules the stage no longer runs"


@pytest.mark.parametrize("stage", list(DVC))
def test_stage_files_are_the_layouts(stage: str) -> None:
    paths = Layout()
    spec = DVC[stage]
    outputs = listed(spec.get("outs", [])) | listed(spec.get("metrics", [])) | listed(spec.get("plots", []))
    assert outputs == {str(path) for path in paths.outputs(stage)}
    data_deps = {dep for dep in listed(spec["deps"]) if not dep.endswith(".py")}
    assert data_deps == {str(path) for path in paths.inputs(stage)}
