"""Generation under edits on the planted template model, whose refusal token is produced through a planted
circuit: the planted latents at the generation position ("-1") of both SAE layers.

The model answers a toxic prompt (trigger words) with the refusal word at every step: each new position's
uniform attention reads the prompt's triggers again. It answers a safe prompt with a compliance word, whose logit
a constant direction of every residual writes (added to the planted model's head here). The nodes' ablation
value is their mean over safe prompts, the ones the model answers (so an ablated planted latent is 0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from refusal_sae.ablation import Ablator
from refusal_sae.activations import ActivationConfig, InferencePipeline, PromptActivations
from refusal_sae.circuits import candidate_mask, random_mask
from refusal_sae.features import encode_prompts
from refusal_sae.generation import answer_log_likelihood, generate
from refusal_sae.metric import RefusalMetric
from refusal_sae.model import ModelConfig, ModelWrapper
from refusal_sae.positions import position_scheme
from tests.conftest import single_thread
from tests.planted import (
    COMPLIANCE_WORD,
    LAYERS,
    METRIC,
    PLANTED,
    REFUSAL_WORD,
    basis,
    exact_saes,
    make_template_model,
    planted_prompts,
)

pytestmark = pytest.mark.usefixtures("one_thread")
NEW = 5


def make_answering_model(directory: Path) -> Path:
    """The template model, its head also writing the compliance word from the massive direction every token
    carries: below the refusal word's logit on toxic prompts, above it where the planted direction is 0."""
    make_template_model(directory)
    path = directory / "model.safetensors"
    weights = load_file(path)
    from tests.tiny_model import make_tiny_tokenizer

    how = make_tiny_tokenizer().convert_tokens_to_ids(COMPLIANCE_WORD)
    weights["lm_head.weight"][how] = 0.1 * basis()[-1]
    save_file(weights, path, metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("generation")
    with single_thread():
        wrapper = ModelWrapper(ModelConfig(name=str(make_answering_model(root / "model")), device="cpu",
                                           dtype="float32"))
        splits = planted_prompts(12, categories=("alpha",))
        safe = {"discovery": [s for s in splits["discovery"] if not s.refusal_label]}
        cache = InferencePipeline(wrapper, ActivationConfig(layers=LAYERS, shard_size=64), root / "cache").run(safe)
        scheme = position_scheme(wrapper, splits["discovery"] + splits["evaluation"], "positional")
        means = encode_prompts(exact_saes(), PromptActivations(cache, ["discovery"]), scheme).means
        ablator = Ablator(wrapper, exact_saes(), means, RefusalMetric.from_wrapper(wrapper, METRIC), 4)
    toxic = [s.prompt for s in splits["evaluation"] if s.refusal_label]
    safe_prompts = [s.prompt for s in splits["evaluation"] if not s.refusal_label]
    return wrapper, scheme, ablator, toxic, safe_prompts


def planted_mask(ablator: Ablator) -> dict[str, np.ndarray]:
    out = {layer: np.zeros(ablator.node_index(layer).shape, bool) for layer in LAYERS}
    for m in out.values():
        m[ablator.scheme.node_classes.index("-1"), PLANTED] = True
    return out


def all_latents(ablator: Ablator) -> dict[str, np.ndarray]:
    return candidate_mask({layer: np.ones(ablator.node_index(layer).shape[0:1] + (ablator.width(layer),), bool)
                           for layer in LAYERS}, errors=False)


def under(ablator: Ablator, variant) -> dict:
    return {layer: ablator.edit(layer, keep) for layer, keep in variant.items()}


def words(wrapper: ModelWrapper, tokens: list[int]) -> list[str]:
    return wrapper.tokenizer.convert_ids_to_tokens(tokens)


def test_ablating_the_planted_circuit_flips_the_answer_and_a_random_circuit_does_not(setup) -> None:
    wrapper, scheme, ablator, toxic, safe = setup
    plain = generate(wrapper, toxic, NEW, 3)
    assert all(words(wrapper, t) == [REFUSAL_WORD] * NEW for t in plain.tokens)
    assert all(words(wrapper, t)[0] == COMPLIANCE_WORD for t in generate(wrapper, safe, NEW, 3).tokens)

    candidates = all_latents(ablator)
    circuit = planted_mask(ablator)
    ablated = under(ablator, ablator.variant(circuit, candidates, inside=False))  # M \ C
    prompt_only = generate(wrapper, toxic, NEW, 3, scheme=scheme, edits=ablated)
    everywhere = generate(wrapper, toxic, NEW, 3, scheme=scheme, edits=ablated, edit_generated=True)
    # at the prompt only: the first word is the compliance word, then each new position reads the prompt's
    # triggers through attention, unedited, and refuses again; at every generated token too: never again
    assert all(words(wrapper, t) == [COMPLIANCE_WORD] + [REFUSAL_WORD] * (NEW - 1) for t in prompt_only.tokens)
    assert all(words(wrapper, t) == [COMPLIANCE_WORD] * NEW for t in everywhere.tokens)

    rng = np.random.default_rng(0)
    outside = {layer: candidates[layer] & ~circuit[layer] for layer in LAYERS}
    for _ in range(3):  # random circuits of the planted circuit's shape (3 latents per layer at "-1")
        random = random_mask(circuit, outside, rng)
        assert not any((random[layer] & circuit[layer]).any() for layer in LAYERS)
        edits = under(ablator, ablator.variant(random, candidates, inside=False))
        assert generate(wrapper, toxic, NEW, 3, scheme=scheme, edits=edits, edit_generated=True).tokens == plain.tokens

    kept = under(ablator, ablator.variant(circuit, candidates))  # only the circuit kept: C
    assert generate(wrapper, toxic, NEW, 3, scheme=scheme, edits=kept, edit_generated=True).tokens == plain.tokens


def test_steering_the_circuit_scales_the_refusal(setup) -> None:
    wrapper, scheme, ablator, toxic, safe = setup
    circuit = planted_mask(ablator)
    plain = generate(wrapper, toxic + safe, NEW, 4)
    for strength, first in ((0.0, COMPLIANCE_WORD), (1.0, None)):
        edits = {layer: ablator.scale(layer, circuit[layer], strength) for layer in LAYERS}
        got = generate(wrapper, toxic, NEW, 4, scheme=scheme, edits=edits, edit_generated=True)
        if first is None:  # strength 1 changes nothing
            assert got.tokens == plain.tokens[: len(toxic)]
        else:
            assert all(words(wrapper, t) == [first] * NEW for t in got.tokens)


def test_edited_batches_equal_one_prompt_at_a_time_and_whole_prompts(setup) -> None:
    wrapper, scheme, ablator, toxic, safe = setup
    prompts = toxic[:3] + safe[:3]
    lengths = [len(row) for row in wrapper.encode(prompts)]
    assert lengths != sorted(lengths)  # generation batches them by length: answers must come back in this order
    edits = under(ablator, ablator.variant(planted_mask(ablator), all_latents(ablator), inside=False))
    batched = generate(wrapper, prompts, NEW, 4, scheme=scheme, edits=edits)
    # one prompt shares its whole start with itself: the prefix run once must still be the template's only
    alone = [generate(wrapper, [p], NEW, 1, scheme=scheme, edits=edits).tokens[0] for p in prompts]
    whole = generate(wrapper, prompts, NEW, 4, scheme=scheme, edits=edits, reuse_prefix=False)
    assert batched.tokens == alone == whole.tokens


def test_answer_likelihood_is_teacher_forcing_and_sees_the_edit(setup) -> None:
    wrapper, scheme, ablator, toxic, safe = setup
    prompts = toxic[:2] + safe[:2]
    answers = generate(wrapper, prompts, NEW, 4).tokens
    plain = answer_log_likelihood(wrapper, prompts, answers, 3)
    for prompt, answer, got in zip(prompts, answers, plain):  # by hand: the whole sequence in one forward
        ids = torch.tensor([wrapper.encode([prompt])[0] + answer])
        logits = wrapper.model(input_ids=ids).logits[0].float()
        logp = torch.log_softmax(logits[-len(answer) - 1 : -1], -1).gather(-1, ids[0, -len(answer):, None])
        assert got == pytest.approx(float(logp.mean()), abs=1e-5)
    edits = under(ablator, ablator.variant(planted_mask(ablator), all_latents(ablator), inside=False))
    prompt_only = answer_log_likelihood(wrapper, prompts, answers, 3, scheme=scheme, edits=edits)
    everywhere = answer_log_likelihood(wrapper, prompts, answers, 3, scheme=scheme, edits=edits, edit_generated=True)
    # the toxic answers (refusal words) lose likelihood when the circuit is ablated, more so at every token;
    # the safe answers do not depend on the planted latents
    assert (everywhere[:2] < prompt_only[:2]).all() and (prompt_only[:2] < plain[:2]).all()
    np.testing.assert_allclose(everywhere[2:], plain[2:], atol=1e-5)
    assert np.isnan(answer_log_likelihood(wrapper, prompts[:1], [[]], 1))[0]
    for i in range(2):  # one prompt at a time (its whole start shared with itself), one answer token
        one = answer_log_likelihood(wrapper, prompts[i : i + 1], [answers[i][:1]], 1, scheme=scheme, edits=edits)
        whole = answer_log_likelihood(wrapper, prompts, [a[:1] for a in answers], 4, scheme=scheme, edits=edits)
        assert one[0] == pytest.approx(whole[i], abs=1e-5)


def test_counterfactual_values_are_each_prompts_class_means_and_patch_its_answer(setup, tmp_path: Path) -> None:
    """`prompt_values` holds each prompt's node values per class (what discovery's per-prompt node values are);
    patched into a toxic prompt, the planted circuit's values of a safe prompt remove the refusal at every token
    and those of another toxic prompt keep it."""
    wrapper, scheme, ablator, toxic, safe = setup
    prompts = toxic[:2] + safe[:2]
    values = ablator.prompt_values(prompts)
    n_class = len(scheme.mean_classes)
    samples = {s.prompt: s for s in planted_prompts(12, categories=("alpha",))["evaluation"]}
    cache = InferencePipeline(wrapper, ActivationConfig(layers=LAYERS, shard_size=64), tmp_path / "cache").run(
        {"discovery": [samples[p] for p in prompts]})
    features = encode_prompts(exact_saes(), PromptActivations(cache, ["discovery"]), scheme)
    assert list(features.prompt_index) == list(range(len(prompts)))
    for layer in LAYERS:  # the node classes' latents: discovery's per-prompt node values
        table = values[layer][0].reshape(len(prompts), n_class, -1)[:, scheme.prefix:]
        np.testing.assert_allclose(table.numpy(), features.values[layer][..., :-1], atol=1e-5)

    circuit = planted_mask(ablator)
    variant = ablator.variant(circuit, all_latents(ablator), inside=False)
    donors = {"safe": [2, 3, 2], "toxic": [1, 0, 1]}  # a donor prompt's row of `values` for each edited prompt
    for donor, rows in donors.items():
        edits = {layer: ablator.edit(layer, keep, values[layer]) for layer, keep in variant.items()}
        got = generate(wrapper, toxic[:3], NEW, 3, scheme=scheme, edits=edits, edit_generated=True,
                       class_offsets=[r * n_class for r in rows])
        want = [COMPLIANCE_WORD] * NEW if donor == "safe" else [REFUSAL_WORD] * NEW
        assert all(words(wrapper, t) == want for t in got.tokens), donor
