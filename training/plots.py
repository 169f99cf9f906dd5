"""The loss-curve figure a finished run leaves in its directory."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curves(history: list[dict], path: Path, title: str) -> None:
    """Train and held-out loss (nats per character) against the optimizer step, saved as a PNG."""
    trained = [h for h in history if h["train_loss"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot([h["step"] for h in trained], [h["train_loss"] for h in trained], label="train", marker=".")
    ax.plot([h["step"] for h in history], [h["val_loss"] for h in history], label="held-out", marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
