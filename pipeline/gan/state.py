"""The training state: everything a run needs to continue bit-identically, and how a run starts.

`TrainState` holds the networks, their optimisers, the EMA of G, the step, the history of the
per-step figures, the grids and the collapse watchdog's state (gan/watchdog.py); `to_checkpoint`
and `restore` are the checkpoint's format (files.save_checkpoint writes it). `new_state` builds a
seeded fresh one from the params.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline import machine
from pipeline.gan.architectures import build_discriminator, build_generator
from pipeline.gan.architectures.dcgan import Discriminator, Generator
from pipeline.gan.remedies import EmaWarmup
from pipeline.gan.sampling import with_standing_stats
from pipeline.gan.watchdog import Watch, new_watch
from pipeline.params import ModelParams, TrainParams

LOG_COLUMNS = ("d_loss", "d_acc", "g_loss")
Row = tuple[int, float, float, float]  # (step, d_loss, d_acc, g_loss)


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
    watch: Watch | None = None  # with train.watchdog: the best state so far and the rescues
    standing: tuple[int, int] = (0, 0)  # train.standing_stats and train.seed: see `given`
    _given: tuple[int, Generator] | None = field(default=None, repr=False)  # given()'s, by step

    @property
    def output(self) -> Generator:
        """The generator as trained, that the grids and quick FIDs along the way show: the EMA of G when
        there is one, else G."""
        return self.ema.module if self.ema is not None else self.generator

    def given(self) -> Generator:
        """The generator the run gives (exported, scored at the end, its last grid): `output`; with
        train.standing_stats, a copy with batch norm from its own samples (seconds; made once a step)."""
        batches, seed = self.standing
        if not batches:
            return self.output
        if self._given is None or self._given[0] != self.step:
            self._given = (self.step, with_standing_stats(self.output, batches, seed))
        return self._given[1]

    def to_checkpoint(self, fingerprint: str, with_watch: bool = True) -> dict[str, Any]:
        """The state as a checkpoint's dict (of live tensors); `with_watch=False` leaves the watchdog's
        state out (its own copy of the best state)."""
        rngs = self.rank_rngs or [machine.rng_state()]
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
            if self.grids
            else torch.zeros((0, 0, 0), dtype=torch.uint8),
            **({"watchdog": self.watch.to_checkpoint()} if with_watch and self.watch is not None else {}),
        }

    def restore(self, ckpt: dict[str, Any], rank: int = 0, with_watch: bool = True) -> None:
        """Continue from `ckpt` as process `rank` of the job that wrote it (`with_watch=False`: the
        watchdog's own state stays as it is, for a rollback)."""
        self._given = None
        self.generator.load_state_dict(ckpt["generator"])
        self.discriminator.load_state_dict(ckpt["discriminator"])
        self.opt_g.load_state_dict(ckpt["opt_g"])
        self.opt_d.load_state_dict(ckpt["opt_d"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        machine.set_rng_state(
            {"cpu": ckpt["rng_cpu"], "cuda": ckpt["rng_cuda"]} if rank == 0 else ckpt["rng_ranks"][rank - 1]
        )
        self.step = int(ckpt["step"])
        self.history = [(int(r[0]), *map(float, r[1:])) for r in ckpt["history"].tolist()]
        self.fid_history = [(int(step), float(fid)) for step, fid in ckpt["fid_history"].tolist()]
        self.run_id = ckpt["run_id"] or None
        if "grids" in ckpt:  # (checkpoints written before grids were kept have none)
            self.grids = {
                int(s): g.numpy() for s, g in zip(ckpt["grid_steps"].tolist(), ckpt["grids"], strict=True)
            }
        if with_watch and self.watch is not None:
            self.watch = Watch.from_checkpoint(ckpt["watchdog"])


def new_state(model: ModelParams, params: TrainParams, device: torch.device, n_classes: int) -> TrainState:
    """Seeded models and the tutorial's Adam optimisers, with the speed levers of `params` (and the
    EMA of G with train.ema_decay; conditional on `n_classes` with model.conditional)."""
    if "auto" in (params.fast_upsample, params.fast_output, params.channels_last):
        raise ValueError("a speed lever is `auto`: choose its form first (gan.levers.choose)")
    machine.seed_everything(params.seed)
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
        ema=ema(generator, params.ema_decay, params.ema_warmup) if params.ema_decay else None,
        watch=new_watch(params),
        standing=(params.standing_stats, params.seed),
    )


def ema(generator: Generator, decay: float, warmup: int = 0) -> AveragedModel:
    """torch's EMA of `generator`: weights and batch-norm statistics; the first update copies G. With
    `warmup`, the decay ramps up over the first `warmup` steps (remedies.EmaWarmup)."""
    average = EmaWarmup(decay, warmup) if warmup else get_ema_multi_avg_fn(decay)
    return AveragedModel(generator, multi_avg_fn=average, use_buffers=True)
