"""A tiny Llama whose refusal score is driven by a known set of SAE features, by construction.

The model (built in the test, exact maths):

* every token embedding is MASSIVE * m (a shared direction that dominates the RMS norm, so the norms
  downstream are nearly constant and the score nearly linear) plus STRENGTH along three directions:
  the planted directions p_i for TRIGGER words, three random "neutral" directions with random signs
  for every other word (every embedding has the same norm, so m's share is the same in every token);
* block 0's attention is uniform over the prefix (q = k = 0) and copies its normalised input
  (v = o = identity); its MLP writes nothing. Block 1 writes nothing (an identity block);
* the head reads refusal - compliance = GAIN * sum_i p_i . norm(x) at the last position.

So the residual stream after either block, at the generation position, holds the prefix mean of the
trigger embeddings along the planted directions, and only those directions move the score. The SAE of
both layers is exact: latents +b_j and -b_j for every basis vector b_j, k = d_model, so a planted
direction is exactly one latent per layer. Toxic prompts contain trigger words, safe prompts none.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from refusal_sae.circuits import Node
from refusal_sae.data import PromptSample
from refusal_sae.metric import RefusalMetricConfig
from refusal_sae.sae import SAEConfig, SAEMeta, SparseAutoencoder
from tests.tiny_model import make_tiny_model, make_tiny_tokenizer

D_MODEL = 32
LAYERS = ["residuals_0", "residuals_1"]
PLANTED = [0, 1, 2]  # basis directions that drive the score; latent j is +b_j
MASSIVE, STRENGTH, GAIN = 8.0, 2.0, 6.0
REFUSAL_WORD, COMPLIANCE_WORD = "not", "how"
METRIC = RefusalMetricConfig(refusal_openers=[REFUSAL_WORD], compliance_openers=[COMPLIANCE_WORD],
                             space_variants=False, compliance_mode="openers")
"""The head writes the refusal minus the compliance logit, which the 'openers' score reads exactly (the default
'not_refusal' would read it through the softmax over the whole vocabulary)."""


def basis() -> torch.Tensor:
    """Orthonormal rows b_j; b_{d-1} is the massive direction m. The standard basis, so that a planted
    coordinate of a neutral token is exactly 0 in floating point (a rotated basis would leave rounding
    noise there that the -b_j latents would pick up as a spurious, label-correlated signal)."""
    return torch.eye(D_MODEL)


def signed_coordinates(coordinates: list[int], g: torch.Generator) -> torch.Tensor:
    """A neutral word's direction: as many of `coordinates` as there are planted directions, with random signs
    (the norm of a planted trigger's direction)."""
    chosen = torch.tensor(coordinates)[torch.randperm(len(coordinates), generator=g)[: len(PLANTED)]]
    signs = torch.randint(0, 2, (len(PLANTED),), generator=g) * 2.0 - 1
    return (signs[:, None] * basis()[chosen]).sum(0)


def vocabulary() -> tuple[list[str], list[str]]:
    """(trigger words, neutral words) from the tiny tokenizer's vocabulary."""
    words = [w for w in make_tiny_tokenizer().get_vocab() if w.isalpha() and w not in (REFUSAL_WORD, COMPLIANCE_WORD)]
    words.sort()
    return words[:6], words[6:200]


def make_planted_model(directory: Path, seed: int = 0) -> Path:
    from transformers import LlamaForCausalLM

    make_tiny_model(directory, n_layers=2, d_model=D_MODEL, n_heads=4, n_kv_heads=4, seed=seed)
    model = LlamaForCausalLM.from_pretrained(directory)
    tokenizer = make_tiny_tokenizer()
    b = basis()
    planted = b[PLANTED].sum(0)
    neutral = list(range(len(PLANTED), D_MODEL - 1))
    g = torch.Generator().manual_seed(seed + 1)
    triggers, _ = vocabulary()
    trigger_ids = set(tokenizer.convert_tokens_to_ids(triggers))
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        for i in range(emb.shape[0]):
            if i in trigger_ids:
                direction = planted
            else:
                direction = signed_coordinates(neutral, g)
            emb[i] = MASSIVE * b[-1] + STRENGTH * direction
        attn0 = model.model.layers[0].self_attn
        for proj in (attn0.q_proj, attn0.k_proj):
            proj.weight.zero_()
        attn0.v_proj.weight.copy_(torch.eye(D_MODEL))
        attn0.o_proj.weight.copy_(torch.eye(D_MODEL))
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
        head = model.lm_head.weight
        head.zero_()
        head[tokenizer.convert_tokens_to_ids(REFUSAL_WORD)] = GAIN * planted
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def exact_saes() -> dict[str, SparseAutoencoder]:
    """Per layer an SAE with latents +b_j (index j) and -b_j (index d + j): decode(encode(x)) == x."""
    b = basis()
    saes = {}
    for layer in LAYERS:
        sae = SparseAutoencoder(SAEConfig(d_in=D_MODEL, num_latents=2 * D_MODEL, k=D_MODEL), SAEMeta(layer=layer))
        with torch.no_grad():
            sae.W_dec.copy_(torch.cat([b, -b]))
            sae.b_dec.zero_()
            sae.encoder.weight.copy_(torch.cat([b, -b]))
            sae.encoder.bias.zero_()
        saes[layer] = sae.eval()
    return saes


def planted_nodes(position: str = "-1") -> set[str]:
    """The planted latents at one position class: the head reads the last position ("-1"), and block 1
    writes nothing, so content and earlier suffix positions move no score."""
    return {Node(layer, j, position).name for layer in LAYERS for j in PLANTED}


def planted_prompts(n_per_label: int, categories: tuple[str, ...] = ("alpha", "beta"), seed: int = 0,
                    triggers: Mapping[str, Sequence[str]] | None = None, same_length: bool = False):
    """{split: samples}: toxic prompts hold 1-2 trigger words (of their category's, with `triggers`; else of
    all of them) among 5-8 neutral words, safe ones none. With `same_length` the triggers replace neutral
    words instead of joining them, so toxic and safe prompts have the same lengths."""
    rng = random.Random(seed)
    every, neutral = vocabulary()
    samples = []
    for category in categories:
        pool = list(triggers[category]) if triggers else every
        for toxic in (True, False):
            for _ in range(n_per_label):
                words = rng.choices(neutral, k=rng.randint(5, 8))
                if toxic:
                    for w in rng.sample(pool, rng.randint(1, 2)):
                        if same_length:
                            words[rng.randrange(len(words))] = w
                        else:
                            words.insert(rng.randrange(len(words) + 1), w)
                samples.append(PromptSample(" ".join(words), category, toxic, "toxic" if toxic else "hard", "planted"))
    rng.shuffle(samples)
    cut = len(samples) // 2
    return {"discovery": samples[:cut], "evaluation": samples[cut:]}


DECOY = D_MODEL - 2  # basis direction (and +latent index) of the decoy; b_{d-1} is the massive direction


def make_decoy_model(directory: Path, seed: int = 0) -> Path:
    """The planted model, except that trigger words ALSO write STRENGTH along a decoy direction b_DECOY
    that no other word uses and nothing downstream reads (the lm_head rows are zero there).

    The decoy latent (+b_DECOY, index DECOY at both layers) is then as correlated with the label as a
    planted one, but has no causal role: ablating it changes the score only through the RMS norms (a
    trigger token's norm grows slightly), a second-order effect. Neutral words draw their three signed
    coordinates from the directions other than the planted, decoy and massive ones, so every neutral
    embedding keeps the planted model's norm; a trigger's is sqrt(MASSIVE^2 + 4 STRENGTH^2).
    """
    from transformers import LlamaForCausalLM

    make_planted_model(directory, seed)
    model = LlamaForCausalLM.from_pretrained(directory)
    tokenizer = make_tiny_tokenizer()
    b = basis()
    neutral = [j for j in range(len(PLANTED), D_MODEL - 1) if j != DECOY]
    g = torch.Generator().manual_seed(seed + 2)
    trigger_ids = set(tokenizer.convert_tokens_to_ids(vocabulary()[0]))
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        for i in range(emb.shape[0]):
            if i in trigger_ids:
                direction = b[PLANTED].sum(0) + b[DECOY]
            else:
                direction = signed_coordinates(neutral, g)
            emb[i] = MASSIVE * b[-1] + STRENGTH * direction
    model.save_pretrained(directory, safe_serialization=True)
    return directory


SINK, SINK_NORM = D_MODEL - 3, 300.0
"""Basis direction and norm of the template model's attention-sink token (bos)."""
TEMPLATE = D_MODEL - 4
"""Basis direction only the template's last token (<|assistant|>) writes, and attention never moves: its
latent fires at the last position only, with the same value in every prompt."""


def make_template_model(directory: Path, seed: int = 0) -> Path:
    """The planted model with a massive-norm attention sink: bos, the first token of the shared chat-template
    prefix, embeds as SINK_NORM * b_SINK (Qwen's first token has norm ~2,300 in the residual stream).

    The prompt is "<s> <|user|> {content} </s> <|assistant|>": a 2-token shared prefix, the content and a
    2-token shared suffix; block 0's uniform attention makes every suffix position read the content's
    trigger words, and the head reads the last one. Averaging b_SINK's latent over all tokens (a global
    mean) puts ~SINK_NORM / length of it at the last position, which through the final RMS norm shrinks
    the score; a mean per position class leaves it where it is. <|assistant|> also writes STRENGTH along
    b_TEMPLATE, which block 0's value projection drops (a template-only latent). Neutral words avoid
    b_SINK and b_TEMPLATE.
    """
    from transformers import LlamaForCausalLM

    make_planted_model(directory, seed)
    model = LlamaForCausalLM.from_pretrained(directory)
    tokenizer = make_tiny_tokenizer()
    b = basis()
    neutral = [j for j in range(len(PLANTED), D_MODEL - 1) if j not in (SINK, TEMPLATE)]
    g = torch.Generator().manual_seed(seed + 3)
    trigger_ids = set(tokenizer.convert_tokens_to_ids(vocabulary()[0]))
    bos, assistant = tokenizer.convert_tokens_to_ids(["<s>", "<|assistant|>"])
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        for i in range(emb.shape[0]):
            if i == bos:
                emb[i] = SINK_NORM * b[SINK]
            elif i not in trigger_ids:
                emb[i] = MASSIVE * b[-1] + STRENGTH * signed_coordinates(neutral, g)
        emb[assistant] += STRENGTH * b[TEMPLATE]
        model.model.layers[0].self_attn.v_proj.weight[TEMPLATE, TEMPLATE] = 0.0
    model.save_pretrained(directory, safe_serialization=True)
    return directory


UNUSED = list(range(D_MODEL - 5, D_MODEL - 1))
"""Basis directions of the category model that no token writes and nothing reads."""


def category_triggers() -> dict[str, list[str]]:
    """The trigger words of the category model's two categories: three each, disjoint."""
    triggers, _ = vocabulary()
    return {"alpha": triggers[:3], "beta": triggers[3:]}


def make_category_model(directory: Path, reads: Mapping[str, int], seed: int = 0) -> Path:
    """The planted model with one refusal direction per category: category c's trigger words
    (`category_triggers`) embed as STRENGTH * sqrt(3) * (b_{reads[c]} + m), every other word as STRENGTH * (three
    signed coordinates + sqrt(3) m), the chat template's tokens as 0 (m = b_{D_MODEL - 1}); the head reads
    refusal - compliance = GAIN * sum over the distinct reads of b_j . norm(x).

    Categories reading the same direction share one refusal direction (their difference of means is b_j
    for both, and ablating either removes both refusals); categories reading different directions each
    have their own (ablating one leaves the other). Neutral words draw their coordinates from the
    directions that are neither read, UNUSED nor m.

    Why m, and only in the message: a trigger that were b_j alone would, with an estimated direction
    projected out, shrink to the estimate's error, which block 0's RMS norm would scale back up to a
    whole token; with m the token keeps its norm. But in 32 dimensions a random direction overlaps m by
    about 1/sqrt(32), and ablating it shifts every token holding m alike (a massive m, or one in the
    template tokens too, would make the random directions' chance level as wide as the planted effects).
    Use it with `planted_prompts(same_length=True)`: prompts longer on one side would put their length
    into the difference of means.
    """
    from transformers import LlamaForCausalLM

    make_planted_model(directory, seed)
    model = LlamaForCausalLM.from_pretrained(directory)
    tokenizer = make_tiny_tokenizer()
    b = basis()
    read = sorted(set(reads.values()))
    neutral = [j for j in range(D_MODEL - 1) if j not in read and j not in UNUSED]
    g = torch.Generator().manual_seed(seed + 4)
    owner = {tokenizer.convert_tokens_to_ids(w): c for c, words in category_triggers().items() for w in words}
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        shared = math.sqrt(len(PLANTED)) * b[-1]
        for i in range(emb.shape[0]):
            if i in tokenizer.all_special_ids:
                emb[i] = 0.0
            elif owner.get(i) in reads:
                emb[i] = STRENGTH * (math.sqrt(len(PLANTED)) * b[reads[owner[i]]] + shared)
            else:
                emb[i] = STRENGTH * (signed_coordinates(neutral, g) + shared)
        head = model.lm_head.weight
        head.zero_()
        head[tokenizer.convert_tokens_to_ids(REFUSAL_WORD)] = GAIN * b[read].sum(0)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def template_wrapper(root: Path):
    """The planted template model (`make_template_model`) written into `root / "model"`, loaded."""
    from refusal_sae.model import ModelConfig, ModelWrapper

    return ModelWrapper(ModelConfig(name=str(make_template_model(root / "model"))))


def category_run(root: Path, reads: Mapping[str, int], n_per_label: int):
    """The category model (`make_category_model`) in `root / "model"`, its same-length prompts (`n_per_label` per
    label and category, half of them discovery) and their activation cache in `root / "cache"`: (wrapper, splits,
    cache)."""
    from refusal_sae.activations import ActivationConfig, InferencePipeline
    from refusal_sae.model import ModelConfig, ModelWrapper

    wrapper = ModelWrapper(ModelConfig(name=str(make_category_model(root / "model", reads))))
    splits = planted_prompts(n_per_label, triggers=category_triggers(), same_length=True)
    cache = InferencePipeline(wrapper, ActivationConfig(layers=LAYERS, shard_size=128), root / "cache").run(splits)
    return wrapper, splits, cache


TRUE_REFUSAL, FALSE_REFUSAL = 0, 1
"""Basis directions of the over-refusal model: what toxic requests write, and what harmful-looking words write."""
COMPLY = 0.6
"""The over-refusal model's compliance logit per unit of m at the generation position."""


def make_overrefusal_model(directory: Path, seed: int = 0) -> Path:
    """The category model with alpha's trigger words writing the true-refusal direction and beta's the
    false-refusal one, the head reading both (refusal = GAIN * (b_0 + b_1) . norm(x)) and writing the compliance
    word from m (COMPLY * m . norm(x)). A prompt with no trigger is answered; one beta word (a harmful-looking word
    in a safe request) is refused: over-refusal; a toxic request (an alpha and a beta word) is refused, and still
    is without its beta word. So setting the false-refusal latent to its harmless value (0) ends the
    over-refusal and keeps the refusal, while the true refusal direction (toxic minus harmless means: b_0 + b_1)
    holds the false one too."""
    make_category_model(directory, {"alpha": TRUE_REFUSAL, "beta": FALSE_REFUSAL}, seed)
    path = directory / "model.safetensors"
    from safetensors.torch import load_file, save_file

    weights = load_file(path)
    how = make_tiny_tokenizer().convert_tokens_to_ids(COMPLIANCE_WORD)
    weights["lm_head.weight"][how] = COMPLY * basis()[-1]
    save_file(weights, path, metadata={"format": "pt"})
    return directory


def overrefusal_prompts(n: int, seed: int = 0) -> tuple[list[PromptSample], list[PromptSample], list[str]]:
    """(toxic, hard, harmless) prompts of 6-8 words, category "alpha": a toxic one holds one alpha and one beta
    trigger word, a hard one one beta word, a harmless one none (the triggers replace neutral words)."""
    rng = random.Random(seed)
    triggers, (_, neutral) = category_triggers(), vocabulary()
    out: dict[str, list[str]] = {"toxic": [], "hard": [], "harmless": []}
    for kind, words_in in (("toxic", ("alpha", "beta")), ("hard", ("beta",)), ("harmless", ())):
        for _ in range(n):
            words = rng.choices(neutral, k=rng.randint(6, 8))
            slots = rng.sample(range(len(words)), len(words_in))
            for slot, category in zip(slots, words_in):
                words[slot] = rng.choice(triggers[category])
            out[kind].append(" ".join(words))
    toxic = [PromptSample(p, "alpha", True, "toxic", "planted") for p in out["toxic"]]
    hard = [PromptSample(p, "alpha", False, "hard", "planted") for p in out["hard"]]
    return toxic, hard, out["harmless"]
