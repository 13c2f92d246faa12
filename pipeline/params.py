"""Every knob of the pipeline, validated once: pydantic models and the loader of params.yaml.

This module is the only reader of params.yaml. Each stage validates the whole file
before it does anything and then receives only its own section.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from pipeline.data import DATASETS, OWN
from pipeline.errors import UserError
from pipeline.gan.architectures import ARCHITECTURES
from pipeline.gan.losses import LOSSES
from pipeline.gan.remedies import AUGMENT_CHOICES
from pipeline.search_space import SweepParams, check_space
from pipeline.sections import (
    BOOKKEEPING,
    BUDGET,
    CADENCE,
    DEVICE,
    LEVER_TYPES,
    LEVERS,
    OPTIMISER,
    RECIPE,
    Added,
    BatchSize,
    Beta,
    Device,
    LearningRate,
    NonNegativeInt,
    PositiveInt,
    Section,
    Seed,
)


def _names(registry: dict[str, Any], *more: str) -> Any:
    """A Literal of a registry's names: the schema's, the CLI's and the error messages' list of choices."""
    return Literal[(*registry, *more)]


class DataParams(Section):
    """Which images the pipeline learns: a published dataset, or your own."""

    dataset: _names(DATASETS, OWN) = "mnist"
    # own: an .npz of `images` (N, 28, 28) uint8 and `labels` (N,) in 0..K-1, or of train_*/test_* arrays
    path: str | None = None
    classes: (
        Annotated[
            list[Annotated[str, Field(min_length=1, max_length=60)]], Field(min_length=2, max_length=100)
        ]
        | None
    ) = None
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2  # own, given only images/labels: held out
    split_seed: Seed = 0


class PrepareParams(Section):
    """Where a published dataset comes from when neither data/raw/<dataset>/ nor its mirror variable has it."""

    mirrors: Annotated[list[str], Field(min_length=1)] | None = None  # None: the dataset's official mirrors
    timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0


class _ModelSection(Section):
    """The generator and discriminator: `arch` names one of pipeline/gan/architectures/, whose own sizes
    are the sub-section of the same name (`model.dcgan`); the defaults are the tutorial's DCGAN."""

    arch: str = "dcgan"  # narrowed below to the names in ARCHITECTURES
    latent_dim: PositiveInt = 100
    # Beyond the tutorial (off by default): the class label enters G (an embedding joined to z)
    # and D (a projection on its features); and spectral normalisation of D's conv and dense layers.
    conditional: bool = False
    spectral_norm: bool = False

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, raw: Any) -> Any:
        """Keys written directly under `model` that moved into an architecture's section still work, and
        win over the section's value."""
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        for name, arch in ARCHITECTURES.items():
            moved = {key: raw.pop(key) for key in arch.flat_keys if key in raw}
            if not moved:
                continue
            section = raw.get(name, {})
            if not isinstance(section, dict):
                return raw  # the section's own type error says what is wrong
            # Given both ways (`dvc exp run -S model.dropout=0.3` on a file with model.dcgan), the flat
            # key is the newer word: it wins.
            raw[name] = {**section, **moved}
        return raw

    @property
    def arch_params(self) -> Section:
        """The chosen architecture's own section."""
        return getattr(self, self.arch)  # type: ignore[no-any-return]


ModelParams = create_model(
    "ModelParams",
    __base__=_ModelSection,
    __doc__=_ModelSection.__doc__,
    __module__=__name__,
    arch=(_names(ARCHITECTURES), "dcgan"),
    **{name: (arch.params, arch.params()) for name, arch in ARCHITECTURES.items()},
)


class ClassifierParams(Section):
    """The frozen classifier of the dataset, used for every score."""

    epochs: PositiveInt | None = None  # None: the dataset's own (MNIST 4, Fashion-MNIST 12, your data 10)
    batch_size: BatchSize = 128
    lr: LearningRate = 3e-3
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 5e-4
    seed: Seed = 0
    feature_dim: PositiveInt = 128
    # The stage fails below this test accuracy; None: the dataset's own floor (MNIST 0.993,
    # Fashion-MNIST 0.93, your own data 0.9).
    min_accuracy: Annotated[float, Field(ge=0.0, le=1.0)] | None = None


# The watchdog's remedies (gan/watchdog.py applies them): D's learning rate halved; R1 on, or doubled.
WATCHDOG_REMEDIES = ("halve_lr_d", "r1")


