"""Stage `train`: the tutorial's DCGAN training loop, written out once.

Each step, as in the Keras tutorial: draw a random batch of real images and a batch of
fakes from fresh noise; train D on the real batch (label 1), then on the fake batch
(label 0), two optimiser steps as the tutorial's two `train_on_batch` calls; then train
G through D with the label "real". The generator runs once per step: its output feeds
D's fake update (detached) and then G's update.

The core, `train()`, does no file or MLflow I/O: it reports through callbacks, which
main() wires to DVC outputs and MLflow. Host-device synchronisation happens only at
logging points (every `log_every` steps), where the per-step losses collected on the
device are copied out in one go.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import data, runtime
from pipeline.errors import UserError
from pipeline.models import Discriminator, Generator, build_discriminator, build_generator
from pipeline.params import ModelParams, Params, TrainParams, flatten, load_params

LOG_COLUMNS = ("d_loss", "d_acc", "g_loss")
GRID = 5  # the tutorial's 5x5 sample grid

GENERATOR = Path("models/generator.pt")
RUN_INFO = Path("models/train_run.json")
CHECKPOINT = Path("checkpoints/train.pt")
METRICS = Path("metrics/train.json")
LOG = Path("metrics/train_log.csv")
FID_LOG = Path("metrics/train_fid.csv")
CLASSIFIER = Path("models/classifier.pt")
REFERENCE = Path("data/reference/reference.npz")
SAMPLES_DIR = Path("samples")
LAST_SAMPLES = Path("plots/train_samples.png")


def metric_rows(rows: list[tuple[int, float, float, float]]) -> list[dict[str, float]]:
    """History rows (step, d_loss, d_acc, g_loss) as the per-step metric dicts MLflow gets."""
    return [dict(zip(("step", *LOG_COLUMNS), row, strict=True)) for row in rows]


class Diverged(UserError):
    """A non-finite loss or weight: training stops, the last good checkpoint is kept."""


ADVICE = "lower the learning rates (train.lr_d / train.lr_g); the last good checkpoint is kept."


@dataclass
class TrainState:
    """Everything a run needs to continue bit-identically after a restart."""

    generator: Generator
    discriminator: Discriminator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    step: int = 0
    history: list[tuple[int, float, float, float]] = field(default_factory=list)  # (step, d_loss, d_acc, g_loss)
    fid_history: list[tuple[int, float]] = field(default_factory=list)  # (step, quick FID)
    run_id: str | None = None

    def to_checkpoint(self, fingerprint: str) -> dict[str, Any]:
        return {
            "format": 1,
            "fingerprint": fingerprint,
            "step": self.step,
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "history": torch.tensor(self.history, dtype=torch.float64).reshape(-1, 1 + len(LOG_COLUMNS)),
            "fid_history": torch.tensor(self.fid_history, dtype=torch.float64).reshape(-1, 2),
            "run_id": self.run_id or "",
        }

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.generator.load_state_dict(ckpt["generator"])
        self.discriminator.load_state_dict(ckpt["discriminator"])
        self.opt_g.load_state_dict(ckpt["opt_g"])
        self.opt_d.load_state_dict(ckpt["opt_d"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if ckpt["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
        self.step = int(ckpt["step"])
        self.history = [(int(r[0]), *map(float, r[1:])) for r in ckpt["history"].tolist()]
        self.fid_history = [(int(step), float(fid)) for step, fid in ckpt["fid_history"].tolist()]
        self.run_id = ckpt["run_id"] or None


def new_state(model: ModelParams, params: TrainParams, device: torch.device) -> TrainState:
    """Seeded models and the tutorial's Adam optimisers, with the speed levers of `params`."""
    runtime.seed_everything(params.seed)
    memory_format = torch.channels_last if params.channels_last else torch.contiguous_format
    generator = build_generator(model, params.fast_upsample, params.fast_output).to(device, memory_format=memory_format)
    discriminator = build_discriminator(model).to(device, memory_format=memory_format)
    adam = {"betas": (params.beta1, params.beta2), "fused": params.fused_adam or None}
    return TrainState(
        generator,
        discriminator,
        torch.optim.Adam(generator.parameters(), lr=params.lr_g, **adam),
        torch.optim.Adam(discriminator.parameters(), lr=params.lr_d, **adam),
    )


