"""The collapse watchdog (gan/watchdog.py): a run driven to collapse is caught, rolled back and rescued.

The judge is the real one: the quick FID of the frozen MNIST classifier (the committed one) against
real MNIST test images, of a small generator trained on real MNIST images at a high learning rate
(its quick FID falls from about 7,300 to 2,000 in 125 steps). The collapse is made on purpose: at
COLLAPSE_AT, G's output layer is redrawn as large noise, and its quick FID jumps to several times
its best. (A hundredfold lr_d stalls a generator this small, its quick FID flat at its best, rather
than collapsing it within the few hundred steps a test can afford; the watchdog acts on what the
judge sees, whatever the cause.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from pipeline import files
from pipeline.data import MNIST, Dataset, fetch_dataset, load_prepared, save_prepared
from pipeline.errors import UserError
from pipeline.gan import loop
from pipeline.gan.loop import Callbacks, Diverged, train
from pipeline.gan.state import TrainState, new_state
from pipeline.gan.watchdog import Collapsed, Event
from pipeline.params import ModelParams, Params, TrainParams
from pipeline.scoring.frozen_classifier import Classifier, classify, load_classifier
from pipeline.scoring.scorer import Scorer, compute_reference
from pipeline.tracking.memory import MemoryStore
from tests.conftest import CPU, ROOT, SMALL_MODEL, assert_same_weights, shared_mnist_dir

COMMITTED = ROOT / "models/classifier-mnist.pt"
COLLAPSE_AT, JUDGED = 149, 150  # the fault, and the watchdog's next look (a step later: G would mend it)
STEPS = 200
WATCH = {"watchdog": True, "watchdog_every": 25, "fid_samples": 256}
TRAIN = {"batch_size": 32, "lr_d": 1e-3, "lr_g": 1e-3, "log_every": 25, "sample_every": 1000, "checkpoint_every": 1000,
         "device": "cpu", **WATCH}  # fmt: skip


@pytest.fixture(scope="module")
def mnist(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    prepared = ROOT / "data/prepared/mnist.npz"
    if prepared.is_file():
        return load_prepared(prepared)
    if (mirror := shared_mnist_dir()) is None:
        pytest.skip("needs real MNIST (data/prepared/mnist.npz or the offline copy)")
    return fetch_dataset(MNIST, tmp_path_factory.mktemp("raw"), str(mirror), [], 30.0)


@pytest.fixture(scope="module")
def scorer(mnist: Dataset) -> Scorer:
    """The committed classifier with a reference of 1,000 real test images."""
    classifier, sha = load_classifier(COMMITTED, Classifier().feature_dim, CPU)
    features, _ = classify(classifier, mnist.test_images[:1000], 256, CPU)
    return Scorer(classifier, sha, compute_reference(features, mnist.test_labels[:1000], sha), CPU)


def collapse_once(monkeypatch: pytest.MonkeyPatch, at: int = COLLAPSE_AT, how: str = "noise") -> list[int]:
    """From now on, the first time a step starts at step `at`, G collapses: its output layer redrawn as
    large noise (noise), or its dense layer made NaN (nan). Returns the steps it fired at."""
    step_fn, fired = loop.train_step, []

    def faulty(state: TrainState, *args: Any, **kwargs: Any) -> torch.Tensor:
        if state.step == at and not fired:
            fired.append(state.step)
            with torch.no_grad():
                if how == "noise":
                    last = [w for name, w in state.generator.named_parameters() if name.endswith("weight")][-1]
                    last.copy_(torch.randn(last.shape, generator=torch.Generator().manual_seed(0)) * 10)
                else:
                    state.generator.dense.weight.fill_(float("nan"))
        return step_fn(state, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", faulty)
    return fired


class Judged:
    """Callbacks with the real judge; what it judged and the rescues."""

    def __init__(self, scorer: Scorer, params: TrainParams) -> None:
        self.fids: list[tuple[int, float]] = []
        self.events: list[Event] = []
        full = Params(model=ModelParams(**SMALL_MODEL), train=params)

        def on_watch(state: TrainState) -> float:
            fid = scorer.watch(state.output, full)["fid"]
            self.fids.append((state.step, fid))
            return fid

        self.callbacks = Callbacks(on_watch=on_watch, on_rescue=self.events.append)


def run(mnist: Dataset, scorer: Scorer, steps: int = STEPS, state: TrainState | None = None, **train_params: Any
        ) -> tuple[TrainState, Judged]:  # fmt: skip
    params = TrainParams(**{**TRAIN, **train_params, "steps": steps})
    model = ModelParams(**SMALL_MODEL)
    state = state or new_state(model, params, CPU, 10)
    judged = Judged(scorer, params)
    images = torch.from_numpy(mnist.train_images[:4096])
    train(state, images, params, model.latent_dim, judged.callbacks, labels=torch.from_numpy(mnist.train_labels[:4096]))
    return state, judged


def weights(state: TrainState) -> dict[str, torch.Tensor]:
    return {**state.generator.state_dict(), **{f"D.{k}": v for k, v in state.discriminator.state_dict().items()}}


@pytest.fixture(scope="module")
def collapsed(mnist: Dataset, scorer: Scorer) -> tuple[TrainState, Judged]:
    """The run collapsed at COLLAPSE_AT, uninterrupted to STEPS (the watchdog's work)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        fired = collapse_once(monkeypatch)
        state, judged = run(mnist, scorer)
    assert fired == [COLLAPSE_AT]
    return state, judged


def test_a_collapse_is_caught_rolled_back_to_the_best_state_and_rescued(collapsed: tuple[TrainState, Judged]) -> None:
    state, judged = collapsed
    (event,) = judged.events
    best_step, best = min(((step, fid) for step, fid in judged.fids if step <= COLLAPSE_AT), key=lambda item: item[1])
    seen = dict(judged.fids[: judged.fids.index(next(f for f in judged.fids if f[0] == JUDGED)) + 1])
    assert event.step == JUDGED and event.back_to == best_step and event.remedy == "halve_lr_d"
    assert seen[JUDGED] > 2 * best, judged.fids  # the collapse the judge saw (about 3x its best)
    assert event.reason == f"quick FID {seen[JUDGED]:.1f} > 2 x the best {best:.1f} (step {best_step})"
    # Rescued: trained on from the best state to the end, no later look above the factor.
    after = [fid for step, fid in judged.fids[len(seen) :]]
    assert state.step == STEPS and after and max(after) <= 2 * best, judged.fids
    assert [row[0] for row in state.history] == list(range(1, STEPS + 1))  # the collapsed steps replaced
    assert [group["lr"] for group in state.opt_d.param_groups] == [TRAIN["lr_d"] / 2]  # the remedy
    assert state.watch is not None and state.watch.events == [event]


def test_the_watchdog_changes_no_number_until_it_acts(mnist: Dataset, scorer: Scorer) -> None:
    watched, judged = run(mnist, scorer, steps=75)
    plain, _ = run(mnist, scorer, steps=75, watchdog=False)
    assert judged.events == [] and [step for step, _ in judged.fids] == [25, 50, 75]
    assert_same_weights(weights(watched), weights(plain))
    assert watched.history == plain.history


def test_a_run_resumed_after_a_rollback_is_the_uninterrupted_run(
    mnist: Dataset, scorer: Scorer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    collapsed: tuple[TrainState, Judged],
) -> None:  # fmt: skip
    uninterrupted, _ = collapsed
    collapse_once(monkeypatch)
    saved = tmp_path / "train.pt"
    first, _ = run(mnist, scorer, steps=JUDGED + 25)
    assert first.watch is not None and len(first.watch.events) == 1
    files.save_checkpoint(first.to_checkpoint("fp"), saved)
    resumed = new_state(ModelParams(**SMALL_MODEL), TrainParams(**TRAIN), CPU, 10)
    torch.manual_seed(12345)  # overwritten by the checkpoint's
    resumed.restore(files.load_checkpoint(saved))
    assert resumed.watch is not None and resumed.watch.events == first.watch.events
    assert resumed.watch.best_step == first.watch.best_step and resumed.watch.remedies == ["halve_lr_d"]
    assert [group["lr"] for group in resumed.opt_d.param_groups] == [TRAIN["lr_d"] / 2]
    finished, _ = run(mnist, scorer, state=resumed)
    assert_same_weights(weights(finished), weights(uninterrupted))
    assert finished.history == uninterrupted.history


def test_non_finite_weights_are_rolled_back_instead_of_ending_the_run(
    mnist: Dataset, scorer: Scorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    collapse_once(monkeypatch, how="nan")
    state, judged = run(mnist, scorer, steps=JUDGED + 25)
    (event,) = judged.events
    assert event.step == JUDGED and event.reason == "a loss or weight is no longer finite"  # at its log step
    assert state.step == JUDGED + 25 and torch.isfinite(state.generator.dense.weight).all()
    collapse_once(monkeypatch, how="nan")
    with pytest.raises(Diverged, match=f"training diverged at step {COLLAPSE_AT + 1}"):
        run(mnist, scorer, steps=JUDGED, watchdog=False)


def test_each_rescue_takes_the_next_remedy_and_the_last_one_stops_with_one_sentence(mnist: Dataset) -> None:
    params = TrainParams(**{**TRAIN, "steps": 200, "watchdog_max_rescues": 2})
    model = ModelParams(**SMALL_MODEL)
    state = new_state(model, params, CPU, 10)
    verdicts = iter([10.0, 9.0] + [50.0] * 20)  # a judge that sees a collapse at every look after the 2nd
    events: list[Event] = []
    callbacks = Callbacks(on_watch=lambda s: next(verdicts), on_rescue=events.append)
    with pytest.raises(Collapsed) as caught:
        train(state, torch.from_numpy(mnist.train_images[:512]), params, model.latent_dim, callbacks)
    assert [(e.step, e.back_to, e.remedy) for e in events] == [(75, 50, "halve_lr_d"), (75, 50, "r1")]
    assert str(caught.value) == (
        "training collapsed at step 75 (quick FID 50.0 > 2 x the best 9.0 (step 50)) after 2 rescue(s) "
        "(halve_lr_d, r1); the best quick FID was 9.0 at step 50. Lower train.lr_d, raise train.r1_gamma, "
        "or allow more rescues (train.watchdog_max_rescues)."
    )
    assert state.watch is not None and state.watch.training_remedies(params).r1_gamma == 0.1  # R1 switched on
    assert [group["lr"] for group in state.opt_d.param_groups] == [TRAIN["lr_d"] / 2]
    # A collapse at the first look has no good state to go back to.
    with pytest.raises(Collapsed, match=r"^training collapsed at step 25 \(quick FID nan\) before the watchdog's first"):
        train(new_state(model, params, CPU, 10), torch.from_numpy(mnist.train_images[:512]), params, model.latent_dim,
              Callbacks(on_watch=lambda s: float("nan")))  # fmt: skip


def stage_project(project: Path, mnist: Dataset, train: dict[str, Any]) -> Path:
    """A project for the train stage: 4,096 real training images, the committed classifier, a reference
    of 1,000 real test images, the small model and `train`."""
    from tests.conftest import write_reference

    subset = Dataset(mnist.train_images[:4096], mnist.train_labels[:4096], mnist.test_images[:1000], mnist.test_labels[:1000])
    save_prepared(subset, project / "data/prepared/mnist.npz")
    (project / "models").mkdir(parents=True)
    (project / "models/classifier-mnist.pt").write_bytes(COMMITTED.read_bytes())
    write_reference(project, subset)
    (project / "params.yaml").write_text(yaml.safe_dump({"model": SMALL_MODEL, "train": train}))
    return project


def test_the_train_stage_logs_each_rescue_to_mlflow_and_the_bar(
    tmp_path: Path, mnist: Dataset, monkeypatch: pytest.MonkeyPatch, memory_store: MemoryStore,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from pipeline.stages import train as stage

    project = stage_project(tmp_path / "p", mnist, {**TRAIN, "steps": JUDGED + 50})
    collapse_once(monkeypatch)
    monkeypatch.chdir(project)
    stage.main(project / "params.yaml")
    info = json.loads((project / "models/train_run.json").read_text())
    data = memory_store.runs[info["run_id"]]
    assert data.status == "FINISHED"
    assert data.tags["watchdog.rescues"] == "1"
    sentence = data.tags["watchdog.rescue_1"]
    assert sentence.startswith(f"watchdog rescue 1 at step {JUDGED}: quick FID ") and sentence.endswith("remedy halve_lr_d")
    assert data.metrics["watchdog_rescue"] == [(JUDGED, 1.0)]
    back_to = int(sentence.split("back to step ")[1].split(",")[0])
    looks = [step for step, _ in data.metrics["watchdog_fid"]]
    assert looks == [*range(25, JUDGED + 1, 25), *range(back_to + 25, JUDGED + 51, 25)]  # after the rollback again
    assert sentence in capsys.readouterr().out  # written above the progress bar
    log = np.loadtxt(project / "metrics/train_log.csv", delimiter=",", skiprows=1)
    assert log[:, 0].tolist() == list(range(1, JUDGED + 51))  # the run that was kept
    assert data.metrics["g_loss"][-1][0] == JUDGED + 50

    # A store that lost the run (a server back with an empty one): resend gives the watchdog's looks and
    # rescue to the run that stands in for it, as the stage logged them; a second resend sends nothing.
    from pipeline.stages import resend
    from pipeline.tracking import runs

    monkeypatch.setattr(runs, "BACKEND", fresh := MemoryStore())
    resend.resend(project / "params.yaml")
    resend.resend(project / "params.yaml")
    (again,) = fresh.runs.values()
    assert again.tags["resent_from"] == info["run_id"]
    watched = {key: values for key, values in data.metrics.items() if key.startswith("watchdog_")}
    assert len(watched) == 4 and {key: again.metrics[key] for key in watched} == watched
    assert {key: again.tags[key] for key in ("watchdog.rescues", "watchdog.rescue_1")} == {
        "watchdog.rescues": "1", "watchdog.rescue_1": sentence}  # fmt: skip
    assert capsys.readouterr().out.endswith("holds everything; nothing re-sent.\n")
    (project / "metrics/train_watchdog.json").write_text('{"looks": [], "rescue": []}')
    with pytest.raises(UserError, match=r"train_watchdog.json is not the train stage's watchdog record; train again"):
        resend.resend(project / "params.yaml")


def test_a_run_killed_after_a_look_and_resumed_logs_each_look_once(
    tmp_path: Path, mnist: Dataset, monkeypatch: pytest.MonkeyPatch, memory_store: MemoryStore
) -> None:
    """Killed at step 80, after the look at 75 but before a checkpoint (50, 100): the resumed run trains
    51-80 again and looks at 75 again, the same look bit for bit on the CPU, which MLflow holds already."""
    from pipeline.stages import train as stage

    project = stage_project(tmp_path / "p", mnist, {**TRAIN, "steps": 100, "checkpoint_every": 50})
    step_fn = loop.train_step

    def killed_at_80(state: TrainState, *args: Any, **kwargs: Any) -> torch.Tensor:
        if state.step == 80:
            raise KeyboardInterrupt
        return step_fn(state, *args, **kwargs)

    monkeypatch.chdir(project)
    monkeypatch.setattr(loop, "train_step", killed_at_80)
    with pytest.raises(KeyboardInterrupt):
        stage.main(project / "params.yaml")
    monkeypatch.setattr(loop, "train_step", step_fn)
    stage.main(project / "params.yaml")
    (data,) = memory_store.runs.values()
    assert data.status == "FINISHED"
    looks = {key: values for key, values in data.metrics.items() if key.startswith("watchdog_")}
    assert looks and all([step for step, _ in values] == [25, 50, 75, 100] for values in looks.values()), looks
    record = json.loads((project / "metrics/train_watchdog.json").read_text())["looks"]
    assert [row["step"] for row in record] == [25, 50, 75, 100]


def test_a_sweep_trial_logs_each_rescue_as_the_train_stage_does(
    scorer: Scorer, memory_store: MemoryStore, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.stages import sweep
    from pipeline.tracking import runs

    run = runs.open_run("1", "trial 3", {})
    event = Event(number=1, step=JUDGED, reason="quick FID 6,149.0 above 2 x the best", back_to=125, remedy="r1")
    callbacks = sweep.watching(scorer, Params(train=TrainParams(**TRAIN)), run, 3)
    callbacks["on_rescue"](event)
    (data,) = memory_store.runs.values()
    assert data.tags["watchdog.rescues"] == "1" and data.tags["watchdog.rescue_1"] == event.sentence()
    assert data.metrics["watchdog_rescue"] == [(JUDGED, 1.0)]
    assert f"trial 3: {event.sentence()}" in capsys.readouterr().out
