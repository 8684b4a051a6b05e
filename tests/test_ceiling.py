"""The split-half noise ceiling (`refusal_sae.ceiling`) on the category model (tests/planted.py): both discovery
methods call the model whose categories read one refusal direction monolithic and the one whose categories read
their own directions modular; the ceiling and the matched null each decide a verdict the raw Jaccard gets wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from refusal_sae.activations import (
    PromptActivations,
)
from refusal_sae.analysis import (
    AnalysisConfig,
    AnalysisInputs,
    format_summary,
    load_discovery,
    load_evaluation,
    run_analysis,
    verdict_line,
)
from refusal_sae.attribution import AttributionConfig
from refusal_sae.ceiling import (
    Ceiling,
    CeilingConfig,
    DirectionCeiling,
    direction_ceiling,
    half_split,
    null_jaccard,
    output_writers,
    split_half_ceiling,
    strata,
)
from refusal_sae.correlation import CorrelationConfig
from refusal_sae.directions import DirectionsConfig, DirectionsResult, site_residuals
from refusal_sae.discovery import (
    Attribution,
    Correlation,
    DiscoveryConfig,
    DiscoveryInputs,
)
from refusal_sae.errors import UserError
from refusal_sae.features import encode_prompts
from refusal_sae.evaluation import EvaluationConfig
from refusal_sae.layout import CircuitSummary, DirectionsSummary, MethodSummary, RunLayout
from refusal_sae.metric import RefusalMetric
from refusal_sae.positions import position_scheme
from refusal_sae.similarity import SimilarityConfig
from refusal_sae.stats import Interval
from refusal_sae.validity import ValidityConfig
from tests.conftest import single_thread
from tests.planted import (
    LAYERS,
    METRIC,
    category_run,
    exact_saes,
)

pytestmark = pytest.mark.usefixtures("one_thread")
SIZES = [1, 2, 4, 8, 16, 48]
CATEGORIES = ["alpha", "beta"]


def analysis_inputs(root: Path, reads: dict[str, int]) -> AnalysisInputs:
    """A run of the category model: 64 prompts per label and category, half of them discovery; exact SAEs."""
    with single_thread():
        wrapper, splits, cache = category_run(root, reads, 64)
    return AnalysisInputs(exact_saes(), cache, splits, lambda: wrapper, RunLayout(root / "run"), ValidityConfig())


def inputs(root: Path, reads: dict[str, int]) -> DiscoveryInputs:
    """The discovery inputs of the category model's run."""
    run = analysis_inputs(root, reads)
    wrapper, splits, cache = run.wrapper(), run.splits, run.cache
    with single_thread():
        scheme = position_scheme(wrapper, splits["discovery"] + splits["evaluation"], "positional")
        saes = exact_saes()
        pf = encode_prompts(saes, PromptActivations(cache, ["discovery"]), scheme)
    samples = [splits["discovery"][i] for i in pf.prompt_index]
    return DiscoveryInputs(pf, samples, pf.labels, None, saes, lambda: wrapper,
                           RefusalMetric.from_wrapper(wrapper, METRIC), "toxic")


def ceilings(root: Path, reads: dict[str, int]) -> dict[str, Ceiling]:
    inp = inputs(root, reads)
    cfg = CeilingConfig(splits=10, sizes=SIZES, null_draws=400)
    with single_thread():
        return {m.name: split_half_ceiling(m, inp, CATEGORIES, cfg)
                for m in (Correlation(CorrelationConfig()), Attribution(AttributionConfig(batch_size=32)))}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Ceiling]:
    """Both categories' trigger words write b_0, which the head reads: one refusal mechanism."""
    return ceilings(tmp_path_factory.mktemp("shared"), {"alpha": 0, "beta": 0})


@pytest.fixture(scope="module")
def modular(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Ceiling]:
    """alpha's trigger words write b_0, beta's b_1: a refusal direction per category."""
    return ceilings(tmp_path_factory.mktemp("modular"), {"alpha": 0, "beta": 1})


def at(ceiling: Ceiling, n: int):
    return next(s for s in ceiling.sizes if s.n_nodes == n)


@pytest.mark.slow
def test_both_methods_call_the_shared_model_monolithic_and_the_modular_one_modular(shared, modular) -> None:
    for method in ("correlation", "attribution"):
        assert shared[method].verdict == "monolithic", shared[method].reason
        assert modular[method].verdict == "modular", modular[method].reason
        for c in (shared[method], modular[method]):
            assert c.half_prompts == {"alpha": [33, 35], "beta": [29, 31]}  # floor(n / 2) per label in half A
            assert c.at == next(s.n_nodes for s in c.sizes if s.verdict != "unmeasurable")
    # the size the verdict is taken at is where the halves first agree: one node for attribution (the planted
    # latent), four for correlation (the planted latent at two layers and two positions, tied within a half)
    assert (shared["attribution"].at, shared["correlation"].at) == (1, 4)


