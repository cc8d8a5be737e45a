"""Plots of a run, from its ``train_log.jsonl``: the loss curve and the loss by timestep (PNG)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LOSS_PNG = "loss.png"
LOSS_BY_T_PNG = "loss_by_timestep.png"


def smooth(values: np.ndarray, beta: float = 0.98) -> np.ndarray:
    """Bias-corrected exponential moving average (what the progress bar shows)."""
    out, avg = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def write_plots(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import atomic_write

    run_dir = Path(run_dir)
    log = run_dir / "train_log.jsonl"
    if not log.is_file():
        return []
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if not rows:
        return []
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    written = []

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, loss, lw=0.6, alpha=0.35, label="loss")
    ax.plot(steps, smooth(loss), lw=1.5, label="smoothed")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{run_dir.name}: training loss")
    ax.legend()
    fig.tight_layout()
    written.append(atomic_write(run_dir / LOSS_PNG, lambda tmp: fig.savefig(tmp, format="png")))
    plt.close(fig)

    t = np.array([np.mean(r["t"]) for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.scatter(t, loss, s=6, alpha=0.5, c=steps, cmap="viridis")
    edges = np.linspace(0, 1, 11)
    which = np.clip(np.digitize(t, edges) - 1, 0, 9)
    means = [loss[which == i].mean() if np.any(which == i) else np.nan for i in range(10)]
    ax.plot((edges[:-1] + edges[1:]) / 2, means, "k-o", ms=3, label="mean per bin")
    ax.set_xlabel("timestep t (after the shift; colour = step)")
    ax.set_ylabel("loss")
    ax.set_title(f"{run_dir.name}: loss by timestep")
    ax.legend()
    fig.tight_layout()
    written.append(atomic_write(run_dir / LOSS_BY_T_PNG, lambda tmp: fig.savefig(tmp, format="png")))
    plt.close(fig)
    return written
