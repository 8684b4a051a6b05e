"""`Ablator.scores` equals a plain whole-model forward pass with the same edits hooked.

`Ablator` runs the model once per prompt list up to the deepest SAE layer, keeps the unedited residual
at every SAE layer, and runs each variant from its shallowest edited layer on
(`ModelWrapper.suffix_last_token_logits`). These tests compare it with the whole model run per variant,
the edits hooked by `ModelWrapper.edit_residuals` and built from the maths (`tests/whole_model.py`), on
a tiny random Llama, the planted model of `tests/planted.py` and a tiny random Qwen2 (the default
model's architecture), sliding-window layers included, with positional and global position classes;
and check that ablating the shared template prefix, whose residuals are the same in every prompt,
changes nothing. And `refusal_scores`, which runs the prompts' shared prefix once per call and each batch
only the positions after it, equals whole prompts on the same models, under a hook that edits every
position too (the refusal-directions stage's). So do attribution's node scores, whose batches also run only the
positions after the shared prefix.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from refusal_sae import prefix
from refusal_sae.ablation import Ablator, Variant
from refusal_sae.attribution import attribution_scores
from refusal_sae.circuits import candidate_mask
from refusal_sae.directions import directional_ablation
from refusal_sae.generation import answer_log_likelihood, generate
from refusal_sae.metric import RefusalMetric, refusal_scores
from refusal_sae.model import ModelConfig, ModelWrapper
from refusal_sae.positions import common_prefix
from refusal_sae.prefix import expand, prefix_cache
from refusal_sae.sae import SAEConfig, SparseAutoencoder
from refusal_sae.validity import generate_answers
from tests.planted import (
    LAYERS,
    METRIC,
    PLANTED,
    exact_saes,
    make_planted_model,
    make_template_model,
    planted_prompts,
)
from tests.tiny_model import make_tiny_model, make_tiny_tokenizer, sample_prompts
from tests.whole_model import node_means, whole_model_scores

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL, ATOL = 1e-5, 1e-5
MODES = ("positional", "global")
PREFIX_TOLERANCE = 1e-4
"""Ablating the shared prefix to its mean may move a score by float rounding only."""


def make_tiny_qwen2(directory: Path, sliding: bool, n_layers: int = 4, d_model: int = 32, seed: int = 0) -> Path:
    """A seeded random `Qwen2ForCausalLM` (tied embeddings, like Qwen2.5-0.5B) with the tiny tokenizer.

    `sliding`: layers 2.. use a 4-token sliding window (`config.layer_types` mixes full and sliding
    attention), so a block run with the wrong layer type or mask would change the logits.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1,
        use_sliding_window=sliding, sliding_window=4 if sliding else None, max_window_layers=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    if sliding:
        assert {"full_attention", "sliding_attention"} <= set(model.config.layer_types)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def random_saes(wrapper: ModelWrapper, layers: Sequence[str], width: int = 64, k: int = 8, seed: int = 0
                ) -> dict[str, SparseAutoencoder]:
    """Seeded random SAEs at `layers` (in the order given)."""
    saes = {}
    for i, layer in enumerate(layers):
        torch.manual_seed(seed + i)
        saes[layer] = SparseAutoencoder(SAEConfig(d_in=wrapper.d_model, num_latents=width, k=k)).eval()
    return saes


def variants(abl: Ablator, seed: int = 0, **named: Variant) -> dict[str, Variant | None]:
    """None, everything ablated, a random circuit and its complement (with error nodes and without), one
    layer edited only (the deepest, the shallowest), and any `named` ones."""
    rng = np.random.default_rng(seed)
    latents = {layer: abl.means.live(layer) for layer in abl.layers}
    nodes, latents_only = candidate_mask(latents, errors=True), candidate_mask(latents, errors=False)
    kept = {layer: rng.random(m.shape) < 0.5 for layer, m in nodes.items()}
    nothing = {layer: np.zeros_like(m) for layer, m in nodes.items()}
    first, *_, deepest = abl.layers
    return {
        "model": None,
        "everything": abl.variant(nothing, nodes),
        "circuit": abl.variant(kept, nodes),
        "complement": abl.variant(kept, nodes, inside=False),
        "circuit, errors kept": abl.variant(kept, latents_only),
        "deepest layer only": abl.variant(nothing, nodes, layers=[deepest]),
        "shallowest layer only": abl.variant(nothing, nodes, layers=[first]),
        **named,
    }


