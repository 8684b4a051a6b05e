"""Activation collection throughput: the pipeline vs a plain `output_hidden_states` loop, in one run.

Three sides over the same prompts, batches and model:
  plain      `model(**batch, output_hidden_states=True)`, the whole model and LM head, hidden states
             of the hooked layers copied to the CPU (what a notebook does);
  hooks      `ModelWrapper.residuals`: forward hooks, the pass stopped after the last hooked block;
  pipeline   `InferencePipeline.run`: hooks plus writing, hashing and recording the sharded cache.
Reported: real (non-padding) tokens per second of each, pipeline/plain speed-up, and the cache-writing
overhead (hooks time vs pipeline time).

`--quick` uses a tiny random 2-layer Llama instead (a smoke run in seconds; its timings mean nothing).

    python -m benchmarks.bench_collection [--quick] [--model embedded] [--prompts 40] [--repeats 3] [--out f.json]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import median_seconds, report
from refusal_sae.activations import ActivationConfig, InferencePipeline
from refusal_sae.data import PromptConfig, build_prompts
from refusal_sae.model import ModelConfig, ModelWrapper


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="data.model.name")
    parser.add_argument("--layers", default="12,16,20", help="hooked layers (block indices)")
    parser.add_argument("--prompts", type=int, default=40,
                        help="prompts (a multiple of 20, at least 40: n per category x 2 labels x 10)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a tiny random model: a smoke run in seconds")
    parser.add_argument("--out", default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    if args.quick:
        from tests.tiny_model import make_tiny_model

        args.model = str(make_tiny_model(Path(tempfile.mkdtemp(prefix="bench_collection_")) / "model"))
        args.layers, args.prompts, args.repeats = "0,1", 40, 1

    work = Path(tempfile.mkdtemp(prefix="bench_collection_"))
    splits = build_prompts(PromptConfig(balance="n_per_category", n_per_category=max(2, args.prompts // 20))).splits
    wrapper = ModelWrapper(ModelConfig(name=args.model))
    layers = wrapper.resolve_layers([int(i) for i in args.layers.split(",")])
    prompts = [s.prompt for split in ("discovery", "evaluation") for s in splits[split]]
    batches = [wrapper.tokenize(prompts[i : i + args.batch_size]) for i in range(0, len(prompts), args.batch_size)]
    n_tokens = int(sum(b["attention_mask"].sum() for b in batches))
    indices = [int(name.removeprefix("residuals_")) for name in layers]

    @torch.no_grad()
    def plain() -> None:
        for b in batches:
            out = wrapper.model(input_ids=b["input_ids"].to(wrapper.device),
                                attention_mask=b["attention_mask"].to(wrapper.device), output_hidden_states=True)
            _ = [out.hidden_states[i + 1].cpu() for i in indices]

    def hooks() -> None:
        for b in batches:
            _ = {k: v.cpu() for k, v in wrapper.residuals(b["input_ids"], b["attention_mask"], layers).items()}

    run = iter(range(10_000))

    def pipeline() -> None:
        cfg = ActivationConfig(layers=layers, batch_size=args.batch_size, shard_size=len(prompts), verify=False)
        InferencePipeline(wrapper, cfg, work / f"cache_{next(run)}").run(splits)

    seconds = {name: median_seconds(fn, args.repeats) for name, fn in
               (("plain", plain), ("hooks", hooks), ("pipeline", pipeline))}
    rows = [{"side": name, "seconds": s, "tokens_per_s": n_tokens / s} for name, s in seconds.items()]
    extra = {
        "model": "tiny random llama (--quick)" if args.quick else args.model, "quick": args.quick,
        "layers": layers, "prompts": len(prompts), "tokens": n_tokens,
        "batch_size": args.batch_size, "repeats": args.repeats, "n_layers": wrapper.n_layers,
        "speedup_pipeline_vs_plain": seconds["plain"] / seconds["pipeline"],
        "cache_writing_overhead": seconds["pipeline"] / seconds["hooks"] - 1,
    }
    result = report("activation collection", rows, extra, args.out)
    print(f"pipeline vs plain: {extra['speedup_pipeline_vs_plain']:.2f}x faster; "
          f"cache writing adds {100 * extra['cache_writing_overhead']:.1f}% to the hooked forward passes")
    return result


if __name__ == "__main__":
    main()
