"""Attribution patching on a model whose refusal circuit is known by construction (tests/planted.py).

The planted model is nearly linear along its planted directions, so the first-order indirect effect of a
planted latent must match what mean-ablating it really does; the decoy variant has a latent that is as
correlated with the label as the planted ones but causally idle, which correlation selects and
attribution must not.

Where the planted latents matter. The chat template puts 2 shared tokens before the message and 2 after
it, so nodes live at "content", "-2" and "-1". Both SAE layers read the residual AFTER block 0, whose
uniform attention has already copied the prompt's mean embedding (triggers included) to every position,
and block 1 writes nothing: no block after an SAE layer moves information between positions, and the
head reads the last one. So a planted latent matters at "-1" only; at "content" (where the trigger words
are) and at "-2" its ablation changes nothing, to the last bit, and its indirect effect is 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from refusal_sae.ablation import Ablator
from refusal_sae.activations import (
    ActivationConfig,
    InferencePipeline,
    PromptActivations,
)
from refusal_sae.analysis import AnalysisConfig, AnalysisInputs, run_analysis
from refusal_sae.attribution import (
    AttributionConfig,
    attribution_edges,
    attribution_scores,
)
from refusal_sae.attribution_check import (
    AttributionCheck,
    better_estimate,
    check_attribution,
)
from refusal_sae.circuits import (
    ERROR,
    Node,
    NodeScores,
    candidate_mask,
    node_name,
    ranked_nodes,
)
from refusal_sae.correlation import CorrelationConfig
from refusal_sae.discovery import (
    Correlation,
    DiscoveryConfig,
    DiscoveryInputs,
    discover,
)
from refusal_sae.errors import UserError
from refusal_sae.features import NodeMeans, encode_prompts
from refusal_sae.io import from_json
from refusal_sae.layout import RunLayout
from refusal_sae.metric import RefusalMetric
from refusal_sae.model import ModelConfig, ModelWrapper
from refusal_sae.objective import objective
from refusal_sae.positions import position_scheme
from refusal_sae.validity import ValidityConfig
from tests.conftest import single_thread
from tests.planted import (
    DECOY,
    LAYERS,
    METRIC,
    PLANTED,
    category_run,
    exact_saes,
    make_decoy_model,
    make_planted_model,
    planted_prompts,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LAST = "-1"
PLANTED_NODES = {node_name(layer, j, LAST) for layer in LAYERS for j in PLANTED}
"""The planted latents at the generation position: the only nodes that move the score (module doc)."""


class Setup:
    """A built model with its exact SAEs, discovery node values and means, and the evaluation prompts of
    category alpha."""

    def __init__(self, root: Path, maker) -> None:
        self.wrapper = ModelWrapper(ModelConfig(name=str(maker(root / "model"))))
        self.splits = planted_prompts(48)
        cache = InferencePipeline(self.wrapper, ActivationConfig(layers=LAYERS, shard_size=64), root / "cache").run(
            self.splits)
        self.saes = exact_saes()
        every = [s for split in ("discovery", "evaluation") for s in self.splits[split]]
        self.pf = encode_prompts(self.saes, PromptActivations(cache, ["discovery"]),
                                 position_scheme(self.wrapper, every, "positional"))
        self.metric = RefusalMetric.from_wrapper(self.wrapper, METRIC)
        samples = [s for s in self.splits["evaluation"] if s.category == "alpha"]
        self.prompts = [s.prompt for s in samples]
        self.toxic = np.array([s.refusal_label for s in samples])

    @property
    def means(self) -> NodeMeans:
        return self.pf.means

    def objective(self, group: str) -> tuple[list[str], np.ndarray]:
        """The group's prompts F reads and their weights (target contrast)."""
        keep = np.ones(len(self.prompts), bool) if group == "all" else self.toxic == (group == "toxic")
        prompts = [p for p, k in zip(self.prompts, keep) if k]
        f = objective("contrast", group, self.toxic[keep])
        return [prompts[i] for i in f.rows], f.weights

    def scores(self, group: str = "all", **kwargs) -> NodeScores:
        return attribution_scores(self.wrapper, self.saes, self.means, self.metric, *self.objective(group), **kwargs)

    def edges(self, nodes: list[Node], group: str = "all"):
        return attribution_edges(self.wrapper, self.saes, self.means, self.metric, *self.objective(group), nodes)

    def ablation_effect(self, layer: str, feature: int, position: str, group: str = "all") -> float:
        """F(M with that one node mean-ablated) - F(M), measured."""
        prompts, weights = self.objective(group)
        abl = Ablator(self.wrapper, self.saes, self.means, self.metric)
        shape = (len(self.means.scheme.node_classes), self.saes[layer].cfg.width + 1)
        kept = {k: np.zeros(shape, bool) for k in LAYERS}
        kept[layer][self.means.scheme.node_classes.index(position), -1 if feature == ERROR else feature] = True
        variant = abl.variant(kept, {k: np.ones(shape, bool) for k in LAYERS}, inside=False)
        return float(weights @ abl.scores(prompts, variant) - weights @ abl.scores(prompts))


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
def patching(planted: Setup) -> NodeScores:
    return planted.scores()