DISTINCT = (("model", "everything"), ("circuit", "complement"), ("deepest layer only", "shallowest layer only"))
"""Patterns whose scores must differ, so that equality of the two paths is not trivial."""


def assert_same_scores(abl: Ablator, prompts: list[str], patterns: Mapping[str, Variant | None],
                       distinct: Sequence[tuple[str, str]] = DISTINCT) -> dict[str, np.ndarray]:
    """Cached residuals vs whole model for every pattern; the `distinct` pairs must really differ."""
    results = {}
    for name, variant in patterns.items():
        cached, whole = abl.scores(prompts, variant), whole_model_scores(abl, prompts, variant)
        assert cached.shape == whole.shape == (len(prompts),) and cached.dtype == np.float64
        np.testing.assert_allclose(cached, whole, rtol=RTOL, atol=ATOL, err_msg=name)
        results[name] = whole
    for a, b in distinct:
        assert not np.allclose(results[a], results[b], atol=1e-3), (a, b)
    return results


def assert_prefix_ablation_changes_nothing(abl: Ablator, prompts: list[str]) -> None:
    """The shared prefix mean-ablated at every layer: the same through both paths, and the model's scores."""
    assert abl.means.scheme.prefix > 0
    prefix = abl.prefix_ablation()
    assert all(not keep.everything for keep in prefix.values())
    cached = abl.scores(prompts, prefix)
    np.testing.assert_allclose(cached, whole_model_scores(abl, prompts, prefix), rtol=RTOL, atol=ATOL)
    assert np.abs(cached - abl.scores(prompts)).max() < PREFIX_TOLERANCE


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> ModelWrapper:
    directory = make_tiny_model(tmp_path_factory.mktemp("llama4") / "model", n_layers=4, d_model=32)
    return ModelWrapper(ModelConfig(name=str(directory), device="cpu", dtype="float32"))


@pytest.fixture(scope="module", params=[False, True], ids=["qwen2", "qwen2_sliding"])
def tiny_qwen2(request, tmp_path_factory: pytest.TempPathFactory) -> ModelWrapper:
    directory = make_tiny_qwen2(tmp_path_factory.mktemp("qwen2") / "model", sliding=request.param)
    wrapper = ModelWrapper(ModelConfig(name=str(directory), device="cpu", dtype="float32"))
    # transformers 5 loads any tokenizer saved beside a qwen2 config as a Qwen2Tokenizer (BPE), which
    # misreads the word-level vocabulary: put the tiny tokenizer itself back
    wrapper.tokenizer = make_tiny_tokenizer()
    wrapper.tokenizer.padding_side = "right"
    return wrapper


def prompts_of(n: int, seed: int = 0) -> list[str]:
    """`n` sample prompts of varied length (so batches are padded)."""
    rng = np.random.default_rng(seed)
    pool = [p for p in sample_prompts() if len(p.split()) < 60]
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]


def test_suffix_logits_equal_last_token_logits_after_every_layer(tiny_llama: ModelWrapper) -> None:
    wrapper = tiny_llama
    enc = wrapper.tokenize(prompts_of(5), "right")
    assert (enc["attention_mask"] == 0).any()  # padded rows are in the batch
    full = wrapper.last_token_logits(enc["input_ids"], enc["attention_mask"])
    residuals = wrapper.residuals(enc["input_ids"], enc["attention_mask"], wrapper.layer_names)
    for layer, hidden in residuals.items():  # the last layer too: then only the final norm and head run
        suffix = wrapper.suffix_last_token_logits(hidden, enc["attention_mask"], layer)
        torch.testing.assert_close(suffix, full, rtol=RTOL, atol=ATOL, msg=lambda m, layer=layer: f"{layer}: {m}")
    # the real layer list is back in place, so the full model runs all blocks again
    assert wrapper._decoder.layers is wrapper._layers
    torch.testing.assert_close(wrapper.last_token_logits(enc["input_ids"], enc["attention_mask"]), full)


