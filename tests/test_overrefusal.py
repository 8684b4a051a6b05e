"""The over-refusal trade-off on a planted model whose over-refusal runs through one feature
(`tests.planted.make_overrefusal_model`): a harmful-looking word writes the false-refusal direction, a toxic
request the true one as well, and the head refuses on either. Setting the false-refusal latent to its harmless
value must end the over-refusal and keep the refusal; what the vector methods do there follows from the geometry
and is asserted as such."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from refusal_sae.ablation import Ablator
from refusal_sae.activations import ActivationConfig, InferencePipeline, PromptActivations
from refusal_sae.errors import UserError
from refusal_sae.features import encode_prompts
from refusal_sae.metric import RefusalMetric
from refusal_sae.model import ModelConfig, ModelWrapper
from refusal_sae.overrefusal import (
    DIRECTION,
    FALSE_REFUSAL,
    FEATURES,
    UNEDITED,
    TradeoffConfig,
    bundled_transfer,
    read_prompt_csv,
    run_tradeoff,
    tradeoff_table,
)
from refusal_sae.positions import position_scheme
from tests.conftest import single_thread, write_csv
from tests.planted import LAYERS, METRIC, REFUSAL_WORD, exact_saes, make_overrefusal_model, overrefusal_prompts
from tests.planted import FALSE_REFUSAL as FALSE_DIRECTION

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("overrefusal")
    with single_thread():
        wrapper = ModelWrapper(ModelConfig(name=str(make_overrefusal_model(root / "model")), device="cpu",
                                           dtype="float32"))
        toxic, hard, harmless = overrefusal_prompts(128)  # enough that the means' word noise is small beside b_0, b_1
        splits = {"discovery": toxic[:120] + hard[:120], "evaluation": toxic[120:] + hard[120:]}
        cache = InferencePipeline(wrapper, ActivationConfig(layers=LAYERS, shard_size=256), root / "cache").run(splits)
        scheme = position_scheme(wrapper, splits["discovery"] + splits["evaluation"], "positional")
        means = encode_prompts(exact_saes(), PromptActivations(cache, ["discovery"]), scheme).means
        ablator = Ablator(wrapper, exact_saes(), means, RefusalMetric.from_wrapper(wrapper, METRIC), 8)
    t2, h2, more = overrefusal_prompts(128, seed=1)
    files = {
        "harmless": write_csv(root / "harmless.csv", [{"prompt": p} for p in harmless + more], ("prompt",)),
        "transfer": write_csv(root / "transfer.csv", [{"prompt": s.prompt, "label": "unsafe"} for s in t2[:8]]
                              + [{"prompt": s.prompt, "label": "safe"} for s in h2[:8]], ("prompt", "label")),
    }
    return ablator, cache, splits, files


def config(files: dict[str, Path], **kw) -> TradeoffConfig:
    return TradeoffConfig(**{"feature_sizes": [2], "feature_strengths": [0.0], "direction_strengths": [1.0],
                             "direction_subtract": [1.0], "orthogonalisation": [1.0, 0.0], "layer": "residuals_0",
                             "harmless": str(files["harmless"]), "transfer": str(files["transfer"]),
                             "max_new_tokens": 1, "edit_generated": True, "batch_size": 8, "bootstrap": 200} | kw)


def test_the_feature_edit_ends_over_refusal_and_keeps_refusal_where_the_vector_methods_do_what_geometry_says(
        planted) -> None:
    ablator, cache, splits, files = planted
    with single_thread():
        result = run_tradeoff(ablator, cache, splits, None, config(files), [REFUSAL_WORD])
    n = len(splits["evaluation"]) // 2

    def rates(method: str, setting: str) -> tuple[float, float]:
        p = result.point(method, setting)
        assert p.toxic.n == n and p.hard.n == n
        return p.toxic.refused / n, p.hard.refused / n

    assert rates(UNEDITED, UNEDITED) == (1.0, 1.0)  # the planted over-refusal
    # the false-refusal latent set to its harmless value (0) or zeroed: no over-refusal, refusal intact
    assert rates(FEATURES, "ablate 2") == (1.0, 0.0)
    assert rates(FEATURES, "scale 0 x2") == (1.0, 0.0)
    # the true refusal direction (toxic minus harmless: b_0 + b_1) projected out removes every refusal
    assert rates(DIRECTION, "project out x1") == (0.0, 0.0)
    # Wang et al.'s vector fully orthogonalised against it is b_1 - b_0, orthogonal to what the head reads: nothing
    # changes. Not orthogonalised it is b_1 plus the estimate's noise (the prompts' other words): projected out at
    # every position it ends the over-refusal, and takes with it at most what the feature edit keeps (here some of
    # the toxic refusal: the noise part of the projection moves the read direction prompt by prompt)
    assert rates(FALSE_REFUSAL, "orthogonal x1") == (1.0, 1.0)
    toxic, hard = rates(FALSE_REFUSAL, "orthogonal x0")
    assert hard == 0.0 and toxic <= rates(FEATURES, "ablate 2")[0]

    chosen = {c.method: c.setting for c in result.chosen}
    assert chosen[FEATURES] == "ablate 2"
    transfer = {(t.method, t.setting): (t.unsafe.refused / t.unsafe.n, t.safe.refused / t.safe.n)
                for t in result.transfer}
    assert transfer[UNEDITED, UNEDITED] == (1.0, 1.0)
    assert transfer[FEATURES, "ablate 2"] == (1.0, 0.0)
    assert "| features | ablate 2 |" in tradeoff_table(result)
    # coherence: the unedited answers to harmless prompts keep their likelihood under the feature edit
    assert abs(result.point(FEATURES, "ablate 2").coherence_change.value) < 1e-3


def test_the_ranking_puts_the_false_refusal_latents_first(planted) -> None:
    from refusal_sae.circuits import candidate_mask
    from refusal_sae.overrefusal import feature_ranking, harmless_ablator

    ablator, _, splits, files = planted
    harmless, _ = read_prompt_csv(files["harmless"], "harmless")
    with single_thread():
        values = harmless_ablator(ablator, harmless)
        candidates = candidate_mask({k: ablator.means.live(k) for k in ablator.layers}, errors=False)
        ranking = feature_ranking(ablator.wrapper, values, candidates, splits["discovery"], config(files))
    last = ablator.scheme.node_classes.index("-1")
    assert set(ranking[:2]) == {(layer, last, FALSE_DIRECTION) for layer in LAYERS}
    # the harmless value of the false-refusal latent is 0: no harmless prompt holds a harmful-looking word
    assert np.allclose(values.means.features["residuals_0"][:, FALSE_DIRECTION], 0.0)


@pytest.mark.parametrize("option, value, message", [
    ("feature_strengths", [1.5], "tradeoff.feature_strengths: 1.5 is outside [-4, 1)"),
    ("direction_strengths", ["strong"], "tradeoff.direction_strengths: 'strong' is not a number"),
    ("orthogonalisation", [-0.5], "tradeoff.orthogonalisation: -0.5 is outside [0, 1]"),
    ("objective", "toxic", "tradeoff.objective"),
])
def test_bad_options_say_which_and_what_to_give(option: str, value: object, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        TradeoffConfig(**{option: value})


def test_a_sweep_without_points_is_refused() -> None:
    with pytest.raises(UserError, match="the sweep has no points"):
        TradeoffConfig(feature_sizes=[], direction_strengths=[], direction_subtract=[], orthogonalisation=[])


def test_a_category_without_hard_prompts_and_an_unknown_one_are_refused(planted, tmp_path: Path) -> None:
    ablator, cache, splits, files = planted
    toxic_only = {"discovery": splits["discovery"], "evaluation": [s for s in splits["evaluation"] if s.refusal_label]}
    with pytest.raises(UserError, match=r"\['alpha'\] have no hard held-out prompts"):
        run_tradeoff(ablator, cache, toxic_only, None, config(files), [REFUSAL_WORD])
    with pytest.raises(UserError, match=r"tradeoff.categories: \['omega'\] are not in the held-out prompts"):
        run_tradeoff(ablator, cache, splits, None, config(files, categories=["omega"]), [REFUSAL_WORD])
    with pytest.raises(UserError, match="tradeoff.layer: no refusal-directions stage"):
        run_tradeoff(ablator, cache, splits, None, config(files, layer=None), [REFUSAL_WORD])
    bad = write_csv(tmp_path / "bad.csv", [{"prompt": "a question", "label": "maybe"}], ("prompt", "label"))
    with pytest.raises(UserError, match="line 2: empty prompt or label 'maybe'"):
        read_prompt_csv(bad, "tradeoff.transfer", labelled=True)


def test_the_bundled_transfer_set_pairs_safe_prompts_with_unsafe_twins() -> None:
    prompts, unsafe = read_prompt_csv(bundled_transfer(), "tradeoff.transfer", labelled=True)
    assert len(prompts) == len(set(prompts)) >= 80
    assert unsafe[0::2] == [False] * (len(prompts) // 2) and unsafe[1::2] == [True] * (len(prompts) // 2)


def test_the_category_table_has_a_row_per_point_and_a_column_per_category(planted) -> None:
    from refusal_sae.overrefusal import category_table

    ablator, cache, splits, files = planted
    with single_thread():
        result = run_tradeoff(ablator, cache, splits, None, config(files, feature_sizes=[], transfer=None,
                                                                    direction_subtract=[], orthogonalisation=[]),
                              [REFUSAL_WORD])
    lines = category_table(result).strip().split("\n")
    assert lines[0] == "| method | setting | alpha |"
    assert lines[2:] == ["| unedited | unedited | 8/8 · 8/8 |", "| refusal direction | project out x1 | 0/8 · 0/8 |"]
    assert result.transfer == [] and result.chosen[0].method == DIRECTION


def test_the_contrast_objective_never_ranks_the_true_refusal_latents(planted) -> None:
    """Under hard minus toxic, setting a true-refusal latent to its harmless value lowers the toxic prompts' score
    and not the hard ones': the contrast rises, so the latent is never an over-refusal feature there."""
    from refusal_sae.circuits import candidate_mask
    from refusal_sae.overrefusal import feature_ranking, harmless_ablator
    from tests.planted import TRUE_REFUSAL

    ablator, _, splits, files = planted
    harmless, _ = read_prompt_csv(files["harmless"], "harmless")
    with single_thread():
        values = harmless_ablator(ablator, harmless)
        candidates = candidate_mask({k: ablator.means.live(k) for k in ablator.layers}, errors=False)
        contrast = feature_ranking(ablator.wrapper, values, candidates, splits["discovery"],
                                   config(files, objective="contrast"))
    last = ablator.scheme.node_classes.index("-1")
    assert not {(layer, last, TRUE_REFUSAL) for layer in LAYERS} & set(contrast)


def test_a_point_that_raises_over_refusal_is_never_chosen() -> None:
    """Keeping the toxic refusal is not enough: a chosen edit must also lower the over-refusal (on OR-Bench, features
    ranked by hard minus toxic kept the toxic refusal while raising the over-refusal)."""
    from refusal_sae.editing import refusal_rate
    from refusal_sae.overrefusal import TradeoffPoint, choose

    def point(method: str, setting: str, toxic: int, hard: int) -> TradeoffPoint:
        rate = lambda k: refusal_rate([True] * k + [False] * (10 - k), 0.95)  # noqa: E731
        return TradeoffPoint(method, setting, rate(toxic), rate(hard), [], None, [])

    points = [point(UNEDITED, UNEDITED, 5, 3), point(FEATURES, "worse", 5, 4), point(FEATURES, "same", 5, 3),
              point(DIRECTION, "better", 5, 2), point(DIRECTION, "best but costly", 1, 0)]
    chosen = {c.method: c for c in choose(points, 0.9)}
    assert chosen[FEATURES].setting is None and chosen[DIRECTION].setting == "better"
    assert chosen[DIRECTION].lowest_hard == "0% at toxic 10% (best but costly)"
