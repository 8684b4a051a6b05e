"""Circuit discovery and the analysis stages on a model whose refusal circuit is known by construction."""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch
from scipy import stats

from refusal_sae.analysis import (
    AnalysisConfig,
    AnalysisInputs,
    format_summary,
    load_discovery,
    run_analysis,
)
from refusal_sae.circuits import Circuit, candidate_mask, ranked_nodes
from refusal_sae.correlation import CorrelationConfig, pearson, pearson_p_values
from refusal_sae.discovery import Correlation, DiscoveryConfig, DiscoveryInputs
from refusal_sae.errors import UserError
from refusal_sae.evaluation import CircuitEvaluation, EvaluationConfig
from refusal_sae.layout import RunLayout
from refusal_sae.similarity import Similarity, SimilarityConfig
from refusal_sae.validity import ValidityConfig
from tests.planted import LAYERS, METRIC, PLANTED, planted_nodes

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ("content", "-2", "-1")


def inputs(planted, labels=None) -> DiscoveryInputs:
    wrapper, splits, saes, pf, _ = planted
    samples = [splits["discovery"][i] for i in pf.prompt_index]
    return DiscoveryInputs(pf, samples, pf.labels if labels is None else labels, None, saes, lambda: wrapper, None,
                           "contrast")


def all_planted() -> set[str]:
    return set().union(*(planted_nodes(p) for p in CLASSES))


def test_the_sae_is_exact_so_error_nodes_carry_nothing(planted) -> None:
    wrapper, _, saes, pf, _ = planted
    assert all(np.all(pf.values[layer][..., -1] == 0) for layer in LAYERS)
    enc = wrapper.tokenize(["alpha beta"], "right")
    x = wrapper.residuals(enc["input_ids"], enc["attention_mask"], LAYERS)["residuals_0"].float()
    sae = saes["residuals_0"]
    assert torch.equal(sae.decode(sae.encode(x)), x)


@pytest.mark.parametrize("category", ["alpha", "beta"])
def test_correlation_finds_the_planted_latents_at_every_position_they_reach(planted, category: str) -> None:
    """Trigger words write the planted directions in the content; block 0's attention carries them to both
    suffix positions. So the planted latents correlate with the label at all three position classes."""
    method = Correlation(CorrelationConfig(threshold=0.5))
    scores = method.scores(inputs(planted), category, "all")
    circuit = method.circuit(inputs(planted), scores, category, "all")
    assert circuit.method == "correlation" and circuit.threshold == 0.5
    assert circuit.node_names() == all_planted()
    assert circuit.positions() == {p: 6 for p in CLASSES}
    for layer in LAYERS:
        r = scores.signed[layer]
        assert np.all(r[:, PLANTED] > 0.8)
        rest = np.delete(r, PLANTED, axis=1)
        assert np.abs(rest).max() < 0.5


def test_ranking_puts_the_planted_nodes_first(planted) -> None:
    _, _, _, pf, _ = planted
    d = inputs(planted)
    scores = Correlation(CorrelationConfig()).scores(d, "alpha", "all")
    ranking = ranked_nodes(scores, d.candidates())
    top = {scores.node(*entry).name for entry in ranking[:18]}
    assert top == all_planted()
    live = sum(int(pf.means.live(layer).sum()) for layer in LAYERS)
    assert len(ranking) == live + 2 * len(CLASSES)  # live latents plus an error node per layer and class
    no_errors = ranked_nodes(scores, candidate_mask({k: pf.means.live(k) for k in LAYERS}, errors=False))
    assert len(no_errors) == live


