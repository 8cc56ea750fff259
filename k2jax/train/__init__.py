"""Training the k2jax model: optax AdamW on the same Flax modules, K2's routing and balancing,
INT4 quantization-aware training of the routed experts, orbax checkpoints, HF export.

``python -m k2jax.train --recipe default`` trains the shipped default model (docs/training.md).
This package sits at the top of the import graph, beside ``sample`` and ``load``.
"""
