"""The picture of a run's losses, ``loss.png``: training and validation bits/char per update.

Drawn with matplotlib's Agg canvas into bytes (no display, no global pyplot
state), so that the run can write it atomically beside its checkpoints.
"""

from __future__ import annotations

import io
import math

import numpy as np

PLOT_NAME = "loss.png"  # the picture's file name in the run folder


def plot_losses(train_losses: list[float], val_points: list[tuple[int, float]], title: str) -> bytes:
    """A PNG of training bits/char per update (raw and smoothed) and validation bits/char."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train_losses:
        y = np.array(train_losses) / math.log(2)
        x = np.arange(1, len(y) + 1)
        ax.plot(x, y, color="tab:blue", alpha=0.25, linewidth=0.8)
        w = max(1, len(y) // 50)
        if w > 1:
            smooth = np.convolve(y, np.ones(w) / w, mode="valid")
            ax.plot(x[w - 1:], smooth, color="tab:blue", linewidth=1.5, label="training")
        else:
            ax.lines[-1].set_label("training")
            ax.lines[-1].set_alpha(1.0)
    if val_points:
        s, v = zip(*val_points)
        ax.plot(s, v, "o-", color="tab:orange", markersize=4, label="validation")
    ax.set_xlabel("update")
    ax.set_ylabel("bits per character")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if train_losses or val_points:
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
