"""Stage 2: the activation cache, written by a real (tiny) model and read back."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import ActivationDataModule
from refusal_sae.activations import (
    MANIFEST,
    SPLITS,
    ActivationCache,
    ActivationConfig,
    InferencePipeline,
    PromptActivations,
    TokenStream,
)
from refusal_sae.data import PromptConfig, prepare_prompts
from refusal_sae.errors import UserError
from refusal_sae.model import ModelConfig, ModelWrapper
from tests.collection import CHILD, collect, run_child, tree
from tests.conftest import ROOT
from tests.tiny_model import TEST_PROMPTS, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cache_holds_every_real_token_with_its_metadata(tiny_dir: Path, splits, tmp_path: Path) -> None:
    cache = collect(tiny_dir, tmp_path / "cache", splits)
    samples = [(s, split) for split in SPLITS for s in splits[split]]
    wrapper = ModelWrapper(ModelConfig(name=str(tiny_dir)))
    assert cache.layers == ["residuals_0", "residuals_2"]
    assert [s["name"] for s in cache.shards] == ["shard_00000", "shard_00001", "shard_00002"]
    assert cache.n_prompts == len(samples) == 40
    lengths = [int(wrapper.tokenize([s.prompt])["attention_mask"].sum()) for s, _ in samples]
    assert cache.n_tokens == sum(lengths)
    for index in (0, 17, 39):  # a prompt alone gives the same activations as batched with others
        sample, split = samples[index]
        enc = wrapper.tokenize([sample.prompt])
        alone = wrapper.residuals(enc["input_ids"], enc["attention_mask"], cache.layers)
        cached = cache.prompt(index)
        for layer in cache.layers:
            assert cached[layer].shape == (lengths[index], wrapper.d_model)
            torch.testing.assert_close(cached[layer], alone[layer][0], rtol=1e-4, atol=1e-5)
    last = cache.prompt_metadata()
    assert last["prompt_index"].tolist() == list(range(40))
    assert last["position"].tolist() == [n - 1 for n in lengths]
    assert last["refusal_label"].tolist() == [s.refusal_label for s, _ in samples]
    assert [cache.manifest["categories"][c] for c in last["category"]] == [s.category for s, _ in samples]
    assert [SPLITS[c] for c in last["split"]] == [split for _, split in samples]
    held_out = PromptActivations(cache, ["evaluation"], layers=["residuals_2"])
    assert len(held_out) == len(splits["evaluation"])
    item = held_out[3]
    index = len(splits["discovery"]) + 3
    assert (item["prompt_index"], item["split"]) == (index, "evaluation")
    assert (item["category"], item["refusal_label"]) == (samples[index][0].category, samples[index][0].refusal_label)
    assert torch.equal(item["activations"]["residuals_2"], cache.prompt(index)["residuals_2"])


def test_complete_cache_is_reused_and_a_changed_config_is_refused(tiny_dir: Path, splits, tmp_path: Path) -> None:
    collect(tiny_dir, tmp_path / "cache", splits)
    stamp = (tmp_path / "cache" / "shard_00000" / "residuals_0.npy").stat().st_mtime_ns
    collect(tiny_dir, tmp_path / "cache", splits)
    assert (tmp_path / "cache" / "shard_00000" / "residuals_0.npy").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match=r"was built with a different dtype, layers; .*overwrite: true"):
        collect(tiny_dir, tmp_path / "cache", splits, layers=[1], dtype="float16")
    cache = collect(tiny_dir, tmp_path / "cache", splits, layers=[1], dtype="float16", overwrite=True)
    assert cache.layers == ["residuals_1"] and cache.prompt(0)["residuals_1"].dtype == torch.float16


def test_bfloat16_storage_round_trips(tiny_dir: Path, splits, tmp_path: Path) -> None:
    full = collect(tiny_dir, tmp_path / "fp32", splits)
    half = collect(tiny_dir, tmp_path / "bf16", splits, dtype="bfloat16")
    x = half.prompt(3)["residuals_2"]
    assert x.dtype == torch.bfloat16
    assert torch.equal(x, full.prompt(3)["residuals_2"].to(torch.bfloat16))


def test_corrupted_shard_is_named(tiny_dir: Path, splits, tmp_path: Path) -> None:
    collect(tiny_dir, tmp_path / "cache", splits)
    target = tmp_path / "cache" / "shard_00001" / "residuals_2.npy"
    data = bytearray(target.read_bytes())
    data[-7] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"shard_00001/residuals_2.npy is corrupted or truncated"):
        ActivationCache(tmp_path / "cache")
    target.write_bytes(bytes(data[:-100]))
    with pytest.raises(UserError, match=r"shard_00001/residuals_2.npy is corrupted or truncated"):
        ActivationCache(tmp_path / "cache")


def test_nan_activations_name_prompt_and_layer(tmp_path: Path, splits) -> None:
    model_dir = make_tiny_model(tmp_path / "nan", n_layers=3)
    wrapper = ModelWrapper(ModelConfig(name=str(model_dir)))
    # poison the second block's MLP output for every token: residuals_0 stays finite, residuals_1 does not
    with torch.no_grad():
        wrapper.model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    pipeline = InferencePipeline(wrapper, ActivationConfig(layers=[0, 1], shard_size=16, batch_size=5), tmp_path / "c")
    with pytest.raises(UserError, match=r"NaN/inf activations at layer residuals_1 for prompt 0"):
        pipeline.run(splits)
    assert not (tmp_path / "c" / "shard_00000").exists() and not (tmp_path / "c" / MANIFEST).exists()


def test_empty_prompt_list(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"the prompt list is empty"):
        collect(tiny_dir, tmp_path / "cache", {"discovery": [], "evaluation": []})


def test_foreign_directory_is_never_deleted(tiny_dir: Path, splits, tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(UserError, match=r"holds files that are not part of an activation cache \(mine.txt\)"):
        collect(tiny_dir, tmp_path, splits)
    assert (tmp_path / "mine.txt").read_text() == "precious"


@pytest.mark.slow
def test_killed_collection_resumes_to_the_identical_cache(tmp_path: Path) -> None:
    """A subprocess is SIGKILLed part-way; the next run finishes, and the cache equals an uninterrupted one."""
    model_dir = make_tiny_model(tmp_path / "model", n_layers=3, d_model=256)
    prompts = tmp_path / "data" / "prompts.csv"
    prepare_prompts(PromptConfig(source=str(TEST_PROMPTS), balance="n_per_category", n_per_category=4, seed=0), prompts,
                    prompts.parent / "data_report", prompts.parent / "balanced_report")  # 80 prompts
    child = run_child(str(model_dir), str(prompts), str(tmp_path / "killed"))
    manifest = tmp_path / "killed" / "manifest.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and child.poll() is None:
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    child.wait()
    assert child.returncode == -signal.SIGKILL, f"the collection was not killed part-way: {child.stderr.read()}"
    partial = json.loads(manifest.read_text())
    assert not partial["complete"] and 2 <= len(partial["shards"]) < 20

    resumed = run_child(str(model_dir), str(prompts), str(tmp_path / "killed"))
    uninterrupted = run_child(str(model_dir), str(prompts), str(tmp_path / "whole"))
    for process in (resumed, uninterrupted):
        assert process.wait(timeout=300) == 0, process.stderr.read()
    assert tree(tmp_path / "killed") == tree(tmp_path / "whole")
    assert len(json.loads(manifest.read_text())["shards"]) == 20


@pytest.mark.slow
def test_full_disk_leaves_no_partial_shard(tiny_dir: Path, splits, tmp_path: Path) -> None:
    """A file-size limit makes writes fail like a full disk; complete shards stay, the next run resumes."""
    prompts = tmp_path / "data" / "prompts.csv"
    prepare_prompts(PromptConfig(source=str(TEST_PROMPTS), balance="n_per_category", n_per_category=2, seed=0), prompts,
                    prompts.parent / "data_report", prompts.parent / "balanced_report")
    limited = (
        "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))\n" + CHILD
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", limited, str(tiny_dir), str(prompts), str(tmp_path / "c")],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "writing activation shard" in result.stderr and "File too large" in result.stderr
    leftovers = [p.name for p in (tmp_path / "c").iterdir()]
    recorded = json.loads((tmp_path / "c" / "manifest.json").read_text())["shards"] if "manifest.json" in leftovers else []
    assert sorted(leftovers) == sorted([s["name"] for s in recorded] + (["manifest.json"] if recorded else []))
    resumed = run_child(str(tiny_dir), str(prompts), str(tmp_path / "c"))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert ActivationCache(tmp_path / "c").n_prompts == 40


def test_token_stream_covers_each_token_once_per_epoch(tiny_dir: Path, splits, tmp_path: Path) -> None:
    cache = collect(tiny_dir, tmp_path / "cache", splits)
    rows = {layer: torch.cat([cache.to_torch(cache.activations(i, layer)) for i in range(len(cache.shards))])
            for layer in cache.layers}
    stream = TokenStream(tmp_path / "cache", batch_size=7, seed=1, with_index=True)
    orders = []
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        batches = list(stream)
        assert len(batches) == cache.n_tokens // 7
        index = torch.cat([b["index"] for b in batches])
        assert len(set(index.tolist())) == len(index) == 7 * (cache.n_tokens // 7)  # each token at most once
        for layer in cache.layers:  # every layer's rows belong to the same tokens
            assert torch.equal(torch.cat([b[layer] for b in batches]), rows[layer][index])
        orders.append(index)
    assert not torch.equal(orders[0], orders[1])  # a new order each epoch
    for order in orders:  # every token but the last partial batch's (fewer than 7), which differ per epoch
        assert len(set(range(cache.n_tokens)) - set(order.tolist())) == cache.n_tokens % 7


def test_token_stream_parts_are_disjoint_and_equal(tiny_dir: Path, splits, tmp_path: Path) -> None:
    cache = collect(tiny_dir, tmp_path / "cache", splits)
    stream = TokenStream(tmp_path / "cache", layers=["residuals_2"], batch_size=4, seed=3, splits=["discovery"],
                         with_index=True)
    parts = [set(torch.cat([b["index"] for b in stream.iterate(part, 3)]).tolist()) for part in range(3)]
    assert len(parts[0]) == len(parts[1]) == len(parts[2]) > 0
    assert not (parts[0] & parts[1]) and not (parts[1] & parts[2]) and not (parts[0] & parts[2])
    split = np.concatenate([cache.tokens(i)["split"] for i in range(len(cache.shards))])
    discovery = set(np.flatnonzero(split == SPLITS.index("discovery")).tolist())
    assert parts[0] | parts[1] | parts[2] <= discovery
    # what is left out: per shard, fewer than 3 tokens to even the parts; per part, one partial batch
    assert len(discovery) - 3 * len(parts[0]) < 3 * len(cache.shards) + 3 * 4


def test_the_template_prefix_is_recorded_and_left_out_of_training(tiny_dir: Path, splits, tmp_path: Path) -> None:
    """The cache records how many tokens every prompt shares at its start (the chat template's system prompt and user
    header); a stream from that position on yields exactly the tokens after it, which is what SAEs train on unless
    data.train_prefix."""
    cache = collect(tiny_dir, tmp_path / "cache", splits)
    wrapper = ModelWrapper(ModelConfig(name=str(tiny_dir)))
    prefix = cache.manifest["template_prefix"]
    ids = wrapper.encode([s.prompt for split in splits.values() for s in split])
    assert prefix > 0 and all(row[:prefix] == ids[0][:prefix] for row in ids)
    assert len({row[prefix] for row in ids}) > 1  # the next token already differs: the prefix is the longest shared
    stream = TokenStream(tmp_path / "cache", batch_size=5, seed=0, with_index=True, min_position=prefix)
    position = np.concatenate([cache.tokens(i)["position"] for i in range(len(cache.shards))])
    seen = torch.cat([b["index"] for b in stream]).numpy()
    assert (position[seen] >= prefix).all()
    assert len(seen) == 5 * (int((position >= prefix).sum()) // 5)


def test_answer_tokens_cache_the_models_own_answers_and_stream_beside_the_prompts(tiny_dir: Path, splits,
                                                                                  tmp_path: Path) -> None:
    """`answer_tokens`: each prompt's greedy answer (as `generate` gives it alone) is run after its prompt, and the
    residuals at its tokens are what the cache holds, while the prompts' rows stay those of a cache without answers;
    a stream with `answers` yields the chosen splits' prompt tokens after the prefix, then their answer tokens."""
    from refusal_sae.generation import generate

    plain = collect(tiny_dir, tmp_path / "plain", splits)
    cache = collect(tiny_dir, tmp_path / "cache", splits, answer_tokens=3)
    assert cache.has_answers and not plain.has_answers and cache.manifest["config"]["answer_tokens"] == 3
    wrapper = ModelWrapper(ModelConfig(name=str(tiny_dir)))
    samples = [s for split in SPLITS for s in splits[split]]
    for shard in range(len(cache.shards)):
        for layer in cache.layers:
            assert np.array_equal(cache.activations(shard, layer), plain.activations(shard, layer))
    for index in (0, 21, 39):  # its answer alone, run after its prompt alone
        shard, local = divmod(index, cache.manifest["config"]["shard_size"])
        answer = generate(wrapper, [samples[index].prompt], 3).tokens[0]
        offsets = cache.answer_offsets(shard)
        assert offsets[local + 1] - offsets[local] == len(answer) > 0
        ids = wrapper.encode([samples[index].prompt])[0]
        run = torch.tensor([ids + answer])
        alone = wrapper.residuals(run, torch.ones_like(run), cache.layers)
        for layer in cache.layers:
            cached = cache.to_torch(cache.answer_activations(shard, layer)[offsets[local]:offsets[local + 1]])
            torch.testing.assert_close(cached, alone[layer][0, len(ids):], rtol=1e-4, atol=1e-5)
    prefix = cache.manifest["template_prefix"]
    stream = TokenStream(tmp_path / "cache", layers=["residuals_2"], batch_size=1, shuffle=False,
                         splits=["discovery"], min_position=prefix, answers=True)
    expected = []
    for shard in range(len(cache.shards)):
        tokens = cache.tokens(shard)
        keep = (tokens["split"] == SPLITS.index("discovery")) & (tokens["position"] >= prefix)
        expected.append(cache.to_torch(cache.activations(shard, "residuals_2")[keep]))
        split = np.repeat(tokens["split"][tokens["is_last"]], np.diff(cache.answer_offsets(shard)))
        expected.append(cache.to_torch(cache.answer_activations(shard, "residuals_2")[split == 0]))
    assert torch.equal(torch.cat([b["residuals_2"] for b in stream]), torch.cat(expected))
    shuffled = TokenStream(tmp_path / "cache", batch_size=5, seed=0, answers=True)
    assert sum(len(b["residuals_0"]) for b in shuffled) == 5 * (shuffled.tokens_per_part(1) // 5)
    assert shuffled.tokens_per_part(1) == cache.n_tokens + int(sum(cache.answer_offsets(i)[-1]
                                                                   for i in range(len(cache.shards))))
    with pytest.raises(UserError, match="holds no answer tokens; collect it with data.activations.answer_tokens"):
        TokenStream(tmp_path / "plain", answers=True)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ActivationConfig(layers=[0], batch_size=True), "data.activations.batch_size: True is not a positive"),
        (lambda: ActivationConfig(layers=[0], shard_size=0), "data.activations.shard_size: 0 is not a positive integer"),
        (lambda: ActivationConfig(layers=[0], dtype="float8"), "data.activations.dtype: 'float8' is not a known value"),
        (lambda: ActivationConfig(layers=[0], answer_tokens=-1), "data.activations.answer_tokens: -1 is not an integer"),
        (lambda: ActivationDataModule(batch_size=0), "data.batch_size: 0 is not a positive integer; give e.g. 4096"),
        (lambda: ActivationDataModule(num_workers=-1), "data.num_workers: -1 is not an integer >= 0"),
        (lambda: ActivationDataModule(train_splits=("train",)), "data.train_splits: 'train' is not a known value"),
    ],
)
def test_bad_collection_and_streaming_options_stop_where_the_config_is_built(build, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        build()
