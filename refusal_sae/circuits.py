"""Circuit discovery (spec section 4): which SAE features, per layer, go with refusal.

Per prompt, every hooked layer's residual stream is encoded by that layer's SAE and aggregated over the
prompt's tokens (mean over real tokens, or the last token: the generation position). Each layer also has
one SAE error node, whose per-prompt value is the aggregated norm of the error term x - x_hat.

Nodes
    correlation  Pearson r of each node's per-prompt value with the prompt's label (the dataset's
                 refusal_label, or whether the model refused); importance = |r|; a node enters the
                 circuit when |r| >= threshold (and, optionally, its corrected p-value <= alpha).
    magnitude    when the labels have no variance (a circuit of toxic prompts only, say): importance =
                 0.7 mean|a| + 0.3 var(a) over the prompts, and the top_n nodes of each layer enter.
Edges
    between nodes of adjacent hooked layers whose per-prompt values correlate with |r| >= edge_threshold.

A circuit is a set of nodes named `<layer>/<feature>` (`<layer>/error` for an error node) plus weighted
edges; it saves as JSON and GraphML. Scores are computed once per circuit and the threshold only
selects, so a sweep over thresholds costs one scoring pass.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import networkx as nx
import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

from refusal_sae.activations import PromptActivations
from refusal_sae.errors import UserError
from refusal_sae.io import atomic_open, write_json
from refusal_sae.sae import SparseAutoencoder

ERROR = -1
"""Feature index of a layer's SAE error node."""

Aggregation = Literal["mean", "last"]
LabelSource = Literal["dataset", "behavior"]
Correction = Literal["none", "bonferroni", "fdr_bh"]
Group = Literal["all", "toxic", "safe"]
Method = Literal["correlation", "magnitude", "attribution"]


@dataclass
class CircuitConfig:
    """How circuits are discovered, and which thresholds the evaluation sweeps."""

    methods: list[Literal["correlation", "attribution"]] = field(default_factory=lambda: ["correlation"])
    """Discovery methods, each giving its own circuits, evaluation and similarity analysis. correlation:
    the spec's Pearson r with the label (magnitude when labels do not vary); attribution: Marks et al.'s
    indirect effect on the refusal metric, by attribution patching (runs the model with gradients)."""
    aggregation: Aggregation = "mean"
    """Per-prompt feature value: mean over the prompt's tokens, or the last token (generation position)."""
    label_source: LabelSource = "dataset"
    """What a feature must correlate with: the dataset's refusal_label, or whether this model refused
    (greedy generation, string match)."""
    threshold: float = 0.5
    """|Pearson r| a node needs to enter the circuit (correlation method). With few prompts chance
    correlations are large (|r| >= 0.5 has p ~ 0.05 at 16 prompts): set it with the prompt count in mind."""
    alpha: float | None = None
    """Also require the (corrected) p-value <= alpha; null: |r| alone decides."""
    correction: Correction = "none"
    """Multiple-testing correction of the p-values over all nodes of a circuit."""
    node_threshold: float = 0.1
    """|indirect effect| on F (refusal-score units) a node needs to enter the circuit (attribution)."""
    attribution: Literal["patching", "ig"] = "patching"
    """Attribution estimate: one gradient (patching) or integrated gradients over `ig_steps` steps."""
    ig_steps: int = 10
    """Interpolation steps of integrated gradients."""
    edge_nodes: int = 30
    """Attribution edges are scored among the circuit's `edge_nodes` most important nodes only: every
    downstream node costs one backward pass through the blocks between two SAE layers."""
    top_n: int = 20
    """Nodes per layer when labels have no variance (magnitude method)."""
    edge_threshold: float = 0.3
    """For an edge between nodes of adjacent layers: |Pearson r| of their values (correlation; the spec's
    example, 0.01, links nearly every pair: hundreds of thousands of edges for circuits of a few hundred
    nodes per layer), or |indirect effect| on F through the edge (attribution)."""
    separate_safe_toxic: bool = False
    """Also discover one circuit of the toxic and one of the safe prompts of each category."""
    include_errors: bool = True
    """SAE error terms are candidate nodes (one per layer), scored like features."""
    sweep: list[float] = field(default_factory=lambda: [0.8, 0.7, 0.6, 0.5])
    """Thresholds of the evaluation sweep (correlation method)."""
    sweep_top_n: list[int] = field(default_factory=lambda: [1, 5, 20, 50, 200])
    """Nodes per layer of the evaluation sweep (magnitude method)."""
    sweep_nodes: list[int] = field(default_factory=lambda: [10, 30, 100, 300])
    """Circuit sizes of the attribution sweep: the N most important nodes of all layers together."""
    matched_sweep: bool = False
    """Every method sweeps `sweep_nodes` (correlation too, instead of `sweep`), to compare methods at
    equal circuit sizes."""

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise UserError(f"circuits.threshold: {self.threshold} is not a |correlation| in [0, 1]")
        if self.edge_threshold < 0:
            raise UserError(f"circuits.edge_threshold: {self.edge_threshold} must be >= 0")
        if any(not 0 <= t <= 1 for t in self.sweep):
            raise UserError(f"circuits.sweep: {self.sweep} must hold |correlation| thresholds in [0, 1]")
        if self.top_n < 1 or any(n < 1 for n in [*self.sweep_top_n, *self.sweep_nodes]):
            raise UserError(f"circuits.top_n / sweep_top_n / sweep_nodes: {self.top_n} / {self.sweep_top_n} / "
                            f"{self.sweep_nodes} must be >= 1")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise UserError(f"circuits.methods: {self.methods} must name each method once, e.g. [correlation]")
        if self.node_threshold < 0 or self.ig_steps < 1 or self.edge_nodes < 0:
            raise UserError(f"circuits.node_threshold / ig_steps / edge_nodes: {self.node_threshold} / "
                            f"{self.ig_steps} / {self.edge_nodes} must be >= 0 / >= 1 / >= 0")
        if self.alpha is not None and not 0 < self.alpha <= 1:
            raise UserError(f"circuits.alpha: {self.alpha} is not a p-value level in (0, 1]")


