"""Refusal directions per category (Arditi et al.) on models whose refusal directions are known by construction:
one direction shared by two categories, or one per category (tests/planted.py, `make_category_model`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from refusal_sae.activations import ActivationConfig, InferencePipeline
from refusal_sae.analysis import (
    AnalysisConfig,
    AnalysisInputs,
    format_summary,
    run_analysis,
)
from refusal_sae.directions import (
    DirectionsConfig,
    DirectionsResult,
    directional_ablation,
    run_directions,
    scores,
)
from refusal_sae.errors import UserError
from refusal_sae.io import to_json
from refusal_sae.layout import RunLayout
from refusal_sae.metric import RefusalMetric
from refusal_sae.objective import objective
from refusal_sae.positions import position_scheme
from refusal_sae.similarity import SimilarityConfig
from refusal_sae.stats import effect, resample_weights
from refusal_sae.validity import ValidityConfig
from tests.conftest import single_thread
from tests.planted import (
    LAYERS,
    METRIC,
    UNUSED,
    category_run,
    exact_saes,
)

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = DirectionsConfig(selection_fraction=0.25, random_directions=19, permuted_directions=19, bootstrap=200)
ALPHA, BETA = 1, 2  # rows of the ablation matrix: 0 is the global direction


def build(root: Path, reads: dict[str, int], n_per_label: int = 256):
    with single_thread():
        wrapper, splits, cache = category_run(root, reads, n_per_label)
        scheme = position_scheme(wrapper, splits["discovery"] + splits["evaluation"], "positional")
        out = RunLayout(root / "run").analysis("directions")
        result, vectors = run_directions(wrapper, cache, splits, scheme, FAST, METRIC)
        out.directions.write(result, vectors.arrays, vectors.metadata)
    return wrapper, splits, cache, scheme, out, result


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory):
    """Both categories' trigger words write b_0, which the head reads: one refusal direction."""
    return build(tmp_path_factory.mktemp("shared"), {"alpha": 0, "beta": 0})


@pytest.fixture(scope="module")
def modular(tmp_path_factory: pytest.TempPathFactory):
    """alpha's trigger words write b_0, beta's b_1; the head reads both: a refusal direction per category."""
    return build(tmp_path_factory.mktemp("modular"), {"alpha": 0, "beta": 1})


def chosen(result: DirectionsResult, out, name: str) -> np.ndarray:
    vectors = out.directions.read_vectors()
    return vectors[f"{name}.{result.selection.layer}"][["-2", "-1"].index(result.selection.position)]


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_a_planted_direction_is_recovered_and_its_ablation_removes_the_refusal(shared) -> None:
    _, _, _, _, out, result = shared
    b0 = np.eye(32)[0]
    assert len(result.selection.candidates) == len(LAYERS) * 2  # every layer and suffix position was scored
    assert cos(chosen(result, out, "global"), b0) > 0.95
    assert all(cos(chosen(result, out, c), b0) > 0.9 for c in ("alpha", "beta"))
    for b, category in enumerate(result.per_category):
        ablated = result.ablation[0][b]
        assert category.toxic.low > 1.0  # the model refuses the toxic prompts
        assert ablated.change.high < 0 and abs(ablated.score.value) < 0.1 * category.toxic.value
        assert ablated.p_value == pytest.approx(1 / 20)  # below every random direction
        added = result.addition[0][b]
        assert abs(category.safe.value) < 1e-4 and added.change.low > 1.0  # addition induces refusal


@pytest.mark.slow
def test_category_directions_give_a_block_diagonal_matrix_when_modular_and_a_full_one_when_shared(
        modular, shared) -> None:
    mod, sha = modular[-1], shared[-1]
    assert abs(mod.cosine[ALPHA][BETA]) < 0.2 and sha.cosine[ALPHA][BETA] > 0.9
    for result in (mod, sha):
        assert [r.testable for r in result.per_category] == [True, True]
        for a in (ALPHA, BETA):
            assert result.ablation[a][a - 1].share.value == pytest.approx(1.0)  # the diagonal: its own effect
    for a, b in ((ALPHA, 1), (BETA, 0)):  # the other category's direction
        assert abs(mod.ablation[a][b].share.value) < FAST.modular_below and not mod.transfers(a, b)
        assert sha.ablation[a][b].share.value > 0.8 and sha.transfers(a, b)
    assert mod.verdict.label == "modular" and mod.verdict.n_transfer == 0
    assert sha.verdict.label == "monolithic" and sha.verdict.n_transfer == 2 and sha.verdict.p_value <= 0.05
    # all prompts' difference of means is (b_0 + b_1) / sqrt(2) when modular: just what the head reads, so the
    # global direction removes either category's refusal, although it is neither category's direction
    assert mod.cosine[0][ALPHA] == pytest.approx(2 ** -0.5, abs=0.05) and mod.verdict.global_share > 0.9
    assert "modular" in mod.verdict.explanation and "monolithic" in sha.verdict.explanation