def fixed_noise(latent_dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """The 25 latent vectors every sample grid is drawn from (its own RNG: training is unaffected)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(GRID * GRID, latent_dim, generator=gen).to(device)


@torch.no_grad()
def sample_grid(generator: Generator, noise: torch.Tensor) -> np.ndarray:
    """A 5x5 grid (uint8, H x W) of samples in inference mode, as the tutorial's save_imgs."""
    was_training = generator.training
    generator.eval()
    pixels = data.from_model(generator(noise)).cpu().numpy()  # (25, 28, 28) uint8
    generator.train(was_training)
    return data.make_grid(pixels, GRID)


def train_step(
    state: TrainState, real: torch.Tensor, z: torch.Tensor, autocast: contextlib.AbstractContextManager[Any]
) -> torch.Tensor:
    """One tutorial iteration; returns (d_loss, d_acc, g_loss) as a device tensor, no sync."""
    G, D = state.generator, state.discriminator
    ones = torch.ones(real.shape[0], device=real.device)
    zeros = torch.zeros_like(ones)
    with autocast:
        fake = G(z)  # (B, 1, 28, 28), reused by both updates below

    # D on the real batch (label 1), then on the fake batch (label 0): two Adam steps.
    state.opt_d.zero_grad(set_to_none=True)
    with autocast:
        logits_real = D(real).float()
        loss_real = F.binary_cross_entropy_with_logits(logits_real, ones)
    loss_real.backward()
    state.opt_d.step()

    state.opt_d.zero_grad(set_to_none=True)
    with autocast:
        logits_fake = D(fake.detach()).float()
        loss_fake = F.binary_cross_entropy_with_logits(logits_fake, zeros)
    loss_fake.backward()
    state.opt_d.step()

    # G through the frozen D, with the label "real".
    state.opt_g.zero_grad(set_to_none=True)
    D.requires_grad_(False)
    with autocast:
        g_loss = F.binary_cross_entropy_with_logits(D(fake).float(), ones)
    g_loss.backward()
    D.requires_grad_(True)
    state.opt_g.step()

    d_acc = ((logits_real > 0).float().mean() + (logits_fake < 0).float().mean()) / 2
    return torch.stack([(loss_real + loss_fake).detach() / 2, d_acc, g_loss.detach()])


def first_non_finite(state: TrainState) -> str | None:
    """The first weight or buffer of G or D that holds NaN or inf, by name; None when all are finite."""
    named = [
        (f"{prefix}.{name}", tensor)
        for prefix, network in (("generator", state.generator), ("discriminator", state.discriminator))
        for name, tensor in network.state_dict().items()
        if tensor.is_floating_point()
    ]
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).cpu()  # one sync, not one per tensor
    return next((name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok), None)


@dataclass
class Callbacks:
    """Where train() reports; every field is optional."""

    on_log: Callable[[list[tuple[int, float, float, float]], float], None] | None = None  # rows, images/s
    on_sample: Callable[[int, np.ndarray], None] | None = None  # step, grid
    on_checkpoint: Callable[[TrainState], None] | None = None
    on_eval: Callable[[TrainState], None] | None = None  # every fid_every steps (quick FID)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if runtime.resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(
    state: TrainState,
    images: torch.Tensor,
    params: TrainParams,
    latent_dim: int,
    callbacks: Callbacks = Callbacks(),
) -> TrainState:
    """Train from `state.step` to `params.steps`. `images`: uint8 (N, 28, 28) on the device."""
    device = images.device
    autocast = _autocast(device, params.precision)
    noise = fixed_noise(latent_dim, params.seed, device)
    pending: list[tuple[int, torch.Tensor]] = []  # per-step stats still on the device
    if params.compile:  # in place: parameter names (and so checkpoints) stay the same
        state.generator.compile()
        state.discriminator.compile()
    state.generator.train()
    state.discriminator.train()
    tick, tick_step = time.perf_counter(), state.step

    def flush() -> None:
        nonlocal tick, tick_step
        if not pending:
            return
        values = torch.stack([t for _, t in pending]).cpu().tolist()  # the one sync
        rows = [(step, *map(float, v)) for (step, _), v in zip(pending, values, strict=True)]
        pending.clear()
        for step, d_loss, _, g_loss in rows:
            if not (np.isfinite(d_loss) and np.isfinite(g_loss)):
                raise Diverged(f"training diverged at step {step}: D loss {d_loss}, G loss {g_loss}; {ADVICE}")
        # Finite losses, yet the update after them can have left NaN or inf weights: such a
        # state must never be saved as the "last good" checkpoint.
        if (broken := first_non_finite(state)) is not None:
            step, d_loss, _, g_loss = rows[-1]
            raise Diverged(
                f"training diverged at step {step}: {broken} is no longer finite after D loss {d_loss}, "
                f"G loss {g_loss}; {ADVICE}"
            )
        state.history.extend(rows)
        now = time.perf_counter()
        rate = (state.step - tick_step) * params.batch_size / max(now - tick, 1e-9)
        tick, tick_step = now, state.step
        if callbacks.on_log:
            callbacks.on_log(rows, rate)

    while state.step < params.steps:
        idx = torch.randint(0, images.shape[0], (params.batch_size,), device=device)
        real = data.to_model(images[idx])  # the one pixel transform, on the device
        z = torch.randn(params.batch_size, latent_dim, device=device)
        stats = train_step(state, real, z, autocast)
        state.step += 1
        pending.append((state.step, stats))

        step = state.step
        last = step == params.steps
        if step % params.log_every == 0 or step % params.checkpoint_every == 0 or last:
            flush()
        if callbacks.on_sample and (step % params.sample_every == 0 or last):
            callbacks.on_sample(step, sample_grid(state.generator, noise))
        if callbacks.on_eval and params.fid_every and (step % params.fid_every == 0 or last):
            callbacks.on_eval(state)
        if callbacks.on_checkpoint and (step % params.checkpoint_every == 0 or last):
            callbacks.on_checkpoint(state)
    flush()
    return state