@pytest.mark.slow
def test_the_ceiling_makes_a_partial_overlap_of_one_mechanism_monolithic(shared) -> None:
    # 16 correlation nodes: two halves of one category share only a quarter of their nodes (the planted ones; the
    # rest are ranked by noise), and the categories share as much; a raw Jaccard of 0.25 is "hybrid" by the
    # uncalibrated rule, but it is the ceiling itself
    s = at(shared["correlation"], 16)
    raw = SimilarityConfig()
    assert s.pairs[0].between.value < raw.monolithic_above
    assert all(r.within.value < 0.5 and r.reproducible for r in s.categories)
    assert s.verdict == "monolithic" and s.relative.low >= 0.75


@pytest.mark.slow
def test_the_matched_null_keeps_chance_overlap_from_reading_as_shared(modular) -> None:
    # 48 correlation nodes of the modular model: most of each circuit is noise, and the categories' circuits
    # share what random sets of their shapes share; as a fraction of the halves' agreement that raw overlap is
    # more than half, but above the null it is nothing
    s = at(modular["correlation"], 48)
    p = s.pairs[0]
    within = [r.within.value for r in s.categories]
    assert p.between.value / np.sqrt(within[0] * within[1]) > 0.4
    assert p.between.value - p.null < 0.03
    assert s.relative is not None and s.relative.low < 0 < s.relative.high
    assert s.verdict == "undecided"


@pytest.mark.slow
def test_the_ceiling_stage_writes_its_record_and_a_later_process_gets_the_same(tmp_path: Path) -> None:
    """`discover` then `ceiling` through `run_analysis`; then `ceiling` alone from that analysis (the discovery
    inputs rebuilt from the run, the options from the discovery record) writes the same bytes; the summary says
    the verdict."""
    run = analysis_inputs(tmp_path, {"alpha": 0, "beta": 0})
    cfg = AnalysisConfig(discovery=DiscoveryConfig(methods=["correlation"]), metric=METRIC, validity_report=False,
                         ceiling=CeilingConfig(enabled=True, splits=3, sizes=[4, 8], null_draws=100),
                         directions=DirectionsConfig(enabled=True, selection_fraction=0.25, random_directions=19,
                                                     bootstrap=100))
    first, second = run.run.analysis("first"), run.run.analysis("second")
    with single_thread():
        summary = run_analysis(run, first, cfg, ["discover", "directions", "ceiling", "summary"])
        again = run_analysis(run, second, cfg, ["ceiling", "summary"], source=first)
    record = first.method("correlation").read_ceiling(Ceiling)
    assert record.verdict == "monolithic" and first.method("correlation").ceiling_png.is_file()
    for part in (lambda a: a.method("correlation").ceiling_json, lambda a: a.directions.ceiling_json):
        assert part(second).read_bytes() == part(first).read_bytes()
    directions = first.directions.read(DirectionsResult)
    ceiling = first.directions.read_ceiling(DirectionCeiling)
    assert (ceiling.layer, ceiling.position) == (directions.selection.layer, directions.selection.position)
    for s in (summary, again):
        assert s.methods["correlation"].ceiling_verdict == "monolithic"
        assert s.directions.ceiling_verdict == "monolithic"
        assert "split-half ceiling: monolithic (at 4 nodes" in format_summary(s)
        assert "split-half ceiling: monolithic (R_directions = " in format_summary(s)
        # both ceilings ran, but no circuit was evaluated: nothing passed the evaluation, so no verdict
        assert "no verdict is supported: 0 of 0 circuits pass the evaluation" in format_summary(s)


