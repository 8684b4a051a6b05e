"""Callbacks that observe SAE training and report: circuit discovery and ablation evaluation."""

from callbacks.circuit_callbacks import AblationEvaluationCallback, CircuitDiscoveryCallback

__all__ = ["AblationEvaluationCallback", "CircuitDiscoveryCallback"]