# --- the stage: files, MLflow, resume -------------------------------------------------


def checkpoint_fingerprint(params: Params, data_hash: str, precision: str) -> str:
    """What a checkpoint must match to be resumed: everything that changes the numbers.

    `steps` is left out on purpose, so a finished run can be extended; logging cadence
    and the device are left out because they do not change the trajectory (on one device).
    `precision` is the resolved one: `auto` may mean bf16 on one machine and fp32 on another.
    """
    train = params.train.model_dump(
        exclude={"steps", "log_every", "sample_every", "checkpoint_every", "fid_every", "fid_samples", "device"}
    )
    return runtime.fingerprint(params.model.model_dump(), {**train, "precision": precision}, data_hash)


def write_log(history: list[tuple[int, float, float, float]], path: Path) -> None:
    with runtime.atomic_open(path) as fh:
        fh.write("step," + ",".join(LOG_COLUMNS) + "\n")
        for step, *values in history:
            # 9 digits give back each float32 loss exactly, so `resend` can rebuild MLflow's record.
            fh.write(f"{step}," + ",".join(f"{v:.9g}" for v in values) + "\n")


def write_fid_log(fid_history: list[tuple[int, float]], path: Path) -> None:
    with runtime.atomic_open(path) as fh:
        fh.write("step,fid_quick\n" + "".join(f"{step},{float(fid)!r}\n" for step, fid in fid_history))


def for_export(model: ModelParams, weights: dict[str, torch.Tensor]) -> tuple[Generator, str, np.ndarray]:
    """The generator as MLflow gets it: on the CPU, in inference mode, with its name and an input example."""
    generator = build_generator(model)
    generator.load_state_dict({k: v.cpu() for k, v in weights.items()})
    # A batch of 8 in the example keeps the exported model's batch size dynamic.
    example = np.random.default_rng(0).standard_normal((8, model.latent_dim)).astype(np.float32)
    return generator.eval(), "generator", example


