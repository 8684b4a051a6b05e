"""The numbers of the evaluation half, byte for byte: an evaluation record (every curve, interval and sanity
field), every variant's per-prompt scores, attribution node scores (patching and integrated gradients) and the
refusal metric's scores on the planted template model, compared with `tests/golden/planted.json`.

A refactor must leave every number as it was. A change that means to change numbers rewrites the file
(`REFUSAL_SAE_WRITE_GOLDEN=1 pytest tests/test_golden.py`) and says why in its commit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from refusal_sae.ablation import Ablator
from refusal_sae.activations import (
    ActivationConfig,
    InferencePipeline,
    PromptActivations,
)
from refusal_sae.attribution import attribution_scores
from refusal_sae.circuits import Circuit, NodeScores
from refusal_sae.evaluation import EvaluationConfig, evaluate_circuit
from refusal_sae.features import encode_prompts
from refusal_sae.io import to_json
from refusal_sae.metric import RefusalMetric, refusal_scores
from refusal_sae.positions import position_scheme
from tests.conftest import single_thread
from tests.planted import (
    LAYERS,
    METRIC,
    PLANTED,
    exact_saes,
    planted_prompts,
    template_wrapper,
)

GOLDEN = Path(__file__).parent / "golden" / "planted.json"


def _floats(values) -> list[str]:
    """Exact float64 values as hex strings: equal strings mean equal bits."""
    return [float(v).hex() for v in np.asarray(values, dtype=np.float64).ravel()]


def _numbers(root: Path) -> dict:
    with single_thread():
        wrapper = template_wrapper(root)
        splits = planted_prompts(12, categories=("alpha",))
        cache = InferencePipeline(wrapper, ActivationConfig(layers=LAYERS, shard_size=64), root / "cache").run(splits)
        samples = splits["evaluation"]
        scheme = position_scheme(wrapper, splits["discovery"] + samples, "positional")
        pf = encode_prompts(exact_saes(), PromptActivations(cache, ["discovery"]), scheme)
        metric = RefusalMetric.from_wrapper(wrapper, METRIC)
        ablator = Ablator(wrapper, exact_saes(), pf.means, metric, 4)
        importance = {layer: np.zeros((len(scheme.node_classes), 2 * 32 + 1)) for layer in LAYERS}
        for layer in LAYERS:
            importance[layer][scheme.node_classes.index("-1"), PLANTED] = 1.0
            importance[layer][scheme.node_classes.index("content"), :8] = 0.5
        ranking = NodeScores("planted", LAYERS, scheme.node_classes, importance, None, None, 0)
        prompts = [s.prompt for s in samples]
        toxic = np.array([s.refusal_label for s in samples])
        cfg = EvaluationConfig(random_circuits=2, bootstrap=200, error_modes=["keep", "nodes"], sizes=[3, 6, 20])
        record, scores = evaluate_circuit(ablator, prompts, toxic, None,
                                          Circuit("alpha", "all", "planted", LAYERS, []), ranking, cfg)
        discovery = [s.prompt for s in splits["discovery"]]
        weights = np.array([1.0 if s.refusal_label else -1.0 for s in splits["discovery"]]) / len(discovery)
        attribution = {
            estimate: {k: _floats(v) for k, v in attribution_scores(
                wrapper, exact_saes(), pf.means, metric, discovery, weights, estimate=estimate, steps=3,
                batch_size=4).arrays().items()}
            for estimate in ("patching", "ig")
        }
        metric_scores = {str(reuse): _floats(refusal_scores(wrapper, prompts, 4, metric, reuse_prefix=reuse))
                         for reuse in (True, False)}
    return {"evaluation": to_json(record), "variant_scores": {k: _floats(v) for k, v in scores.items()},
            "attribution": attribution, "refusal_scores": metric_scores}


def test_evaluation_attribution_and_metric_numbers_are_unchanged(tmp_path: Path) -> None:
    text = json.dumps(_numbers(tmp_path), indent=1, sort_keys=True) + "\n"
    if os.environ.get("REFUSAL_SAE_WRITE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text, encoding="utf-8")
        pytest.skip(f"wrote {GOLDEN}")
    expected = GOLDEN.read_text(encoding="utf-8")
    if text != expected:
        got, want = json.loads(text), json.loads(expected)
        differ = [k for k in want if got.get(k) != want[k]]
        pytest.fail(f"numbers changed in {differ}; if intended, rewrite {GOLDEN.name} (see the module docstring)")