def top_nodes(scores: NodeScores, n: int, errors: bool = True) -> set[str]:
    """The names of the `n` most important nodes (every latent a candidate; error nodes if `errors`)."""
    everything = {layer: np.ones((len(scores.positions), v.shape[1] - 1), bool) for layer, v in
                  scores.importance.items()}
    ranked = ranked_nodes(scores, candidate_mask(everything, errors))
    return {scores.node(*entry).name for entry in ranked[:n]}


def test_the_position_classes_are_the_tiny_chat_template(planted: Setup) -> None:
    scheme = planted.means.scheme
    assert (scheme.mode, scheme.prefix, scheme.suffix) == ("positional", 2, 2)
    assert scheme.node_classes == ["content", "-2", LAST]


def test_top_nodes_are_exactly_the_planted_latents(planted: Setup, patching: NodeScores) -> None:
    assert patching.method == "attribution" and patching.layers == LAYERS
    assert patching.positions == planted.means.scheme.node_classes
    assert patching.p_value is None and patching.n_prompts == len(planted.prompts)
    width = planted.saes["residuals_0"].cfg.width
    last = patching.positions.index(LAST)
    assert all(patching.signed[layer].shape == (3, width + 1) for layer in LAYERS)
    assert top_nodes(patching, len(PLANTED_NODES)) == PLANTED_NODES
    assert top_nodes(patching, len(PLANTED_NODES), errors=False) == PLANTED_NODES
    for layer in LAYERS:
        ie = patching.signed[layer]
        np.testing.assert_array_equal(patching.importance[layer], np.abs(ie))
        assert np.all(ie[last, PLANTED] < -0.2)  # ablating a planted latent lowers the toxic-safe contrast
        others = ie.copy()
        others[last, PLANTED] = 0
        assert np.abs(others).max() < 0.1 * np.abs(ie[last, PLANTED]).min()
        # no later block reads the other positions (module doc): not a planted latent's there, nor anything
        np.testing.assert_array_equal(ie[: last], 0.0)
        np.testing.assert_array_equal(ie[:, -1], 0.0)  # exact SAE: the error is 0 everywhere, and so is its mean


@pytest.mark.parametrize("group", ["all", "toxic"])
def test_node_effect_matches_mean_ablating_that_node(planted: Setup, patching: NodeScores, group: str) -> None:
    scores = patching if group == "all" else planted.scores(group)
    for layer in LAYERS:
        for j in PLANTED:
            measured = planted.ablation_effect(layer, j, LAST, group)
            ie = scores.signed[layer][scores.positions.index(LAST), j]
            assert ie == pytest.approx(measured, rel=0.02), (layer, j)
    # where the trigger words are, ablating a planted latent changes nothing, as its effect says
    content = scores.positions.index("content")
    for j in PLANTED:
        assert planted.ablation_effect("residuals_0", j, "content", group) == 0.0
        assert scores.signed["residuals_0"][content, j] == 0.0


