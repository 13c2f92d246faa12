"""A change of mind costs no run: earlier runs' checkpoints are kept, and switching back resumes each.

The scenario of issue 27: the default run finishes, `-S train.steps=200` trains a shorter one,
and going back finds the finished run where it stood (its outputs byte for byte), then the short
one again. The history is bounded by `train.keep_checkpoints`, the oldest removed first.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline import files
from pipeline.tracking.memory import MemoryStore
from tests.conftest import edit_params, make_project, run_here


@pytest.fixture
def train(monkeypatch: pytest.MonkeyPatch, memory_store: MemoryStore,
          capfd: pytest.CaptureFixture[str]) -> Callable[..., str]:  # fmt: skip
    """`python -m pipeline train` in this process (conftest's run_here), its runs in memory (conftest's
    memory_store): these tests follow the checkpoint files, which are the same from either; a stage process
    would spend seconds on imports and on logging its model to a store for each run of three or six steps."""

    def run(project: Path, **overrides: object) -> str:
        """Train in `project` with these train params over its own: what the stage printed."""
        edit_params(project, train=overrides)
        monkeypatch.chdir(project)
        result = run_here(capfd, "train")
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    return run


def step_of(project: Path) -> int:
    return int(files.load_checkpoint(project / "checkpoints/train.pt")["step"])


@pytest.mark.slow
def test_a_back_and_forth_of_train_steps_resumes_both_runs(tmp_path: Path, train: Callable[..., str]) -> None:
    project = make_project(tmp_path / "p", steps=6)
    train(project)
    long_run = (project / "models/generator.pt").read_bytes()

    said = train(project, steps=3)  # a shorter run: its own, from step 0
    assert "checkpoint of step 6" in said and "is kept as" in said and step_of(project) == 3
    shelved = list((project / "checkpoints/history").iterdir())
    assert len(shelved) == 1 and shelved[0].name.endswith("-step6.pt")
    short_run = (project / "models/generator.pt").read_bytes()
    assert short_run != long_run

    said = train(project, steps=6)  # back: the finished long run, not a restart from the short one
    assert "matches these params" in said and "resuming" in said and step_of(project) == 6
    assert (project / "models/generator.pt").read_bytes() == long_run

    said = train(project, steps=3)  # and again the short one, as it stood
    assert "matches these params" in said and step_of(project) == 3
    assert (project / "models/generator.pt").read_bytes() == short_run


@pytest.mark.slow
def test_the_history_keeps_at_most_keep_checkpoints(tmp_path: Path, train: Callable[..., str]) -> None:
    project = make_project(tmp_path / "p", steps=3, keep_checkpoints=2)
    for seed in range(4):  # four recipes: each fresh run shelves the one before
        train(project, seed=seed)
    kept = sorted(p.name for p in (project / "checkpoints/history").iterdir())
    assert len(kept) == 2 and step_of(project) == 3
    train(project, seed=0, keep_checkpoints=0)  # the oldest (seed 0) was dropped: a fresh run, nothing shelved
    assert len(list((project / "checkpoints/history").iterdir())) == 2
