"""The MLflow Model Registry: every evaluated training run's generator, and the `champion`.

`evaluate` registers the generator a training run logged as a version of the registered model
`<experiment>-generator` (one version per training run; a re-evaluation updates its tags)
with its FID, floor, N and classifier hash as version tags. The alias `champion` then moves to
it only if it scored strictly better than the champion under the same classifier and N: never
to a worse, tied or incomparable one. Deciding that is read-compare-write, so it runs under a
lock that MLflow itself provides: creating a registered model whose name is taken fails, on
SQLite and on a tracking server alike, so of two concurrent evaluations one decides first and
the other compares against its result.

`python -m pipeline champion` prints the champion.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

CHAMPION = "champion"
LOCK_STALE_S = 300.0  # a lock older than this was left by a killed process


def model_name(experiment: str, dataset: str = "mnist") -> str:
    """`<experiment>-generator` for MNIST, `<experiment>-<dataset>-generator` for the others."""
    return f"{experiment}-generator" if dataset == "mnist" else f"{experiment}-{dataset}-generator"


@dataclass(frozen=True)
class Score:
    """What a version is ranked by, and what makes two rankings comparable."""

    fid: float
    fid_floor: float | None
    n_samples: int
    classifier_sha256: str

    @property
    def key(self) -> str:
        """The tag that holds the FID under this classifier and N: versions compare only through it."""
        return f"fid/n_samples:{self.n_samples}/classifier:{self.classifier_sha256[:12]}"

    def tags(self) -> dict[str, str]:
        """The latest evaluation's figures, plus the FID under its own key (kept when another N comes later)."""
        return {"fid": repr(self.fid), "fid_floor": "" if self.fid_floor is None else repr(self.fid_floor),
                "n_samples": str(self.n_samples), "classifier_sha256": self.classifier_sha256,
                self.key: repr(self.fid)}  # fmt: skip


@dataclass(frozen=True)
class Outcome:
    version: str
    champion: str  # the champion's version after the decision
    promoted: bool
    reason: str  # why the alias moved or stayed, for the user


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def _code(exc: BaseException) -> str:
    return str(getattr(exc, "error_code", ""))


@contextlib.contextmanager
def decision_lock(client: Any, name: str, timeout_s: float = 120.0) -> Iterator[None]:
    """Hold `<name>.lock` (a registered model that exists only while one process decides)."""
    from mlflow.exceptions import MlflowException

    lock = f"{name}.lock"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(lock, tags={"owner": f"{socket.gethostname()}:{os.getpid()}",
                                                       "since": repr(time.time())},
                                           description="Held while an evaluation decides the champion.")  # fmt: skip
            break
        except MlflowException as exc:
            # Held by another process; or held until just now: the store's insert failed on the name,
            # and the lock was gone by the time it read the holder back (RESOURCE_DOES_NOT_EXIST). Retry.
            if not any(code in _code(exc) for code in ("ALREADY_EXISTS", "DOES_NOT_EXIST")):
                raise
        with contextlib.suppress(MlflowException):  # a lock left by a killed process: take it over
            since = float(client.get_registered_model(lock).tags.get("since", "inf"))
            if time.time() - since > LOCK_STALE_S:
                client.delete_registered_model(lock)
                continue
        if time.monotonic() > deadline:
            raise UserError(f"the registry lock {lock} was held for {timeout_s:.0f} s; run evaluate again.")
        time.sleep(0.2)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock)


def version_of_run(client: Any, name: str, run_id: str) -> Any | None:
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return found[0] if found else None


def register(name: str, run_id: str, model_uri: str, score: Score) -> Outcome:
    """Register (or re-tag) the run's generator as a version of `name` and decide the champion (module docstring)."""
    from mlflow.exceptions import MlflowException

    client = _client()
    with contextlib.suppress(MlflowException):  # exists already: fine
        client.create_registered_model(name, description="DCGAN generators, one version per evaluated training run; "
                                                         "the alias 'champion' marks the best FID.")  # fmt: skip
    version = version_of_run(client, name, run_id)
    if version is None:
        version = client.create_model_version(name, model_uri, run_id=run_id)
    for key, value in score.tags().items():
        client.set_model_version_tag(name, version.version, key, value)

    with decision_lock(client, name):
        try:
            champion = client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            champion = None
        best = champion.tags.get(score.key) if champion is not None else None
        if champion is None:
            promote, reason = True, "the first scored version"
        elif champion.version == version.version:
            promote, reason = False, "it is the champion"
        elif best is None:
            promote, reason = False, (f"the champion (version {champion.version}) has no FID at N={score.n_samples} "
                                      f"with classifier {score.classifier_sha256[:12]} to compare with")  # fmt: skip
        elif score.fid < float(best):
            promote, reason = True, f"FID {score.fid:.4g} beats version {champion.version}'s {float(best):.4g}"
        else:
            promote, reason = False, f"FID {score.fid:.4g} does not beat version {champion.version}'s {float(best):.4g}"
        if promote:
            client.set_registered_model_alias(name, CHAMPION, version.version)
    return Outcome(str(version.version), str(version.version if promote else champion.version), promote, reason)


def champion(name: str) -> dict[str, Any]:
    """The champion of registered model `name`: version, run, scores, URI."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        raise UserError(f"registered model {name} has no champion yet; run `dvc repro` (or evaluate) first.") from None
    run = client.get_run(version.run_id) if version.run_id else None
    return {
        "model": name, "version": str(version.version), "uri": f"models:/{name}@{CHAMPION}",
        "run_id": version.run_id, "run_name": run.info.run_name if run else "", **dict(version.tags),
    }  # fmt: skip


def main(params_path: Path = Path("params.yaml")) -> None:
    """`python -m pipeline champion`: the best generator so far, with its scores and run."""
    from pipeline import tracking
    from pipeline.params import load_params

    params = load_params(params_path)
    uri, _, _ = tracking.open_experiment(params.tracking.experiment, Path.cwd(), dict(os.environ))
    found = champion(model_name(params.tracking.experiment, params.data.dataset))
    floor = f" (real-data floor {float(found['fid_floor']):.4g})" if found.get("fid_floor") else ""
    print(f"champion: {found['model']} version {found['version']} -> {found['uri']}")
    print(f"  FID {float(found['fid']):.4f}{floor} at N={found['n_samples']}, "
          f"classifier {found['classifier_sha256'][:12]}")  # fmt: skip
    print(f"  from training run {found['run_name'] or '?'} ({found['run_id']}) in {tracking.redact(uri)}")
    print(f"  draw from it: python -m pipeline generate --model {found['uri']}")
