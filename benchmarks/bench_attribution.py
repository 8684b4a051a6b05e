"""Attribution patching with the shared template prefix run once vs whole prompts.

`refusal_sae.attribution.attribution_scores` runs one forward and one backward pass per batch of a circuit's
discovery prompts. The chat template's prefix (24 tokens for the embedded Qwen) holds no node and nothing
after it can change it, so its keys and values are computed once, without gradient, and every batch runs
(and backpropagates through) only the positions after it. Two sides, over the same prompts:
  prefix   `attribution_scores` as it runs (the prefix's cache continued);
  whole    the same call on whole prompts (`ModelWrapper.prefix_continues` set False, the path a model whose
           cache cannot be continued takes).
Reported: median seconds per call of each side (after a warm-up call of each, which also does the one-time
check that continuing the cache reproduces the model; the repeats alternate between the sides), prefix/whole,
and the largest difference between the two sides' node scores relative to the largest score (they must agree
to float rounding; checked).

The SAEs are random (seeded), their means computed as discovery does (positional classes) over other
prompts. Default: the embedded Qwen2.5-Coder-0.5B-Instruct, SAEs at layers 12, 16, 20. `--quick` uses a
tiny random 4-layer Llama instead (a smoke run in seconds; its timings mean nothing).

    python -m benchmarks.bench_attribution [--quick] [--model embedded] [--prompts 16] [--batch-size 8]
                                           [--repeats 3] [--out result.json]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_ablation import add_sae_options, random_sae_setup
from benchmarks.common import (
    add_model_options,
    alternating_seconds,
    report,
    run_model_benchmark,
)
from refusal_sae.attribution import attribution_scores


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sae_options(parser, "prompts attributed over (half toxic, half safe)")
    add_model_options(parser)
    return run_model_benchmark(parser.parse_args(argv), run, "bench_attribution_")


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    if args.quick:
        args.repeats, args.prompts = 1, 6
    wrapper, metric, prompts, saes, means = random_sae_setup(args, tmp)
    layers = list(saes)
    weights = np.where(np.arange(len(prompts)) < len(prompts) // 2, 1.0, -1.0) / (len(prompts) / 2)  # toxic - safe
    scores: dict[str, dict[str, np.ndarray]] = {}
    wrapper.prefix_continues = None  # the first call checks whether the cache can be continued
    checked: list[bool | None] = []

    def side(name: str) -> None:
        if checked:
            wrapper.prefix_continues = checked[0] if name == "prefix" else False
        got = attribution_scores(wrapper, saes, means, metric, prompts, weights, batch_size=args.batch_size)
        checked[:] = checked or [wrapper.prefix_continues]
        scores[name] = got.signed

    for name in ("prefix", "whole"):  # warm-up, and the one-time check
        side(name)
    if not checked[0]:
        raise SystemExit("this model's key/value cache cannot be continued: nothing to compare")
    times = alternating_seconds({name: lambda n=name: side(n) for name in ("prefix", "whole")}, args.repeats)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    scale = max(float(np.abs(v).max()) for v in scores["whole"].values())
    diff = max(float(np.abs(scores["prefix"][k] - scores["whole"][k]).max()) for k in layers) / scale
    same = diff < 1e-3

    rows = [{"side": name, "seconds_per_call": s} for name, s in seconds.items()]
    extra = {
        "model": args.model if not args.quick else "tiny random llama (--quick)", "quick": args.quick,
        "sae_layers": layers, "sae_width": args.width, "sae_k": args.k,
        "dtype": str(wrapper.dtype).removeprefix("torch."), "device": str(wrapper.device),
        "prompts": len(prompts), "batch_size": args.batch_size, "repeats": args.repeats,
        "shared_prefix_tokens": means.scheme.prefix,
        "prefix_over_whole": seconds["prefix"] / seconds["whole"], "seconds_each_repeat": times,
        "max_relative_score_difference": diff, "scores_equal": same,
    }
    result = report("attribution patching", rows, extra, args.out)
    print(f"attribution with the shared prefix run once: {extra['prefix_over_whole']:.2f}x the time of whole prompts "
          f"({len(prompts)} prompts, {means.scheme.prefix}-token prefix); largest score difference {diff:.2e} of the "
          "largest score")
    if not same:
        raise SystemExit(f"the prefix and whole-prompt node scores disagree by up to {diff:.3g} of the largest")
    return result


if __name__ == "__main__":
    main()
