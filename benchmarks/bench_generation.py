"""Greedy answers for the metric's validity report: batched generation vs one prompt per `generate` call.

`refusal_sae.validity.generate_answers` greedy-decodes a short answer per held-out prompt, left-padded batches
through the model's own `generate` (its key/value cache: each new token runs one position). Two sides, over the
same prompts:
  batched   `generate_answers(..., batch_size=B)`;
  single    `generate_answers(..., batch_size=1)`: a plain `generate` call per prompt.
Reported: new tokens per second of each side (median over repeats after a warm-up call of each; the repeats
alternate), batched/single, and whether both give the same answers (checked: left padding must not change
what a prompt generates, up to float ties).

Default: the embedded Qwen2.5-Coder-0.5B-Instruct, 16 prompts of the bundled sample (half toxic, half safe), 24
new tokens at most, batches of 8. `--quick` uses a tiny random 4-layer Llama (a smoke run; timings mean nothing).

    python -m benchmarks.bench_generation [--quick] [--model embedded] [--prompts 16] [--batch-size 8]
                                          [--max-new-tokens 24] [--repeats 3] [--out result.json]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from benchmarks.bench_metric import pick_prompts
from benchmarks.common import (
    add_model_options,
    alternating_seconds,
    load_model,
    report,
    run_model_benchmark,
)
from refusal_sae.validity import generate_answers


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="data.model.name")
    parser.add_argument("--prompts", type=int, default=16, help="prompts (half toxic, half safe)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    add_model_options(parser)
    return run_model_benchmark(parser.parse_args(argv), run, "bench_generation_")


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    if args.quick:
        args.prompts, args.repeats, args.max_new_tokens = 6, 1, 8
    wrapper, _ = load_model(args, tmp)
    prompts = pick_prompts(args.prompts)
    answers: dict[str, list[str]] = {}
    sizes = {"batched": args.batch_size, "single": 1}

    def side(name: str) -> None:
        answers[name] = generate_answers(wrapper, prompts, args.max_new_tokens, sizes[name])

    for name in sizes:  # warm-up
        side(name)
    times = alternating_seconds({name: lambda n=name: side(n) for name in sizes}, args.repeats)
    new_tokens = {name: sum(len(wrapper.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers[name])
                  for name in sizes}
    seconds = {name: statistics.median(t) for name, t in times.items()}
    rows = [{"side": name, "seconds": seconds[name], "new_tokens": new_tokens[name],
             "tokens_per_s": new_tokens[name] / seconds[name]} for name in sizes]
    same = sum(a == b for a, b in zip(answers["batched"], answers["single"]))
    extra = {
        "model": args.model if not args.quick else "tiny random llama (--quick)", "quick": args.quick,
        "dtype": str(wrapper.dtype).removeprefix("torch."), "device": str(wrapper.device),
        "prompts": len(prompts), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats, "seconds_each_repeat": times,
        "batched_over_single_tokens_per_s": rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"],
        "same_answers": same,
    }
    result = report("greedy generation", rows, extra, args.out)
    print(f"batched generation: {extra['batched_over_single_tokens_per_s']:.2f}x the tokens/s of one prompt per call; "
          f"{same}/{len(prompts)} answers identical")
    return result


if __name__ == "__main__":
    main()
