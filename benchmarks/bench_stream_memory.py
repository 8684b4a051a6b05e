"""Streaming memory: peak RSS while streaming one epoch from a cache, and from one 10x larger.

Both caches are written by the real pipeline (a random-weight tiny Llama with a wide residual stream, so
the cache is large while collection stays quick); each epoch is streamed in a fresh process, whose resident memory (RSS,
memory-mapped pages included) is sampled after every batch. RSS rises over the first batches while the
allocators warm up, then stays flat: `second_half_growth_mib` (peak of the epoch's second half minus
peak of its first half) is about 0 when memory does not grow with the data streamed. Memory is bounded if the 10x cache adds only a small constant.

`--quick`: 40 prompts, 3x, d_model 64 (a smoke run in seconds).

    python -m benchmarks.bench_stream_memory [--quick] [--prompts 400] [--shard-size 100] [--scale 10]
                                             [--d-model 1024] [--batch-size 1024] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import report

STREAM = """
import json, sys
import psutil
from refusal_sae.activations import TokenStream
process = psutil.Process()
stream = TokenStream(sys.argv[1], batch_size=int(sys.argv[2]), seed=0)
base = process.memory_info().rss
tokens, rss = 0, []
for batch in stream:
    tokens += len(next(iter(batch.values())))
    rss.append(process.memory_info().rss)
half = len(rss) // 2
print(json.dumps({"tokens": tokens, "baseline_mib": base / 2**20, "peak_mib": max(rss) / 2**20,
                  "first_half_peak_mib": max(rss[:half]) / 2**20, "second_half_peak_mib": max(rss[half:]) / 2**20}))
"""


def build_cache(model_dir: Path, prompts: list, directory: Path, shard_size: int) -> int:
    """Collect a cache for `prompts` (repeated sample prompts) with the tiny model; return its size in bytes."""
    from refusal_sae.activations import ActivationConfig, InferencePipeline
    from refusal_sae.model import ModelConfig, ModelWrapper

    cfg = ActivationConfig(layers=[0, 1], batch_size=32, shard_size=shard_size)
    InferencePipeline(ModelWrapper(ModelConfig(name=str(model_dir))), cfg, directory).run(
        {"discovery": prompts, "evaluation": []})
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=400, help="prompts in the small cache")
    parser.add_argument("--shard-size", type=int, default=100, help="prompts per shard (memory is bounded by a shard)")
    parser.add_argument("--scale", type=int, default=10, help="the large cache has this many times more")
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1024, help="tokens per streamed batch")
    parser.add_argument("--quick", action="store_true", help="small caches: a smoke run in seconds")
    parser.add_argument("--out", default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.shard_size, args.scale, args.d_model, args.batch_size = 40, 10, 3, 64, 64

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from refusal_sae.data import ORBenchLoader
    from tests.tiny_model import make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench_stream_"))
    model_dir = make_tiny_model(work / "model", n_layers=2, d_model=args.d_model, n_heads=8, n_kv_heads=8)
    samples = ORBenchLoader("sample").load()
    rows = []
    for name, n in (("small", args.prompts), ("large", args.prompts * args.scale)):
        size = build_cache(model_dir, [samples[i % len(samples)] for i in range(n)], work / name, args.shard_size)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        out = subprocess.run([sys.executable, "-c", STREAM, str(work / name), str(args.batch_size)], env=env,
                             check=True, capture_output=True, text=True).stdout
        stats = json.loads(out.strip().splitlines()[-1])
        rows.append({"cache": name, "prompts": n, "cache_mib": size / 2**20, "tokens_streamed": stats["tokens"],
                     "peak_rss_mib": stats["peak_mib"], "rss_over_baseline_mib": stats["peak_mib"] - stats["baseline_mib"],
                     "second_half_growth_mib": stats["second_half_peak_mib"] - stats["first_half_peak_mib"]})
    small, large = rows
    extra = {
        "quick": args.quick, "d_model": args.d_model, "batch_size": args.batch_size, "scale": args.scale,
        "shard_size": args.shard_size,
        "cache_size_ratio": large["cache_mib"] / small["cache_mib"],
        "peak_rss_ratio": large["peak_rss_mib"] / small["peak_rss_mib"],
        "peak_rss_increase_mib": large["peak_rss_mib"] - small["peak_rss_mib"],
    }
    result = report("streaming memory", rows, extra, args.out)
    print(f"a {extra['cache_size_ratio']:.1f}x larger cache raised peak RSS by "
          f"{extra['peak_rss_increase_mib']:.1f} MiB ({extra['peak_rss_ratio']:.2f}x)")
    return result


if __name__ == "__main__":
    main()
