"""Measured performance of refusal_sae, side by side with a baseline in one run (`python -m benchmarks.<name>`)."""