class TrainParams(Section):
    """The training loop; defaults follow the tutorial (4000 iterations of batch 32).

    The keys stay flat (`train.lr_g`, as users type them in `-S` and `dvc exp show`); each
    carries its group, which the checkpoint and sweep fingerprints follow.
    """

    steps: Annotated[PositiveInt, BUDGET] = 4000
    batch_size: Annotated[BatchSize, RECIPE] = 32
    loss: Annotated[_names(LOSSES), RECIPE] = "bce"  # type: ignore[valid-type]  # bce: the tutorial's
    seed: Annotated[Seed, RECIPE] = 0
    lr_d: Annotated[LearningRate, OPTIMISER] = 2e-4
    lr_g: Annotated[LearningRate, OPTIMISER] = 2e-4
    beta1: Annotated[Beta, OPTIMISER] = 0.5
    beta2: Annotated[Beta, OPTIMISER] = 0.999
    # Both learning rates fall linearly towards 0 from this fraction of train.steps on; 1: constant (tutorial)
    lr_decay_from: Annotated[float, Field(ge=0.0, le=1.0), OPTIMISER] = 1.0
    # EMA of G's weights and batch-norm statistics after each G step: grids, quick FIDs, export; 0: off
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0), RECIPE] = 0.0
    # The given generator's batch norm from this many batches of 256 of its samples (gan/sampling.py); 0: off
    standing_stats: Annotated[int, Field(ge=0, le=1000), RECIPE, Added(off=0)] = 0
    # Remedies for unstable runs (gan/remedies.py), each off by default: the EMA's decay ramped up from
    # 0 over this many steps; the R1 penalty's gamma on D's real images; differentiable augmentation of
    # every image D sees ("none", a name from remedies.AUGMENTATIONS, or two in its order, joined by ",").
    ema_warmup: Annotated[NonNegativeInt, RECIPE] = 0
    r1_gamma: Annotated[float, Field(ge=0.0, le=1e4), RECIPE] = 0.0
    r1_every: Annotated[PositiveInt, RECIPE, Added(off=1)] = 1  # lazy R1: every this many steps, gamma x it
    augment: Annotated[Literal[AUGMENT_CHOICES], RECIPE] = "none"
    # The collapse watchdog (gan/watchdog.py), off by default: a quick FID above watchdog_factor x the best
    # (looked at every watchdog_every steps) or a non-finite loss goes back to the best state with the next
    # of watchdog_remedies (names from WATCHDOG_REMEDIES); the collapse after watchdog_max_rescues stops it.
    watchdog: Annotated[bool, RECIPE] = False
    watchdog_every: Annotated[PositiveInt, RECIPE] = 250
    watchdog_factor: Annotated[float, Field(gt=1.0, le=1e3), RECIPE] = 2.0
    watchdog_remedies: Annotated[str, Field(min_length=1, max_length=1000), RECIPE] = "halve_lr_d,r1"
    watchdog_max_rescues: Annotated[int, Field(ge=1, le=100), RECIPE] = 3
    device: Annotated[Device, DEVICE] = "auto"
    # Data-parallel processes that `python -m pipeline train` (and dvc repro) starts on this machine;
    # under torchrun, torchrun decides. A checkpoint resumes only with the world size that wrote it.
    nproc: Annotated[int, Field(ge=1, le=1024), DEVICE] = 1
    # CPU threads of each training process; 0: torch's own choice (one per core, or OMP_NUM_THREADS).
    # The weights depend on it (another order of float sums): jobs sharing a machine each take a share.
    threads: Annotated[int, Field(ge=0, le=1024), DEVICE] = 0
    sync_batchnorm: Annotated[bool, RECIPE] = True  # in a job on CUDA: batch norm over the global batch
    dist_timeout_s: Annotated[int, Field(ge=10, le=86_400), DEVICE] = 1800  # a rank's wait for the others
    precision: Annotated[Literal["auto", "fp32", "bf16"], LEVERS] = "auto"  # auto: bf16 autocast where native
    # Each of these three computes the same function in every form (phases of upsample+conv: 2.25x fewer
    # FLOPs, "taps": 4x fewer in CPU training; G's last conv as a 1x1 conv to its taps; NHWC); auto:
    # the faster here (gan/levers.py).
    fast_upsample: Annotated[LEVER_TYPES["fast_upsample"], LEVERS] = True
    fast_output: Annotated[LEVER_TYPES["fast_output"], LEVERS] = True
    channels_last: Annotated[LEVER_TYPES["channels_last"], LEVERS] = False
    fused_adam: Annotated[bool, LEVERS] = True  # one fused kernel for each Adam update (CUDA and CPU)
    compile: Annotated[bool, LEVERS] = False  # torch.compile the generator and discriminator
    sample_every: Annotated[PositiveInt, CADENCE] = 50
    log_every: Annotated[PositiveInt, CADENCE] = 50
    checkpoint_every: Annotated[PositiveInt, CADENCE] = 500
    # Earlier runs' checkpoints kept in checkpoints/history/ (oldest out first) to resume each later; 0: none
    keep_checkpoints: Annotated[int, Field(ge=0, le=1000), CADENCE] = 5
    fid_every: Annotated[NonNegativeInt, CADENCE] = 0  # 0 turns the quick in-training FID off
    fid_samples: Annotated[PositiveInt, CADENCE] = 2000

    @field_validator("watchdog_remedies")
    @classmethod
    def _known_remedies(cls, value: str) -> str:
        if unknown := [name for name in value.split(",") if name not in WATCHDOG_REMEDIES]:
            raise ValueError(
                f"{unknown[0]!r} is not a remedy; name them from {', '.join(WATCHDOG_REMEDIES)}, joined by "
                "commas (e.g. halve_lr_d,r1)"
            )
        return value


