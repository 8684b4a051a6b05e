"""Monolithic vs. modular refusal: do the category circuits share their nodes, and more than chance would?

If the model refuses through one mechanism, the circuits found for different OR-Bench categories hold
mostly the same SAE features; if each category has its own mechanism, they hold different ones.

Similarity
    The Jaccard index |A ∩ B| / |A ∪ B| of two circuits' node sets (`layer/feature@position` names, error nodes
    included) and of their edge sets ((source, target) pairs), for every pair of category circuits (group
    "all"): a symmetric matrix whose diagonal is 1. Two empty sets have no defined overlap: their Jaccard
    is NaN (None in JSON, and a circuit without nodes has None on the diagonal) and it is left out of
    every mean; an empty and a non-empty set have Jaccard 0.

Permutation null
    Raw Jaccard is not comparable across pairs: big circuits, or circuits in layers with few candidate
    latents, overlap by chance. So each pair is compared with random circuits of the same shape: for
    each of the two circuits, a random circuit with the same number of nodes in every layer, drawn
    uniformly without replacement from that layer's candidate nodes (the caller's (feature, position)
    keys, error nodes included), and the same number of edges between every two adjacent layers, drawn uniformly
    among the pairs of the random circuit's nodes in those layers. The candidates should be the latents
    that could have entered a circuit (e.g. those that ever fired on the discovery prompts): drawing from
    a whole SAE, most of whose latents are dead on these prompts, would make random circuits almost
    never overlap and every real overlap look significant. p = (1 + #{null >= observed}) / (1 + permutations),
    so it is never 0; the observed/null comparison is made on the integer counts, without rounding.

    The random circuits are never built: Jaccard needs only the overlap counts, and those have exact
    distributions. Two independent uniform subsets of sizes k_A, k_B of a layer's N candidates share
    i ~ Hypergeometric(good = k_A, bad = N - k_A, draws = k_B) nodes (mean k_A k_B / N). Between adjacent
    layers l, l+1, circuit A's m_A random edges fall among the c = i_l i_{l+1} pairs that join shared nodes
    x ~ Hypergeometric(c, a_l a_{l+1} - c, m_A) times, and B's m_B random edges (among its b_l b_{l+1}
    pairs) hit x of those y ~ Hypergeometric(x, b_l b_{l+1} - x, m_B) times: y is the shared edge count.
    Sampling these per layer, for all permutations at once, is exact and fast (1000 permutations of 45
    pairs of 12-layer circuits take about a second). The edge null shares its random nodes with the node
    null, so edge similarity is judged against circuits that overlap in nodes only by chance.

Shared core and category-specific nodes
    The core is the nodes in at least `shared_fraction` of the category circuits; a node in exactly one
    is specific to that category.

Safe vs. toxic
    Where a category has both a "toxic" and a "safe" circuit, the same Jaccard and null say whether
    refusing toxic prompts and over-refusing safe ones use the same features.

Verdict
    "monolithic" when the mean pairwise node Jaccard of the category circuits is >= `monolithic_above`,
    "modular" when it is <= `modular_below`, else "hybrid"; reported with the fraction of pairs that
    overlap significantly more than chance and the mean null Jaccard.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from refusal_sae.circuits import Circuit
from refusal_sae.errors import UserError
from refusal_sae.stats import p_above
from refusal_sae.validate import fraction, positive_int, statistics_options


@dataclass
class SimilarityConfig:
    """How circuits are compared and when refusal counts as monolithic or modular."""

    permutations: int = 1000
    """Random circuit pairs drawn per pair of circuits for the permutation null."""
    shared_fraction: float = 0.5
    """A node is in the shared core when it is in at least this fraction of the category circuits."""
    monolithic_above: float = 0.5
    """Mean pairwise node Jaccard at or above which refusal is called monolithic."""
    modular_below: float = 0.2
    """Mean pairwise node Jaccard at or below which refusal is called modular."""
    significance: float = 0.05
    """p-value below which a pair's overlap counts as more than chance."""
    seed: int = 0
    """Seed of the random circuits; the same seed gives the same result."""

    def __post_init__(self) -> None:
        positive_int("similarity.permutations", self.permutations, 1000)
        fraction("similarity.shared_fraction", self.shared_fraction, 0.5, include_one=True)
        statistics_options("similarity", self)


