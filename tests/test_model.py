"""refusal_sae.model: loading, chat formatting, residual hooks, early stop and last-token logits.

Everything runs on a tiny random Llama built in the test (tests/tiny_model.py); one integration test
loads the real embedded Qwen2.5-Coder-0.5B-Instruct and is skipped when its wheels are not installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from refusal_sae.errors import UserError
from refusal_sae.model import ModelConfig, ModelWrapper
from tests.conftest import first_prompts, requires_embedded
from tests.tiny_model import TINY_CHAT_TEMPLATE, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

N_LAYERS, D_MODEL = 4, 32
SHORT = "How do I bake bread?"
LONG = "Explain how a con artist character might gain a wealthy victim's trust, for a novel, without a method."


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), n_layers=N_LAYERS, d_model=D_MODEL)


@pytest.fixture(scope="module")
def wrapper(tiny_dir: Path) -> ModelWrapper:
    return ModelWrapper(ModelConfig(name=str(tiny_dir)))


def _last_positions(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum(dim=1) - 1  # right padding


# --------------------------------------------------------------------------------------------------
# loading and metadata


def test_tiny_model_is_deterministic(tmp_path: Path) -> None:
    a, b = make_tiny_model(tmp_path / "a"), make_tiny_model(tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert "model.safetensors" in names and not any(n.endswith(".bin") for n in names)
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_loads_in_eval_mode_without_grad(wrapper: ModelWrapper, tiny_dir: Path) -> None:
    assert (wrapper.n_layers, wrapper.d_model) == (N_LAYERS, D_MODEL)
    assert wrapper.layer_names == [f"residuals_{i}" for i in range(N_LAYERS)]
    assert wrapper.device == torch.device("cpu") and wrapper.dtype == torch.float32
    assert not wrapper.model.training
    assert not any(p.requires_grad for p in wrapper.model.parameters())
    assert wrapper.tokenizer.padding_side == "right"
    identity = wrapper.identity
    assert json.loads(json.dumps(identity)) == identity  # fit for a JSON manifest
    assert identity["name"] == str(tiny_dir)
    assert identity["model_type"] == "llama"
    assert (identity["n_layers"], identity["d_model"], identity["dtype"]) == (N_LAYERS, D_MODEL, "float32")
    assert identity["chat_template"] == TINY_CHAT_TEMPLATE
    assert identity["gguf_sha256"] is None


def test_local_directory_is_loaded_offline_from_safetensors(tiny_dir: Path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    calls = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(source, **kwargs):
        calls.append((source, kwargs))
        return original(source, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    w = ModelWrapper(ModelConfig(name=str(tiny_dir), dtype="bfloat16"))
    (source, kwargs), = calls
    assert source == str(tiny_dir)
    assert kwargs["local_files_only"] is True
    assert kwargs["use_safetensors"] is True
    assert kwargs["trust_remote_code"] is False
    assert w.dtype == torch.bfloat16
    assert {p.dtype for p in w.model.parameters()} == {torch.bfloat16}
    enc = w.tokenize([SHORT])
    assert w.residuals(enc["input_ids"], enc["attention_mask"], [0])["residuals_0"].dtype == torch.bfloat16


def test_identity_hashes_a_local_gguf(tiny_dir: Path, tmp_path: Path) -> None:
    import hashlib

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 100)
    w = ModelWrapper(ModelConfig(name=str(tiny_dir)))
    w._source, w._gguf_file = str(tmp_path), gguf.name  # as if loaded from it (no tiny GGUF writer here)
    assert w.identity["gguf_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert w.identity["gguf_file"] == "m.gguf"


def test_pad_token_defaults_to_eos(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "m", n_layers=1)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["pad_token"]
    config_path.write_text(json.dumps(config))
    w = ModelWrapper(ModelConfig(name=str(model_dir)))
    assert w.tokenizer.pad_token == w.tokenizer.eos_token == "</s>"
    enc = w.tokenize([SHORT, LONG])
    assert enc["input_ids"][0, -1].item() == w.tokenizer.eos_token_id


# --------------------------------------------------------------------------------------------------
# residuals


def test_residuals_match_output_hidden_states(wrapper: ModelWrapper) -> None:
    enc = wrapper.tokenize([SHORT, LONG])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    got = wrapper.residuals(ids, mask, wrapper.layer_names)
    assert list(got) == wrapper.layer_names
    for tensor in got.values():
        assert tensor.shape == (2, ids.shape[1], D_MODEL)

    last_block = []
    handle = wrapper.model.model.layers[-1].register_forward_hook(
        lambda module, args, output: last_block.append(output[0] if isinstance(output, tuple) else output)
    )
    try:
        with torch.no_grad():
            hidden = wrapper.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    assert len(hidden) == N_LAYERS + 1
    for i in range(N_LAYERS - 1):  # hidden_states[0] is the embedding output
        torch.testing.assert_close(got[f"residuals_{i}"], hidden[i + 1], rtol=0, atol=0)
    last = got[f"residuals_{N_LAYERS - 1}"]
    torch.testing.assert_close(last, last_block[0], rtol=0, atol=0)
    # hidden_states[-1] is after the final norm; residuals_<last> is before it
    torch.testing.assert_close(wrapper.model.model.norm(last), hidden[-1])
    assert not torch.allclose(last, hidden[-1])
    # and the layers really differ from each other
    assert not torch.allclose(got["residuals_0"], got["residuals_1"])


def test_forward_stops_after_the_last_hooked_block(wrapper: ModelWrapper) -> None:
    model = wrapper.model
    calls: dict[str, int] = {}

    def counter(name):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1

        return hook

    watched = {f"layer{i}": layer for i, layer in enumerate(model.model.layers)}
    watched |= {"norm": model.model.norm, "lm_head": model.lm_head}
    hooks_before = {name: len(m._forward_hooks) for name, m in watched.items()}
    handles = [m.register_forward_hook(counter(name)) for name, m in watched.items()]
    try:
        enc = wrapper.tokenize([SHORT])
        out = wrapper.residuals(enc["input_ids"], enc["attention_mask"], ["residuals_1", 0])
        assert list(out) == ["residuals_0", "residuals_1"]
        assert calls == {"layer0": 1, "layer1": 1}  # layers 2, 3, the final norm and the lm_head never ran

        calls.clear()  # the wrapper's own hooks are gone: a deeper request runs further
        wrapper.residuals(enc["input_ids"], enc["attention_mask"], [-1])
        assert calls == {f"layer{i}": 1 for i in range(N_LAYERS)}
    finally:
        for h in handles:
            h.remove()
    assert {name: len(m._forward_hooks) for name, m in watched.items()} == hooks_before


def test_right_padding_leaves_real_token_residuals_unchanged(wrapper: ModelWrapper) -> None:
    alone = wrapper.tokenize([SHORT])
    batch = wrapper.tokenize([SHORT, LONG])
    n = int(alone["attention_mask"].sum())
    assert batch["input_ids"].shape[1] > n  # SHORT really is padded in the batch
    assert batch["attention_mask"][0, :n].all() and not batch["attention_mask"][0, n:].any()  # on the right
    assert (batch["input_ids"][0, n:] == wrapper.tokenizer.pad_token_id).all()
    torch.testing.assert_close(batch["input_ids"][0, :n], alone["input_ids"][0])

    layers = wrapper.layer_names
    single = wrapper.residuals(alone["input_ids"], alone["attention_mask"], layers)
    batched = wrapper.residuals(batch["input_ids"], batch["attention_mask"], layers)
    for layer in layers:
        torch.testing.assert_close(batched[layer][0, :n], single[layer][0], rtol=1e-5, atol=1e-5)


def test_last_token_logits_match_the_full_model(wrapper: ModelWrapper) -> None:
    enc = wrapper.tokenize([SHORT, LONG, "hi"])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    head_inputs = []
    handle = wrapper.model.lm_head.register_forward_hook(lambda m, args, out: head_inputs.append(args[0].shape))
    try:
        logits = wrapper.last_token_logits(ids, mask)
    finally:
        handle.remove()
    assert head_inputs == [torch.Size([3, D_MODEL])]  # the head ran on the last positions only
    assert logits.shape == (3, len(wrapper.tokenizer)) and logits.dtype == torch.float32
    with torch.no_grad():
        full = wrapper.model(input_ids=ids, attention_mask=mask).logits
    last = _last_positions(mask)
    torch.testing.assert_close(logits, full[torch.arange(3), last], rtol=1e-5, atol=1e-5)
    # the last real token is the template's generation prompt
    assert set(ids[torch.arange(3), last].tolist()) == {wrapper.tokenizer.convert_tokens_to_ids("<|assistant|>")}


# --------------------------------------------------------------------------------------------------
# layers, templates, tokenization


def test_resolve_layers(wrapper: ModelWrapper) -> None:
    assert wrapper.resolve_layers(["residuals_3", 1, -4, "residuals_1", -1]) == [
        "residuals_0", "residuals_1", "residuals_3"
    ]
    assert wrapper.resolve_layers([2]) == ["residuals_2"]


@pytest.mark.parametrize("bad", ["residuals_4", 4, -5, "layer_1", "residuals_-1", "resid_post_2"])
def test_unknown_layer_lists_the_valid_names(wrapper: ModelWrapper, bad) -> None:
    with pytest.raises(UserError) as e:
        wrapper.resolve_layers(["residuals_0", bad])
    msg = str(e.value)
    assert repr(bad) in msg
    assert "residuals_0 … residuals_3" in msg
    assert "\n" not in msg


def test_format_prompts_uses_the_tokenizer_template(wrapper: ModelWrapper) -> None:
    assert wrapper.format_prompts(["How are you?"]) == ["<s><|user|> How are you? </s><|assistant|>"]
    enc = wrapper.tokenize(["How are you?"])
    tokens = wrapper.tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    assert tokens == ["<s>", "<|user|>", "how", "are", "you", "?", "</s>", "<|assistant|>"]  # no extra bos/eos


def test_format_prompts_uses_the_override_template(tiny_dir: Path, tmp_path: Path) -> None:
    template = "[USER] {{ messages[0]['content'] }}{% if add_generation_prompt %} [BOT]{% endif %}"
    w = ModelWrapper(ModelConfig(name=str(tiny_dir), chat_template=template))
    assert w.format_prompts(["Hello there", "Bye"]) == ["[USER] Hello there [BOT]", "[USER] Bye [BOT]"]
    assert w.identity["chat_template"] == template

    path = tmp_path / "chat.jinja"  # the template can also come from a file
    path.write_text(template)
    w.cfg = ModelConfig(name=str(tiny_dir), chat_template=str(path))
    assert w._resolve_chat_template() == template


def test_no_chat_template_asks_for_one(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "m", n_layers=1, chat_template=None)
    w = ModelWrapper(ModelConfig(name=str(model_dir)))
    assert w.identity["chat_template"] is None
    with pytest.raises(UserError, match="set data.model.chat_template"):
        w.format_prompts(["hi"])
    w2 = ModelWrapper(ModelConfig(name=str(model_dir), chat_template="{{ messages[0]['content'] }}!"))
    assert w2.format_prompts(["hi"]) == ["hi!"]


def test_tokenize_no_prompts(wrapper: ModelWrapper) -> None:
    enc = wrapper.tokenize([])
    assert enc["input_ids"].shape == enc["attention_mask"].shape == (0, 0)


def test_prompt_longer_than_max_length_is_an_error(tiny_dir: Path) -> None:
    w = ModelWrapper(ModelConfig(name=str(tiny_dir), max_length=6))
    enc = w.tokenize(["hi"])
    assert enc["attention_mask"].tolist() == [[1, 1, 1, 1, 1]]  # "<s> <|user|> hi </s> <|assistant|>"
    with pytest.raises(UserError, match=r"max_length: 2 of 3 prompts are longer than 6 tokens .*raise data.model.max_length"):
        w.tokenize(["hi", LONG, SHORT])


# --------------------------------------------------------------------------------------------------
# errors


def test_missing_local_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(UserError, match="not found") as e:
        ModelWrapper(ModelConfig(name=str(missing)))
    assert str(missing) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="GGUF file .* not found"):
        ModelWrapper(ModelConfig(name=str(tmp_path / "model.gguf")))


def test_missing_gguf_file_in_directory(tiny_dir: Path) -> None:
    with pytest.raises(UserError, match="'q4.gguf' not found") as e:
        ModelWrapper(ModelConfig(name=str(tiny_dir), gguf_file="q4.gguf"))
    assert "GGUF files there: none" in str(e.value)


def test_pickle_only_checkpoint_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in tiny_dir.iterdir():
        if f.name != "model.safetensors":
            (pickled / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(tiny_dir / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(UserError) as e:
        ModelWrapper(ModelConfig(name=str(pickled)))
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "only safetensors or GGUF" in msg and "\n" not in msg


def _fake_from_pretrained(error: OSError, calls: list):
    def fake(source, **kwargs):
        calls.append((source, kwargs))
        raise error

    return fake


def test_unreachable_hub_id(monkeypatch) -> None:
    from transformers import AutoTokenizer

    calls: list = []
    error = OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", _fake_from_pretrained(error, calls))
    with pytest.raises(UserError) as e:
        ModelWrapper(ModelConfig(name="someorg/some-model", revision="v1.0"))
    msg = str(e.value)
    assert "'someorg/some-model'" in msg
    assert "check the model id" in msg and "network" in msg and "local directory" in msg
    assert "\n" not in msg
    (source, kwargs), = calls
    assert source == "someorg/some-model" and kwargs["revision"] == "v1.0"
    assert "local_files_only" not in kwargs and kwargs["trust_remote_code"] is False


def test_hub_repo_without_safetensors(monkeypatch, tiny_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda source, **kw: tokenizer)
    calls: list = []
    error = OSError("org/old does not appear to have a file named model.safetensors or model.safetensors.index.json "
                    "and thus cannot be loaded with `safetensors`.")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", _fake_from_pretrained(error, calls))
    with pytest.raises(UserError, match="'org/old' has no safetensors weights; only safetensors or GGUF"):
        ModelWrapper(ModelConfig(name="org/old"))
    assert calls[0][1]["use_safetensors"] is True
    assert "DISABLE_SAFETENSORS_CONVERSION" not in os.environ  # set only while loading


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("dtype", "float8", "data.model.dtype: unknown dtype 'float8'; use auto, float32, float16 or bfloat16"),
        ("device", "tpu", "data.model.device: unknown device 'tpu'"),
        ("max_length", 0, "data.model.max_length: 0 is not a positive integer"),
    ],
)
def test_bad_config_values(tiny_dir: Path, field: str, value, match: str) -> None:
    with pytest.raises(UserError, match=match):
        ModelWrapper(ModelConfig(name=str(tiny_dir), **{field: value}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_asked_for_without_cuda(tiny_dir: Path) -> None:
    with pytest.raises(UserError, match="'cuda' asked for but CUDA is not available"):
        ModelWrapper(ModelConfig(name=str(tiny_dir), device="cuda"))


def test_config_fields_are_documented_cli_options() -> None:
    from jsonargparse import ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # as refusal_sae.cli does
    try:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(ModelConfig, "model")
        cfg = parser.parse_args(["--model.name", "org/x", "--model.max_length", "8"])
        help_text = " ".join(parser.format_help().split())  # unwrapped
    finally:
        set_parsing_settings(docstring_parse_attribute_docstrings=False)
    assert (cfg.model.name, cfg.model.max_length, cfg.model.dtype) == ("org/x", 8, "auto")
    assert "a longer prompt is an error, not truncated" in help_text
    assert "leave off unless you trust its author" in help_text


# --------------------------------------------------------------------------------------------------
# integration: the real embedded model


@pytest.mark.slow
@requires_embedded
def test_embedded_model_hooks_are_wired(orbench_dir: Path) -> None:
    from refusal_sae.embedded import GGUF_SHA256

    w = ModelWrapper(ModelConfig(name="embedded"))
    assert (w.n_layers, w.d_model) == (24, 896)
    identity = w.identity
    assert (identity["model_type"], identity["gguf_sha256"]) == ("qwen2", GGUF_SHA256)
    assert "<|im_start|>" in identity["chat_template"]

    toxic = first_prompts(orbench_dir / "or-bench-toxic.csv", 2)
    hard = first_prompts(orbench_dir / "or-bench-hard-1k.csv", 2)
    enc = w.tokenize(toxic + hard)
    layer = w.resolve_layers([-6])[0]  # residuals_18: late, and the forward stops there
    acts = w.residuals(enc["input_ids"], enc["attention_mask"], [layer])[layer]
    last = acts[torch.arange(4), _last_positions(enc["attention_mask"])].float()
    assert torch.isfinite(last).all()
    # every prompt ends in the same template tokens, so only the prompt itself can move the last position
    toxic_mean, hard_mean = last[:2].mean(0), last[2:].mean(0)
    assert (toxic_mean - hard_mean).norm() > 0.05 * last.norm(dim=-1).mean()
