"""Circuit discovery (spec section 4): per category, which nodes go with refusal, by one or more methods.

Every method scores every candidate node of a category's discovery prompts (`NodeScores`) and keeps
those past its own threshold as the category's circuit (with edges); the scores also rank the nodes
for the evaluation's circuits of N nodes. Methods share one interface (`DiscoveryMethod`):

    correlation  |Pearson r| of each node's per-prompt value with the label (`refusal_sae.correlation`)
    attribution  |indirect effect| on F by attribution patching (`refusal_sae.attribution`; Marks et al.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import numpy as np

from refusal_sae.attribution import AttributionConfig, attribution_edges, attribution_scores
from refusal_sae.circuits import Circuit, Group, NodeScores, candidate_mask, threshold_nodes
from refusal_sae.correlation import CorrelationConfig, correlation_edges, correlation_scores
from refusal_sae.data import PromptSample
from refusal_sae.errors import UserError
from refusal_sae.features import PromptFeatures
from refusal_sae.metric import RefusalMetric
from refusal_sae.model import ModelWrapper
from refusal_sae.objective import objective
from refusal_sae.positions import POSITION_MODES, PositionMode
from refusal_sae.sae import SparseAutoencoder
from refusal_sae.validate import all_of, one_of

MethodName = Literal["correlation", "attribution"]
LabelSource = Literal["dataset", "behavior"]


@dataclass
class DiscoveryConfig:
    """How circuits are discovered."""

    methods: list[MethodName] = field(default_factory=lambda: ["correlation"])
    """Discovery methods, each giving its own circuits, evaluation and similarity analysis. correlation:
    the spec's Pearson r with the label (magnitude when labels do not vary); attribution: Marks et al.'s
    indirect effect on F, by attribution patching (runs the model with gradients)."""
    positions: PositionMode = "positional"
    """positional: nodes are (layer, feature, position class): the content positions, and each shared
    post-instruction template token; each class has its own ablation mean and the shared prefix is
    never ablated. global: one class over every position and one mean per feature (the original
    evaluation, for comparison)."""
    label_source: LabelSource = "dataset"
    """What correlation correlates with: the dataset's refusal_label, or whether this model refused
    (greedy generation, string match)."""
    separate_safe_toxic: bool = False
    """Also discover one circuit of the toxic and one of the safe prompts of each category."""
    correlation: CorrelationConfig = field(default_factory=CorrelationConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)

    def __post_init__(self) -> None:
        all_of("discovery.methods", self.methods, list(METHODS))
        if len(set(self.methods)) != len(self.methods):
            raise UserError(f"discovery.methods: {self.methods!r} names a method twice; give each once")
        one_of("discovery.positions", self.positions, POSITION_MODES)
        one_of("discovery.label_source", self.label_source, ("dataset", "behavior"))

    @property
    def groups(self) -> list[Group]:
        return ["all", "toxic", "safe"] if self.separate_safe_toxic else ["all"]


@dataclass
class DiscoveryInputs:
    """What every method may read: the discovery prompts' node values and labels, and the model."""

    features: PromptFeatures
    samples: list[PromptSample]
    """The discovery prompts, row for row with `features`."""
    labels: np.ndarray
    """Positive = toxic (label_source dataset) or refused (behavior), per row."""
    refused: np.ndarray | None
    """Whether the model refused each prompt, when behaviour labels exist."""
    saes: Mapping[str, SparseAutoencoder]
    wrapper: Callable[[], ModelWrapper] | None
    metric: RefusalMetric | None
    target: str
    """F (`refusal_sae.objective`) attribution differentiates."""

    def rows(self, category: str, group: Group) -> np.ndarray:
        """A circuit's prompts: the category's; only toxic or safe ones for a toxic / safe circuit."""
        mask = self.features.categories == category
        if group != "all":
            mask &= self.features.labels == (group == "toxic")
        return np.flatnonzero(mask)

    def subset(self, mask: np.ndarray) -> DiscoveryInputs:
        """The same inputs on the rows where `mask` holds (the node means stay those of all discovery prompts)."""
        return replace(self, features=self.features.subset(mask),
                                   samples=[s for s, keep in zip(self.samples, mask) if keep], labels=self.labels[mask],
                                   refused=None if self.refused is None else self.refused[mask])

    def candidates(self) -> dict[str, np.ndarray]:
        """Live latents and error nodes: what a circuit may hold."""
        return candidate_mask({k: self.features.means.live(k) for k in self.features.layers}, errors=True)


