"""Run by tests/test_distributed.py under `torchrun --nproc-per-node=2`: the training step across ranks.

Every rank builds the small model, joins the job as the train stage does, and steps it with the
stage's own DDP wiring (`train.distribute` + `train.train_step`), comparing the weights of all
ranks after every step: STEPS plain steps, then STEPS with the remedies on (R1's second backward
through DDP, augmentation). Rank 0 prints one JSON line with what it found.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
import torch.distributed as dist

from pipeline import data, distributed
from pipeline.gan.loop import distribute, new_state, train_step
from pipeline.gan.losses import LOSSES
from pipeline.gan.remedies import Remedies
from pipeline.params import ModelParams, TrainParams
from tests.conftest import SMALL_MODEL, synthetic_mnist

STEPS = 6


def max_difference(module: torch.nn.Module, world: distributed.World) -> float:
    """The largest difference of any parameter between this rank and the others (0.0: in sync)."""
    mine = torch.cat([p.detach().flatten() for p in module.parameters()])
    everyone = distributed.all_gather(world, mine)
    return max(float((other - mine).abs().max()) for other in everyone)


def main() -> None:
    device = torch.device("cuda" if os.environ.get("DDP_CHECK_DEVICE") == "cuda" else "cpu")
    world, device = distributed.join(device, os.environ, timeout_s=120)
    model, params = ModelParams(**SMALL_MODEL), TrainParams(batch_size=16, device=device.type, precision="fp32")
    state = new_state(model, params, device, 10)
    torch.manual_seed(distributed.rank_seed(params.seed, world.rank))
    nets = distribute(state, world, params.sync_batchnorm)
    images = torch.from_numpy(synthetic_mnist(n_train=64).train_images).to(device)
    batch = params.batch_size // world.size
    differences, batches = [], []
    remedies = Remedies(r1_gamma=1.0, augment=("translation", "cutout"))
    for step in range(2 * STEPS):
        idx = torch.randint(0, images.shape[0], (batch,), device=device)
        batches.append(idx.tolist())
        real, z = data.to_model(images[idx]), torch.randn(batch, model.latent_dim, device=device)
        train_step(state, real, z, contextlib.nullcontext(), LOSSES["bce"], nets, None, remedies if step >= STEPS else Remedies())
        differences.append(max(max_difference(state.generator, world), max_difference(state.discriminator, world)))
    ranks_drew_other_batches = distributed.all_gather(world, batches)
    distinct = ranks_drew_other_batches[0] != ranks_drew_other_batches[1]

    if world.rank == 0:
        print(json.dumps({"differences": differences, "distinct_batches": distinct, "backend": world.backend}))
    dist.barrier()
    distributed.leave(world)


if __name__ == "__main__":
    main()
