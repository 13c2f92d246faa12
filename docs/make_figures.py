"""The README's loss-curve figure from the train stage's log: `python docs/make_figures.py`.

Reads metrics/train_log.csv (the DVC plot the train stage writes) and draws D loss, G loss and
D accuracy per step, with their 100-step running means, to docs/losses.png.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def running_mean(values: np.ndarray, window: int = 100) -> np.ndarray:
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def main() -> None:
    with open(ROOT / "metrics/train_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    step = np.array([int(r["step"]) for r in rows])
    fig, (losses, accuracy) = plt.subplots(1, 2, figsize=(11, 3.6))
    for name, color in (("d_loss", "tab:blue"), ("g_loss", "tab:orange")):
        values = np.array([float(r[name]) for r in rows])
        losses.plot(step, values, color=color, alpha=0.25, linewidth=0.6)
        losses.plot(step[99:], running_mean(values), color=color, label=f"{name} (mean of 100 steps)")
    acc = np.array([float(r["d_acc"]) for r in rows])
    accuracy.plot(step, acc, color="tab:green", alpha=0.25, linewidth=0.6)
    accuracy.plot(step[99:], running_mean(acc), color="tab:green", label="d_acc (mean of 100 steps)")
    for ax, title in ((losses, "losses"), (accuracy, "D accuracy")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(loc="upper right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(ROOT / "docs/losses.png", dpi=100)
    print(f"-> {ROOT / 'docs/losses.png'}")


if __name__ == "__main__":
    main()
