"""The loss-curve PNG written at the end of a run, from the CSV logger's metrics file."""
from __future__ import annotations

import csv
from pathlib import Path


def read_series(metrics_csv: Path, keys: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs per key; rows without the key are skipped (the CSV is sparse)."""
    series: dict[str, list[tuple[int, float]]] = {k: [] for k in keys}
    with metrics_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            for k in keys:
                if row.get(k) not in (None, "") and row.get("step") not in (None, ""):
                    series[k].append((int(float(row["step"])), float(row[k])))
    return series


def plot_loss_curve(metrics_csv: Path, out_png: Path, title: str) -> Path | None:
    """Train (and validation, when there is one) loss against step. None when nothing was logged."""
    if not metrics_csv.is_file():
        return None
    series = read_series(metrics_csv, ("train/loss", "val/loss"))
    if not series["train/loss"]:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for key, label in (("train/loss", "train"), ("val/loss", "validation")):
        if series[key]:
            steps, values = zip(*series[key])
            ax.plot(steps, values, label=label, marker="o" if len(steps) < 30 else None, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