def test_constant_labels_fall_back_to_magnitude(planted) -> None:
    _, _, _, pf, _ = planted
    method = Correlation(CorrelationConfig(top_n=4))
    scores = method.scores(inputs(planted), "alpha", "toxic")
    circuit = method.circuit(inputs(planted), scores, "alpha", "toxic")
    assert circuit.method == "magnitude" and circuit.group == "toxic" and circuit.threshold is None
    rows = (pf.categories == "alpha") & pf.labels
    assert circuit.n_prompts == int(rows.sum())
    sub = pf.values["residuals_0"][rows].reshape(int(rows.sum()), -1)
    expected = (0.7 * np.abs(sub).mean(0) + 0.3 * sub.var(0)).reshape(len(CLASSES), -1)
    np.testing.assert_allclose(scores.importance["residuals_0"], expected, rtol=1e-6)
    assert sum(n.layer == "residuals_0" for n in circuit.nodes) == 4


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
    method = Correlation(CorrelationConfig(threshold=0.5, edge_threshold=0.99))
    scores = method.scores(inputs(planted), "alpha", "all")
    circuit = method.circuit(inputs(planted), scores, "alpha", "all")
    # the identity block copies layer 0's stream: each planted latent is perfectly correlated with itself
    for j in PLANTED:
        for p in CLASSES:
            assert (f"residuals_0/{j}@{p}", f"residuals_1/{j}@{p}") in circuit.edge_names()
    assert all(e.source.startswith("residuals_0") and e.target.startswith("residuals_1") for e in circuit.edges)


def test_circuit_files_round_trip(planted, tmp_path: Path) -> None:
    method = Correlation(CorrelationConfig(threshold=0.5))
    scores = method.scores(inputs(planted), "beta", "all")
    circuit = method.circuit(inputs(planted), scores, "beta", "all")
    circuit.save(tmp_path / "beta.json", tmp_path / "beta.graphml")
    assert Circuit.load(tmp_path / "beta.json") == circuit
    graph = nx.read_graphml(tmp_path / "beta.graphml")
    assert set(graph.nodes) == circuit.node_names()
    assert graph.nodes["residuals_0/0@-1"]["position"] == "-1"
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="bad.json is not a circuit file"):
        Circuit.load(tmp_path / "bad.json")


def test_bad_discovery_config_values() -> None:
    with pytest.raises(UserError, match="discovery.correlation.threshold"):
        CorrelationConfig(threshold=1.5)
    with pytest.raises(UserError, match="discovery.correlation.alpha"):
        CorrelationConfig(alpha=0)
    with pytest.raises(UserError, match="discovery.methods"):
        DiscoveryConfig(methods=["correlation", "correlation"])
    with pytest.raises(UserError, match="discovery.methods"):
        DiscoveryConfig(methods=["magic"])


# ------------------------------------------------------------------ the analysis stages, end to end


def analysis_inputs(planted, run: Path) -> AnalysisInputs:
    wrapper, splits, saes, _, cache = planted
    return AnalysisInputs(saes, cache, splits, lambda: wrapper, RunLayout(run), ValidityConfig(max_new_tokens=2))


FAST = EvaluationConfig(n_sizes=6, fractions=[0.01, 0.1, 0.5], random_circuits=2, bootstrap=200)


@pytest.mark.slow
def test_analysis_stages_write_every_output(planted, tmp_path: Path) -> None:
    run = RunLayout(tmp_path)
    cfg = AnalysisConfig(discovery=DiscoveryConfig(separate_safe_toxic=True), evaluation=FAST,
                         similarity=SimilarityConfig(permutations=50), metric=METRIC, validity_report=False)
    out = run.analysis("test")
    summary = run_analysis(analysis_inputs(planted, tmp_path), out, cfg)
    discovery = load_discovery(out)
    names = [c.name for c, _ in discovery.circuits["correlation"]]
    assert names == ["alpha", "alpha/toxic", "alpha/safe", "beta", "beta/toxic", "beta/safe"]
    assert discovery.record.scheme == {"mode": "positional", "prefix": 2, "suffix": 2}
    similarity = out.method("correlation").read_similarity(Similarity)
    assert similarity.node_jaccard[0][1] == 1.0  # both categories share exactly the planted circuit
    assert [r.category for r in similarity.safe_vs_toxic] == ["alpha", "beta"]

    alpha = summary.methods["correlation"].circuits["alpha"]
    assert alpha.span.excludes_zero() and alpha.sanity_passed
    assert alpha.reaches["0.8"] is not None and alpha.cpr.value > 0.9
    toxic = out.method("correlation").read_evaluation(CircuitEvaluation, "alpha/toxic")
    n_toxic = sum(s.refusal_label and s.category == "alpha" for s in planted[1]["evaluation"])
    assert toxic.n_prompts == toxic.n_positive == n_toxic  # judged on the toxic prompts only
    assert out.method("correlation").curves_png.read_bytes()[:4] == b"\x89PNG"
    assert "alpha" in format_summary(summary)
    assert json.loads((out.root / "summary.json").read_text())["methods"]["correlation"]["circuits"]["alpha"]


