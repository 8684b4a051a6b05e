"""Circuit evaluation cost: one threshold sweep with the cached prefix vs the whole model per variant, in one run.

`evaluate_sweep` scores the same prompts under 2 + 4 x (sweep points) ablation variants (F(M), F(∅),
and F(C), F(M\\C) of each sweep point's circuit and of a random circuit of equal size). Two sides:
  full     `AblationConfig(prefix_cache=False)`: every variant runs the whole model (all blocks, final
           norm, head at the last position), the SAE edits applied by hooks;
  cached   `AblationConfig(prefix_cache=True)`: the blocks up to the first SAE layer run once per
           prompt batch (timed too: a fresh Ablator per repeat), every variant runs only the blocks
           after that layer, the final norm and the head at the last position.
Reported: median seconds of one whole sweep per side (after a one-batch warm-up of each; the repeats alternate
between the sides, so a change of the machine's load hits both alike), full/cached speed-up, and the
largest difference between the two sides' F values (they must agree to float rounding; checked).

The SAEs are random (seeded) with feature and error means from a few other prompts: the cost does
not depend on what the features mean. Default: the embedded Qwen2.5-Coder-0.5B-Instruct, SAEs at
layers 12, 16, 20. `--quick` uses a tiny random 4-layer Llama instead (a smoke run in seconds; its
timings mean nothing).

    python -m benchmarks.bench_ablation [--quick] [--model embedded] [--layers 12,16,20] [--prompts 16]
                                        [--batch-size 8] [--points 4] [--repeats 3] [--out result.json]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import median_seconds, report
from refusal_sae.ablation import AblationConfig, Ablator, evaluate_sweep
from refusal_sae.circuits import ERROR, Circuit, Node
from refusal_sae.data import ORBenchLoader
from refusal_sae.metric import RefusalMetric, RefusalMetricConfig
from refusal_sae.model import ModelConfig, ModelWrapper
from refusal_sae.sae import SAEConfig, SparseAutoencoder


def pick_prompts(n_eval: int, n_means: int) -> tuple[list[str], np.ndarray, list[str]]:
    """(evaluation prompts, their toxic labels, prompts for the means): half toxic, half safe, file order."""
    samples = ORBenchLoader("sample").load()
    toxic = [s.prompt for s in samples if s.refusal_label]
    safe = [s.prompt for s in samples if not s.refusal_label]
    half, rest = n_eval // 2, n_means // 2
    prompts = toxic[:half] + safe[: n_eval - half]
    positive = np.array([True] * half + [False] * (n_eval - half))
    return prompts, positive, toxic[half : half + rest] + safe[n_eval - half : n_eval - half + n_means - rest]


@torch.no_grad()
def means(wrapper: ModelWrapper, saes: dict[str, SparseAutoencoder], prompts: list[str], batch_size: int):
    """Per layer: mean latent activations and mean SAE error over the real tokens of `prompts`."""
    sums_f = {layer: 0.0 for layer in saes}
    sums_e = {layer: 0.0 for layer in saes}
    n = 0
    for start in range(0, len(prompts), batch_size):
        enc = wrapper.tokenize(prompts[start : start + batch_size], "right")
        residuals = wrapper.residuals(enc["input_ids"], enc["attention_mask"], list(saes))
        mask = enc["attention_mask"].bool().to(wrapper.device)
        n += int(mask.sum())
        for layer, sae in saes.items():
            x = residuals[layer][mask].float()
            f = sae.encode(x)
            sums_f[layer] = sums_f[layer] + f.sum(0)
            sums_e[layer] = sums_e[layer] + (x - sae.decode(f)).sum(0)
    def mean(sums: dict) -> dict[str, np.ndarray]:
        return {layer: (total / n).cpu().numpy() for layer, total in sums.items()}

    return mean(sums_f), mean(sums_e)


def sweep_of(layers: list[str], candidates: dict[str, np.ndarray], points: int, rng: np.random.Generator):
    """A nested sweep of `points` circuits, largest first: 64, 32, 16, ... random firing latents per layer,
    plus the first layer's error node in the larger half."""
    sizes = [max(1, 64 >> i) for i in range(points)]
    order = {layer: rng.permutation(candidates[layer]) for layer in layers}
    sweep = []
    for i, size in enumerate(sizes):
        nodes = [Node(layer, int(j), 1.0) for layer in layers for j in order[layer][:size]]
        if i < (points + 1) // 2:
            nodes.append(Node(layers[0], ERROR, 1.0))
        sweep.append(Circuit("bench", "all", "correlation", layers, nodes, threshold=0.1 * (i + 1), top_n=size))
    return sweep[0], sweep


