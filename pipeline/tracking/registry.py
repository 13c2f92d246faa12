"""The MLflow Model Registry: every evaluated training run's generator, and the `champion`.

`evaluate` registers the generator a training run logged as a version of the registered model
`<experiment>-generator` with its FID, floor, N and classifier hash as version tags. A version
holds exactly the weights its FID was measured on: versions are keyed by the SHA-256 of those
weights (logged_model.TENSORS_SHA_TAG), so a re-evaluation of the same weights updates its version's
tags and an extended run, whose new weights were logged as a new model, gets a new version. The
SHA-256 of the weights file recorded when the model was logged is copied onto the version:
`generate --model` checks the file against it. The alias `champion` then moves to it only on a
real gain under the same classifier and N: the upper end of its FID's 95 % interval below the
lower end of the champion's (an FID without an interval counts as a point). A better FID within
the noise, a worse, tied or incomparable one leaves the alias where it is. Deciding that is
read-compare-write, so it runs under a lock that MLflow itself provides: creating a registered
model whose name is taken fails, on SQLite and on a tracking server alike, so of two concurrent
evaluations one decides first and the other compares against its result.

`python -m pipeline champion` (stages/champion.py) prints the champion.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
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
    interval: tuple[float, float] | None = None  # the FID's 95 % interval (fid_low, fid_high)

    @property
    def key(self) -> str:
        """The tag that holds the FID under this classifier and N: versions compare only through it."""
        return f"fid/n_samples:{self.n_samples}/classifier:{self.classifier_sha256[:12]}"

    @property
    def interval_key(self) -> str:
        return self.key.replace("fid/", "fid_interval/", 1)

    @property
    def bounds(self) -> tuple[float, float]:
        """The interval, or the FID itself at both ends where it has none."""
        return self.interval or (self.fid, self.fid)

    def tags(self) -> dict[str, str]:
        """The latest evaluation's figures, plus the FID and its interval under their own keys (kept when
        another N comes later)."""
        interval = (
            {}
            if self.interval is None
            else {"fid_low": repr(self.interval[0]), "fid_high": repr(self.interval[1])}
        )
        keyed = {} if self.interval is None else {self.interval_key: json.dumps(list(self.interval))}
        return {
            "fid": repr(self.fid),
            **interval,
            "fid_floor": "" if self.fid_floor is None else repr(self.fid_floor),
            "n_samples": str(self.n_samples),
            "classifier_sha256": self.classifier_sha256,
            self.key: repr(self.fid),
            **keyed,
        }


def _champion_bounds(champion: Any, score: Score) -> tuple[float, float, str]:
    """The champion's FID interval at `score`'s N and classifier, and the text that shows it."""
    best = float(champion.tags[score.key])
    try:
        low, high = (float(v) for v in json.loads(champion.tags.get(score.interval_key, "")))
    except (ValueError, TypeError):  # scored before intervals were recorded: a point
        return best, best, f"{best:.4g}"
    return low, high, f"{best:.4g} [{low:.4g}, {high:.4g}]"


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
            client.create_registered_model(
                lock,
                tags={"owner": f"{socket.gethostname()}:{os.getpid()}", "since": repr(time.time())},
                description="Held while an evaluation decides the champion.",
            )
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


def version_of(
    client: Any, name: str, run_id: str, model_uri: str, weights: Mapping[str, str] | None
) -> Any | None:
    """The version of `name` that holds these weights of run `run_id` (without `weights`: that holds `model_uri`)."""
    from pipeline.tracking.logged_model import TENSORS_SHA_TAG

    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if weights:
        found = [v for v in found if v.tags.get(TENSORS_SHA_TAG) == weights[TENSORS_SHA_TAG]]
    else:
        found = [v for v in found if v.source == model_uri]
    return max(found, key=lambda v: int(v.version), default=None)


def register(
    name: str, run_id: str, model_uri: str, score: Score, weights: Mapping[str, str] | None = None
) -> Outcome:
    """Register (or re-tag) the run's generator as a version of `name` and decide the champion (module docstring).

    `weights`: the SHA-256 tags of the model's weights file and tensors (tracking.ARTIFACT_SHA_TAG,
    TENSORS_SHA_TAG), which the version keeps.
    """
    from mlflow.exceptions import MlflowException

    client = _client()
    with contextlib.suppress(MlflowException):  # exists already: fine
        client.create_registered_model(
            name,
            description="DCGAN generators, one version per evaluated set of "
            "weights; the alias 'champion' marks the best FID.",
        )
    version = version_of(client, name, run_id, model_uri, weights)
    if version is None:
        # A tracking server refuses a `models:/<model id>` source unless model_id names it (SQLite does not).
        model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
        version = client.create_model_version(
            name, model_uri, run_id=run_id, tags=dict(weights or {}), model_id=model_id
        )
    for key, value in score.tags().items():
        client.set_model_version_tag(name, version.version, key, value)

    with decision_lock(client, name):
        try:
            champion = client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            champion = None
        promote, reason = decide(champion, version.version, run_id, score, weights)
        if promote:
            client.set_registered_model_alias(name, CHAMPION, version.version)
    return Outcome(
        str(version.version), str(version.version if promote else champion.version), promote, reason
    )


def decide(
    champion: Any, version: str, run_id: str, score: Score, weights: Mapping[str, str] | None
) -> tuple[bool, str]:
    """Whether `version` (of `run_id`, scored `score`) takes the alias from `champion` (None: no champion
    yet), and why in a few words. Only a comparable (same N, same classifier) FID whose interval lies
    wholly below the champion's wins."""
    from pipeline.tracking.logged_model import ARTIFACT_SHA_TAG

    if champion is None:
        return True, "the first scored version"
    if champion.version == version:
        return False, "it is the champion"
    best = champion.tags.get(score.key)
    if best is None:
        return False, (
            f"the champion (version {champion.version}) has no FID at N={score.n_samples} "
            f"with classifier {score.classifier_sha256[:12]} to compare with"
        )
    if (
        weights
        and not champion.tags.get(ARTIFACT_SHA_TAG)
        and champion.run_id == run_id
        and score.fid <= float(best)
    ):
        return True, (
            f"FID {score.fid:.4g} matches version {champion.version}'s {float(best):.4g}, "
            "whose weights, logged by older code, cannot be verified"
        )
    low, _, shown = _champion_bounds(champion, score)
    mine = f"{score.fid:.4g}" + (
        "" if score.interval is None else f" [{score.bounds[0]:.4g}, {score.bounds[1]:.4g}]"
    )
    if score.bounds[1] < low:
        return True, f"FID {mine} beats version {champion.version}'s {shown}"
    if score.fid < float(best):
        return False, f"FID {mine} is within the noise of version {champion.version}'s {shown}"
    return False, f"FID {mine} does not beat version {champion.version}'s {shown}"


def champion(name: str) -> dict[str, Any]:
    """The champion of registered model `name`: version, run, scores, URI."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        raise UserError(
            f"registered model {name} has no champion yet; run `dvc repro` (or evaluate) first."
        ) from None
    run = client.get_run(version.run_id) if version.run_id else None
    return {
        "model": name,
        "version": str(version.version),
        "uri": f"models:/{name}@{CHAMPION}",
        "run_id": version.run_id,
        "run_name": run.info.run_name if run else "",
        **dict(version.tags),
    }