def node_name(layer: str, feature: int) -> str:
    """`residuals_12/345`, or `residuals_12/error` for the error node."""
    return f"{layer}/{'error' if feature == ERROR else feature}"


@dataclass(frozen=True)
class Node:
    layer: str
    feature: int
    """SAE latent index, or ERROR (-1) for the layer's error node."""
    importance: float
    score: float | None = None
    """Signed score: Pearson r (correlation) or indirect effect on F (attribution); None for magnitude."""
    p_value: float | None = None

    @property
    def name(self) -> str:
        return node_name(self.layer, self.feature)


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    weight: float
    """|score|."""
    score: float
    """Pearson r of the two nodes' per-prompt values (correlation), or the edge's indirect effect (attribution)."""


@dataclass
class Circuit:
    """Nodes and edges that explain refusal for one category (and group of prompts)."""

    category: str
    group: Group
    method: Method
    layers: list[str]
    nodes: list[Node]
    edges: list[Edge] = field(default_factory=list)
    n_prompts: int = 0
    threshold: float | None = None
    top_n: int | None = None
    max_nodes: int | None = None
    """For a sweep point chosen by size: the number of most important nodes it takes."""

    @property
    def name(self) -> str:
        return self.category if self.group == "all" else f"{self.category}/{self.group}"

    def node_names(self) -> set[str]:
        return {n.name for n in self.nodes}

    def edge_names(self) -> set[tuple[str, str]]:
        return {(e.source, e.target) for e in self.edges}

    def features(self, layer: str) -> list[int]:
        """Latent indices of this layer's feature nodes (the error node excluded)."""
        return [n.feature for n in self.nodes if n.layer == layer and n.feature != ERROR]

    def has_error(self, layer: str) -> bool:
        return any(n.layer == layer and n.feature == ERROR for n in self.nodes)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["name"] = self.name
        out["nodes"] = [{**asdict(n), "name": n.name} for n in self.nodes]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Circuit:
        keys = {"category", "group", "method", "layers", "n_prompts", "threshold", "top_n", "max_nodes"}
        nodes = [Node(**{k: v for k, v in n.items() if k != "name"}) for n in d["nodes"]]
        return cls(**{k: d[k] for k in keys}, nodes=nodes, edges=[Edge(**e) for e in d["edges"]])

    def to_graph(self) -> nx.DiGraph:
        graph = nx.DiGraph(name=self.name, category=self.category, group=self.group, method=self.method)
        for n in self.nodes:
            graph.add_node(n.name, layer=n.layer, feature=n.feature, importance=n.importance,
                           kind="error" if n.feature == ERROR else "feature")
        for e in self.edges:
            graph.add_edge(e.source, e.target, weight=e.weight, score=e.score)
        return graph

    def save(self, directory: str | Path) -> None:
        """`<directory>/<name>.json` and `.graphml` (the name's `/` becomes `__`), each atomically."""
        stem = Path(directory) / self.name.replace("/", "__")
        write_json(stem.with_suffix(".json"), self.to_dict())
        with atomic_open(stem.with_suffix(".graphml"), "wb") as f:
            nx.write_graphml(self.to_graph(), f)

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} is not a circuit file ({e}); run circuit discovery again") from e


