"""What an MLflow run holds already, read back by a stage that resumes it (train) or fills it in
(resend): `MlflowHistory`, the reads half of `MlflowRun` (see tracker.History)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pipeline.tracking.logged_model import ARTIFACT_SHA_TAG, TENSORS_SHA_TAG, weights_present


class MlflowHistory:
    """The reads of one MLflow run; MlflowRun adds the writes."""

    run_id: str
    experiment_id: str
    previous_status: str | None = None  # a resumed run's status before start() reopened it
    _client: Any

    def params(self) -> dict[str, str]:
        return dict(self._client.get_run(self.run_id).data.params)

    def current_params(self) -> dict[str, str]:
        """The run's params as they stand now: a param changed on a resumed run is logged as the tag
        `param_changed.<key>` (log_params), which overrides the immutable first value."""
        data = self._client.get_run(self.run_id).data
        changed = {
            key.removeprefix("param_changed."): value
            for key, value in data.tags.items()
            if key.startswith("param_changed.")
        }
        return {**dict(data.params), **changed}

    def tags(self) -> dict[str, str]:
        return dict(self._client.get_run(self.run_id).data.tags)

    def metric_steps(self, name: str) -> set[int]:
        return {metric.step for metric in self._client.get_metric_history(self.run_id, name)}

    def image_steps(self, key: str, *, drop_incomplete: bool = False) -> set[int]:
        """Steps of the images logged under `key` that are complete (the UI shows the compressed file).

        MLflow's log_image uploads the PNG first, then the compressed WEBP the UI shows: a kill
        between the two leaves a PNG that the step's next upload would duplicate. With
        `drop_incomplete`, such PNGs are deleted (from the same listing), so the step is sent again, whole.
        """
        names = {Path(a.path).name for a in self._client.list_artifacts(self.run_id, "images")}
        if drop_incomplete:
            pattern = rf"{re.escape(key)}\+step\+\d+\+.*\.png"
            orphans = [
                n for n in names if re.fullmatch(pattern, n) and f"{n[:-4]}+compressed.webp" not in names
            ]
            if orphans:
                from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

                repository = get_artifact_repository(self._client.get_run(self.run_id).info.artifact_uri)
                for name in orphans:
                    repository.delete_artifacts(f"images/{name}")
        pattern = rf"{re.escape(key)}\+step\+(\d+)\+.*\+compressed\.webp"
        return {int(found[1]) for name in names if (found := re.fullmatch(pattern, name))}

    def artifact_names(self) -> set[str]:
        return {artifact.path for artifact in self._client.list_artifacts(self.run_id)}

    def logged_models(self) -> list[Any]:
        import mlflow

        return list(
            mlflow.search_logged_models(
                experiment_ids=[self.experiment_id],
                filter_string=f"source_run_id = '{self.run_id}'",
                output_format="list",
            )
        )

    def has_model(self, tensors_sha256: str | None = None) -> bool:
        """Whether the run holds a finished logged model with its weights file (of these tensors, if given).

        A model logged by older code, without the weights file, does not count: `resend` then logs one.
        """
        for model in self.logged_models():
            if str(model.status) != "READY" or not model.tags.get(ARTIFACT_SHA_TAG):
                continue
            if tensors_sha256 is not None and model.tags.get(TENSORS_SHA_TAG) != tensors_sha256:
                continue
            if weights_present(model.artifact_location):
                return True
        return False

    def logged_steps(self, metric: str, image_key: str) -> tuple[int, set[int]]:
        """The last step of `metric` the run holds, and the steps of its complete images under
        `image_key` (the incomplete ones a kill left are deleted: see image_steps)."""
        return max(self.metric_steps(metric), default=0), self.image_steps(image_key, drop_incomplete=True)
