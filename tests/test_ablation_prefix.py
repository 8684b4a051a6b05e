"""The cached-prefix evaluation of ablations (`AblationConfig.prefix_cache`) equals the full-model one.

With the cache on, `Ablator` runs the blocks up to the first SAE layer once per prompt list and every
variant from there (`ModelWrapper.suffix_last_token_logits`); these tests compare it with running the
whole model per variant, on a tiny random Llama, the planted model of `tests/planted.py` and a tiny
random Qwen2 (the default model's architecture), sliding-window layers included.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from refusal_sae.ablation import AblationConfig, Ablator, Keep, evaluate_sweep
from refusal_sae.circuits import ERROR, Circuit, Node
from refusal_sae.metric import RefusalMetric
from refusal_sae.model import ModelConfig, ModelWrapper
from refusal_sae.sae import SAEConfig, SparseAutoencoder
from tests.planted import LAYERS, METRIC, PLANTED, exact_saes, make_planted_model, planted_prompts
from tests.tiny_model import make_tiny_model, make_tiny_tokenizer, sample_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL, ATOL = 1e-5, 1e-5


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


def random_parts(wrapper: ModelWrapper, layers: list[str], width: int = 64, k: int = 8, seed: int = 0):
    """Seeded random SAEs and random feature / error means at `layers`."""
    g = torch.Generator().manual_seed(seed)
    saes, feature_means, error_means = {}, {}, {}
    for i, layer in enumerate(layers):
        torch.manual_seed(seed + i)
        saes[layer] = SparseAutoencoder(SAEConfig(d_in=wrapper.d_model, num_latents=width, k=k))
        feature_means[layer] = torch.rand(width, generator=g).numpy()
        error_means[layer] = torch.randn(wrapper.d_model, generator=g).numpy()
    return saes, feature_means, error_means


def ablators(wrapper, saes, feature_means, error_means, metric, **kwargs) -> tuple[Ablator, Ablator]:
    """(cached prefix, whole model per variant), otherwise the same."""
    return tuple(
        Ablator(wrapper, saes, feature_means, error_means, metric, AblationConfig(prefix_cache=cache, **kwargs))
        for cache in (True, False)
    )


def keep_patterns(abl: Ablator, seed: int = 0) -> dict[str, dict[str, Keep] | None]:
    """None, everything ablated, random subsets (with and without the error), one layer edited only."""
    rng = np.random.default_rng(seed)
    first, *deeper = abl.layers

    def random_keep(error: bool) -> dict[str, Keep]:
        return {layer: Keep(torch.as_tensor(rng.random(sae.cfg.width) < 0.5), error)
                for layer, sae in abl.saes.items()}

    nothing = abl.keep_nothing()
    return {
        "none": None,
        "nothing": nothing,
        "random": random_keep(False),
        "random_errors_kept": random_keep(True),
        "first_layer_only": {first: nothing[first]},
        "deeper_layers_only": {layer: nothing[layer] for layer in deeper},
    }


def assert_same_scores(cached: Ablator, full: Ablator, prompts: list[str], patterns) -> dict[str, torch.Tensor]:
    results = {}
    for name, keep in patterns.items():
        a, b = cached.scores(prompts, keep), full.scores(prompts, keep)
        assert a.shape == b.shape == (len(prompts),)
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m, name=name: f"{name}: {m}")
        results[name] = b
    return results


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


def test_prefix_cache_equals_whole_model_on_a_random_llama(tiny_llama: ModelWrapper) -> None:
    wrapper = tiny_llama
    metric = RefusalMetric.from_wrapper(wrapper, METRIC)
    parts = random_parts(wrapper, ["residuals_2", "residuals_1"])  # not in depth order on purpose
    prompts = prompts_of(11)
    cached, full = ablators(wrapper, *parts, metric, batch_size=4)
    assert cached.first_layer == "residuals_1"
    results = assert_same_scores(cached, full, prompts, keep_patterns(cached))
    # the patterns really do differ, so equality is not trivial
    assert not torch.allclose(results["none"], results["nothing"], atol=1e-3)
    assert not torch.allclose(results["nothing"], results["random"], atol=1e-3)
    assert not torch.allclose(results["first_layer_only"], results["deeper_layers_only"], atol=1e-3)

    cached_e, full_e = ablators(wrapper, *parts, metric, batch_size=4, keep_errors=True)
    assert_same_scores(cached_e, full_e, prompts, {"nothing": cached_e.keep_nothing(),
                                                   "circuit": cached_e.keep_circuit([Node("residuals_1", 3, 1.0)])})


def test_prefix_is_computed_once_per_prompt_list(tiny_llama: ModelWrapper, monkeypatch: pytest.MonkeyPatch) -> None:
    wrapper = tiny_llama
    metric = RefusalMetric.from_wrapper(wrapper, METRIC)
    cached, _ = ablators(wrapper, *random_parts(wrapper, ["residuals_1", "residuals_2"]), metric, batch_size=3)
    calls = []
    original = wrapper.residuals
    monkeypatch.setattr(wrapper, "residuals", lambda *a, **k: calls.append(a[2]) or original(*a, **k))
    prompts = prompts_of(7)
    for keep in (None, cached.keep_nothing(), None):
        cached.scores(prompts, keep)
    assert calls == [["residuals_1"]] * 3  # 3 batches, once
    cached.scores(prompts[:2])
    assert len(calls) == 4
    for i in range(Ablator.PREFIX_CACHE_SIZE + 2):
        cached.scores(prompts[i : i + 1])
    assert len(cached._prefix) == Ablator.PREFIX_CACHE_SIZE
    assert cached.scores([]).shape == (0,)


def test_prefix_cache_equals_whole_model_on_a_random_qwen2(tiny_qwen2: ModelWrapper) -> None:
    wrapper = tiny_qwen2
    metric = RefusalMetric.from_wrapper(wrapper, METRIC)
    enc = wrapper.tokenize(prompts_of(4, seed=1), "right")
    assert int(enc["attention_mask"].sum(1).max()) > 8  # longer than the sliding window
    full_logits = wrapper.last_token_logits(enc["input_ids"], enc["attention_mask"])
    for layer, hidden in wrapper.residuals(enc["input_ids"], enc["attention_mask"], wrapper.layer_names).items():
        torch.testing.assert_close(wrapper.suffix_last_token_logits(hidden, enc["attention_mask"], layer), full_logits,
                                   rtol=RTOL, atol=ATOL)
    parts = random_parts(wrapper, ["residuals_1", "residuals_2"], seed=3)
    cached, full = ablators(wrapper, *parts, metric, batch_size=4)
    results = assert_same_scores(cached, full, prompts_of(9, seed=2), keep_patterns(cached, seed=1))
    assert not torch.allclose(results["none"], results["nothing"], atol=1e-3)
    cached_e, full_e = ablators(wrapper, *parts, metric, batch_size=4, keep_errors=True)
    assert_same_scores(cached_e, full_e, prompts_of(9, seed=2), {"nothing": cached_e.keep_nothing()})


def _assert_close_tree(a, b, path: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_close_tree(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close_tree(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_prefix_cache_equals_whole_model_on_the_planted_model(tmp_path: Path) -> None:
    wrapper = ModelWrapper(ModelConfig(name=str(make_planted_model(tmp_path / "model")), device="cpu",
                                       dtype="float32"))
    saes = exact_saes()
    samples = planted_prompts(12)["evaluation"]
    prompts, positive = [s.prompt for s in samples], np.array([s.refusal_label for s in samples])
    enc = wrapper.tokenize(prompts[:8], "right")
    residuals = wrapper.residuals(enc["input_ids"], enc["attention_mask"], LAYERS)
    mask = enc["attention_mask"].bool()
    feature_means = {layer: saes[layer].encode(residuals[layer][mask].float()).mean(0).detach().numpy()
                     for layer in LAYERS}
    error_means = {layer: np.zeros(wrapper.d_model, dtype=np.float32) for layer in LAYERS}
    metric = RefusalMetric.from_wrapper(wrapper, METRIC)
    cached, full = ablators(wrapper, saes, feature_means, error_means, metric, batch_size=5)

    planted = [Node(layer, j, 1.0) for layer in LAYERS for j in PLANTED]
    patterns = {**keep_patterns(cached, seed=4), "circuit": cached.keep_circuit(planted),
                "complement": cached.keep_complement(planted)}
    results = assert_same_scores(cached, full, prompts, patterns)
    assert not torch.allclose(results["circuit"], results["complement"], atol=1e-3)

    circuit = Circuit(samples[0].category, "all", "correlation", LAYERS, planted)
    smaller = planted[:2] + [Node(LAYERS[1], ERROR, 1.0)]
    sweep = [circuit, Circuit(circuit.category, "all", "correlation", LAYERS, smaller, threshold=0.9)]
    candidates = {layer: np.arange(saes[layer].cfg.width) for layer in LAYERS}
    _assert_close_tree(evaluate_sweep(cached, prompts, positive, circuit, sweep, candidates),
                       evaluate_sweep(full, prompts, positive, circuit, sweep, candidates))
