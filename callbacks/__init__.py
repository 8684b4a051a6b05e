"""Callbacks that observe SAE training and report: the circuit analysis."""

from callbacks.circuit_callbacks import CircuitAnalysisCallback

__all__ = ["CircuitAnalysisCallback"]
