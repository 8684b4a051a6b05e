"""Circuit discovery and mean-ablation evaluation on a model whose refusal circuit is known by construction."""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch
from scipy import stats

from refusal_sae.ablation import AblationConfig, Ablator, evaluate_sweep, normalised
from refusal_sae.activations import ActivationConfig, InferencePipeline, PromptActivations
from refusal_sae.analysis import curve_areas, discover_circuits, evaluate_circuits, format_summary
from refusal_sae.circuits import (
    ERROR,
    Circuit,
    CircuitConfig,
    Node,
    discover,
    encode_prompts,
    pearson,
    pearson_p_values,
    sweep_circuits,
)
from refusal_sae.errors import UserError
from refusal_sae.metric import RefusalMetric
from refusal_sae.model import ModelConfig, ModelWrapper
from refusal_sae.similarity import SimilarityConfig
from tests.conftest import single_thread
from tests.planted import LAYERS, METRIC, PLANTED, exact_saes, make_planted_model, planted_nodes, planted_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("planted")
    with single_thread():
        wrapper = ModelWrapper(ModelConfig(name=str(make_planted_model(root / "model"))))
        splits = planted_prompts(48)
        cache = InferencePipeline(wrapper, ActivationConfig(layers=LAYERS, shard_size=64), root / "cache").run(splits)
        saes = exact_saes()
        pf = encode_prompts(saes, PromptActivations(cache, ["discovery"]))
    return wrapper, splits, saes, pf


def ablator(planted, **kwargs) -> Ablator:
    wrapper, _, saes, pf = planted
    return Ablator(wrapper, saes, pf.feature_means, pf.error_means, RefusalMetric.from_wrapper(wrapper, METRIC),
                   AblationConfig(**kwargs))


def eval_set(planted, category: str) -> tuple[list[str], np.ndarray]:
    samples = [s for s in planted[1]["evaluation"] if s.category == category]
    return [s.prompt for s in samples], np.array([s.refusal_label for s in samples])


def candidates(pf) -> dict[str, np.ndarray]:
    return {layer: np.flatnonzero(m > 0) for layer, m in pf.feature_means.items()}


def test_the_sae_is_exact_so_error_nodes_carry_nothing(planted) -> None:
    wrapper, _, saes, pf = planted
    assert all(np.all(pf.errors[layer] == 0) for layer in LAYERS)
    enc = wrapper.tokenize(["alpha beta"], "right")
    x = wrapper.residuals(enc["input_ids"], enc["attention_mask"], LAYERS)["residuals_0"].float()
    sae = saes["residuals_0"]
    assert torch.equal(sae.decode(sae.encode(x)), x)


@pytest.mark.parametrize("category", ["alpha", "beta"])
def test_planted_circuit_is_recovered_sufficient_and_necessary(planted, category: str) -> None:
    _, _, _, pf = planted
    cfg = CircuitConfig(threshold=0.5, sweep=[0.5])
    circuit, scores = discover(pf, pf.labels, category, "all", cfg)
    assert circuit.method == "correlation"
    assert circuit.node_names() == planted_nodes()
    # every planted latent correlates strongly with the label; nothing else comes close
    for layer in LAYERS:
        r = scores.signed[layer]
        assert np.all(r[PLANTED] > 0.8)
        assert np.abs(np.delete(r, PLANTED)).max() < 0.5

    prompts, positive = eval_set(planted, category)
    result = evaluate_sweep(ablator(planted), prompts, positive, circuit, sweep_circuits(scores, circuit, cfg),
                            candidates(pf))
    point = result["points"][0]
    assert point["n_nodes"] == len(planted_nodes())
    assert result["F_M"] > 1.0  # toxic prompts score far above safe ones
    assert abs(result["F_empty"]) < 1e-5  # every prompt gets the same stream: no contrast left
    assert point["circuit"]["faithfulness"] > 0.9
    assert abs(point["circuit"]["completeness"]) < 0.1
    # a random circuit of the same size (same count per layer) is clearly worse: at most it hits a
    # planted latent by chance (each carries a third of the signal)
    assert point["random"]["faithfulness"] < point["circuit"]["faithfulness"] - 0.5
    assert point["random"]["completeness"] > point["circuit"]["completeness"] + 0.5
    assert result["best"]["n_nodes"] == len(planted_nodes())