def jaccard(a: set[Hashable], b: set[Hashable]) -> float:
    """|a ∩ b| / |a ∪ b|; NaN when both are empty (no overlap to measure)."""
    union = len(a | b)
    return len(a & b) / union if union else float("nan")


@dataclass(frozen=True)
class Shape:
    """What the null keeps of a circuit: its node count per layer and edge count per adjacent-layer pair."""

    nodes: np.ndarray
    """(layers,) nodes in each layer."""
    edges: np.ndarray
    """(layers - 1,) edges from each layer to the next."""


def candidate_pools(candidates: Mapping[str, Iterable[tuple[int, str]]], layers: Sequence[str]
                    ) -> dict[str, set[tuple[int, str]]]:
    """Each layer's candidate nodes as (feature, position) keys (`Node.key`), error nodes included."""
    missing = [layer for layer in layers if layer not in candidates]
    if missing:
        raise UserError(f"similarity: no candidate nodes for layer(s) {missing}; give candidates for every layer")
    return {layer: {(int(f), str(p)) for f, p in candidates[layer]} for layer in layers}


def circuit_shape(circuit: Circuit, pools: Mapping[str, set[tuple[int, str]]]) -> Shape:
    """Count nodes per layer and edges per adjacent-layer pair, checking both fit the null's model."""
    index = {layer: i for i, layer in enumerate(circuit.layers)}
    nodes = np.zeros(len(index), np.int64)
    node_layer = {}
    for node in {n.name: n for n in circuit.nodes}.values():  # a node listed twice counts once
        if node.key not in pools.get(node.layer, ()):
            raise UserError(
                f"circuit {circuit.name!r}: node {node.name} is not among the candidates of its layer; candidates "
                "must hold every latent a circuit can select (e.g. all latents that fired on the discovery prompts)"
            )
        node_layer[node.name] = index[node.layer]
        nodes[index[node.layer]] += 1
    edges = np.zeros(max(len(index) - 1, 0), np.int64)
    for source, target in circuit.edge_names():
        if source not in node_layer or target not in node_layer or node_layer[target] != node_layer[source] + 1:
            raise UserError(
                f"circuit {circuit.name!r}: edge {source} -> {target} does not join a node of one layer to a node "
                "of the next; edges must run between the circuit's nodes in adjacent layers (rerun discovery)"
            )
        edges[node_layer[source]] += 1
    return Shape(nodes, edges)


def shared_counts(a: np.ndarray, b: np.ndarray, pool_sizes: np.ndarray, draws: int, rng: np.random.Generator
                  ) -> np.ndarray:
    """(draws, pools) nodes shared by two independent uniform random subsets of each pool, of sizes `a` and `b`:
    Hypergeometric(good = a, bad = pool - a, draws = b) per pool."""
    return rng.hypergeometric(a, pool_sizes - a, b, size=(draws, len(pool_sizes)))


