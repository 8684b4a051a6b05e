"""Correlation discovery (the spec's method): nodes whose per-prompt value goes with the label.

Node value per prompt: the latent's mean over the prompt's tokens of the node's position class (the
error node: the error's mean norm), `refusal_sae.features`. Importance = |Pearson r| with the label
(toxic, or refused); a node enters the circuit when |r| >= threshold (and, optionally, its corrected
p-value <= alpha). Because the shared template prefix is never a node and each position class is
averaged on its own, a latent that fires only on template tokens cannot pass for a label effect
through prompt length (a per-prompt mean over all tokens would be ~ 1/length, and toxic prompts are
shorter than safe ones in several OR-Bench categories).

When the labels do not vary (a circuit of toxic prompts only) the importance is the spec's magnitude
score 0.7 mean|a| + 0.3 var(a), and the top_n nodes per layer enter.

Edges join nodes of adjacent hooked layers whose per-prompt values correlate with |r| >= edge_threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

from refusal_sae.circuits import ERROR, Edge, Node, NodeScores
from refusal_sae.errors import UserError
from refusal_sae.features import PromptFeatures
from refusal_sae.validate import one_of, positive_int

Correction = Literal["none", "bonferroni", "fdr_bh"]


@dataclass
class CorrelationConfig:
    """Correlation discovery's options."""

    threshold: float = 0.5
    """|Pearson r| a node needs to enter the circuit. With few prompts chance correlations are large
    (|r| >= 0.5 has p ~ 0.05 at 16 prompts): set it with the prompt count in mind."""
    alpha: float | None = None
    """Also require the (corrected) p-value <= alpha; null: |r| alone decides."""
    correction: Correction = "none"
    """Multiple-testing correction of the p-values over all nodes of a circuit."""
    top_n: int = 20
    """Nodes per layer when labels have no variance (magnitude score)."""
    edge_threshold: float = 0.3
    """|Pearson r| of two nodes' values for an edge between adjacent layers."""

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise UserError(f"discovery.correlation.threshold: {self.threshold} is not a |correlation| in [0, 1]")
        if self.edge_threshold < 0:
            raise UserError(f"discovery.correlation.edge_threshold: {self.edge_threshold} must be >= 0")
        positive_int("discovery.correlation.top_n", self.top_n, 20)
        if self.alpha is not None and not 0 < self.alpha <= 1:
            raise UserError(f"discovery.correlation.alpha: {self.alpha} is not a p-value level in (0, 1]")
        one_of("discovery.correlation.correction", self.correction, ("none", "bonferroni", "fdr_bh"))


def pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each column of `x` (n, m) with each column of `y` (n, p) as an (m, p) array.

    0 where a column is constant, or varies only at float32 rounding level of its magnitude: r is
    scale-free, so rounding noise that happens to track prompt length would otherwise look like signal.
    """
    x, y = x.astype(np.float64), y.astype(np.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    nx_, ny_ = np.linalg.norm(xc, axis=0), np.linalg.norm(yc, axis=0)
    floor = 1e-5 * np.sqrt(len(x))
    nx_ = np.where(nx_ > floor * np.abs(x).max(0, initial=0), nx_, 0.0)
    ny_ = np.where(ny_ > floor * np.abs(y).max(0, initial=0), ny_, 0.0)
    denom = np.outer(nx_, ny_)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(denom > 0, (xc.T @ yc) / denom, 0.0)
    return np.clip(r, -1.0, 1.0)


def pearson_p_values(r: np.ndarray, n: int) -> np.ndarray:
    """Two-sided p-values of Pearson correlations over `n` samples (t-test with n - 2 degrees of freedom)."""
    with np.errstate(divide="ignore"):
        t = np.abs(r) * np.sqrt((n - 2) / np.maximum(1 - r**2, 1e-300))
    return 2 * stats.t.sf(t, n - 2)


def correct(p: np.ndarray, method: Correction) -> np.ndarray:
    """Multiple-testing correction over all of `p` (Bonferroni, or Benjamini-Hochberg FDR)."""
    if method == "bonferroni":
        return np.minimum(p * p.size, 1.0)
    if method == "fdr_bh":
        return stats.false_discovery_control(p.ravel(), method="bh").reshape(p.shape)
    return p


def correlation_scores(pf: PromptFeatures, labels: np.ndarray, cfg: CorrelationConfig) -> NodeScores:
    """|r| of every node with `labels` when they vary, else the magnitude score."""
    n = len(pf)
    if n < 3:
        raise UserError(f"circuit discovery needs at least 3 prompts per circuit, got {n}; use more prompts")
    positions = pf.means.scheme.node_classes
    flat = {layer: v.reshape(n, -1) for layer, v in pf.values.items()}
    shape = {layer: v.shape[1:] for layer, v in pf.values.items()}
    if labels.min() == labels.max():
        importance = {layer: (0.7 * np.abs(v).mean(0) + 0.3 * v.var(0)).reshape(shape[layer])
                      for layer, v in flat.items()}
        return NodeScores("magnitude", pf.layers, positions, importance, None, None, n)
    y = labels.astype(np.float64)[:, None]
    r = {layer: pearson(v, y)[:, 0] for layer, v in flat.items()}
    flat_p = correct(np.concatenate([pearson_p_values(r[layer], n) for layer in pf.layers]), cfg.correction)
    p, start = {}, 0
    for layer in pf.layers:
        p[layer] = flat_p[start : start + len(r[layer])].reshape(shape[layer])
        start += len(r[layer])
    signed = {layer: v.reshape(shape[layer]) for layer, v in r.items()}
    return NodeScores("correlation", pf.layers, positions, {k: np.abs(v) for k, v in signed.items()}, signed, p, n)


def node_values(nodes: Sequence[Node], pf: PromptFeatures) -> np.ndarray:
    """(prompts, nodes) per-prompt values of the given nodes."""
    index = {p: i for i, p in enumerate(pf.means.scheme.node_classes)}
    return np.stack([pf.values[n.layer][:, index[n.position], -1 if n.feature == ERROR else n.feature]
                     for n in nodes], axis=1)


def correlation_edges(nodes: Sequence[Node], pf: PromptFeatures, edge_threshold: float) -> list[Edge]:
    """Edges between nodes of adjacent hooked layers whose per-prompt values correlate enough."""
    edges = []
    for upper, lower in zip(pf.layers, pf.layers[1:]):
        a = [n for n in nodes if n.layer == upper]
        b = [n for n in nodes if n.layer == lower]
        if not a or not b:
            continue
        r = pearson(node_values(a, pf), node_values(b, pf))
        for i, j in zip(*np.nonzero(np.abs(r) >= edge_threshold)):
            if r[i, j] != 0:
                edges.append(Edge(a[i].name, b[j].name, float(abs(r[i, j])), float(r[i, j])))
    return edges


__all__ = ["CorrelationConfig", "correct", "correlation_edges", "correlation_scores", "node_values", "pearson",
           "pearson_p_values"]
