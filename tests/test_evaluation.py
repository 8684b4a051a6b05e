"""Circuit evaluation on a planted model with a chat template and an attention sink: the position-aware
design must recover the planted circuit, and the global design (one mean per latent over every position)
must measurably fail on it."""

from __future__ import annotations

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
from refusal_sae.analysis import sanity_word
from refusal_sae.circuits import Circuit, NodeScores
from refusal_sae.correlation import CorrelationConfig, correlation_scores
from refusal_sae.data import PromptSample
from refusal_sae.discovery import DiscoveryConfig
from refusal_sae.errors import UserError
from refusal_sae.evaluation import (
    ALL_LAYERS,
    MIB_FRACTIONS,
    CircuitEvaluation,
    Curve,
    EvaluationConfig,
    Point,
    Sanity,
    areas,
    curve_sizes,
    evaluate_circuit,
    reach_sizes,
    upgrade_record,
)
from refusal_sae.features import encode_prompts
from refusal_sae.io import from_json, to_json
from refusal_sae.metric import RefusalMetric
from refusal_sae.objective import objective
from refusal_sae.plots import plot_curves
from refusal_sae.positions import position_scheme
from refusal_sae.stats import Interval, interval, resample_weights
from tests.conftest import single_thread
from tests.planted import (
    LAYERS,
    METRIC,
    PLANTED,
    TEMPLATE,
    exact_saes,
    planted_prompts,
    template_wrapper,
    vocabulary,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("template")
    with single_thread():
        wrapper = template_wrapper(root)
        splits = planted_prompts(24, categories=("alpha",))
        cache = InferencePipeline(wrapper, ActivationConfig(layers=LAYERS, shard_size=64), root / "cache").run(splits)
    return wrapper, splits, cache


def setup(template, mode: str):
    wrapper, splits, cache = template
    scheme = position_scheme(wrapper, splits["discovery"] + splits["evaluation"], mode)
    pf = encode_prompts(exact_saes(), PromptActivations(cache, ["discovery"]), scheme)
    ablator = Ablator(wrapper, exact_saes(), pf.means, RefusalMetric.from_wrapper(wrapper, METRIC), 8)
    return scheme, pf, ablator


def planted_ranking(scheme, position: str) -> NodeScores:
    """The planted latents at `position` first (importance 1), every other node after them (importance 0)."""
    importance = {layer: np.zeros((len(scheme.node_classes), 2 * 32 + 1)) for layer in LAYERS}
    for layer in LAYERS:
        importance[layer][scheme.node_classes.index(position), PLANTED] = 1.0
    return NodeScores("planted", LAYERS, scheme.node_classes, importance, None, None, 0)


def evaluate(ablator, samples, scores, **cfg):
    cfg = {"random_circuits": 5, "bootstrap": 500, "error_modes": ["keep"], **cfg}
    prompts = [s.prompt for s in samples]
    toxic = np.array([s.refusal_label for s in samples])
    return evaluate_circuit(ablator, prompts, toxic, None, Circuit("alpha", "all", "planted", LAYERS, []), scores,
                            EvaluationConfig(**cfg))


def point(curve, n: int):
    return next(p for p in curve.points if p.n_nodes == n)


def test_template_positions_are_found(template) -> None:
    scheme, _, _ = setup(template, "positional")
    assert (scheme.prefix, scheme.suffix) == (2, 2)  # "<s> <|user|>" ... "</s> <|assistant|>"
    assert scheme.node_classes == ["content", "-2", "-1"]
    assert list(scheme.classes(7)) == [0, 1, 2, 2, 2, 3, 4]


def test_positional_means_recover_the_planted_circuit_and_global_means_do_not(template) -> None:
    _, splits, _ = template
    scheme, _, ablator = setup(template, "positional")
    record, _ = evaluate(ablator, splits["evaluation"], planted_ranking(scheme, "-1"), sizes=[3, 6])
    curve = record.curves[0]
    assert curve.scope == ALL_LAYERS and curve.error_mode == "keep"
    assert curve.span.excludes_zero()
    planted = point(curve, 6)
    assert planted.faithfulness.low >= 0.9 and planted.completeness.high <= 0.1
    assert planted.random_faithfulness.max <= 0.2  # random circuits of 3 latents per layer at "-1"
    assert planted.random_p == pytest.approx(1 / 6)  # none of the 5 random circuits reaches it: the floor
    assert point(curve, 3).random_p is not None and curve.reaches == curve.reaches_point  # intervals clear of 0.8
    assert planted.positions == {"-1": 6} and planted.empty_layers == []
    for layer in LAYERS:  # each layer alone carries the whole effect (block 1 is the identity)
        own = next(c for c in record.curves if c.scope == layer)
        assert point(own, 3).faithfulness.value == pytest.approx(1.0, abs=0.02)
    assert record.sanity.passed and record.sanity.prefix_max_change < 1e-4
    assert (record.sanity.prefix_check, record.sanity.random_check) == ("pass", "pass")
    assert record.sanity.random_circuit_nodes == 6  # the smallest measured circuit reaching faithfulness 0.8
    assert record.sanity.random_relative_change < 0.05  # nothing outside the planted latents matters

    g_scheme, _, g_ablator = setup(template, "global")
    g_record, _ = evaluate(g_ablator, splits["evaluation"], planted_ranking(g_scheme, "all"), sizes=[6])
    g_planted = point(g_record.curves[0], 6)
    assert g_planted.faithfulness.high < 0.8  # the sink's global mean at the last position shrinks the score
    assert g_planted.faithfulness.high < planted.faithfulness.low - 0.3


def test_curves_span_the_whole_range_and_end_at_the_model(template) -> None:
    _, splits, _ = template
    scheme, _, ablator = setup(template, "positional")
    record, scores = evaluate(ablator, splits["evaluation"], planted_ranking(scheme, "-1"), random_circuits=1,
                              error_modes=["keep", "nodes"])
    for curve in record.curves:
        sizes = [p.n_nodes for p in curve.points]
        assert sizes[0] == 1 and sizes[-1] == curve.n_candidates and sizes == sorted(set(sizes))
        last = curve.points[-1]
        assert last.fraction == 1.0
        assert (last.faithfulness.value, last.faithfulness.low, last.faithfulness.high) == (1.0, 1.0, 1.0)
        assert last.completeness.value == 0.0
    main, nodes = record.curves[0], next(c for c in record.curves if c.error_mode == "nodes")
    assert nodes.n_candidates == main.n_candidates + 2 * 3  # an error node per layer and position class
    assert len(main.points) >= 8 and main.cpr is not None
    # CPR is the trapezoid area of the measured points (and (0, 0), the empty circuit), nothing interpolated
    x = np.array([0.0] + [p.fraction for p in main.points])
    y = np.array([0.0] + [p.faithfulness.value for p in main.points])
    assert main.cpr.value == pytest.approx(float(((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2).sum()))
    assert main.cpr.low <= main.cpr.value <= main.cpr.high
    assert main.reaches["0.8"] == min(n for n in (p.n_nodes for p in main.points) if n >= 6)  # 6 planted nodes
    assert np.array_equal(scores["model"], scores[f"keep/{ALL_LAYERS}/C{main.n_candidates}"])


def test_random_sanity_check_needs_a_faithful_circuit_below_all_nodes(template) -> None:
    """Ranked last, the planted latents make every circuit below all nodes unfaithful: no circuit claims the
    rest is unimportant, so the random check does not apply (and says so) instead of judging a premise."""
    _, splits, _ = template
    scheme, _, ablator = setup(template, "positional")
    ranking = planted_ranking(scheme, "-1")
    for layer in LAYERS:
        ranking.importance[layer] = 1.0 - ranking.importance[layer]
    record, _ = evaluate(ablator, splits["evaluation"], ranking, sizes=[6, 60], random_circuits=0)
    curve = record.curves[0]
    assert curve.span.excludes_zero() and curve.reaches["0.8"] == curve.n_candidates
    assert record.sanity.random_circuit_nodes is None and record.sanity.random_median_change is None
    assert record.sanity.passed and any("reaches faithfulness 0.8" in n for n in record.sanity.notes)
    assert (record.sanity.prefix_check, record.sanity.random_check) == ("pass", "not applicable")


def test_reaching_a_level_is_decided_by_the_lower_bound_with_the_point_estimate_beside_it() -> None:
    def at(n: int, value: float, low: float) -> Point:
        return Point(n, n / 100, {}, {}, [], Interval(0, 0, 0), Interval(0, 0, 0), Interval(value, low, value + 0.1),
                     None)

    # size 10's estimate reaches 0.8 but its interval does not; size 30's interval does
    points = [at(3, 0.3, 0.1), at(10, 0.82, 0.6), at(30, 0.9, 0.81), at(100, 1.0, 1.0)]
    low, value = reach_sizes(points)
    assert low == {"0.5": 10, "0.8": 30} and value == {"0.5": 10, "0.8": 10}
    # a version-3 record (reaches by point estimate) is read with both
    zero = Interval(0.0, 0.0, 0.0)
    old = to_json(CircuitEvaluation("a", "a", "all", "m", "toxic", 1, 1, zero,
                                    [Curve(ALL_LAYERS, "keep", 100, zero, zero, None, points, None, None, None, value)],
                                    Sanity(None, 30, 0.1, 0.05, True, "not applicable", "pass", True, [])))
    del old["curves"][0]["reaches_point"]
    new = from_json(CircuitEvaluation, upgrade_record(old, 3))
    assert new.curves[0].reaches == low and new.curves[0].reaches_point == value and new.faithful_size() == 30
    assert new.intervals == "percentile"  # what every record before version 5 used


def test_mib_log_axis_areas_weigh_small_circuits_as_mib_does() -> None:
    """At MIB's fractions, faithfulness 0 up to 1% and 1 from 2% on: on MIB's log axis the area is the share of
    log(fraction) from 0.1% to 100% where the curve is up (trapezoids), on the linear axis nearly all of it; a
    constant curve gives its value on both (log axis divided by its length); a missing MIB fraction, no log area."""
    def points(ys: list[float]) -> list[tuple[float, tuple[float, np.ndarray]]]:
        return [(f, (y, np.full(3, y))) for f, y in zip(MIB_FRACTIONS, ys)]

    def to_interval(e: tuple[float, np.ndarray]) -> Interval:
        return interval(e[0], e[1], 0.95)

    step = points([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    cpr, cmd, note = areas(step, to_interval, log_axis=True)
    x = np.log(MIB_FRACTIONS) / np.log(1000)
    want = (x[4] - x[3]) / 2 + (x[-1] - x[4])
    assert note is None and cpr.value == pytest.approx(want) and cmd.value == pytest.approx(1 - want)
    assert areas(step, to_interval)[0].value == pytest.approx(0.99 - 0.005, abs=1e-9)
    for axis in (True, False):
        flat = areas(points([0.7] * 10), to_interval, log_axis=axis)[0]
        assert flat.value == pytest.approx(0.7 if axis else 0.7 - 0.7 * 0.001 / 2)
    assert "needs a point at each of its fractions" in areas(step[1:], to_interval, log_axis=True)[2]


def test_no_label_effect_gives_null_ratios_with_a_reason(template, tmp_path: Path) -> None:
    _, splits, _ = template
    scheme, _, ablator = setup(template, "positional")
    triggers = set(vocabulary()[0])
    neutral = [s for s in splits["evaluation"] if not triggers & set(s.prompt.split())]
    relabelled = [PromptSample(s.prompt, s.category, i % 2 == 0, "hard", "planted") for i, s in enumerate(neutral)]
    record, _ = evaluate(ablator, relabelled, planted_ranking(scheme, "-1"), sizes=[6], target="contrast")
    curve = record.curves[0]
    assert not curve.span.excludes_zero()
    assert "interval contains 0" in curve.ratio_note
    assert all(p.faithfulness is None and p.completeness is None for p in curve.points)
    assert curve.cpr is None and not record.sanity.span_excludes_zero
    # no effect is a finding about the data, not a failure of the machinery: the random check does not apply
    assert record.sanity.passed and record.sanity.random_relative_change is None
    assert (record.sanity.prefix_check, record.sanity.random_check) == ("pass", "not applicable")
    assert any("checks do not apply" in n for n in record.sanity.notes)
    assert record.sanity.splice_check == "not applicable" and record.sanity.splice_change is None
    # with global positions there is no prefix to check either: nothing was tested, so nothing passed
    scheme, _, ablator = setup(template, "global")
    record, _ = evaluate(ablator, relabelled, planted_ranking(scheme, "all"), sizes=[6], target="contrast")
    assert (record.sanity.prefix_check, record.sanity.random_check) == ("not applicable", "not applicable")
    assert record.sanity.passed is None and sanity_word(record.sanity.passed) == "not tested"
    assert plot_curves({"planted": [record]}, tmp_path / "curves.png") == []  # no panel: a note says why
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_a_negative_effect_is_reported_as_such_never_as_a_curve(template, tmp_path: Path) -> None:
    """Labels swapped, the contrast F(M) - F(∅) lies below 0: no faithfulness, completeness or CPR (a ratio of a
    negative span would read as a circuit explaining refusal), a note saying it is negative, the random and
    splice checks not applicable; the curves figure draws only the circuit with a measurable positive effect."""
    _, splits, _ = template
    scheme, _, ablator = setup(template, "positional")
    swapped = [PromptSample(s.prompt, "swapped", not s.refusal_label, s.dataset_type, s.original_source)
               for s in splits["evaluation"]]
    record, _ = evaluate(ablator, swapped, planted_ranking(scheme, "-1"), sizes=[6], target="contrast")
    curve = record.curves[0]
    assert curve.span.high < 0 and "is negative" in curve.ratio_note
    assert all(p.faithfulness is None and p.completeness is None for p in curve.points)
    assert curve.cpr is None and curve.cpr_log is None and curve.reaches == {"0.5": None, "0.8": None}
    assert record.sanity.random_check == record.sanity.splice_check == "not applicable"
    assert any("no refusal to explain" in n for n in record.sanity.notes)
    positive, _ = evaluate(ablator, splits["evaluation"], planted_ranking(scheme, "-1"), sizes=[6], target="contrast")
    swapped_record = CircuitEvaluation(**{**record.__dict__, "name": "swapped"})
    assert plot_curves({"planted": [positive, swapped_record]}, tmp_path / "curves.png") == ["alpha"]


def test_template_latent_does_not_enter_a_positional_correlation_circuit(template, tmp_path: Path) -> None:
    """Toxic prompts shorter than safe ones: a latent that fires only on a template token has a per-prompt
    mean over all tokens of ~1/length, which correlates with the label; per position class it is constant."""
    wrapper = template[0]
    triggers, neutral = vocabulary()
    rng = np.random.default_rng(0)
    samples = [PromptSample(" ".join([*rng.choice(neutral, size=2), rng.choice(triggers)]), "alpha", True, "toxic", "x")
               for _ in range(12)]
    samples += [PromptSample(" ".join(rng.choice(neutral, size=10)), "alpha", False, "hard", "x") for _ in range(12)]
    splits = {"discovery": samples, "evaluation": []}
    cache = InferencePipeline(wrapper, ActivationConfig(layers=LAYERS, shard_size=64), tmp_path / "cache").run(splits)
    labels = np.array([s.refusal_label for s in samples])
    r = {}
    for mode in ("positional", "global"):
        scheme = position_scheme(wrapper, samples, mode)
        pf = encode_prompts(exact_saes(), PromptActivations(cache, ["discovery"]), scheme)
        r[mode] = correlation_scores(pf, labels[np.argsort(pf.prompt_index)][pf.prompt_index], CorrelationConfig())
    assert r["global"].importance["residuals_0"][0, TEMPLATE] > 0.5
    assert r["positional"].importance["residuals_0"][:, TEMPLATE].max() < 0.1
    planted = r["positional"].importance["residuals_0"][2, PLANTED]  # the planted latents at "-1" still count
    assert planted.min() > 0.5


def test_bootstrap_resamples_within_each_side() -> None:
    toxic = np.array([True, True, True, False, False])
    obj = objective("contrast", "all", toxic)
    w = resample_weights(obj, 300, np.random.default_rng(0))
    assert np.allclose(w[:, toxic].sum(1), 1.0) and np.allclose(w[:, ~toxic].sum(1), -1.0)
    assert len({tuple(row) for row in w}) > 10  # the resamples differ
    mean = objective("toxic", "all", toxic)
    assert list(mean.rows) == [0, 1, 2] and np.allclose(mean.weights, 1 / 3)


def test_sizes_are_log_spaced_with_the_mib_fractions() -> None:
    sizes = curve_sizes(10_000, EvaluationConfig(), "x")
    for f in (0.001, 0.01, 0.1, 0.5, 1.0):
        assert int(round(f * 10_000)) in sizes
    assert sizes[0] == 1 and sizes[-1] == 10_000 and len(sizes) >= 18
    assert curve_sizes(5, EvaluationConfig(sizes=[2, 5]), "x") == [2, 5]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"bootstrap": 50}, "evaluation.bootstrap: 50 resamples are too few"),
    ({"target": "refusal"}, "evaluation.target: 'refusal' is not a known value"),
    ({"error_modes": ["drop"]}, "evaluation.error_modes"),
    ({"sizes": [0, 3]}, "evaluation.sizes"),
    ({"fractions": [0.0]}, "evaluation.fractions"),
])
def test_bad_evaluation_options_are_one_line(kwargs, message) -> None:
    with pytest.raises(UserError, match=message):
        EvaluationConfig(**kwargs)


