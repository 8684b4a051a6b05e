"""Circuit similarity: Jaccard, the permutation null, shared core, verdict, files and bad input."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from itertools import pairwise

import numpy as np
import pytest
from scipy import stats

from refusal_sae.circuits import ERROR, Circuit, Edge, Node, node_name
from refusal_sae.errors import UserError
from refusal_sae.io import from_json, to_json, write_json
from refusal_sae.plots import plot_similarity
from refusal_sae.similarity import Similarity, SimilarityConfig, analyse_similarity

LAYERS = ["residuals_0", "residuals_1", "residuals_2"]
POSITIONS = ("content", "-1")
LAST = "-1"

Key = int | tuple[int, str]
"""A node of a layer: a feature index (at the last position) or a (feature, position) pair."""


def key(f: Key) -> tuple[int, str]:
    return (int(f), LAST) if isinstance(f, (int, np.integer)) else (int(f[0]), str(f[1]))


def name(layer: str, f: Key) -> str:
    return node_name(layer, *key(f))


def make_circuit(category: str, features: Mapping[str, Iterable[Key]], edges: Iterable[tuple[str, str]] = (),
                 group: str = "all", layers: list[str] | None = None) -> Circuit:
    """A circuit holding exactly the given nodes per layer (ERROR for the error node) and edges."""
    nodes = [Node(layer, *key(f), 1.0) for layer, fs in features.items() for f in fs]
    return Circuit(category, group, "correlation", layers or LAYERS, nodes,
                   [Edge(s, t, 0.5, 0.5) for s, t in edges])


def pool(n: int, layers: list[str] = LAYERS, positions: Iterable[str] = POSITIONS) -> dict[str, list[tuple[int, str]]]:
    """Per layer the candidate keys: latents 0..n-1 and the error node, at every position class."""
    return {layer: [(f, p) for p in positions for f in [*range(n), ERROR]] for layer in layers}


def names(features: Mapping[str, Iterable[Key]]) -> set[str]:
    return {name(layer, f) for layer, fs in features.items() for f in fs}


def test_jaccard_of_nodes_and_edges_is_the_set_ratio() -> None:
    """A node is a (feature, position) pair: latent 3 at the content positions is not latent 3 at -1."""
    fa = {"residuals_0": [1, 2, (3, "content"), ERROR], "residuals_1": [4, 5, (5, "content")], "residuals_2": [7]}
    fb = {"residuals_0": [2, 3, 9], "residuals_1": [4, 6, ERROR, (5, "content")], "residuals_2": [7, 8]}
    ea = {("residuals_0/1@-1", "residuals_1/4@-1"), ("residuals_0/2@-1", "residuals_1/4@-1"),
          ("residuals_1/5@-1", "residuals_2/7@-1")}
    eb = {("residuals_0/2@-1", "residuals_1/4@-1"), ("residuals_1/4@-1", "residuals_2/7@-1"),
          ("residuals_1/error@-1", "residuals_2/8@-1")}
    a, b = make_circuit("a", fa, ea), make_circuit("b", fb, eb)
    result = analyse_similarity([a, b], pool(20), SimilarityConfig(permutations=50))
    na, nb = names(fa), names(fb)
    pair = result.pairs[0]
    assert na & nb == {"residuals_0/2@-1", "residuals_1/4@-1", "residuals_1/5@content", "residuals_2/7@-1"}
    assert pair.node_jaccard == pytest.approx(len(na & nb) / len(na | nb))
    assert pair.edge_jaccard == pytest.approx(len(ea & eb) / len(ea | eb))
    assert (pair.node_shared, pair.node_union) == (len(na & nb), len(na | nb))
    for kind in ("node", "edge"):
        m = getattr(result, f"{kind}_jaccard")
        assert m[0][0] == m[1][1] == 1.0
        assert m[0][1] == m[1][0] == getattr(pair, f"{kind}_jaccard")
    assert result.sizes == {"a": {"nodes": len(na), "edges": len(ea)}, "b": {"nodes": len(nb), "edges": len(eb)}}
    assert result.candidates == {layer: 42 for layer in LAYERS}  # 20 features + the error node, at 2 classes


def test_identical_circuits_are_one_and_significant() -> None:
    f = {"residuals_0": [1, 2, 3], "residuals_1": [4, 5, ERROR], "residuals_2": [6]}
    e = [("residuals_0/1@-1", "residuals_1/4@-1"), ("residuals_1/5@-1", "residuals_2/6@-1")]
    cfg = SimilarityConfig(permutations=200)
    result = analyse_similarity([make_circuit("a", f, e), make_circuit("b", f, e)], pool(100), cfg)
    pair = result.pairs[0]
    assert pair.node_jaccard == pair.edge_jaccard == 1.0
    assert pair.node_p_value == pytest.approx(1 / (1 + cfg.permutations))  # no random pair is identical
    assert pair.edge_p_value < cfg.significance
    assert result.verdict.significant_node_fraction == 1.0


def test_disjoint_circuits_are_zero_and_not_significant() -> None:
    fa = {"residuals_0": [1, 2], "residuals_1": [3], "residuals_2": [4, 5]}
    fb = {"residuals_0": [6, 7], "residuals_1": [8], "residuals_2": [9, 10]}
    result = analyse_similarity([make_circuit("a", fa), make_circuit("b", fb)], pool(15), SimilarityConfig())
    pair = result.pairs[0]
    assert pair.node_jaccard == 0.0
    assert pair.node_p_value == 1.0  # every random pair overlaps at least as much as 0
    assert result.verdict.significant_node_fraction == 0.0
    assert result.verdict.label == "modular"


def planted(core_size: int, specific: int, rng: np.random.Generator, categories: int = 5, width: int = 200):
    """Circuits of `categories` categories: one planted core plus disjoint random specific nodes each."""
    cells = [(layer, (f, p)) for layer in LAYERS for p in POSITIONS for f in range(width)]
    order = rng.permutation(len(cells))
    core = [cells[i] for i in order[:core_size]]
    rest = order[core_size:]
    circuits, spec = [], {}
    for k in range(categories):
        mine = [cells[i] for i in rest[k * specific:(k + 1) * specific]]
        spec[f"cat{k}"] = {name(*c) for c in mine}
        features = {layer: [f for lay, f in core + mine if lay == layer] for layer in LAYERS}
        circuits.append(make_circuit(f"cat{k}", features))
    return circuits, {name(*c) for c in core}, spec


def test_planted_core_is_recovered_and_the_verdict_follows_the_overlap() -> None:
    rng = np.random.default_rng(1)
    labels = []
    for core_size in (2, 12, 40):
        circuits, core, spec = planted(core_size, 10, rng)
        result = analyse_similarity(circuits, pool(200), SimilarityConfig(permutations=100))
        shared = result.shared_core
        assert set(shared.nodes) == core and shared.size == core_size
        assert all(shared.counts[n] == len(circuits) for n in core)
        assert {k: set(v) for k, v in shared.specific.items()} == spec
        assert shared.specific_counts == {k: len(v) for k, v in spec.items()}
        sets = [c.node_names() for c in circuits]
        per_pair = [len(a & b) / len(a | b) for i, a in enumerate(sets) for b in sets[i + 1:]]
        assert result.verdict.mean_node_jaccard == pytest.approx(np.mean(per_pair))
        labels.append(result.verdict.label)
        assert result.verdict.explanation.startswith(f"Refusal looks {labels[-1]}: the 5 category circuits")
    assert labels == ["modular", "hybrid", "monolithic"]


def test_node_null_mean_is_the_hypergeometric_expectation() -> None:
    n, k1, k2 = 60, 12, 20
    a = make_circuit("a", {"l": range(k1)}, layers=["l"])
    b = make_circuit("b", {"l": range(30, 30 + k2)}, layers=["l"])
    cfg = SimilarityConfig(permutations=20000)
    null = analyse_similarity([a, b], pool(n - 1, ["l"], [LAST]), cfg).pairs[0].null_node_jaccard  # + error
    shared = np.arange(min(k1, k2) + 1)
    exact = np.sum(stats.hypergeom.pmf(shared, n, k1, k2) * shared / (k1 + k2 - shared))
    expected_shared = k1 * k2 / n
    assert null == pytest.approx(exact, abs=0.003)
    assert null == pytest.approx(expected_shared / (k1 + k2 - expected_shared), abs=0.02)


def test_null_matches_explicitly_drawn_random_circuits() -> None:
    """The hypergeometric shortcut against random circuits built node by node and edge by edge."""
    width = 8
    fa = {"residuals_0": [0, 1, 2, 3], "residuals_1": [0, 1, 2], "residuals_2": [0, 1, 2, 3, 4]}
    fb = {"residuals_0": [0, 1, 2], "residuals_1": [0, 1, 2, 3], "residuals_2": [0, 1, 2]}
    m_a, m_b = [6, 10], [5, 7]  # edges from each layer to the next

    def edges(f: Mapping[str, list[int]], counts: list[int]) -> list[tuple[str, str]]:
        out = []
        for (up, low), m in zip(pairwise(LAYERS), counts):
            out += [(name(up, i), name(low, j)) for i in f[up] for j in f[low]][:m]
        return out

    cfg = SimilarityConfig(permutations=20000)
    a, b = make_circuit("a", fa, edges(fa, m_a)), make_circuit("b", fb, edges(fb, m_b))
    pair = analyse_similarity([a, b], pool(width), cfg).pairs[0]

    rng = np.random.default_rng(7)
    cand = pool(width)["residuals_0"]  # every (feature, position) key, error nodes included

    def random_circuit(f: Mapping[str, list[int]], counts: list[int]) -> tuple[set, set]:
        chosen = {layer: [cand[i] for i in rng.choice(len(cand), len(f[layer]), replace=False)] for layer in LAYERS}
        drawn = set()
        for (up, low), m in zip(pairwise(LAYERS), counts):
            options = [(name(up, i), name(low, j)) for i in chosen[up] for j in chosen[low]]
            drawn |= {options[i] for i in rng.choice(len(options), m, replace=False)}
        return names(chosen), drawn

    node_j, edge_j = [], []
    for _ in range(4000):
        (na, ea), (nb, eb) = random_circuit(fa, m_a), random_circuit(fb, m_b)
        node_j.append(len(na & nb) / len(na | nb))
        edge_j.append(len(ea & eb) / len(ea | eb))
    for kind, sample in (("node", node_j), ("edge", edge_j)):
        tolerance = 4 * np.std(sample) * np.sqrt(1 / len(sample) + 1 / cfg.permutations)
        assert getattr(pair, f"null_{kind}_jaccard") == pytest.approx(np.mean(sample), abs=tolerance)


def test_same_seed_same_result_other_seed_other_null() -> None:
    circuits, _, _ = planted(5, 10, np.random.default_rng(3))
    first = analyse_similarity(circuits, pool(200), SimilarityConfig(permutations=200, seed=4))
    again = analyse_similarity(circuits, pool(200), SimilarityConfig(permutations=200, seed=4))
    other = analyse_similarity(circuits, pool(200), SimilarityConfig(permutations=200, seed=5))
    assert json.dumps(to_json(first), sort_keys=True) == json.dumps(to_json(again), sort_keys=True)
    assert [p.null_node_jaccard for p in first.pairs] != [p.null_node_jaccard for p in other.pairs]
    assert first.node_jaccard == other.node_jaccard


def test_safe_vs_toxic_per_category() -> None:
    toxic_f = {"residuals_0": [1, 2, 3], "residuals_1": [4], "residuals_2": [5, 6]}
    safe_f = {"residuals_0": [1, 2], "residuals_1": [4, 9], "residuals_2": [7]}
    circuits = [
        make_circuit("a", {"residuals_0": [1, 2, 3], "residuals_1": [4, 9], "residuals_2": [5]}),
        make_circuit("b", {"residuals_0": [10], "residuals_1": [11], "residuals_2": [12]}),
        make_circuit("a", toxic_f, group="toxic"),
        make_circuit("a", safe_f, group="safe"),
        make_circuit("b", toxic_f, group="toxic"),  # no safe circuit for b: no comparison
    ]
    result = analyse_similarity(circuits, pool(50), SimilarityConfig(permutations=100))
    assert result.circuits == ["a", "b"]
    (row,) = result.safe_vs_toxic
    t, s = names(toxic_f), names(safe_f)
    assert (row.category, row.a, row.b) == ("a", "a/toxic", "a/safe")
    assert row.node_jaccard == pytest.approx(len(t & s) / len(t | s))
    assert 0 < row.node_p_value <= 1


def test_empty_sets_have_no_jaccard_and_are_left_out_of_means() -> None:
    circuits = [
        make_circuit("a", {"residuals_0": [1, 2], "residuals_1": [3]}),
        make_circuit("b", {"residuals_0": [1], "residuals_1": [4]}),
        make_circuit("empty", {}),
    ]
    result = analyse_similarity(circuits, pool(10), SimilarityConfig(permutations=50))
    assert result.edge_jaccard[0][1] is None and result.pairs[0].edge_p_value is None
    assert result.node_jaccard[2][2] is None  # an empty circuit with itself
    assert result.node_jaccard[0][2] == 0.0  # empty vs non-empty: nothing shared
    assert result.verdict.mean_edge_jaccard is None
    assert result.verdict.mean_node_jaccard == pytest.approx((1 / 4 + 0 + 0) / 3)
    assert result.shared_core.core_fraction["empty"] is None


def test_write_similarity_files(tmp_path) -> None:
    circuits, _, _ = planted(5, 5, np.random.default_rng(0), categories=4)
    result = analyse_similarity(circuits, pool(200), SimilarityConfig(permutations=50))
    write_json(tmp_path / "out" / "sim.json", to_json(result))
    plot_similarity(result, tmp_path / "plots" / "sim.png")  # folders made
    assert from_json(Similarity, json.loads((tmp_path / "out" / "sim.json").read_text())) == result  # typed
    assert (tmp_path / "plots" / "sim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "out", "out/sim.json", "plots", "plots/sim.png"]  # nothing else, no temporary file left


@pytest.mark.parametrize(
    ("circuits", "candidates", "message"),
    [
        ([make_circuit("a", {"residuals_0": [1]})], pool(5), "at least 2 category circuits"),
        ([make_circuit("a", {"residuals_0": [1]}), make_circuit("b", {"residuals_0": [1]}, layers=LAYERS[:2])],
         pool(5), "same layers"),
        ([make_circuit("a", {"residuals_0": [1]}), make_circuit("b", {"residuals_0": [2]})],
         pool(5, LAYERS[:2]), "no candidate nodes for layer(s) ['residuals_2']"),
        ([make_circuit("a", {"residuals_0": [1]}), make_circuit("b", {"residuals_1": [7]})],
         pool(5), "node residuals_1/7@-1 is not among the candidates"),
        ([make_circuit("a", {"residuals_0": [1]}), make_circuit("b", {"residuals_0": [(2, "-2")]})],
         pool(5), "node residuals_0/2@-2 is not among the candidates"),
        ([make_circuit("a", {"residuals_0": [1]}), make_circuit("a", {"residuals_0": [2]})], pool(5), "more than once"),
        ([make_circuit("a", {"residuals_0": [1], "residuals_2": [2]}, [("residuals_0/1@-1", "residuals_2/2@-1")]),
          make_circuit("b", {"residuals_0": [2]})], pool(5), "edge residuals_0/1@-1 -> residuals_2/2@-1"),
        ([make_circuit("a", {}), make_circuit("b", {})], pool(5), "every category circuit is empty"),
    ],
)
def test_bad_input_is_a_user_error(circuits, candidates, message) -> None:
    with pytest.raises(UserError, match="similarity|circuit") as err:
        analyse_similarity(circuits, candidates, SimilarityConfig(permutations=10))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("permutations", 0), ("shared_fraction", 0.0), ("shared_fraction", 1.5), ("monolithic_above", 0.1),
     ("modular_below", -0.1), ("significance", 1.0), ("seed", -1)],
)
def test_bad_config_names_the_field(field, value) -> None:
    with pytest.raises(UserError, match=field):
        SimilarityConfig(**{field: value})