def test_evaluation_refuses_missing_saes_and_a_missing_discovery(planted, tmp_path: Path) -> None:
    run = RunLayout(tmp_path)
    cfg = AnalysisConfig(evaluation=FAST, similarity=SimilarityConfig(permutations=10), metric=METRIC,
                         validity_report=False)
    inputs_ = analysis_inputs(planted, tmp_path)
    run_analysis(inputs_, run.analysis("a"), cfg, ["discover"])
    inputs_.saes = {"residuals_0": inputs_.saes["residuals_0"]}
    with pytest.raises(UserError, match="SAEs for \\['residuals_1'\\], which are missing"):
        run_analysis(inputs_, run.analysis("b"), cfg, ["evaluate"], source=run.analysis("a"))
    with pytest.raises(UserError, match="run the discover stage first"):
        run_analysis(inputs_, run.analysis("c"), cfg, ["evaluate"], source=run.analysis("nowhere"))


@pytest.mark.slow
def test_a_rerun_reuses_finished_circuits_and_gives_the_same_records(planted, tmp_path: Path) -> None:
    run = RunLayout(tmp_path)
    cfg = AnalysisConfig(evaluation=FAST, similarity=SimilarityConfig(permutations=10), metric=METRIC,
                         validity_report=False)
    out = run.analysis("a")
    run_analysis(analysis_inputs(planted, tmp_path), out, cfg)
    path, _ = out.method("correlation").evaluation_paths("alpha")
    first = path.read_bytes()
    stamp = path.stat().st_mtime_ns
    run_analysis(analysis_inputs(planted, tmp_path), out, cfg, ["evaluate", "summary"])
    assert path.stat().st_mtime_ns == stamp  # not recomputed
    run_analysis(analysis_inputs(planted, tmp_path), run.analysis("b"), cfg)
    again, _ = run.analysis("b").method("correlation").evaluation_paths("alpha")
    assert again.read_bytes() == first  # same config and seed: the same record, byte for byte


@pytest.mark.slow
def test_attribution_circuits_go_through_the_same_stages(planted, tmp_path: Path) -> None:
    """Correlation and attribution side by side; attribution finds only the nodes the score reads."""
    run = RunLayout(tmp_path)
    discovery = DiscoveryConfig(methods=["correlation", "attribution"])
    cfg = AnalysisConfig(discovery=discovery, evaluation=FAST, similarity=SimilarityConfig(permutations=20),
                         metric=METRIC, validity_report=False)
    out = run.analysis("both")
    summary = run_analysis(analysis_inputs(planted, tmp_path), out, cfg)
    for circuit, _ in load_discovery(out).circuits["attribution"]:
        assert circuit.method == "attribution"
        assert circuit.node_names() == planted_nodes("-1")  # block 1 writes nothing: only "-1" reaches the head
        assert all(n.score < 0 for n in circuit.nodes)  # ablating a planted latent lowers the contrast
        for j in PLANTED:
            assert (f"residuals_0/{j}@-1", f"residuals_1/{j}@-1") in circuit.edge_names()
    for method in ("correlation", "attribution"):
        alpha = summary.methods[method].circuits["alpha"]
        assert alpha.reaches["0.8"] is not None and alpha.cpr.value > 0.5
    record = out.method("attribution").read_evaluation(CircuitEvaluation, "alpha")
    first_after_planted = min(p.n_nodes for p in record.curves[0].points if p.n_nodes >= 6)
    assert record.curves[0].reaches["0.8"] == first_after_planted  # the 6 planted "-1" nodes come first
    assert out.comparison_png.is_file()
    assert "attribution" in format_summary(summary)