def test_full_circuit_is_faithful_and_complete_exactly(planted) -> None:
    _, _, saes, pf = planted
    everything = [Node(layer, j, 1.0) for layer in LAYERS for j in range(saes[layer].cfg.width)]
    everything += [Node(layer, ERROR, 1.0) for layer in LAYERS]
    full = Circuit("alpha", "all", "correlation", LAYERS, everything)
    prompts, positive = eval_set(planted, "alpha")
    point = evaluate_sweep(ablator(planted), prompts, positive, full, [full], candidates(pf))["points"][0]
    assert point["circuit"]["faithfulness"] == 1.0
    assert point["circuit"]["completeness"] == 0.0


def test_ablating_one_layer_reaches_the_next_through_the_model(planted) -> None:
    """Keeping the planted latents at layer 1 only does not help: layer 0's ablation already removed
    them from the stream that the layer-1 SAE encodes."""
    _, _, _, pf = planted
    prompts, positive = eval_set(planted, "alpha")
    abl = ablator(planted)
    only_late = [Node("residuals_1", j, 1.0) for j in PLANTED]
    both = only_late + [Node("residuals_0", j, 1.0) for j in PLANTED]
    f_model = float(abl.scores(prompts)[positive].mean() - abl.scores(prompts)[~positive].mean())

    def contrast(nodes):
        s = abl.scores(prompts, abl.keep_circuit(nodes))
        return float(s[positive].mean() - s[~positive].mean())

    assert abs(contrast(only_late)) < 0.05 * f_model
    assert contrast(both) > 0.9 * f_model


def test_keep_errors_never_ablates_the_error_term(planted) -> None:
    wrapper, _, saes, pf = planted
    abl = ablator(planted, keep_errors=True)
    assert all(k.error for k in abl.keep_nothing().values())
    assert not any(k.error for k in ablator(planted).keep_nothing().values())


def test_constant_labels_fall_back_to_magnitude(planted) -> None:
    _, _, _, pf = planted
    cfg = CircuitConfig(top_n=4, sweep_top_n=[1, 4])
    circuit, scores = discover(pf, pf.labels, "alpha", "toxic", cfg)
    assert circuit.method == "magnitude" and circuit.group == "toxic"
    assert circuit.n_prompts == int(((pf.categories == "alpha") & pf.labels).sum())
    sub = pf.features["residuals_0"][(pf.categories == "alpha") & pf.labels]
    expected = 0.7 * np.abs(sub).mean(0) + 0.3 * sub.var(0)
    np.testing.assert_allclose(scores.importance["residuals_0"][:-1], expected, rtol=1e-6)
    top = set(np.argsort(-expected)[:4].tolist())
    assert set(circuit.features("residuals_0")) <= top | {ERROR}
    assert [len(c.nodes) for c in sweep_circuits(scores, circuit, cfg)] == [2, 8]


def test_pearson_and_p_values_match_scipy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5))
    y = x[:, 0] * 0.5 + rng.normal(size=30)
    r = pearson(x, y[:, None])[:, 0]
    p = pearson_p_values(r, 30)
    for j in range(5):
        expected = stats.pearsonr(x[:, j], y)
        assert r[j] == pytest.approx(expected.statistic, abs=1e-12)
        assert p[j] == pytest.approx(expected.pvalue, rel=1e-6)
    assert pearson(np.ones((5, 1)), y[:5, None])[0, 0] == 0.0  # a constant column has no correlation


