"""End to end: the wall time of `python -m refusal_sae fit` vs one plain forward pass over the same prompts.

Two sides, on the same machine in one run:
  fit      the whole command in a fresh process, in a fresh run directory (no activation cache to
           reuse): prompts, activation collection, SAE training, circuit discovery, the metric
           validity report and the ablation evaluation, timed from start to exit, as a user meets it;
  forward  `model(**batch)` (whole model and LM head, no hooks) over the run's prompts, batched as the
           config batches its activation collection, after one warm-up batch: the least any analysis
           of these prompts must do.
Reported: both times and fit/forward (how many plain passes over the data the whole pipeline costs); and
the report stage alone on the finished run (`analyze --stage report`, a fresh process: model load, one pass
over the cache per layer, logit lens, page), against the same forward pass.
The embedded model is built once beforehand
(~/.cache/refusal_sae) so its one-off dequantisation is not counted. The fit side is one cold run by
default (it takes tens of minutes with the default config on 2 CPU cores); `--repeats N` reports
the median of N.

`--quick` runs the default config on a tiny random 2-layer Llama and 60 prompts (timings mean nothing).

    python -m benchmarks.bench_end_to_end [--quick] [--config configs/default.yaml] [--repeats 1] [--out f.json]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from benchmarks.common import median_seconds, report
from refusal_sae.data import read_splits
from refusal_sae.model import ModelConfig, ModelWrapper

ROOT = Path(__file__).resolve().parents[1]


def command(args: list[str]) -> float:
    """Run `python -m refusal_sae <args>` in a fresh interpreter (its progress bars on our stderr); return its
    wall time."""
    print(" ".join(args), file=sys.stderr, flush=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "refusal_sae", *args], cwd=ROOT, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{args[0]} failed with exit status {done.returncode} (its messages are above)")
    return seconds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"), help="the fit config")
    parser.add_argument("--repeats", type=int, default=1, help="fit runs (the median is reported)")
    parser.add_argument("--quick", action="store_true", help="a tiny random model: a smoke run in seconds")
    parser.add_argument("--out", default=None, help="write the JSON result here")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench_end_to_end_"))
    if args.quick:
        from tests.tiny_model import tiny_fit_options

        options = [*tiny_fit_options(work), "--trainer.max_epochs", "2"]
        model = options[options.index("--data.model.name") + 1]
    else:
        options = ["--config", args.config]
        model = OmegaConf.load(args.config).data.model.name
    # loaded before the fit, so that building the embedded model once is not timed; reused for the forward side
    wrapper = ModelWrapper(ModelConfig(name=model))

    runs = [command(["fit", *options, "--run_dir", str(work / f"run_{i}")]) for i in range(args.repeats)]
    fit_seconds = statistics.median(runs)
    report_seconds = command(["analyze", "--run_dir", str(work / "run_0"), "--stage", "report", "--name", "report"])
    config = OmegaConf.load(work / "run_0" / "config.yaml")
    splits = read_splits(work / "run_0" / "data" / "prompts.csv")
    prompts = [s.prompt for split in splits.values() for s in split]
    size = config.data.activations.batch_size
    batches = [wrapper.tokenize(prompts[i : i + size]) for i in range(0, len(prompts), size)]

    @torch.no_grad()
    def forward(batches: list) -> None:
        for b in batches:
            wrapper.model(input_ids=b["input_ids"].to(wrapper.device),
                          attention_mask=b["attention_mask"].to(wrapper.device))

    forward(batches[:1])  # warm-up
    forward_seconds = median_seconds(lambda: forward(batches), repeats=1, warmup=0)
    rows = [{"side": "fit", "seconds": fit_seconds}, {"side": "plain forward", "seconds": forward_seconds}]
    extra = {
        "config": "tiny random llama, default config (--quick)" if args.quick else args.config,
        "quick": args.quick, "model": model, "prompts": len(prompts), "batch_size": size,
        "repeats": args.repeats, "fit_seconds_each": runs,
        "fit_vs_forward": fit_seconds / forward_seconds, "report_seconds": report_seconds,
    }
    result = report("end to end", rows, extra, args.out)
    print(f"fit takes {extra['fit_vs_forward']:.0f} plain forward passes over its {len(prompts)} prompts")
    return result