@dataclass
class PromptFeatures:
    """Per-prompt aggregated node values of a set of prompts, and the token-level means ablation needs."""

    layers: list[str]
    features: dict[str, np.ndarray]
    """{layer: (prompts, width)} aggregated SAE features."""
    errors: dict[str, np.ndarray]
    """{layer: (prompts,)} aggregated norm of the SAE error term."""
    prompt_index: np.ndarray
    categories: np.ndarray
    labels: np.ndarray
    """The dataset's refusal_label (True = toxic)."""
    feature_means: dict[str, np.ndarray] = field(default_factory=dict)
    """{layer: (width,)} mean of every feature over all tokens of all prompts (the ablation value)."""
    error_means: dict[str, np.ndarray] = field(default_factory=dict)
    """{layer: (d_in,)} mean SAE error vector over all tokens."""

    def __len__(self) -> int:
        return len(self.prompt_index)

    def subset(self, mask: np.ndarray) -> PromptFeatures:
        """The same prompts' rows where `mask` holds (token means stay those of the whole set)."""
        return PromptFeatures(
            self.layers, {k: v[mask] for k, v in self.features.items()}, {k: v[mask] for k, v in self.errors.items()},
            self.prompt_index[mask], self.categories[mask], self.labels[mask], self.feature_means, self.error_means,
        )

    def values(self, layer: str, include_errors: bool) -> np.ndarray:
        """(prompts, width [+1]) node values of one layer; the error node is the last column."""
        if not include_errors:
            return self.features[layer]
        return np.concatenate([self.features[layer], self.errors[layer][:, None]], axis=1)