def test_suffix_runs_only_later_blocks_and_fires_their_hooks(tiny_llama: ModelWrapper) -> None:
    wrapper = tiny_llama
    enc = wrapper.tokenize(prompts_of(3), "right")
    hidden = wrapper.residuals(enc["input_ids"], enc["attention_mask"], ["residuals_1"])["residuals_1"]
    calls: list[int] = []
    handles = [block.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, block in
               enumerate(wrapper._layers)]
    try:
        doubled = {"residuals_2": lambda h: 2 * h}
        with wrapper.edit_residuals(doubled):
            edited = wrapper.suffix_last_token_logits(hidden, enc["attention_mask"], "residuals_1")
            reference = wrapper.last_token_logits(enc["input_ids"], enc["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    assert calls[:2] == [2, 3]  # the suffix ran blocks 2 and 3 only
    torch.testing.assert_close(edited, reference, rtol=RTOL, atol=ATOL)
    plain = wrapper.suffix_last_token_logits(hidden, enc["attention_mask"], "residuals_1")
    assert not torch.allclose(plain, edited)  # the edit at layer 2 changed something


def test_cached_residuals_equal_the_whole_model_on_a_random_llama(tiny_llama: ModelWrapper, tmp_path: Path) -> None:
    wrapper = tiny_llama
    metric = RefusalMetric.from_wrapper(wrapper, METRIC)
    saes = random_saes(wrapper, ["residuals_2", "residuals_1"])  # not in depth order on purpose
    prompts = prompts_of(11)
    for mode in MODES:
        means = node_means(wrapper, saes, prompts_of(12, seed=5), mode, tmp_path / mode)
        abl = Ablator(wrapper, saes, means, metric, batch_size=4)
        assert abl.layers == ["residuals_1", "residuals_2"]
        assert_same_scores(abl, prompts, variants(abl))
        if mode == "positional":
            assert means.scheme.node_classes[0] == "content" and len(means.scheme.node_classes) > 2
            assert_prefix_ablation_changes_nothing(abl, prompts)
        else:
            assert means.scheme.mean_classes == ["all"]


def test_residuals_are_computed_once_per_prompt_list(tiny_llama: ModelWrapper, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Every variant of a prompt list reuses one forward pass to the deepest SAE layer, and runs only the
    blocks after its shallowest edited layer."""
    wrapper = tiny_llama
    metric = RefusalMetric.from_wrapper(wrapper, METRIC)
    saes = random_saes(wrapper, ["residuals_1", "residuals_2"])
    abl = Ablator(wrapper, saes, node_means(wrapper, saes, prompts_of(6, seed=5), "positional", tmp_path), metric,
                  batch_size=3)
    abl.scores(prompts_of(2, seed=9))  # whatever an Ablator does once, on its first use, is done
    n_forward = abl.n_forward
    residual_calls: list[list[str]] = []
    original = wrapper.residuals
    monkeypatch.setattr(wrapper, "residuals", lambda *a, **k: residual_calls.append(list(a[2])) or original(*a, **k))
    blocks: list[int] = []
    handles = [block.register_forward_hook(lambda m, a, o, i=i: blocks.append(i)) for i, block in
               enumerate(wrapper._layers)]
    patterns = variants(abl)
    prompts = prompts_of(7)
    try:
        abl.scores(prompts)
        assert residual_calls == [["residuals_1", "residuals_2"]] * 3  # 3 batches, every SAE layer at once
        blocks.clear()
        for variant in (patterns["model"], patterns["deepest layer only"], patterns["everything"], None):
            abl.scores(prompts, variant)
        assert len(residual_calls) == 3  # reused
        # 3 batches each: the model and the deepest-layer variant from residuals_2 (block 3 only), the
        # all-layer variant from residuals_1 (blocks 2 and 3)
        assert blocks == [3] * 3 + [3] * 3 + [2, 3] * 3 + [3] * 3
    finally:
        for handle in handles:
            handle.remove()
    assert abl.n_forward - n_forward == 15  # variant batches
    abl.scores(prompts[:2])
    assert len(residual_calls) == 4  # another prompt list: its own residuals
    for i in range(Ablator.CACHE_SIZE + 2):
        abl.scores(prompts[i : i + 1])
    assert len(abl._cache) == Ablator.CACHE_SIZE  # the least recently used are dropped
    assert abl.scores([]).shape == (0,)


@pytest.mark.parametrize("mode", MODES)
def test_cached_residuals_equal_the_whole_model_on_a_random_qwen2(tiny_qwen2: ModelWrapper, mode: str,
                                                                  tmp_path: Path) -> None:
    wrapper = tiny_qwen2
    metric = RefusalMetric.from_wrapper(wrapper, METRIC)
    enc = wrapper.tokenize(prompts_of(4, seed=1), "right")
    assert int(enc["attention_mask"].sum(1).max()) > 8  # longer than the sliding window
    full_logits = wrapper.last_token_logits(enc["input_ids"], enc["attention_mask"])
    for layer, hidden in wrapper.residuals(enc["input_ids"], enc["attention_mask"], wrapper.layer_names).items():
        torch.testing.assert_close(wrapper.suffix_last_token_logits(hidden, enc["attention_mask"], layer), full_logits,
                                   rtol=RTOL, atol=ATOL)
    saes = random_saes(wrapper, ["residuals_1", "residuals_2"], seed=3)
    abl = Ablator(wrapper, saes, node_means(wrapper, saes, prompts_of(12, seed=5), mode, tmp_path), metric,
                  batch_size=4)
    prompts = prompts_of(9, seed=2)
    assert_same_scores(abl, prompts, variants(abl, seed=1))
    if mode == "positional":
        assert_prefix_ablation_changes_nothing(abl, prompts)


@pytest.mark.parametrize("mode", MODES)
def test_cached_residuals_equal_the_whole_model_on_the_planted_model(tmp_path: Path, mode: str) -> None:
    wrapper = ModelWrapper(ModelConfig(name=str(make_planted_model(tmp_path / "model")), device="cpu",
                                       dtype="float32"))
    saes = exact_saes()
    splits = planted_prompts(12)
    means = node_means(wrapper, saes, [s.prompt for s in splits["discovery"]], mode, tmp_path / "cache")
    abl = Ablator(wrapper, saes, means, RefusalMetric.from_wrapper(wrapper, METRIC), batch_size=5)
    last = len(means.scheme.node_classes) - 1  # "-1", or "all"
    planted = {layer: np.zeros((last + 1, saes[layer].cfg.width + 1), bool) for layer in LAYERS}
    for m in planted.values():
        m[last, PLANTED] = True
    nodes = candidate_mask({layer: means.live(layer) for layer in LAYERS}, errors=True)
    prompts = [s.prompt for s in splits["evaluation"]]
    patterns = variants(abl, seed=4, planted=abl.variant(planted, nodes),
                        without_planted=abl.variant(planted, nodes, inside=False))
    # block 1 writes nothing, so ablating everything at either layer is the same edit: not a distinct pair here
    assert_same_scores(abl, prompts, patterns, [*DISTINCT[:2], ("planted", "without_planted")])
    if mode == "positional":
        assert_prefix_ablation_changes_nothing(abl, prompts)


# --------------------------------------------------------------------------------------------------
# refusal_scores: the shared prefix run once per call


def batch_widths_by_length(ids: list[list[int]], batch_size: int, p: int) -> list[int]:
    """Positions after the prefix p that each batch runs when prompts are batched by token length (each batch
    right-padded to its longest); the prompts must not already be in length order, or this tests nothing."""
    lengths = [len(row) for row in ids]
    assert lengths != sorted(lengths)
    by_length = sorted(lengths)
    return [by_length[min(i + batch_size, len(ids)) - 1] - p for i in range(0, len(ids), batch_size)]


def assert_prefix_path_equals_plain(wrapper: ModelWrapper, prompts: list[str], batch_size: int = 3) -> None:
    """`refusal_scores` with the prompts' shared prefix run once equals whole prompts: with no hook, and under a
    directional ablation of a random direction, which edits every position, the prefix's included. The prefix's
    keys and values computed outside that hook would give other scores: so they are computed inside it."""
    metric = RefusalMetric.from_wrapper(wrapper, METRIC)
    ids = wrapper.encode(prompts)
    p = common_prefix(ids)
    assert 0 < p < min(map(len, ids)) and len({len(row) for row in ids}) > 1  # a prefix to reuse, padded batches
    plain = refusal_scores(wrapper, prompts, batch_size, metric, reuse_prefix=False)
    refusal_scores(wrapper, prompts[:2], batch_size, metric)  # the one-time check, which also computes the prefix
    seen: list[int] = []  # positions block 0 runs, per forward pass
    handle = wrapper._layers[0].register_forward_hook(lambda m, a, o: seen.append(
        (o[0] if isinstance(o, (tuple, list)) else o).shape[1]))
    try:
        cached = refusal_scores(wrapper, prompts, batch_size, metric)
    finally:
        handle.remove()
    assert wrapper.prefix_continues
    # the prefix once, then each batch from the prefix on, prompts batched by length (each batch right-padded to
    # its longest prompt), the scores returned in the given order
    widths = batch_widths_by_length(ids, batch_size, p)
    assert seen[-len(widths) - 1 :] == [p, *widths]
    torch.testing.assert_close(cached, plain, rtol=RTOL, atol=ATOL)

    direction = torch.randn(wrapper.d_model, generator=torch.Generator().manual_seed(0))
    with directional_ablation(wrapper, direction):
        edited_plain = refusal_scores(wrapper, prompts, batch_size, metric, reuse_prefix=False)
        edited = refusal_scores(wrapper, prompts, batch_size, metric)
    torch.testing.assert_close(edited, edited_plain, rtol=RTOL, atol=ATOL)
    assert not torch.allclose(edited_plain, plain, atol=1e-3)  # the ablation moves the scores

    enc = wrapper.tokenize(prompts)
    outside = expand(prefix_cache(wrapper, enc["input_ids"][:1, :p]), len(prompts))
    with directional_ablation(wrapper, direction):
        stale = metric.score(wrapper.last_token_logits(enc["input_ids"][:, p:], enc["attention_mask"], past=outside))
    assert not torch.allclose(stale, edited_plain, atol=1e-3)


def test_refusal_scores_run_the_shared_prefix_once_on_a_random_llama(tiny_llama: ModelWrapper) -> None:
    assert_prefix_path_equals_plain(tiny_llama, prompts_of(7, seed=3))


def test_refusal_scores_run_the_shared_prefix_once_on_a_random_qwen2(tiny_qwen2: ModelWrapper) -> None:
    prompts = prompts_of(7, seed=1)
    assert max(map(len, tiny_qwen2.encode(prompts))) - common_prefix(tiny_qwen2.encode(prompts)) > 4  # > the window
    assert_prefix_path_equals_plain(tiny_qwen2, prompts)


def test_refusal_scores_run_the_shared_prefix_once_on_the_template_model(tmp_path: Path) -> None:
    wrapper = ModelWrapper(ModelConfig(name=str(make_template_model(tmp_path / "model")), device="cpu",
                                       dtype="float32"))
    assert_prefix_path_equals_plain(wrapper, [s.prompt for s in planted_prompts(4)["evaluation"]])


def test_refusal_scores_fall_back_to_whole_prompts_once_with_a_notice(tiny_llama: ModelWrapper, caplog,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache that cannot be continued, or whose continuation changes the logits: one line, then whole prompts."""
    wrapper, prompts = tiny_llama, prompts_of(5, seed=4)
    metric = RefusalMetric.from_wrapper(wrapper, METRIC)
    plain = refusal_scores(wrapper, prompts, 2, metric, reuse_prefix=False)
    original = prefix.prefix_cache

    def no_cache(model: ModelWrapper, ids: torch.Tensor) -> None:
        raise NotImplementedError("no cache here")

    for broken, notice in ((no_cache, "cannot be continued (no cache here)"),
                           (lambda model, ids: original(model, ids.flip(1)), "changes its logits")):  # another prefix's
        monkeypatch.setattr(wrapper, "prefix_continues", None)
        monkeypatch.setattr(prefix, "prefix_cache", broken)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="refusal_sae.prefix"):
            for _ in range(2):
                torch.testing.assert_close(refusal_scores(wrapper, prompts, 2, metric), plain)
        (record,) = caplog.records
        assert record.message.startswith("refusal metric: ") and notice in record.message
        assert "it runs whole prompts" in record.message
        assert wrapper.prefix_continues is False


# --------------------------------------------------------------------------------------------------
# attribution: the shared prefix's keys and values once, gradients through the positions after it


def assert_attribution_reuses_the_prefix(wrapper: ModelWrapper, saes: Mapping[str, SparseAutoencoder], means,
                                         prompts: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Patching and integrated-gradient node scores with the prefix run once equal those of whole prompts,
    and the batches really ran only the positions after it."""
    metric = RefusalMetric.from_wrapper(wrapper, METRIC)
    weights = np.linspace(-1.0, 1.0, len(prompts))
    ids, p = wrapper.encode(prompts), means.scheme.prefix
    assert p > 0 and common_prefix(ids) >= p
    for estimate in ("patching", "ig"):
        monkeypatch.setattr(wrapper, "prefix_continues", None)
        seen: list[int] = []
        handle = wrapper._layers[0].register_forward_hook(lambda m, a, o: seen.append(
            (o[0] if isinstance(o, (tuple, list)) else o).shape[1]))
        try:
            cached = attribution_scores(wrapper, saes, means, metric, prompts, weights, estimate=estimate, steps=2,
                                        batch_size=3)
        finally:
            handle.remove()
        assert wrapper.prefix_continues
        widths = batch_widths_by_length(ids, 3, p)
        runs = 1 if estimate == "patching" else 2 * len(saes)  # forward passes per batch
        assert seen[-len(widths) * runs :] == [w for w in widths for _ in range(runs)]
        monkeypatch.setattr(wrapper, "prefix_continues", False)  # whole prompts
        plain = attribution_scores(wrapper, saes, means, metric, prompts, weights, estimate=estimate, steps=2,
                                   batch_size=3)
        for layer in saes:
            assert np.abs(plain.signed[layer]).max() > 0
            np.testing.assert_allclose(cached.signed[layer], plain.signed[layer], rtol=1e-4, atol=1e-6)


def test_attribution_runs_the_shared_prefix_once_on_a_random_qwen2(tiny_qwen2: ModelWrapper, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    saes = random_saes(tiny_qwen2, ["residuals_1", "residuals_2"], seed=3)
    means = node_means(tiny_qwen2, saes, prompts_of(12, seed=5), "positional", tmp_path)
    assert_attribution_reuses_the_prefix(tiny_qwen2, saes, means, prompts_of(7, seed=2), monkeypatch)


def test_attribution_runs_the_shared_prefix_once_on_the_template_model(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    wrapper = ModelWrapper(ModelConfig(name=str(make_template_model(tmp_path / "model")), device="cpu",
                                       dtype="float32"))
    saes = exact_saes()
    splits = planted_prompts(12)
    means = node_means(wrapper, saes, [s.prompt for s in splits["discovery"]], "positional", tmp_path / "cache")
    assert_attribution_reuses_the_prefix(wrapper, saes, means, [s.prompt for s in splits["evaluation"]][:7],
                                         monkeypatch)


# --------------------------------------------------------------------------------------------------
# generation: pads between the prefix and the rest, the prefix's keys and values once


def assert_greedy_answers_reuse_the_prefix(wrapper: ModelWrapper) -> None:
    """Batched greedy answers with the prefix's keys and values computed once equal those of whole prompts, and
    each batch's first step ran only its rows after the prefix (left-padded to the longest)."""
    prompts = prompts_of(7, seed=6)
    ids = wrapper.encode(prompts)
    p = common_prefix(ids)
    assert p > 0 and len({len(row) for row in ids}) > 1  # a prefix to reuse, rows of several lengths
    whole = generate_answers(wrapper, prompts, max_new_tokens=6, batch_size=3, reuse_prefix=False)
    seen: list[int] = []  # positions block 0 runs, per forward pass
    handle = wrapper._layers[0].register_forward_hook(lambda m, a, o: seen.append(
        (o[0] if isinstance(o, (tuple, list)) else o).shape[1]))
    try:
        cached = generate_answers(wrapper, prompts, max_new_tokens=6, batch_size=3)
    finally:
        handle.remove()
    assert cached == whole and any(cached)
    assert wrapper.prefix_continues
    firsts = [max(map(len, ids[i : i + 3])) - p for i in range(0, len(ids), 3)]
    assert seen[0] == p and [n for n in seen if n > 1][-len(firsts):] == firsts


def test_greedy_answers_run_the_shared_prefix_once_on_a_random_llama(tiny_llama: ModelWrapper) -> None:
    assert_greedy_answers_reuse_the_prefix(tiny_llama)


def test_greedy_answers_run_the_shared_prefix_once_on_a_random_qwen2(tiny_qwen2: ModelWrapper) -> None:
    assert_greedy_answers_reuse_the_prefix(tiny_qwen2)


def test_node_edits_in_generation_cover_every_position_after_the_template(tiny_llama: ModelWrapper,
                                                                          tmp_path: Path) -> None:
    """Under a node edit only the template prefix may run once: one prompt alone shares its whole start with
    itself, and its content must still be edited. Batched, single and whole-prompt answers and likelihoods agree
    with every content latent of a random Llama's SAEs mean-ablated."""
    wrapper = tiny_llama
    saes = random_saes(wrapper, ["residuals_1", "residuals_2"], seed=5)
    means = node_means(wrapper, saes, prompts_of(12, seed=7), "positional", tmp_path)
    abl = Ablator(wrapper, saes, means, RefusalMetric.from_wrapper(wrapper, METRIC), 4)
    content = {layer: np.zeros((len(means.scheme.node_classes), saes[layer].cfg.width + 1), bool) for layer in saes}
    for m in content.values():
        m[means.scheme.node_classes.index("content"), :-1] = True
    nodes = candidate_mask({layer: np.ones_like(m[:, :-1]) for layer, m in content.items()}, errors=False)
    edits = {layer: abl.edit(layer, keep) for layer, keep in abl.variant(content, nodes, inside=False).items()}
    prompts = prompts_of(4, seed=8)
    plain = generate(wrapper, prompts, 4, 4).tokens
    edited = generate(wrapper, prompts, 4, 4, scheme=means.scheme, edits=edits)
    alone = [generate(wrapper, [p], 4, 1, scheme=means.scheme, edits=edits).tokens[0] for p in prompts]
    whole = generate(wrapper, prompts, 4, 4, scheme=means.scheme, edits=edits, reuse_prefix=False)
    assert edited.tokens == alone == whole.tokens and edited.tokens != plain
    batched = answer_log_likelihood(wrapper, prompts, plain, 4, scheme=means.scheme, edits=edits)
    single = [answer_log_likelihood(wrapper, [p], [a], 1, scheme=means.scheme, edits=edits)[0]
              for p, a in zip(prompts, plain)]
    np.testing.assert_allclose(single, batched, rtol=1e-4)
    assert not np.allclose(batched, answer_log_likelihood(wrapper, prompts, plain, 4), rtol=1e-3)
