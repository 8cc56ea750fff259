"""k2jax's OpenAI-compatible HTTP server (`python -m k2jax.serve`); see docs/serving.md.

It sits above `chat` (render, parse) and `serving` (the persistent engine) in the layering.
"""
