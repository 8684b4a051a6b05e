"""Every figure, drawn from a stage's record and written as a PNG where the run layout says: the prompts per
category (data report), faithfulness and completeness curves (one panel per circuit, intervals shaded, random circuits as a band), the
similarity heatmaps, the split-half noise ceiling, the circuit cross-ablation matrix and the refusal directions' matrix, all made of one
annotated heatmap panel; the over-refusal trade-off."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from refusal_sae.io import atomic_open

if TYPE_CHECKING:  # records are read, never built, here: the data stage draws without importing the analysis
    from refusal_sae.ceiling import Ceiling
    from refusal_sae.cross_ablation import CrossAblationResult
    from refusal_sae.directions import DirectionsResult
    from refusal_sae.evaluation import CircuitEvaluation, Curve
    from refusal_sae.overrefusal import TradeoffResult
    from refusal_sae.similarity import Similarity
    from refusal_sae.stats import Effect

COLOURS = {"correlation": "tab:blue", "attribution": "tab:red", "magnitude": "tab:green"}
MODE_STYLE = {"keep": "-", "nodes": ":"}
CMAP = colormaps["viridis"].with_extremes(bad="lightgray")
"""Heatmap colours of similarities and shares; undefined (None) ones are grey."""


def _save(fig: Figure, path: Path, dpi: int) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)


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


def _effect_word(r: CircuitEvaluation) -> str | None:
    """None where the circuit's first curve has a measurable positive F(M) - F(∅), else what it has instead."""
    span = r.curves[0].span if r.curves else None
    if span is not None and span.above_zero():
        return None
    return "negative F(M) - F(∅)" if span is not None and span.high < 0 else "nothing measurable"


