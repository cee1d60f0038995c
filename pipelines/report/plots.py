"""Matplotlib (Agg) figures of the quality report, each returned as PNG bytes to embed in the HTML."""
from __future__ import annotations

import io
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: no display, no GUI toolkit
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

FIGSIZE = (7.0, 3.2)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def _empty(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def stacked_bars(table: Mapping[str, Mapping[str, int]], title: str, xlabel: str) -> bytes:
    """One horizontal bar per outer key, stacked by inner key (e.g. dataset x reject reason)."""
    fig, ax = plt.subplots(figsize=(FIGSIZE[0], max(2.2, 0.4 * len(table) + 1.2)))
    inner = sorted({k for row in table.values() for k in row})
    if not table or not inner:
        _empty(ax, "none")
    else:
        rows = list(table)[::-1]
        left = np.zeros(len(rows))
        cmap = plt.get_cmap("tab20")
        for i, key in enumerate(inner):
            vals = np.array([table[r].get(key, 0) for r in rows], dtype=float)
            ax.barh(rows, vals, left=left, label=key, color=cmap(i % 20))
            left += vals
        ax.legend(fontsize=7, loc="best")
        ax.set_xlabel(xlabel)
    ax.set_title(title)
    return _png(fig)


def histograms(series: Mapping[str, Sequence[float]], title: str, xlabel: str, bins: int = 30,
               log_x: bool = False) -> bytes:
    """Overlaid step histograms, one per named series (e.g. per dataset)."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    data = {k: np.asarray(v, dtype=float) for k, v in series.items() if len(v)}
    if not data:
        _empty(ax)
    else:
        allv = np.concatenate(list(data.values()))
        lo, hi = float(allv.min()), float(allv.max())
        if log_x and lo > 0:
            edges = np.geomspace(lo, hi if hi > lo else lo * 1.01, bins + 1)
            ax.set_xscale("log")
        else:
            edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
        for name, values in data.items():
            ax.hist(values, bins=edges, histtype="step", linewidth=1.5, label=f"{name} (n={len(values)})")
        ax.legend(fontsize=7)
        ax.set_ylabel("count")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return _png(fig)


def size_scatter(series: Mapping[str, tuple[Sequence[int], Sequence[int]]], title: str) -> bytes:
    """Width x height scatter per dataset (sizes cluster, so a scatter reads better than two histograms)."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    if not any(len(w) for w, _ in series.values()):
        _empty(ax)
    else:
        for name, (w, h) in series.items():
            if len(w):
                ax.scatter(w, h, s=10, alpha=0.6, label=name)
        ax.set_xlabel("width (px)")
        ax.set_ylabel("height (px)")
        ax.legend(fontsize=7)
    ax.set_title(title)
    return _png(fig)