def f_values(result: dict) -> list[float]:
    """Every F in an `evaluate_sweep` result, in a fixed order."""
    values = [result["F_M"], result["F_empty"]]
    for point in result["points"]:
        values += [point[side][key] for side in ("circuit", "random") for key in ("F_C", "F_M_minus_C")]
    return values


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="data.model.name")
    parser.add_argument("--layers", default="12,16,20", help="SAE layers (block indices)")
    parser.add_argument("--width", type=int, default=1536, help="SAE latents")
    parser.add_argument("--k", type=int, default=32, help="SAE active latents per token")
    parser.add_argument("--prompts", type=int, default=16, help="evaluation prompts (half toxic, half safe)")
    parser.add_argument("--mean-prompts", type=int, default=8, help="other prompts the feature means come from")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--points", type=int, default=4, help="sweep points (2 + 4 x points variants)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="a tiny random model: a smoke run in seconds")
    parser.add_argument("--out", default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    if args.quick and args.threads is None:
        args.threads = 1  # tiny matrices: a second thread only adds synchronisation
    if args.threads:
        torch.set_num_threads(args.threads)

    metric_cfg = None
    if args.quick:
        from tests.tiny_model import make_tiny_model

        args.model = str(make_tiny_model(Path(tempfile.mkdtemp(prefix="bench_ablation_")) / "model", n_layers=4))
        args.layers, args.width, args.k, args.repeats = "1,2", 64, 8, 1
        metric_cfg = RefusalMetricConfig(refusal_openers=["not"], compliance_openers=["how"], space_variants=False)
    wrapper = ModelWrapper(ModelConfig(name=args.model, device=args.device, dtype=args.dtype))
    layers = wrapper.resolve_layers([int(i) for i in args.layers.split(",")])
    metric = RefusalMetric.from_wrapper(wrapper, metric_cfg)
    prompts, positive, mean_prompts = pick_prompts(args.prompts, args.mean_prompts)

    saes = {}
    for i, layer in enumerate(layers):
        torch.manual_seed(i)
        saes[layer] = SparseAutoencoder(SAEConfig(d_in=wrapper.d_model, num_latents=args.width, k=args.k))
        saes[layer].to(wrapper.device).eval()
    feature_means, error_means = means(wrapper, saes, mean_prompts, args.batch_size)
    candidates = {layer: np.flatnonzero(m > 0) for layer, m in feature_means.items()}
    circuit, sweep = sweep_of(layers, candidates, args.points, np.random.default_rng(0))

    results: dict[str, dict] = {}

    def side(name: str, cache: bool):
        def run() -> None:  # a fresh Ablator: the cached side pays for its prefix every time
            cfg = AblationConfig(batch_size=args.batch_size, prefix_cache=cache)
            ablator = Ablator(wrapper, saes, feature_means, error_means, metric, cfg)
            results[name] = evaluate_sweep(ablator, prompts, positive, circuit, sweep, candidates)

        return run

    # warm-up (lazy initialisation, allocator, threads): one batch through both paths, not a whole sweep
    for cache in (False, True):
        warm = Ablator(wrapper, saes, feature_means, error_means, metric,
                       AblationConfig(batch_size=args.batch_size, prefix_cache=cache))
        warm.scores(prompts[: args.batch_size], warm.keep_nothing())
    # one repeat of each side in turn, so that a change of the machine's load hits both alike
    fns = {name: side(name, cache) for name, cache in (("full", False), ("cached", True))}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for repeat in range(args.repeats):
        for name, fn in fns.items():
            times[name].append(median_seconds(fn, 1, warmup=0))
            print(f"repeat {repeat + 1}/{args.repeats} {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    full_f, cached_f = f_values(results["full"]), f_values(results["cached"])
    diff = max(abs(a - b) for a, b in zip(full_f, cached_f))
    scale = max(1.0, *(abs(a) for a in full_f))
    same = all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4 * scale) for a, b in zip(full_f, cached_f))

    variants = 2 + 4 * len(sweep)
    first = min(int(name.removeprefix("residuals_")) for name in layers)
    rows = [{"side": name, "sweep_seconds": s, "seconds_per_variant": s / variants} for name, s in seconds.items()]
    extra = {
        "model": args.model if not args.quick else "tiny random llama (--quick)", "quick": args.quick,
        "n_layers": wrapper.n_layers, "sae_layers": layers, "sae_width": args.width, "sae_k": args.k,
        "dtype": str(wrapper.dtype).removeprefix("torch."), "device": str(wrapper.device),
        "prompts": len(prompts), "batch_size": args.batch_size, "sweep_points": len(sweep),
        "variants_per_sweep": variants, "repeats": args.repeats,
        "blocks_per_sweep": {"full": variants * wrapper.n_layers,
                             "cached": first + 1 + variants * (wrapper.n_layers - first - 1)},
        "speedup_cached_vs_full": seconds["full"] / seconds["cached"],
        "seconds_each_repeat": times, "max_abs_F_difference": diff, "F_values_equal": same,
        "F_M": results["full"]["F_M"], "F_empty": results["full"]["F_empty"],
    }
    result = report("ablation sweep evaluation", rows, extra, args.out)
    print(f"cached prefix vs whole model: {extra['speedup_cached_vs_full']:.2f}x faster per sweep "
          f"({variants} variants); largest F difference {diff:.2e}")
    if not same:
        raise SystemExit(f"the two sides disagree: full {full_f} vs cached {cached_f}")
    return result


if __name__ == "__main__":
    main()
