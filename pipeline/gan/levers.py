"""Speed levers chosen per machine: where forms compute the same function, the faster one here.

`train.fast_upsample` (the upsample + conv by phases as matrix products, by tap products, or as
torch's conv), `train.fast_output` (G's last conv as a 1x1 conv to its taps, or a 3x3 conv) and
`train.channels_last` (NHWC or NCHW) each take one of their forms (`FORMS`) or `auto`. Every form
of each gives the same function (tests/test_lever_choice.py: to 1e-5 in fp32); which is faster
depends on the CPU (AMX tiles, AVX512, AVX2) or GPU. For the `auto` ones, `choose` times every
combination of their forms once on this machine (a few training steps of the run's model and batch,
the forms taking turns three times, each keeping its median) and keeps the fastest in a small cache
(lever_cache.py), keyed by the processor's model, torch's version, the device, the precision, the
batch and the model; later runs read it and time nothing. The forms chosen are in the run's params
from then on (the checkpoint's fingerprint, MLflow's `levers` tag), so a run's numbers can be
reproduced by forcing them.

The defaults are not `auto` (true, true, false: the forms the project's reference numbers were
measured with), so a default run computes as it always has.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time

import torch

from pipeline import data, lever_cache, machine
from pipeline.gan.losses import LOSSES
from pipeline.gan.remedies import Remedies
from pipeline.params import Params
from pipeline.sections import LEVER_FORMS

FORMS = LEVER_FORMS  # the params that may be `auto`, and the forms `auto` chooses from (sections.py)
AUTO_LEVERS = tuple(FORMS)
WARMUP, TIMED = 3, 8  # training steps per form: untimed (allocation, kernel choice), then timed
ROUNDS = 3  # the forms take turns this many times; each keeps its median (a busy moment hits one round)


def auto_levers(params: Params) -> list[str]:
    return [name for name in AUTO_LEVERS if getattr(params.train, name) == "auto"]


def cache_key(params: Params, device: torch.device) -> str:
    """What the fastest forms depend on: the machine, torch, the precision, the batch, the model."""
    train = params.train
    return json.dumps(
        {
            "processor": machine.processor_name(device),
            "torch": torch.__version__,
            "device": device.type,
            "threads": torch.get_num_threads(),
            "precision": machine.resolve_precision(train.precision, device),
            "batch": train.batch_size,
            "model": params.model.model_dump(mode="json"),
            "levers": auto_levers(params),
        },
        sort_keys=True,
    )


def forms(params: Params) -> list[dict[str, bool | str]]:
    """Every combination of the auto levers' forms."""
    names = auto_levers(params)
    return [
        dict(zip(names, values, strict=True))
        for values in itertools.product(*(FORMS[name] for name in names))
    ]


def images_per_second(params: Params, device: torch.device, n_classes: int, timed: int = TIMED) -> float:
    """`timed` training steps of `params` (no lever `auto`) on random data, after WARMUP: img/s."""
    from pipeline.gan.loop import _autocast, train_step
    from pipeline.gan.state import new_state

    p = params.train
    state = new_state(params.model, p, device, n_classes)
    generator = torch.Generator(device="cpu").manual_seed(0)
    real = data.to_model(
        torch.randint(0, 256, (p.batch_size, 28, 28), dtype=torch.uint8, generator=generator)
    )
    z = torch.randn(p.batch_size, params.model.latent_dim, generator=generator)
    labels = torch.arange(p.batch_size) % n_classes if params.model.conditional else None
    real, z = real.to(device), z.to(device)
    labels = labels.to(device) if labels is not None else None
    autocast, loss, remedies = _autocast(device, p.precision), LOSSES[p.loss], Remedies.of(p)
    for step in range(WARMUP + timed):
        if step == WARMUP:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        train_step(state, real, z, autocast, loss, labels=labels, remedies=remedies)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return timed * p.batch_size / (time.perf_counter() - start)


def timings(
    params: Params, device: torch.device, n_classes: int, rounds: int = ROUNDS, timed: int = TIMED
) -> dict[str, list[float]]:
    """Each combination of the auto levers' forms, timed here over `timed` steps, the forms taking
    turns `rounds` times: {form as JSON: img/s of each turn}. Seeds torch's generators on the way
    (new_state): call it before the run's own state is made."""
    rates: dict[str, list[float]] = {json.dumps(form, sort_keys=True): [] for form in forms(params)}
    for _ in range(rounds):
        for form in forms(params):
            armed = params.model_copy(update={"train": params.train.model_copy(update=form)})
            rates[json.dumps(form, sort_keys=True)].append(images_per_second(armed, device, n_classes, timed))
    return rates


def measure(params: Params, device: torch.device, n_classes: int) -> dict[str, float]:
    """{form as JSON: median img/s} of `timings` (see there)."""
    return {
        form: round(statistics.median(values), 1)
        for form, values in timings(params, device, n_classes).items()
    }


def choose(params: Params, device: torch.device, n_classes: int) -> tuple[Params, str | None]:
    """`params` with every `auto` lever set to its faster form on this machine (timed once, then from the
    cache), and a line saying what was chosen and why; (params, None) when no lever is `auto`."""
    if not auto_levers(params):
        return params, None
    path, key = lever_cache.path(), cache_key(params, device)
    table, warning = lever_cache.read(path)
    entry = table.get(key)
    if not lever_cache.valid(entry, forms(params)):
        entry = {"img_s": measure(params, device, n_classes), "measured": time.strftime("%Y-%m-%d")}
        table[key] = entry
        lever_cache.write(path, table)
        how = f"timed here, kept in {path}"
    else:
        how = f"from {path}"
    best = max(entry["img_s"], key=entry["img_s"].get)
    chosen = json.loads(best)
    rates = ", ".join(f"{form}: {rate:,.0f} img/s" for form, rate in entry["img_s"].items())
    said = f"speed levers {' '.join(f'{k}={str(v).lower()}' for k, v in chosen.items())} ({how}; {rates})"
    resolved = params.model_copy(update={"train": params.train.model_copy(update=chosen)})
    return resolved, (f"{warning} " if warning else "") + said
