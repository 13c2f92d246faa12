"""Resuming: what a checkpoint must match (its fingerprint), and the state to train from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline import distributed, files
from pipeline.distributed import World
from pipeline.errors import UserError
from pipeline.gan.state import TrainState, new_state
from pipeline.params import Params
from pipeline.sections import BUDGET, CADENCE, DEVICE, fingerprinted


def checkpoint_fingerprint(params: Params, data_hash: str, precision: str) -> str:
    """What a checkpoint must match to be resumed: everything that changes the numbers.

    The budget is left out, so a finished run can be extended, except under a learning-rate decay,
    whose schedule follows `train.steps` (a run of other steps is another run); cadence and device do
    not change the trajectory (on one device). `precision` is the resolved one: `auto` may mean
    bf16 on one machine and fp32 on another.
    """
    train = fingerprinted(params.train, BUDGET, CADENCE, DEVICE)
    if params.train.lr_decay_from < 1:
        train["steps"] = params.train.steps
    return files.fingerprint(params.model.model_dump(), {**train, "precision": precision}, data_hash)


def resume_or_fresh(
    params: Params,
    ckpt: dict[str, Any] | None,
    checkpoint: Path,
    fingerprint: str,
    device: torch.device,
    n_classes: int,
    world: World = World(),
) -> tuple[TrainState, str | None]:
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
            return (
                state,
                f"{checkpoint} is at step {ckpt['step']}, beyond train.steps={params.train.steps}; starting fresh.",
            )
        if (size := int(ckpt.get("world_size", 1))) != world.size:
            raise UserError(
                f"{checkpoint} was written by a job of {size} process(es), this one has {world.size}: resume it "
                f"with {size} (train.nproc or torchrun --nproc-per-node), or delete it to start fresh."
            )
        state.restore(ckpt, world.rank)
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as exc:
        # Our fingerprint on a body that does not fit: hand-made or from another version.
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(
            f"{checkpoint} does not fit this model ({first}); delete it to start fresh."
        ) from None
    return state, f"resuming from {checkpoint} at step {state.step}"
