"""Stage `train`: the tutorial's DCGAN training loop, written out once.

Each step, as in the Keras tutorial: draw a random batch of real images and a batch of
fakes from fresh noise; train D on the real batch (label 1), then on the fake batch
(label 0), two optimiser steps as the tutorial's two `train_on_batch` calls; then train
G through D with the label "real". The generator runs once per step: its output feeds
D's fake update (detached) and then G's update.

Beyond the tutorial, each off by default (see params.py): an EMA of G's weights, updated
after every G step, is what the grids, the quick FID and the exported generator use; a
conditional pair gets each real image's label, and the fakes the real batch's labels.

A SIGTERM, SIGINT or SIGHUP while training (a scheduler's time limit, Ctrl-C, `docker stop`)
stops it at the next step (a job: the next logging step) with that step's checkpoint, from
which the same command resumes bit-identically (see run()); one training at a time runs in a
working directory (see main()).

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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline import data, distributed, runtime
from pipeline.distributed import World
from pipeline.errors import UserError
from pipeline.layout import Layout
from pipeline.losses import LOSSES, GanLoss
from pipeline.models import Discriminator, Generator, build_discriminator, build_generator
from pipeline.params import BUDGET, CADENCE, DEVICE, ModelParams, Params, TrainParams, flatten, load_params, values_without

if TYPE_CHECKING:
    from pipeline.tracking import MlflowRun

LOG_COLUMNS = ("d_loss", "d_acc", "g_loss")
GRID = 5  # the tutorial's 5x5 sample grid
Row = tuple[int, float, float, float]  # (step, d_loss, d_acc, g_loss)


def metric_rows(rows: list[Row]) -> list[dict[str, float]]:
    """History rows as the per-step metric dicts the tracker gets."""
    return [dict(zip(("step", *LOG_COLUMNS), row, strict=True)) for row in rows]


# What the tracker gets of metrics/train.json, as `final_*` metrics at the last step: the means a
# person compares across runs (the last step's own losses are already on their curves).
FINAL = ("d_loss_last100", "d_acc_last100", "g_loss_last100", "images_per_second")


def summary_row(summary: dict[str, Any]) -> dict[str, float]:
    """metrics/train.json as the tracker's `final_*` metrics, at the last step."""
    return {"step": summary["step"], **{f"final_{k}": summary[k] for k in FINAL}}


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
    history: list[Row] = field(default_factory=list)
    fid_history: list[tuple[int, float]] = field(default_factory=list)  # (step, quick FID)
    run_id: str | None = None
    # The random states of every rank of a distributed job at the last checkpoint, gathered by
    # train(); a single process has only its own, read when the checkpoint is written.
    rank_rngs: list[dict[str, Any]] = field(default_factory=list)
    ema: AveragedModel | None = None  # with train.ema_decay: the moving average of G (batch norm included)
    # Every sample grid so far (uint8, H x W), by step: a resumed run writes again those whose files are
    # gone, as samples/ is a DVC output that a finished run must be able to give back.
    grids: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def output(self) -> Generator:
        """The generator the run gives: the EMA of G when there is one, else G."""
        return self.ema.module if self.ema is not None else self.generator

    def to_checkpoint(self, fingerprint: str) -> dict[str, Any]:
        rngs = self.rank_rngs or [rng_state()]
        return {
            "format": 1,
            "fingerprint": fingerprint,
            "step": self.step,
            "world_size": len(rngs),
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "rng_cpu": rngs[0]["cpu"],  # rank 0's (the only one of a plain run)
            "rng_cuda": rngs[0]["cuda"],
            "rng_ranks": rngs[1:],  # ranks 1.. of a distributed job
            "history": torch.tensor(self.history, dtype=torch.float64).reshape(-1, 1 + len(LOG_COLUMNS)),
            "fid_history": torch.tensor(self.fid_history, dtype=torch.float64).reshape(-1, 2),
            "run_id": self.run_id or "",
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            "grid_steps": torch.tensor(sorted(self.grids), dtype=torch.int64),
            "grids": torch.from_numpy(np.stack([self.grids[s] for s in sorted(self.grids)]))
            if self.grids else torch.zeros((0, 0, 0), dtype=torch.uint8),
        }

    def restore(self, ckpt: dict[str, Any], rank: int = 0) -> None:
        """Continue from `ckpt` as process `rank` of the job that wrote it."""
        self.generator.load_state_dict(ckpt["generator"])
        self.discriminator.load_state_dict(ckpt["discriminator"])
        self.opt_g.load_state_dict(ckpt["opt_g"])
        self.opt_d.load_state_dict(ckpt["opt_d"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        set_rng_state({"cpu": ckpt["rng_cpu"], "cuda": ckpt["rng_cuda"]} if rank == 0 else ckpt["rng_ranks"][rank - 1])
        self.step = int(ckpt["step"])
        self.history = [(int(r[0]), *map(float, r[1:])) for r in ckpt["history"].tolist()]
        self.fid_history = [(int(step), float(fid)) for step, fid in ckpt["fid_history"].tolist()]
        self.run_id = ckpt["run_id"] or None
        if "grids" in ckpt:  # (checkpoints written before grids were kept have none)
            self.grids = {int(s): g.numpy() for s, g in zip(ckpt["grid_steps"].tolist(), ckpt["grids"], strict=True)}


def rng_state() -> dict[str, Any]:
    """This process's random state: what its batches, noise and dropout masks are drawn from."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def new_state(model: ModelParams, params: TrainParams, device: torch.device, n_classes: int = 10) -> TrainState:
    """Seeded models and the tutorial's Adam optimisers, with the speed levers of `params` (and the
    EMA of G with train.ema_decay; conditional on `n_classes` with model.conditional)."""
    runtime.seed_everything(params.seed)
    memory_format = torch.channels_last if params.channels_last else torch.contiguous_format
    generator = build_generator(
        model, n_classes=n_classes, fast_upsample=params.fast_upsample, fast_output=params.fast_output
    )
    discriminator = build_discriminator(model, n_classes=n_classes)
    generator.to(device, memory_format=memory_format)
    discriminator.to(device, memory_format=memory_format)
    adam = {"betas": (params.beta1, params.beta2), "fused": params.fused_adam or None}
    return TrainState(
        generator,
        discriminator,
        torch.optim.Adam(generator.parameters(), lr=params.lr_g, **adam),
        torch.optim.Adam(discriminator.parameters(), lr=params.lr_d, **adam),
        ema=ema(generator, params.ema_decay) if params.ema_decay else None,
    )


def ema(generator: Generator, decay: float) -> AveragedModel:
    """torch's EMA of `generator`: weights and batch-norm statistics; the first update copies G."""
    return AveragedModel(generator, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def fixed_noise(latent_dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """The 25 latent vectors every sample grid is drawn from (its own RNG: training is unaffected)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(GRID * GRID, latent_dim, generator=gen).to(device)


def grid_labels(generator: Generator, device: torch.device) -> torch.Tensor | None:
    """A conditional generator's classes for the grid: 0, 1, 2, ... row by row."""
    return torch.arange(GRID * GRID, device=device) % generator.n_classes if generator.n_classes else None


@torch.no_grad()
def sample_grid(generator: Generator, noise: torch.Tensor) -> np.ndarray:
    """A 5x5 grid (uint8, H x W) of samples in inference mode, as the tutorial's save_imgs."""
    was_training = generator.training
    generator.eval()
    pixels = data.from_model(generator(noise, grid_labels(generator, noise.device))).cpu().numpy()  # (25, 28, 28)
    generator.train(was_training)
    return data.make_grid(pixels, GRID)


@dataclass(frozen=True)
class Nets:
    """The modules a step calls. In a distributed job G and D are DDP-wrapped, so their gradients are
    averaged over the ranks; G's update goes through D's own module, frozen, where nothing of D is
    reduced (a DDP forward there would wait for gradients that never come)."""

    generator: torch.nn.Module
    discriminator: torch.nn.Module
    frozen_discriminator: torch.nn.Module

    @classmethod
    def of(cls, state: TrainState) -> Nets:
        return cls(state.generator, state.discriminator, state.discriminator)


def train_step(
    state: TrainState,
    real: torch.Tensor,
    z: torch.Tensor,
    autocast: contextlib.AbstractContextManager[Any],
    loss: GanLoss,
    nets: Nets | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """One tutorial iteration; returns (d_loss, d_acc, g_loss) as a device tensor, no sync.

    A conditional pair gets `labels`, the real batch's: D sees each real image with its class,
    and G draws its fakes of those classes.

    D runs once per backward pass, the known DDP pitfall for GANs being a second forward (which
    re-broadcasts rank 0's batch-norm buffers in place) before the first one's backward.
    """
    nets = nets or Nets.of(state)
    G, D = nets.generator, nets.discriminator
    with autocast:
        fake = G(z, labels)  # (B, 1, 28, 28), reused by both updates below

    # D on the real batch (label 1), then on the fake batch (label 0): two Adam steps.
    state.opt_d.zero_grad(set_to_none=True)
    with autocast:
        logits_real = D(real, labels).float()  # (B,)
        loss_real = loss.d_real(logits_real)
    loss_real.backward()
    state.opt_d.step()

    state.opt_d.zero_grad(set_to_none=True)
    with autocast:
        logits_fake = D(fake.detach(), labels).float()
        loss_fake = loss.d_fake(logits_fake)
    loss_fake.backward()
    state.opt_d.step()

    # G through the frozen D, with the label "real".
    state.opt_g.zero_grad(set_to_none=True)
    frozen = nets.frozen_discriminator
    frozen.requires_grad_(False)
    with autocast:
        g_loss = loss.g(frozen(fake, labels).float())
    g_loss.backward()
    frozen.requires_grad_(True)
    state.opt_g.step()
    if state.ema is not None:
        state.ema.update_parameters(state.generator)

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

    on_log: Callable[[list[Row], float], None] | None = None  # rows, images/s
    on_sample: Callable[[int, np.ndarray], None] | None = None  # step, grid
    on_checkpoint: Callable[[TrainState], None] | None = None
    on_eval: Callable[[TrainState], None] | None = None  # every fid_every steps (quick FID)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if runtime.resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def distribute(state: TrainState, world: World, sync_batchnorm: bool) -> Nets:
    """The step's modules for `world`: G and D wrapped in DistributedDataParallel in a job."""
    if not world.distributed:
        return Nets.of(state)
    from torch.nn.parallel import DistributedDataParallel as DDP

    if sync_batchnorm and world.backend == "nccl":  # batch statistics over the global batch (CUDA only)
        state.generator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(state.generator)
        state.discriminator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(state.discriminator)
    ids = [world.local_rank] if world.backend == "nccl" else None
    return Nets(DDP(state.generator, device_ids=ids), DDP(state.discriminator, device_ids=ids), state.discriminator)


def train(
    state: TrainState,
    images: torch.Tensor,
    params: TrainParams,
    latent_dim: int,
    callbacks: Callbacks = Callbacks(),
    world: World = World(),
    labels: torch.Tensor | None = None,
    stop: runtime.StopRequest | None = None,
) -> TrainState:
    """Train from `state.step` to `params.steps`. `images`: uint8 (N, 28, 28) on the device; `labels`
    (N,) int64 beside them, which a conditional generator needs.

    In a distributed job every rank calls this with its own random stream; `params.batch_size`
    is the global batch, split evenly, and only the writing rank is given callbacks.

    Once `stop` holds a signal, training stops at a step boundary: the checkpoint of that step is
    written (a resume from it is bit-identical) and runtime.Stopped raised. One process looks at
    the flag every step; a job's ranks agree on it where they sync anyway (every `log_every`
    steps), so that all stop at the same step.
    """
    device = images.device
    if device.type == "cpu":
        runtime.keep_freed_memory()
    if state.generator.n_classes and labels is None:
        raise ValueError("a conditional generator trains on labelled images: pass their labels")
    conditional = labels if state.generator.n_classes else None
    batch = params.batch_size // world.size
    nets = distribute(state, world, params.sync_batchnorm)
    autocast = _autocast(device, params.precision)
    loss = LOSSES[params.loss]
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
        stacked = torch.stack([t for _, t in pending])
        if world.distributed:  # the figures of the global batch: the mean over the ranks
            torch.distributed.all_reduce(stacked)
            stacked /= world.size
        values = stacked.cpu().tolist()  # the one sync
        rows = [(step, *map(float, v)) for (step, _), v in zip(pending, values, strict=True)]
        pending.clear()
        for step, d_loss, _, g_loss in rows:
            if not (np.isfinite(d_loss) and np.isfinite(g_loss)):
                raise Diverged(f"training diverged at step {step}: D loss {d_loss}, G loss {g_loss}; {ADVICE}")
        # Finite losses, yet the update after them can have left NaN or inf weights: such a
        # state must never be saved as the "last good" checkpoint.
        broken = next(filter(None, distributed.all_gather(world, first_non_finite(state))), None)
        if broken is not None:
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
        idx = torch.randint(0, images.shape[0], (batch,), device=device)
        real = data.to_model(images[idx])  # the one pixel transform, on the device
        z = torch.randn(batch, latent_dim, device=device)
        stats = train_step(state, real, z, autocast, loss, nets, None if conditional is None else conditional[idx])
        state.step += 1
        pending.append((state.step, stats))

        step = state.step
        last = step == params.steps
        boundary = step % params.log_every == 0 or step % params.checkpoint_every == 0 or last
        if boundary:
            flush()
        if callbacks.on_sample and (step % params.sample_every == 0 or last):
            grid = sample_grid(state.output, noise)
            state.grids[step] = grid
            callbacks.on_sample(step, grid)
        if callbacks.on_eval and params.fid_every and (step % params.fid_every == 0 or last):
            callbacks.on_eval(state)
        signum = 0  # the stop signal this step stops on
        if stop is not None and (boundary or not world.distributed):
            signum = distributed.agreed_stop(world, stop.signum, device)
        if step % params.checkpoint_every == 0 or last or signum:
            flush()  # (off a boundary, only when stopping: the rows since the last flush, into the history)
            if world.distributed:  # every rank's random state, for the checkpoint
                state.rank_rngs = distributed.all_gather(world, rng_state())
            if callbacks.on_checkpoint:
                callbacks.on_checkpoint(state)
        if signum:
            raise runtime.Stopped(signum)
    flush()
    return state


# --- the stage: resume, the writing process's files and MLflow run -------------------------


def checkpoint_fingerprint(params: Params, data_hash: str, precision: str) -> str:
    """What a checkpoint must match to be resumed: everything that changes the numbers.

    The budget is left out, so a finished run can be extended; cadence and device do not
    change the trajectory (on one device). `precision` is the resolved one: `auto` may mean
    bf16 on one machine and fp32 on another.
    """
    train = values_without(params.train, BUDGET, CADENCE, DEVICE)
    return runtime.fingerprint(params.model.model_dump(), {**train, "precision": precision}, data_hash)


def resume_or_fresh(
    params: Params, ckpt: dict[str, Any] | None, checkpoint: Path, fingerprint: str, device: torch.device,
    world: World = World(), n_classes: int = 10,
) -> tuple[TrainState, str | None]:  # fmt: skip
    """The state to train from: that of `ckpt` (read from `checkpoint`) when it matches, else a fresh
    one; and what was found, to say. Each rank of a job continues with its own random stream."""
    state = new_state(params.model, params.train, device, n_classes)
    if world.rank:  # the weights are rank 0's (DDP broadcasts them); the random stream is the rank's own
        torch.manual_seed(distributed.rank_seed(params.train.seed, world.rank))
    if ckpt is None:
        return state, None
    if ckpt.get("fingerprint") != fingerprint:
        return state, f"{checkpoint} was made with other params or data; starting fresh."
    try:
        if int(ckpt["step"]) > params.train.steps:
            return state, f"{checkpoint} is at step {ckpt['step']}, beyond train.steps={params.train.steps}; starting fresh."
        if (size := int(ckpt.get("world_size", 1))) != world.size:
            raise UserError(
                f"{checkpoint} was written by a job of {size} process(es), this one has {world.size}: resume it "
                f"with {size} (train.nproc or torchrun --nproc-per-node), or delete it to start fresh."
            )
        state.restore(ckpt, world.rank)
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as exc:
        # Our fingerprint on a body that does not fit: hand-made or from another version.
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{checkpoint} does not fit this model ({first}); delete it to start fresh.") from None
    return state, f"resuming from {checkpoint} at step {state.step}"


def trained_speed(summary: Path, step: int) -> dict[str, float]:
    """`seconds` and `images_per_second` of metrics/train.json when it is of `step`; else nothing."""
    try:
        old = runtime.read_json(summary) if summary.exists() else {}
    except UserError:
        return {}
    return {k: old[k] for k in ("seconds", "images_per_second") if k in old} if old.get("step") == step else {}


def write_log(history: list[Row], path: Path) -> None:
    with runtime.atomic_open(path) as fh:
        fh.write("step," + ",".join(LOG_COLUMNS) + "\n")
        for step, *values in history:
            # 9 digits give back each float32 loss exactly, so `resend` can rebuild MLflow's record.
            fh.write(f"{step}," + ",".join(f"{v:.9g}" for v in values) + "\n")


def write_fid_log(fid_history: list[tuple[int, float]], path: Path) -> None:
    with runtime.atomic_open(path) as fh:
        fh.write("step,fid_quick\n" + "".join(f"{step},{float(fid)!r}\n" for step, fid in fid_history))


def for_export(
    model: ModelParams, weights: dict[str, torch.Tensor], n_classes: int = 10
) -> tuple[Generator, str, np.ndarray]:
    """The generator as MLflow gets it: on the CPU, in inference mode, with its name and an input example.

    MLflow's pyfunc passes one tensor, so a conditional generator's example carries the class
    in z's last column (see Generator.forward).
    """
    generator = build_generator(model, n_classes=n_classes)
    generator.load_state_dict({k: v.cpu() for k, v in weights.items()})
    # A batch of 8 in the example keeps the exported model's batch size dynamic.
    example = np.random.default_rng(0).standard_normal((8, model.latent_dim)).astype(np.float32)
    if generator.n_classes:
        example = np.concatenate([example, (np.arange(8) % n_classes)[:, None].astype(np.float32)], axis=1)
    return generator.eval(), "generator", example


def summarise(state: TrainState, seconds: float, first_step: int, batch_size: int) -> dict[str, Any]:
    """metrics/train.json: the last step's figures, the means of the last 100, this session's speed."""
    step, d_loss, d_acc, g_loss = state.history[-1]
    tail = np.array([r[1:] for r in state.history[-min(len(state.history), 100) :]])
    return {
        "step": step,
        "d_loss": d_loss,
        "d_acc": d_acc,
        "g_loss": g_loss,
        "d_loss_last100": float(tail[:, 0].mean()),
        "d_acc_last100": float(tail[:, 1].mean()),
        "g_loss_last100": float(tail[:, 2].mean()),
        "seconds": round(seconds, 2),
        "images_per_second": round((step - first_step) * batch_size / max(seconds, 1e-9), 1),
    }


def start_tracking(
    params: Params, run_id: str | None, device: torch.device, precision: str, data_hash: str, world: World
) -> tuple[MlflowRun, dict[str, str]]:
    """The training run in MLflow (the checkpoint's run when resuming), its params logged; and run_info."""
    from pipeline import tracking

    env = dict(os.environ)
    uri, experiment_id, root = tracking.open_experiment(params.tracking.experiment, Path.cwd(), env)
    tags = {
        **tracking.git_info(root),
        **tracking.dvc_tags(env),
        "device": runtime.device_name(device),
        "precision": precision,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "data.sha256": data_hash,
        "dataset": params.data.dataset,
        "stage": "train",
        # the job: one process, or data-parallel over world_size ranks of per_rank_batch images each
        "dist.world_size": str(world.size),
        "dist.backend": world.backend or "none",
        "dist.per_rank_batch": str(params.train.batch_size // world.size),
        "threads": str(torch.get_num_threads()),  # per process; train.threads, or torch's choice for 0
    }
    run = tracking.MlflowRun.start(experiment_id, tracking.run_name(env), tags, resume_run_id=run_id)
    run.log_params(flatten(params))
    print(f"MLflow run {run.run_id} in experiment '{params.tracking.experiment}' at {tracking.redact(uri)}")
    run_info = {"run_id": run.run_id, "experiment_id": experiment_id, "tracking_uri": tracking.redact(uri),
                "params_sha256": runtime.fingerprint(flatten(params))}  # fmt: skip
    return run, run_info


def sample_file(paths: Layout, step: int) -> Path:
    return paths.samples / f"step_{step:06d}.png"


class Recorded:
    """A finished MLflow run, reopened while its deleted outputs are written again: its metrics, images
    and model are there already, so logging them does nothing; its status is set as for any run."""

    def __init__(self, run: MlflowRun) -> None:
        self.recorded = run

    def log_metrics(self, rows: list[dict[str, float]]) -> None:
        pass

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        pass

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        pass

    def log_model(self, model: Any, name: str, input_example: np.ndarray) -> None:
        pass

    def drop_unfinished_models(self) -> int:
        return 0

    def __getattr__(self, name: str) -> Any:  # run_id, lost, finish, ...: the run's own
        return getattr(self.recorded, name)


class Writer:
    """Every side effect of the stage: DVC outputs, the MLflow run, the progress bar.

    Only the writing process has one (see main); train() reports to it through Callbacks.
    """

    def __init__(self, params: Params, paths: Layout, fingerprint: str, run: MlflowRun, run_info: dict[str, str],
                 state: TrainState, desc: str) -> None:  # fmt: skip
        from tqdm import tqdm

        self.params, self.paths, self.fingerprint = params, paths, fingerprint
        self.run_info = run_info
        # A resumed run already holds the steps between its last checkpoint and the kill: each
        # step goes to MLflow once (their values are the same again, bit for bit, on the CPU).
        self.logged_until, self.logged_grids, self.fid_logged_until = 0, set(), 0
        self.ends_logged: set[int] = set()  # the steps whose `final_*` figures the run holds
        recorded = False
        if state.step:
            try:
                # The grids a kill left half-uploaded are deleted here: those steps are uploaded again, whole.
                self.logged_until, self.logged_grids = run.logged_steps("g_loss", "samples")
                self.fid_logged_until = max(run.metric_steps("fid_quick"), default=0)
                self.ends_logged = run.metric_steps(f"final_{FINAL[-1]}")
                if state.step == params.train.steps:  # a finished run again: did its end reach MLflow?
                    recorded = state.step in self.ends_logged and run.has_model()
            except Exception:  # noqa: BLE001 - a server that fails here fails the logging below, where it is said
                pass
        # A finished run run again (its outputs deleted, or `dvc repro -f`) writes its outputs again;
        # MLflow holds its end already, which is not logged twice.
        self.run: MlflowRun | Recorded = Recorded(run) if recorded else run
        self.bar = tqdm(total=params.train.steps, initial=state.step, desc=desc, unit="step", dynamic_ncols=True)

    @classmethod
    def open(
        cls, params: Params, paths: Layout, state: TrainState, resumed: str | None, fingerprint: str,
        device: torch.device, precision: str, data_hash: str, world: World = World(),
    ) -> Writer:  # fmt: skip
        """Clear what a killed or earlier run left, then open the MLflow run (state.run_id when resuming)."""
        runtime.remove_stale_temps(*paths.outputs("train"), paths.checkpoint)
        if resumed:
            print(resumed)
        run, run_info = start_tracking(params, state.run_id, device, precision, data_hash, world)
        state.run_id = run.run_id  # into every checkpoint, so that a resumed run logs to the same run
        if state.step == 0:  # a fresh run: nothing from an earlier run may survive in persisted outputs
            for old in paths.samples.glob("*.png"):
                old.unlink()
            paths.fid_log.unlink(missing_ok=True)
        for step, grid in state.grids.items():  # the grids of a resumed run whose files are gone
            if not sample_file(paths, step).exists():
                data.save_png(grid, sample_file(paths, step))
        where = f"{device.type} x{world.size}" if world.distributed else device.type
        return cls(params, paths, fingerprint, run, run_info, state, f"train [{where}, {precision}]")

    def callbacks(self, device: torch.device) -> Callbacks:
        return Callbacks(self.on_log, self.on_sample, self.on_checkpoint, self.quick_fid(device))

    def on_log(self, rows: list[Row], rate: float) -> None:
        step, d_loss, d_acc, g_loss = rows[-1]
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix_str(f"D loss {d_loss:.3f}, acc {100 * d_acc:.1f}% | G loss {g_loss:.3f} | {rate:,.0f} img/s")
        self.run.log_metrics(metric_rows([row for row in rows if row[0] > self.logged_until]))

    def on_sample(self, step: int, grid: np.ndarray) -> None:
        data.save_png(grid, sample_file(self.paths, step))
        if step not in self.logged_grids:
            self.run.log_image(grid, key="samples", step=step)

    def on_checkpoint(self, state: TrainState) -> None:
        runtime.save_checkpoint(state.to_checkpoint(self.fingerprint), self.paths.checkpoint)
        write_log(state.history, self.paths.train_log)

    def quick_fid(self, device: torch.device) -> Callable[[TrainState], None] | None:
        """With train.fid_every: the in-training FID, on the frozen classifier's features."""
        p = self.params.train
        if not p.fid_every:
            return None
        from pipeline import scoring

        classifier, sha = scoring.load_classifier(self.paths.classifier, self.params.classifier.feature_dim, device)
        reference = scoring.load_reference(self.paths.reference, classifier_sha256=sha)

        def on_eval(state: TrainState) -> None:
            # Same noise at every evaluation (own RNG: training is untouched), so the curve shows
            # the generator changing, not the draw.
            fid = scoring.generator_fid(state.output, classifier, reference, p.fid_samples, p.seed,
                                        self.params.evaluate.batch_size, device)  # fmt: skip
            state.fid_history.append((state.step, fid))
            self.bar.write(f"step {state.step}: quick FID ({p.fid_samples} samples) {fid:.3f}")
            if state.step > self.fid_logged_until:
                self.run.log_metrics([{"step": state.step, "fid_quick": fid}])
            write_fid_log(state.fid_history, self.paths.fid_log)

        return on_eval

    def holds_model(self, weights: dict[str, torch.Tensor]) -> bool:
        """Whether the run holds a finished model of exactly these weights (False when MLflow cannot say)."""
        from pipeline import tracking

        try:
            return self.run.has_model(tracking.tensors_sha256(weights))
        except Exception:  # noqa: BLE001 - the upload that follows says what failed
            return False

    def fail(self, exc: BaseException) -> None:
        """End the MLflow run as the stage ends: KILLED, FAILED, or, when this session added nothing
        to it (a resume at its last step), the status it had before; a status MLflow could not
        take is said in the error's sentence."""
        self.bar.close()
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        if self.bar.n == self.bar.initial and self.run.previous_status == "FINISHED":
            status = "FINISHED"  # its record is what it was when it finished: a failed no-op must not undo that
        self.run.finish(status)
        if isinstance(exc, UserError) and any(item.kind == "run status" for item in self.run.lost):
            exc.args = (
                f"{str(exc).rstrip('.')}; MLflow could not mark run {self.run.run_id} {status} either "
                f"({self.run.failure}), so it shows RUNNING until the next stage start marks it KILLED.",
            )

    def finish(self, state: TrainState, summary: dict[str, Any], last_grid: np.ndarray) -> None:
        """The DVC outputs, then what MLflow gets at the end; says what it did not get."""
        self.bar.close()
        paths = self.paths
        try:
            with runtime.atomic_files():  # all of them, or (a full disk) none: never new beside old
                # The generator the run gives (the EMA of G with train.ema_decay), and the trained G beside it.
                raw = {"generator_raw": state.generator.state_dict()} if state.ema is not None else {}
                runtime.save_checkpoint({"generator": state.output.state_dict(), **raw}, paths.generator)
                write_log(state.history, paths.train_log)
                write_fid_log(state.fid_history, paths.fid_log)  # header only when train.fid_every is 0
                data.save_png(last_grid, paths.last_samples)
                runtime.write_json(paths.run_info, self.run_info)
                runtime.write_json(paths.train_metrics, summary)
        except BaseException as exc:
            self.fail(exc)  # main's handler covers train() only: the run must not stay RUNNING
            raise

        # A resume replayed from an earlier checkpoint ends where the run has ended before: its end, and
        # its model of the same weights (bit for bit again on the CPU), are in MLflow once already.
        if summary["step"] not in self.ends_logged:
            self.run.log_metrics([summary_row(summary)])
        self.run.log_artifact(paths.train_log)
        if dropped := self.run.drop_unfinished_models():  # a kill during an earlier upload
            print(f"removed {dropped} unfinished logged model(s) of MLflow run {self.run.run_id}, left by an "
                  "interrupted upload.")  # fmt: skip
        weights = state.output.state_dict()
        if not (self.ends_logged and self.holds_model(weights)):
            self.run.log_model(*for_export(self.params.model, weights, state.generator.n_classes))
        self.run.finish()
        print(
            f"step {summary['step']}: D loss {summary['d_loss']:.4f}, D acc {100 * summary['d_acc']:.1f}%, "
            f"G loss {summary['g_loss']:.4f} ({summary['seconds']:.0f} s, {summary['images_per_second']:,.0f} img/s) "
            f"-> {paths.generator}"
        )
        if self.run.lost:
            print(f"warning: {self.run.lost_summary()}; the outputs are complete, and `python -m pipeline resend` "
                  "sends them once the server is back.", file=sys.stderr)  # fmt: skip


def main(params_path: Path = Path("params.yaml")) -> None:
    params = load_params(params_path)
    p, paths, env = params.train, Layout(dataset=params.data.dataset), dict(os.environ)
    if p.nproc > 1 and not distributed.under_torchrun(env):
        with one_training(paths):
            os.environ[LOCK_HOLDER] = str(os.getpid())  # its ranks: this process holds the lock for them
            distributed.launch(p.nproc, params_path)  # the same command, as p.nproc processes of one job
        return
    device = runtime.pick_device(p.device)
    runtime.use_threads(p.threads)
    world = World()
    if distributed.under_torchrun(env):
        size = int(env["WORLD_SIZE"])
        if p.batch_size % size:
            raise UserError(f"train.batch_size={p.batch_size} does not split evenly over {size} processes; "
                            f"make it a multiple of {size}.")  # fmt: skip
        world, device = distributed.join(device, env, timeout_s=p.dist_timeout_s)
    try:
        # Rank 0 of a job holds the lock, unless the process that launched it (train.nproc) does already.
        held = not world.writer or (world.distributed and env.get(LOCK_HOLDER) == str(os.getppid()))
        with contextlib.nullcontext() if held else one_training(paths):
            run(params, paths, device, world)
    finally:
        distributed.leave(world)


LOCK_HOLDER = "PIPELINE_TRAIN_LOCK_PID"  # set by a launching process for the ranks it starts


def one_training(paths: Layout) -> contextlib.AbstractContextManager[None]:
    """One training at a time in this working directory: a second one would log every step twice and
    remove the first one's model upload."""
    return runtime.exclusive(paths.train_lock, "a training")


def stopped_sentence(stop: runtime.Stopped, step: int, checkpoint: Path) -> str:
    """What a stop signal did, in one sentence."""
    if not stop.at_once:
        return f"stopped by {stop.name} at step {step}: checkpoint written to {checkpoint}; run the same command to resume."
    try:
        kept: int | None = int(runtime.load_checkpoint(checkpoint)["step"]) if checkpoint.exists() else None
    except (UserError, KeyError, TypeError, ValueError):
        kept = None
    at_once = f"stopped at once by a second {stop.name} after step {step}"
    if kept is None:
        return f"{at_once}, before any checkpoint; run the same command to start again."
    return f"{at_once}: {checkpoint} of step {kept} is kept; run the same command to resume from it."


def run(params: Params, paths: Layout, device: torch.device, world: World) -> None:
    """The stage in one process (of a job, or the only one): resume or start, train, write."""
    p = params.train
    precision = runtime.resolve_precision(p.precision, device)
    if world.writer and device.type == "cpu" and hasattr(os, "getloadavg"):
        if advice := runtime.busy_machine_advice(torch.get_num_threads(), runtime.cores(), os.getloadavg()[0]):
            print(f"warning: {advice}", file=sys.stderr)
    n_classes = len(data.class_names(params.data))
    dataset = data.load_prepared(paths.prepared, n_classes)
    data_hash = runtime.sha256_file(paths.prepared)
    fingerprint = checkpoint_fingerprint(params, data_hash, precision)
    # Rank 0 reads the checkpoint for everyone: other machines of a job need not share its disk.
    ckpt = runtime.load_checkpoint(paths.checkpoint) if world.writer and paths.checkpoint.exists() else None
    ckpt = distributed.broadcast(world, ckpt)
    state, how = resume_or_fresh(params, ckpt, paths.checkpoint, fingerprint, device, world, n_classes)

    # The one gate: only the writing process touches files, MLflow and the terminal.
    writer = Writer.open(params, paths, state, how, fingerprint, device, precision, data_hash, world) if world.writer else None
    if writer:
        writer.run.log_dataset(params.data.dataset, data_hash, paths.prepared, "training",
                               {"images": len(dataset.train_labels), "classes": n_classes})  # fmt: skip

    images = torch.from_numpy(dataset.train_images).to(device)
    labels = torch.from_numpy(dataset.train_labels).to(device) if params.model.conditional else None
    started, first_step = time.perf_counter(), state.step
    stop = runtime.StopRequest()
    try:
        # Until training ends, a SIGTERM, SIGINT or SIGHUP stops it at a step it can resume from. A
        # rank of a job may get each signal twice (from its launcher, and from systemd or Slurm, which
        # signal every process): its launcher, not a second signal, stops it at once (torch's kills
        # the ranks that outlast its grace period).
        with runtime.stop_on_signals(stop, second_stops_at_once=not world.distributed):
            train(state, images, p, params.model.latent_dim, writer.callbacks(device) if writer else Callbacks(),
                  world, labels, stop)  # fmt: skip
            if stop.signum and not world.distributed:  # after the last step's look (its checkpoint is written)
                raise runtime.Stopped(stop.signum)
    except runtime.Stopped as exc:
        if writer:
            writer.fail(exc)
            exc.message = stopped_sentence(exc, state.step, paths.checkpoint)
        raise
    except BaseException as exc:
        if writer:
            writer.fail(exc)
        raise
    if writer:
        summary = summarise(state, time.perf_counter() - started, first_step, p.batch_size)
        if first_step == p.steps:  # nothing trained now: the speed stays that of the session that trained
            summary.update(trained_speed(paths.train_metrics, first_step))
        writer.finish(state, summary, sample_grid(state.output, fixed_noise(params.model.latent_dim, p.seed, device)))
