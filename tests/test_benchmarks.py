"""The benchmark suite in quick mode: it runs end to end and its report keeps its shape (no timing asserts)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.__main__ import BENCHMARKS
from benchmarks.__main__ import main as run_suite
from refusal_sae import cpu_kernels

pytestmark = pytest.mark.slow


def test_quick_suite_writes_one_table_and_json_with_stable_keys(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    run_suite(["--quick", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # the suite restores what a benchmark changed

    suite = json.loads((tmp_path / "results.json").read_text())
    assert set(suite) == {"suite", "quick", "started", "seconds", "machine", "command", "rows", "results"}
    assert suite["quick"] and set(suite["results"]) == set(BENCHMARKS)
    assert {"processor", "cpu_count", "memory_gib", "gpu", "torch", "transformers", "eai_sparsify"} <= set(
        suite["machine"])
    kernels = cpu_kernels.usable(torch.zeros(1)) is not None  # then the SAE step is also run without them
    assert [r["benchmark"] for r in suite["rows"]] == [
        "activation collection", *["SAE training step"] * (3 if kernels else 2), "SAE quality", "streaming memory",
        *["ablation variants"] * 5, "ablation setup", "refusal scores", "refusal scores, direction ablated",
        "attribution patching", "greedy generation", "generation under an edit", "end to end", "report"]
    for row in suite["rows"]:
        assert set(row) == {"benchmark", "measure", "a", "a_value", "b", "b_value", "a/b"}
        assert row["a_value"] > 0 and row["b_value"] > 0 and math.isclose(row["a/b"], row["a_value"] / row["b_value"])

    results = suite["results"]
    ablation = results["ablation"]
    assert ablation["scores_equal"] and ablation["max_abs_score_difference"] < 1e-4  # cached = whole model
    assert [r["side"] for r in ablation["rows"]] == ["cached", "whole", "floor", "floor x2", "floor by length /8",
                                                     "floor by length /16"]
    assert ablation["setup_seconds"] > 0
    assert [r["b"] for r in suite["rows"] if r["benchmark"] == "ablation variants"] == [
        "whole model, edits hooked", "floor: later blocks, no edits", "floor: later blocks, no edits",
        *[f"floor: later blocks, batches of {ablation['batch_size']}"] * 2]
    attribution = results["attribution"]
    assert attribution["scores_equal"] and attribution["max_relative_score_difference"] < 1e-3
    assert results["generation"]["same_answers"] == results["generation"]["prompts"]
    assert results["editing"]["nodes"] > 0 and [r["side"] for r in results["editing"]["rows"]] == ["edited", "unedited"]
    metric = results["metric"]
    assert metric["scores_equal"] and metric["prefix_reused"] and metric["shared_prefix_tokens"] > 0
    assert [r["side"] for r in metric["rows"]] == ["plain, prefix", "plain, whole", "direction ablated, prefix",
                                                  "direction ablated, whole"]
    sae = {r["side"]: r for r in results["sae"]["rows"]}
    assert sae["refusal_sae"]["fvu"] < results["sae"]["fvu_at_init"] and sae["sparsify"]["fvu"] < 1
    if kernels:
        assert sae["refusal_sae, PyTorch ops"]["fvu"] == pytest.approx(sae["refusal_sae"]["fvu"], rel=1e-3)
    small, large = results["memory"]["rows"]
    assert large["tokens_streamed"] > 2 * small["tokens_streamed"]  # every token of both caches streamed
    assert results["end_to_end"]["prompts"] == 60

    markdown = (tmp_path / "results.md").read_text()
    assert markdown.startswith("| benchmark | measure | a | a_value | b | b_value | a/b |")
    assert "`python -m benchmarks --quick`" in markdown and "timings mean nothing" in markdown
