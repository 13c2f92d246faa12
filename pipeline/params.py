"""Every knob of the pipeline, validated once: pydantic models and the loader of params.yaml.

This module is the only reader of params.yaml. Each stage validates the whole file
before it does anything and then receives only its own section.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import UserError

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
Probability = Annotated[float, Field(ge=0.0, lt=1.0)]
LearningRate = Annotated[float, Field(gt=0.0, le=1.0)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
Device = Literal["auto", "cpu", "cuda", "mps"]


class Section(BaseModel):
    """Base for every section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class PrepareParams(Section):
    """Where MNIST comes from when neither data/raw/mnist/ nor MNIST_MIRROR has it."""

    mirrors: list[str] = Field(
        default=[
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ],
        min_length=1,
    )
    timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0


class ModelParams(Section):
    """Architecture of the tutorial's DCGAN; the defaults are the tutorial's model."""

    latent_dim: PositiveInt = 100
    g_dense_channels: PositiveInt = 128  # Dense(latent -> C*7*7), reshaped to C x 7 x 7
    g_channels: Annotated[list[PositiveInt], Field(min_length=2, max_length=2)] = [128, 64]
    d_channels: Annotated[list[PositiveInt], Field(min_length=4, max_length=4)] = [
        32,
        64,
        128,
        256,
    ]
    dropout: Probability = 0.25
    leaky_slope: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    bn_momentum: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.8  # Keras convention
    bn_eps: Annotated[float, Field(gt=0.0, le=0.1)] = 1e-3  # Keras default


class ClassifierParams(Section):
    """The frozen MNIST classifier used for every score."""

    epochs: PositiveInt = 4
    batch_size: PositiveInt = 128
    lr: LearningRate = 3e-3
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 5e-4
    seed: Seed = 0
    feature_dim: PositiveInt = 128
    min_accuracy: Annotated[float, Field(ge=0.0, le=1.0)] = 0.993


class TrainParams(Section):
    """The training loop; defaults follow the tutorial (4000 iterations of batch 32)."""

    steps: PositiveInt = 4000
    batch_size: PositiveInt = 32
    lr_d: LearningRate = 2e-4
    lr_g: LearningRate = 2e-4
    beta1: Beta = 0.5
    beta2: Beta = 0.999
    seed: Seed = 0
    device: Device = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    fast_upsample: bool = True  # upsample+conv computed by phases: same function, 2.25x fewer FLOPs
    channels_last: bool = False  # NHWC memory format for the conv nets
    fused_adam: bool = False  # one fused kernel for each Adam update (CUDA and CPU)
    compile: bool = False  # torch.compile the generator and discriminator
    sample_every: PositiveInt = 50
    log_every: PositiveInt = 50
    checkpoint_every: PositiveInt = 500
    fid_every: NonNegativeInt = 0  # 0 turns the quick in-training FID off
    fid_samples: PositiveInt = 2000


class EvaluateParams(Section):
    """Scoring the trained generator with the frozen classifier."""

    n_samples: Annotated[int, Field(ge=2, le=1_000_000)] = 10_000
    seed: Seed = 1234
    batch_size: PositiveInt = 1000
    kid_subsets: PositiveInt = 100
    kid_subset_size: PositiveInt = 1000
    is_splits: Annotated[int, Field(ge=1, le=100)] = 10
    prdc_k: Annotated[int, Field(ge=1, le=100)] = 5


class TrackingParams(Section):
    """MLflow conventions; the tracking URI itself comes from MLFLOW_TRACKING_URI."""

    experiment: Annotated[str, Field(min_length=1, max_length=200)] = "dcgan-mnist"


class Params(Section):
    """The whole params.yaml: one section per stage plus shared ones."""

    prepare: PrepareParams = PrepareParams()
    model: ModelParams = ModelParams()
    classifier: ClassifierParams = ClassifierParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    tracking: TrackingParams = TrackingParams()

    @model_validator(mode="after")
    def _enough_samples_for_fid(self) -> Params:
        need = 2 * self.classifier.feature_dim  # see metrics.feature_stats
        if self.train.fid_every and self.train.fid_samples < need:
            raise ValueError(f"train.fid_samples must be at least {need} (2 x classifier.feature_dim) for FID")
        if self.evaluate.n_samples < need:
            raise ValueError(f"evaluate.n_samples must be at least {need} (2 x classifier.feature_dim) for FID")
        return self


def _describe(error: dict[str, Any]) -> str:
    """One sentence naming the key path, the bad value and what is allowed."""
    path = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        section: type[BaseModel] = Params
        for part in error["loc"][:-1]:
            field = section.model_fields.get(str(part))
            if field is None or not isinstance(field.annotation, type):
                break
            section = field.annotation
        allowed = ", ".join(section.model_fields)
        return f"unknown key '{path}' (allowed here: {allowed})"
    if error["type"] == "value_error" and not error["loc"]:  # a rule across sections
        return str(error["msg"]).removeprefix("Value error, ").rstrip(".")
    value = json.dumps(error.get("input"), default=str)
    return f"'{path}' = {value} is invalid: {error['msg'][0].lower()}{error['msg'][1:]}"


def validate_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate an already-parsed params mapping; raise UserError with one sentence."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source} must be a mapping of sections, got {type(raw).__name__}.")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise UserError(f"{source}: {_describe(errors[0])}{more}.") from None


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml; every mistake becomes a UserError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} not found: run from the project root or pass --params.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} cannot be read: {exc}.") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise UserError(f"{path} is not valid YAML{where}: {problem}.") from None
    return validate_params(raw, source=str(path))


def flatten(params: Params) -> dict[str, str]:
    """Dotted keys exactly as `dvc exp show` names them (lists stay one value)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        else:
            flat[prefix] = json.dumps(value) if isinstance(value, list) else str(value)

    walk("", params.model_dump(mode="json"))
    return flat


def json_schema() -> dict[str, Any]:
    """JSON schema of params.yaml, for editors (yaml-language-server)."""
    schema = Params.model_json_schema()
    schema["title"] = "DCGAN MNIST pipeline params.yaml"
    return schema