@torch.no_grad()
def encode_prompts(
    saes: Mapping[str, SparseAutoencoder], prompts: PromptActivations, aggregation: Aggregation = "mean"
) -> PromptFeatures:
    """Encode every token of every prompt with its layer's SAE; aggregate per prompt, average per token."""
    layers = list(saes)
    missing = [layer for layer in layers if layer not in prompts.layers]
    if missing:
        raise UserError(f"the activation cache has no layer {missing}; SAEs and cache must cover the same layers")
    n = len(prompts)
    if n == 0:
        raise UserError("circuit discovery: the discovery split holds no prompts")
    feats = {layer: np.zeros((n, sae.cfg.width), np.float32) for layer, sae in saes.items()}
    errs = {layer: np.zeros(n, np.float32) for layer in layers}
    feat_sums = {layer: torch.zeros(sae.cfg.width, dtype=torch.float64) for layer, sae in saes.items()}
    err_sums = {layer: torch.zeros(sae.cfg.d_in, dtype=torch.float64) for layer, sae in saes.items()}
    index, categories, labels, n_tokens = [], [], [], 0
    for i in tqdm(range(n), desc="encoding prompts", unit="prompt", leave=False):
        item = prompts[i]
        index.append(item["prompt_index"])
        categories.append(item["category"])
        labels.append(item["refusal_label"])
        for layer, sae in saes.items():
            x = item["activations"][layer].float()
            f = sae.encode(x)
            err = x.double() - sae.decode(f).double()
            norms = err.norm(dim=-1)
            feats[layer][i] = (f.mean(0) if aggregation == "mean" else f[-1]).numpy()
            errs[layer][i] = float(norms.mean() if aggregation == "mean" else norms[-1])
            feat_sums[layer] += f.double().sum(0)
            err_sums[layer] += err.sum(0)
        n_tokens += len(x)
    return PromptFeatures(
        layers, feats, errs, np.array(index), np.array(categories), np.array(labels, bool),
        {k: (v / n_tokens).float().numpy() for k, v in feat_sums.items()},
        {k: (v / n_tokens).float().numpy() for k, v in err_sums.items()},
    )


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


@dataclass
class NodeScores:
    """Every candidate node's importance (and signed score, p-value) for one circuit's prompts; per layer
    one entry per latent, then the error node's when errors are candidates."""

    method: Method
    layers: list[str]
    importance: dict[str, np.ndarray]
    signed: dict[str, np.ndarray] | None
    p_value: dict[str, np.ndarray] | None
    n_prompts: int


def score_nodes(pf: PromptFeatures, labels: np.ndarray, cfg: CircuitConfig) -> NodeScores:
    """Correlation with `labels` when they vary, else the spec's magnitude score."""
    n = len(pf)
    if n < 3:
        raise UserError(f"circuit discovery needs at least 3 prompts per circuit, got {n}; use more prompts")
    values = {layer: pf.values(layer, cfg.include_errors) for layer in pf.layers}
    if labels.min() == labels.max():
        importance = {
            layer: (0.7 * np.abs(v).mean(0) + 0.3 * v.var(0)).astype(np.float64) for layer, v in values.items()
        }
        return NodeScores("magnitude", pf.layers, importance, None, None, n)
    y = labels.astype(np.float64)[:, None]
    r = {layer: pearson(v, y)[:, 0] for layer, v in values.items()}
    flat_p = correct(np.concatenate([pearson_p_values(r[layer], n) for layer in pf.layers]), cfg.correction)
    p, start = {}, 0
    for layer in pf.layers:
        p[layer] = flat_p[start : start + len(r[layer])]
        start += len(r[layer])
    return NodeScores("correlation", pf.layers, {k: np.abs(v) for k, v in r.items()}, r, p, n)


def select_nodes(scores: NodeScores, cfg: CircuitConfig, threshold: float | None = None,
                 top_n: int | None = None, max_nodes: int | None = None) -> list[Node]:
    """The circuit's nodes, most important first: the `max_nodes` most important of all layers when
    given; else those passing `threshold` (correlation: cfg.threshold, attribution: cfg.node_threshold)
    or the `top_n` per layer (magnitude). A node with importance 0 is never chosen."""
    chosen: list[tuple[str, int]] = []
    for layer in scores.layers:
        imp = scores.importance[layer]
        if max_nodes is not None:
            keep = imp > 0
        elif scores.method == "magnitude":
            order = np.argsort(-imp, kind="stable")[: cfg.top_n if top_n is None else top_n]
            keep = np.zeros(len(imp), bool)
            keep[order] = True
        else:
            default = cfg.threshold if scores.method == "correlation" else cfg.node_threshold
            keep = imp >= (default if threshold is None else threshold)
            if cfg.alpha is not None and scores.p_value is not None:
                keep &= scores.p_value[layer] <= cfg.alpha
        chosen += [(layer, int(j)) for j in np.flatnonzero(keep & (imp > 0))]
    chosen.sort(key=lambda lj: (-scores.importance[lj[0]][lj[1]], lj[0], lj[1]))
    nodes = []
    for layer, j in chosen[:max_nodes]:
        width = len(scores.importance[layer]) - 1 if cfg.include_errors else len(scores.importance[layer])
        signed = None if scores.signed is None else float(scores.signed[layer][j])
        p = None if scores.p_value is None else float(scores.p_value[layer][j])
        nodes.append(Node(layer, ERROR if j == width else j, float(scores.importance[layer][j]), signed, p))
    return nodes