def test_edges_link_the_planted_latents_across_layers(planted) -> None:
    _, _, _, pf = planted
    circuit, _ = discover(pf, pf.labels, "alpha", "all", CircuitConfig(threshold=0.5, edge_threshold=0.9))
    # the identity block copies layer 0's stream: each planted latent is perfectly correlated with itself
    for j in PLANTED:
        assert (f"residuals_0/{j}", f"residuals_1/{j}") in circuit.edge_names()
    assert all(e.source.startswith("residuals_0") and e.target.startswith("residuals_1") for e in circuit.edges)


def test_circuit_files_round_trip(planted, tmp_path: Path) -> None:
    _, _, _, pf = planted
    cfg = CircuitConfig(threshold=0.5, separate_safe_toxic=True)
    circuit, _ = discover(pf, pf.labels, "beta", "all", cfg)
    circuit.save(tmp_path)
    loaded = Circuit.load(tmp_path / "beta.json")
    assert loaded == circuit
    graph = nx.read_graphml(tmp_path / "beta.graphml")
    assert set(graph.nodes) == circuit.node_names()
    assert graph.nodes["residuals_0/0"]["layer"] == "residuals_0"
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="bad.json is not a circuit file"):
        Circuit.load(tmp_path / "bad.json")


def test_evaluation_split_without_safe_prompts_is_refused(planted) -> None:
    _, _, _, pf = planted
    circuit, scores = discover(pf, pf.labels, "alpha", "all", CircuitConfig(threshold=0.5))
    prompts, positive = eval_set(planted, "alpha")
    with pytest.raises(UserError, match="has no safe prompts"):
        evaluate_sweep(ablator(planted), [p for p, t in zip(prompts, positive) if t],
                       positive[positive], circuit, [circuit], candidates(pf))


def test_undefined_faithfulness_is_reported_not_divided() -> None:
    assert normalised(1.0, 2.0, 2.0) is None
    assert normalised(1.5, 2.0, 1.0) == 0.5


def test_bad_circuit_config_values() -> None:
    with pytest.raises(UserError, match="circuits.threshold"):
        CircuitConfig(threshold=1.5)
    with pytest.raises(UserError, match="circuits.alpha"):
        CircuitConfig(alpha=0)
    with pytest.raises(UserError, match="top_n"):
        CircuitConfig(sweep_top_n=[0])


# ------------------------------------------------------------------ the analysis stages, end to end


@pytest.fixture(scope="module")
def planted_cache(planted, tmp_path_factory: pytest.TempPathFactory):
    wrapper, splits, _, _ = planted
    with single_thread():
        return InferencePipeline(wrapper, ActivationConfig(layers=LAYERS, shard_size=64),
                                 tmp_path_factory.mktemp("cache")).run(splits)