def main(params_path: Path = Path("params.yaml")) -> None:
    from tqdm import tqdm

    from pipeline import tracking

    params = load_params(params_path)
    p = params.train
    env = dict(os.environ)
    runtime.remove_stale_temps(GENERATOR, RUN_INFO, CHECKPOINT, METRICS, LOG, FID_LOG, LAST_SAMPLES, SAMPLES_DIR)
    device = runtime.pick_device(p.device)
    precision = runtime.resolve_precision(p.precision, device)
    mnist = data.load_prepared(Path("data/prepared/mnist.npz"))
    data_hash = runtime.sha256_file("data/prepared/mnist.npz")
    fingerprint = checkpoint_fingerprint(params, data_hash, precision)

    # Resume when a matching checkpoint exists; anything else starts fresh.
    state = new_state(params.model, p, device)
    if CHECKPOINT.exists():
        ckpt = runtime.load_checkpoint(CHECKPOINT, map_location=device)
        if ckpt.get("fingerprint") != fingerprint:
            print(f"{CHECKPOINT} was made with other params or data; starting fresh.")
        else:
            try:
                resumable = int(ckpt["step"]) <= p.steps
                if resumable:
                    state.restore(ckpt)
            except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as exc:
                # Our fingerprint on a body that does not fit: hand-made or from another version.
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise UserError(f"{CHECKPOINT} does not fit this model ({first}); delete it to start fresh.") from None
            if resumable:
                print(f"resuming from {CHECKPOINT} at step {state.step}")
            else:
                print(f"{CHECKPOINT} is at step {ckpt['step']}, beyond train.steps={p.steps}; starting fresh.")
    if state.step == 0:  # a fresh run: nothing from an earlier run may survive in persisted outputs
        for old in SAMPLES_DIR.glob("*.png"):
            old.unlink()
        FID_LOG.unlink(missing_ok=True)

    uri, experiment_id, root = tracking.open_experiment(params.tracking.experiment, Path.cwd(), env)
    tags = {
        **tracking.git_info(root),
        **tracking.dvc_tags(env),
        "device": runtime.device_name(device),
        "precision": precision,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "data.sha256": data_hash,
        "stage": "train",
    }
    tracker = tracking.Tracker.start(experiment_id, tracking.run_name(env), tags, resume_run_id=state.run_id)
    state.run_id = tracker.run_id
    tracker.log_params(flatten(params))
    print(f"MLflow run {tracker.run_id} in experiment '{params.tracking.experiment}' at {uri}")

    images = torch.from_numpy(mnist.train_images).to(device)
    desc = f"train [{device.type}, {precision}]"
    bar = tqdm(total=p.steps, initial=state.step, desc=desc, unit="step", dynamic_ncols=True)

    def on_log(rows: list[tuple[int, float, float, float]], rate: float) -> None:
        step, d_loss, d_acc, g_loss = rows[-1]
        bar.update(step - bar.n)
        bar.set_postfix_str(f"D loss {d_loss:.3f}, acc {100 * d_acc:.1f}% | G loss {g_loss:.3f} | {rate:,.0f} img/s")
        tracker.log_metrics(metric_rows(rows))

    def on_sample(step: int, grid: np.ndarray) -> None:
        data.save_png(grid, SAMPLES_DIR / f"step_{step:06d}.png")
        tracker.log_image(grid, key="samples", step=step)

    def on_checkpoint(s: TrainState) -> None:
        runtime.save_checkpoint(s.to_checkpoint(fingerprint), CHECKPOINT)
        write_log(s.history, LOG)

    on_eval = None
    if p.fid_every:
        from pipeline import scoring

        classifier, sha = scoring.load_classifier(CLASSIFIER, params.classifier.feature_dim, device)
        reference = scoring.load_reference(REFERENCE, classifier_sha256=sha)

        def on_eval(s: TrainState) -> None:
            # Same noise at every evaluation (own RNG: training is untouched), so the curve shows
            # the generator changing, not the draw.
            fid = scoring.generator_fid(
                s.generator, classifier, reference, p.fid_samples, p.seed, params.evaluate.batch_size, device
            )
            s.fid_history.append((s.step, fid))
            bar.write(f"step {s.step}: quick FID ({p.fid_samples} samples) {fid:.3f}")
            tracker.log_metrics([{"step": s.step, "fid_quick": fid}])
            write_fid_log(s.fid_history, FID_LOG)

    started, first_step = time.perf_counter(), state.step
    try:
        train(state, images, p, params.model.latent_dim, Callbacks(on_log, on_sample, on_checkpoint, on_eval))
    except BaseException as exc:
        bar.close()
        tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    bar.close()
    seconds = time.perf_counter() - started

    step, d_loss, d_acc, g_loss = state.history[-1]
    tail = np.array([r[1:] for r in state.history[-min(len(state.history), 100) :]])
    summary = {
        "step": step,
        "d_loss": d_loss,
        "d_acc": d_acc,
        "g_loss": g_loss,
        "d_loss_last100": float(tail[:, 0].mean()),
        "d_acc_last100": float(tail[:, 1].mean()),
        "g_loss_last100": float(tail[:, 2].mean()),
        "seconds": round(seconds, 2),
        "images_per_second": round((step - first_step) * p.batch_size / max(seconds, 1e-9), 1),  # this session's
    }
    runtime.save_checkpoint({"generator": state.generator.state_dict()}, GENERATOR)
    write_log(state.history, LOG)
    write_fid_log(state.fid_history, FID_LOG)  # header only when train.fid_every is 0
    data.save_png(sample_grid(state.generator, fixed_noise(params.model.latent_dim, p.seed, device)), LAST_SAMPLES)
    run_info = {"run_id": tracker.run_id, "experiment_id": experiment_id, "tracking_uri": uri,
                "params_sha256": runtime.fingerprint(flatten(params))}  # fmt: skip
    runtime.write_json(RUN_INFO, run_info)
    runtime.write_json(METRICS, summary)

    tracker.log_metrics([{"step": step, **{f"final_{k}": v for k, v in summary.items() if k != "step"}}])
    tracker.log_artifact(LOG)
    tracker.log_model(*for_export(params.model, state.generator.state_dict()))
    tracker.finish()
    print(
        f"step {step}: D loss {d_loss:.4f}, D acc {100 * d_acc:.1f}%, G loss {g_loss:.4f} "
        f"({seconds:.0f} s, {summary['images_per_second']:,.0f} img/s) -> {GENERATOR}"
    )
    if tracker.lost:
        print(f"warning: {tracker.lost_summary()}; the outputs are complete, and `python -m pipeline resend` "
              "sends them once the server is back.", file=sys.stderr)  # fmt: skip