def test_bad_input_at_evaluation_time(template) -> None:
    _, splits, _ = template
    scheme, _, ablator = setup(template, "positional")
    with pytest.raises(UserError, match=r"evaluation.sizes: \[10000\] outside \[1, \d+\], the candidate nodes"):
        evaluate(ablator, splits["evaluation"], planted_ranking(scheme, "-1"), sizes=[10_000])
    with pytest.raises(UserError, match="target behavior needs the model's answers"):
        evaluate(ablator, splits["evaluation"], planted_ranking(scheme, "-1"), target="behavior")
    with pytest.raises(UserError, match="discovery.positions"):
        DiscoveryConfig(positions="per_token")


def test_variants_run_only_the_positions_after_the_shared_prefix(template) -> None:
    _, splits, _ = template
    scheme, _, ablator = setup(template, "positional")
    prompts = [s.prompt for s in splits["evaluation"]]
    ablator.scores(prompts)
    assert ablator.reuses_prefix
    for batch in ablator.residuals(prompts):
        assert all(h.shape[1] == batch.prompts.mask.shape[1] - scheme.prefix for h in batch.hidden.values())
    _, _, global_ablator = setup(template, "global")  # the prefix is edited with global means: whole prompts
    global_ablator.scores(prompts)
    assert not global_ablator.reuses_prefix