class EvaluateParams(Section):
    """Scoring the trained generator with the frozen classifier."""

    n_samples: Annotated[int, Field(ge=2, le=1_000_000)] = 10_000
    seed: Seed = 1234
    batch_size: BatchSize = 64  # scores do not depend on it; small batches are faster on the CPU
    fid_resamples: Annotated[int, Field(ge=2, le=10_000)] = 100  # bootstrap draws of the FID's 95 % interval
    kid_subsets: PositiveInt = 100
    kid_subset_size: PositiveInt = 1000
    is_splits: Annotated[int, Field(ge=1, le=100)] = 10
    prdc_k: Annotated[int, Field(ge=1, le=100)] = 5


class TrackingParams(Section):
    """MLflow conventions; the tracking URI itself comes from MLFLOW_TRACKING_URI."""

    experiment: Annotated[str, Field(min_length=1, max_length=200), BOOKKEEPING] = "dcgan-mnist"


class Params(Section):
    """The whole params.yaml: one section per stage plus shared ones."""

    data: DataParams = DataParams()
    prepare: PrepareParams = PrepareParams()
    model: ModelParams = ModelParams()
    classifier: ClassifierParams = ClassifierParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    tracking: TrackingParams = TrackingParams()
    sweep: SweepParams = SweepParams()

    @model_validator(mode="after")
    def _enough_samples_for_fid(self) -> Params:
        need = 2 * self.classifier.feature_dim  # see metrics.feature_stats
        if (self.train.fid_every or self.train.watchdog) and self.train.fid_samples < need:
            raise ValueError(
                f"train.fid_samples must be at least {need} (2 x classifier.feature_dim) for FID"
            )
        if self.evaluate.n_samples < need:
            raise ValueError(
                f"evaluate.n_samples must be at least {need} (2 x classifier.feature_dim) for FID"
            )
        return self

    @model_validator(mode="after")
    def _own_data_is_named(self) -> Params:
        own, data = self.data.dataset == OWN, self.data
        if own and (data.path is None or data.classes is None):
            raise ValueError(
                "data.dataset: own needs data.path (the .npz) and data.classes (the class names)"
            )
        if not own and (data.path is not None or data.classes is not None):
            raise ValueError(f"data.path and data.classes are for data.dataset: own, not {data.dataset}")
        return self

    @model_validator(mode="after")
    def _own_data_is_in_its_folder(self) -> Params:
        if self.data.path is not None and (problem := own_path_problem(self.data.path)):
            shown = repr(self.data.path)[1:-1]  # on one line, and short
            raise ValueError(f"data.path {shown if len(shown) <= 200 else shown[:197] + '...'} {problem}")
        return self

    @model_validator(mode="after")
    def _batch_splits_over_processes(self) -> Params:
        if self.train.batch_size % self.train.nproc:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} does not split evenly over "
                f"train.nproc={self.train.nproc} processes; make it a multiple of {self.train.nproc}"
            )
        return self

    @model_validator(mode="after")
    def _sweep_searches_real_params(self) -> Params:
        check_space(self)
        return self