def test_a_verdict_is_printed_only_from_passing_circuits_beside_the_directions() -> None:
    """Two circuits with a measurable effect that reach faithfulness 0.8 (by the lower bound) and fail no check,
    both ceilings run: the verdict, beside the directions' (agreeing or not). One passing circuit, a missing
    directions ceiling: no verdict, each reason said."""
    def circuit(low: float, reach: int | None, passed: bool | None = True) -> CircuitSummary:
        return CircuitSummary(Interval(1.0, 0.5, 1.5), Interval(low + 0.5, low, low + 1.0), "keep", 100,
                              {"0.5": reach, "0.8": reach}, None, None, None, passed)

    def method(*circuits: CircuitSummary) -> MethodSummary:
        return MethodSummary({f"c{i}": c for i, c in enumerate(circuits)}, None, None, "hybrid", "R = 0.5")

    directions = DirectionsSummary("residuals_1", "-1", "monolithic", None, None, None, "x", "hybrid", "R = 0.4")
    assert verdict_line(method(circuit(0.2, 10), circuit(0.1, 40), circuit(-1.0, None)), directions) == (
        "verdict: hybrid by the split-half ceiling over 2 passing circuits, beside the refusal directions' hybrid; "
        "they agree")
    other = DirectionsSummary("residuals_1", "-1", "monolithic", None, None, None, "x", "monolithic", "R = 0.9")
    assert verdict_line(method(circuit(0.2, 10), circuit(0.1, 40)), other).endswith("they disagree: no single answer")
    line = verdict_line(method(circuit(0.2, 10), circuit(0.1, 40, passed=False), circuit(0.3, None)),
                        DirectionsSummary("residuals_1", "-1", "monolithic", None, None, None, "x"))
    assert line.startswith("no verdict is supported: 1 of 3 circuits pass the evaluation")
    assert "refusal directions' split-half ceiling did not run" in line


def direction_ceilings(root: Path, reads: dict[str, int]) -> DirectionCeiling:
    """The directions' ceiling of the category model at the last layer and position, 32 prompts per label and
    category (16 discovery): few enough that noise shrinks the plain cosine of two categories' directions."""
    with single_thread():
        *_, cache = category_run(root, reads, 32)
    return direction_ceiling(*site_residuals(cache, LAYERS[-1], "-1"), LAYERS[-1], "-1", CeilingConfig(splits=10))


@pytest.mark.slow
def test_the_directions_ceiling_corrects_the_cosine_for_noise(tmp_path: Path) -> None:
    shared = direction_ceilings(tmp_path / "shared", {"alpha": 0, "beta": 0})
    modular = direction_ceilings(tmp_path / "modular", {"alpha": 0, "beta": 1})
    assert shared.reproducible == modular.reproducible == CATEGORIES
    # one direction: the plain cosine of the halves' directions is well below 1 (noise), the corrected one is 1;
    # the categories' directions hold nothing of their own, and the cross-half Gram matrix has one dimension
    (pair,) = shared.pairs
    assert pair.raw.value < 0.75 <= pair.corrected.low and pair.corrected.value == pytest.approx(1, abs=0.1)
    assert shared.verdict == "monolithic" and shared.dimension.value < 1.2
    assert all(abs(v.value) < 0.1 for v in shared.specific.values())
    # a direction each: orthogonal, each a good share of its own, two dimensions
    (pair,) = modular.pairs
    assert modular.verdict == "modular" and abs(pair.corrected.value) < 0.2
    assert modular.dimension.value > 1.7 and all(v.value > 0.2 for v in modular.specific.values())


def test_half_split_halves_every_cell_and_refuses_a_cell_of_one() -> None:
    rng = np.random.default_rng(0)
    categories = np.array(["a"] * 7 + ["b"] * 6)
    labels = np.array([True] * 4 + [False] * 3 + [True, False] * 3)
    half = half_split(categories, labels, rng)
    for c, label, n in (("a", True, 4), ("a", False, 3), ("b", True, 3), ("b", False, 3)):
        cell = (categories == c) & (labels == label)
        assert half[cell].sum() == n // 2
    with pytest.raises(UserError, match="category 'b' has 1 safe discovery prompt"):
        half_split(np.array(["b"] * 6), np.array([True] * 5 + [False]), rng)
    with pytest.raises(UserError, match="category 'b' has 4 discovery prompts; a split-half ceiling needs at least 6"):
        half_split(np.array(["b"] * 4), np.array([True, True, False, False]), rng)