def find_edges(nodes: Sequence[Node], pf: PromptFeatures, edge_threshold: float) -> list[Edge]:
    """Edges between nodes of adjacent hooked layers whose per-prompt values correlate enough."""
    edges = []
    for upper, lower in zip(pf.layers, pf.layers[1:]):
        a = [n for n in nodes if n.layer == upper]
        b = [n for n in nodes if n.layer == lower]
        if not a or not b:
            continue
        r = pearson(_node_values(a, pf), _node_values(b, pf))
        for i, j in zip(*np.nonzero(np.abs(r) >= edge_threshold)):
            if r[i, j] != 0:
                edges.append(Edge(a[i].name, b[j].name, float(abs(r[i, j])), float(r[i, j])))
    return edges


def _node_values(nodes: Sequence[Node], pf: PromptFeatures) -> np.ndarray:
    return np.stack(
        [pf.errors[n.layer] if n.feature == ERROR else pf.features[n.layer][:, n.feature] for n in nodes], axis=1
    )


def discover(
    pf: PromptFeatures, labels: np.ndarray, category: str, group: Group, cfg: CircuitConfig
) -> tuple[Circuit, NodeScores]:
    """The circuit of one category (and group) at `cfg.threshold` / `cfg.top_n`, with its node scores.

    `labels` holds one label per row of `pf` (the label source's); only the circuit's prompts are used.
    """
    category = str(category)  # not numpy.str_: GraphML and JSON want plain values
    mask = pf.categories == category
    if group != "all":
        mask &= pf.labels == (group == "toxic")
    sub = pf.subset(mask)
    scores = score_nodes(sub, labels[mask], cfg)
    nodes = select_nodes(scores, cfg)
    circuit = Circuit(
        category, group, scores.method, pf.layers, nodes, find_edges(nodes, sub, cfg.edge_threshold), len(sub),
        cfg.threshold if scores.method == "correlation" else None,
        cfg.top_n if scores.method == "magnitude" else None,
    )
    return circuit, scores


def sweep_circuits(scores: NodeScores, base: Circuit, cfg: CircuitConfig) -> list[Circuit]:
    """The circuit at each sweep point, nodes only, smallest first: node counts (attribution, or any
    method with `matched_sweep`), thresholds (correlation) or nodes per layer (magnitude)."""

    def point(**how: Any) -> Circuit:
        return Circuit(base.category, base.group, base.method, base.layers, select_nodes(scores, cfg, **how),
                       n_prompts=base.n_prompts, **how)

    if scores.method == "attribution" or cfg.matched_sweep:
        return [point(max_nodes=n) for n in sorted(cfg.sweep_nodes)]
    if scores.method == "correlation":
        return [point(threshold=t) for t in sorted(cfg.sweep, reverse=True)]
    return [point(top_n=n) for n in sorted(cfg.sweep_top_n)]


def circuit_groups(cfg: CircuitConfig) -> list[Group]:
    return ["all", "toxic", "safe"] if cfg.separate_safe_toxic else ["all"]


__all__ = [
    "ERROR", "Circuit", "CircuitConfig", "Edge", "Node", "NodeScores", "PromptFeatures", "circuit_groups",
    "correct", "discover", "encode_prompts", "find_edges", "node_name", "pearson", "pearson_p_values",
    "score_nodes", "select_nodes", "sweep_circuits",
]