# Your own data's folder, relative to the project root: the prepare stage's DVC dependency
# (dvc.yaml), so DVC sees a change of any file in it; data.path must name a file there.
OWN_DATA = PurePath("data", "own")


def own_path_problem(path: str) -> str | None:
    """Why `data.path`, as written, cannot be your own data (outside data/own/), or None.

    Only the words are judged here (no file is read); the prepare stage follows symlinks.
    """
    parts = PurePath(path).parts
    if PurePath(path).is_absolute() or ".." in parts or parts[: len(OWN_DATA.parts)] != OWN_DATA.parts:
        return (
            f"is outside {OWN_DATA.as_posix()}/: your own data is read only from there (the prepare "
            f"stage's DVC dependency, so DVC sees it change); put the .npz there and name it relative "
            f"to the project root, e.g. {OWN_DATA.as_posix()}/mine.npz"
        )
    if len(parts) == len(OWN_DATA.parts):
        return f"names the folder {OWN_DATA.as_posix()}/ itself, not an .npz file in it"
    return None


def _key(part: Any) -> str:
    """One key of a path, on one line and of sane length (a YAML key can hold newlines)."""
    text = repr(str(part))[1:-1]
    return text if len(text) <= 60 else text[:57] + "..."


def _short(value: Any, limit: int = 80) -> str:
    """JSON of a value from the file, cut short: YAML aliases can make one huge or endless."""

    def clip(item: Any, depth: int) -> Any:
        if isinstance(item, (list, tuple)):
            return [clip(sub, depth - 1) for sub in item[:8]] if depth else "..."
        if isinstance(item, dict):
            return {_key(k): clip(sub, depth - 1) for k, sub in list(item.items())[:8]} if depth else "..."
        return item

    text = json.dumps(clip(value, 4), default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(error: dict[str, Any]) -> str:
    """One sentence naming the key path, the bad value and what is allowed."""
    path = ".".join(_key(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        section: type[BaseModel] = Params
        parts = iter(error["loc"][:-1])
        for part in parts:
            field = section.model_fields.get(str(part))
            annotation = field.annotation if field is not None else None
            if get_origin(annotation) is dict:  # a mapping of sections (sweep.space): skip the key
                annotation = get_args(annotation)[1]
                next(parts, None)
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                break
            section = annotation
        allowed = ", ".join(section.model_fields)
        return f"unknown key '{path}' (allowed here: {allowed})"
    if error["type"] == "value_error" and not error["loc"]:  # a rule across sections
        return str(error["msg"]).removeprefix("Value error, ").rstrip(".")
    value = _short(error.get("input"))
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


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error.

    PyYAML keeps the last of two equal keys: a second `train:` section would silently
    replace the first.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"found duplicate key '{_key(key)}'", key_node.start_mark
                    )
                seen.add(key)
            except TypeError:  # unhashable: the base class says so
                break
        return super().construct_mapping(node, deep=deep)


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml; every mistake becomes a UserError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} not found: run from the project root or pass --params.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} cannot be read: {exc}.") from None
    _refuse_cut_short(path, text)
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
        if raw is None:  # an emptied file (a crash mid-write) must not silently mean the defaults
            raise UserError(
                f"{path} holds no params (it is empty or only comments); an emptied file is not "
                "taken to mean the defaults: restore it, or write `{}` to mean them."
            )
        return validate_params(raw, source=str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or "malformed YAML").split())
        raise UserError(f"{path} is not valid YAML{where}: {problem}.") from None
    except RecursionError:  # thousands of nested brackets, or an alias that contains itself
        raise UserError(f"{path} is nested too deeply (or an alias contains itself) to be params.") from None


def _refuse_cut_short(path: Path, text: str) -> None:
    """A params file cut inside a line is refused rather than read as far as it goes.

    A crash or a full disk while the file is written leaves it cut at any byte: almost always
    inside a line (`steps: 4000` cut to `steps: 40` still parses, the rest falls back to the
    defaults), which the missing final newline gives away; editors, `yaml.safe_dump` and
    `dvc exp run -S` end the file with one. (read_text has made every line end a "\n".)
    """
    if text.strip() and not text.rstrip(" \t").endswith("\n"):
        raise UserError(
            f"{path} ends inside line {len(text.splitlines())} (no newline after it), as a file cut "
            "short does; if that line is complete, end the file with a newline."
        )


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
