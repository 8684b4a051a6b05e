"""Circuit evaluation cost: N ablation variants through `Ablator.scores` vs the whole model, and the floor.

Circuit evaluation scores the same prompts under many mean-ablation variants (`refusal_sae.ablation`).
The N variants here are all-layer circuits (a growing random share of the candidate nodes kept, the
rest ablated at every SAE layer), the evaluation's main cost. The sides, each over the same prompts:
  setup    what an Ablator pays once per prompt list (a circuit's held-out prompts): the check that the
           shared prefix's keys and values can be continued, and one forward pass to the deepest SAE
           layer caching the unedited residuals of the positions after the prefix;
  cached   `Ablator.scores` per variant after that setup: the blocks after the first SAE layer on the
           cached residuals, the SAE edits applied by hooks, the head at the last position only;
  whole    every variant runs the whole model, its edits hooked (`tests/whole_model.py`): the path
           `Ablator` replaced;
  floor    what `Ablator.scores` does without the SAE edits: the blocks after the first SAE layer on
           its cached residuals (and the shared prefix's cached keys and values, when it uses them), no
           hook, once per variant: what a variant cannot cost less than, so cached/floor is the price of
           the edits;
  floor x2 the floor with two variants' prompts in one forward pass (batches twice as large): what
           batching variants together could gain on this device at best;
  floor by length /B  the floor over the same prompts in batches of B (`--length-batch-sizes`), prompts of
           similar token length together (what `Ablator` does): fewer padded positions against more passes.
Reported: median seconds of each side (after a one-batch warm-up; the repeats alternate between the
sides, so a change of the machine's load hits all alike), per variant, whole/cached, cached/floor and
floor x2/floor, and the largest difference between the cached and whole per-prompt scores (they must agree
to float rounding, the tolerance of `refusal_sae.prefix.continuation_matches`; checked). A circuit's evaluation
runs hundreds of variants per setup, so the evaluation's cost per variant is `cached`; setup / variants is its
share when only N variants run.

The SAEs are random (seeded), their means computed as discovery does (positional classes) over a few
other prompts: the cost does not depend on what the features mean. Default: the embedded
Qwen2.5-Coder-0.5B-Instruct, SAEs at layers 12, 16, 20. `--quick` uses a tiny random 4-layer Llama
instead (a smoke run in seconds; its timings mean nothing).

    python -m benchmarks.bench_ablation [--quick] [--model embedded] [--layers 12,16,20] [--prompts 16]
                                        [--batch-size 8] [--variants 16] [--length-batch-sizes 8,16]
                                        [--repeats 3] [--out result.json]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
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
from refusal_sae.ablation import Ablator, Variant
from refusal_sae.circuits import candidate_mask
from refusal_sae.data import ORBenchLoader
from refusal_sae.features import NodeMeans
from refusal_sae.metric import RefusalMetric
from refusal_sae.model import ModelWrapper
from refusal_sae.sae import SAEConfig, SparseAutoencoder
from tests.whole_model import node_means, whole_model_scores


def pick_prompts(n_eval: int, n_means: int) -> tuple[list[str], list[str]]:
    """(evaluation prompts, prompts for the means): each half toxic, half safe, in file order."""
    samples = ORBenchLoader("sample").load()
    toxic = [s.prompt for s in samples if s.refusal_label]
    safe = [s.prompt for s in samples if not s.refusal_label]
    half, rest = n_eval // 2, n_means // 2
    return (toxic[:half] + safe[: n_eval - half],
            toxic[half : half + rest] + safe[n_eval - half : n_eval - half + n_means - rest])


def random_variants(abl: Ablator, n: int, rng: np.random.Generator) -> list[Variant]:
    """`n` all-layer circuits: the i-th keeps a random (i + 1) / (n + 1) of the candidate nodes."""
    nodes = candidate_mask({layer: abl.means.live(layer) for layer in abl.layers}, errors=True)
    return [abl.variant({layer: rng.random(m.shape) < (i + 1) / (n + 1) for layer, m in nodes.items()}, nodes)
            for i in range(n)]


def add_sae_options(parser: argparse.ArgumentParser, prompts: str) -> None:
    """Options of a benchmark over random SAEs on a model: --model, --layers, --width, --k, --prompts (`prompts`
    says what they are), --mean-prompts, --batch-size."""
    parser.add_argument("--model", default="embedded", help="data.model.name")
    parser.add_argument("--layers", default="12,16,20", help="SAE layers (block indices)")
    parser.add_argument("--width", type=int, default=1536, help="SAE latents")
    parser.add_argument("--k", type=int, default=32, help="SAE active latents per token")
    parser.add_argument("--prompts", type=int, default=16, help=prompts)
    parser.add_argument("--mean-prompts", type=int, default=8, help="other prompts the node means come from")
    parser.add_argument("--batch-size", type=int, default=8)


def random_sae_setup(args: argparse.Namespace, tmp: Path
                     ) -> tuple[ModelWrapper, RefusalMetric, list[str], dict[str, SparseAutoencoder], NodeMeans]:
    """The model, its metric, the prompts, seeded random SAEs at --layers and their node means (positional
    classes, over --mean-prompts other prompts, as discovery computes them). With --quick: 2 SAEs of 64 latents."""
    if args.quick:
        args.layers, args.width, args.k = "1,2", 64, 8
    wrapper, metric = load_model(args, tmp)
    layers = wrapper.resolve_layers([int(i) for i in args.layers.split(",")])
    prompts, mean_prompts = pick_prompts(args.prompts, args.mean_prompts)
    saes = {}
    for i, layer in enumerate(layers):
        torch.manual_seed(i)
        saes[layer] = SparseAutoencoder(SAEConfig(d_in=wrapper.d_model, num_latents=args.width, k=args.k))
        saes[layer].to(wrapper.device).eval()
    return wrapper, metric, prompts, saes, node_means(wrapper, saes, mean_prompts, "positional", tmp / "cache")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sae_options(parser, "evaluation prompts (half toxic, half safe)")
    parser.add_argument("--variants", type=int, default=16, help="ablation variants per side")
    parser.add_argument("--length-batch-sizes", default="8,16",
                        help="batch sizes of the 'floor by length' sides (prompts batched by token length)")
    add_model_options(parser)
    return run_model_benchmark(parser.parse_args(argv), run, "bench_ablation_")


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    if args.quick:
        args.repeats, args.variants = 1, 4
    wrapper, metric, prompts, saes, means = random_sae_setup(args, tmp)
    layers = list(saes)
    base = Ablator(wrapper, saes, means, metric, args.batch_size)
    first = base.layers[0]
    variants = random_variants(base, args.variants, np.random.default_rng(0))
    batches = base.residuals(prompts)  # the floor's input: the cached residuals (and prefix keys and values)

    results: dict[str, list[np.ndarray]] = {}

    fresh: list[Ablator] = []

    def setup() -> None:  # a fresh Ablator per repeat, its residuals cached
        fresh.append(Ablator(wrapper, saes, means, metric, args.batch_size))
        fresh[-1].residuals(prompts)

    def cached() -> None:  # on the residuals the setup just cached
        results["cached"] = [fresh[-1].scores(prompts, v) for v in variants]

    def whole() -> None:
        results["whole"] = [whole_model_scores(base, prompts, v) for v in variants]

    def floor_of(cached: list) -> Callable[[], None]:
        """The floor on residuals cached in some batching: every variant's passes without the edits."""
        @torch.no_grad()
        def run_floor() -> None:
            for _ in variants:
                for batch in cached:
                    metric.score(wrapper.suffix_last_token_logits(batch.hidden[first], batch.prompts.mask, first,
                                                                  past=batch.prompts.past))
        return run_floor

    floor = floor_of(batches)
    by_length = {f"floor by length /{b}": floor_of(Ablator(wrapper, saes, means, metric, b).residuals(prompts))
                 for b in (int(x) for x in args.length_batch_sizes.split(","))}
    doubled = Ablator(wrapper, saes, means, metric, 2 * args.batch_size).residuals(prompts + prompts)

    @torch.no_grad()
    def floor_x2() -> None:
        for _ in range(0, len(variants), 2):
            for batch in doubled:
                metric.score(wrapper.suffix_last_token_logits(batch.hidden[first], batch.prompts.mask, first,
                                                              past=batch.prompts.past))

    # warm-up (lazy initialisation, allocator, threads): one batch through each side, not all variants
    warm = prompts[: args.batch_size]
    Ablator(wrapper, saes, means, metric, args.batch_size).scores(warm, variants[0])
    whole_model_scores(base, warm, variants[0])
    metric.score(wrapper.suffix_last_token_logits(batches[0].hidden[first], batches[0].prompts.mask, first,
                                                  past=batches[0].prompts.past))
    # one repeat of each side in turn, so that a change of the machine's load hits all alike
    fns = {"setup": setup, "cached": cached, "whole": whole, "floor": floor, "floor x2": floor_x2, **by_length}
    times = alternating_seconds(fns, args.repeats)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    got, want = np.stack(results["cached"]), np.stack(results["whole"])
    diff = float(np.abs(got - want).max())
    scale = max(1.0, float(np.abs(want).max()))
    same = bool(np.allclose(got, want, rtol=1e-3, atol=1e-3 * scale))  # the tolerance of prefix.continuation_matches

    n = len(variants)
    index = int(first.removeprefix("residuals_"))
    rows = [{"side": name, "seconds": s, "seconds_per_variant": s / n} for name, s in seconds.items()
            if name != "setup"]
    extra = {
        "model": args.model if not args.quick else "tiny random llama (--quick)", "quick": args.quick,
        "n_layers": wrapper.n_layers, "sae_layers": layers, "sae_width": args.width, "sae_k": args.k,
        "dtype": str(wrapper.dtype).removeprefix("torch."), "device": str(wrapper.device),
        "prompts": len(prompts), "batch_size": args.batch_size, "variants": n, "repeats": args.repeats,
        "positions": means.scheme.to_dict(), "prefix_kv_cache": batches[0].prompts.past is not None,
        "blocks_per_variant": {"whole": wrapper.n_layers, "cached": wrapper.n_layers - index - 1,
                               "floor": wrapper.n_layers - index - 1},
        "speedup_cached_vs_whole": seconds["whole"] / seconds["cached"],
        "cached_over_floor": seconds["cached"] / seconds["floor"],
        "setup_seconds": seconds["setup"],
        "cached_with_setup_over_floor": (seconds["cached"] + seconds["setup"]) / seconds["floor"],
        "floor_x2_over_floor": seconds["floor x2"] / seconds["floor"],
        "floor_by_length_over_floor": {name: seconds[name] / seconds["floor"] for name in by_length},
        "seconds_each_repeat": times, "max_abs_score_difference": diff, "scores_equal": same,
    }
    result = report("ablation variants", rows, extra, args.out)
    print(f"cached residuals vs whole model: {extra['speedup_cached_vs_whole']:.2f}x faster per variant "
          f"({n} variants), {extra['cached_over_floor']:.2f}x the floor (with the setup of {seconds['setup']:.2f} s: "
          f"{extra['cached_with_setup_over_floor']:.2f}x); two variants per batch: "
          f"{extra['floor_x2_over_floor']:.2f}x the floor; largest score difference {diff:.2e}")
    if not same:
        raise SystemExit(f"the cached and whole-model scores disagree by up to {diff:.3g}")
    return result


if __name__ == "__main__":
    main()