def plot_curves(results: Mapping[str, Sequence[CircuitEvaluation]], path: Path) -> list[str]:
    """Per circuit with a measurable effect, for each method: faithfulness (solid) and completeness (dashed) of the
    all-layer curves with 95% intervals, the random circuits' faithfulness band (grey), per-layer faithfulness
    (thin). Circuits without one (F(M) - F(∅)'s interval contains 0, or lies below it) get no panel, only their
    name in the figure's note: an empty axis or a curve of a negative effect would show what was not measured.
    Returns the circuits drawn."""
    names = list(dict.fromkeys(r.name for rs in results.values() for r in rs))
    if not names:
        return []
    words = {name: {m: _effect_word(r) for m, rs in results.items() for r in rs if r.name == name} for name in names}
    shown = [n for n in names if any(w is None for w in words[n].values())]
    skipped = [f"{n} ({', '.join(sorted(set(words[n].values())))})" for n in names if n not in shown]
    note = "no panel, as F(M) - F(∅) is not measurably positive: " + "; ".join(skipped) if skipped else None
    cols = max(1, min(len(shown), 4))
    rows = max(1, -(-len(shown) // cols))
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows + (0.4 if note else 0)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    if note:
        fig.suptitle(textwrap.fill(note, 40 * cols), fontsize=8, color="darkred")
    for ax, name in zip(axes, shown):
        for method, rs in results.items():
            r = next((r for r in rs if r.name == name), None)
            if r is None:
                continue
            if words[name][method] is not None:
                ax.text(0.02, 0.9 - 0.1 * list(results).index(method), f"{method}: {words[name][method]}",
                        transform=ax.transAxes, fontsize=7, color="darkred")
                continue
            colour = COLOURS.get(r.method, "tab:purple")
            for curve in r.curves:
                style = MODE_STYLE.get(curve.error_mode, "-")
                if not curve.all_layers:
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
        if any(len(line.get_xdata()) for line in ax.get_lines()):
            ax.set_xscale("log")  # a circuit whose ratios are all undefined has no point to scale
        ax.axhline(1, color="grey", lw=0.5)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("nodes in circuit")
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    if shown:
        axes[0].legend(fontsize=5)
    _save(fig, path, 100)
    return shown


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


def plot_similarity(result: Similarity, path: Path) -> None:
    """Node and edge Jaccard of the category circuits side by side (`similarity.analyse_similarity`'s record);
    * marks p < significance."""
    names = result.circuits
    n = len(names)
    level = result.config.significance
    records = {(r.a, r.b): r for r in result.pairs}
    side = 1.5 + 0.55 * n
    fig = Figure(figsize=(2 * side + 1.5, side), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, kind in zip(axes, ("node", "edge")):
        values = np.array([[np.nan if v is None else v for v in row] for row in getattr(result, f"{kind}_jaccard")])

        def text(i: int, j: int) -> str:
            record = records.get((names[i], names[j])) or records.get((names[j], names[i]))
            pv = getattr(record, f"{kind}_p_value") if record else None
            star = "*" if pv is not None and pv < level else ""
            return "n/a" if np.isnan(values[i, j]) else f"{values[i, j]:.2f}{star}"

        texts = [[text(i, j) for j in range(n)] for i in range(n)]
        image = annotated_heatmap(ax, values, texts, names, names, f"{kind} Jaccard (* p < {level})", vmin=0, vmax=1,
                                  cmap=CMAP)
    fig.colorbar(image, ax=axes, label="Jaccard")
    fig.suptitle(f"Refusal circuits: {result.verdict.label}")
    _save(fig, path, 120)


def plot_ceiling(result: Ceiling, path: Path) -> None:
    """Left: node Jaccard against circuit size, within a category (two halves; mean over categories), between
    categories (mean over pairs) and the matched null. Right: R, the between-category similarity as a fraction of
    the ceiling, with its interval over splits and the verdict thresholds."""
    n = np.array([s.n_nodes for s in result.sizes], float)
    fig = Figure(figsize=(9.5, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    within = [np.mean([c.within.value for c in s.categories]) for s in result.sizes]
    between = [np.mean([p.between.value for p in s.pairs]) for s in result.sizes]
    null = [np.mean([c.null for c in s.categories]) for s in result.sizes]
    for values, label, style in ((within, "within (two halves)", "-o"), (between, "between categories", "-s"),
                                 (null, "matched null", ":")):
        left.plot(n, values, style, label=label)
    left.set(xscale="log", xlabel="circuit size (nodes)", ylabel="node Jaccard", ylim=(0, 1.02),
             title=f"{result.method}: {result.splits} half splits")
    left.legend(fontsize=8)
    defined = [(s.n_nodes, s.relative) for s in result.sizes if s.relative is not None]
    if defined:
        x = np.array([d[0] for d in defined], float)
        right.errorbar(x, [d[1].value for d in defined], yerr=[[d[1].value - d[1].low for d in defined],
                                                                [d[1].high - d[1].value for d in defined]],
                       fmt="o-", capsize=3, color="black")
    cfg = result.config
    right.axhspan(cfg["monolithic_above"], max(1.5, right.get_ylim()[1]), color="tab:red", alpha=0.08)
    right.axhspan(min(-0.5, right.get_ylim()[0]), cfg["modular_below"], color="tab:blue", alpha=0.08)
    right.axhline(0, color="gray", lw=0.5)
    right.axhline(1, color="gray", lw=0.5)
    right.set(xscale="log", xlim=left.get_xlim(), xlabel="circuit size (nodes)",
              ylabel="R = (between - null) / ceiling", title=f"verdict: {result.verdict}")
    missing = [s.n_nodes for s in result.sizes if s.relative is None]
    if missing:
        right.text(0.02, 0.02, f"unmeasurable at {missing}", transform=right.transAxes, fontsize=8)
    _save(fig, path, 110)


def _shares(ablation: Sequence[Sequence[Effect]], transfers: Callable[[int, int], bool]
            ) -> tuple[np.ndarray, list[list[str]]]:
    """The shares of an ablation matrix and their cell texts: "n/a" where undefined, * where the pair transfers."""
    values = np.array([[np.nan if e.share is None else e.share.value for e in row] for row in ablation])
    texts = [["n/a" if np.isnan(v) else f"{v:.2f}" + "*" * transfers(a, b) for b, v in enumerate(row)]
             for a, row in enumerate(values)]
    return values, texts


def plot_cross_ablation(result: CrossAblationResult, path: Path) -> None:
    """Heatmap of share(A -> B) (rows: the category whose circuit is ablated, columns: the category whose F is
    measured; * its change's interval lies below 0)."""
    categories = result.categories
    values, texts = _shares(result.ablation, result.transfers)
    side = 2 + 0.55 * len(categories)
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    labels = [f"{r.category} ({r.n_nodes})" for r in result.rows]
    image = annotated_heatmap(ax, values, texts, labels, categories,
                              f"{result.method}: share of each category's own-circuit F change\n(rows: circuit "
                              "ablated, with its nodes; * change below 0)", vmin=0, vmax=1, cmap=CMAP, aspect="auto")
    ax.set_xlabel(f"category whose held-out prompts' F ({result.target}) is measured")
    fig.colorbar(image, ax=ax, label="share")
    _save(fig, path, 110)


def plot_directions(result: DirectionsResult, path: Path) -> None:
    """Heatmaps: the share of each category's own-direction effect that each direction's ablation has (rows:
    ablated, columns: measured; * transfers beyond random directions), and the directions' cosines."""
    names, categories = result.names, result.categories
    values, texts = _shares(result.ablation, result.transfers)
    cosine = np.array(result.cosine)
    side = 1.5 + 0.55 * len(names)
    fig = Figure(figsize=(2 * side + 2, side), layout="constrained")
    left, right = fig.subplots(1, 2)
    image = annotated_heatmap(left, values, texts, [f"{n} ablated" for n in names], categories,
                              f"share of each category's own-direction effect\n(* transfers: p <= "
                              f"{result.config['significance']})", vmin=0, vmax=1, cmap=CMAP, aspect="auto")
    left.set_xlabel("category whose held-out toxic prompts are scored")
    fig.colorbar(image, ax=left, label="share")
    image = annotated_heatmap(right, cosine, [[f"{c:.2f}" for c in row] for row in cosine], names, names,
                              "cosine of the directions", vmin=-1, vmax=1, cmap="RdBu_r")
    fig.colorbar(image, ax=right, label="cosine")
    fig.suptitle(f"Refusal directions at {result.selection.layer}, position {result.selection.position}: "
                 f"{result.verdict.label}")
    _save(fig, path, 110)


def plot_tradeoff(result: TradeoffResult, path: Path) -> None:
    """Toxic refusal against over-refusal (hard-but-safe prompts refused), pooled, one line per method through its
    sweep's points (Wilson intervals on both axes), the unedited model a black star, the chosen points ringed, and
    the line through the origin and the unedited model (an edit on it lowers both refusals in proportion). Up and
    to the left is better."""
    fig = Figure(figsize=(7.5, 5.5), layout="constrained")
    ax = fig.subplots()
    colours = {"features": "tab:red", "refusal direction": "tab:blue", "false-refusal vector": "tab:green"}
    chosen = {(c.method, c.setting) for c in result.chosen}
    for method, colour in colours.items():
        mine = sorted((p for p in result.points if p.method == method), key=lambda p: p.hard.rate.value)
        if not mine:
            continue
        x = np.array([p.hard.rate.value for p in mine])
        y = np.array([p.toxic.rate.value for p in mine])
        # (Wilson bounds at 0/n and n/n sit on the estimate up to rounding)
        xerr = np.clip([[p.hard.rate.value - p.hard.rate.low, p.hard.rate.high - p.hard.rate.value] for p in mine],
                       0, None).T
        yerr = np.clip([[p.toxic.rate.value - p.toxic.rate.low, p.toxic.rate.high - p.toxic.rate.value]
                        for p in mine], 0, None).T
        ax.errorbar(x, y, yerr=yerr, xerr=xerr, color=colour, marker="o", capsize=2, lw=1.2, label=method, alpha=0.85)
        for p in mine:
            ax.annotate(p.setting, (p.hard.rate.value, p.toxic.rate.value), fontsize=7, color=colour,
                        xytext=(4, -9), textcoords="offset points")
            if (p.method, p.setting) in chosen:
                ax.scatter([p.hard.rate.value], [p.toxic.rate.value], s=160, facecolors="none", edgecolors=colour)
    base = result.points[0]
    ax.scatter([base.hard.rate.value], [base.toxic.rate.value], marker="*", s=220, color="black", zorder=5,
               label="unedited")
    if base.hard.rate.value > 0:  # an edit on this line lowers both refusals in proportion: no selectivity
        slope = base.toxic.rate.value / base.hard.rate.value
        end = min(1.0, 1.0 / slope) if slope > 0 else 1.0
        ax.plot([0, end], [0, slope * end], ls="--", color="grey", lw=0.8, label="both lowered in proportion")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(f"hard-but-safe prompts refused (over-refusal), n = {base.hard.n}")
    ax.set_ylabel(f"toxic prompts refused, n = {base.toxic.n}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"Lowering over-refusal: three edits swept (vectors at {result.layer}, {result.position}); "
                 "better is up and left", fontsize=9)
    _save(fig, path, 110)


def plot_category_counts(report: Mapping[str, Any], path: Path) -> None:
    """Grouped bars of a data report (`data.DataAnalyzer.report`): prompts per category, one bar per dataset type
    present."""
    categories = list(report["per_category"])
    types = [t for t, n in report["per_dataset_type"].items() if n]
    x = np.arange(len(categories))
    width = 0.8 / max(len(types), 1)
    fig = Figure(figsize=(max(6.0, 0.8 * len(categories) + 2), 4), layout="constrained")
    ax = fig.subplots()
    for i, t in enumerate(types):
        ax.bar(x + i * width, [report["per_category"][c][t] for c in categories], width, label=t)
    ax.set_xticks(x + width * (len(types) - 1) / 2, categories, rotation=30, ha="right")
    ax.set_ylabel("prompts")
    ax.set_title(f"OR-Bench prompts per category ({report['n_samples']} total)")
    ax.legend()
    _save(fig, path, 120)


__all__ = ["CMAP", "annotated_heatmap", "plot_category_counts", "plot_cross_ablation", "plot_curves", "plot_directions",
           "plot_similarity"]
