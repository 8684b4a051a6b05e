"""Faithfulness and completeness curves: one panel per circuit, intervals shaded, random circuits as a band; and
the annotated heatmap panel the similarity and direction figures are made of."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refusal_sae.evaluation import ALL_LAYERS, CircuitEvaluation, Curve
from refusal_sae.io import atomic_open

COLOURS = {"correlation": "tab:blue", "attribution": "tab:red", "magnitude": "tab:green"}
MODE_STYLE = {"keep": "-", "nodes": ":"}


def _series(curve: Curve, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, v, lo, hi = [], [], [], []
    for p in curve.points:
        r = getattr(p, key)
        if r is not None:
            x.append(p.n_nodes)
            v.append(r.value)
            lo.append(r.low)
            hi.append(r.high)
    return tuple(np.array(a, dtype=float) for a in (x, v, lo, hi))  # type: ignore[return-value]


def plot_curves(results: Mapping[str, Sequence[CircuitEvaluation]], path: Path) -> None:
    """Per circuit, for each method: faithfulness (solid) and completeness (dashed) of the all-layer curves
    with 95% intervals, the random circuits' faithfulness band (grey), per-layer faithfulness (thin)."""
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(r.name for rs in results.values() for r in rs))
    if not names:
        return
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        for method, rs in results.items():
            r = next((r for r in rs if r.name == name), None)
            if r is None:
                continue
            colour = COLOURS.get(r.method, "tab:purple")
            for curve in r.curves:
                style = MODE_STYLE.get(curve.error_mode, "-")
                if curve.scope != ALL_LAYERS:
                    x, v, _, _ = _series(curve, "faithfulness")
                    ax.plot(x, v, style, color=colour, lw=0.7, alpha=0.5)
                    continue
                label = f"{method} ({curve.error_mode} errors)"
                for key, marker in (("faithfulness", "o"), ("completeness", "s")):
                    x, v, lo, hi = _series(curve, key)
                    ls = style if key == "faithfulness" else "--"
                    ax.plot(x, v, ls, marker=marker, ms=3, color=colour, label=f"{label} {key}")
                    ax.fill_between(x, lo, hi, color=colour, alpha=0.15, lw=0)
                band = [(p.n_nodes, p.random_faithfulness) for p in curve.points if p.random_faithfulness]
                if band:
                    bx = [n for n, _ in band]
                    ax.fill_between(bx, [b.min for _, b in band], [b.max for _, b in band], color="grey", alpha=0.25,
                                    lw=0, label=f"random circuits ({curve.error_mode}) faithfulness")
            if r.curves and r.curves[0].ratio_note:
                ax.text(0.02, 0.5, "ratios undefined:\nF(M) - F(∅) not\ndistinguishable from 0",
                        transform=ax.transAxes, fontsize=7, color="darkred")
        if any(len(line.get_xdata()) for line in ax.get_lines()):
            ax.set_xscale("log")  # a circuit whose ratios are all undefined has no point to scale
        ax.axhline(1, color="grey", lw=0.5)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("nodes in circuit")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=5)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def annotated_heatmap(ax: Any, values: np.ndarray, texts: Sequence[Sequence[str]], rows: Sequence[str],
                      columns: Sequence[str], title: str, **imshow: Any) -> Any:
    """One heatmap panel with a text in every cell, white on dark colours (luminance below 0.5), and NaN cells in
    the colour map's "bad" colour; returns the image, for a colour bar."""
    image = ax.imshow(np.ma.masked_invalid(values), **imshow)
    for i, j in np.ndindex(values.shape):
        r, g, b, _ = image.cmap(image.norm(np.ma.masked_invalid([values[i, j]])))[0]
        ax.text(j, i, texts[i][j], ha="center", va="center", fontsize=max(5, 10 - max(values.shape) // 3),
                color="white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(title)
    return image


__all__ = ["annotated_heatmap", "plot_curves"]
