"""The registry's champion: one version per training run, the alias only ever to a strictly better FID
under the same classifier and N (with intervals: one wholly below the champion's), and concurrent
evaluations that cannot both win."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

from pipeline.tracking import connection, registry

EXPERIMENT = "reg-test"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)  # connect() sets it: put it back after
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return connection.connect(tmp_path, uri, EXPERIMENT)


class Constant:  # the registry does not look inside the model: the smallest pyfunc will do
    def predict(self, context: object, model_input: list[object]) -> list[object]:
        return model_input


def logged_run(experiment_id: str) -> tuple[str, str]:
    """A finished run with a logged model: its run id and model URI."""
    import mlflow
    from mlflow.pyfunc import PythonModel

    model = type("ConstantModel", (Constant, PythonModel), {})()
    with mlflow.start_run(experiment_id=experiment_id) as run:
        info = mlflow.pyfunc.log_model(name="generator", python_model=model)
    return run.info.run_id, info.model_uri


def score(fid: float, n: int = 1000, sha: str = "a" * 64) -> registry.Score:
    return registry.Score(fid, 1.0, n, sha)


def test_the_champion_moves_only_to_a_strictly_better_comparable_fid(store: str) -> None:
    from mlflow import MlflowClient

    runs = {name: logged_run(store) for name in "abcde"}

    def register(name: str, s: registry.Score) -> registry.Outcome:
        return registry.register(registry.model_name(EXPERIMENT), runs[name][0], runs[name][1], s)

    assert register("a", score(10.0)).promoted  # the first scored version
    assert register("b", score(5.0)).promoted  # better
    assert not register("c", score(7.0)).promoted  # worse
    assert not register("d", score(5.0)).promoted  # a tie does not move it
    assert not register("e", score(1.0, n=500)).promoted  # better, but at another N: not comparable
    assert not register("e", score(4.0, sha="b" * 64)).promoted  # another classifier: not comparable
    again = register("b", score(5.0))  # a re-evaluation: the same version, still the champion
    assert (again.version, again.champion, again.promoted) == ("2", "2", False)
    client = MlflowClient()
    name = registry.model_name(EXPERIMENT)
    assert len(client.search_model_versions(f"name = '{name}'")) == 5  # one version per training run
    champion = client.get_model_version_by_alias(name, registry.CHAMPION)
    assert champion.run_id == runs["b"][0] and champion.tags["fid"] == "5.0"
    # e was scored at N=500 and then with another classifier: both FIDs stay on its version
    tags = client.get_model_version(name, register("e", score(1.0, n=500)).version).tags
    assert tags["fid/n_samples:500/classifier:aaaaaaaaaaaa"] == "1.0" and tags["fid/n_samples:1000/classifier:bbbbbbbbbbbb"] == "4.0"
    assert [m.name for m in client.search_registered_models()] == [name]  # no lock left behind
    shown = registry.champion(name)
    assert (shown["version"], shown["uri"]) == ("2", f"models:/{name}@champion")


def test_the_champion_moves_only_when_the_intervals_do_not_overlap(store: str) -> None:
    """A lower FID whose 95 % interval reaches into the champion's is noise: the alias stays, and says so."""
    runs = {name: logged_run(store) for name in "abcd"}
    name = registry.model_name(EXPERIMENT)

    def register(run: str, fid: float, low: float, high: float) -> registry.Outcome:
        s = registry.Score(fid, 1.0, 1000, "a" * 64, (low, high))
        return registry.register(name, runs[run][0], runs[run][1], s)

    assert register("a", 10.0, 9.0, 11.0).promoted
    within = register("b", 9.5, 8.6, 10.4)  # lower, but its upper end is above the champion's lower end
    assert not within.promoted and "within the noise" in within.reason and within.champion == "1"
    assert not register("c", 9.0, 8.0, 9.0).promoted  # touching is overlapping
    better = register("d", 8.0, 7.0, 8.9)
    assert better.promoted and "beats version 1's 10 [9, 11]" in better.reason
    shown = registry.champion(name)
    assert (shown["fid_low"], shown["fid_high"]) == ("7.0", "8.9")
    assert shown["fid_interval/n_samples:1000/classifier:aaaaaaaaaaaa"] == "[7.0, 8.9]"


def _register_in_process(uri: str, run_id: str, model_uri: str, fid: float, start: float, out: object) -> None:
    import time

    import mlflow

    mlflow.set_tracking_uri(uri)
    time.sleep(max(0.0, start - time.time()))  # every process decides at the same moment
    outcome = registry.register(registry.model_name(EXPERIMENT), run_id, model_uri, score(fid))
    out.put((fid, outcome.promoted))  # type: ignore[attr-defined]


def test_concurrent_evaluations_cannot_both_win(store: str, tmp_path: Path) -> None:
    import time

    import mlflow
    from mlflow import MlflowClient

    uri = mlflow.get_tracking_uri()
    first = logged_run(store)
    registry.register(registry.model_name(EXPERIMENT), *first, score(50.0))  # the champion to beat
    fids = [30.0, 20.0, 40.0, 10.0]
    runs = [logged_run(store) for _ in fids]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start = time.time() + 8  # after the spawned interpreters have imported everything
    procs = [ctx.Process(target=_register_in_process, args=(uri, *run, fid, start, out)) for run, fid in zip(runs, fids, strict=True)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
        assert proc.exitcode == 0
    results = dict(out.get(timeout=10) for _ in procs)
    name = registry.model_name(EXPERIMENT)
    champion = MlflowClient().get_model_version_by_alias(name, registry.CHAMPION)
    # Each decided against the champion of its moment, under the lock: 10.0 always won, and no worse
    # FID that decided after it could take the alias back (without the lock, one could).
    assert float(champion.tags["fid"]) == 10.0 and results[10.0] is True
    assert [m.name for m in MlflowClient().search_registered_models()] == [name]


def test_the_lock_is_taken_when_its_holder_lets_go_mid_attempt(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race CI met under load: our insert of the lock fails on its name, and before the store reads
    the holder back the holder releases it, so the store answers RESOURCE_DOES_NOT_EXIST. That is a free
    lock, not an error: take it."""
    import os

    from mlflow import MlflowClient
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    client = MlflowClient()
    name = registry.model_name(EXPERIMENT)
    lock = f"{name}.lock"
    client.create_registered_model(lock, tags={"owner": "another-process", "since": "1e18"})  # held, not stale
    original = SqlAlchemyStore.get_registered_model
    released = []

    def holder_lets_go_first(self: SqlAlchemyStore, model_name: str) -> object:
        if model_name == lock and not released:  # the read-back right after our failed insert
            released.append(True)
            self.delete_registered_model(lock)
        return original(self, model_name)

    monkeypatch.setattr(SqlAlchemyStore, "get_registered_model", holder_lets_go_first)
    with registry.decision_lock(client, name, timeout_s=30):
        assert released and client.get_registered_model(lock).tags["owner"].endswith(f":{os.getpid()}")
    assert not client.search_registered_models(f"name = '{lock}'")  # released after the decision