def test_splice_check_finds_the_sae_whose_error_carries_the_score(template) -> None:
    """Exact SAEs reconstruct the residual: splicing them in moves nothing and the check passes. An SAE that cannot
    write the planted direction (its decoder rows zeroed) leaves it in its error term: splicing that SAE in removes
    the refusal, the check fails naming its layer, and `passed` is False; the other layers' splices move nothing."""
    _, splits, _ = template
    scheme, pf, ablator = setup(template, "positional")
    record, _ = evaluate(ablator, splits["evaluation"], planted_ranking(scheme, "-1"), sizes=[6])
    assert record.sanity.splice_check == "pass" and max(record.sanity.splice_change.values()) < 1e-4
    lossy = exact_saes()
    with torch.no_grad():
        lossy[LAYERS[0]].W_dec[list(PLANTED)] = 0.0
    wrapper, _, _ = template
    bad = Ablator(wrapper, lossy, pf.means, RefusalMetric.from_wrapper(wrapper, METRIC), 8)
    record, _ = evaluate(bad, splits["evaluation"], planted_ranking(scheme, "-1"), sizes=[6])
    change = record.sanity.splice_change
    assert change[LAYERS[0]] > 0.5 and all(change[layer] < 1e-4 for layer in LAYERS[1:])
    assert record.sanity.splice_check == "fail" and record.sanity.passed is False
    assert any(f"splicing in {LAYERS[0]}'s reconstruction" in n for n in record.sanity.notes)
