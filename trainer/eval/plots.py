"""ROC and CMC figures as PNG files (matplotlib's Agg canvas: no display, no pyplot global state)."""
from __future__ import annotations

import io
import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.atomic import atomic_write_bytes


def _save(fig: Figure, path: str | os.PathLike) -> None:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _thin(fpr: np.ndarray, tpr: np.ndarray, points: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """At most about `points` ROC points, log-spaced in FAR (an all-to-all ROC can have a million)."""
    if len(fpr) <= 2 * points:
        return fpr, tpr
    grid = np.logspace(-8, 0, points)
    idx = np.unique(np.searchsorted(fpr, grid, side="right") - 1)  # the last point at or below each FAR
    idx = idx[idx >= 0]
    return fpr[idx], tpr[idx]


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike,
             title: str = "ROC", fars: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)) -> None:
    """TAR against FAR (log scale) for each {label: (fpr, tpr)}; FAR = 0 points cannot show on it."""
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    lowest = 1.0
    for label, (fpr, tpr) in curves.items():
        fpr, tpr = _thin(np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float))
        shown = fpr > 0
        if shown.any():
            ax.step(fpr[shown], tpr[shown], where="post", label=label)
            lowest = min(lowest, float(fpr[shown].min()))
    ax.set_xscale("log")
    ax.set_xlim(max(min(fars), lowest), 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if curves:
        ax.legend(loc="lower right", fontsize="small")
    _save(fig, path)


def plot_cmc(curves: Mapping[str, Sequence[float]], path: str | os.PathLike, title: str = "CMC") -> None:
    """Identification rate against rank for each {label: rates at ranks 1..K}."""
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    for label, rates in curves.items():
        rates = np.asarray(rates, dtype=float)
        ax.plot(np.arange(1, len(rates) + 1), rates, marker="o", markersize=3, label=label)
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(loc="lower right", fontsize="small")
    _save(fig, path)