def test_the_null_matches_frequency_and_its_mean_is_that_of_real_random_sets() -> None:
    rng = np.random.default_rng(1)
    # one layer, one class, 40 latents + the error node; latents 0-9 fire on every prompt, the rest on 1 in 10
    values = {"l": np.zeros((100, 1, 41))}
    values["l"][:, 0, :10] = 1.0
    values["l"][::10, 0, 10:] = 1.0
    values["l"][:, 0, 40] = 1.0
    candidates = {"l": np.ones((1, 41), bool)}
    st = strata(values, candidates, bins=2)
    assert len(st.sizes) == 3 and sorted(st.sizes.tolist()) == [1, 10, 30]
    frequent = st.of["l"][0, 0]
    assert (st.of["l"][0, :10] == frequent).all() and (st.of["l"][0, 10:40] != frequent).all()
    # two 6-node sets of frequent latents: random sets of their shape are drawn from the 10 frequent ones
    a = frozenset(("l", 0, c) for c in range(6))
    b = frozenset(("l", 0, c) for c in range(4, 10))
    expected = null_jaccard(st.counts(a), st.counts(b), st.sizes, 20_000, rng)
    draws = []
    for _ in range(20_000):
        x, y = set(rng.choice(10, 6, replace=False)), set(rng.choice(10, 6, replace=False))
        draws.append(len(x & y) / len(x | y))
    assert expected == pytest.approx(np.mean(draws), abs=0.01)
    # a uniform null over all 40 latents would call far less overlap chance
    uniform = null_jaccard(np.array([6]), np.array([6]), np.array([40]), 20_000, rng)
    assert uniform < expected / 3


def test_bad_options_name_the_option() -> None:
    with pytest.raises(UserError, match="ceiling.sizes"):
        CeilingConfig(sizes=[])
    with pytest.raises(UserError, match="ceiling.splits"):
        CeilingConfig(splits=0)
    with pytest.raises(UserError, match="ceiling.modular_below"):
        CeilingConfig(modular_below=0.8, monolithic_above=0.75)


@pytest.mark.slow
def test_output_latents_are_found_by_their_logit_lens_and_left_out_of_a_second_r(tmp_path: Path) -> None:
    """In the shared model the head reads b_0, so the exact SAEs' latents +b_0 and -b_0 write the refusal token
    itself: they top |output alignment| at every layer. The planted mechanism *is* that output, so without them
    the categories' circuits hold nothing reproducible and R is no longer monolithic: the second R says how much
    of the verdict rests on the output latents."""
    inp = inputs(tmp_path, {"alpha": 0, "beta": 0})
    wrapper, saes = inp.wrapper(), exact_saes()
    alignment = {layer: inp.metric.output_alignment(wrapper.logit_lens(sae.W_dec.detach()))
                 for layer, sae in saes.items()}
    for layer in LAYERS:
        assert set(np.argsort(-np.abs(alignment[layer]))[:2]) == {0, 32}
    candidates = inp.candidates()
    live = max(int(m[:, :-1].any(0).sum()) for m in candidates.values())
    exclude = output_writers(alignment, candidates, 1 / live)  # one latent per layer: +b_0 (-b_0 never fires)
    for layer, m in exclude.items():
        assert set(np.flatnonzero(m[:, :-1].any(0))) == {0} and not m[:, -1].any()
    cfg = CeilingConfig(splits=10, sizes=SIZES, null_draws=400)
    with single_thread():
        ceiling = split_half_ceiling(Correlation(CorrelationConfig()), inp, CATEGORIES, cfg, exclude)
    assert ceiling.verdict == "monolithic" and set(ceiling.output_latents) == set(LAYERS)
    s = at(ceiling, ceiling.at)
    assert s.verdict == "monolithic" and s.verdict_without_output != "monolithic"


@pytest.mark.slow
def test_the_ceiling_compares_at_the_median_faithful_size_of_the_evaluation(tmp_path: Path) -> None:
    """With at_faithful_size, the ceiling stage adds the median over categories of the smallest size whose
    faithfulness interval reaches 0.8 (from the same analysis's evaluation) to its sizes and says R there."""
    run = analysis_inputs(tmp_path, {"alpha": 0, "beta": 0})
    cfg = AnalysisConfig(discovery=DiscoveryConfig(methods=["correlation"]), metric=METRIC, validity_report=False,
                         evaluation=EvaluationConfig(n_sizes=6, random_circuits=0, bootstrap=200, per_layer=False,
                                                     error_modes=["keep"]),
                         ceiling=CeilingConfig(enabled=True, splits=3, sizes=[48], null_draws=100, at_faithful_size=True))
    out = run.run.analysis("a")
    with single_thread():
        run_analysis(run, out, cfg, ["discover", "evaluate", "ceiling", "summary"])
    records = load_evaluation(out, load_discovery(out), "correlation")
    faithful = [r.faithful_size() for r in records]
    assert all(n is not None for n in faithful)
    ceiling = out.method("correlation").read_ceiling(Ceiling)
    assert ceiling.faithful_size == int(np.median(faithful))
    assert [s.n_nodes for s in ceiling.sizes] == sorted({48, ceiling.faithful_size})
    assert f"at the median faithful size, {ceiling.faithful_size} nodes, R = " in ceiling.reason
