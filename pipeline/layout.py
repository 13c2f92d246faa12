"""Where every file of the pipeline lives: the one owner of paths.

The stages, the sweep and the benchmarks take their paths from a `Layout`; dvc.yaml lists
the same files as each stage's deps and outs, and a test holds the two in step
(`tests/test_dvc_yaml.py`). Paths are relative to the project root, so a stage runs from it
(as `dvc repro` does). Data files are keyed by the dataset's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path = Path(".")
    dataset: str = "mnist"

    # check-params: its stamp (a constant text) says params.yaml was valid when DVC last ran
    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    @property
    def params_checked(self) -> Path:
        return self.root / "data" / "params.checked"

    # prepare
    @property
    def own(self) -> Path:
        """Where your own data's .npz lives (data.dataset: own; the prepare stage depends on it)."""
        return self.root / "data" / "own"

    @property
    def raw(self) -> Path:
        """Verified downloads of the dataset's files (a cache, not a DVC output)."""
        return self.root / "data" / "raw" / self.dataset

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared" / f"{self.dataset}.npz"

    @property
    def data_metrics(self) -> Path:
        return self.root / "metrics" / "data.json"

    # classifier: one per dataset, committed to git for the published ones
    @property
    def classifier(self) -> Path:
        return self.root / "models" / f"classifier-{self.dataset}.pt"

    @property
    def classifier_record(self) -> Path:
        """How that classifier was made (params, data, accuracy): the stage keeps it while they match."""
        return self.root / "models" / f"classifier-{self.dataset}.json"

    @property
    def classifier_metrics(self) -> Path:
        return self.root / "metrics" / "classifier.json"

    # reference
    @property
    def reference(self) -> Path:
        return self.root / "data" / "reference" / f"{self.dataset}.npz"

    @property
    def floors(self) -> Path:
        return self.root / "metrics" / "reference.json"

    # train
    @property
    def generator(self) -> Path:
        return self.root / "models" / "generator.pt"

    @property
    def run_info(self) -> Path:
        return self.root / "models" / "train_run.json"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoints" / "train.pt"

    @property
    def train_lock(self) -> Path:
        """Held by the training of this working directory, so that a second one is refused (beside the
        checkpoint: each DVC queued experiment's workspace has its own)."""
        return self.root / "checkpoints" / "train.lock"

    @property
    def train_metrics(self) -> Path:
        return self.root / "metrics" / "train.json"

    @property
    def train_log(self) -> Path:
        return self.root / "metrics" / "train_log.csv"

    @property
    def fid_log(self) -> Path:
        return self.root / "metrics" / "train_fid.csv"

    @property
    def train_watchdog(self) -> Path:
        """The watchdog's looks and rescues (train.watchdog), what `resend` sends of them."""
        return self.root / "metrics" / "train_watchdog.json"

    @property
    def samples(self) -> Path:
        """One 5x5 grid per `train.sample_every` steps, step_000050.png ..."""
        return self.root / "samples"

    @property
    def last_samples(self) -> Path:
        return self.root / "plots" / "train_samples.png"

    # evaluate
    @property
    def eval_metrics(self) -> Path:
        return self.root / "metrics" / "eval.json"

    @property
    def class_plot(self) -> Path:
        return self.root / "plots" / "eval_classes.csv"

    @property
    def eval_samples(self) -> Path:
        return self.root / "plots" / "eval_samples.png"

    # sweep and tracking: at the repository root, shared by every experiment folder
    @property
    def sweeps(self) -> Path:
        return self.root / "sweeps"

    @property
    def optuna_db(self) -> Path:
        return self.root / "optuna.db"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    def inputs(self, stage: str) -> tuple[Path, ...]:
        """The files a DVC stage reads (its deps besides code)."""
        return {
            "check-params": (self.params_file,),
            "prepare": (self.own, self.params_checked),
            "classifier": (self.prepared,),
            "reference": (self.prepared, self.classifier),
            "train": (self.prepared, self.classifier, self.reference),  # the last two for the quick FID
            # the prepared data for its test labels (a conditional generator's per-class FID)
            "evaluate": (
                self.generator,
                self.run_info,
                self.classifier,
                self.reference,
                self.prepared,
                self.floors,
            ),
        }[stage]

    def outputs(self, stage: str) -> tuple[Path, ...]:
        """The files a DVC stage writes (its outs, metrics and plots)."""
        return {
            "check-params": (self.params_checked,),
            "prepare": (self.prepared, self.data_metrics),
            "classifier": (self.classifier, self.classifier_record, self.classifier_metrics),
            "reference": (self.reference, self.floors),
            # (not the resume checkpoint: it is this machine's state, never shared or pulled)
            "train": (
                self.generator,
                self.run_info,
                self.train_metrics,
                self.train_log,
                self.fid_log,
                self.train_watchdog,
                self.samples,
                self.last_samples,
            ),
            "evaluate": (self.eval_metrics, self.class_plot, self.eval_samples),
        }[stage]
