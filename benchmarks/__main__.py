"""Every benchmark in one run, on this machine (a GPU when torch sees one): one table, one JSON.

    python -m benchmarks [--quick] [--only collection,sae,memory,ablation,metric,attribution,generation,editing,
                         end_to_end]
                         [--out runs/benchmarks]

  collection   activation collection (hooks + cache) vs a plain output_hidden_states loop  bench_collection
  sae          a top-k SAE training step vs eai-sparsify's and vs the dense matmul floor    bench_sae
  memory       peak RSS streaming a 10x larger activation cache vs the small one            bench_stream_memory
  ablation     ablation variants with cached residuals vs the whole model, and vs the floor bench_ablation
  metric       refusal scores with the shared prefix run once per call vs whole prompts    bench_metric
  attribution  attribution patching with the shared prefix run once vs whole prompts       bench_attribution
  generation   greedy answers, batched vs one prompt per generate call (tokens/s)          bench_generation
  editing      greedy answers under a circuit's ablation vs unedited, per new token         bench_editing
  end_to_end   `fit --config configs/default.yaml` vs one plain forward pass of its prompts bench_end_to_end
               (and the report stage alone on that run, vs the same pass)

Each row of the table is one comparison: side a, side b, and a/b. Timings are medians over repeats
after a warm-up (see each module's docstring for its protocol; `python -m benchmarks.bench_sae --help`
etc. run one with other settings). Writes `<out>/results.json` (machine, versions, the rows, and each
benchmark's full result) and `<out>/results.md` (the table as docs/benchmarks.md shows it). On 2 quiet CPU cores
the ablation, metric, attribution and generation benchmarks take 14 minutes together, the end-to-end one 7.
`--quick` runs every benchmark on tiny models and shapes in a minute or two: CI runs it so the suite cannot
rot; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks import (
    bench_ablation,
    bench_attribution,
    bench_collection,
    bench_editing,
    bench_end_to_end,
    bench_generation,
    bench_metric,
    bench_sae,
    bench_stream_memory,
)
from benchmarks.common import describe, machine, table
from refusal_sae.io import atomic_open, write_json

Row = dict[str, Any]

#: name -> (module, its options for a full run). The SAE runs at the shape the SAE issue set its goal
#: at (d_in 896, 7168 latents, k 32, 4096 tokens); the ablation benchmark at the shape of one OR-Bench
#: category's evaluation (20 held-out toxic prompts in one batch of 48), 16 variants per side.
BENCHMARKS: dict[str, tuple[Any, list[str]]] = {
    "collection": (bench_collection, []),
    "sae": (bench_sae, ["--expansion", "8", "--batch", "4096", "--steps", "20"]),
    "memory": (bench_stream_memory, []),
    "ablation": (bench_ablation, ["--prompts", "20", "--batch-size", "48", "--variants", "16"]),
    "metric": (bench_metric, []),
    "attribution": (bench_attribution, []),
    "generation": (bench_generation, []),
    "editing": (bench_editing, []),
    "end_to_end": (bench_end_to_end, []),
}


def _row(benchmark: str, measure: str, a: str, a_value: float, b: str, b_value: float) -> Row:
    return {"benchmark": benchmark, "measure": measure, "a": a, "a_value": a_value, "b": b, "b_value": b_value,
            "a/b": a_value / b_value}


def _collection(r: dict) -> list[Row]:
    side = {row["side"]: row for row in r["rows"]}
    return [_row("activation collection", "tokens/s", "pipeline (hooks + cache)", side["pipeline"]["tokens_per_s"],
                 "plain forward, output_hidden_states", side["plain"]["tokens_per_s"])]


def _sae(r: dict) -> list[Row]:
    side = {row["side"]: row for row in r["rows"]}
    ours, theirs, floor = side["refusal_sae"], side["sparsify"], side["dense encoder matmul (floor)"]
    rows = [_row("SAE training step", "ms/step", "refusal_sae", ours["step_ms"], "eai-sparsify", theirs["step_ms"]),
            _row("SAE training step", "ms/step", "refusal_sae", ours["step_ms"], "dense encoder matmul (floor)",
                 floor["step_ms"])]
    if "refusal_sae, PyTorch ops" in side:  # CPU: what the C kernels save
        rows.append(_row("SAE training step", "ms/step", "refusal_sae", ours["step_ms"],
                         "refusal_sae without C kernels", side["refusal_sae, PyTorch ops"]["step_ms"]))
    return [*rows, _row("SAE quality", "FVU (held out)", "refusal_sae", ours["fvu"], "eai-sparsify", theirs["fvu"])]


def _memory(r: dict) -> list[Row]:
    small, large = r["rows"]
    return [_row("streaming memory", "peak RSS MiB", f"{large['cache_mib']:.3g} MiB cache",
                 large["peak_rss_mib"], f"{small['cache_mib']:.3g} MiB cache", small["peak_rss_mib"])]


def _ablation(r: dict) -> list[Row]:
    side = {row["side"]: row for row in r["rows"]}
    measure, cached = f"s/variant ({r['variants']} variants)", side["cached"]["seconds_per_variant"]
    return [_row("ablation variants", measure, "cached residuals", cached, "whole model, edits hooked",
                 side["whole"]["seconds_per_variant"]),
            _row("ablation variants", measure, "cached residuals", cached,
                 "floor: later blocks, no edits", side["floor"]["seconds_per_variant"]),
            _row("ablation variants", measure, "floor, two variants per batch", side["floor x2"]["seconds_per_variant"],
                 "floor: later blocks, no edits", side["floor"]["seconds_per_variant"]),
            *[_row("ablation variants", measure, f"floor, prompts by length in batches of {name.rsplit('/', 1)[1]}",
                   side[name]["seconds_per_variant"], f"floor: later blocks, batches of {r['batch_size']}",
                   side["floor"]["seconds_per_variant"]) for name in side if name.startswith("floor by length")],
            _row("ablation setup", "s per prompt list", "prefix check + cached residuals", r["setup_seconds"],
                 "floor: one variant", side["floor"]["seconds_per_variant"])]


def _metric(r: dict) -> list[Row]:
    side = {row["side"]: row["seconds_per_call"] for row in r["rows"]}
    measure = f"s/call ({r['prompts']} prompts)"
    return [_row("refusal scores" + ("" if hook == "plain" else f", {hook}"), measure,
                 f"shared prefix once ({r['shared_prefix_tokens']} tokens)", side[f"{hook}, prefix"],
                 "whole prompts", side[f"{hook}, whole"]) for hook in r["prefix_over_whole"]]


def _attribution(r: dict) -> list[Row]:
    side = {row["side"]: row["seconds_per_call"] for row in r["rows"]}
    return [_row("attribution patching", f"s/call ({r['prompts']} prompts)",
                 f"shared prefix once ({r['shared_prefix_tokens']} tokens)", side["prefix"], "whole prompts",
                 side["whole"])]


def _generation(r: dict) -> list[Row]:
    side = {row["side"]: row["tokens_per_s"] for row in r["rows"]}
    return [_row("greedy generation", f"new tokens/s ({r['prompts']} prompts)", f"batched ({r['batch_size']} per call)",
                 side["batched"], "one prompt per generate call", side["single"])]


def _editing(r: dict) -> list[Row]:
    side = {row["side"]: row["seconds_per_token"] for row in r["rows"]}
    return [_row("generation under an edit", f"s/new token ({r['prompts']} prompts)",
                 f"{r['nodes']} nodes ablated, every token", side["edited"], "unedited", side["unedited"])]


def _end_to_end(r: dict) -> list[Row]:
    fit, forward = r["rows"]
    return [_row("end to end", f"s ({r['prompts']} prompts)", "fit, default config", fit["seconds"],
                 "one plain forward pass", forward["seconds"]),
            _row("report", f"s ({r['prompts']} prompts)", "analyze --stage report", r["report_seconds"],
                 "one plain forward pass", forward["seconds"])]


SUMMARIES: dict[str, Callable[[dict], list[Row]]] = {
    "collection": _collection, "sae": _sae, "memory": _memory, "ablation": _ablation, "metric": _metric,
    "attribution": _attribution, "generation": _generation, "editing": _editing,
    "end_to_end": _end_to_end,
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and shapes: a smoke run (CI)")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated names of the benchmarks to run")
    parser.add_argument("--out", default="runs/benchmarks", help="directory for results.json and results.md")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")

    started, where, threads = datetime.now(timezone.utc), machine(), torch.get_num_threads()
    results, rows = {}, []
    for name in names:
        module, options = BENCHMARKS[name]
        print(f"== {name} ==", file=sys.stderr, flush=True)
        results[name] = module.main(["--quick"] if args.quick else options)
        torch.set_num_threads(threads)  # a benchmark may have changed it for itself
        rows += SUMMARIES[name](results[name])

    suite = {
        "suite": "refusal_sae benchmarks", "quick": args.quick, "started": started.isoformat(timespec="seconds"),
        "seconds": (datetime.now(timezone.utc) - started).total_seconds(), "machine": where,
        "command": " ".join(["python -m benchmarks", *(["--quick"] if args.quick else []),
                             *([f"--only {','.join(names)}"] if names != list(BENCHMARKS) else [])]),
        "rows": rows, "results": results,
    }
    out = Path(args.out)
    write_json(out / "results.json", suite)
    caption = (f"`{suite['command']}` on {describe(where)}; {started:%Y-%m-%d}."
               + (" Quick mode: tiny models, timings mean nothing." if args.quick else ""))
    with atomic_open(out / "results.md") as f:
        f.write(f"{table(rows, markdown=True)}\n\n{caption}\n")
    print(f"\n{table(rows)}\n\n{caption}\nwritten: {out / 'results.json'}, {out / 'results.md'}")
    return suite


if __name__ == "__main__":
    main()