class DiscoveryMethod(Protocol):
    name: str

    def scores(self, inputs: DiscoveryInputs, category: str, group: Group) -> NodeScores:
        """Every node's importance on the circuit's discovery prompts."""

    def circuit(self, inputs: DiscoveryInputs, scores: NodeScores, category: str, group: Group) -> Circuit:
        """The nodes past the method's threshold, with edges."""


class Correlation:
    name = "correlation"

    def __init__(self, cfg: CorrelationConfig) -> None:
        self.cfg = cfg

    def scores(self, inputs: DiscoveryInputs, category: str, group: Group) -> NodeScores:
        rows = inputs.rows(category, group)
        return correlation_scores(inputs.features.subset(rows), inputs.labels[rows], self.cfg)

    def circuit(self, inputs: DiscoveryInputs, scores: NodeScores, category: str, group: Group) -> Circuit:
        magnitude = scores.method == "magnitude"
        nodes = threshold_nodes(scores, inputs.candidates(), self.cfg.threshold, self.cfg.alpha,
                                self.cfg.top_n if magnitude else None)
        sub = inputs.features.subset(inputs.rows(category, group))
        return Circuit(category, group, scores.method, inputs.features.layers, nodes,
                       correlation_edges(nodes, sub, self.cfg.edge_threshold), len(sub),
                       None if magnitude else self.cfg.threshold)


class Attribution:
    name = "attribution"

    def __init__(self, cfg: AttributionConfig) -> None:
        self.cfg = cfg

    def objective(self, inputs: DiscoveryInputs, category: str, group: Group) -> tuple[list[str], np.ndarray]:
        """The circuit's prompts F reads and their weights."""
        rows = inputs.rows(category, group)
        toxic = inputs.features.labels[rows]
        refused = None if inputs.refused is None else inputs.refused[rows]
        f = objective(inputs.target, group, toxic, refused, where=f"attribution discovery of {category!r}")
        return [inputs.samples[rows[i]].prompt for i in f.rows], f.weights

    def scores(self, inputs: DiscoveryInputs, category: str, group: Group) -> NodeScores:
        if inputs.wrapper is None or inputs.metric is None:
            raise UserError("discovery.methods: attribution needs the model; none was given")
        prompts, weights = self.objective(inputs, category, group)
        return attribution_scores(inputs.wrapper(), inputs.saes, inputs.features.means, inputs.metric, prompts,
                                  weights, estimate=self.cfg.estimate, steps=self.cfg.ig_steps,
                                  batch_size=self.cfg.batch_size)

    def circuit(self, inputs: DiscoveryInputs, scores: NodeScores, category: str, group: Group) -> Circuit:
        nodes = threshold_nodes(scores, inputs.candidates(), self.cfg.node_threshold)
        edges = []
        if self.cfg.edge_nodes:
            prompts, weights = self.objective(inputs, category, group)
            scored = attribution_edges(inputs.wrapper(), inputs.saes, inputs.features.means, inputs.metric, prompts,
                                       weights, nodes[: self.cfg.edge_nodes], batch_size=self.cfg.batch_size)
            edges = [e for e in scored if e.weight >= self.cfg.edge_threshold]
        return Circuit(category, group, "attribution", inputs.features.layers, nodes, edges, scores.n_prompts,
                       self.cfg.node_threshold)


METHODS: dict[str, Callable[[DiscoveryConfig], DiscoveryMethod]] = {
    "correlation": lambda cfg: Correlation(cfg.correlation),
    "attribution": lambda cfg: Attribution(cfg.attribution),
}


def methods(cfg: DiscoveryConfig) -> list[DiscoveryMethod]:
    return [METHODS[name](cfg) for name in cfg.methods]


def discover(method: DiscoveryMethod, inputs: DiscoveryInputs, categories: Sequence[str], groups: Sequence[Group]
             ) -> list[tuple[Circuit, NodeScores]]:
    """Every (category, group) circuit of one method with its node scores."""
    out = []
    for category in categories:
        for group in groups:
            scores = method.scores(inputs, category, group)
            out.append((method.circuit(inputs, scores, category, group), scores))
    return out


__all__ = ["Attribution", "Correlation", "DiscoveryConfig", "DiscoveryInputs", "DiscoveryMethod", "METHODS",
           "discover", "methods"]
