"""A tiny random-weight Llama chat model, built in the test, for fast model-stage tests.

`make_tiny_model(directory)` writes a seeded `LlamaForCausalLM` (2 layers, d_model 32 by default) and a
real fast tokenizer (a word-level vocabulary counted from the tests' prompts, `TEST_PROMPTS`, with bos/eos/pad
and chat-role special tokens) plus a small Jinja chat template, all with `save_pretrained` (weights as
safetensors). The directory then loads offline like any local checkpoint, e.g. through
`refusal_sae.model.ModelWrapper(ModelConfig(name=str(directory)))`. Same arguments, same files.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

from refusal_sae.data import FILES

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)  # ids 0..6 in this order

#: One user turn renders as "<s> <|user|> {content} </s> <|assistant|>" (the last part with the
#: generation prompt), so a formatted prompt always starts with bos and ends with <|assistant|>.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|> {{ message['content'] }} {{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# the same split as the `Whitespace` pre-tokenizer, applied to lowercased text
_WORD = re.compile(r"\w+|[^\w\s]+")


#: The tests' own OR-Bench-format prompts: a frozen copy of the package's first bundled sample (320 prompts), so
#: that growing or editing the bundled sample changes no test's prompts, tiny vocabulary or split.
TEST_PROMPTS = Path(__file__).parent / "data" / "or-bench-sample"


def sample_prompts() -> list[str]:
    """Every prompt of the tests' OR-Bench-format CSVs (`TEST_PROMPTS`), in file order (320 prompts)."""
    prompts = []
    for name in sorted(FILES.values()):
        with open(TEST_PROMPTS / name, encoding="utf-8", newline="") as f:
            prompts += [row["prompt"] for row in csv.DictReader(f)]
    return prompts


def make_tiny_tokenizer(vocab_size: int = 512, chat_template: str | None = TINY_CHAT_TEMPLATE):
    """A `PreTrainedTokenizerFast`: lowercase, whitespace/punctuation split, word-level vocabulary.

    The vocabulary is the special tokens then the `vocab_size - len(SPECIAL_TOKENS)` most frequent
    words of the test prompts (ties broken alphabetically, so it is deterministic); other words are
    `<unk>`.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    counts = Counter(w for p in sample_prompts() for w in _WORD.findall(p.lower()))
    n_words = vocab_size - len(SPECIAL_TOKENS)
    if n_words <= 0:
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS)} (the special tokens)")
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n_words]]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=512,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def make_tiny_model(
    directory: str | Path,
    n_layers: int = 2,
    d_model: int = 32,
    vocab_size: int = 512,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    intermediate_size: int | None = None,
    seed: int = 0,
    chat_template: str | None = TINY_CHAT_TEMPLATE,
) -> Path:
    """Write a seeded random `LlamaForCausalLM` and its tokenizer into `directory`; return the directory.

    `chat_template=None` saves a tokenizer without a chat template. Weights are float32 safetensors,
    initialised with a wider std than Llama's default so that residuals differ visibly between layers.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(vocab_size, chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=intermediate_size or 2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=512,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)  # leave the caller's RNG as it was
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


#: The default config's circuit callbacks, with sweeps and refusal/compliance openers that suit the
#: tiny model's word-level vocabulary (it has no "I", "Sure" or "cannot").
TINY_CALLBACKS = """
trainer:
  callbacks:
    - class_path: lightning_modules.RunDirCheckpoint
    - class_path: callbacks.CircuitAnalysisCallback
      init_args:
        every_n_epochs: 2
        analysis:
          discovery: {methods: [correlation], label_source: dataset, correlation: {threshold: 0.9, edge_threshold: 0.9}}
          evaluation: {target: toxic, n_sizes: 4, fractions: [0.01, 0.1, 0.5], random_circuits: 2, bootstrap: 200}
          directions: {enabled: false}
          metric: {refusal_openers: [not], compliance_openers: [how]}
          validity: {max_new_tokens: 2, refusal_phrases: [not]}
"""


def tiny_held_out_hard_categories() -> list[str]:
    """The categories whose held-out split under `tiny_fit_options` has a hard-but-safe prompt (what the
    over-refusal stage needs), from the same prompt options and seed as `fit`."""
    from refusal_sae.data import PromptConfig, build_prompts

    splits = build_prompts(PromptConfig(source=str(TEST_PROMPTS), balance="n_per_category", n_per_category=3,
                                        seed=0)).splits
    return sorted({s.category for s in splits["evaluation"] if s.dataset_type == "hard"})


def tiny_fit_options(root: str | Path) -> list[str]:
    """`fit` options that run the whole default pipeline (circuit callbacks included) on a 2-layer tiny
    model written into `root` and 60 of the tests' prompts (`TEST_PROMPTS`), in seconds, without W&B."""
    root = Path(root)
    model_dir = make_tiny_model(root / "model", n_layers=2)
    callbacks = root / "callbacks.yaml"
    callbacks.write_text(TINY_CALLBACKS)
    return ["--config", str(DEFAULT_CONFIG), "--config", str(callbacks), "--data.model.name", str(model_dir),
            "--data.activations.layers", "[0, 1]", "--model.sae.d_in", "32", "--data.prompts.source",
            str(TEST_PROMPTS), "--data.prompts.balance",
            "n_per_category", "--data.prompts.n_per_category", "3", "--data.batch_size", "64",
            "--trainer.logger", "false"]
