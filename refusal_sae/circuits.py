"""Circuits: sets of nodes (SAE latents and error terms at a layer and position class) and their edges.

A node is `<layer>/<feature>@<position>`: latent `feature` of the layer's SAE (or `error`, the SAE's
error term) at one position class (`refusal_sae.positions`: "content", "-5" ... "-1", or "all"). Every
discovery method scores every candidate node (`NodeScores`); a circuit is the nodes whose score passes
the method's threshold, and the evaluation's circuits of N nodes are the N best-ranked candidates
(`ranked_nodes`). A circuit saves as JSON and GraphML.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import networkx as nx
import numpy as np

from refusal_sae.errors import UserError
from refusal_sae.io import atomic_open, write_json
from refusal_sae.positions import PositionScheme
from refusal_sae.stats import FAITHFUL

ERROR = -1
"""Feature index of a layer's SAE error node."""



@dataclass(frozen=True)
class NodeIndex:
    """Where one SAE layer's nodes sit in a node array of shape (node classes, width + 1): row r is node class r,
    column c < width latent c, the last column the layer's SAE error. Among the mean classes of a position
    scheme (`refusal_sae.positions`), node class r is mean class `prefix + r`: the shared template prefix's
    positions come first and hold no node."""

    classes: int
    width: int
    prefix: int = 0

    @classmethod
    def of(cls, scheme: PositionScheme, width: int) -> NodeIndex:
        return cls(len(scheme.node_classes), width, scheme.prefix)

    @property
    def shape(self) -> tuple[int, int]:
        return self.classes, self.width + 1

    @property
    def rows(self) -> slice:
        """The node classes among the mean classes."""
        return slice(self.prefix, self.prefix + self.classes)

    @property
    def prefix_rows(self) -> slice:
        """The shared prefix's positions among the mean classes (no nodes)."""
        return slice(0, self.prefix)

    def feature(self, column: int) -> int:
        """The `Node.feature` of a column: the latent, or ERROR for the last column."""
        return ERROR if column == self.width else int(column)

    def node_class(self, mean_class: Any) -> Any:
        """Node class of mean-class indices (negative: a prefix position)."""
        return mean_class - self.prefix

    @staticmethod
    def latents(nodes: np.ndarray) -> np.ndarray:
        """(..., width) the latents' part of a node array (a view)."""
        return nodes[..., :-1]

    @staticmethod
    def errors(nodes: np.ndarray) -> np.ndarray:
        """(...,) the error nodes' part of a node array (a view)."""
        return nodes[..., -1]

    @staticmethod
    def join(latents: np.ndarray, errors: np.ndarray) -> np.ndarray:
        """A node array from its latents (classes, width) and errors (classes,)."""
        return np.concatenate([latents, np.asarray(errors)[..., None]], axis=-1)


Group = Literal["all", "toxic", "safe"]
GROUPS: tuple[str, ...] = ("all", "toxic", "safe")


def node_name(layer: str, feature: int, position: str) -> str:
    """`residuals_12/345@-1`, or `residuals_12/error@content` for an error node."""
    return f"{layer}/{'error' if feature == ERROR else feature}@{position}"


@dataclass(frozen=True)
class Node:
    layer: str
    feature: int
    """SAE latent index, or ERROR (-1) for the layer's error node."""
    position: str
    """Position class: "content", "-j" (j-th token from the end) or "all"."""
    importance: float = 0.0
    score: float | None = None
    """Signed score: Pearson r (correlation) or indirect effect on F (attribution); None for magnitude."""
    p_value: float | None = None

    @property
    def name(self) -> str:
        return node_name(self.layer, self.feature, self.position)

    @property
    def key(self) -> tuple[int, str]:
        """Identity within its layer."""
        return self.feature, self.position


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
    method: str
    layers: list[str]
    nodes: list[Node]
    edges: list[Edge] = field(default_factory=list)
    n_prompts: int = 0
    threshold: float | None = None
    """The method's threshold the nodes passed (None: the top nodes by importance)."""

    @property
    def name(self) -> str:
        return self.category if self.group == "all" else f"{self.category}/{self.group}"

    def node_names(self) -> set[str]:
        return {n.name for n in self.nodes}

    def edge_names(self) -> set[tuple[str, str]]:
        return {(e.source, e.target) for e in self.edges}

    def positions(self) -> dict[str, int]:
        """Nodes per position class: where in the prompt the circuit works."""
        out: dict[str, int] = {}
        for n in self.nodes:
            out[n.position] = out.get(n.position, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["name"] = self.name
        out["nodes"] = [{**asdict(n), "name": n.name} for n in self.nodes]
        out["positions"] = self.positions()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Circuit:
        keys = {"category", "group", "method", "layers", "n_prompts", "threshold"}
        nodes = [Node(**{k: v for k, v in n.items() if k != "name"}) for n in d["nodes"]]
        return cls(**{k: d[k] for k in keys}, nodes=nodes, edges=[Edge(**e) for e in d["edges"]])

    def to_graph(self) -> nx.DiGraph:
        graph = nx.DiGraph(name=self.name, category=self.category, group=self.group, method=self.method)
        for n in self.nodes:
            graph.add_node(n.name, layer=n.layer, feature=n.feature, position=n.position, importance=n.importance,
                           kind="error" if n.feature == ERROR else "feature")
        for e in self.edges:
            graph.add_edge(e.source, e.target, weight=e.weight, score=e.score)
        return graph

    def save(self, json_path: Path, graphml_path: Path) -> None:
        write_json(json_path, self.to_dict())
        with atomic_open(graphml_path, "wb") as f:
            nx.write_graphml(self.to_graph(), f)

    @classmethod
    def load(cls, path: Path) -> Circuit:
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} is not a circuit file ({e}); run circuit discovery again") from e


