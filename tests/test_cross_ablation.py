"""Circuit cross-ablation on the category model (tests/planted.py, `make_category_model`), with circuits built by
hand: a circuit on a refusal direction two categories share transfers between them (share near 1); circuits on
each category's own direction do not (share near 0)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from refusal_sae.ablation import Ablator
from refusal_sae.activations import (
    PromptActivations,
)
from refusal_sae.circuits import Circuit, NodeScores, circuit_size
from refusal_sae.cross_ablation import (
    CrossAblationConfig,
    CrossAblationResult,
    cross_ablation,
)
from refusal_sae.errors import UserError
from refusal_sae.evaluation import (
    ALL_LAYERS,
    RECORD_VERSION,
    CircuitEvaluation,
    Curve,
    Sanity,
    faithful_sizes,
    upgrade_record,
)
from refusal_sae.features import encode_prompts
from refusal_sae.io import from_json, to_json
from refusal_sae.layout import RunLayout
from refusal_sae.metric import RefusalMetric
from refusal_sae.plots import plot_cross_ablation
from refusal_sae.positions import position_scheme
from refusal_sae.stats import Interval
from tests.conftest import single_thread
from tests.planted import (
    D_MODEL,
    LAYERS,
    METRIC,
    category_run,
    exact_saes,
)

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = CrossAblationConfig(n_nodes=4, bootstrap=200)
NEUTRAL = 5
"""A direction neutral words write in both models (neither read, nor UNUSED): a live latent that moves no score."""


def hand_circuit(category: str, scheme, latents: list[int]) -> tuple[Circuit, NodeScores]:
    """`latents` at the last position ("-1", what the head reads) of both layers first, every other node after."""
    importance = {layer: np.zeros((len(scheme.node_classes), 2 * D_MODEL + 1)) for layer in LAYERS}
    for layer in LAYERS:
        importance[layer][scheme.node_classes.index("-1"), latents] = 1.0
    return (Circuit(category, "all", "hand", LAYERS, []),
            NodeScores("hand", LAYERS, scheme.node_classes, importance, None, None, 0))


def matrix(root: Path, reads: dict[str, int], circuits: dict[str, list[int]], cfg: CrossAblationConfig = FAST
           ) -> CrossAblationResult:
    """The cross-ablation of hand-built circuits (4 nodes each: the n_nodes fallback, as no evaluation exists)."""
    with single_thread():
        wrapper, splits, cache = category_run(root, reads, 64)
        scheme = position_scheme(wrapper, splits["discovery"] + splits["evaluation"], "positional")
        means = encode_prompts(exact_saes(), PromptActivations(cache, ["discovery"]), scheme).means
        ablator = Ablator(wrapper, exact_saes(), means, RefusalMetric.from_wrapper(wrapper, METRIC), 8)
        items = [hand_circuit(c, scheme, latents) for c, latents in circuits.items()]
        return cross_ablation(ablator, splits["evaluation"], None, items, {}, cfg, "toxic")


def test_a_shared_circuit_transfers_and_category_specific_ones_do_not(tmp_path: Path) -> None:
    # both categories read b_0; their circuits differ by a latent of neutral words each, so the node sets differ
    shared = matrix(tmp_path / "shared", {"alpha": 0, "beta": 0}, {"alpha": [0, NEUTRAL], "beta": [0, NEUTRAL + 1]})
    # each category reads its own direction, and its circuit holds it
    modular = matrix(tmp_path / "modular", {"alpha": 0, "beta": 1}, {"alpha": [0, NEUTRAL], "beta": [1, NEUTRAL + 1]})
    for result in (shared, modular):
        assert result.categories == ["alpha", "beta"] and result.testable == ["alpha", "beta"]
        assert all(r.n_nodes == 4 and r.size_from.startswith("cross_ablation.n_nodes") for r in result.rows)
        for b in range(2):
            assert result.ablation[b][b].change.high < 0 and result.ablation[b][b].share.value == pytest.approx(1)
    for a, b in ((0, 1), (1, 0)):
        assert shared.transfers(a, b) and 0.8 < shared.ablation[a][b].share.value < 1.2
        # no drop; mean-ablation even adds a little of A's direction to B's prompts (its mean over all prompts)
        assert not modular.transfers(a, b) and modular.ablation[a][b].share.value < 0.2
    assert shared.mean_share > 0.8 and modular.mean_share < 0.2
    assert (shared.n_pairs, shared.n_transfer, modular.n_transfer) == (2, 2, 0)

    layout = RunLayout(tmp_path / "run").analysis("x").method("hand")
    layout.write_cross_ablation(modular)
    plot_cross_ablation(modular, layout.cross_ablation_png)
    again = from_json(CrossAblationResult, json.loads(layout.cross_ablation_json.read_text(encoding="utf-8")))
    assert to_json(again) == to_json(modular) and layout.cross_ablation_png.stat().st_size > 0


def test_random_circuits_give_each_cell_its_chance_level(tmp_path: Path) -> None:
    """With 19 random circuits of each circuit's shape: the shared circuit lowers both categories' F beyond every
    random one (p = 1/20, the floor) and still transfers; a circuit of latents no head reads (alpha's here) moves F
    no more than chance, so it transfers nowhere, not even to its own category, which is then untestable."""
    cfg = CrossAblationConfig(n_nodes=4, bootstrap=200, random_circuits=19, significance=0.05)
    result = matrix(tmp_path, {"alpha": 0, "beta": 0}, {"alpha": [NEUTRAL, NEUTRAL + 1], "beta": [0, NEUTRAL]}, cfg)
    assert result.significance == 0.05 and len(result.random) == 2 and len(result.random[0]) == 2
    for b in range(2):
        assert result.ablation[1][b].p_value == pytest.approx(1 / 20) and result.transfers(1, b)
        chance = result.random[1][b]
        assert chance.max < 0.5 * abs(result.ablation[1][b].change.value)  # random 4-node circuits barely move F
        assert not result.transfers(0, b) and result.ablation[0][b].p_value > 0.05
    assert result.testable == ["beta"] and result.mean_share is None
    assert "beyond 19 random circuits" not in result.explanation  # no pairs to summarise: says why instead
    plain = matrix(tmp_path / "plain", {"alpha": 0, "beta": 0}, {"alpha": [NEUTRAL, NEUTRAL + 1], "beta": [0, NEUTRAL]})
    assert plain.random is None and plain.ablation[1][0].p_value is None


def test_the_default_size_is_where_the_category_reaches_faithfulness_0_8() -> None:
    zero = Interval(0.0, 0.0, 0.0)

    def record(reaches: dict[str, int | None]) -> CircuitEvaluation:
        curves = [Curve(scope, mode, 50, zero, zero, None, [], None, None, None, reach)
                  for scope, mode, reach in ((ALL_LAYERS, "nodes", {"0.8": 3}), ("residuals_0", "keep", {"0.8": 2}),
                                             (ALL_LAYERS, "keep", reaches))]
        sanity = Sanity(None, None, None, None, True, "not applicable", "not applicable", None, [])
        return CircuitEvaluation("a", "a", "all", "m", "toxic", 1, 1, zero, curves, sanity)

    sizes = faithful_sizes([record({"0.5": 4, "0.8": 7})])
    args = FAST.n_nodes, "cross_ablation"
    assert sizes == {"a": 7} and circuit_size("a", sizes, *args) == (7, "faithfulness 0.8 reached")
    assert circuit_size("a", faithful_sizes([record({"0.5": 4, "0.8": None})]), *args)[0] == 4
    assert circuit_size("a", {}, *args) == (4, "cross_ablation.n_nodes: no keep-mode evaluation record")
    assert circuit_size("a", sizes, *args, CrossAblationConfig(size=9).size)[0] == 9


def test_a_later_stage_refuses_an_evaluation_record_of_another_version(tmp_path: Path) -> None:
    """Records written before the sanity check changed meaning (no version in their key) cannot be read as today's
    by `cross` or `report` on an earlier analysis: one line says to evaluate again, naming the file."""
    zero = Interval(0.0, 0.0, 0.0)
    curves = [Curve(ALL_LAYERS, "keep", 50, zero, zero, None, [], None, None, None, {"0.8": 7})]
    record = CircuitEvaluation("a", "a", "all", "m", "toxic", 1, 1, zero, curves,
                               Sanity(None, 7, 0.1, 0.05, True, "not applicable", "pass", True, []))
    layout = RunLayout(tmp_path / "run").analysis("old").method("m")
    layout.write_evaluation(record, {"evaluation": {}}, {"model": np.zeros(1)})
    with pytest.raises(UserError, match=r"a\.json: an evaluation record of version 1.*--source old"):
        layout.read_evaluation(CircuitEvaluation, "a", version=RECORD_VERSION)
    layout.write_evaluation(record, {"record": RECORD_VERSION}, {"model": np.zeros(1)})
    assert to_json(layout.read_evaluation(CircuitEvaluation, "a", version=RECORD_VERSION)) == to_json(record)


def test_a_version_2_record_is_read_with_its_check_statuses_derived_from_what_it_recorded(tmp_path: Path) -> None:
    """Version 3 only adds each sanity check's status, which a version-2 record's recorded changes determine: a
    later stage reads it upgraded (a failed random check stays failed; no applicable check is "not tested")."""
    zero = Interval(0.0, 0.0, 0.0)
    curves = [Curve(ALL_LAYERS, "keep", 50, zero, zero, None, [], None, None, None, {"0.8": 7})]
    layout = RunLayout(tmp_path / "run").analysis("old").method("m")
    for name, prefix, relative, expected in (("a", 0.01, 0.4, ("pass", "fail", False)),
                                             ("b", None, None, ("not applicable", "not applicable", None)),
                                             ("c", 0.01, 0.1, ("pass", "pass", True))):
        record = CircuitEvaluation(name, name, "all", "m", "toxic", 1, 1, zero, curves,
                                   Sanity(prefix, 7, None, relative, True, "pass", "pass", True, []))
        layout.write_evaluation(record, {"record": 2}, {"model": np.zeros(1)})
        data = json.loads(layout.evaluation_paths(name)[0].read_text(encoding="utf-8"))
        for key in ("prefix_check", "random_check"):  # what a version-2 record holds
            del data["record"]["sanity"][key]
        layout.evaluation_paths(name)[0].write_text(json.dumps(data), encoding="utf-8")
        read = layout.read_evaluation(CircuitEvaluation, name, version=RECORD_VERSION, upgrade=upgrade_record)
        assert (read.sanity.prefix_check, read.sanity.random_check, read.sanity.passed) == expected
    with pytest.raises(UserError, match="version 2"):  # without the upgrade it is refused as before
        layout.read_evaluation(CircuitEvaluation, "a", version=RECORD_VERSION)