def test_integrated_gradients_agree_with_patching(planted: Setup, patching: NodeScores) -> None:
    last = patching.positions.index(LAST)
    ig = planted.scores(estimate="ig", steps=4)
    assert top_nodes(ig, len(PLANTED_NODES)) == PLANTED_NODES
    for layer in LAYERS:
        np.testing.assert_allclose(ig.signed[layer][last, PLANTED], patching.signed[layer][last, PLANTED], rtol=0.05)
    one_step = planted.scores(estimate="ig", steps=1)  # a single midpoint gradient: still close on this model
    np.testing.assert_allclose(one_step.signed["residuals_0"][last, PLANTED], ig.signed["residuals_0"][last, PLANTED],
                               rtol=0.05)


def test_batching_and_padding_do_not_change_the_scores(planted: Setup, patching: NodeScores) -> None:
    """Padded positions get (mean - a) != 0 but must contribute nothing, and per-batch gradients add up."""
    single = planted.scores(batch_size=1)
    odd = planted.scores(batch_size=5)
    for layer in LAYERS:
        np.testing.assert_allclose(single.signed[layer], patching.signed[layer], atol=1e-5)
        np.testing.assert_allclose(odd.signed[layer], patching.signed[layer], atol=1e-5)


def test_objective_weights_each_target_and_group() -> None:
    scores = np.array([3.0, -1.0, 2.0, 0.5, 1.5])
    toxic = np.array([True, False, True, False, False])
    refused = np.array([True, True, False, False, False])

    contrast = objective("contrast", "all", toxic)
    np.testing.assert_array_equal(contrast.rows, np.arange(5))
    np.testing.assert_array_equal(contrast.strata, toxic.astype(int))
    assert contrast.value(scores[contrast.rows]) == pytest.approx(2.5 - 1.0 / 3)
    assert contrast.weights.sum() == pytest.approx(0.0)

    only_toxic = objective("toxic", "all", toxic)  # only the toxic prompts are read
    np.testing.assert_array_equal(only_toxic.rows, [0, 2])
    assert only_toxic.value(scores[only_toxic.rows]) == pytest.approx(2.5)

    behavior = objective("behavior", "all", toxic, refused)
    np.testing.assert_array_equal(behavior.strata, refused.astype(int))
    assert behavior.value(scores[behavior.rows]) == pytest.approx(1.0 - 4.0 / 3)

    for target in ("contrast", "toxic", "behavior"):  # a group's circuit: the mean over its prompts, whatever F
        for group in ("toxic", "safe"):
            f = objective(target, group, toxic, refused)
            np.testing.assert_array_equal(f.rows, np.arange(5))
            assert f.value(scores[f.rows]) == pytest.approx(1.2)
            assert set(f.strata) == {1}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("behavior", "all", [True, False]), "needs the model's answers"),
        (("contrast", "all", [True, True]), "none of these 2 is safe"),
        (("contrast", "all", [False, False]), "none of these 2 is toxic"),
        (("behavior", "all", [True, False], [True, True]), "none of these 2 is answered"),
        (("toxic", "all", [False, False]), "no toxic prompts"),
        (("toxic", "safe", []), "no safe prompts"),
        (("refusal", "all", [True, False]), "unknown value 'refusal'"),
    ],
)
def test_bad_objective_input_is_a_user_error(args, message: str) -> None:
    with pytest.raises(UserError, match=message) as err:
        objective(*args)
    assert "\n" not in str(err.value)


