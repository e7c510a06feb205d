"""The loss-curve PNG written at the end of a run, from the CSV logger's metrics files.

Each launch of a run (the first, then every resume) logs to its own logs/version_N directory;
the curve stitches them in order, a later launch replacing the steps it re-ran.
"""
from __future__ import annotations

import csv
from pathlib import Path

KEYS = ("train/loss", "val/loss")


def _read(metrics_csv: Path, keys: tuple[str, ...]) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = {k: {} for k in keys}
    with metrics_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("step") in (None, ""):
                continue
            for k in keys:
                if row.get(k) not in (None, ""):
                    series[k][int(float(row["step"]))] = float(row[k])
    return series


def read_history(logs_dir: Path, keys: tuple[str, ...] = KEYS) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs per key across every launch of a run, sorted by step."""
    versions = sorted(logs_dir.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1]))
    merged: dict[str, dict[int, float]] = {k: {} for k in keys}
    for path in versions:
        for k, points in _read(path, keys).items():
            if points:  # a resumed launch restarts at its checkpoint: drop what it re-ran
                first = min(points)
                merged[k] = {s: v for s, v in merged[k].items() if s < first}
                merged[k].update(points)
    return {k: sorted(v.items()) for k, v in merged.items()}


def plot_loss_curve(logs_dir: Path, out_png: Path, title: str) -> Path | None:
    """Train (and validation, when there is one) loss against step. None when nothing was logged."""
    series = read_history(logs_dir)
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
