"""refusal_sae: sparse feature circuits for LLM refusal (Marks et al. 2024) on OR-Bench.

The science lives here as plain PyTorch and NumPy, one module per pipeline stage:
`data` (prompts), then activations, SAEs, circuits, evaluation and analysis as they are built.
"""

__version__ = "0.1.0"