def test_grad_enabled_logits_equal_the_plain_ones(planted: Setup) -> None:
    enc = planted.wrapper.tokenize(planted.prompts[:3], "right")
    plain = planted.wrapper.last_token_logits(enc["input_ids"], enc["attention_mask"])
    with_grad = planted.wrapper.last_token_logits_with_grad(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(with_grad, plain, rtol=0, atol=0)


def test_sae_parameters_are_left_as_they_were(planted: Setup) -> None:
    sae = planted.saes["residuals_0"]
    before = [(p.requires_grad, p.detach().clone()) for p in sae.parameters()]
    planted.scores(batch_size=16)
    planted.edges([Node(layer, j, LAST) for layer in LAYERS for j in PLANTED])
    after = list(sae.parameters())
    assert [p.requires_grad for p in after] == [flag for flag, _ in before]
    assert all(torch.equal(p, value) and p.grad is None for p, (_, value) in zip(after, before))


def test_correlation_selects_the_decoy_attribution_does_not(decoy: Setup) -> None:
    pf = decoy.pf
    samples = [decoy.splits["discovery"][i] for i in pf.prompt_index]
    inputs = DiscoveryInputs(pf, samples, pf.labels, None, decoy.saes, None, None, "contrast")
    [(circuit, _)] = discover(Correlation(CorrelationConfig(threshold=0.5)), inputs, ["alpha"], ["all"])
    decoys = {node_name(layer, DECOY, position) for layer in LAYERS for position in ("content", LAST)}
    assert decoys <= circuit.node_names()  # correlated with the label where the triggers are, and where read
    assert PLANTED_NODES <= circuit.node_names()

    scores = decoy.scores()
    assert top_nodes(scores, len(PLANTED_NODES)) == PLANTED_NODES
    last = scores.positions.index(LAST)
    for layer in LAYERS:
        ie = scores.signed[layer]
        assert np.abs(ie[:, DECOY]).max() < 0.01 * np.abs(ie[last, PLANTED]).min()
        # and that is what ablating it does: nearly nothing
        assert abs(decoy.ablation_effect(layer, DECOY, LAST)) < 0.01 * np.abs(ie[last, PLANTED]).min()


def test_edge_along_the_identity_block_carries_the_node_effect(planted: Setup) -> None:
    """Block 1 writes nothing, so latent j at residuals_1 IS latent j at residuals_0: the edge j -> j carries
    the node's whole effect and an edge between different planted directions carries none. On toxic
    prompts only, every planted latent is active at the generation position (no ReLU kink, see below)."""
    nodes = [Node(layer, j, LAST) for layer in LAYERS for j in PLANTED]
    edges = {(e.source, e.target): e for e in planted.edges(nodes, "toxic")}
    node_ie = planted.scores("toxic").signed["residuals_0"][-1]
    for j in PLANTED:
        e = edges[(node_name("residuals_0", j, LAST), node_name("residuals_1", j, LAST))]
        assert e.score == pytest.approx(node_ie[j], rel=1e-3)
        assert e.weight == abs(e.score) and abs(e.score) > 0.05
        for i in PLANTED:
            if i != j:
                other = edges.get((node_name("residuals_0", j, LAST), node_name("residuals_1", i, LAST)))
                assert other is None or abs(other.score) < 1e-6


def test_edges_out_of_a_node_sum_to_its_effect(planted: Setup, patching: NodeScores) -> None:
    """Over ALL downstream nodes (latents and error, at every position class), the edges out of u add up to
    u's node effect: sum_d dF/dd dd/dx = dF/dx because decode(f(x)) + err(x) = x. On the safe prompts a
    planted latent is 0 at the generation position, where the top-k ReLU has zero gradient, so to first
    order the downstream error node, not the latent, takes up the change: the split is a linearisation
    artefact, the sum is not."""
    width = planted.saes["residuals_1"].cfg.width
    positions = patching.positions
    nodes = [Node("residuals_0", j, LAST) for j in PLANTED]
    nodes += [Node("residuals_1", j, p) for p in positions for j in [*range(width), ERROR]]
    edges = planted.edges(nodes)
    assert all(e.source.startswith("residuals_0/") and e.target.startswith("residuals_1/") for e in edges)
    assert all(e.target.endswith(f"@{LAST}") for e in edges)  # block 1 moves nothing between positions
    for j in PLANTED:
        source = node_name("residuals_0", j, LAST)
        total = sum(e.score for e in edges if e.source == source)
        assert total == pytest.approx(patching.signed["residuals_0"][positions.index(LAST), j], rel=1e-4)
        assert (source, node_name("residuals_1", j, LAST)) in {(e.source, e.target) for e in edges}
    assert planted.edges([Node("residuals_1", 0, LAST)]) == []  # no adjacent pair


def test_bad_inputs_are_user_errors(planted: Setup) -> None:
    prompts, weights = planted.objective("all")
    w, saes, means, metric = planted.wrapper, planted.saes, planted.means, planted.metric

    def scores(**kwargs) -> None:
        args = {"wrapper": w, "saes": saes, "means": means, "metric": metric, "prompts": prompts,
                "weights": weights} | kwargs
        attribution_scores(**args)

    with pytest.raises(UserError, match="no prompts to attribute over"):
        scores(prompts=[], weights=np.zeros(0))
    with pytest.raises(UserError, match=f"{len(weights) - 1} weights for {len(prompts)} prompts"):
        scores(weights=weights[:-1])
    with pytest.raises(UserError, match="ig steps: 0 is not a positive integer"):
        scores(estimate="ig", steps=0)
    with pytest.raises(UserError, match="estimate: 'gradient' is not a known value"):
        scores(estimate="gradient")
    with pytest.raises(UserError, match="batch_size"):
        scores(batch_size=0)
    one_layer = NodeMeans(means.scheme, {"residuals_0": means.features["residuals_0"]},
                          {"residuals_0": means.errors["residuals_0"]})
    with pytest.raises(UserError, match=r"no node means for SAE layer\(s\) \['residuals_1'\]"):
        scores(means=one_layer)
    short = NodeMeans(means.scheme, {k: v[:, :-1] for k, v in means.features.items()}, means.errors)
    with pytest.raises(UserError, match="means of residuals_0 have shapes"):
        scores(means=short)
    with pytest.raises(UserError, match="layer with no SAE"):
        planted.edges([Node("residuals_7", 0, LAST)])
    with pytest.raises(UserError, match="no node of its SAE"):
        planted.edges([Node("residuals_0", 64, LAST)])
    with pytest.raises(UserError, match="no node of its SAE"):
        planted.edges([Node("residuals_0", 0, "-7")])


def test_both_estimates_are_checked_against_exact_ablation_effects(planted: Setup, patching: NodeScores) -> None:
    """On the nearly linear planted model both estimates track the exact effects of the sampled nodes: the six
    planted latents (the largest, negative) and random others (exactly 0, as their estimates are)."""
    prompts, weights = planted.objective("all")
    ablator = Ablator(planted.wrapper, planted.saes, planted.means, planted.metric)
    candidates = candidate_mask({k: planted.means.live(k) for k in LAYERS}, errors=True)
    ig = planted.scores(estimate="ig", steps=4)
    check = check_attribution(ablator, prompts, weights, "alpha", {"patching": patching, "ig": ig}, candidates,
                              top=6, random=6, rng=np.random.default_rng(0))
    assert len(check.nodes) == 12 and set(check.nodes[:6]) == PLANTED_NODES
    exact = np.array(check.exact)
    assert np.all(exact[:6] < -0.2) and np.all(np.abs(exact[6:]) < 0.05 * np.abs(exact[:6]).min())
    for c in check.checks:
        assert c.pearson > 0.99 and c.sign_agreement == 1.0, c
        assert c.max_abs_error < 0.05 * np.abs(exact).max()
    # the exact effect of a planted node is what mean-ablating it alone measures
    layer, feature = check.nodes[0].split("/")[0], int(check.nodes[0].split("/")[1].split("@")[0])
    assert check.exact[0] == pytest.approx(planted.ablation_effect(layer, feature, LAST), abs=1e-6)
    assert better_estimate([check]) in ("patching", "ig")


@pytest.mark.slow
def test_discovery_writes_the_check_of_both_estimates_when_asked(tmp_path: Path) -> None:
    wrapper, splits, cache = category_run(tmp_path, {"alpha": 0, "beta": 1}, 32)
    inputs = AnalysisInputs(exact_saes(), cache, splits, lambda: wrapper, RunLayout(tmp_path / "run"), ValidityConfig())
    attribution = AttributionConfig(check_nodes=3, ig_steps=2, edge_nodes=0, batch_size=16)
    cfg = AnalysisConfig(discovery=DiscoveryConfig(methods=["attribution"], attribution=attribution), metric=METRIC,
                         validity_report=False)
    out = inputs.run.analysis("a")
    with single_thread():
        run_analysis(inputs, out, cfg, ["discover", "summary"])
    checks = from_json(list[AttributionCheck], json.loads(out.method("attribution").attribution_check_json.read_text(
        encoding="utf-8"))["checks"])
    assert [c.category for c in checks] == ["alpha", "beta"]
    for c in checks:
        assert 6 <= len(c.nodes) <= 9 and set(c.estimates) == {"patching", "ig"}
        assert all(e.spearman is not None and e.spearman > 0.5 and e.sign_agreement >= 0.8 for e in c.checks), c
