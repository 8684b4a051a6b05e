"""What every benchmark shares: the machine's description, repeated timing, and the report."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from refusal_sae.io import write_json
from refusal_sae.metric import RefusalMetric, RefusalMetricConfig
from refusal_sae.model import ModelConfig, ModelWrapper


def machine() -> dict[str, Any]:
    """Where the numbers were measured: CPU, memory, threads, GPU, library versions."""
    from importlib.metadata import PackageNotFoundError, version

    import lightning
    import psutil
    import transformers

    try:
        sparsify = version("eai-sparsify")
    except PackageNotFoundError:
        sparsify = None
    return {
        "platform": platform.platform(),
        "processor": _cpu_model() or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "eai_sparsify": sparsify,
    }


def describe(m: dict[str, Any]) -> str:
    """One line for a table's caption: what `machine()` found."""
    where = m["gpu"] or f"no GPU, {m['cpu_count']} CPU cores ({m['cpu_threads']} torch threads)"
    return (f"{where}, {m['processor']}, {m['memory_gib']} GiB; torch {m['torch']}, "
            f"transformers {m['transformers']}, lightning {m['lightning']}, eai-sparsify {m['eai_sparsify']}")


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` runs after `warmup` unmeasured runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def alternating_seconds(sides: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall time of each side per repeat, one call of each side in turn per repeat (so a change of the machine's
    load hits all alike), each printed as it is measured; warm-ups are the caller's."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    for repeat in range(repeats):
        for name, fn in sides.items():
            times[name].append(median_seconds(fn, 1, warmup=0))
            print(f"repeat {repeat + 1}/{repeats} {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
    return times


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options of a benchmark that runs a language model: --repeats, --device, --dtype, --threads, --quick
    and --out (read by `run_model_benchmark`)."""
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="a tiny random model: a smoke run in seconds")
    parser.add_argument("--out", default=None, help="write the JSON result here")


def run_model_benchmark(args: argparse.Namespace, run: Callable[[argparse.Namespace, Path], dict[str, Any]],
                        prefix: str) -> dict[str, Any]:
    """`run(args, tmp)` with torch's threads set from --threads (1 with --quick unless given: on tiny matrices a
    second thread only adds synchronisation), `tmp` a temporary directory for the quick model and any cache."""
    if args.quick and args.threads is None:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        return run(args, Path(tmp))


def load_model(args: argparse.Namespace, tmp: Path) -> tuple[ModelWrapper, RefusalMetric]:
    """The model --model names and its default refusal metric; with --quick a tiny random 4-layer Llama written
    to `tmp` (`args.model` then names it) and a metric of words its vocabulary knows."""
    metric_cfg = None
    if args.quick:
        from tests.tiny_model import make_tiny_model

        args.model = str(make_tiny_model(tmp / "model", n_layers=4))
        metric_cfg = RefusalMetricConfig(refusal_openers=["not"], compliance_openers=["how"], space_variants=False)
    wrapper = ModelWrapper(ModelConfig(name=args.model, device=args.device, dtype=args.dtype))
    return wrapper, RefusalMetric.from_wrapper(wrapper, metric_cfg)


def report(name: str, rows: list[dict[str, Any]], extra: dict[str, Any], out: str | None) -> dict[str, Any]:
    """Print `rows` as a table and write everything as JSON to `out` (if given)."""
    result = {"benchmark": name, "machine": machine(), **extra, "rows": rows}
    print(f"\n{name}\n{table(rows)}")
    if out:
        write_json(Path(out), result)
    else:
        print(json.dumps(extra, indent=1))
    return result


def table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """`rows` (dicts with the same keys) as aligned plain text, or as a Markdown table."""
    columns = list(rows[0])
    cells = [columns, *([_fmt(r[c]) for c in columns] for r in rows)]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join([lines[0], "|" + "---|" * len(columns), *lines[1:]])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
