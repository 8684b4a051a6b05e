"""Activation collection on a tiny model, as the cache tests run it: in this process (`collect`), or in a
child interpreter that a test may kill (`run_child`, running `CHILD`), and a cache directory's files (`tree`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from refusal_sae.activations import ActivationCache, ActivationConfig, InferencePipeline
from refusal_sae.model import ModelConfig, ModelWrapper
from tests.conftest import ROOT


def collect(model_dir: Path, cache_dir: Path, splits, **kwargs) -> ActivationCache:
    cfg = ActivationConfig(**{"layers": [0, "residuals_2"], "shard_size": 16, "batch_size": 5, **kwargs})
    return InferencePipeline(ModelWrapper(ModelConfig(name=str(model_dir))), cfg, cache_dir).run(splits)


CHILD = """
import sys
from refusal_sae.activations import ActivationConfig, InferencePipeline
from refusal_sae.data import read_splits
from refusal_sae.model import ModelConfig, ModelWrapper
model_dir, prompts_csv, cache_dir = sys.argv[1:4]
cfg = ActivationConfig(layers=[0, 1, 2], shard_size=4, batch_size=2)
InferencePipeline(ModelWrapper(ModelConfig(name=model_dir)), cfg, cache_dir).run(read_splits(prompts_csv))
"""


def run_child(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
