"""Greedy answers under an edit vs the unedited batched generation, per new token.

The edit stage (`refusal_sae.editing`) generates every held-out prompt's answer under each edit of a circuit:
node edits run as residual hooks on every forward pass of `model.generate` (`refusal_sae.generation`), each an
SAE encode and a decoder matmul per edited layer. Two sides, over the same prompts, batches and answer length:
  edited     `generate(..., edits=...)`: a random circuit of --nodes latents mean-ablated (M \\ C) at every
             SAE layer, at the prompt's positions and every generated token (`edit_generated`, the costlier
             option);
  unedited   `generate(...)`.
Reported: seconds per new token of each side (median over repeats after a warm-up call of each; the repeats
alternate), edited/unedited (the goal: at most 1.3x).

Default: the embedded Qwen2.5-Coder-0.5B-Instruct, random SAEs at layers 12, 16, 20 (1536 latents, k 32), 16
prompts of the bundled sample, 24 new tokens at most, batches of 8. `--quick` uses a tiny random Llama.

    python -m benchmarks.bench_editing [--quick] [--model embedded] [--prompts 16] [--batch-size 8]
                                       [--max-new-tokens 24] [--nodes 30] [--repeats 3] [--out result.json]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_ablation import add_sae_options, random_sae_setup
from benchmarks.common import add_model_options, alternating_seconds, report, run_model_benchmark
from refusal_sae.ablation import Ablator
from refusal_sae.circuits import candidate_mask, random_mask
from refusal_sae.generation import generate


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sae_options(parser, "prompts answered (half toxic, half safe)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--nodes", type=int, default=30, help="latents of the ablated random circuit")
    add_model_options(parser)
    return run_model_benchmark(parser.parse_args(argv), run, "bench_editing_")


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    if args.quick:
        args.prompts, args.repeats, args.max_new_tokens, args.nodes = 6, 1, 8, 6
    wrapper, metric, prompts, saes, means = random_sae_setup(args, tmp)
    ablator = Ablator(wrapper, saes, means, metric, args.batch_size)
    candidates = candidate_mask({layer: means.live(layer) for layer in ablator.layers}, errors=False)
    shape = {layer: np.zeros_like(m) for layer, m in candidates.items()}
    last = means.scheme.node_classes.index("-1") if "-1" in means.scheme.node_classes else 0
    for layer in shape:  # --nodes latents spread over the layers at the generation position, drawn at random
        shape[layer][last, : args.nodes // len(shape)] = True
    circuit = random_mask(shape, candidates, np.random.default_rng(0))
    edits = {layer: ablator.edit(layer, keep)
             for layer, keep in ablator.variant(circuit, candidates, inside=False).items()}
    tokens: dict[str, int] = {}

    def side(name: str) -> None:
        got = generate(wrapper, prompts, args.max_new_tokens, args.batch_size, scheme=means.scheme,
                       edits=edits if name == "edited" else None, edit_generated=True)
        tokens[name] = sum(len(t) for t in got.tokens)

    names = ("edited", "unedited")
    for name in names:  # warm-up
        side(name)
    times = alternating_seconds({name: lambda n=name: side(n) for name in names}, args.repeats)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    rows = [{"side": name, "seconds": seconds[name], "new_tokens": tokens[name],
             "seconds_per_token": seconds[name] / max(1, tokens[name])} for name in names]
    extra = {
        "model": args.model if not args.quick else "tiny random llama (--quick)", "quick": args.quick,
        "dtype": str(wrapper.dtype).removeprefix("torch."), "device": str(wrapper.device),
        "sae_layers": list(saes), "sae_width": args.width, "sae_k": args.k,
        "nodes": int(sum(m.sum() for m in circuit.values())), "prompts": len(prompts),
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "seconds_each_repeat": times,
        "edited_over_unedited_per_token": rows[0]["seconds_per_token"] / rows[1]["seconds_per_token"],
    }
    result = report("generation under an edit", rows, extra, args.out)
    print(f"generation under an edit: {extra['edited_over_unedited_per_token']:.2f}x the unedited time per new token "
          f"({extra['nodes']} nodes ablated at {len(saes)} layers, prompt and generated tokens)")
    return result


if __name__ == "__main__":
    main()
