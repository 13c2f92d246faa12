"""Stage `classifier`: the frozen classifier of `data.dataset`, whose features every score uses.

One per dataset (models/classifier-<dataset>.pt), with a record of how it was made beside it
(models/classifier-<dataset>.json: its params, the SHA-256 of the data, its test accuracy and
its own SHA-256). The published datasets' classifiers are committed to git: while the record
matches the params and the data, the stage keeps the classifier and never retrains it, so a
fresh clone, or an experiment that switches the dataset, scores with the committed network.
Anything else (your own data, other classifier params) trains it here.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import data
from pipeline.data import Dataset, load_prepared, to_model
from pipeline.errors import UserError
from pipeline.files import read_json, remove_stale_temps, sha256_file, write_json
from pipeline.layout import Layout
from pipeline.machine import pick_device, seed_everything
from pipeline.params import ClassifierParams, load_params
from pipeline.scoring.frozen_classifier import Classifier, build_classifier, classify, save_classifier

MAX_SHIFT = 2  # augmentation: random translations of up to +-2 px
EVAL_BATCH = 1000


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image (N, 1, H, W) by its own random offset; the background (-1) fills in."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    # Offsets come from the CPU generator on every device, so the draw is the same everywhere.
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=generator).to(x.device)
    rows = (dy + torch.arange(h, device=x.device))[:, :, None]  # (N, H, 1)
    cols = (dx + torch.arange(w, device=x.device))[:, None, :]  # (N, 1, W)
    return padded[torch.arange(n, device=x.device)[:, None, None], 0, rows, cols].unsqueeze(1)


def evaluate_on_test(model: Classifier, dataset: Dataset, device: torch.device) -> dict[str, float]:
    """Accuracy and mean cross-entropy on the test set, through the same path scoring uses."""
    _, probs = classify(model, dataset.test_images, EVAL_BATCH, device)
    p_true = probs[np.arange(probs.shape[0]), dataset.test_labels]
    return {
        "test_accuracy": float((probs.argmax(axis=1) == dataset.test_labels).mean()),
        "test_loss": float(-np.log(np.maximum(p_true, 1e-12)).mean()),
    }


def train_classifier(
    params: ClassifierParams, dataset: Dataset, device: torch.device, n_classes: int = 10
) -> tuple[Classifier, dict[str, float | int]]:
    """Train build_classifier(params) on the training set; return it and its test metrics.

    AdamW with a one-cycle LR schedule and random +-2 px shifts: 4 epochs reach ~99.5%.
    """
    seed_everything(params.seed)
    generator = torch.Generator().manual_seed(params.seed)  # shuffling and augmentation
    model = build_classifier(params, n_classes).to(device)
    images = torch.from_numpy(dataset.train_images).to(device)  # uint8 (N, 28, 28): 47 MB for MNIST
    labels = torch.from_numpy(dataset.train_labels).to(device)
    n = images.shape[0]
    steps = math.ceil(n / params.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=params.lr, total_steps=params.epochs * steps
    )
    start = time.perf_counter()
    for epoch in range(params.epochs):
        model.train()
        order = torch.randperm(n, generator=generator).to(device)
        loss_sum = torch.zeros((), device=device)  # summed on device: no host sync per step
        correct = torch.zeros((), device=device, dtype=torch.long)
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{params.epochs}", leave=False, disable=None)
        for step in bar:
            idx = order[step * params.batch_size : (step + 1) * params.batch_size]
            x = random_shift(to_model(images[idx]), MAX_SHIFT, generator)  # (B, 1, 28, 28)
            logits = model(x)  # (B, 10)
            loss = F.cross_entropy(logits, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.detach() * idx.numel()
            correct += (logits.argmax(dim=1) == labels[idx]).sum()
        print(
            f"epoch {epoch + 1}/{params.epochs}: train loss {loss_sum.item() / n:.4f}, "
            f"train accuracy {correct.item() / n:.4f}, {time.perf_counter() - start:.0f} s",
            flush=True,
        )
    report: dict[str, float | int] = {**evaluate_on_test(model, dataset, device), "epochs": params.epochs}
    report["seconds"] = round(time.perf_counter() - start, 1)
    return model.eval(), report


def record_of(params: ClassifierParams, dataset: Dataset, classes: tuple[str, ...]) -> dict[str, object]:
    """What a classifier is kept for: the params that shape its training, the data, the classes."""
    return {
        "params": params.model_dump(exclude={"min_accuracy"}),
        "data_sha256": data.fingerprint(dataset),
        "classes": list(classes),
    }


def kept(paths: Layout, wanted: dict[str, object]) -> dict[str, object] | None:
    """The record of the classifier in place, if it was made as `wanted` and its weights are those recorded."""
    if not (paths.classifier.is_file() and paths.classifier_record.is_file()):
        return None
    record = read_json(paths.classifier_record)
    same = all(record.get(key) == value for key, value in wanted.items())
    return record if same and record.get("sha256") == sha256_file(paths.classifier) else None


def main(params_path: Path = Path("params.yaml")) -> None:
    full = load_params(params_path)
    paths = Layout(dataset=full.data.dataset)
    params = full.classifier.model_copy(
        update={"epochs": full.classifier.epochs or data.classifier_epochs(full.data)}
    )
    remove_stale_temps(*paths.outputs("classifier"))  # what a killed earlier run's atomic writes left
    classes = data.class_names(full.data)
    dataset = load_prepared(paths.prepared, len(classes))
    wanted = record_of(params, dataset, classes)
    if (record := kept(paths, wanted)) is not None:
        write_json(
            paths.classifier_metrics, {k: v for k, v in record.items() if k not in ("params", "classes")}
        )
        print(
            f"kept {paths.classifier}: made with these params from this data (test accuracy "
            f"{record['test_accuracy']:.4f}); delete it, or change classifier.*, to train another."
        )
        return
    floor = params.min_accuracy if params.min_accuracy is not None else data.min_accuracy(full.data)
    device = pick_device("auto")
    model, report = train_classifier(params, dataset, device, len(classes))
    accuracy = report["test_accuracy"]
    if accuracy < floor:
        which = (
            "classifier.min_accuracy"
            if params.min_accuracy is not None
            else f"the floor of {full.data.dataset}"
        )
        raise UserError(
            f"the classifier reached test accuracy {accuracy:.4f}, below {which} {floor}; nothing was written "
            "(train longer or adjust the classifier params)."
        )
    save_classifier(model, paths.classifier)
    provenance = {
        "sha256": sha256_file(paths.classifier),
        "feature_dim": params.feature_dim,
        "device": device.type,
    }
    metrics = {**report, **provenance, "torch": torch.__version__, "dataset": full.data.dataset}
    write_json(paths.classifier_record, {**metrics, **wanted})
    write_json(paths.classifier_metrics, metrics)
    print(
        f"test accuracy {accuracy:.4f} (loss {report['test_loss']:.4f}), {report['seconds']} s -> {paths.classifier}"
    )