def null_overlaps(
    a: Shape, b: Shape, pool_sizes: np.ndarray, permutations: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(permutations,) shared node and shared edge counts of random circuits shaped like `a` and `b`."""
    shared = shared_counts(a.nodes, b.nodes, pool_sizes, permutations, rng)
    joined = shared[:, :-1] * shared[:, 1:]
    pairs_a, pairs_b = a.nodes[:-1] * a.nodes[1:], b.nodes[:-1] * b.nodes[1:]
    hit = rng.hypergeometric(joined, pairs_a - joined, a.edges)
    shared_edges = rng.hypergeometric(hit, pairs_b - hit, b.edges)
    return shared.sum(1), shared_edges.sum(1)


def _num(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def _p_value_and_null_mean(
    shared: int, union: int, null_shared: np.ndarray, null_union: np.ndarray
) -> tuple[float, float]:
    """(p-value, mean null Jaccard); #{null >= observed} compares shared/union ratios by cross-multiplying."""
    if union == 0:
        return float("nan"), float("nan")
    at_least = np.count_nonzero(null_shared * union >= shared * null_union)
    return (1 + at_least) / (1 + len(null_shared)), float(np.mean(null_shared / null_union))


@dataclass
class Overlap:
    """Node and edge overlap of two circuits, each against the permutation null (None: undefined, both empty)."""

    a: str
    b: str
    node_jaccard: float | None
    node_shared: int
    node_union: int
    node_p_value: float | None
    null_node_jaccard: float | None
    """Mean node Jaccard of the random circuit pairs of the same shapes."""
    edge_jaccard: float | None
    edge_shared: int
    edge_union: int
    edge_p_value: float | None
    null_edge_jaccard: float | None


@dataclass
class CategoryOverlap(Overlap):
    """A category's toxic circuit against its safe one."""

    category: str = ""


def compare(
    a: Circuit, b: Circuit, shapes: Mapping[str, Shape], pool_sizes: np.ndarray, cfg: SimilarityConfig,
    rng: np.random.Generator, null_jaccards: list[np.ndarray] | None = None,
) -> Overlap:
    """Node and edge Jaccard of two circuits, with p-values and null means from the permutation null; the
    pair's (permutations,) null node Jaccards are appended to `null_jaccards` (for the mean's null)."""
    fields: dict[str, float | int | None] = {}
    null_nodes, null_edges = null_overlaps(shapes[a.name], shapes[b.name], pool_sizes, cfg.permutations, rng)
    if null_jaccards is not None:
        union = len(a.node_names()) + len(b.node_names()) - null_nodes
        with np.errstate(invalid="ignore", divide="ignore"):
            null_jaccards.append(np.where(union > 0, null_nodes / np.maximum(union, 1), np.nan))
    for kind, sa, sb, null_shared in (
        ("node", a.node_names(), b.node_names(), null_nodes),
        ("edge", a.edge_names(), b.edge_names(), null_edges),
    ):
        shared, union = len(sa & sb), len(sa | sb)
        p, null_mean = _p_value_and_null_mean(shared, union, null_shared, len(sa) + len(sb) - null_shared)
        fields |= {
            f"{kind}_jaccard": _num(jaccard(sa, sb)), f"{kind}_shared": shared, f"{kind}_union": union,
            f"{kind}_p_value": _num(p), f"null_{kind}_jaccard": _num(null_mean),
        }
    return Overlap(a=a.name, b=b.name, **fields)  # type: ignore[arg-type]


def similarity_matrix(circuits: Sequence[Circuit], pairs: Sequence[Overlap], kind: str
                      ) -> list[list[float | None]]:
    """Symmetric matrix of `<kind>_jaccard` from the pair records; the diagonal is each circuit with itself."""
    names = [c.name for c in circuits]
    where = {name: i for i, name in enumerate(names)}
    sets = [c.node_names() if kind == "node" else c.edge_names() for c in circuits]
    matrix: list[list[float | None]] = [[_num(jaccard(s, s)) if i == j else None for j in range(len(names))]
                          for i, s in enumerate(sets)]
    for r in pairs:
        i, j = where[r.a], where[r.b]
        matrix[i][j] = matrix[j][i] = getattr(r, f"{kind}_jaccard")
    return matrix


@dataclass
class SharedCore:
    """The nodes most category circuits share, and those only one holds."""

    min_circuits: int
    """Circuits a node must be in to be in the core."""
    nodes: list[str]
    counts: dict[str, int]
    """Circuits each core node is in."""
    size: int
    core_fraction: dict[str, float | None]
    """Per category: the fraction of its circuit's nodes in the core (None: an empty circuit)."""
    specific: dict[str, list[str]]
    """Per category: the nodes in its circuit alone."""
    specific_counts: dict[str, int]
    circuit_count_histogram: list[int]
    """Entry m - 1: the nodes in exactly m circuits."""


def shared_core(circuits: Sequence[Circuit], shared_fraction: float) -> SharedCore:
    """Nodes in >= shared_fraction of the circuits (the core) and in exactly one (category-specific)."""
    n = len(circuits)
    counts = Counter(name for c in circuits for name in c.node_names())
    order = {node.name: (c.layers.index(node.layer), node.position, node.feature) for c in circuits for node in c.nodes}
    core = sorted((name for name, k in counts.items() if k / n >= shared_fraction), key=order.__getitem__)
    specific = {c.category: sorted((x for x in c.node_names() if counts[x] == 1), key=order.__getitem__)
                for c in circuits}
    return SharedCore(
        min_circuits=min(k for k in range(1, n + 1) if k / n >= shared_fraction),
        nodes=core,
        counts={name: counts[name] for name in core},
        size=len(core),
        core_fraction={c.category: len(c.node_names() & set(core)) / len(c.node_names()) if c.nodes else None
                       for c in circuits},
        specific=specific,
        specific_counts={category: len(names) for category, names in specific.items()},
        circuit_count_histogram=[sum(1 for k in counts.values() if k == m) for m in range(1, n + 1)],
    )


def _significant(pairs: Sequence[Overlap], kind: str, level: float) -> tuple[int, int]:
    """(pairs with p < level, pairs with a p-value) for node or edge similarity."""
    ps = [p for r in pairs if (p := getattr(r, f"{kind}_p_value")) is not None]
    return sum(p < level for p in ps), len(ps)


def _mean(pairs: Sequence[Overlap], key: str) -> float:
    """Mean of a pair-record field over the pairs where it is defined; NaN when none is."""
    values = [v for r in pairs if (v := getattr(r, key)) is not None]
    return float(np.mean(values)) if values else float("nan")


@dataclass
class Verdict:
    """Monolithic, hybrid or modular, with the numbers it rests on."""

    label: str
    mean_node_jaccard: float
    mean_node_jaccard_p_value: float | None
    """The mean against the means of the same pairs of random circuits (one per permutation)."""
    mean_edge_jaccard: float | None
    mean_null_node_jaccard: float | None
    mean_null_edge_jaccard: float | None
    significant_node_fraction: float | None
    significant_edge_fraction: float | None
    n_pairs: int
    explanation: str


def verdict(pairs: Sequence[Overlap], core_size: int, n_circuits: int, cfg: SimilarityConfig,
            null_jaccards: Sequence[np.ndarray] = ()) -> Verdict:
    """monolithic / hybrid / modular from the mean pairwise node Jaccard, with the null as context: the
    p-value of the mean against the means of the same pairs of random circuits (one per permutation)."""
    node, null = _mean(pairs, "node_jaccard"), _mean(pairs, "null_node_jaccard")
    defined = [r.node_jaccard is not None for r in pairs]
    mean_p = None
    if null_jaccards and any(defined):
        null_means = np.nanmean(np.stack([n for n, d in zip(null_jaccards, defined) if d]), axis=0)
        mean_p = p_above(node - 1e-12, null_means)
    if np.isnan(node):
        raise UserError("similarity: every category circuit is empty; lower circuits.threshold so circuits have nodes")
    if node >= cfg.monolithic_above:
        label, why = "monolithic", (f"at or above the monolithic threshold {cfg.monolithic_above}: the categories "
                                    f"refuse through one shared mechanism, a core of {core_size} nodes")
    elif node <= cfg.modular_below:
        label, why = "modular", (f"at or below the modular threshold {cfg.modular_below}: each category refuses "
                                 "through mostly its own features")
    else:
        label, why = "hybrid", (f"between the modular ({cfg.modular_below}) and monolithic ({cfg.monolithic_above}) "
                                f"thresholds: a shared core of {core_size} nodes plus category-specific features")
    node_sig, node_tested = _significant(pairs, "node", cfg.significance)
    edge_sig, edge_tested = _significant(pairs, "edge", cfg.significance)
    chance = "" if mean_p is None else f", p = {mean_p:.3g} for the mean against random circuits of the same sizes"
    explanation = (f"Refusal looks {label}: the {n_circuits} category circuits have a mean pairwise node Jaccard of "
                   f"{node:.2f} (chance {null:.2f}{chance}; {node_sig} of {len(pairs)} pairs above chance at "
                   f"p < {cfg.significance}), {why}. The circuits are those at the discovery threshold; the "
                   "verdict depends on it.")
    return Verdict(
        label=label,
        mean_node_jaccard=node,
        mean_node_jaccard_p_value=mean_p,
        mean_edge_jaccard=_num(_mean(pairs, "edge_jaccard")),
        mean_null_node_jaccard=_num(null),
        mean_null_edge_jaccard=_num(_mean(pairs, "null_edge_jaccard")),
        significant_node_fraction=node_sig / node_tested if node_tested else None,
        significant_edge_fraction=edge_sig / edge_tested if edge_tested else None,
        n_pairs=len(pairs),
        explanation=explanation,
    )


def _check(circuits: Sequence[Circuit]) -> list[Circuit]:
    """The category ("all"-group) circuits, after checking the set of circuits can be compared."""
    categories = [c for c in circuits if c.group == "all"]
    if len(categories) < 2:
        raise UserError(f"similarity needs at least 2 category circuits (group 'all'), got {len(categories)}; "
                        "discover circuits for 2 or more categories")
    for c in circuits:
        if c.layers != circuits[0].layers:
            raise UserError(f"circuit {c.name!r} has layers {c.layers}, circuit {circuits[0].name!r} has "
                            f"{circuits[0].layers}; compare circuits discovered on the same layers")
    names = [c.name for c in circuits]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"similarity: circuit name(s) {duplicates} given more than once; pass each circuit once")
    return categories