def resend(params_path: Path = Path("params.yaml")) -> None:
    """`python -m pipeline resend`: give MLflow what a finished training run could not log.

    After a tracking outage the DVC outputs are complete: this sends the run's params, the
    per-step losses and quick FIDs, the final figures, the sample grids, the log and the
    model from them. What the run already holds is skipped, so it is safe to run twice.
    """
    from PIL import Image

    from pipeline import tracking

    params = load_params(params_path)
    if not (RUN_INFO.is_file() and METRICS.is_file() and LOG.is_file()):
        raise UserError(f"no finished training run here ({RUN_INFO}, {METRICS} or {LOG} is missing); train first.")
    info = runtime.read_json(RUN_INFO)
    flat = flatten(params)
    if info.get("params_sha256", runtime.fingerprint(flat)) != runtime.fingerprint(flat):
        raise UserError(
            f"{params_path} changed since run {info['run_id']} was trained; restore it to re-send that run."
        )
    uri, experiment_id, _ = tracking.open_experiment(params.tracking.experiment, Path.cwd(), dict(os.environ))

    def table(path: Path) -> list[list[str]]:
        return [line.split(",") for line in path.read_text().splitlines()[1:] if line] if path.is_file() else []

    # The losses were float32 on the device: the CSV's 9 digits give back exactly what was logged.
    rows: list[dict[str, float]] = [
        {"step": int(step), **{k: float(np.float32(v)) for k, v in zip(LOG_COLUMNS, values, strict=True)}}
        for step, *values in table(LOG)
    ]
    rows += [{"step": int(step), "fid_quick": float(fid)} for step, fid in table(FID_LOG)]
    summary = runtime.read_json(METRICS)
    rows.append({"step": summary["step"], **{f"final_{k}": v for k, v in summary.items() if k != "step"}})
    grid_size = data.make_grid(np.zeros((1, data.IMAGE_SIZE, data.IMAGE_SIZE), np.uint8), GRID).shape[0]
    images = {}
    for path in sorted(SAMPLES_DIR.glob("step_*.png")):
        big = np.asarray(Image.open(path).convert("L"))
        images[int(path.stem.removeprefix("step_"))] = big[:: big.shape[0] // grid_size, :: big.shape[1] // grid_size]

    def model() -> tuple[Generator, np.ndarray]:
        network, _, example = for_export(params.model, runtime.load_checkpoint(GENERATOR)["generator"])
        return network, example

    run_id, sent = tracking.backfill(
        experiment_id, info["run_id"], {"stage": "train"}, flat, rows, images, "samples", [LOG], model
    )
    if run_id != info["run_id"]:
        print(f"run {info['run_id']} is not in {uri}; its record goes to run {run_id}.")
    what = ", ".join(f"{n} {kind}" for kind, n in sent.items() if n)
    if what:
        print(f"re-sent to MLflow run {run_id}: {what}.")
    else:
        print(f"MLflow run {run_id} holds everything; nothing re-sent.")