@pytest.mark.slow
def test_share_has_an_interval_and_both_nulls_and_own_parts_are_what_the_readout_makes_them(modular, shared) -> None:
    """S comes with a bootstrap interval and a p-value against the permuted-label directions beside the random ones.
    The categories' own parts (direction minus its projection on the global one): ablating alpha's, computed here
    from the saved vectors, moves alpha's score as the record says. In both planted models they lower no
    category's refusal: shared, they are noise; modular, the head reads b_0 + b_1 and the own parts (b_0 - b_1,
    up to sign) are orthogonal to it, so categories that write separate directions read through one shared readout
    look monolithic here, although their whole directions do not transfer (the test above)."""
    mod, sha = modular[-1], shared[-1]
    assert sha.verdict.share_interval.low > FAST.monolithic_above and sha.verdict.p_permuted == pytest.approx(1 / 20)
    assert sha.verdict.share_interval.low <= sha.verdict.mean_share <= sha.verdict.share_interval.high
    assert mod.verdict.share_interval.high < 0.5 and mod.verdict.p_random is not None
    for result in (mod, sha):
        for a in range(2):
            own_direction = result.ablation[1 + a][a].change.value
            assert own_direction < -1.0
            for b in range(2):  # (mod: they raise it a little, the norm of what is left being scaled back up)
                assert result.orthogonal[a][b].change.value > -0.15 * abs(own_direction)
        assert "0 of 2 lower their own category's refusal score" in result.orthogonal_summary
    wrapper, splits, _, _, out, _ = modular
    vectors = {n: torch.from_numpy(chosen(mod, out, n)) for n in ("global", "alpha")}
    g = vectors["global"] / vectors["global"].norm()
    part = vectors["alpha"] - (vectors["alpha"] @ g) * g
    assert abs(float(part @ g)) < 1e-6
    alpha = [s.prompt for s in splits["evaluation"] if s.refusal_label and s.category == "alpha"]
    metric = RefusalMetric.from_wrapper(wrapper, METRIC)
    change = (scores(wrapper, alpha, metric, 8, directional_ablation(wrapper, part)) - scores(wrapper, alpha, metric, 8))
    assert float(change.mean()) == pytest.approx(mod.orthogonal[0][0].change.value, abs=1e-6)


@pytest.mark.slow
def test_ablating_a_direction_nothing_writes_changes_nothing(modular) -> None:
    wrapper, splits, *_ = modular
    prompts = [s.prompt for s in splits["evaluation"] if s.refusal_label]
    metric = RefusalMetric.from_wrapper(wrapper, METRIC)
    direction = torch.zeros(32)
    direction[UNUSED] = torch.randn(len(UNUSED), generator=torch.Generator().manual_seed(0))
    base = scores(wrapper, prompts, metric, 8)
    ablated = scores(wrapper, prompts, metric, 8, directional_ablation(wrapper, direction))
    weights = resample_weights(objective("toxic", "all", np.ones(len(prompts), bool)), 500, np.random.default_rng(0))
    result, _ = effect(base, ablated, weights, 0.95)
    assert result.change.low <= 0 <= result.change.high
    assert base.mean() > 1.0 and np.array_equal(scores(wrapper, prompts, metric, 8), base)  # hooks removed


@pytest.mark.slow
def test_bad_input_is_one_line_naming_it(modular, tmp_path: Path) -> None:
    wrapper, splits, cache, scheme, *_ = modular
    with pytest.raises(UserError, match=r"directions.layers: \['residuals_7'\] not in the activation cache") as e:
        run_directions(wrapper, cache, splits, scheme, DirectionsConfig(layers=["residuals_7"]), METRIC)
    assert "\n" not in str(e.value)
    no_toxic = {"discovery": [s for s in splits["discovery"] if s.category != "beta" or not s.refusal_label],
                "evaluation": splits["evaluation"]}
    collect = InferencePipeline(wrapper, ActivationConfig(layers=LAYERS, shard_size=128), tmp_path / "cache")
    partial = collect.run(no_toxic)
    with pytest.raises(UserError, match="category 'beta' has no toxic prompts in the discovery split") as e:
        run_directions(wrapper, partial, no_toxic, scheme, FAST, METRIC)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="directions.random_directions: 5 random directions cannot give p <= 0.05"):
        DirectionsConfig(random_directions=5)
    with pytest.raises(UserError, match="directions.modular_below"):
        DirectionsConfig(modular_below=0.6)


@pytest.mark.slow
def test_the_stage_runs_in_the_analysis_and_its_record_round_trips(modular, tmp_path: Path) -> None:
    wrapper, splits, cache, *_ = modular
    run = RunLayout(tmp_path)
    inputs = AnalysisInputs(exact_saes(), cache, splits, lambda: wrapper, run, ValidityConfig(max_new_tokens=2))
    cfg = AnalysisConfig(similarity=SimilarityConfig(permutations=10), metric=METRIC, validity_report=False,
                         directions=FAST)
    first = run.analysis("first")
    summary = run_analysis(inputs, first, cfg, ["discover", "similarity", "directions", "summary"])
    assert summary.directions is None and first.directions.read(DirectionsResult) is None  # off unless enabled
    second = run.analysis("second")
    summary = run_analysis(inputs, second, cfg, ["directions", "summary"], source=first)  # asked for by name
    result = second.directions.read(DirectionsResult)
    assert {**to_json(result), "protocol": None} == json.loads(second.directions.record_json.read_text())
    assert result.verdict.label == summary.directions.verdict == "modular"
    assert result.categories == ["alpha", "beta"] and result.names == ["global", "alpha", "beta"]
    assert second.directions.png.read_bytes()[:4] == b"\x89PNG"
    assert set(second.directions.read_vectors()) == {f"{n}.{layer}" for n in result.names for layer in LAYERS}
    assert "refusal directions" in (second.root / "summary.md").read_text()
    assert "directions (transfer share; describes, decides nothing): Refusal directions look modular" in (
        format_summary(summary))
