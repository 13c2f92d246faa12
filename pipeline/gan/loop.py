"""The GAN core: one step and the loop, written out once (the state they train: state.py).

Each step, as in the Keras tutorial: draw a random batch of real images and a batch of
fakes from fresh noise; train D on the real batch (label 1), then on the fake batch
(label 0), two optimiser steps as the tutorial's two `train_on_batch` calls; then train
G through D with the label "real". The generator runs once per step: its output feeds
D's fake update (detached) and then G's update.

Beyond the tutorial, each off by default (see params.py): an EMA of G's weights, updated
after every G step, is what the grids, the quick FID and the exported generator use; a
conditional pair gets each real image's label, and the fakes the real batch's labels; the
remedies of remedies.py (R1, differentiable augmentation, the EMA's warm-up); the collapse
watchdog of watchdog.py, which judges through Callbacks.on_watch and rolls a collapse back.

`train()` does no file or MLflow I/O: it reports through `Callbacks`, which the train stage
wires to DVC outputs and MLflow, and the sweep to its trial. Host-device synchronisation
happens only at logging points (every `log_every` steps), where the per-step losses
collected on the device are copied out in one go.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline import data, distributed, machine, signals
from pipeline.distributed import World
from pipeline.errors import UserError
from pipeline.gan import watchdog
from pipeline.gan.losses import LOSSES, GanLoss
from pipeline.gan.remedies import EmaWarmup, Remedies, r1_penalty
from pipeline.gan.sampling import fixed_noise, sample_grid
from pipeline.gan.state import LOG_COLUMNS, Row, TrainState
from pipeline.params import TrainParams


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
    remedies: Remedies = Remedies(),
) -> torch.Tensor:
    """One tutorial iteration; returns (d_loss, d_acc, g_loss) as a device tensor, no sync.

    A conditional pair gets `labels`, the real batch's: D sees each real image with its class,
    and G draws its fakes of those classes. `remedies`: D sees every image through
    `remedies.view` (augmentation), and its loss on real images gets the R1 penalty.

    D runs once per backward pass, the known DDP pitfall for GANs being a second forward (which
    re-broadcasts rank 0's batch-norm buffers in place) before the first one's backward.
    """
    nets = nets or Nets.of(state)
    G, D = nets.generator, nets.discriminator
    with autocast:
        fake = G(z, labels)  # (B, 1, 28, 28), reused by both updates below

    # D on the real batch (label 1), then on the fake batch (label 0): two Adam steps.
    state.opt_d.zero_grad(set_to_none=True)
    r1_gamma = remedies.r1_at(state.step)
    seen = remedies.view(real).requires_grad_(True) if r1_gamma else remedies.view(real)
    with autocast:
        logits_real = D(seen, labels).float()  # (B,)
        loss_real = loss.d_real(logits_real)
    if r1_gamma:
        (loss_real + r1_penalty(logits_real, seen, r1_gamma)).backward()
    else:
        loss_real.backward()
    state.opt_d.step()

    state.opt_d.zero_grad(set_to_none=True)
    with autocast:
        logits_fake = D(remedies.view(fake.detach()), labels).float()
        loss_fake = loss.d_fake(logits_fake)
    loss_fake.backward()
    state.opt_d.step()

    # G through the frozen D, with the label "real".
    state.opt_g.zero_grad(set_to_none=True)
    frozen = nets.frozen_discriminator
    frozen.requires_grad_(False)
    with autocast:
        g_loss = loss.g(frozen(remedies.view(fake), labels).float())
    g_loss.backward()
    frozen.requires_grad_(True)
    state.opt_g.step()
    if state.ema is not None:
        if isinstance(state.ema.multi_avg_fn, EmaWarmup):
            state.ema.multi_avg_fn.step = state.step + 1  # the step this update ends
        state.ema.update_parameters(state.generator)

    d_acc = ((logits_real > 0).float().mean() + (logits_fake < 0).float().mean()) / 2
    return torch.stack([(loss_real + loss_fake).detach() / 2, d_acc, g_loss.detach()])


def lr_share(params: TrainParams, step: int) -> float:
    """The share of its learning rate each optimiser takes at the step that starts from `step`: 1 up to
    `lr_decay_from` x `steps`, then falling linearly to 1 / ((1 - lr_decay_from) x steps) at the last one."""
    start = params.lr_decay_from * params.steps
    return 1.0 if step < start else (params.steps - step) / (params.steps - start)


def decay_learning_rates(state: TrainState, params: TrainParams) -> None:
    """Both optimisers' rates for the next step: params' (D's as the watchdog's remedies left it), decayed.
    Set from the step alone, so that a resume or a rollback keeps the schedule; untouched without decay."""
    if params.lr_decay_from == 1:
        return
    share = lr_share(params, state.step)
    lr_d = state.watch.lr_d(params) if state.watch is not None else params.lr_d
    for optimiser, lr in ((state.opt_g, params.lr_g), (state.opt_d, lr_d)):
        for group in optimiser.param_groups:
            group["lr"] = lr * share


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
    # With train.watchdog (the writing process): the quick FID the watchdog judges, and each rescue.
    on_watch: Callable[[TrainState], float] | None = None
    on_rescue: Callable[[watchdog.Event], None] | None = None


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if machine.resolve_precision(precision, device) == "bf16":
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
    return Nets(
        DDP(state.generator, device_ids=ids), DDP(state.discriminator, device_ids=ids), state.discriminator
    )


def train(
    state: TrainState,
    images: torch.Tensor,
    params: TrainParams,
    latent_dim: int,
    callbacks: Callbacks = Callbacks(),
    world: World = World(),
    labels: torch.Tensor | None = None,
    stop: signals.StopRequest | None = None,
) -> TrainState:
    """Train from `state.step` to `params.steps`. `images`: uint8 (N, 28, 28) on the device; `labels`
    (N,) int64 beside them, which a conditional generator needs.

    In a distributed job every rank calls this with its own random stream; `params.batch_size`
    is the global batch, split evenly, and only the writing rank is given callbacks.

    Once `stop` holds a signal, training stops at a step boundary: the checkpoint of that step is written
    (a resume from it is bit-identical) and signals.Stopped raised. One process looks at the flag every
    step; a job's ranks agree on it where they sync anyway (every `log_every` steps): all stop together.
    """
    device = images.device
    if device.type == "cpu":
        machine.keep_freed_memory()
    if state.generator.n_classes and labels is None:
        raise ValueError("a conditional generator trains on labelled images: pass their labels")
    conditional = labels if state.generator.n_classes else None
    batch = params.batch_size // world.size
    nets = distribute(state, world, params.sync_batchnorm)
    autocast = _autocast(device, params.precision)
    loss = LOSSES[params.loss]
    if params.watchdog and world.writer and callbacks.on_watch is None:
        raise ValueError("train.watchdog judges the quick FID: pass Callbacks.on_watch")
    noise = fixed_noise(latent_dim, params.seed, device)
    if params.compile:  # in place: parameter names (and so checkpoints) stay the same
        state.generator.compile()
        state.discriminator.compile()
    state.generator.train()
    state.discriminator.train()
    loop = _Loop(state, params, callbacks, world, stop, noise, watchdog.step_remedies(state.watch, params))

    while state.step < params.steps:
        decay_learning_rates(state, params)
        idx = torch.randint(0, images.shape[0], (batch,), device=device)
        real = data.to_model(images[idx])  # the one pixel transform, on the device
        z = torch.randn(batch, latent_dim, device=device)
        stats = train_step(
            state,
            real,
            z,
            autocast,
            loss,
            nets,
            None if conditional is None else conditional[idx],
            loop.remedies,
        )
        state.step += 1
        loop.pending.append((state.step, stats))
        loop.after_step()
    loop.flush()
    return state


@dataclass
class _Loop:
    """What train() keeps beside the state between steps: the per-step figures still on the device
    and the cadence of logging, grids, quick FIDs, checkpoints and stop signals."""

    state: TrainState
    params: TrainParams
    callbacks: Callbacks
    world: World
    stop: signals.StopRequest | None
    noise: torch.Tensor  # the fixed latent vectors of every sample grid
    remedies: Remedies  # the step's: params', and the watchdog's since its rescues
    pending: list[tuple[int, torch.Tensor]] = field(
        default_factory=list
    )  # per-step stats still on the device
    tick: float = field(init=False)  # when the speed was last measured, and at which step
    tick_step: int = field(init=False)

    def __post_init__(self) -> None:
        self.tick, self.tick_step = time.perf_counter(), self.state.step

    def after_step(self) -> None:
        """Whatever is due at the step just taken, in this order: log, grid, quick FID, the watchdog,
        checkpoint, stop. After a rollback nothing more is done at this step."""
        state, params, callbacks = self.state, self.params, self.callbacks
        step = state.step
        last = step == params.steps
        judged = watchdog.due(params, step)
        boundary = step % params.log_every == 0 or step % params.checkpoint_every == 0 or last or judged
        if boundary:
            try:
                self.flush()
            except Diverged:
                if state.watch is None:
                    raise
                return self.rescue("a loss or weight is no longer finite")
        if callbacks.on_sample and (step % params.sample_every == 0 or last):
            grid = sample_grid(state.output, self.noise)
            state.grids[step] = grid
            callbacks.on_sample(step, grid)
        if callbacks.on_eval and params.fid_every and (step % params.fid_every == 0 or last):
            callbacks.on_eval(state)
        if judged:
            fid = callbacks.on_watch(state) if callbacks.on_watch else None
            if reason := watchdog.judge(state, params, self.world, fid):
                return self.rescue(reason)
        signum = 0  # the stop signal this step stops on
        if self.stop is not None and (boundary or not self.world.distributed):
            device = self.noise.device  # the training device, where the ranks agree
            signum = distributed.agreed_stop(self.world, self.stop.signum, device)
        if step % params.checkpoint_every == 0 or last or signum:
            self.flush()  # (off a boundary, only when stopping: the rows since the last flush, into the history)
            if self.world.distributed:  # every rank's random state, for the checkpoint
                state.rank_rngs = distributed.all_gather(self.world, machine.rng_state())
            if callbacks.on_checkpoint:
                callbacks.on_checkpoint(state)
        if signum:
            raise signals.Stopped(signum)

    def rescue(self, reason: str) -> None:
        """Back to the watchdog's best state with its next remedy (watchdog.Collapsed when spent)."""
        event = watchdog.rescue(self.state, self.params, self.world, reason)
        self.remedies = watchdog.step_remedies(self.state.watch, self.params)
        self.pending.clear()
        if self.callbacks.on_rescue:
            self.callbacks.on_rescue(event)

    def flush(self) -> None:
        """The pending figures into the history (after checking them) and to on_log, with the speed."""
        if not self.pending:
            return
        rows = self.copy_out()
        check_finite(self.state, self.world, rows)
        self.state.history.extend(rows)
        now = time.perf_counter()
        rate = (self.state.step - self.tick_step) * self.params.batch_size / max(now - self.tick, 1e-9)
        self.tick, self.tick_step = now, self.state.step
        if self.callbacks.on_log:
            self.callbacks.on_log(rows, rate)

    def copy_out(self) -> list[Row]:
        """The pending per-step stats as history rows, in one host-device sync."""
        stacked = torch.stack([t for _, t in self.pending])
        if self.world.distributed:  # the figures of the global batch: the mean over the ranks
            torch.distributed.all_reduce(stacked)
            stacked /= self.world.size
        values = stacked.cpu().tolist()  # the one sync
        rows = [(step, *map(float, v)) for (step, _), v in zip(self.pending, values, strict=True)]
        self.pending.clear()
        return rows


def check_finite(state: TrainState, world: World, rows: list[Row]) -> None:
    """Diverged when a loss of `rows`, or (after them) a weight of any rank, is NaN or inf."""
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
