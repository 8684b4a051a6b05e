"""Attribution patching on a model whose refusal circuit is known by construction (tests/planted.py).

The planted model is nearly linear along its planted directions, so the first-order indirect effect of a
planted latent must match what mean-ablating it really does; the decoy variant has a latent that is as
correlated with the label as the planted ones but causally idle, which correlation selects and
attribution must not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from refusal_sae.ablation import Ablator, contrast_weights, refusal_contrast
from refusal_sae.activations import ActivationConfig, InferencePipeline, PromptActivations
from refusal_sae.attribution import attribution_scores, edge_scores
from refusal_sae.circuits import ERROR, CircuitConfig, Node, discover, encode_prompts, node_name
from refusal_sae.errors import UserError
from refusal_sae.metric import RefusalMetric
from refusal_sae.model import ModelConfig, ModelWrapper
from tests.conftest import single_thread
from tests.planted import (
    DECOY,
    LAYERS,
    METRIC,
    PLANTED,
    exact_saes,
    make_decoy_model,
    make_planted_model,
    planted_nodes,
    planted_prompts,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Setup:
    """A built model with its exact SAEs, discovery means and the evaluation prompts of category alpha."""

    def __init__(self, root: Path, maker) -> None:
        self.wrapper = ModelWrapper(ModelConfig(name=str(maker(root / "model"))))
        splits = planted_prompts(48)
        cache = InferencePipeline(self.wrapper, ActivationConfig(layers=LAYERS, shard_size=64), root / "cache").run(
            splits)
        self.saes = exact_saes()
        self.pf = encode_prompts(self.saes, PromptActivations(cache, ["discovery"]))
        self.metric = RefusalMetric.from_wrapper(self.wrapper, METRIC)
        samples = [s for s in splits["evaluation"] if s.category == "alpha"]
        self.prompts = [s.prompt for s in samples]
        self.positive = np.array([s.refusal_label for s in samples])

    def args(self, prompts=None, positive=None):
        return (self.wrapper, self.saes, self.pf.feature_means, self.pf.error_means, self.metric,
                self.prompts if prompts is None else prompts, self.positive if positive is None else positive)

    def scores(self, group: str = "all", **kwargs):
        prompts, positive = self.group(group)
        return attribution_scores(*self.args(prompts, positive), group, **kwargs)

    def group(self, group: str) -> tuple[list[str], np.ndarray]:
        if group == "all":
            return self.prompts, self.positive
        keep = self.positive == (group == "toxic")
        return [p for p, k in zip(self.prompts, keep) if k], self.positive[keep]

    def ablation_effect(self, node: Node, group: str = "all") -> float:
        """F(M with `node` mean-ablated) - F(M), measured."""
        prompts, positive = self.group(group)
        abl = Ablator(self.wrapper, self.saes, self.pf.feature_means, self.pf.error_means, self.metric)
        f_model = refusal_contrast(abl.scores(prompts), positive, group)
        return refusal_contrast(abl.scores(prompts, abl.keep_complement([node])), positive, group) - f_model


def build(root: Path, maker) -> Setup:
    with single_thread():
        return Setup(root, maker)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return build(tmp_path_factory.mktemp("planted"), make_planted_model)


@pytest.fixture(scope="module")
def decoy(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return build(tmp_path_factory.mktemp("decoy"), make_decoy_model)


@pytest.fixture(scope="module")
def patching(planted: Setup):
    return planted.scores()


def top_nodes(scores, n: int) -> set[str]:
    ranked = []
    for layer in scores.layers:
        imp = scores.importance[layer]
        width = len(imp) - 1
        ranked += [(float(v), node_name(layer, ERROR if j == width else j)) for j, v in enumerate(imp)]
    return {name for _, name in sorted(ranked, reverse=True)[:n]}


def test_top_nodes_are_exactly_the_planted_latents(planted: Setup, patching) -> None:
    assert patching.method == "attribution" and patching.layers == LAYERS
    assert patching.p_value is None and patching.n_prompts == len(planted.prompts)
    width = planted.saes["residuals_0"].cfg.width
    assert all(len(patching.signed[layer]) == width + 1 for layer in LAYERS)
    assert top_nodes(patching, len(planted_nodes())) == planted_nodes()
    for layer in LAYERS:
        ie = patching.signed[layer]
        np.testing.assert_array_equal(patching.importance[layer], np.abs(ie))
        assert np.all(ie[PLANTED] < -0.2)  # ablating a planted latent lowers the toxic-safe contrast
        assert np.abs(np.delete(ie, PLANTED)).max() < 0.1 * np.abs(ie[PLANTED]).min()
        assert ie[-1] == 0.0  # exact SAE: the error is 0 everywhere, and so is its mean
    without_errors = planted.scores(include_errors=False)
    assert len(without_errors.signed["residuals_0"]) == width
    np.testing.assert_allclose(without_errors.signed["residuals_1"], patching.signed["residuals_1"][:-1])


@pytest.mark.parametrize("group", ["all", "toxic"])
def test_node_effect_matches_mean_ablating_that_node(planted: Setup, patching, group: str) -> None:
    scores = patching if group == "all" else planted.scores(group)
    for layer in LAYERS:
        for j in PLANTED:
            measured = planted.ablation_effect(Node(layer, j, 0.0), group)
            assert scores.signed[layer][j] == pytest.approx(measured, rel=0.02), (layer, j)


def test_integrated_gradients_agree_with_patching(planted: Setup, patching) -> None:
    ig = planted.scores(method="ig", steps=4)
    assert top_nodes(ig, len(planted_nodes())) == planted_nodes()
    for layer in LAYERS:
        np.testing.assert_allclose(ig.signed[layer][PLANTED], patching.signed[layer][PLANTED], rtol=0.05)
    one_step = planted.scores(method="ig", steps=1)  # a single midpoint gradient: still close on this model
    np.testing.assert_allclose(one_step.signed["residuals_0"][PLANTED], ig.signed["residuals_0"][PLANTED], rtol=0.05)


def test_batching_and_padding_do_not_change_the_scores(planted: Setup, patching) -> None:
    """Padded positions get (mean - a) != 0 but must contribute nothing, and per-batch gradients add up."""
    single = planted.scores(batch_size=1)
    odd = planted.scores(batch_size=5)
    for layer in LAYERS:
        np.testing.assert_allclose(single.signed[layer], patching.signed[layer], atol=1e-5)
        np.testing.assert_allclose(odd.signed[layer], patching.signed[layer], atol=1e-5)


def test_refusal_contrast_is_mean_positive_minus_mean_negative_or_the_group_mean() -> None:
    scores = torch.tensor([3.0, -1.0, 2.0, 0.5, 1.5])
    positive = np.array([True, False, True, False, False])
    assert refusal_contrast(scores, positive, "all") == pytest.approx(2.5 - 1.0 / 3)
    assert refusal_contrast(scores, positive, "toxic") == pytest.approx(1.2)
    assert contrast_weights(positive, "all").sum() == pytest.approx(0.0)


def test_grad_enabled_logits_equal_the_plain_ones(planted: Setup) -> None:
    enc = planted.wrapper.tokenize(planted.prompts[:3], "right")
    plain = planted.wrapper.last_token_logits(enc["input_ids"], enc["attention_mask"])
    with_grad = planted.wrapper.last_token_logits_with_grad(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(with_grad, plain, rtol=0, atol=0)


def test_sae_parameters_are_left_as_they_were(planted: Setup) -> None:
    sae = planted.saes["residuals_0"]
    flags = [p.requires_grad for p in sae.parameters()]
    planted.scores(batch_size=16)
    assert [p.requires_grad for p in sae.parameters()] == flags


def test_correlation_selects_the_decoy_attribution_does_not(decoy: Setup) -> None:
    circuit, _ = discover(decoy.pf, decoy.pf.labels, "alpha", "all", CircuitConfig(threshold=0.5))
    assert {f"{layer}/{DECOY}" for layer in LAYERS} <= circuit.node_names()  # correlated with the label
    assert planted_nodes() <= circuit.node_names()

    scores = decoy.scores()
    assert top_nodes(scores, len(planted_nodes())) == planted_nodes()
    for layer in LAYERS:
        ie = scores.signed[layer]
        assert abs(ie[DECOY]) < 0.01 * np.abs(ie[PLANTED]).min()
        # and that is what ablating it does: nearly nothing
        assert abs(decoy.ablation_effect(Node(layer, DECOY, 0.0))) < 0.01 * np.abs(ie[PLANTED]).min()


def test_edge_along_the_identity_block_carries_the_node_effect(planted: Setup) -> None:
    """Block 1 writes nothing, so latent j at residuals_1 IS latent j at residuals_0: the edge j -> j carries
    the node's whole effect and an edge between different planted directions carries none. On toxic
    prompts only, every planted latent is active at the generation position (no ReLU kink, see below)."""
    nodes = [Node(layer, j, 0.0) for layer in LAYERS for j in PLANTED]
    prompts, positive = planted.group("toxic")
    edges = {(e.source, e.target): e for e in edge_scores(*planted.args(prompts, positive), "toxic", nodes)}
    node_ie = planted.scores("toxic").signed["residuals_0"]
    for j in PLANTED:
        e = edges[(f"residuals_0/{j}", f"residuals_1/{j}")]
        assert e.score == pytest.approx(node_ie[j], rel=1e-3)
        assert e.weight == abs(e.score) and abs(e.score) > 0.05
        for i in PLANTED:
            if i != j:
                other = edges.get((f"residuals_0/{j}", f"residuals_1/{i}"))
                assert other is None or abs(other.score) < 1e-6


def test_edges_out_of_a_node_sum_to_its_effect(planted: Setup, patching) -> None:
    """Over ALL downstream nodes (latents and error), the edges out of u add up to u's node effect:
    sum_d dF/dd dd/dx = dF/dx because decode(f(x)) + err(x) = x. On the safe prompts a planted latent is 0
    at the generation position, where the top-k ReLU has zero gradient, so to first order the downstream
    error node, not the latent, takes up the change: the split is a linearisation artefact, the sum is not."""
    width = planted.saes["residuals_1"].cfg.width
    nodes = [Node("residuals_0", j, 0.0) for j in PLANTED]
    nodes += [Node("residuals_1", j, 0.0) for j in range(width)] + [Node("residuals_1", ERROR, 0.0)]
    edges = edge_scores(*planted.args(), "all", nodes)
    assert all(e.source.startswith("residuals_0/") and e.target.startswith("residuals_1/") for e in edges)
    for j in PLANTED:
        total = sum(e.score for e in edges if e.source == f"residuals_0/{j}")
        assert total == pytest.approx(patching.signed["residuals_0"][j], rel=1e-4)
        assert (f"residuals_0/{j}", f"residuals_1/{j}") in {(e.source, e.target) for e in edges}
    assert edge_scores(*planted.args(), "all", [Node("residuals_1", 0, 0.0)]) == []  # no adjacent pair


def test_bad_inputs_are_user_errors(planted: Setup) -> None:
    args = planted.args()
    with pytest.raises(UserError, match="no prompts given"):
        attribution_scores(*planted.args([], np.zeros(0, bool)), "toxic")
    with pytest.raises(UserError, match="no negative"):
        attribution_scores(*planted.args(planted.prompts[:2], np.array([True, True])), "all")
    with pytest.raises(UserError, match="no positive"):
        attribution_scores(*planted.args(planted.prompts[:2], np.array([False, False])), "all")
    with pytest.raises(UserError, match="ig steps 0"):
        attribution_scores(*args, "all", method="ig", steps=0)
    with pytest.raises(UserError, match="unknown method"):
        attribution_scores(*args, "all", method="gradient")
    with pytest.raises(UserError, match="unknown group"):
        attribution_scores(*args, "everything")
    with pytest.raises(UserError, match="positive labels for"):
        attribution_scores(*planted.args(positive=planted.positive[:-1]), "all")
    with pytest.raises(UserError, match="batch_size"):
        attribution_scores(*args, "all", batch_size=0)
    means = {k: v for k, v in planted.pf.feature_means.items() if k != "residuals_1"}
    with pytest.raises(UserError, match=r"no feature means for SAE layer\(s\) \['residuals_1'\]"):
        attribution_scores(planted.wrapper, planted.saes, means, planted.pf.error_means, planted.metric,
                           planted.prompts, planted.positive, "all")
    short = {k: v[:-1] for k, v in planted.pf.feature_means.items()}
    with pytest.raises(UserError, match="means of residuals_0 have shapes"):
        attribution_scores(planted.wrapper, planted.saes, short, planted.pf.error_means, planted.metric,
                           planted.prompts, planted.positive, "all")
    with pytest.raises(UserError, match="layer with no SAE"):
        edge_scores(*args, "all", [Node("residuals_7", 0, 0.0)])
    with pytest.raises(UserError, match="no latent of its SAE"):
        edge_scores(*args, "all", [Node("residuals_0", 64, 0.0)])
