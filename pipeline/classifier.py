"""Stage `classifier`: train the frozen MNIST classifier whose features every score uses."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.data import Mnist, load_prepared, to_model
from pipeline.errors import UserError
from pipeline.layout import Layout
from pipeline.models import Classifier, build_classifier
from pipeline.params import ClassifierParams, load_params
from pipeline.runtime import pick_device, remove_stale_temps, seed_everything, sha256_file, write_json
from pipeline.scoring import classify, save_classifier

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


def evaluate_on_test(model: Classifier, mnist: Mnist, device: torch.device) -> dict[str, float]:
    """Accuracy and mean cross-entropy on the test set, through the same path scoring uses."""
    _, probs = classify(model, mnist.test_images, EVAL_BATCH, device)
    p_true = probs[np.arange(probs.shape[0]), mnist.test_labels]
    return {
        "test_accuracy": float((probs.argmax(axis=1) == mnist.test_labels).mean()),
        "test_loss": float(-np.log(np.maximum(p_true, 1e-12)).mean()),
    }


def train_classifier(
    params: ClassifierParams, mnist: Mnist, device: torch.device
) -> tuple[Classifier, dict[str, float | int]]:
    """Train build_classifier(params) on the training set; return it and its test metrics.

    AdamW with a one-cycle LR schedule and random +-2 px shifts: 4 epochs reach ~99.5%.
    """
    seed_everything(params.seed)
    generator = torch.Generator().manual_seed(params.seed)  # shuffling and augmentation
    model = build_classifier(params).to(device)
    images = torch.from_numpy(mnist.train_images).to(device)  # uint8 (N, 28, 28): 47 MB for MNIST
    labels = torch.from_numpy(mnist.train_labels).to(device)
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
    report: dict[str, float | int] = {**evaluate_on_test(model, mnist, device), "epochs": params.epochs}
    report["seconds"] = round(time.perf_counter() - start, 1)
    return model.eval(), report


def main(params_path: Path = Path("params.yaml")) -> None:
    params, paths = load_params(params_path).classifier, Layout()
    remove_stale_temps(*paths.outputs("classifier"))  # what a killed earlier run's atomic writes left
    mnist = load_prepared(paths.prepared)
    device = pick_device("auto")
    model, report = train_classifier(params, mnist, device)
    accuracy = report["test_accuracy"]
    if accuracy < params.min_accuracy:
        raise UserError(
            f"the classifier reached test accuracy {accuracy:.4f}, below classifier.min_accuracy "
            f"{params.min_accuracy}; nothing was written (train longer or adjust the classifier params)."
        )
    save_classifier(model, paths.classifier)
    provenance = {"sha256": sha256_file(paths.classifier), "feature_dim": params.feature_dim, "device": device.type}
    write_json(paths.classifier_metrics, {**report, **provenance, "torch": torch.__version__})
    print(f"test accuracy {accuracy:.4f} (loss {report['test_loss']:.4f}), {report['seconds']} s -> {paths.classifier}")
