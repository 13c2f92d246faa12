"""`python -m pipeline <stage>` and the `dcgan` console script: one subcommand per stage."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from pipeline.errors import UserError

# subcommand -> (module whose main() runs it, one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "check-params": (
        "pipeline.stages.check_params",
        "validate params.yaml (DVC's first stage: a mistake stops it before any output goes)",
    ),
    "prepare": ("pipeline.stages.prepare", "fetch, verify and decode MNIST into data/prepared/"),
    "classifier": ("pipeline.stages.classifier", "train the frozen MNIST classifier used for every score"),
    "reference": (
        "pipeline.stages.reference",
        "cache the real-data features and the real-vs-real score floors",
    ),
    "train": ("pipeline.stages.train", "train the DCGAN; resumes from checkpoints/train.pt; logs to MLflow"),
    "evaluate": (
        "pipeline.stages.evaluate",
        "score the generator (or --samples FILE) with the frozen classifier",
    ),
    "sweep": (
        "pipeline.stages.sweep",
        "Optuna search over params.yaml's sweep.space; each trial an MLflow child run",
    ),
    "generate": (
        "pipeline.stages.generate",
        "draw samples from a trained generator (DVC output, an MLflow run or the registry)",
    ),
    "serve": (
        "pipeline.stages.serve",
        "answer HTTP requests for samples of the registry's champion (or any generator)",
    ),
    "champion": (
        "pipeline.stages.champion",
        "print the registry's champion generator: version, FID, training run",
    ),
    "ui": (
        "pipeline.stages.ui",
        "the MLflow UI on this project's runs: the table sorted by FID, scores and key params",
    ),
}


RESEND_HELP = (
    "after a tracking outage, send MLflow the finished training run's params, metrics, images and model"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcgan", description="DCGAN on MNIST: the stages of the DVC pipeline and helpers."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in STAGES.items():
        stage = sub.add_parser(name, help=help_text, description=help_text)
        stage.add_argument(
            "--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)"
        )
    _sampling_options(sub.choices["generate"], sub.choices["serve"])
    evaluate, ui, sweep = sub.choices["evaluate"], sub.choices["ui"], sub.choices["sweep"]
    evaluate.add_argument(
        "--samples",
        type=Path,
        help="score these samples instead: .npy/.npz (N x 28 x 28, uint8 or [-1, 1]) or a PNG folder",
    )
    evaluate.add_argument("--output", type=Path, help="with --samples: where to write the JSON report")
    ui.add_argument(
        "--port", type=int, default=5000, help="the local MLflow UI's port (default: %(default)s)"
    )
    ui.add_argument("--open", dest="open_browser", action="store_true", help="open the address in a browser")
    sweep.add_argument(
        "--study", help="Optuna study name (default: sweep.study); a study that exists is resumed"
    )
    sweep.add_argument("--storage", help="Optuna storage URL shared by all workers (default: sweep.storage)")
    sweep.add_argument("--trials", type=int, help="trials in the whole study (default: sweep.trials)")
    schema = _helper_commands(sub)
    for writer in (evaluate, schema, sub.choices["generate"]):  # outputs stay inside the project unless told
        writer.add_argument(
            "--allow-outside", action="store_true", help="let --output name a path outside this directory"
        )
    sweep.add_argument(
        "--allow-outside",
        action="store_true",
        help="let a SQLite study (--storage or sweep.storage) live outside this directory",
    )
    return parser


def _sampling_options(generate: argparse.ArgumentParser, serve: argparse.ArgumentParser) -> None:
    """generate's and serve's: which generator, and (generate) how many samples and where to."""
    generate.add_argument("-n", type=int, default=25, help="how many samples (default: %(default)s)")
    generate.add_argument(
        "--seed", type=int, help="noise seed (default: evaluate.seed, the evaluate stage's draw)"
    )
    generate.add_argument("--run", help="the generator an MLflow training run logged (its run id)")
    generate.add_argument("--model", help="a registered model: models:/NAME@champion or models:/NAME/VERSION")
    generate.add_argument(
        "--grid", type=Path, help="a PNG grid of the first samples (the default: generated.png)"
    )
    generate.add_argument(
        "--output", type=Path, help="all samples as .npy (N x 28 x 28 uint8, for evaluate --samples)"
    )
    generate.add_argument("--folder", type=Path, help="all samples as 28x28 PNGs in this folder")
    generate.add_argument(
        "--label", help="a conditional generator: draw only this class (its number or name)"
    )
    generate.add_argument(
        "--raw", action="store_true", help="an EMA run: the trained G, not its moving average"
    )
    serve.add_argument("--run", help="serve the generator an MLflow training run logged (its run id)")
    serve.add_argument(
        "--model", help="serve a registered model (default: models:/<experiment>-generator@champion)"
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="the interface to listen on (default: %(default)s)"
    )
    serve.add_argument(
        "--port", type=int, default=8000, help="the port (default: %(default)s; 0: any free one)"
    )


def _helper_commands(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """schema, resend and summary: commands beside the stages. Returns schema's parser."""
    schema = sub.add_parser("schema", help="print the JSON schema of params.yaml (for editors)")
    schema.add_argument("--output", type=Path, help="write it to this file instead of stdout")
    resend = sub.add_parser(
        "resend",
        help=RESEND_HELP,
        description=RESEND_HELP + ". Reads the train stage's outputs; safe to run twice.",
    )
    resend.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)"
    )
    show = sub.add_parser(
        "summary", help="print the Generator and Discriminator layer tables, as the tutorial does"
    )
    show.add_argument("--params", type=Path, default=Path("params.yaml"))
    return schema