@dataclass
class NodeScores:
    """Every candidate node's importance for one circuit's prompts (and signed score, p-value).

    Per layer an array (node classes, width + 1): latents, then the error node in the last column.
    """

    method: str
    layers: list[str]
    positions: list[str]
    importance: dict[str, np.ndarray]
    signed: dict[str, np.ndarray] | None
    p_value: dict[str, np.ndarray] | None
    n_prompts: int

    def node(self, layer: str, position: int, column: int) -> Node:
        index = NodeIndex(len(self.positions), self.importance[layer].shape[1] - 1)
        signed = None if self.signed is None else float(self.signed[layer][position, column])
        p = None if self.p_value is None else float(self.p_value[layer][position, column])
        return Node(layer, index.feature(column), self.positions[position],
                    float(self.importance[layer][position, column]), signed, p)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {f"importance.{k}": v for k, v in self.importance.items()}
        for name, d in (("signed", self.signed), ("p_value", self.p_value)):
            out |= {f"{name}.{k}": v for k, v in (d or {}).items()}
        return out


def candidate_mask(live: Mapping[str, np.ndarray], errors: bool) -> dict[str, np.ndarray]:
    """{layer: (node classes, width + 1)} which nodes are candidates: live latents, and error nodes if `errors`."""
    return {layer: NodeIndex.join(m, np.full(len(m), errors)) for layer, m in live.items()}


def node_mask(ranking: Sequence[tuple[str, int, int]], shapes: Mapping[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """{layer: (node classes, width + 1)} masks of the ranked nodes given (`ranked_nodes` entries)."""
    out = {layer: np.zeros(shape, bool) for layer, shape in shapes.items()}
    for layer, pos, col in ranking:
        out[layer][pos, col] = True
    return out


def random_mask(kept: dict[str, np.ndarray], candidates: dict[str, np.ndarray], rng: np.random.Generator
                ) -> dict[str, np.ndarray]:
    """Random nodes with as many latents per layer and position class as `kept`, drawn from the candidate
    latents there, and the same error nodes."""
    out = {}
    for layer, m in kept.items():
        r = np.zeros_like(m)
        NodeIndex.errors(r)[:] = NodeIndex.errors(m)
        for pos in range(len(m)):
            k = int(NodeIndex.latents(m[pos]).sum())
            if k:
                pool = np.flatnonzero(NodeIndex.latents(candidates[layer][pos]))
                r[pos, rng.choice(pool, size=k, replace=False)] = True
        out[layer] = r
    return out


def circuit_size(name: str, faithful: Mapping[str, int | None], fallback: int, section: str,
                 fixed: int | None = None) -> tuple[int, str]:
    """The size a later stage (`section`) takes circuit `name` at, and why: `fixed` when given, else the smallest
    size reaching faithfulness `FAITHFUL` (`faithful`: by circuit name, None where not reached, absent without a
    keep-mode evaluation record), else `fallback`."""
    if fixed is not None:
        return fixed, f"{section}.size"
    if name not in faithful:
        return fallback, f"{section}.n_nodes: no keep-mode evaluation record"
    reached = faithful[name]
    if reached is None:
        return fallback, f"{section}.n_nodes: faithfulness {FAITHFUL} not reached"
    return reached, f"faithfulness {FAITHFUL} reached"


def ranked_nodes(scores: NodeScores, candidates: Mapping[str, np.ndarray]) -> list[tuple[str, int, int]]:
    """Every candidate node as (layer, class, column), most important first; ties in (layer, class, column)
    order, so the ranking does not depend on anything but the scores."""
    entries = []
    for li, layer in enumerate(scores.layers):
        pos, col = np.nonzero(candidates[layer])
        imp = scores.importance[layer][pos, col]
        entries.append(np.stack([-imp, np.full(len(pos), li), pos, col]).T)
    table = np.concatenate(entries) if entries else np.zeros((0, 4))
    order = np.lexsort(table.T[::-1])
    return [(scores.layers[int(table[i, 1])], int(table[i, 2]), int(table[i, 3])) for i in order]


def threshold_nodes(scores: NodeScores, candidates: Mapping[str, np.ndarray], threshold: float,
                    alpha: float | None = None, top_n: int | None = None) -> list[Node]:
    """The circuit's nodes, most important first: importance >= `threshold` (and p <= alpha), or the `top_n`
    most important per layer when given (magnitude). A node of importance 0 is never chosen."""
    out = []
    for layer, pos, col in ranked_nodes(scores, candidates):
        imp = scores.importance[layer][pos, col]
        if imp <= 0:
            continue
        if top_n is None:
            if imp < threshold:
                continue
            if alpha is not None and scores.p_value is not None and scores.p_value[layer][pos, col] > alpha:
                continue
        out.append(scores.node(layer, pos, col))
    if top_n is not None:
        per_layer: dict[str, int] = {}
        kept = []
        for n in out:
            if per_layer.get(n.layer, 0) < top_n:
                kept.append(n)
                per_layer[n.layer] = per_layer.get(n.layer, 0) + 1
        out = kept
    return out


__all__ = ["ERROR", "GROUPS", "Circuit", "Edge", "Group", "Node", "NodeIndex", "NodeScores", "candidate_mask",
           "circuit_size", "node_mask", "node_name", "random_mask", "ranked_nodes", "threshold_nodes"]
