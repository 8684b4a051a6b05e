"""Circuits others can open: each circuit as an attribution graph in circuit-tracer's JSON schema.

circuit-tracer (safety-research/circuit-tracer) and Neuronpedia draw a graph of one prompt's tokens, features and
error nodes at (layer, token position), with weighted links ending at a target logit. A circuit here is found over a
category's prompts at position classes, so the exported "prompt" is the list of position classes in prompt order
(`content`, `-5` ... `-1`; `all` for the global scheme) and each node sits at its class:

    feature node   node_id "L_f_c"  (layer L, latent f, position class index c), feature_type "sae latent"
    error node     node_id "L_-1_c" (the SAE's error term there),             feature_type "sae error"
    target         node_id "T_0_c"  at the last class, feature_type "logit": the refusal score F, not one token

`influence` is the node's importance (|indirect effect on F| for attribution, |r| for correlation); links run from
each node to the target with its signed score, and between nodes with the circuit's edge scores. The document holds
circuit-tracer's fields (metadata, qParams, nodes, links); the feature types are this package's own words, since
circuit-tracer's ("cross layer transcoder", "mlp reconstruction error") would misname residual-stream SAEs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from refusal_sae.circuits import ERROR, Circuit

SCHEMA_VERSION = 1
"""circuit-tracer's graph `schema_version` these files follow."""
TARGET_LAYER = "T"


def _layer_index(layer: str) -> int:
    """`residuals_12` -> 12."""
    return int(layer.rsplit("_", 1)[1])


def _feature_id(layer: int, feature: int) -> int:
    """One integer per (layer, latent), as circuit-tracer numbers features (the Cantor pairing)."""
    return (layer + feature) * (layer + feature + 1) // 2 + feature


def circuit_tracer_graph(circuit: Circuit, positions: Sequence[str], model: str, target: str,
                         labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`circuit` as a circuit-tracer graph document. `positions`: the position classes in prompt order (the scheme's
    node classes); `model`: what the SAEs read; `target`: what F is (e.g. the refusal metric); `labels`: a short
    label per node name (the report's), where known."""
    labels = labels or {}
    at = {p: i for i, p in enumerate(positions)}
    last = len(positions) - 1
    ids: dict[str, str] = {}
    nodes = []
    for n in circuit.nodes:
        layer, c = _layer_index(n.layer), at[n.position]
        error = n.feature == ERROR
        node_id = f"{layer}_{-1 if error else n.feature}_{c}"
        ids[n.name] = node_id
        nodes.append({"node_id": node_id, "jsNodeId": f"{layer}_-1-{c}" if error else f"{layer}_{n.feature}-0",
                      "feature": -1 if error else _feature_id(layer, n.feature), "layer": str(layer), "ctx_idx": c,
                      "feature_type": "sae error" if error else "sae latent", "token_prob": 0.0,
                      "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
                      "clerp": labels.get(n.name, "") or n.name, "influence": float(n.importance), "activation": None})
    target_id = f"{TARGET_LAYER}_0_{last}"
    nodes.append({"node_id": target_id, "jsNodeId": f"L_0-{last}", "feature": 0, "layer": TARGET_LAYER, "ctx_idx": last,
                  "feature_type": "logit", "token_prob": 0.0, "is_target_logit": True, "run_idx": 0,
                  "reverse_ctx_idx": 0, "clerp": target, "influence": None, "activation": None})
    links = [{"source": ids[n.name], "target": target_id,
              "weight": float(n.score if n.score is not None else n.importance)} for n in circuit.nodes]
    links += [{"source": ids[e.source], "target": ids[e.target], "weight": float(e.score)} for e in circuit.edges
              if e.source in ids and e.target in ids]
    metadata = {"slug": f"refusal_sae-{circuit.method}-{circuit.name}".replace("/", "-"), "scan": model,
                "transcoder_list": list(circuit.layers), "prompt_tokens": list(positions),
                "prompt": f"{circuit.name}: {circuit.n_prompts} prompts, nodes per position class",
                "node_threshold": circuit.threshold, "schema_version": SCHEMA_VERSION}
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}


__all__ = ["SCHEMA_VERSION", "circuit_tracer_graph"]