@dataclass
class Similarity:
    """The similarity stage's record: `<analysis>/<method>/similarity.json`."""

    config: SimilarityConfig
    layers: list[str]
    candidates: dict[str, int]
    """Candidate nodes per layer: the pool random circuits are drawn from."""
    circuits: list[str]
    """The category circuits compared, in matrix order."""
    sizes: dict[str, dict[str, int]]
    """Per circuit: its "nodes" and "edges"."""
    node_jaccard: list[list[float | None]]
    edge_jaccard: list[list[float | None]]
    pairs: list[Overlap]
    shared_core: SharedCore
    safe_vs_toxic: list[CategoryOverlap]
    verdict: Verdict


def analyse_similarity(
    circuits: Sequence[Circuit], candidates: Mapping[str, Iterable[tuple[int, str]]], cfg: SimilarityConfig
) -> Similarity:
    """Compare the category circuits (and each category's toxic and safe circuits) against the null.

    `candidates` maps every layer to the (feature, position) keys of the nodes a circuit could have
    selected there (the live latents and the error nodes at every position class).
    """
    categories = _check(circuits)
    layers = categories[0].layers
    pools = candidate_pools(candidates, layers)
    pool_sizes = np.array([len(pools[layer]) for layer in layers], np.int64)
    shapes = {c.name: circuit_shape(c, pools) for c in circuits}
    rng = np.random.default_rng(cfg.seed)
    nulls: list[np.ndarray] = []
    pairs = [compare(a, b, shapes, pool_sizes, cfg, rng, nulls)
             for i, a in enumerate(categories) for b in categories[i + 1:]]
    by_group = {(c.category, c.group): c for c in circuits}
    safe_vs_toxic = [
        CategoryOverlap(**vars(compare(by_group[c.category, "toxic"], by_group[c.category, "safe"],
                                       shapes, pool_sizes, cfg, rng)), category=c.category)
        for c in categories if (c.category, "toxic") in by_group and (c.category, "safe") in by_group
    ]
    core = shared_core(categories, cfg.shared_fraction)
    return Similarity(
        config=cfg,
        layers=list(layers),
        candidates={layer: int(n) for layer, n in zip(layers, pool_sizes)},
        circuits=[c.name for c in categories],
        sizes={c.name: {"nodes": len(c.node_names()), "edges": len(c.edge_names())} for c in circuits},
        node_jaccard=similarity_matrix(categories, pairs, "node"),
        edge_jaccard=similarity_matrix(categories, pairs, "edge"),
        pairs=pairs,
        shared_core=core,
        safe_vs_toxic=safe_vs_toxic,
        verdict=verdict(pairs, core.size, len(categories), cfg, nulls),
    )


__all__ = [
    "CategoryOverlap", "Overlap", "Shape", "SharedCore", "Similarity", "SimilarityConfig", "Verdict",
    "analyse_similarity", "candidate_pools", "circuit_shape", "compare", "jaccard",
    "null_overlaps", "shared_core", "shared_counts", "similarity_matrix", "verdict",
]
