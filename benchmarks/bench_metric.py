"""Refusal scores with the prompts' shared prefix run once per call vs whole prompts.

`refusal_sae.metric.refusal_scores` is what the refusal-directions stage calls thousands of times, each call
under forward hooks that edit every position. Every prompt is the chat template around a message, so its
first P tokens (24 for the embedded Qwen) are the same in every prompt. Two sides, over the same prompts:
  prefix   `refusal_scores(..., reuse_prefix=True)`: the shared prefix runs once per call (one row), each
           batch only the positions after it, reading the prefix's keys and values;
  whole    `refusal_scores(..., reuse_prefix=False)`: every prompt runs whole, as before.
Each side is timed plainly and under the directions stage's hook (`directional_ablation` of a seeded random
direction, at every position: the prefix is then computed inside the hook, per call). Reported: median
seconds per call of each side (after a warm-up call of each, which also does the one-time check that
continuing the cache reproduces the model; the repeats alternate between the sides, so a change of the
machine's load hits both alike), prefix/whole, and the largest difference between the two sides' scores
(they must agree to float rounding; checked).

Default: the embedded Qwen2.5-Coder-0.5B-Instruct, 48 prompts of the bundled OR-Bench sample's evaluation
split (half toxic, half safe, in split order), batches of 8. `--quick` uses a tiny random 4-layer Llama
instead (a smoke run in seconds; its timings mean nothing).

    python -m benchmarks.bench_metric [--quick] [--model embedded] [--prompts 48] [--batch-size 8]
                                      [--repeats 3] [--threads N] [--out result.json]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    add_model_options,
    alternating_seconds,
    load_model,
    report,
    run_model_benchmark,
)
from refusal_sae.data import PromptConfig, build_prompts
from refusal_sae.directions import directional_ablation
from refusal_sae.metric import refusal_scores
from refusal_sae.positions import common_prefix


def pick_prompts(n: int) -> list[str]:
    """`n` prompts of the bundled sample's evaluation split: half toxic, half safe, in split order."""
    samples = build_prompts(PromptConfig()).splits["evaluation"]
    toxic = [s.prompt for s in samples if s.refusal_label]
    safe = [s.prompt for s in samples if not s.refusal_label]
    return toxic[: n // 2] + safe[: n - n // 2]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="data.model.name")
    parser.add_argument("--prompts", type=int, default=48, help="prompts per call (half toxic, half safe)")
    parser.add_argument("--batch-size", type=int, default=8)
    add_model_options(parser)
    return run_model_benchmark(parser.parse_args(argv), run, "bench_metric_")


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    if args.quick:
        args.prompts, args.repeats = 12, 1
    wrapper, metric = load_model(args, tmp)
    prompts = pick_prompts(args.prompts)
    ids = wrapper.encode(prompts)
    direction = torch.randn(wrapper.d_model, generator=torch.Generator().manual_seed(0))
    hooks = {"plain": contextlib.nullcontext, "direction ablated": lambda: directional_ablation(wrapper, direction)}

    scores: dict[tuple[str, str], np.ndarray] = {}

    def side(hook: str, reuse_prefix: bool) -> None:
        with hooks[hook]():
            got = refusal_scores(wrapper, prompts, args.batch_size, metric, reuse_prefix=reuse_prefix)
        scores[hook, "prefix" if reuse_prefix else "whole"] = got.double().numpy()

    # warm-up (lazy initialisation, allocator, threads, the one-time cache check): one call of each side
    for hook in hooks:
        for reuse_prefix in (True, False):
            side(hook, reuse_prefix)
    # one repeat of each side in turn, so that a change of the machine's load hits all alike
    times = alternating_seconds({f"{hook}, {name}": lambda h=hook, r=reuse_prefix: side(h, r) for hook in hooks
                                 for reuse_prefix, name in ((True, "prefix"), (False, "whole"))}, args.repeats)
    seconds = {key: statistics.median(t) for key, t in times.items()}
    diffs = {hook: float(np.abs(scores[hook, "prefix"] - scores[hook, "whole"]).max()) for hook in hooks}
    scale = max(1.0, *(float(np.abs(s).max()) for s in scores.values()))
    same = all(np.allclose(scores[hook, "prefix"], scores[hook, "whole"], rtol=1e-4, atol=1e-4 * scale)
               for hook in hooks)

    rows = [{"side": key, "seconds_per_call": s} for key, s in seconds.items()]
    lengths = [len(row) for row in ids]
    extra = {
        "model": args.model if not args.quick else "tiny random llama (--quick)", "quick": args.quick,
        "dtype": str(wrapper.dtype).removeprefix("torch."), "device": str(wrapper.device),
        "threads": torch.get_num_threads(), "prompts": len(prompts), "batch_size": args.batch_size,
        "repeats": args.repeats, "shared_prefix_tokens": common_prefix(ids),
        "prompt_tokens": {"mean": statistics.mean(lengths), "min": min(lengths), "max": max(lengths)},
        "prefix_reused": bool(wrapper.prefix_continues),
        "prefix_over_whole": {hook: seconds[f"{hook}, prefix"] / seconds[f"{hook}, whole"] for hook in hooks},
        "seconds_each_repeat": times, "max_abs_score_difference": diffs, "scores_equal": same,
    }
    result = report("refusal scores", rows, extra, args.out)
    print("shared prefix run once vs whole prompts: " + ", ".join(
        f"{hook} {ratio:.2f}x the time" for hook, ratio in extra["prefix_over_whole"].items())
        + f" ({len(prompts)} prompts, {common_prefix(ids)}-token prefix); largest score difference "
        f"{max(diffs.values()):.2e}")
    if not same:
        raise SystemExit(f"the prefix and whole-prompt scores disagree by up to {max(diffs.values()):.3g}")
    return result


if __name__ == "__main__":
    main()
