"""Follow one training run step by step: what a collapse looks like from the inside (issue 28).

Trains one arm (dotted overrides of params.yaml, as `lever_quality.py` takes them) at one seed
and, every `--every` steps, records without touching the run (copies of G and D, the random
streams restored):

- the quick FID (N = train.fid_samples, the watchdog's number) of the raw G and of the EMA of G
  where the arm keeps one, and the classes the output's samples cover;
- D's accuracy and both losses, averaged over the steps since the last look (the training log);
- on a fixed probe (256 real training images and 256 fakes from fixed noise, the real images'
  classes for a conditional pair): D's mean logit on the real and on the fake images and their
  gap, and the gradient norms of D's loss over D's weights and of G's loss over G's weights, in
  fp32 and on the plain loss (no augmentation, no R1 term), so that the looks compare across arms.

An arm with the collapse watchdog on keeps it: the watchdog judges the EMA's (or G's) quick FID at
its own steps, as in training.

    python benchmarks/trace_run.py --arm '{"model.conditional": true, "train.ema_decay": 0.995}' \\
        --seed 1 --steps 4000 --every 250 --out trace.json

Run it from a project where `dvc repro reference` has run (the prepared data, the frozen
classifier and its reference). It prints one row per look and writes them all to `--out`.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from typing import Any

import torch
from lever_quality import training_data, with_overrides

from pipeline import data
from pipeline.gan import levers
from pipeline.gan.loop import Callbacks, train
from pipeline.gan.losses import LOSSES
from pipeline.gan.state import LOG_COLUMNS, TrainState, new_state
from pipeline.layout import Layout
from pipeline.params import Params, load_params
from pipeline.scoring import scorer

PROBE = 256


def probe(state: TrainState, params: Params, real: torch.Tensor, z: torch.Tensor, labels: torch.Tensor | None
          ) -> dict[str, float]:  # fmt: skip
    """D's logits and both gradient norms on the fixed probe, from copies of G and D in training mode
    (batch statistics, dropout), the random streams put back after."""
    loss = LOSSES[params.train.loss]
    with torch.random.fork_rng(devices=[]):
        G, D = copy.deepcopy(state.generator), copy.deepcopy(state.discriminator)
        fake = G(z, labels)
        logits_real, logits_fake = D(real, labels).float(), D(fake.detach(), labels).float()
        d_grads = torch.autograd.grad(
            loss.d_real(logits_real) + loss.d_fake(logits_fake), list(D.parameters())
        )
        g_grads = torch.autograd.grad(loss.g(D(fake, labels).float()), list(G.parameters()))
    real_mean, fake_mean = float(logits_real.detach().mean()), float(logits_fake.detach().mean())
    return {
        "d_logit_real": real_mean,
        "d_logit_fake": fake_mean,
        "d_logit_gap": real_mean - fake_mean,
        "d_grad_norm": float(torch.linalg.vector_norm(torch.stack([g.norm() for g in d_grads]))),
        "g_grad_norm": float(torch.linalg.vector_norm(torch.stack([g.norm() for g in g_grads]))),
    }


def trace(params_path: str, arm: dict[str, Any], seed: int, steps: int, every: int
          ) -> tuple[list[dict[str, float]], TrainState]:  # fmt: skip
    """Train the arm at `seed` for `steps`, looking every `every` steps: the looks, in order, and the run."""
    device = torch.device("cpu")
    params = with_overrides(load_params(params_path), {**arm, "train.steps": steps, "train.seed": seed,
                                                       "train.device": "cpu", "train.fid_every": every,
                                                       "train.log_every": every})  # fmt: skip
    paths = Layout(dataset=params.data.dataset)
    images, labels = training_data(params, paths, device)
    frozen = scorer.Scorer.load(paths, params, device)
    n_classes = len(frozen.reference.label_distribution)
    params, _ = levers.choose(params, device, n_classes)
    state = new_state(params.model, params.train, device, n_classes)
    pick = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(0, images.shape[0], (PROBE,), generator=pick)
    real = data.to_model(images[idx])
    z = torch.randn(PROBE, params.model.latent_dim, generator=pick)
    probe_labels = labels[idx] if params.model.conditional else None
    looks: list[dict[str, float]] = []

    def look(state: TrainState) -> None:
        since = max(
            (look["step"] for look in looks if look["step"] < state.step), default=0
        )  # after a rollback too
        rows = [r for r in state.history if r[0] > since]
        row: dict[str, float] = {"step": state.step}
        output = frozen.watch(state.output, params)
        if state.ema is not None:
            row["fid_ema"] = round(output["fid"], 2)
            output = frozen.watch(state.generator, params) | {"classes_covered": output["classes_covered"]}
        row["fid_g"] = round(output["fid"], 2)
        row["classes_covered"] = output["classes_covered"]
        for i, column in enumerate(LOG_COLUMNS, start=1):
            row[column] = round(statistics.fmean(r[i] for r in rows), 4)
        row |= {key: round(value, 4) for key, value in probe(state, params, real, z, probe_labels).items()}
        looks.append(row)
        print(json.dumps(row), flush=True)

    callbacks = Callbacks(
        on_eval=look,
        on_watch=lambda state: frozen.watch(state.output, params)["fid"],
        on_rescue=lambda event: print(event.sentence(), flush=True),
    )
    train(state, images, params.train, params.model.latent_dim, callbacks, labels=labels)
    return looks, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument(
        "--arm", default="{}", help="JSON of dotted overrides, e.g. '{\"train.lr_d\": 0.001}'"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--out", help="write the looks to this JSON file")
    args = parser.parse_args()
    looks, _ = trace(args.params, json.loads(args.arm), args.seed, args.steps, args.every)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"arm": json.loads(args.arm), "seed": args.seed, "looks": looks}, f, indent=1)


if __name__ == "__main__":
    main()