def test_analysis_stages_write_every_output(planted, planted_cache, tmp_path: Path) -> None:
    wrapper, splits, saes, _ = planted
    cfg = CircuitConfig(threshold=0.5, separate_safe_toxic=True, sweep=[0.9, 0.5], sweep_top_n=[1, 3])
    circuits = discover_circuits(saes, planted_cache, splits, cfg, SimilarityConfig(permutations=50), tmp_path)
    circuits = circuits["correlation"]
    assert [c.name for c in circuits] == ["alpha", "alpha/toxic", "alpha/safe", "beta", "beta/toxic", "beta/safe"]
    assert all(c.method == "magnitude" for c in circuits if c.group != "all")
    similarity = json.loads((tmp_path / "correlation" / "similarity.json").read_text())
    assert similarity["node_jaccard"][0][1] == 1.0  # both categories share exactly the planted circuit
    assert [r["category"] for r in similarity["safe_vs_toxic"]] == ["alpha", "beta"]

    summary = evaluate_circuits(wrapper, saes, splits, tmp_path, AblationConfig(), METRIC)
    assert summary["methods"]["correlation"]["circuits"]["alpha"]["best"]["faithfulness"] > 0.9
    evaluation = json.loads((tmp_path / "correlation" / "evaluation.json").read_text())
    toxic = next(r for r in evaluation["circuits"] if r["name"] == "alpha/toxic")
    n_toxic = sum(s.refusal_label and s.category == "alpha" for s in splits["evaluation"])
    assert toxic["n_eval_prompts"] == toxic["n_positive"] == n_toxic  # judged on the toxic prompts only
    assert [p["top_n"] for p in toxic["points"]] == [1, 3]
    assert (tmp_path / "correlation" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "alpha" in format_summary(summary)


def test_evaluation_refuses_missing_saes_and_empty_sweeps(planted, planted_cache, tmp_path: Path) -> None:
    wrapper, splits, saes, _ = planted
    cfg = CircuitConfig(threshold=0.5, sweep=[1.0])
    discover_circuits(saes, planted_cache, splits, cfg, SimilarityConfig(permutations=10), tmp_path)
    with pytest.raises(UserError, match="SAEs for \\['residuals_1'\\], which are missing"):
        evaluate_circuits(wrapper, {"residuals_0": saes["residuals_0"]}, splits, tmp_path, AblationConfig(), METRIC)
    with pytest.raises(UserError, match="circuit 'alpha': every point of the sweep \\[1.0\\] selects no node"):
        evaluate_circuits(wrapper, saes, splits, tmp_path, AblationConfig(), METRIC)
    with pytest.raises(UserError, match="run circuit discovery"):
        evaluate_circuits(wrapper, saes, splits, tmp_path / "nowhere", AblationConfig(), METRIC)


def test_attribution_circuits_go_through_the_same_stages(planted, planted_cache, tmp_path: Path) -> None:
    """The planted-circuit test with `methods: [correlation, attribution]`, compared at matched sizes."""
    wrapper, splits, saes, _ = planted
    cfg = CircuitConfig(methods=["correlation", "attribution"], threshold=0.5, node_threshold=0.1,
                        edge_threshold=0.05, matched_sweep=True, sweep_nodes=[6, 20])
    found = discover_circuits(saes, planted_cache, splits, cfg, SimilarityConfig(permutations=20), tmp_path,
                              wrapper=lambda: wrapper, metric=METRIC)
    for circuit in found["attribution"]:
        assert circuit.method == "attribution"
        assert circuit.node_names() == planted_nodes()
        assert all(n.score < 0 for n in circuit.nodes)  # ablating a planted latent lowers the contrast
        for j in PLANTED:
            assert (f"residuals_0/{j}", f"residuals_1/{j}") in circuit.edge_names()
    summary = evaluate_circuits(wrapper, saes, splits, tmp_path, AblationConfig())
    for method in ("correlation", "attribution"):
        best = summary["methods"][method]["circuits"]["alpha"]["best"]
        assert best["n_nodes"] == 6 and best["faithfulness"] > 0.9 and abs(best["completeness"]) < 0.1
        assert 0 < summary["methods"][method]["circuits"]["alpha"]["cpr"] <= 1
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert {r["method"] for r in comparison["rows"]} == {"correlation", "attribution"}
    assert (tmp_path / "comparison.png").is_file()
    assert "attribution" in format_summary(summary)


def test_curve_areas_of_a_perfect_and_a_useless_circuit() -> None:
    def points(faithfulness: float) -> list[dict]:
        return [{"n_nodes": 1, "circuit": {"faithfulness": faithfulness}}]

    perfect, useless = curve_areas(points(1.0), 10), curve_areas(points(0.0), 10)
    assert perfect["cpr"] == pytest.approx(0.95) and perfect["cmd"] == pytest.approx(0.05)
    assert useless["cpr"] == pytest.approx(0.45) and useless["cmd"] == pytest.approx(0.55)
    assert curve_areas([{"n_nodes": 1, "circuit": {"faithfulness": None}}], 10) == {"cpr": None, "cmd": None}