def run(args: argparse.Namespace) -> None:
    for option in ("output", "grid", "folder"):
        if getattr(args, option, None) is not None:
            from pipeline.files import inside_project

            inside_project(getattr(args, option), args.allow_outside)
    if args.command == "resend":
        from pipeline.stages.resend import resend

        resend(args.params)
        return
    if args.command == "schema":
        from pipeline.files import write_json
        from pipeline.params import json_schema

        if args.output:
            write_json(args.output, json_schema())
        else:
            print(json.dumps(json_schema(), indent=2))
        return
    if args.command == "summary":
        import torch

        from pipeline.data import class_names
        from pipeline.gan.architectures import build_discriminator, build_generator
        from pipeline.gan.summary import summary
        from pipeline.params import load_params

        params = load_params(args.params)
        model, n_classes = params.model, len(class_names(params.data))
        labels = torch.zeros(2, dtype=torch.long) if model.conditional else None
        print(summary(build_generator(model, n_classes=n_classes), (model.latent_dim,), labels))
        print()
        print(summary(build_discriminator(model, n_classes=n_classes), (1, 28, 28), labels))
        return
    module = importlib.import_module(STAGES[args.command][0])
    ignored = ("command", "params") if args.command == "sweep" else ("command", "params", "allow_outside")
    options = {key: value for key, value in vars(args).items() if key not in ignored}
    module.main(args.params, **options)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # MLflow logs each SQLAlchemy error it re-raises, traceback and all: the re-raised error is said once.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    try:
        run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (
        KeyboardInterrupt
    ) as exc:  # Ctrl-C; or a stop signal, whose signals.Stopped brings its sentence and code
        if message := getattr(exc, "message", "interrupted"):
            print(message, file=sys.stderr)
        return int(getattr(exc, "exit_code", 130))
    except Exception as exc:
        # A write that found no room outside our atomic writers (torch, PIL, MLflow): one sentence too.
        if (error := no_room_error(exc)) is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def no_room_error(exc: BaseException) -> UserError | None:
    """The sentence for `exc` when a write in it found no room (a full disk, `ulimit -f`), else None."""
    from pipeline.tracking import connection

    # The file is named in an OSError; what SQLite could not grow is MLflow's store (or a sweep's study).
    uri = connection.tracking_uri(connection.project_root(Path.cwd(), os.environ), os.environ)
    return connection.store_out_of_room(exc, uri)
